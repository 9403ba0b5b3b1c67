"""Where the JPEG tiles of one slide level lie in its TIFF file, or why the level cannot be read as JPEG tiles.

:func:`inspect_jpeg_level` finds the TIFF page (tifffile) holding an OpenSlide level and returns its
:class:`JpegTileLayout` — tile size, per-tile file offsets and byte counts, JPEGTables, photometric — or raises
:class:`UnsupportedLevelError` saying why the level cannot be read that way (the caller then uses OpenSlide).

Frames: level, tile and region sizes and positions are in **read-level px** (pixels of the TIFF page = the OpenSlide
level read); tiles are numbered in raster order (row-major) over the level's tile grid; file offsets and byte counts
are in bytes. The TIFF page is read directly, so a level with a non-integer downsample is read on its own pixel grid
(OpenSlide resamples such reads at a sub-pixel offset, see README "Coordinate frames").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

from wsiseg.data.readers.jpeg.markers import COLOUR_RGB, COLOUR_YCBCR, _sof, tile_stream

__all__ = ["JpegTileLayout", "SUPPORTED_VENDORS", "UnsupportedLevelError", "inspect_jpeg_level"]

# OpenSlide vendors whose levels are plain TIFF tile grids (no overlaps, offsets or sparse-tile conventions).
SUPPORTED_VENDORS = ("aperio", "generic-tiff")

_SOF_SUPPORTED = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive (Huffman, 8-bit)
_PHOTOMETRIC = {2: "rgb", 6: "ycbcr"}
_COMPRESSION_NAMES = {1: "none", 5: "LZW", 6: "old-style JPEG", 8: "deflate", 32946: "deflate", 33003: "JPEG 2000"}
_COMPRESSION_NAMES |= {33005: "JPEG 2000", 34712: "JPEG 2000", 50000: "zstd", 50001: "webp", 34887: "LERC"}


class UnsupportedLevelError(ValueError):
    """The level is not a plain JPEG tile grid that :mod:`wsiseg.data.readers.jpeg` can read; the message says why."""


@dataclass(frozen=True)
class JpegTileLayout:
    """Where the JPEG tiles of one slide level lie in the file.

    Attributes:
        path: the slide file.
        page: index of the TIFF page (IFD) holding the level.
        level_size: (W, H) of the level, read-level px.
        tile_size: (tile width, tile height), read-level px.
        offsets: (rows·cols,) int64 file offsets of the tiles, raster order (row-major).
        bytecounts: (rows·cols,) int64 compressed sizes; 0 marks a missing tile (read as white, like OpenSlide).
        tables: the JPEGTables tag (an abbreviated stream holding DQT/DHT segments), or None.
        photometric: ``rgb`` (components stored as R, G, B: no colour conversion) or ``ycbcr``.
    """

    path: str
    page: int
    level_size: tuple[int, int]
    tile_size: tuple[int, int]
    offsets: np.ndarray = field(repr=False)
    bytecounts: np.ndarray = field(repr=False)
    tables: bytes | None = field(repr=False)
    photometric: str

    @property
    def grid(self) -> tuple[int, int]:
        """(columns, rows) of tiles covering the level (edge tiles run past it)."""
        return (math.ceil(self.level_size[0] / self.tile_size[0]), math.ceil(self.level_size[1] / self.tile_size[1]))

    @property
    def colour(self) -> int:
        """:data:`COLOUR_RGB` or :data:`COLOUR_YCBCR`: the conversion the TIFF photometric asks for."""
        return COLOUR_RGB if self.photometric == "rgb" else COLOUR_YCBCR

    def tile_window(self, x: int, y: int, w: int, h: int) -> tuple[int, int, int, int]:
        """Tiles (c0, r0, c1, r1), half-open, that a ``w × h`` region at read-level px (x, y) overlaps inside the
        level; c1 <= c0 or r1 <= r0 when the region lies wholly outside the level."""
        tw, th = self.tile_size
        width, height = self.level_size
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, width), min(y + h, height)
        if x1 <= x0 or y1 <= y0:
            return (0, 0, 0, 0)
        return (x0 // tw, y0 // th, (x1 - 1) // tw + 1, (y1 - 1) // th + 1)

    def tiles_for_region(self, x: int, y: int, w: int, h: int) -> list[tuple[int, int, int]]:
        """(tile index, column, row) of every tile a ``w × h`` region at read-level px (x, y) overlaps inside the
        level, raster order; empty when the region lies wholly outside the level."""
        c0, r0, c1, r1 = self.tile_window(x, y, w, h)
        cols = self.grid[0]
        return [(row * cols + col, col, row) for row in range(r0, r1) for col in range(c0, c1)]


def _compression_name(code: int) -> str:
    return _COMPRESSION_NAMES.get(code, f"code {code}")


def inspect_jpeg_level(path: str | Path, level_size: tuple[int, int], vendor: str | None = None) -> JpegTileLayout:
    """Find the tiled TIFF page of ``level_size`` (W, H) read-level px in ``path`` and describe its JPEG tiles.

    Args:
        path: slide file.
        level_size: the OpenSlide level's size, used to pick the page.
        vendor: OpenSlide's ``openslide.vendor``; only :data:`SUPPORTED_VENDORS` (plain tile grids) are accepted,
            None skips that check.

    Raises:
        UnsupportedLevelError: not a TIFF, another vendor format, no tiled page of that size, not 8-bit 3-sample JPEG
            (RGB or YCbCr), tile data outside the file, or a first tile whose stream cannot be parsed.
    """
    path = Path(path)
    if vendor is not None and vendor not in SUPPORTED_VENDORS:
        raise UnsupportedLevelError(f"OpenSlide vendor '{vendor}' is not a plain TIFF tile grid")
    try:
        tiff = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises several types for non-TIFF files
        raise UnsupportedLevelError(f"not a TIFF file tifffile can parse ({type(exc).__name__})") from None
    with tiff:
        page = None
        for candidate in tiff.pages:
            if (candidate.imagewidth, candidate.imagelength) == tuple(level_size) and candidate.is_tiled:
                page = candidate
                break
        if page is None:
            raise UnsupportedLevelError(f"no tiled TIFF page of {level_size[0]}x{level_size[1]} px")
        if page.compression != 7:
            raise UnsupportedLevelError(
                f"tiles are compressed with {_compression_name(int(page.compression))}, not JPEG"
            )
        if page.samplesperpixel != 3 or page.planarconfig != 1 or page.bitspersample != 8 or page.imagedepth != 1:
            raise UnsupportedLevelError(
                f"JPEG tiles with {page.samplesperpixel} samples, planar config {int(page.planarconfig)}, "
                f"{page.bitspersample} bits (8-bit interleaved RGB/YCbCr expected)"
            )
        photometric = _PHOTOMETRIC.get(int(page.photometric))
        if photometric is None:
            raise UnsupportedLevelError(f"JPEG tiles with photometric {int(page.photometric)} (RGB or YCbCr expected)")
        tile_size = (int(page.tilewidth), int(page.tilelength))
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        bytecounts = np.asarray(page.databytecounts, dtype=np.int64)
        cols, rows = math.ceil(level_size[0] / tile_size[0]), math.ceil(level_size[1] / tile_size[1])
        if len(offsets) != cols * rows or len(bytecounts) != len(offsets):
            raise UnsupportedLevelError(f"{len(offsets)} tile offsets for a {cols}x{rows} tile grid")
        file_size = os.path.getsize(path)
        if ((offsets + bytecounts > file_size) & (bytecounts > 0)).any():
            raise UnsupportedLevelError("tile data runs past the end of the file")
        tables = bytes(page.jpegtables) if page.jpegtables else None
        layout = JpegTileLayout(
            str(path), page.index, tuple(level_size), tile_size, offsets, bytecounts, tables, photometric
        )  # type: ignore[arg-type]
        nonempty = np.flatnonzero(bytecounts)
        if len(nonempty):
            first = int(nonempty[0])
            with open(path, "rb") as fh:
                fh.seek(int(offsets[first]))
                raw = fh.read(int(bytecounts[first]))
            try:
                sof, precision, height, width, components = _sof(tile_stream(raw, tables, layout.colour))
            except ValueError as exc:
                raise UnsupportedLevelError(f"first JPEG tile cannot be parsed: {exc}") from None
            if sof not in _SOF_SUPPORTED or precision != 8 or components != 3:
                raise UnsupportedLevelError(
                    f"JPEG process 0x{sof:02x}, {precision}-bit, {components} components (8-bit Huffman, 3 expected)"
                )
            if (width, height) != tile_size:
                raise UnsupportedLevelError(
                    f"JPEG tiles of {width}x{height} px in a {tile_size[0]}x{tile_size[1]} grid"
                )
    return layout
