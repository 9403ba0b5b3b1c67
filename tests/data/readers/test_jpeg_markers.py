"""data.reader=jpeg, the stream side: stored tiles made standalone (JPEGTables merged, colour markers set as the TIFF
photometric says) decode as OpenSlide reads the same tiles."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import torch

from tests.conftest import shared_slide
from tests.data.readers.jpeg_helpers import CMU, MAX_LIMIT, MEAN_LIMIT, cmu_layout, decode, openslide_tile, raw_tile
from wsiseg.data.readers.jpeg.decode import colour_mismatch
from wsiseg.data.readers.jpeg.layout import inspect_jpeg_level
from wsiseg.data.readers.jpeg.markers import COLOUR_RGB, COLOUR_YCBCR, jpeg_colour_space, merge_tables, tile_stream
from wsiseg.data.synthetic import SyntheticSlide


def test_aperio_tables_merged_and_rgb_kept() -> None:
    path = shared_slide(CMU)
    layout = cmu_layout()
    index = int(np.argmax(layout.bytecounts))  # the busiest tile
    raw = raw_tile(layout, index)
    merged = merge_tables(raw, layout.tables)
    assert merged.count(b"\xff\xd8") == 1 and merged.count(b"\xff\xd9") == 1
    assert merged[2:4] == b"\xff\xdb"  # the tables' DQT right after SOI
    assert len(merged) == len(raw) + len(layout.tables) - 4
    # libjpeg would take these marker-less components (ids 0, 1, 2) as YCbCr; the photometric says RGB
    assert jpeg_colour_space(merged) == COLOUR_YCBCR
    stream = tile_stream(raw, layout.tables, layout.colour)
    assert stream[2:4] == b"\xff\xee" and jpeg_colour_space(stream) == COLOUR_RGB
    reference = openslide_tile(path, layout, index)
    diff = np.abs(decode(stream).astype(int) - reference)
    print(f"\nCMU tile {index}: mean |diff| {diff.mean():.4f}, max {diff.max()}")
    assert diff.mean() <= MEAN_LIMIT and diff.max() <= MAX_LIMIT
    wrong = np.abs(decode(merged).astype(int) - reference).mean()
    assert wrong > 20, wrong  # what the Adobe marker prevents
    assert colour_mismatch(torch.from_numpy(reference), torch.from_numpy(decode(merged))) is not None
    assert colour_mismatch(torch.from_numpy(reference), torch.from_numpy(decode(stream))) is None


def _set_photometric(path: Path, value: int) -> None:
    with tifffile.TiffFile(path) as tif:
        offset, order = tif.pages[0].tags["PhotometricInterpretation"].valueoffset, tif.byteorder
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(order + "H", value))


@pytest.mark.parametrize("case", ["jfif_stream_photometric_rgb", "adobe_rgb_stream_photometric_ycbcr"])
def test_photometric_wins_over_stream_markers_like_openslide(tmp_path: Path, case: str) -> None:
    """OpenSlide (libtiff) converts colours as the TIFF photometric says, whatever markers the stream carries."""
    spec = SyntheticSlide(512, 512, seed=4, tissue_scale=0.45)
    rgb = spec.render(spec.fields(), 0, 0, 512, 512, 1)
    path = tmp_path / f"{case}.tif"
    if case == "jfif_stream_photometric_rgb":
        tifffile.imwrite(path, rgb, tile=(256, 256), compression="jpeg")  # JFIF YCbCr tiles, photometric YCbCr
        _set_photometric(path, 2)  # now the tag says RGB: OpenSlide shows the raw components
    else:
        import imagecodecs

        tiles = (
            imagecodecs.jpeg8_encode(rgb[y : y + 256, x : x + 256], colorspace="RGB", outcolorspace="RGB")
            for y in (0, 256)
            for x in (0, 256)
        )  # Adobe APP14 transform 0 streams; tifffile tags them photometric YCbCr
        tifffile.imwrite(path, tiles, shape=rgb.shape, dtype=np.uint8, tile=(256, 256), compression="jpeg")
    with openslide.OpenSlide(str(path)) as slide:
        layout = inspect_jpeg_level(path, slide.level_dimensions[0], slide.properties["openslide.vendor"])
    raw = raw_tile(layout, 3)
    assert jpeg_colour_space(raw) != layout.colour  # the stream's markers disagree with the tag
    diff = np.abs(decode(tile_stream(raw, layout.tables, layout.colour)).astype(int) - openslide_tile(path, layout, 3))
    print(f"\n{case}: mean |diff| {diff.mean():.4f}, max {diff.max()}")
    assert diff.mean() <= MEAN_LIMIT and diff.max() <= MAX_LIMIT
