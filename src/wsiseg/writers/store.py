"""Chunked, on-disk stores of a slide-sized output whose host memory does not grow with slide area.

``BlendingAccumulator`` blends overlapping tiles; :class:`wsiseg.writers.mosaic.TileMosaic` is its cheaper twin for
grids whose tiles do not overlap.

Tiles are blended as ``sum += w · p`` and ``weight += w`` (output px frame), each product and sum rounded to float32
(float16 tiles are widened exactly first). Chunks live in a write-back cache in memory, sized to what the raster
tile order keeps open (:class:`BlendingAccumulator`), and spill to disk as one raw ``.npy`` file per chunk (channels
sums + the weight plane, float32); chunks no tile touched are never created, so background costs nothing. Partial
accumulators (one per DDP rank) merge by adding sums and weights.

When tiles come in raster order and no merge is to come (one process, or whole slides per DDP rank:
``final_on_pass``), a chunk the order has passed is reduced to the uint8 block the mask holds when the cache evicts
it, and those blocks (a quarter of a float32 plane) are held in memory up to the cache budget, then spilled; the
weights are then not a plane of the chunks but summed per chunk, when it is made final, from the tile pieces it
recorded (grid-interior chunks share one sum). Same uint8 values, a fraction of the memory traffic, no float spills.

The per-tile arithmetic runs in OpenCV, one pass per operation on views of the chunk arrays, in the calling thread:
numpy's float16 → float32 cast alone cost more than the whole blend, and torch kernels on a blending thread would give
that thread an OpenMP team of its own beside the network's. Where the installed OpenCV cannot compute on float16
(before 5.0), float16 tiles are first cast with numpy: same values, slower.

Raw files rather than a zarr array: a spilled chunk is written once and read once, and zarr's per-chunk machinery
costs far more per chunk than ``np.save``/``np.load``. Measurements of both: docs/performance.md ("Writer and
finalisation", "Stitching on the host (issue 27)").
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil

__all__ = ["CACHE_SHARE_OF_AVAILABLE", "BlendingAccumulator", "probabilities_to_u8"]

log = logging.getLogger(__name__)

CACHE_SHARE_OF_AVAILABLE = 0.25
"""A store's chunk cache grows past ``cache_bytes`` (to keep the chunks a raster tile order has open) up to this share
of the memory psutil reports available when it first outgrows ``cache_bytes``."""


def _opencv_computes_on_float16() -> bool:
    """Whether the installed OpenCV takes float16 arrays in the operations used here (OpenCV >= 5.0)."""
    half, single = np.zeros((1, 1), np.float16), np.zeros((1, 1), np.float32)
    try:
        cv2.convertScaleAbs(cv2.max(half, 0.0), alpha=255.0)
        cv2.multiply(half, single, dtype=cv2.CV_32F)
    except cv2.error:
        return False
    return True


_OPENCV_FLOAT16 = _opencv_computes_on_float16()


def _operand(values: np.ndarray) -> np.ndarray:
    """``values`` in a dtype the OpenCV calls below take: float32, or float16 as is where OpenCV computes on it (every
    float16 is exactly a float32, so either way the float32 results are the same); anything else is cast to float32."""
    if values.dtype == np.float32 or (values.dtype == np.float16 and _OPENCV_FLOAT16):
        return values
    return values.astype(np.float32)


def probabilities_to_u8(
    probs: np.ndarray, out: np.ndarray | None = None, scratch: np.ndarray | None = None
) -> np.ndarray:
    """``round(255·p)`` (half to even) saturated to 0-255 as uint8, for a 2-D float array (float16 and float32 are
    used as they are, other dtypes cast to float32; NaN gives 0). Two OpenCV passes (much cheaper than numpy's
    rint/clip/astype): the max with 0 first, as ``convertScaleAbs`` takes the magnitude (logits with
    ``activation=none`` are negative).

    Args:
        probs: (h, w) probabilities.
        out: a uint8 (h, w) array (or view) to write into; None allocates one.
        scratch: an array (or view) of ``probs``' shape and dtype for the clipped values; None allocates one.
    """
    return cv2.convertScaleAbs(cv2.max(_operand(probs), 0.0, dst=scratch), dst=out, alpha=255.0)


class BlendingAccumulator:
    """Weighted-sum accumulator over a (channels, height, width) output image, chunked on disk.

    Args:
        path: folder for spilled chunks (created; removed by :meth:`delete`); None keeps every chunk in memory (for
            images small enough to hold whole, e.g. patch mode's).
        channels: probability channels per pixel.
        size: (W, H) of the output image, output px.
        chunk: chunk side, output px.
        cache_bytes: memory budget for chunks held in memory (a write-back cache); exceeded only to keep the chunks the
            tiles still add to, see below.
        row_step: output px between the origins of successive tile rows (the tile grid's step), when tiles arrive in
            raster order; None when unknown (the cache then keeps up to the whole chunk rows a tile row spans).
        final_on_pass: when the cache evicts a chunk the raster order has passed, keep only its final uint8 block
            (:meth:`_final_u8`: 8 bytes a pixel fewer with one channel) instead of spilling its float32 planes; these
            blocks are held in memory up to ``cache_bytes`` and spilled past it. For tiles in raster order with no
            merge to come (one process, or whole slides per rank): a tile that reaches a chunk made final raises
            RuntimeError, :meth:`flush` (merging) refuses, and the store is read with :meth:`final_blocks`.

    The chunk cache. Tiles arrive in raster order (rows top to bottom, each left to right), so a chunk the order has
    passed is final: one above the top chunk row of the latest tile, or, given ``row_step``, one left of the latest
    tile in a chunk row the next tile row does not reach. Final chunks are evicted first (spilled once, read back by
    :meth:`band_chunks`); when a new chunk needs room and no cached chunk is final, the cache grows by one chunk
    instead of evicting one that tiles still add to. It therefore holds ``max(budget, open)`` chunks, where ``open`` is
    the most chunks the tiles kept open at once: for 512 px tiles at step 256 on 512 px chunks, one chunk row plus the
    latest tile's two chunks (``chunk_grid[1] + 2``; 2 MiB each with one channel), and at most the ``S`` chunk rows a
    tile row spans (``S · chunk_grid[1]``) without ``row_step``. So a raster order, or any subset of it (tissue tiles
    only, one DDP rank's share), never reads a spilled chunk back while adding. The cache grows up to
    :data:`CACHE_SHARE_OF_AVAILABLE` of the memory available when it first outgrows its budget; past that it evicts
    the least recently used chunk, warns once and :meth:`stats` counts the re-reads. Tiles in another order give the
    same result, at the cost of re-reads.

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
        row_step: int | None = None,
        final_on_pass: bool = False,
    ) -> None:
        self.path = None if path is None else Path(path)
        self.channels, self.size, self.chunk, self.row_step = channels, tuple(size), chunk, row_step
        self.final_on_pass = final_on_pass and self.path is not None
        # with final_on_pass the weights are not a plane of the chunk: each chunk records the tile pieces it got, and
        # their weights are summed (in the same order, so to the same float32 values) when it is made final
        self._tile_weights = self.final_on_pass and self._weighted
        self._records: dict[tuple[int, int], list[tuple[int, ...]]] = {}
        self._weight_list: list[np.ndarray] = []  # the weight arrays tiles came with (kept: their ids stay theirs)
        self._weight_index: dict[int, int] = {}  # id(array) -> its index in _weight_list
        self._weight_memo: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()  # interior chunks repeat
        width, height = self.size
        self.chunk_grid = (math.ceil(height / chunk), math.ceil(width / chunk))
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._chunk_bytes = self._planes * chunk * chunk * np.dtype(self._dtype).itemsize
        if self.path is None:
            self._cache_limit = math.prod(self.chunk_grid)  # every chunk stays in memory
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self._cache_limit = max(1, cache_bytes // self._chunk_bytes)
        self.touched: set[tuple[int, int]] = set()
        self._on_disk: set[tuple[int, int]] = set()
        self._passed: dict[tuple[int, int], None] = {}  # cached chunks the raster order has passed, evicted first
        self._top, self._row_y, self._left = 0, -1, 0  # the latest tile's top chunk row, y (output px), left chunk
        self._cap_chunks: int | None = None  # set when the cache first outgrows its budget
        self._scratches: dict[np.dtype, np.ndarray] = {}
        self._warned = False
        self._buffer: np.ndarray | None = None  # a spilled chunk read back only to be merged or finalised
        self._finals: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # final_on_pass: uint8 blocks held
        self._finals_bytes, self._finals_limit = 0, cache_bytes
        self._finals_on_disk: set[tuple[int, int]] = set()
        self.evictions = 0
        self.reloads = 0

    # -- what a chunk holds (TileMosaic overrides these) ---------------------------------------------------------
    @property
    def _planes(self) -> int:
        return self.channels + (0 if self._tile_weights else 1)  # channel sums, then the weight plane

    _dtype: type = np.float32
    _weighted = True  # whether tiles' weights count (see final_on_pass)
    _final_is_planes = False  # whether :meth:`_final` returns the planes themselves

    def _put(self, planes: np.ndarray, values: np.ndarray, weights: np.ndarray) -> None:
        """Blend a tile piece into a chunk piece (views): ``values`` (C, h, w) float32 or float16, ``weights`` (h, w)
        float32. ``sum += w·p`` rounds the product to float32, then the sum, exactly as numpy's
        ``planes[:C] += values.astype(float32) * weights`` does (no fused multiply-add)."""
        product = self._scratch(np.float32, weights.shape)
        for c in range(self.channels):
            cv2.multiply(values[c], weights, dst=product, dtype=cv2.CV_32F)
            cv2.add(planes[c], product, dst=planes[c])
        if not self._tile_weights:
            cv2.add(planes[self.channels], weights, dst=planes[self.channels])

    def _merge(self, planes: np.ndarray, other: np.ndarray) -> None:
        planes += other

    def _scratch(self, dtype: type | np.dtype, shape: tuple[int, int]) -> np.ndarray:
        """A reused (h, w) buffer for a tile piece's intermediate: fresh temporaries in the per-tile path cost page
        faults as the heap grows and shrinks around the chunks allocated beside them."""
        buffer = self._scratches.get(np.dtype(dtype))
        if buffer is None or buffer.shape[0] < shape[0] or buffer.shape[1] < shape[1]:
            held = (0, 0) if buffer is None else buffer.shape
            buffer = np.empty((max(held[0], shape[0]), max(held[1], shape[1])), dtype)
            self._scratches[np.dtype(dtype)] = buffer
        return buffer[: shape[0], : shape[1]]

    def _final(self, planes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """A chunk's read-back: (C, h, w) float32 weighted mean (0 where no weight) and (h, w) covered."""
        return self._mean(planes[: self.channels], planes[self.channels])

    @staticmethod
    def _mean(sums: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        covered = weights > 0
        with np.errstate(divide="ignore", invalid="ignore"):  # the uncovered pixels are zeroed next
            mean = np.divide(sums, weights[None])
        np.copyto(mean, 0.0, where=~covered[None])
        return mean, covered

    def _final_u8(self, key: tuple[int, int], planes: np.ndarray) -> np.ndarray:
        """Chunk ``key``'s final (rows, w) uint8 block, what the mask holds: ``round(255·mean)`` saturated to 0-255
        with one channel (:func:`probabilities_to_u8`), the index of the largest mean with several (0 where no tile
        reached)."""
        sums = planes[: self.channels]
        weights = self._weights_of(key, planes.shape[1:]) if self._tile_weights else planes[self.channels]
        if self.channels == 1:  # 0/0 (no tile reached) is NaN, which probabilities_to_u8 makes 0
            mean = self._scratch(np.float32, weights.shape)
            with np.errstate(divide="ignore", invalid="ignore"):
                np.divide(sums[0], weights, out=mean)
            return probabilities_to_u8(mean, scratch=mean)
        mean, covered = self._mean(sums, weights)
        return np.where(covered, mean.argmax(axis=0), 0).astype(np.uint8)

    def _weights_of(self, key: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
        """``final_on_pass``: chunk ``key``'s (rows, w) weight sums, from the tile pieces it recorded, added in their
        order (what the weight plane would hold); chunks that got the same pieces (a grid's interior) share one."""
        records = tuple(self._records.pop(key, ()))
        signature = (tuple(shape), records)
        weights = self._weight_memo.get(signature)
        if weights is not None:
            self._weight_memo.move_to_end(signature)
            return weights
        weights = np.zeros(shape, np.float32)
        for index, dy0, dy1, dx0, dx1, wy0, wx0 in records:
            piece = np.asarray(self._weight_list[index][wy0 : wy0 + dy1 - dy0, wx0 : wx0 + dx1 - dx0], np.float32)
            cv2.add(weights[dy0:dy1, dx0:dx1], piece, dst=weights[dy0:dy1, dx0:dx1])
        self._weight_memo[signature] = weights
        if len(self._weight_memo) > 16:
            self._weight_memo.popitem(last=False)
        return weights

    def _weights_index(self, weights: np.ndarray) -> int:
        """An index for the array ``weights`` (by identity; the array is kept, so tiles should share one)."""
        index = self._weight_index.get(id(weights))
        if index is None:
            index = self._weight_index[id(weights)] = len(self._weight_list)
            self._weight_list.append(weights)
        return index

    # -- chunk cache ---------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Chunk cache figures so far: ``evictions`` (chunks spilled to make room; :meth:`flush` not counted),
        ``reloads`` (spilled chunks read back to add a tile to: 0 for tiles in raster order within the memory cap;
        the reads of :meth:`band_chunks` and :meth:`merge_from` not counted) and ``cache_chunks`` (the most chunks the
        cache may hold now: the budget, or what the tiles kept open; see the class docstring)."""
        return {"evictions": self.evictions, "reloads": self.reloads, "cache_chunks": self._cache_limit}

    def _chunk_bounds(self, cy: int, cx: int) -> tuple[int, int, int, int]:
        y0, x0 = cy * self.chunk, cx * self.chunk
        return y0, min(y0 + self.chunk, self.size[1]), x0, min(x0 + self.chunk, self.size[0])

    def _get_chunk(self, cy: int, cx: int, adding: bool = False) -> np.ndarray:
        key = (cy, cx)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self._passed.pop(key, None)  # added to again: the tiles were not in raster order
            return hit
        if key in self._finals or key in self._finals_on_disk:
            raise RuntimeError(
                f"store {self.path}: a tile reached chunk {key} after the raster order had passed it and it was made "
                "final (final_on_pass needs tiles in raster order)"
            )
        spare = None
        if len(self._cache) >= self._cache_limit:
            passed = bool(self._passed)
            if passed:
                evicted: tuple[int, int] | None = next(iter(self._passed))
                del self._passed[evicted]
            else:
                # merges are not in raster order: they stay within the budget
                evicted = None if adding and self._grow() else next(iter(self._cache))  # least recently used
            if evicted is not None:
                spare = self._cache.pop(evicted)
                if passed and self.final_on_pass:
                    self._keep_final(evicted, self._final_u8(evicted, spare))
                    if self._final_is_planes:  # the block held is a view of the chunk's memory
                        spare = None
                else:
                    self._spill(evicted, spare)
                self.evictions += 1
        y0, y1, x0, x1 = self._chunk_bounds(cy, cx)
        shape = (self._planes, y1 - y0, x1 - x0)
        if key in self._on_disk:
            entry = self._load(self.path, cy, cx, out=spare)
            self.reloads += adding
        elif spare is not None and spare.shape == shape:
            # an evicted chunk's memory, already faulted in: zeroing it costs less than fresh pages
            entry = spare
            entry.fill(0)
        else:
            entry = np.zeros(shape, self._dtype)
        self._cache[key] = entry
        self.touched.add(key)
        return entry

    def _pass(self, x0: int, y0: int, top: int) -> None:
        """Before a tile at output px (x0, y0) whose top chunk row is ``top`` is added: mark the cached chunks the
        raster order has now passed as final (see the class docstring)."""
        if self.path is None:
            return
        if top > self._top:
            self._passed.update((key, None) for key in self._cache if key[0] < top)
            self._top = top
        if y0 != self._row_y:
            self._row_y, self._left = y0, 0
        left = x0 // self.chunk
        if self.row_step and left > self._left:
            for cy in range(top, (y0 + self.row_step) // self.chunk):  # rows the next tile row does not reach
                self._passed.update(((cy, cx), None) for cx in range(self._left, left) if (cy, cx) in self._cache)
            self._left = left

    def _grow(self) -> bool:
        """Make room for one more chunk, up to :data:`CACHE_SHARE_OF_AVAILABLE` of the memory available when the
        cache first outgrew its budget; past that warn once and return False."""
        if self._cap_chunks is None:
            available = psutil.virtual_memory().available
            self._cap_chunks = max(self._cache_limit, int(CACHE_SHARE_OF_AVAILABLE * available) // self._chunk_bytes)
        if self._cache_limit < self._cap_chunks:
            self._cache_limit += 1
            return True
        if self._cap_chunks < math.prod(self.chunk_grid) and not self._warned:
            self._warned = True
            log.warning(
                "store %s: the chunks its tiles keep open exceed %.0f MiB (%d%% of the memory available); evicting "
                "chunks still to be added to, which are re-read from disk (a smaller writer.chunk, a larger output "
                "downsample or more free memory avoids it)",
                self.path,
                self._cap_chunks * self._chunk_bytes / 2**20,
                round(100 * CACHE_SHARE_OF_AVAILABLE),
            )
        return False

    @staticmethod
    def _chunk_file(folder: Path, cy: int, cx: int) -> Path:
        return folder / f"{cy}_{cx}.npy"

    def _load(self, folder: Path, cy: int, cx: int, out: np.ndarray | None = None) -> np.ndarray:
        """A spilled chunk's planes, read into ``out`` when that is a C-contiguous array of their shape and dtype
        (memory already faulted in: a fresh 2 MiB array costs more in page faults than the read), else a new array."""
        with open(self._chunk_file(folder, cy, cx), "rb") as file:
            if out is not None and out.flags.c_contiguous and np.lib.format.read_magic(file) == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
                if shape == out.shape and dtype == out.dtype and not fortran:
                    if file.readinto(memoryview(out).cast("B")) != out.nbytes:
                        raise OSError(f"{file.name}: spilled chunk shorter than its header says")
                    return out
            file.seek(0)
            return np.load(file)

    def _spill(self, key: tuple[int, int], planes: np.ndarray) -> None:
        np.save(self._chunk_file(self.path, *key), planes, allow_pickle=False)
        self._on_disk.add(key)

    def _keep_final(self, key: tuple[int, int], block: np.ndarray) -> None:
        """Hold a passed chunk's final uint8 block (``final_on_pass``) in memory, spilling the oldest held blocks to
        disk past ``cache_bytes`` of them."""
        self._finals[key] = block
        self._finals_bytes += block.nbytes
        while self._finals_bytes > self._finals_limit:
            old, held = self._finals.popitem(last=False)
            self._finals_bytes -= held.nbytes
            np.save(self._final_file(old), held, allow_pickle=False)
            self._finals_on_disk.add(old)

    def _final_file(self, key: tuple[int, int]) -> Path:
        assert self.path is not None
        return self.path / f"{key[0]}_{key[1]}.final.npy"

    def flush(self) -> None:
        """Write every cached chunk to disk and record which chunks exist (for merging; not with ``final_on_pass``,
        whose passed chunks hold only their final values)."""
        if self._finals or self._finals_on_disk:
            raise RuntimeError(f"store {self.path}: final_on_pass made chunks final; it cannot be merged")
        while self._cache:
            self._spill(*self._cache.popitem(last=False))
        self._passed.clear()
        (self.path / "touched.json").write_text(json.dumps(sorted(self.touched)))

    # -- accumulation --------------------------------------------------------------------------------------------
    def add(self, x0: int, y0: int, values: np.ndarray, weights: np.ndarray) -> None:
        """Blend one tile: ``values`` (C, h, w) at output-px origin (x0, y0) with per-pixel ``weights`` (h, w).

        ``values`` may be float16 or float32 (other dtypes are cast to float32), ``weights`` are float32 (others are
        cast). The parts of the tile outside the image (edge tiles) are cropped. Tiles are expected in raster order
        (see the class docstring); any order gives the same result.
        """
        _, h, w = values.shape
        width, height = self.size
        y_end, x_end = min(y0 + h, height), min(x0 + w, width)
        if y_end <= y0 or x_end <= x0:
            return
        chunk = self.chunk
        top, bottom = y0 // chunk, (y_end - 1) // chunk
        self._pass(x0, y0, top)
        index = self._weights_index(weights) if self._tile_weights else -1
        values = _operand(values[:, : y_end - y0, : x_end - x0])
        weights = np.asarray(weights[: y_end - y0, : x_end - x0], np.float32)
        for cy in range(top, bottom + 1):
            cy0 = cy * chunk
            sy0, sy1 = max(y0, cy0), min(y_end, cy0 + chunk)
            for cx in range(x0 // chunk, (x_end - 1) // chunk + 1):
                cx0 = cx * chunk
                sx0, sx1 = max(x0, cx0), min(x_end, cx0 + chunk)
                self._put(
                    self._get_chunk(cy, cx, adding=True)[:, sy0 - cy0 : sy1 - cy0, sx0 - cx0 : sx1 - cx0],
                    values[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0],
                    weights[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0],
                )
                if self._tile_weights:
                    piece = (index, sy0 - cy0, sy1 - cy0, sx0 - cx0, sx1 - cx0, sy0 - y0, sx0 - x0)
                    self._records.setdefault((cy, cx), []).append(piece)

    def merge_from(self, other_path: str | Path) -> None:
        """Add a flushed store (same geometry, e.g. another DDP rank's) into this one, chunk by chunk."""
        other_path = Path(other_path)
        touched = [tuple(t) for t in json.loads((other_path / "touched.json").read_text())]
        for cy, cx in touched:
            planes = self._get_chunk(cy, cx)
            self._buffer = self._load(other_path, cy, cx, out=self._buffer)
            self._merge(planes, self._buffer)

    # -- read back -----------------------------------------------------------------------------------------------
    def band_chunks(self) -> Iterator[tuple[int, int, list[tuple[int, np.ndarray, np.ndarray | None]]]]:
        """Yield one entry per row of chunks: ``(y0, rows, chunks)`` where ``chunks`` lists ``(x0, value, covered)`` for
        the chunks some tile touched — for a ``BlendingAccumulator`` ``value`` is the (C, rows, w) float32 weighted
        mean (0 where no weight) and ``covered`` (rows, w) bool; for a ``TileMosaic`` ``value`` is (1, rows, w) uint8
        and ``covered`` None. Untouched chunks are left out (they are background).

        Chunks still in the memory cache are used (and released) directly; only evicted ones are read from disk.
        Consumes the store: it cannot be added to afterwards. Not with ``final_on_pass`` (use :meth:`final_blocks`).
        """
        if self.final_on_pass:
            raise RuntimeError(f"store {self.path}: final_on_pass keeps final values only; read it with final_blocks")
        yield from self._band_chunks(final=False)

    def _band_chunks(self, final: bool) -> Iterator[tuple[int, int, list[Any]]]:
        height = self.size[1]
        for cy in range(self.chunk_grid[0]):
            y0, y1 = cy * self.chunk, min((cy + 1) * self.chunk, height)
            chunks: list[Any] = []
            for cx in range(self.chunk_grid[1]):
                key = (cy, cx)
                if key not in self.touched:
                    continue
                _, _, x0, _ = self._chunk_bounds(cy, cx)
                block = self._finals.pop(key, None)
                if block is not None:
                    self._finals_bytes -= block.nbytes
                elif key in self._finals_on_disk:
                    block = np.load(self._final_file(key))
                if block is not None:
                    chunks.append((x0, block))
                    continue
                planes = self._cache.pop(key, None)
                self._passed.pop(key, None)
                if planes is None and self._final_is_planes:  # the value yielded is the array loaded
                    planes = self._load(self.path, cy, cx)
                elif planes is None:
                    planes = self._buffer = self._load(self.path, cy, cx, out=self._buffer)
                chunks.append((x0, self._final_u8(key, planes)) if final else (x0, *self._final(planes)))
            yield y0, y1 - y0, chunks

    def final_blocks(self) -> Iterator[tuple[int, int, list[tuple[int, np.ndarray]]]]:
        """Yield one entry per row of chunks: ``(y0, rows, blocks)`` where ``blocks`` lists ``(x0, block)`` for the
        chunks some tile touched, ``block`` the (rows, w) uint8 values of the mask (see :meth:`_final_u8`; a
        ``TileMosaic``'s values as stored). Consumes the store, as :meth:`band_chunks` does."""
        yield from self._band_chunks(final=True)

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
        self._passed.clear()
        self._finals.clear()
        self._records.clear()
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
