"""Tile readers: how the planned tiles are read by the DataLoader workers and turned into pixels on the device.

One interface, :class:`TileReader`, two implementations chosen once per plan by :func:`choose_reader`
(``data.reader``): :class:`OpenSlideReader` (workers read RGB tiles with OpenSlide) and :class:`JpegTileReader`
(workers read the slide's compressed JPEG tiles; :meth:`JpegTileReader.to_device` decodes them on the device, nvJPEG on
CUDA and libjpeg-turbo on the CPU; slides without JPEG tiles at the read level are read by OpenSlide in the same
batches). Either way ``predict_step`` sees only ``batch["image"]``, (N, 3, H, W) uint8 RGB on its device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from wsiseg.data.datasets import SlideTileDataset, SlideTiles
from wsiseg.hardware import visible_device_type

__all__ = ["READERS", "TileReader", "OpenSlideReader", "JpegTileReader", "choose_reader", "resolve_reader"]

READERS = ("auto", "openslide", "jpeg", "gpu_jpeg")


class TileReader(Protocol):
    """Reads a plan's tiles in batches and moves them to the device as pixels."""

    name: str

    def dataloader(
        self,
        dataset: SlideTileDataset,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        prefetch_factor: int,
        indices: Sequence[int] | None = None,
    ) -> DataLoader:
        """The DataLoader over ``dataset``'s tiles at ``indices`` in that order (None: every tile, in dataset
        order)."""
        ...

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """``batch`` with ``image`` as (N, 3, H, W) uint8 on ``device``; indices and errors stay on the host."""
        ...


@dataclass(frozen=True)
class OpenSlideReader:
    """Workers read RGB tiles with OpenSlide (:class:`~wsiseg.data.datasets.SlideTileDataset`)."""

    name: str = "openslide"

    def dataloader(
        self,
        dataset: SlideTileDataset,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        prefetch_factor: int,
        indices: Sequence[int] | None = None,
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=None if indices is None else list(indices),
            num_workers=num_workers,
            pin_memory=pin_memory and torch.cuda.is_available(),
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        moved = dict(batch)
        moved["image"] = moved["image"].to(device, non_blocking=True)
        return moved


@dataclass(frozen=True)
class JpegTileReader:
    """Workers read compressed JPEG tiles (one layout per slide, None: that slide is read by OpenSlide) and the
    device decodes them (:func:`wsiseg.data.readers.jpeg.decode.decode_batch`); ``colour_checked`` remembers, for
    this reader's run, which colour kinds nvJPEG decodes like libjpeg."""

    layouts: tuple[Any, ...]
    name: str = "jpeg"
    colour_checked: dict[int, bool] = field(default_factory=dict, compare=False)

    def dataloader(
        self,
        dataset: SlideTileDataset,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        prefetch_factor: int,
        indices: Sequence[int] | None = None,
    ) -> DataLoader:
        from wsiseg.data.readers.jpeg.dataset import jpeg_dataloader

        return jpeg_dataloader(dataset, list(self.layouts), batch_size, num_workers, prefetch_factor, indices)

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        from wsiseg.data.readers.jpeg import decode

        moved = dict(batch)
        if "image" in moved:  # tiles of slides OpenSlide read
            moved["image"] = moved["image"].to(device, non_blocking=True)
        if "jpeg_tiles" in moved:
            moved = decode.decode_batch(moved, device, self.colour_checked)  # moves the compressed bytes itself
        return moved


def resolve_reader(option: str, num_workers: int, device_type: str | None = None) -> str:
    """``data.reader`` as ``openslide`` or ``jpeg`` for a run on ``device_type`` (``cuda``, ``cpu``; None: CUDA when a
    device is visible) with ``num_workers`` DataLoader workers. ``auto``: JPEG tiles on CUDA (the workers only read
    compressed bytes and nvJPEG decodes each batch on the GPU, where OpenSlide would decode them in the workers, the
    bound of a GPU run) and on CPU-only runs whose main process reads (``num_workers=0``: libjpeg-turbo between network
    calls beats OpenSlide, docs/performance.md); else OpenSlide (CPU workers decode in parallel with the network)."""
    if option == "auto":
        device_type = device_type or visible_device_type()
        return "jpeg" if device_type == "cuda" or num_workers == 0 else "openslide"
    return "openslide" if option == "openslide" else "jpeg"


def choose_reader(
    option: str, slides: Sequence[SlideTiles], num_workers: int, device_type: str | None = None
) -> TileReader:
    """The reader for ``slides`` under ``data.reader=option`` (:func:`resolve_reader`): :class:`JpegTileReader` when
    JPEG tiles are chosen and at least one slide has them at its read level (the others are named once, as a warning
    unless chosen by ``auto``; they are read by OpenSlide), else :class:`OpenSlideReader`."""
    if resolve_reader(option, num_workers, device_type) == "jpeg":
        from wsiseg.data.readers.jpeg.dataset import jpeg_layouts

        layouts = jpeg_layouts(slides, option, quiet=option == "auto")
        if any(layout is not None for layout in layouts):
            return JpegTileReader(tuple(layouts))
    return OpenSlideReader()
