"""JPEG-tiled slide levels read as compressed tiles and decoded in batches (nvJPEG on CUDA, libjpeg-turbo on CPU).

The ``data.reader=jpeg`` path (alias ``gpu_jpeg``; libjpeg-turbo on the CPU, nvJPEG on CUDA) has three parts:

1. :func:`inspect_jpeg_level` finds the TIFF page (tifffile) holding an OpenSlide level and returns its
   :class:`JpegTileLayout` — tile size, per-tile file offsets and byte counts, JPEGTables, photometric — or raises
   :class:`UnsupportedLevelError` saying why the level cannot be read that way (the caller then uses OpenSlide);
2. :func:`tile_stream` turns one stored tile into a standalone JPEG stream: the level's JPEGTables (abbreviated
   streams, as Aperio and libtiff write them) are inserted after the tile's SOI, and an Adobe APP14 marker makes the
   decoder apply (or not) the YCbCr→RGB conversion exactly as the TIFF photometric says — what OpenSlide (libtiff)
   does, whatever markers the stream carries;
3. :func:`decode_batch` decodes the unique tiles of a batch with ``torchvision.io.decode_jpeg`` on the model's device
   and assembles the ``(N, 3, P, P)`` uint8 patches there with one gather (tiles straddled, overlap, white past the
   level's edge), so ``predict_step`` gets device-resident images without a host round trip.

On CUDA nothing in 3. makes the host wait for the device: every host-to-device copy (the batch's index arrays, tiles
decoded on the host, pixels OpenSlide read) is a non-blocking copy out of pinned memory (:func:`host_to_device`), and
the decoded tiles are stacked with one call, so the host queues the batch and goes on to the next one.

Frames: tile and patch geometry is in **read-level px** (pixels of the TIFF page = the OpenSlide level read); the
TIFF page is read directly, so a level with a non-integer downsample is read on its own pixel grid (OpenSlide resamples
such reads at a sub-pixel offset, see README "Coordinate frames").
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tifffile
import torch
import torch.nn.functional as F

from wsiseg.errors import first_line
from wsiseg.hardware import usable_cores

__all__ = [
    "COLOUR_RGB",
    "COLOUR_YCBCR",
    "CompressedTiles",
    "DecodedStreams",
    "JpegTileLayout",
    "SUPPORTED_VENDORS",
    "UnsupportedLevelError",
    "arrays_to_device",
    "assemble_patches",
    "decode_batch",
    "decode_streams",
    "host_to_device",
    "inspect_jpeg_level",
    "jpeg_colour_space",
    "merge_tables",
    "stack_tiles",
    "tile_stream",
]

log = logging.getLogger(__name__)

# OpenSlide vendors whose levels are plain TIFF tile grids (no overlaps, offsets or sparse-tile conventions).
SUPPORTED_VENDORS = ("aperio", "generic-tiff")

COLOUR_YCBCR = 0  # the decoder converts YCbCr → RGB
COLOUR_RGB = 1  # the components are R, G, B already (no conversion)

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_APP0, _APP14 = 0xE0, 0xEE
_SOF_SUPPORTED = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive (Huffman, 8-bit)
_SOF_ALL = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: markers without a length field
_PHOTOMETRIC = {2: "rgb", 6: "ycbcr"}
_COMPRESSION_NAMES = {1: "none", 5: "LZW", 6: "old-style JPEG", 8: "deflate", 32946: "deflate", 33003: "JPEG 2000"}
_COMPRESSION_NAMES |= {33005: "JPEG 2000", 34712: "JPEG 2000", 50000: "zstd", 50001: "webp", 34887: "LERC"}
# Mean |Δ| (grey levels) above which a device decode is taken to disagree with libjpeg on the colour conversion
# (nvJPEG vs libjpeg-turbo differ by ~1 level from IDCT/upsampling; a wrong conversion differs by tens).
_COLOUR_CHECK_TOLERANCE = 4.0


class UnsupportedLevelError(ValueError):
    """The level is not a plain JPEG tile grid that :mod:`jpeg_tiles` can read; the message says why."""


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


def _segments(data: bytes, start: int = 2) -> Iterator[tuple[int, int, int]]:
    """(marker, start, end) of the marker segments of a JPEG stream from ``start`` (just past SOI) up to and including
    SOS or EOI; ``end`` is exclusive. Raises ValueError on a malformed header."""
    pos, size = start, len(data)
    while pos < size:
        if data[pos] != 0xFF:
            raise ValueError(f"JPEG marker expected at byte {pos}, found 0x{data[pos]:02x}")
        while pos + 1 < size and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos + 1 >= size:
            break
        marker = data[pos + 1]
        if marker in _STANDALONE or marker in (_SOI, _EOI):
            yield marker, pos, pos + 2
            if marker == _EOI:
                return
            pos += 2
            continue
        if pos + 4 > size:
            raise ValueError(f"JPEG segment 0x{marker:02x} at byte {pos} is truncated")
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end > size:
            raise ValueError(f"JPEG segment 0x{marker:02x} at byte {pos} runs past the end of the data")
        yield marker, pos, end
        if marker == _SOS:
            return
        pos = end
    raise ValueError("JPEG stream ends before its scan (no SOS or EOI marker)")


def _is_jfif(data: bytes, start: int, end: int) -> bool:
    return data[start + 4 : start + 9] == b"JFIF\x00"


def _adobe_transform(data: bytes, start: int, end: int) -> int | None:
    """The colour transform byte of an Adobe APP14 segment, or None for another APP14."""
    if data[start + 4 : start + 9] != b"Adobe" or end - start < 16:
        return None
    return data[start + 15]


def _adobe_segment(transform: int) -> bytes:
    """An Adobe APP14 segment: version 100, no flags, ``transform`` (0 = no conversion / RGB, 1 = YCbCr)."""
    return b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([transform])


def jpeg_colour_space(stream: bytes) -> int:
    """How libjpeg (libjpeg-turbo, as in OpenSlide and torchvision) interprets a 3-component stream by its own
    markers: JFIF → YCbCr; else Adobe APP14 transform 0 → RGB, other transforms → YCbCr; else component IDs
    'R','G','B' → RGB; else YCbCr. Returns :data:`COLOUR_RGB` or :data:`COLOUR_YCBCR`."""
    adobe: int | None = None
    ids: tuple[int, ...] = ()
    for marker, start, end in _segments(stream):
        if marker == _APP0 and _is_jfif(stream, start, end):
            return COLOUR_YCBCR
        if marker == _APP14 and adobe is None:
            adobe = _adobe_transform(stream, start, end)
        if marker in _SOF_ALL:
            count = stream[start + 9]
            ids = tuple(stream[start + 10 + 3 * k] for k in range(count))
    if adobe is not None:
        return COLOUR_RGB if adobe == 0 else COLOUR_YCBCR
    return COLOUR_RGB if ids == (82, 71, 66) else COLOUR_YCBCR


def merge_tables(tile: bytes, tables: bytes | None) -> bytes:
    """A full JPEG stream from an abbreviated tile stream and the level's JPEGTables: the tables' segments (DQT, DHT,
    …) go right after the tile's SOI; the tables' own SOI and EOI are dropped. Tables defined again in the tile come
    later and so win, as TIFF requires. Returns ``tile`` unchanged when ``tables`` is None or empty."""
    if not tile.startswith(b"\xff\xd8"):
        raise ValueError("JPEG tile does not start with SOI")
    if not tables:
        return tile
    if not tables.startswith(b"\xff\xd8"):
        raise ValueError("JPEGTables does not start with SOI")
    body = [tables[start:end] for marker, start, end in _segments(tables) if marker not in (_SOI, _EOI)]
    return b"\xff\xd8" + b"".join(body) + tile[2:]


def tile_stream(tile: bytes, tables: bytes | None, colour: int) -> bytes:
    """A standalone JPEG stream for one stored tile that decodes to RGB as OpenSlide decodes it.

    Merges ``tables`` (:func:`merge_tables`), then makes the stream's colour interpretation follow ``colour`` (from
    the TIFF photometric, which libtiff — and so OpenSlide — obeys whatever the stream's markers say): when libjpeg
    would read the stream otherwise (:func:`jpeg_colour_space`; e.g. Aperio's RGB tiles carry no marker and would be
    taken as YCbCr), its JFIF/Adobe markers are dropped and an Adobe APP14 with the right transform is put first.

    Raises:
        ValueError: the tile is not a JPEG stream, or its header is malformed.
    """
    stream = merge_tables(tile, tables)
    if jpeg_colour_space(stream) == colour:
        return stream
    kept = []
    for marker, start, end in _segments(stream):
        if marker == _SOS:
            kept.append(stream[start:])
            break
        if (marker == _APP0 and _is_jfif(stream, start, end)) or (
            marker == _APP14 and _adobe_transform(stream, start, end) is not None
        ):
            continue
        kept.append(stream[start:end])
    transform = 0 if colour == COLOUR_RGB else 1
    return b"\xff\xd8" + _adobe_segment(transform) + b"".join(kept)


def _sof(stream: bytes) -> tuple[int, int, int, int, int]:
    """(SOF marker, precision, height, width, components) of a full stream."""
    for marker, start, _end in _segments(stream):
        if marker in _SOF_ALL:
            s = stream[start + 4 :]
            return marker, s[0], int.from_bytes(s[1:3], "big"), int.from_bytes(s[3:5], "big"), s[5]
    raise ValueError("no SOF marker before the scan")


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


class CompressedTiles:
    """One batch of patches as compressed tiles (what the workers send; the device decodes).

    A plain class on purpose: Lightning moves tensors (also inside dataclasses) to the device, and ``decode_jpeg``
    wants its input bytes on the CPU, so everything here stays in numpy arrays until :func:`decode_batch`.

    Attributes:
        data: uint8 concatenation of the batch's unique tile streams (each a standalone JPEG).
        offsets: (U + 1,) int64 start of each stream in ``data`` (stream u is ``data[offsets[u]:offsets[u + 1]]``).
        colours: (U,) uint8 :data:`COLOUR_RGB` / :data:`COLOUR_YCBCR` of each stream.
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


def _decode(streams: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    if not streams:
        return []
    if device.type == "cuda":
        return decode_jpeg(streams, mode=ImageReadMode.RGB, device=device)
    # libjpeg-turbo decodes one stream per call and releases the GIL: split the batch over the cores; the main process
    # decodes between network calls, when the cores are otherwise idle
    parts = min(len(streams), usable_cores())
    if parts <= 1:
        return decode_jpeg(streams, mode=ImageReadMode.RGB)
    bounds = [len(streams) * k // parts for k in range(parts + 1)]
    pool = _cpu_decode_pool()
    futures = [pool.submit(decode_jpeg, streams[a:b], mode=ImageReadMode.RGB) for a, b in zip(bounds[1:], bounds[2:])]
    decoded = decode_jpeg(streams[: bounds[1]], mode=ImageReadMode.RGB)
    return [*decoded, *(image for future in futures for image in future.result())]


@functools.cache
def _cpu_decode_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(usable_cores() - 1 or 1, thread_name_prefix="wsiseg-jpeg")


def colour_mismatch(reference: torch.Tensor, candidate: torch.Tensor) -> float | None:
    """Mean |Δ| (grey levels) between two decodes of one tile when it exceeds the colour-check tolerance (a decoder
    applying another colour conversion), else None."""
    if reference.shape != candidate.shape:
        return float("inf")
    diff = (reference.float() - candidate.float().to(reference.device)).abs().mean().item()
    return diff if diff > _COLOUR_CHECK_TOLERANCE else None


def decoder_reason(exc: BaseException) -> str:
    """The decoder's own reason, without the source location torchvision appends (``Exception raised from
    decode_jpeg at /path/of/its/build/...``), which says nothing about the slide."""
    text = first_line(exc)
    text = re.sub(r"\s*Exception raised from .*$", "", text)
    return re.sub(r"\s*\(?(?:at|in) /\S+\)?", "", text).strip() or type(exc).__name__


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without making the host wait: to CUDA, a ``non_blocking`` copy out of pinned memory
    (pinned here unless the DataLoader's pin thread did it already); a tensor already on a device, or a CPU target,
    is a plain ``.to``.

    The pinned source need not outlive the call: ``pin_memory()`` allocates from PyTorch's caching host allocator,
    which records an event on the copy's stream for every non-blocking copy out of one of its blocks and does not hand
    that block out again before the event has completed, so freeing the tensor early cannot recycle memory the copy
    still reads (a reference kept on the batch would do the same, for longer).
    """
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device, non_blocking=True)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def arrays_to_device(arrays: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Integer ``arrays`` as int64 tensors of the same shapes on ``device``, through one host-to-device copy (one
    pinned buffer, split into views on the device): a batch's small index arrays cost one copy, not one each."""
    flat = [np.ascontiguousarray(array, dtype=np.int64).reshape(-1) for array in arrays]
    moved = host_to_device(torch.from_numpy(np.concatenate(flat) if flat else np.zeros(0, np.int64)), device)
    views, start = [], 0
    for array, part in zip(arrays, flat):
        views.append(moved[start : start + part.size].view(np.shape(array)))
        start += part.size
    return views


class DecodedStreams(NamedTuple):
    """The unique streams of a batch, decoded (:func:`decode_streams`); one entry per stream in each list.

    Attributes:
        images: (3, h, w) uint8 RGB; None where no decoder took the stream (its patches get white and an error).
        on_host: decoded on the CPU for a CUDA batch (libjpeg fallback): still to be copied to the device.
        errors: why the stream could not be decoded; empty when it was.
    """

    images: list[torch.Tensor | None]
    on_host: list[bool]
    errors: list[str]


def decode_streams(
    tiles: CompressedTiles, device: torch.device, colour_checked: dict[int, bool] | None = None
) -> DecodedStreams:
    """Decode the batch's unique streams to (3, h, w) uint8 RGB tensors, on ``device`` where its decoder can.

    CUDA: one batched nvJPEG call. The first time each colour kind (RGB-in-JPEG, YCbCr) is met (``colour_checked``,
    per colour kind: True once nvJPEG was found to agree with libjpeg, False when it did not; the reader keeps it for
    its run, None checks afresh), one tile is also decoded on the CPU and compared (the only point where decoding
    waits for the device, once per colour kind and run); if nvJPEG disagrees on the colour conversion the kind is
    decoded on the CPU from then on (one warning). A batch that fails to decode is retried stream by stream (on the
    CPU when the device refuses a stream): a stream no decoder takes is left None with an error message for the
    patches using it (the writer then fails that slide only). Tiles decoded on the CPU for a CUDA batch stay on the
    host (``on_host``): :func:`assemble_patches` moves them in one copy.
    """
    streams = tiles.streams
    errors = [""] * len(streams)
    colour_checked = {} if colour_checked is None else colour_checked
    cpu = torch.device("cpu")
    on_cpu = [device.type != "cuda" or colour_checked.get(int(c)) is False for c in tiles.colours]
    decoded: list[torch.Tensor | None] = [None] * len(streams)
    for host in (False, True):
        indices = [i for i in range(len(streams)) if on_cpu[i] == host]
        target = cpu if host else device
        try:
            for i, image in zip(indices, _decode([streams[i] for i in indices], target)):
                decoded[i] = image
        except RuntimeError:  # find the culprit(s); a stream nvJPEG refuses may still decode on the CPU
            for i in indices:
                for attempt in dict.fromkeys((target, cpu)):
                    try:
                        decoded[i] = _decode([streams[i]], attempt)[0]
                        errors[i], on_cpu[i] = "", attempt.type == "cpu"
                        break
                    except RuntimeError as exc:
                        errors[i] = f"{tiles.labels[i]}: JPEG tile cannot be decoded: {decoder_reason(exc)}"
    if device.type == "cuda":
        _check_device_colours(tiles, streams, decoded, on_cpu, colour_checked)
    on_host = [device.type == "cuda" and host for host in on_cpu]
    return DecodedStreams(decoded, on_host, errors)


def _check_device_colours(
    tiles: CompressedTiles,
    streams: list[torch.Tensor],
    decoded: list[torch.Tensor | None],
    on_cpu: list[bool],
    colour_checked: dict[int, bool],
) -> None:
    """Compare the device decode of the largest stream of each not-yet-checked colour kind with libjpeg; switch the
    kind to CPU decoding (for later batches, and this one: ``decoded`` and ``on_cpu`` are updated) when they
    disagree."""
    for colour in sorted({int(c) for c in tiles.colours}):
        if colour in colour_checked:
            continue
        members = [
            i for i, c in enumerate(tiles.colours) if int(c) == colour and not on_cpu[i] and decoded[i] is not None
        ]
        if not members:
            continue
        probe = max(members, key=lambda i: int(tiles.offsets[i + 1] - tiles.offsets[i]))
        try:
            reference = _decode([streams[probe]], torch.device("cpu"))[0]
        except RuntimeError:
            continue  # check on a later batch
        mismatch = colour_mismatch(reference, decoded[probe])  # type: ignore[arg-type]
        colour_checked[colour] = mismatch is None
        if mismatch is not None:
            kind = "RGB-in-JPEG" if colour == COLOUR_RGB else "YCbCr"
            log.warning(
                "nvJPEG decodes %s tiles unlike libjpeg/OpenSlide (mean |diff| %.1f grey levels on %s); "
                "decoding those on the CPU",
                kind,
                mismatch,
                tiles.labels[probe],
            )
            for i in members:
                decoded[i] = _decode([streams[i]], torch.device("cpu"))[0]
                on_cpu[i] = True


def _fit_tile(image: torch.Tensor, tile_h: int, tile_w: int) -> torch.Tensor:
    """``image`` (3, h, w) as (3, tile_h, tile_w): a tile stored smaller than the grid's tiles gets white beyond it."""
    h, w = image.shape[-2:]
    if (h, w) == (tile_h, tile_w):
        return image
    return F.pad(image[:, :tile_h, :tile_w], (0, max(0, tile_w - w), 0, max(0, tile_h - h)), value=255)


def stack_tiles(decoded: DecodedStreams, tile_h: int, tile_w: int, device: torch.device) -> torch.Tensor:
    """The batch's decoded tiles as one (U + 1, tile_h, tile_w, 3) uint8 HWC tensor on ``device``: tile u in row u,
    white where a stream was not decoded and in the last row (where missing tiles and pixels outside the level point).

    One ``torch.stack`` of the (contiguous, CHW) tiles and one layout copy, whatever the number of tiles (CUDA copies
    many stacked inputs per kernel; a tile per kernel would cost ~one launch per tile). Tiles decoded on the host
    (``on_host``) are stacked there first and cross to the device in one non-blocking copy out of pinned memory.
    """
    white = torch.full((3, tile_h, tile_w), 255, dtype=torch.uint8, device=device)
    fitted = [None if image is None else _fit_tile(image, tile_h, tile_w) for image in decoded.images]
    host = [i for i, image in enumerate(fitted) if image is not None and decoded.on_host[i]]
    if host:
        block = host_to_device(torch.stack([fitted[i] for i in host]), device)  # type: ignore[misc]
        for i, image in zip(host, block.unbind(0)):
            fitted[i] = image
    chw = torch.stack([white if image is None else image for image in fitted] + [white])
    return chw.permute(0, 2, 3, 1).contiguous()


def assemble_patches(decoded: DecodedStreams, tiles: CompressedTiles, device: torch.device) -> torch.Tensor:
    """Cut the batch's patches out of its decoded tiles on ``device``.

    Every output pixel (read-level px ``origin + (px, py)``) is gathered from the tile covering it; pixels past the
    level's right/bottom edge (and of missing or undecodable tiles) are white, as OpenSlide reads them. One gather for
    the whole batch, whatever the overlap or how many tiles a patch straddles; the patch geometry and tile lookup
    reach the device in one non-blocking copy (:func:`arrays_to_device`).

    Returns:
        (N, 3, P, P) uint8 RGB in channels_last memory format (what the module converts to anyway).
    """
    size = tiles.patch_size
    count = len(tiles)
    if count == 0:
        return torch.empty((0, 3, size, size), dtype=torch.uint8, device=device)
    tile_h = int(tiles.geometry[:, 5].max())
    tile_w = int(tiles.geometry[:, 4].max())
    stack = stack_tiles(decoded, tile_h, tile_w, device)  # (U + 1, tile_h, tile_w, 3); the last tile is white
    blank = len(decoded.images)
    rows, cols = tiles.lookup.shape[1:]
    # One extra row and column of white tiles: where pixels past the level's edge point.
    lookup = np.full((count, rows + 1, cols + 1), blank, dtype=np.int64)
    lookup[:, :rows, :cols] = np.where(tiles.lookup < 0, blank, tiles.lookup)
    geometry, base = arrays_to_device([tiles.geometry, lookup * (tile_h * tile_w)], device)
    steps = torch.arange(size, device=device)
    ox, oy, c0, r0, tw, th, width, height = (geometry[:, k : k + 1] for k in range(8))
    ax, ay = ox + steps, oy + steps  # (N, P) absolute read-level px
    col = torch.where((ax >= 0) & (ax < width), ax // tw - c0, cols)
    row = torch.where((ay >= 0) & (ay < height), ay // th - r0, rows)
    per_row = torch.gather(base, 1, row[:, :, None].expand(count, size, cols + 1))  # (N, P, cols + 1)
    index = torch.gather(per_row, 2, col[:, None, :].expand(count, size, size))  # (N, P, P): first px of the tile
    index += ((ay % th) * tile_w)[:, :, None]
    index += (ax % tw)[:, None, :]
    pixels = stack.view(-1, 3).index_select(0, index.view(-1))
    return pixels.view(count, size, size, 3).permute(0, 3, 1, 2)


def decode_batch(
    batch: dict[str, Any], device: torch.device | str, colour_checked: dict[int, bool] | None = None
) -> dict[str, Any]:
    """Replace ``batch["jpeg_tiles"]`` (a :class:`CompressedTiles`) by ``batch["image"]``: (N, 3, P, P) uint8 RGB
    decoded and assembled on ``device`` (nvJPEG on CUDA, libjpeg-turbo on the CPU otherwise). Patches using a tile
    that cannot be decoded come back white with ``batch["error"]`` set, as the OpenSlide reader reports them. In a
    batch that mixes in patches OpenSlide read (``image``, ``image_rows``, ``jpeg_rows`` from
    :func:`~wsiseg.data.jpeg_dataset.collate_jpeg_tiles`) every patch takes its row of the batch. ``colour_checked``:
    see :func:`decode_streams`. On CUDA every host-to-device copy is non-blocking, out of pinned memory."""
    device = torch.device(device)
    tiles: CompressedTiles = batch["jpeg_tiles"]
    decoded = decode_streams(tiles, device, colour_checked)
    out = {k: v for k, v in batch.items() if k not in ("jpeg_tiles", "image_rows", "jpeg_rows")}
    patches = assemble_patches(decoded, tiles, device)
    rows = list(range(len(tiles)))
    if "image_rows" in batch:  # a batch mixing slides read by OpenSlide: their patches take their own rows
        rows, image_rows = list(batch["jpeg_rows"]), list(batch["image_rows"])
        # Both kinds side by side, then one gather puts every patch in its row. The row order goes to the device as
        # a tensor: indexing a CUDA tensor with a Python list copies the list there synchronously.
        order = np.empty(len(rows) + len(image_rows), dtype=np.int64)
        order[rows] = np.arange(len(rows))
        order[image_rows] = len(rows) + np.arange(len(image_rows))
        (order_on_device,) = arrays_to_device([order], device)
        both = torch.cat([patches, host_to_device(batch["image"], device)])
        patches = both.index_select(0, order_on_device).contiguous(memory_format=torch.channels_last)
    out["image"] = patches
    if any(decoded.errors):
        errors = list(out.get("error") or [""] * len(patches))
        for message, owners in zip(decoded.errors, tiles.owners):
            for n in owners if message else ():
                errors[rows[n]] = errors[rows[n]] or message
        out["error"] = errors
    return out
