"""Chunked, on-disk stores of a slide-sized output whose host memory does not grow with slide area.

``BlendingAccumulator`` blends overlapping tiles; ``TileMosaic`` is its cheaper twin for grids whose tiles do not
overlap (``data.overlap=0``, the default) with one probability channel: each pixel comes from exactly one tile, so
it stores the final uint8 value (``round(255·p)``) instead of float32 sums and weights — 8× less to keep, spill and
read back, and nothing to divide at the end.

Tiles are blended as ``sum += w · p`` and ``weight += w`` (output px frame). Chunks live in a small write-back LRU
cache in memory and spill to disk as one raw ``.npy`` file per chunk (channels sums + the weight plane, float32);
chunks no tile touched are never created, so background costs nothing. Partial accumulators (one per DDP rank) merge by
adding sums and weights.

Raw files rather than a zarr array: a spilled chunk is written once and read once, and zarr's per-chunk machinery
costs far more per chunk than ``np.save``/``np.load`` (measurements: docs/performance.md, "Writer and finalisation").
"""

from __future__ import annotations

import json
import math
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

__all__ = ["BlendingAccumulator", "TileMosaic", "probabilities_to_u8"]


def probabilities_to_u8(probs: np.ndarray) -> np.ndarray:
    """``round(255·p)`` saturated to 0-255 as uint8, for a 2-D float array (float16 is converted). One OpenCV pass
    (much cheaper than numpy's rint/clip/astype); its |·| is harmless once negatives (logits with
    ``activation=none``) are zeroed."""
    return cv2.convertScaleAbs(np.maximum(probs.astype(np.float32, copy=False), 0.0), alpha=255.0)


