"""Helpers of the JPEG tile reader tests (no tests here): the Aperio sample and the decoders' tolerances, one TIFF
tile read raw and by OpenSlide, the data module the decode and pipeline tests read through, and a slide copy with one
tile no decoder takes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import openslide
import tifffile
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from tests.conftest import shared_slide
from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.data.readers.jpeg.layout import JpegTileLayout, inspect_jpeg_level
from wsiseg.data.slide import rgba_to_rgb

CMU = "CMU-1-Small-Region.svs"  # Aperio: 2220 x 2967, JPEG tiles 240 x 240 with JPEGTables, photometric RGB
# JPEG decoders may differ in IDCT / chroma-upsampling rounding: the bound on the mean, and a stated max.
MEAN_LIMIT, MAX_LIMIT = 1.0, 4


def decode(stream: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a standalone JPEG stream, decoded by torchvision on the CPU."""
    data = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    return decode_jpeg(data, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()


def raw_tile(layout: JpegTileLayout, index: int) -> bytes:
    with open(layout.path, "rb") as fh:
        fh.seek(int(layout.offsets[index]))
        return fh.read(int(layout.bytecounts[index]))


def openslide_tile(path: Path, layout: JpegTileLayout, index: int, level: int = 0) -> np.ndarray:
    """OpenSlide's read of TIFF tile ``index`` (read-level px region of the tile, level ``level``, downsample 1)."""
    cols = layout.grid[0]
    x, y = (index % cols) * layout.tile_size[0], (index // cols) * layout.tile_size[1]
    with openslide.OpenSlide(str(path)) as slide:
        return rgba_to_rgb(np.asarray(slide.read_region((x, y), level, layout.tile_size)))


def cmu_layout() -> JpegTileLayout:
    path = shared_slide(CMU)
    with openslide.OpenSlide(str(path)) as slide:
        return inspect_jpeg_level(path, slide.level_dimensions[0], slide.properties["openslide.vendor"])


def jpeg_datamodule(path: Path, level: int, patch: int, overlap: int, workers: int = 0) -> SlideTileDataModule:
    dm = SlideTileDataModule(
        [str(path)],
        level=level,
        patch_size=patch,
        overlap=overlap,
        tissue={"enabled": False, "thumbnail_max_side": 256},  # the thumbnail comes from a lower level
        batch_size=8,
        num_workers=workers,
        reader="gpu_jpeg",
    )
    dm.setup("predict")
    return dm


def break_huffman_table(source: Path, path: Path) -> int:
    """Copy ``source`` to ``path`` with the Huffman table of its largest level-0 tile made invalid (code counts
    summing past 256, which libjpeg refuses); returns that tile's index."""
    shutil.copy(source, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        index = int(np.argmax(page.databytecounts))
        offset = int(page.dataoffsets[index])
    with open(path, "r+b") as fh:
        fh.seek(offset)
        dht = fh.read(int(page.databytecounts[index])).index(b"\xff\xc4")
        fh.seek(offset + dht + 5)
        fh.write(b"\xff" * 16)
    return index
