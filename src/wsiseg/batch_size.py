"""``data.batch_size=auto``: the largest batch that fits on the device, found by an out-of-memory probe."""

from __future__ import annotations

import logging
from typing import Any

import torch

from wsiseg.errors import UserInputError
from wsiseg.module import SegmentationModule

__all__ = ["resolve_batch_size", "probe_max_batch"]

log = logging.getLogger(__name__)

# On CPU small batches keep activations in cache, so throughput falls as the batch grows; batch 2 keeps most of batch
# 1's rate while amortising per-batch overhead (measurements: docs/performance.md, "Batch size on CPU").
CPU_AUTO_BATCH = 2


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
    batch_size: int | str, module: SegmentationModule, patch_size: int, device: torch.device, trainer: Any
) -> int:
    """``batch_size`` as an int; ``auto`` probes CUDA memory (on CPU it is :data:`CPU_AUTO_BATCH`)."""
    if batch_size != "auto":
        return int(batch_size)
    if device.type != "cuda":
        log.info("data.batch_size=auto on CPU: using %d", CPU_AUTO_BATCH)
        return CPU_AUTO_BATCH
    found = probe_max_batch(module, patch_size, device, trainer)
    log.info("data.batch_size=auto: %d tiles of %d px fit on %s", found, patch_size, device)
    return found
