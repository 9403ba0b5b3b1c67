"""``data.batch_size`` for a run: the device's default (null; :func:`wsiseg.hardware.default_batch_size`) capped at one
network chunk, or the largest batch that fits on the device (``auto``, found by an out-of-memory probe), in whole
network chunks."""

from __future__ import annotations

import logging
from typing import Any

import torch

from wsiseg.errors import UserInputError
from wsiseg.hardware import CPU_AUTO_BATCH, GPU_DEFAULT_BATCH, default_batch_size
from wsiseg.module import SegmentationModule

__all__ = [
    "gpu_default_batch",
    "network_chunk",
    "probe_max_batch",
    "resolve_batch_size",
    "whole_chunks",
]

log = logging.getLogger(__name__)


def network_chunk(module: SegmentationModule, patch_size: int) -> int:
    """Tiles of ``patch_size`` px the module runs through its network at once (``model.max_chunk``, else the most that
    keep the largest activation under the 32-bit index limit: :meth:`SegmentationModule.chunk_size`)."""
    shape_only = torch.empty((1 << 20, 3, patch_size, patch_size), dtype=torch.uint8, device="meta")
    return int(module.chunk_size(shape_only))


def gpu_default_batch(chunk: int) -> int:
    """``data.batch_size=null`` on a GPU: :data:`GPU_DEFAULT_BATCH`, or one network chunk of ``chunk`` tiles when that
    is smaller (a batch of one chunk and a bit would run a second, mostly padded chunk)."""
    return max(1, min(GPU_DEFAULT_BATCH, chunk))


def whole_chunks(batch: int, chunk: int) -> int:
    """``batch`` rounded down to a multiple of ``chunk`` (tiles per network call), so no network call of the batch is
    short: a compiled network pads a short chunk to the size it was compiled for, computing tiles it throws away. A
    batch smaller than one chunk is one network call already and is kept."""
    return batch if batch < chunk else batch // chunk * chunk


def probe_max_batch(
    module: SegmentationModule, patch_size: int, device: torch.device, trainer: Any, cap: int = 512
) -> int:
    """Double the batch from 1 until a forward pass runs out of CUDA memory (or ``cap``); return the last that fit.

    The module splits batches into chunks under the 32-bit index limit of eager kernels, exactly as in prediction,
    so the probe measures what prediction will need. It synchronises with the device after each try (once per run,
    before prediction).
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
    """``batch_size`` as an int. None: the device's default, on a GPU at most one network chunk
    (:func:`gpu_default_batch`); ``auto``: the largest batch that fits in CUDA memory, rounded down to whole network
    chunks (:func:`whole_chunks`) — on CPU :data:`CPU_AUTO_BATCH`; an int is kept as given."""
    if batch_size is None:
        if device.type == "cpu":
            return default_batch_size("cpu")
        return gpu_default_batch(network_chunk(module, patch_size))
    if batch_size != "auto":
        return int(batch_size)
    if device.type != "cuda":
        log.info("data.batch_size=auto on CPU: using %d", CPU_AUTO_BATCH)
        return CPU_AUTO_BATCH
    found = probe_max_batch(module, patch_size, device, trainer)
    chunk = network_chunk(module, patch_size)
    batch = whole_chunks(found, chunk)
    log.info(
        "data.batch_size=auto: %d tiles of %d px fit on %s; using %d (whole chunks of %d tiles)",
        found,
        patch_size,
        device,
        batch,
        chunk,
    )
    return batch
