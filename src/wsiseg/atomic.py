"""Atomic file output: write to a temporary name in the same folder, then rename over the target."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_json_atomic", "remove_leftovers"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on error delete it.

    A crash therefore never leaves a half-written file under the final name.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def remove_leftovers(folder: str | Path) -> int:
    """Delete the temporary files :func:`atomic_path` leaves when a process is killed mid-write (``.<name>.<pid>.tmp``)
    under ``folder``, recursively; returns how many. Only files of that exact pattern go."""
    removed = 0
    for tmp in Path(folder).rglob(".*.tmp"):
        parts = tmp.name[1:-4].rsplit(".", 1)
        if tmp.is_file() and len(parts) == 2 and parts[1].isdigit():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