class BlendingAccumulator:
    """Weighted-sum accumulator over a (channels, height, width) output image, chunked on disk.

    Args:
        path: folder for spilled chunks (created; removed by :meth:`delete`); None keeps every chunk in memory (for
            images small enough to hold whole, e.g. patch mode's).
        channels: probability channels per pixel.
        size: (W, H) of the output image, output px.
        chunk: chunk side, output px.
        cache_bytes: memory budget for decoded chunks held in memory (write-back LRU).

    Example::

        acc = BlendingAccumulator(tmp / "acc", 1, (1000, 800))
        acc.add(0, 0, probs, window)          # probs (1, h, w), window (h, w)
        for y0, rows, chunks in acc.band_chunks():
            for x0, mean, covered in chunks:  # mean (1, rows, w) float32 weighted mean, touched chunks only
                ...
    """

    def __init__(
        self,
        path: str | Path | None,
        channels: int,
        size: tuple[int, int],
        chunk: int = 512,
        cache_bytes: int = 128 << 20,
    ) -> None:
        self.path = None if path is None else Path(path)
        self.channels, self.size, self.chunk = channels, tuple(size), chunk
        width, height = self.size
        self.chunk_grid = (math.ceil(height / chunk), math.ceil(width / chunk))
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        if self.path is None:
            self._cache_limit = math.prod(self.chunk_grid)  # every chunk stays in memory
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            planes_bytes = self._planes * chunk * chunk * np.dtype(self._dtype).itemsize
            self._cache_limit = max(1, cache_bytes // planes_bytes)
        self.touched: set[tuple[int, int]] = set()
        self._on_disk: set[tuple[int, int]] = set()

    # -- what a chunk holds (TileMosaic overrides these) ---------------------------------------------------------
    @property
    def _planes(self) -> int:
        return self.channels + 1  # channel sums, then the weight plane

    _dtype: type = np.float32

    def _put(self, planes: np.ndarray, values: np.ndarray, weights: np.ndarray) -> None:
        """Blend a tile piece into a chunk piece: ``values`` (C, h, w), ``weights`` (h, w)."""
        planes[: self.channels] += values * weights[None]
        planes[self.channels] += weights

    def _merge(self, planes: np.ndarray, other: np.ndarray) -> None:
        planes += other

    def _final(self, planes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """A chunk's read-back: (C, h, w) float32 weighted mean (0 where no weight) and (h, w) covered."""
        sums, weights = planes[: self.channels], planes[self.channels]
        covered = weights > 0
        mean = np.zeros_like(sums)
        np.divide(sums, weights[None], out=mean, where=covered[None])
        return mean, covered

    # -- chunk cache ---------------------------------------------------------------------------------------------
    def _chunk_bounds(self, cy: int, cx: int) -> tuple[int, int, int, int]:
        y0, x0 = cy * self.chunk, cx * self.chunk
        return y0, min(y0 + self.chunk, self.size[1]), x0, min(x0 + self.chunk, self.size[0])

    def _get_chunk(self, cy: int, cx: int) -> np.ndarray:
        key = (cy, cx)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        y0, y1, x0, x1 = self._chunk_bounds(cy, cx)
        if key in self._on_disk:
            entry = self._load(self.path, cy, cx)
        else:
            entry = np.zeros((self._planes, y1 - y0, x1 - x0), self._dtype)
        self._cache[key] = entry
        self.touched.add(key)
        while len(self._cache) > self._cache_limit:
            self._evict()
        return entry

    @staticmethod
    def _chunk_file(folder: Path, cy: int, cx: int) -> Path:
        return folder / f"{cy}_{cx}.npy"

    def _load(self, folder: Path, cy: int, cx: int) -> np.ndarray:
        """A spilled chunk's planes."""
        return np.load(self._chunk_file(folder, cy, cx))

    def _evict(self) -> None:
        (cy, cx), planes = self._cache.popitem(last=False)
        np.save(self._chunk_file(self.path, cy, cx), planes, allow_pickle=False)
        self._on_disk.add((cy, cx))

    def flush(self) -> None:
        """Write every cached chunk to disk and record which chunks exist (for merging)."""
        while self._cache:
            self._evict()
        (self.path / "touched.json").write_text(json.dumps(sorted(self.touched)))

    # -- accumulation --------------------------------------------------------------------------------------------
    def add(self, x0: int, y0: int, values: np.ndarray, weights: np.ndarray) -> None:
        """Blend one tile: ``values`` (C, h, w) at output-px origin (x0, y0) with per-pixel ``weights`` (h, w).

        The parts of the tile outside the image (edge tiles) are cropped.
        """
        _, h, w = values.shape
        width, height = self.size
        y_end, x_end = min(y0 + h, height), min(x0 + w, width)
        if y_end <= y0 or x_end <= x0:
            return
        values, weights = self._prepare(values[:, : y_end - y0, : x_end - x0], weights[: y_end - y0, : x_end - x0])
        for cy in range(y0 // self.chunk, (y_end - 1) // self.chunk + 1):
            for cx in range(x0 // self.chunk, (x_end - 1) // self.chunk + 1):
                cy0, cy1, cx0, cx1 = self._chunk_bounds(cy, cx)
                sy0, sy1 = max(y0, cy0), min(y_end, cy1)
                sx0, sx1 = max(x0, cx0), min(x_end, cx1)
                planes = self._get_chunk(cy, cx)
                self._put(
                    planes[:, sy0 - cy0 : sy1 - cy0, sx0 - cx0 : sx1 - cx0],
                    values[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0],
                    weights[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0],
                )

    def _prepare(self, values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Once per tile, before it is split over chunks (float32 values: float16 tiles blend in float32)."""
        return values.astype(np.float32, copy=False), weights

    def merge_from(self, other_path: str | Path) -> None:
        """Add a flushed store (same geometry, e.g. another DDP rank's) into this one, chunk by chunk."""
        other_path = Path(other_path)
        touched = [tuple(t) for t in json.loads((other_path / "touched.json").read_text())]
        for cy, cx in touched:
            self._merge(self._get_chunk(cy, cx), self._load(other_path, cy, cx))

    # -- read back -----------------------------------------------------------------------------------------------
    def band_chunks(self) -> Iterator[tuple[int, int, list[tuple[int, np.ndarray, np.ndarray | None]]]]:
        """Yield one entry per row of chunks: ``(y0, rows, chunks)`` where ``chunks`` lists ``(x0, value, covered)`` for
        the chunks some tile touched — for a ``BlendingAccumulator`` ``value`` is the (C, rows, w) float32 weighted
        mean (0 where no weight) and ``covered`` (rows, w) bool; for a ``TileMosaic`` ``value`` is (1, rows, w) uint8
        and ``covered`` None. Untouched chunks are left out (they are background).

        Chunks still in the memory cache are used (and released) directly; only evicted ones are read from disk.
        Consumes the store: it cannot be added to afterwards.
        """
        height = self.size[1]
        for cy in range(self.chunk_grid[0]):
            y0, y1 = cy * self.chunk, min((cy + 1) * self.chunk, height)
            chunks = []
            for cx in range(self.chunk_grid[1]):
                if (cy, cx) not in self.touched:
                    continue
                _, _, x0, _ = self._chunk_bounds(cy, cx)
                cached = self._cache.pop((cy, cx), None)
                planes = cached if cached is not None else self._load(self.path, cy, cx)
                chunks.append((x0, *self._final(planes)))
            yield y0, y1 - y0, chunks

    def read_all(self) -> np.ndarray:
        """The whole image's (C, H, W) float32 weighted mean, 0 where no tile reached (consumes the store; for
        images small enough to hold whole)."""
        width, height = self.size
        out = np.zeros((self.channels, height, width), np.float32)
        for y0, rows, chunks in self.band_chunks():
            for x0, value, _ in chunks:
                out[:, y0 : y0 + rows, x0 : x0 + value.shape[-1]] = value
        return out

    def delete(self) -> None:
        """Remove the on-disk store (and drop the chunks held in memory)."""
        self._cache.clear()
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


class TileMosaic(BlendingAccumulator):
    """The store for tiles that do not overlap, one channel: keeps ``round(255·p)`` as uint8 (saturated to 0-255),
    written once per pixel; ``weights`` are ignored. Same interface as :class:`BlendingAccumulator`; ``band_chunks``
    yields uint8 values. Partial mosaics (DDP ranks) merge by maximum (each pixel was written by one rank; a tile
    predicted on two ranks gives the same value twice).

    Example::

        mosaic = TileMosaic(tmp / "m", (1000, 800))
        mosaic.add(0, 0, probs, window)  # probs (1, h, w) float in [0, 1]
    """

    def __init__(self, path: str | Path, size: tuple[int, int], chunk: int = 512, cache_bytes: int = 128 << 20) -> None:
        super().__init__(path, 1, size, chunk, cache_bytes)

    @property
    def _planes(self) -> int:
        return 1

    _dtype = np.uint8

    def _prepare(self, values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return probabilities_to_u8(values[0])[None], weights

    def _put(self, planes: np.ndarray, values: np.ndarray, weights: np.ndarray) -> None:
        planes[...] = values

    def _merge(self, planes: np.ndarray, other: np.ndarray) -> None:
        np.maximum(planes, other, out=planes)

    def _final(self, planes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return planes, None
