"""Small helpers for reading collated predict-step outputs."""

from __future__ import annotations

from typing import Any

import torch


def as_ints(value: Any) -> list[int]:
    """A collated index field (tensor or sequence) as a list of Python ints."""
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.tolist()]
    return [int(v) for v in value]
