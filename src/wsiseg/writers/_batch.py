"""Small helpers for reading collated predict-step outputs."""

from __future__ import annotations

from typing import Any

import torch


def as_ints(value: Any) -> list[int]:
    """A collated index field (tensor or sequence) as a list of Python ints."""
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.tolist()]
    return [int(v) for v in value]


def to_host_async(values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying a CUDA tensor into pinned host memory without waiting for it; returns the host tensor and an event
    to ``synchronize()`` before reading it (None when ``values`` is already on the host).

    The main thread can then launch the next batch while this one is still computing and copying."""
    if values.device.type != "cuda":
        return values.detach().cpu(), None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready
