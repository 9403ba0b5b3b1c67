"""Pyramidal tiled TIFF output, written band by band so memory stays bounded."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import tifffile

from wsiseg.hardware import usable_cores

__all__ = [
    "ASAP_COMPRESSIONS",
    "ENCODERS",
    "LAYOUTS",
    "TIFF_COMPRESSION",
    "downsample_2x",
    "pyramid_sizes",
    "write_pyramid_tiff",
]


def pyramid_sizes(size: tuple[int, int], tile: int = 256) -> list[tuple[int, int]]:
    """(W, H) of every pyramid level: halve (rounding up) until the longer side fits in one ``tile``.

    Example::

        >>> pyramid_sizes((1000, 300), 256)
        [(1000, 300), (500, 150), (250, 75)]
    """
    sizes = [tuple(size)]
    while max(sizes[-1]) > tile:
        w, h = sizes[-1]
        sizes.append((math.ceil(w / 2), math.ceil(h / 2)))
    return sizes  # type: ignore[return-value]


def downsample_2x(band: np.ndarray, labels: bool) -> np.ndarray:
    """Halve an (rows, W) uint8 band: 2×2 mean (rounded) for probabilities, top-left pick for class labels.

    Odd sizes: the last row/column is averaged with itself (edge replicate)."""
    if labels:
        return np.ascontiguousarray(band[::2, ::2])
    rows, width = band.shape
    if rows % 2 or width % 2:
        band = np.pad(band, ((0, rows % 2), (0, width % 2)), mode="edge")
    # OpenCV's area resize at exactly 1/2 computes (a + b + c + d + 2) >> 2 on uint8: the rounded 2x2 mean, much faster
    # than the same sum in numpy uint16.
    return cv2.resize(band, (band.shape[1] // 2, band.shape[0] // 2), interpolation=cv2.INTER_AREA)


def _deflate(data: np.ndarray) -> bytes:
    # libdeflate writes the same zlib stream as zlib; at level 3 it is much faster than zlib at level 6 for a similar
    # size on probability tiles.
    return imagecodecs.deflate_encode(data, level=3)


# writer.compression -> (tile encoder, TIFF Compression tag). "deflate" and "zlib" are the same stream under the two
# tags TIFF has for it: ASAP's native reader accepts only the older 32946; 8 ("Adobe deflate") is what tifffile and
# libtiff write by default. ASAP refuses zstd (50000) too.
ENCODERS = {"lzw": imagecodecs.lzw_encode, "deflate": _deflate, "zlib": _deflate, "zstd": imagecodecs.zstd_encode}
TIFF_COMPRESSION = {"lzw": 5, "deflate": 32946, "zlib": 8, "zstd": 50000}
ASAP_COMPRESSIONS = (1, 5, 7, 32946, 33005)  # what ASAP's TIFFImage::initializeType accepts
LAYOUTS = ("generic", "ome")


def _submit_band(band: np.ndarray, tile: int, compression: str, pool: ThreadPoolExecutor) -> list[Future[bytes] | None]:
    """Start compressing a band's tiles, row-major, on the encoder pool (the codecs release the GIL); all-zero
    (background) tiles are not encoded (``None``: the caller writes one pre-encoded empty tile)."""
    encode = ENCODERS[compression]
    rows, width = band.shape
    occupied = _occupied_tiles(band, tile)
    futures: list[Future[bytes] | None] = []
    for ty in range(0, rows, tile):
        for tx in range(0, width, tile):
            if not occupied[ty // tile, tx // tile]:
                futures.append(None)
                continue
            block = band[ty : ty + tile, tx : tx + tile]
            if block.shape != (tile, tile):
                padded = np.zeros((tile, tile), np.uint8)
                padded[: block.shape[0], : block.shape[1]] = block
                block = padded
            futures.append(pool.submit(encode, np.ascontiguousarray(block)))
    return futures


def _occupied_tiles(band: np.ndarray, tile: int) -> np.ndarray:
    """(ceil(rows/tile), ceil(W/tile)) bool: which ``tile × tile`` tiles of a band hold a non-zero pixel, in one pass
    (a per-tile ``any`` pays a call's overhead for every tile)."""
    rows, width = band.shape
    grid_h, grid_w = -(-rows // tile), -(-width // tile)
    if rows != grid_h * tile or width != grid_w * tile:
        band = np.pad(band, ((0, grid_h * tile - rows), (0, grid_w * tile - width)))
    return band.reshape(grid_h, tile, grid_w, tile).max(axis=(1, 3)) > 0


def _encoded_tiles(
    bands: Iterable[np.ndarray], tile: int, compression: str, empty: bytes, pool: ThreadPoolExecutor
) -> Iterator[bytes]:
    """Compressed tiles of consecutive bands, row-major, encoded on ``pool``. A band's tiles are submitted before the
    previous band's are handed on, so producing the next band (blending, halving into the next level) overlaps with the
    encoding."""
    pending: list[Future[bytes] | None] | None = None
    for band in bands:
        submitted = _submit_band(band, tile, compression, pool)
        if pending is not None:
            yield from (empty if f is None else f.result() for f in pending)
        pending = submitted
    if pending is not None:
        yield from (empty if f is None else f.result() for f in pending)


def write_pyramid_tiff(
    path: str | Path,
    level0_bands: Iterable[np.ndarray],
    size: tuple[int, int],
    scratch: str | Path,
    mpp: float | None,
    labels: bool = False,
    tile: int = 256,
    compression: str = "deflate",
    preview_side: int = 1024,
    layout: str = "generic",
) -> np.ndarray:
    """Write a single-channel uint8 pyramidal tiled TIFF.

    Args:
        path: destination (written in place: wrap in an atomic rename).
        level0_bands: bands of level 0, each (rows, W) uint8 with rows a multiple of ``2·tile`` except the last,
            top to bottom.
        size: (W, H) of level 0, output px.
        scratch: folder for the on-disk copies of each level (needed to build the next one; removed by the caller).
        mpp: microns per level-0 output px; sets X/YResolution (px per cm) so viewers scale the overlay.
        labels: class labels (nearest downsampling) instead of probabilities (mean).
        tile: TIFF tile side.
        compression: lossless TIFF compression (:data:`ENCODERS`): ``lzw`` and ``deflate`` are read by ASAP's native
            reader, OpenSlide, tifffile and libvips; ``zlib`` (deflate under tag 8) and ``zstd`` not by ASAP's.
        preview_side: the returned preview is the smallest level whose longer side is at least this.
        layout: ``generic``: the levels as successive directories, each strictly narrower (OpenSlide, ASAP);
            ``ome``: OME-TIFF, level 0 with the reduced levels as its SubIFDs and the pixel size in the OME-XML
            (QuPath / Bio-Formats, napari open it as a pyramid; OpenSlide reads only its level 0).

    Returns:
        A preview level as a (h, w) uint8 array (for rendering a heatmap).
    """
    if compression not in ENCODERS:
        raise ValueError(f"writer.compression must be one of {', '.join(ENCODERS)}; got '{compression}'")
    if layout not in LAYOUTS:
        raise ValueError(f"writer.layout must be one of {', '.join(LAYOUTS)}; got '{layout}'")
    empty = ENCODERS[compression](np.zeros((tile, tile), np.uint8))
    sizes = pyramid_sizes(size, tile)
    band_rows = 2 * tile
    levels = [_BandStore(Path(scratch) / f"level{i}", band_rows, w, h) for i, (w, h) in enumerate(sizes)]
    preview = next((i for i in reversed(range(len(sizes))) if max(sizes[i]) >= preview_side), 0)

    def level0_pieces() -> Iterator[np.ndarray]:
        for band in level0_bands:
            for start in range(0, band.shape[0], band_rows):  # bands are whole multiples of band_rows but the last
                yield band[start : start + band_rows]

    def level_bands(index: int) -> Iterator[np.ndarray]:
        """The bands of level ``index``; on the way, each pair of them is halved into the next level's store, so every
        level is read once and level 0 is never stored (unless it is the preview)."""
        bands = level0_pieces() if index == 0 else map(levels[index].band, range(levels[index].count))
        coarser = levels[index + 1] if index + 1 < len(levels) else None
        last = levels[index].count - 1
        pending: np.ndarray | None = None
        for k, band in enumerate(bands):
            if index == 0 and preview == 0:
                levels[0].put(k, band)
            # Halve before yielding: tifffile stops pulling after the level's last tile, so nothing may follow it.
            if coarser is not None:
                pair = [band] if k % 2 == 0 else [pending, band]
                pending = band
                # a complete pair (or the odd last band); background halves to background: nothing to compute or store
                if (k % 2 == 1 or k == last) and any(b.any() for b in pair):
                    coarser.put(k // 2, downsample_2x(np.concatenate(pair), labels)[:, : coarser.width])
            yield band

    # one encoder pool per file (the codecs release the GIL), so no thread outlives the write
    pool = ThreadPoolExecutor(max_workers=usable_cores(), thread_name_prefix="wsiseg-tiff")
    ome = layout == "ome"
    with pool, tifffile.TiffWriter(path, bigtiff=True, ome=ome) as tiff:
        for index, (w, h) in enumerate(sizes):
            scale = 2**index
            options: dict = {}
            if mpp:
                pixels_per_cm = 1e4 / (mpp * scale)
                options = {"resolution": (pixels_per_cm, pixels_per_cm), "resolutionunit": "CENTIMETER"}
            if ome and index == 0:  # the OME-XML in the first directory names the pixel size; levels are its SubIFDs
                physical = {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "PhysicalSizeXUnit": "µm"} if mpp else {}
                options.update(
                    subifds=len(sizes) - 1,
                    metadata={"axes": "YX", "Name": "wsiseg mask", **physical, "PhysicalSizeYUnit": "µm"},
                )
            else:
                options["metadata"] = None
                if not ome and index == 0:
                    options["description"] = "wsiseg mask"
            tiff.write(
                _encoded_tiles(level_bands(index), tile, compression, empty, pool),
                shape=(h, w),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="minisblack",
                compression=TIFF_COMPRESSION[compression],
                subfiletype=0 if index == 0 else 1,
                **options,
            )
    return levels[preview].whole()


class _BandStore:
    """One pyramid level kept on disk as bands of ``band_rows`` rows, one raw ``.npy`` file per band that holds any
    non-zero pixel (background bands are not stored). Written once, read once to build the next level."""

    def __init__(self, folder: Path, band_rows: int, width: int, height: int) -> None:
        self.folder, self.band_rows, self.width, self.height = folder, band_rows, width, height
        self.count = math.ceil(height / band_rows)
        folder.mkdir(parents=True, exist_ok=True)

    def rows(self, index: int) -> int:
        return min(self.band_rows, self.height - index * self.band_rows)

    def _file(self, index: int) -> Path:
        return self.folder / f"{index}.npy"

    def put(self, index: int, band: np.ndarray) -> None:
        if band.any():
            np.save(self._file(index), np.ascontiguousarray(band), allow_pickle=False)

    def band(self, index: int) -> np.ndarray:
        """Band ``index`` as (rows, width) uint8; background bands (never stored) come back as zeros."""
        path = self._file(index)
        return np.load(path) if path.exists() else np.zeros((self.rows(index), self.width), np.uint8)

    def whole(self) -> np.ndarray:
        """The level as one (height, width) array (for the small preview level)."""
        return np.concatenate([self.band(i) for i in range(self.count)])
