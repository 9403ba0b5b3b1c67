"""The workers' side of ``data.reader=jpeg`` (alias ``gpu_jpeg``): DataLoader workers read only the compressed JPEG
tiles each patch needs and collate them as :class:`CompressedTiles`; the data module decodes them in batches on the
model's device (:func:`wsiseg.data.readers.jpeg.decode.decode_batch`, called from its ``transfer_batch_to_device``).

Slides are planned exactly as for the OpenSlide reader (same tiles, same order, same dataset indices); only reading
differs. The reader is chosen per slide: a slide that is not JPEG-tiled at its read level (other compressions, JPEG
2000, vendor formats, or resampled to ``data.mpp``) is read with OpenSlide, after one line naming the slides and why,
while the others keep their JPEG tiles; a batch that mixes both is assembled by
:func:`~wsiseg.data.readers.jpeg.decode.decode_batch`.

Frames: patch origins and tile geometry in read-level px (the TIFF page = the OpenSlide level read); tile windows in
tiles (column, row) of the level's grid; dataset indices as in :class:`~wsiseg.data.datasets.SlideTileDataset`.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from wsiseg.data.datasets import SlideTileDataset, SlideTiles
from wsiseg.data.readers.jpeg.layout import JpegTileLayout, UnsupportedLevelError, inspect_jpeg_level
from wsiseg.data.readers.jpeg.markers import tile_stream

__all__ = [
    "CompressedTiles",
    "JpegTileDataset",
    "collate_jpeg_tiles",
    "jpeg_dataloader",
    "jpeg_layouts",
    "plan_layouts",
]

log = logging.getLogger(__name__)


class JpegTileDataset(Dataset):
    """The tissue tiles of several JPEG-tiled slides, as compressed tiles (same indices as ``SlideTileDataset``).

    Each item is a dict: ``slide_index``, ``tile_index``, ``x``/``y`` (patch origin, read-level px), ``error`` (empty,
    or why the tile bytes could not be read), ``path``, ``level``, ``colour`` (the layout's JPEG colour kind),
    ``patch_size``, ``geometry`` (x, y, c0, r0, tile width, tile height,
    level width, level height — read-level px, c0/r0 in tiles: the first column/row of the tile window the patch
    overlaps), ``window`` (rows, cols of that window) and ``tiles``: one ``(key, stream)`` per tile of the window in
    raster order, ``stream`` a standalone JPEG (tables merged, colour marker set) or None for a missing tile.

    Items of slides without a layout come from ``openslide`` instead: its items (``image`` read by OpenSlide) for the
    same indices.

    Args:
        slides: the planned slides (``SlideTileDataModule.dataset.slides``).
        layouts: each slide's JPEG tile layout at its read level, or None for a slide OpenSlide reads.
        openslide: the OpenSlide dataset over the same slides (required when a layout is None).
        cache_tiles: tile streams kept per worker; neighbouring patches (overlap, straddling) share tiles.
    """

    def __init__(
        self,
        slides: list[SlideTiles],
        layouts: Sequence[JpegTileLayout | None],
        openslide: SlideTileDataset | None = None,
        cache_tiles: int = 512,
    ) -> None:
        if len(slides) != len(layouts):
            raise ValueError(f"{len(slides)} slides but {len(layouts)} tile layouts")
        if openslide is None and any(layout is None for layout in layouts):
            raise ValueError("slides without a JPEG tile layout need the OpenSlide dataset to read them")
        self.slides, self.layouts, self.cache_tiles = slides, list(layouts), cache_tiles
        self.openslide = openslide
        counts = [s.tiles_tissue for s in slides]
        self._slide_of = np.repeat(np.arange(len(slides), dtype=np.int64), counts)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._files: dict[int, int] = {}
        self._cache: OrderedDict[tuple[int, int], bytes | None] = OrderedDict()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        # File descriptors and cached tiles are per process: workers open their own on first use.
        state = self.__dict__.copy()
        state["_files"], state["_cache"] = {}, OrderedDict()
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the file descriptors this process opened."""
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)
        self._files = {}

    def locate(self, index: int) -> tuple[int, int]:
        """(slide_index, tile_index) of flat dataset ``index``."""
        slide_index = int(self._slide_of[index])
        return slide_index, int(index - self._offsets[slide_index])

    def _stream(self, slide_index: int, tile: int) -> bytes | None:
        key = (slide_index, tile)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        layout = self.layouts[slide_index]
        count = int(layout.bytecounts[tile])
        stream = None
        if count:
            fd = self._files.get(slide_index)
            if fd is None:
                fd = self._files[slide_index] = os.open(layout.path, os.O_RDONLY)
            raw = os.pread(fd, count, int(layout.offsets[tile]))
            if len(raw) != count:
                raise OSError(f"tile {tile} truncated: {len(raw)} of {count} bytes")
            stream = tile_stream(raw, layout.tables, layout.colour)
        self._cache[key] = stream
        if len(self._cache) > self.cache_tiles:
            self._cache.popitem(last=False)
        return stream

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A batch's items; those of OpenSlide-read slides come from its threaded batch read."""
        by_openslide = [i for i in indices if self.layouts[int(self._slide_of[i])] is None]
        if not by_openslide:
            return [self[i] for i in indices]
        assert self.openslide is not None
        read = dict(zip(by_openslide, self.openslide.__getitems__(by_openslide)))
        return [read[i] if i in read else self[i] for i in indices]

    def __getitem__(self, index: int) -> dict[str, Any]:
        slide_index, tile_index = self.locate(index)
        slide, layout = self.slides[slide_index], self.layouts[slide_index]
        if layout is None:
            assert self.openslide is not None
            return self.openslide[index]
        x, y = (int(v) for v in slide.origins[tile_index])
        size = slide.grid.patch_size
        c0, r0, c1, r1 = layout.tile_window(x, y, size, size)
        cols = layout.grid[0]
        tiles: list[tuple[int, bytes | None]] = []
        error = ""
        try:
            for row in range(r0, r1):
                for col in range(c0, c1):
                    tile = row * cols + col
                    tiles.append((tile, self._stream(slide_index, tile)))
        except (OSError, ValueError) as exc:
            error = f"slide '{slide.path}' tile at read-level ({x}, {y}) level {slide.level.level} unreadable: {exc}"
            tiles, c1, r1 = [], c0, r0
        return {
            "slide_index": slide_index,
            "tile_index": tile_index,
            "x": x,
            "y": y,
            "error": error,
            "path": str(slide.path),
            "level": slide.level.level,
            "colour": layout.colour,
            "patch_size": size,
            "geometry": (x, y, c0, r0, *layout.tile_size, *layout.level_size),
            "window": (r1 - r0, c1 - c0),
            "tiles": tiles,
        }


