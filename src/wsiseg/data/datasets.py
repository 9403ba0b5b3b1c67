"""Tile datasets: which tiles of which slides, and reading them (one OpenSlide handle per process, opened lazily and
shared by the read threads)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import torch
from torch.utils.data import Dataset

from wsiseg.data.grid import TileGrid
from wsiseg.data.slide import SlideLevel, read_rgb
from wsiseg.data.stain import SlideStain
from wsiseg.data.tissue import Thumbnail

__all__ = ["SlideTiles", "SlideTileDataset"]


@dataclass
class SlideTiles:
    """One slide's plan: where to read and which tiles to process.

    Attributes:
        path: slide file.
        name: output folder name (the file stem, made unique within the run).
        level: the read level.
        level0_size: (W, H) level-0 px.
        grid: tile grid over the read level.
        origins: (N, 2) int64 origins (x, y), read-level px, of the tiles to process (tissue tiles), raster order.
        tiles_total: tiles in the full grid.
        tissue_fraction: fraction of the thumbnail classed as tissue (1.0 when tissue detection is off).
        thumbnail: thumbnail used for tissue detection and the heatmap.
        properties: the slide's ``openslide.*`` properties.
        identity: path, size and mtime of the file when planned (resume compares them).
        mpp_source: where the level-0 µm/px came from: ``slide`` (its metadata), ``override`` (``data.slide_mpp``) or
            None (unknown).
        mpp_target: the option whose µm/px chose the read level (``data.mpp``, ``model.mpp``) or None.
        stain: the slide's stain transform (``data.stain``; :class:`wsiseg.data.stain.SlideStain`), None without.
    """

    path: Path
    name: str
    level: SlideLevel
    level0_size: tuple[int, int]
    grid: TileGrid
    origins: np.ndarray
    tiles_total: int
    tissue_fraction: float
    thumbnail: Thumbnail
    properties: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)  # wsiseg.data.plan.slide_identity of the file
    mpp_source: str | None = None  # where the level-0 mpp came from: "slide" (metadata), "override" (data.slide_mpp)
    mpp_target: str | None = None  # the option that chose the read level's mpp: "data.mpp", "model.mpp", or None
    stain: SlideStain | None = None  # data.stain's transform of this slide's tiles

    @property
    def tiles_tissue(self) -> int:
        return int(len(self.origins))


class SlideTileDataset(Dataset):
    """All tissue tiles of several slides, flattened in slide order then raster order.

    Each item is a dict: ``image`` (3, P, P) uint8 tensor (RGB, padded white past the slide edge), ``slide_index``,
    ``tile_index`` (index into that slide's ``origins``), ``x``/``y`` (tile origin, read-level px) and ``error`` (empty,
    or why the tile could not be read — the image is then white and the writer fails that slide).
    """

    def __init__(self, slides: list[SlideTiles], read_threads: int = 1) -> None:
        self.slides = slides
        self.read_threads = read_threads
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        counts = [s.tiles_tissue for s in slides]
        self._slide_of = np.repeat(np.arange(len(slides), dtype=np.int64), counts)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._handles: dict[int, openslide.OpenSlide] = {}
        self._broken: dict[int, str] = {}

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        # Handles are per process: workers open their own on first use.
        state = self.__dict__.copy()
        state["_handles"], state["_broken"], state["_pool"], state["_lock"] = {}, {}, None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _handle(self, slide_index: int) -> openslide.OpenSlide:
        handle = self._handles.get(slide_index)
        if handle is None:
            with self._lock:  # read threads share one handle per slide (OpenSlide is thread-safe)
                handle = self._handles.get(slide_index)
                if handle is None:
                    handle = openslide.OpenSlide(str(self.slides[slide_index].path))
                    self._handles[slide_index] = handle
        return handle

    def locate(self, index: int) -> tuple[int, int]:
        """(slide_index, tile_index) of flat dataset ``index``."""
        slide_index = int(self._slide_of[index])
        return slide_index, int(index - self._offsets[slide_index])

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A batch's items (the DataLoader's batched fetch), read on ``read_threads`` threads."""
        if self.read_threads <= 1 or len(indices) <= 1:
            return [self[i] for i in indices]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="wsiseg-read")
        return list(self._pool.map(self.__getitem__, indices))

    def __getitem__(self, index: int) -> dict[str, Any]:
        slide_index, tile_index = self.locate(index)
        slide = self.slides[slide_index]
        x, y = (int(v) for v in slide.origins[tile_index])
        size = slide.grid.patch_size
        error = self._broken.get(slide_index, "")
        rgb = None
        if not error:
            try:
                rgb = read_rgb(self._handle(slide_index), x, y, slide.level, size, size)
            except openslide.OpenSlideError as exc:
                # OpenSlide errors are sticky per handle: remember and stop reading this slide in this worker.
                error = (
                    f"slide '{slide.path}' tile at read-level ({x}, {y}) level {slide.level.level} unreadable: {exc}"
                )
                self._broken[slide_index] = error
        if rgb is None:
            rgb = np.full((size, size, 3), 255, np.uint8)
        return {
            # CHW copy in numpy: read threads must not run torch's OpenMP kernels — each thread that does gets its own
            # OpenMP team, and while those exist the network's parallel regions in the main thread run slower
            "image": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))),
            "slide_index": slide_index,
            "tile_index": tile_index,
            "x": x,
            "y": y,
            "error": error,
        }
