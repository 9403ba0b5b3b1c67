"""Helpers for the writer tests: slide plans made in memory (no slide file), so the writer parts are driven directly
without a Trainer, and a store read back as one array."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsiseg.data.datasets import SlideTiles
from wsiseg.data.grid import TileGrid
from wsiseg.data.slide import SlideLevel
from wsiseg.data.tissue import Thumbnail
from wsiseg.writers.store import BlendingAccumulator


def planned_slide(
    name: str, size: tuple[int, int] = (200, 150), patch: int = 64, overlap: int = 0, output_downsample: int = 1
) -> SlideTiles:
    """A plan for a ``size`` (W, H) read level at 0.5 µm/px with every tile of its grid to process."""
    grid = TileGrid(size, patch, overlap, output_downsample)
    origins = grid.origins()
    thumbnail = Thumbnail(np.full((size[1] // 4, size[0] // 4, 3), 230, np.uint8), (4.0, 4.0))
    return SlideTiles(
        path=Path(f"/slides/{name}.svs"),
        name=name,
        level=SlideLevel(level=0, downsample=1.0, size=size, mpp=0.5),
        level0_size=size,
        grid=grid,
        origins=origins,
        tiles_total=len(origins),
        tissue_fraction=1.0,
        thumbnail=thumbnail,
    )


def dense(store: BlendingAccumulator) -> np.ndarray:
    """The whole store as (C, H, W) float32 blended values, output px."""
    width, height = store.size
    out = np.zeros((store.channels, height, width), np.float32)
    for y0, rows, chunks in store.band_chunks():
        for x0, mean, _ in chunks:
            out[:, y0 : y0 + rows, x0 : x0 + mean.shape[2]] = mean
    return out
