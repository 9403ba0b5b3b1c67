"""Host allocator tuning for CPU inference.

glibc serves allocations above a (dynamic) threshold with fresh ``mmap`` pages and returns them on ``free``. A compiled
network on CPU allocates its activations (MBs per tile) on every call, so without tuning each forward pass page-faults
all of them in again, which costs a large share of CPU throughput (measurements: docs/performance.md, "Memory").
Raising the mmap threshold to its maximum (32 MiB) and keeping freed memory in the heap makes those buffers reusable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["keep_freed_memory"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD_BYTES = 256 * 2**20  # free memory kept at the top of the heap before it is returned to the OS

_tuned = False


def keep_freed_memory() -> bool:
    """Make glibc reuse freed blocks of up to 32 MiB instead of unmapping them (idempotent, process-wide).

    Returns True when the settings were applied (glibc), False elsewhere (macOS, musl, Windows), where it does nothing.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) != 1:
        return False
    _tuned = True
    log.debug(
        "glibc malloc: mmap threshold %d MiB, trim %d MiB", MMAP_THRESHOLD_BYTES >> 20, TRIM_THRESHOLD_BYTES >> 20
    )
    return True
