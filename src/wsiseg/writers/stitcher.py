"""Tiles into per-slide stores: each predicted tile (output px) is blended into its slide's chunked store.

Plain code, no Lightning: the slide writer hands it host arrays batch by batch; the distribution strategy merges the
stores of several ranks through :meth:`Stitcher.save_partial` / :meth:`Stitcher.merge_partial`.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsiseg.data.datasets import SlideTiles
from wsiseg.data.grid import BLEND_MODES, blend_window
from wsiseg.errors import UserInputError
from wsiseg.writers.mosaic import TileMosaic
from wsiseg.writers.store import BlendingAccumulator

__all__ = ["SlideState", "Stitcher", "StoreOptions"]


@dataclass(frozen=True)
class StoreOptions:
    """How tiles are blended into a slide's store (``writer.*``).

    Attributes:
        blend: ``none`` | ``linear`` | ``gaussian`` tile weights (:func:`wsiseg.data.grid.blend_window`).
        sigma_scale: Gaussian width relative to the tile side.
        chunk: store chunk side, output px.
        cache_bytes: memory for store chunks held in RAM.
    """

    blend: str = "gaussian"
    sigma_scale: float = 0.125
    chunk: int = 512
    cache_bytes: int = 128 << 20

    def __post_init__(self) -> None:
        """Raises UserInputError naming ``writer.blend`` when it is not one of :data:`BLEND_MODES`."""
        if self.blend not in BLEND_MODES:
            raise UserInputError(f"writer.blend must be one of {', '.join(BLEND_MODES)}; got '{self.blend}'")
        if not self.sigma_scale > 0:
            raise UserInputError(f"writer.sigma_scale must be > 0 (Gaussian width / tile side), got {self.sigma_scale}")

    def window(self, size: int) -> np.ndarray:
        """The (size, size) float32 blending weights of a ``size`` px tile (output px) for these options, computed once
        per size and shared by every store and writer (read only: stores key their weight records on its identity)."""
        return _blend_window(size, self.blend, self.sigma_scale)


@functools.cache
def _blend_window(size: int, blend: str, sigma_scale: float) -> np.ndarray:
    return blend_window(size, blend, sigma_scale)


@dataclass
class SlideState:
    """What has arrived of one slide on this rank.

    Attributes:
        store: the slide's store (output px); a uint8 :class:`TileMosaic` when no two tiles overlap.
        started: ``time.perf_counter()`` when the batch holding the slide's first tile started.
        tiles_seen: indices (into the slide's ``origins``) of the tiles blended.
        duplicates: tiles that arrived again (or belong to another rank) and were not blended.
        error: the first tile error of the slide (it then fails).
        tiles_per_rank: tiles blended by each rank, after a merge.
    """

    store: BlendingAccumulator
    started: float
    tiles_seen: set[int] = field(default_factory=set)
    duplicates: int = 0
    error: str = ""
    tiles_per_rank: list[int] = field(default_factory=list)


class Stitcher:
    """Per-slide stores of one rank under ``output_dir/<slide name>/.partial-rank<rank>``.

    Args:
        slides: the run's planned slides (indices are the batches' ``slide_index``).
        output_dir: the run folder.
        output_downsample: read-level px per output px (tile origins are divided by it).
        options: blending and store options.
        rank: this process's rank (names its partial store).
        in_order: tiles arrive in raster order within each slide and no other rank's store is merged into this
            one: chunks the order has passed are then kept as their final uint8 values (``final_on_pass``).
    """

    def __init__(
        self,
        slides: list[SlideTiles],
        output_dir: Path,
        output_downsample: int = 1,
        options: StoreOptions | None = None,
        rank: int = 0,
        in_order: bool = False,
    ) -> None:
        self.slides, self.output_dir, self.rank, self.in_order = slides, output_dir, rank, in_order
        self.output_downsample, self.options = output_downsample, options or StoreOptions()
        self.states: dict[int, SlideState] = {}
        self.channels = 1

    def slide_dir(self, index: int) -> Path:
        return self.output_dir / self.slides[index].name

    def partial_dir(self, index: int, rank: int) -> Path:
        return self.slide_dir(index) / f".partial-rank{rank}"

    def state(self, index: int, started: float | None = None) -> SlideState:
        """Slide ``index``'s state, created (with an empty store) on first use; ``started`` defaults to now."""
        state = self.states.get(index)
        if state is None:
            slide = self.slides[index]
            self.slide_dir(index).mkdir(parents=True, exist_ok=True)
            partial, size = self.partial_dir(index, self.rank), slide.grid.output_size
            chunk, cache_bytes = self.options.chunk, self.options.cache_bytes
            row_step = slide.grid.step // self.output_downsample  # tiles arrive in raster order (SlideTiles.origins)
            store: BlendingAccumulator
            if slide.grid.overlap == 0 and self.channels == 1:
                # no two tiles share a pixel: nothing to blend, keep the final uint8 values
                store = TileMosaic(partial, size, chunk, cache_bytes, row_step, self.in_order)
            else:
                store = BlendingAccumulator(partial, self.channels, size, chunk, cache_bytes, row_step, self.in_order)
            state = SlideState(store=store, started=time.perf_counter() if started is None else started)
            self.states[index] = state
        return state

    def add_batch(
        self,
        probs: np.ndarray,
        slide_indices: list[int],
        tile_indices: list[int],
        errors: list[str],
        mine: list[bool],
        batch_started: float,
    ) -> None:
        """Blend one batch: ``probs`` (N, C, h, w) maps in output px; ``mine[i]`` is False for a tile another rank
        blends (counted as a duplicate here). A tile with an error is not blended and fails its slide."""
        self.channels = probs.shape[1]
        for i, (slide_index, tile_index) in enumerate(zip(slide_indices, tile_indices)):
            state = self.state(slide_index, batch_started)
            if not mine[i]:
                state.duplicates += 1
                continue
            if errors[i]:
                state.error = state.error or errors[i]
                continue
            if tile_index in state.tiles_seen:
                state.duplicates += 1
                continue
            state.tiles_seen.add(tile_index)
            x, y = (int(v) for v in self.slides[slide_index].origins[tile_index])
            tile = probs[i]
            state.store.add(
                x // self.output_downsample, y // self.output_downsample, tile, self.options.window(tile.shape[-1])
            )

    def save_partial(self, index: int) -> None:
        """Flush slide ``index``'s store and write what this rank saw of it next to it (for a merge on rank 0)."""
        state = self.state(index)
        state.store.flush()
        partial = self.partial_dir(index, self.rank)
        partial.mkdir(parents=True, exist_ok=True)
        meta = {"tiles": sorted(state.tiles_seen), "error": state.error, "duplicates": state.duplicates}
        (partial / "rank.json").write_text(json.dumps(meta))

    def merge_partial(self, index: int, rank: int) -> int:
        """Add ``rank``'s saved store of slide ``index`` into this one; returns the tiles both ranks blended."""
        state = self.state(index)
        partial = self.partial_dir(index, rank)
        meta = json.loads((partial / "rank.json").read_text())
        overlap = state.tiles_seen.intersection(meta["tiles"])
        state.duplicates += len(overlap) + meta["duplicates"]
        state.tiles_seen.update(meta["tiles"])
        state.tiles_per_rank.append(len(meta["tiles"]))
        state.error = state.error or meta["error"]
        state.store.merge_from(partial)
        shutil.rmtree(partial, ignore_errors=True)
        return len(overlap)

    def release(self, index: int) -> None:
        """Delete slide ``index``'s store and scratch files (its outputs are written or abandoned)."""
        state = self.states.get(index)
        if state is not None:
            state.store.delete()
        shutil.rmtree(self.slide_dir(index) / ".scratch", ignore_errors=True)