class CompressedTiles:
    """One batch of patches as compressed tiles (what the workers send; the device decodes).

    A plain class on purpose: Lightning moves tensors (also inside dataclasses) to the device, and ``decode_jpeg``
    wants its input bytes on the CPU, so everything here stays in numpy arrays until
    :func:`~wsiseg.data.readers.jpeg.decode.decode_batch`.

    Attributes:
        data: uint8 concatenation of the batch's unique tile streams (each a standalone JPEG).
        offsets: (U + 1,) int64 start of each stream in ``data`` (stream u is ``data[offsets[u]:offsets[u + 1]]``).
        colours: (U,) uint8 colour kind of each stream (:data:`~wsiseg.data.readers.jpeg.markers.COLOUR_RGB` or
            :data:`~wsiseg.data.readers.jpeg.markers.COLOUR_YCBCR`).
        labels: (U,) where each stream comes from, for error messages.
        patch_size: patch side P, read-level px.
        geometry: (N, 8) int64 per patch: origin x, y; first tile column c0, row r0 of its window; tile width,
            tile height; level width, height — all read-level px (c0, r0 in tiles).
        lookup: (N, rows, cols) int64: stream index of each tile of the patch's window, -1 for none (white).
        owners: (U,) per stream, the patches (indices into N) that use it, for error reporting.
    """

    def __init__(
        self,
        data: np.ndarray,
        offsets: np.ndarray,
        colours: np.ndarray,
        labels: list[str],
        patch_size: int,
        geometry: np.ndarray,
        lookup: np.ndarray,
        owners: list[list[int]],
    ) -> None:
        self.data, self.offsets, self.colours, self.labels = data, offsets, colours, labels
        self.patch_size, self.geometry, self.lookup, self.owners = patch_size, geometry, lookup, owners

    def __len__(self) -> int:
        return int(self.geometry.shape[0])

    @property
    def streams(self) -> list[torch.Tensor]:
        """The unique tile streams as 1-D uint8 CPU tensors (views into ``data``)."""
        data = torch.from_numpy(self.data)
        return [data[int(a) : int(b)] for a, b in zip(self.offsets[:-1], self.offsets[1:])]


