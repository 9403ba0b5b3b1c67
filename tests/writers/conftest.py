"""Slide plans made in memory (no slide file): the writer parts are driven with them directly, without a Trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsiseg.data.datasets import SlideTiles
from wsiseg.data.grid import TileGrid
from wsiseg.data.slide import SlideLevel
from wsiseg.data.tissue import Thumbnail


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
