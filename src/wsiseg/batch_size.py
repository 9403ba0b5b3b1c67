"""``data.batch_size=auto``: the largest batch that fits on the device, found by an out-of-memory probe."""

from __future__ import annotations

import logging
from typing import Any

import torch

from wsiseg.errors import UserInputError
from wsiseg.module import SegmentationModule

__all__ = ["resolve_batch_size", "probe_max_batch", "default_batch_size", "CPU_AUTO_BATCH", "GPU_DEFAULT_BATCH"]

log = logging.getLogger(__name__)

# On CPU small batches keep activations in cache, so throughput falls as the batch grows; batch 2 keeps most of batch
# 1's rate while amortising per-batch overhead (measurements: docs/performance.md, "Batch size on CPU").
CPU_AUTO_BATCH = 2
GPU_DEFAULT_BATCH = 16  # data.batch_size=null on a GPU (auto probes the memory instead)


def default_batch_size(device_type: str | None = None) -> int:
    """``data.batch_size=null`` (the default): what is fast on the device kind, :data:`CPU_AUTO_BATCH` on CPUs and
    :data:`GPU_DEFAULT_BATCH` elsewhere; None: the device this process would run on (CUDA when visible)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return CPU_AUTO_BATCH if device_type == "cpu" else GPU_DEFAULT_BATCH


def probe_max_batch(
    module: SegmentationModule, patch_size: int, device: torch.device, trainer: Any, cap: int = 512
) -> int:
    """Double the batch from 1 until a forward pass runs out of CUDA memory (or ``cap``); return the last that fit.

    The module splits batches into chunks under the 32-bit index limit of eager kernels, exactly as in prediction,
    so the probe measures what prediction will need.
    """
    module = module.to(device).eval()
    best, size = 0, 1
    while size <= cap:
        try:
            images = torch.zeros(size, 3, patch_size, patch_size, dtype=torch.uint8, device=device)
            with torch.inference_mode(), trainer.precision_plugin.forward_context():
                module(images)
            torch.cuda.synchronize(device)
            best, size = size, size * 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    if best == 0:
        raise UserInputError(f"data.batch_size=auto: not even one {patch_size}px tile fits in GPU memory")
    return best


def resolve_batch_size(
    batch_size: int | str | None, module: SegmentationModule, patch_size: int, device: torch.device, trainer: Any
) -> int:
    """``batch_size`` as an int: None is the device's default (:func:`default_batch_size`); ``auto`` probes CUDA
    memory (on CPU it is :data:`CPU_AUTO_BATCH`)."""
    if batch_size is None:
        return default_batch_size(device.type)
    if batch_size != "auto":
        return int(batch_size)
    if device.type != "cuda":
        log.info("data.batch_size=auto on CPU: using %d", CPU_AUTO_BATCH)
        return CPU_AUTO_BATCH
    found = probe_max_batch(module, patch_size, device, trainer)
    log.info("data.batch_size=auto: %d tiles of %d px fit on %s", found, patch_size, device)
    return found