def collate_jpeg_tiles(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch items of :class:`JpegTileDataset`: tiles shared by several patches are kept (and decoded) once.

    Returns a dict with ``jpeg_tiles`` (:class:`CompressedTiles`), ``slide_index``,
    ``tile_index``, ``x``, ``y`` (int64 tensors) and ``error`` (list of str) — the keys the writer reads. Items read
    by OpenSlide (``image``) in a mixed batch add ``image`` (their pixels), ``image_rows`` and ``jpeg_rows`` (the batch
    rows of each kind, for :func:`~wsiseg.data.readers.jpeg.decode.decode_batch`); a batch of OpenSlide items alone
    is collated as the OpenSlide reader's.
    """
    image_rows = [n for n, item in enumerate(items) if "image" in item]
    if image_rows and len(image_rows) == len(items):
        return default_collate(list(items))
    everything = items
    items = [item for item in everything if "image" not in item]
    unique: dict[tuple[int, int], int] = {}
    streams: list[bytes] = []
    colours: list[int] = []
    labels: list[str] = []
    owners: list[list[int]] = []
    rows = max([1, *(item["window"][0] for item in items)])
    cols = max([1, *(item["window"][1] for item in items)])
    lookup = np.full((len(items), rows, cols), -1, dtype=np.int64)
    for n, item in enumerate(items):
        window_cols = item["window"][1]
        for k, (tile, stream) in enumerate(item["tiles"]):
            if stream is None:
                continue
            key = (item["slide_index"], tile)
            u = unique.get(key)
            if u is None:
                u = unique[key] = len(streams)
                streams.append(stream)
                colours.append(item["colour"])
                labels.append(f"slide '{item['path']}' level {item['level']} TIFF tile {tile}")
                owners.append([])
            owners[u].append(n)
            lookup[n, k // window_cols, k % window_cols] = u
    offsets = np.zeros(len(streams) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in streams])
    data = np.frombuffer(b"".join(streams), dtype=np.uint8).copy() if streams else np.zeros(0, np.uint8)
    tiles = CompressedTiles(
        data=data,
        offsets=offsets,
        colours=np.asarray(colours, dtype=np.uint8),
        labels=labels,
        patch_size=int(items[0]["patch_size"]) if items else 0,
        geometry=np.asarray([item["geometry"] for item in items], dtype=np.int64).reshape(len(items), 8),
        lookup=lookup,
        owners=owners,
    )
    batch: dict[str, Any] = {
        "jpeg_tiles": tiles,
        "slide_index": torch.tensor([item["slide_index"] for item in everything], dtype=torch.int64),
        "tile_index": torch.tensor([item["tile_index"] for item in everything], dtype=torch.int64),
        "x": torch.tensor([item["x"] for item in everything], dtype=torch.int64),
        "y": torch.tensor([item["y"] for item in everything], dtype=torch.int64),
        "error": [item["error"] for item in everything],
    }
    if image_rows:
        batch["image"] = torch.stack([everything[n]["image"] for n in image_rows])
        batch["image_rows"] = image_rows
        batch["jpeg_rows"] = [n for n, item in enumerate(everything) if "image" not in item]
    return batch


def plan_layouts(slides: Sequence[SlideTiles]) -> tuple[list[JpegTileLayout | None], list[str]]:
    """Each slide's JPEG tile layout at its read level, None for a slide that has none (a slide resampled to
    ``data.mpp`` has none either: its tiles are not the file's pixels).

    Returns:
        (layouts in slide order, one ``'<file name>: <reason>'`` per slide that cannot be read this way).
    """
    layouts: list[JpegTileLayout | None] = []
    problems: list[str] = []
    for slide in slides:
        if slide.level.resampled:
            # the network sees area-resampled pixels, which no file tile holds
            problems.append(f"{slide.path.name}: resampled to data.mpp from level {slide.level.level}")
            layouts.append(None)
            continue
        try:
            vendor = slide.properties.get("openslide.vendor")
            layouts.append(inspect_jpeg_level(slide.path, slide.level.size, vendor))
        except UnsupportedLevelError as exc:
            problems.append(f"{slide.path.name}: {exc}")
            layouts.append(None)
    return layouts, problems


def jpeg_layouts(slides: Sequence[SlideTiles], reader: str, quiet: bool = False) -> list[JpegTileLayout | None]:
    """:func:`plan_layouts` with the slides OpenSlide must read said in one warning (one info line when ``quiet``:
    the reader was chosen automatically)."""
    layouts, problems = plan_layouts(slides)
    if problems:
        (log.info if quiet else log.warning)(
            "data.reader=%s: %d of %d slide(s) not JPEG-tiled at the read level, OpenSlide reads %s (%s)",
            reader,
            len(problems),
            len(slides),
            "them" if len(problems) == len(slides) else "those",
            "; ".join(problems),
        )
    return layouts


def jpeg_dataloader(
    openslide: SlideTileDataset,
    layouts: Sequence[JpegTileLayout | None],
    batch_size: int,
    num_workers: int,
    prefetch_factor: int,
    indices: Sequence[int] | None = None,
    pin_memory: bool | None = None,
) -> DataLoader:
    """The ``data.reader=jpeg`` DataLoader over ``openslide``'s tiles at ``indices`` (None: all, in order): JPEG tiles
    for every slide with a layout, ``openslide``'s reads for the others. ``pin_memory`` (None: when a CUDA device is
    visible): the pin thread pins the pixels of batches that mix in slides OpenSlide reads, off the main process's
    path (the compressed tiles stay in numpy arrays; :func:`~wsiseg.data.readers.jpeg.decode.decode_batch` pins the
    little that crosses from them)."""
    return DataLoader(
        JpegTileDataset(openslide.slides, list(layouts), openslide=openslide),
        batch_size=batch_size,
        sampler=None if indices is None else list(indices),
        num_workers=num_workers,
        collate_fn=collate_jpeg_tiles,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory and torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
