"""Output rendering on its own: a finished store into mask.tif, heatmap.png and contours, without Lightning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.writers.conftest import planned_slide
from wsiseg.errors import UserInputError
from wsiseg.writers.mosaic import TileMosaic
from wsiseg.writers.render import RenderOptions, render_slide


def test_mask_pyramid_heatmap_and_contours_from_a_store(tmp_path: Path) -> None:
    slide = planned_slide("r", size=(600, 400), patch=64)
    store = TileMosaic(tmp_path / "store", (600, 400), chunk=512)
    values = np.zeros((1, 400, 600), np.float32)
    values[0, 100:300, 200:400] = 0.9  # one tumour square, 200 x 200 px
    values[0, 0:50, 0:50] = 0.3  # below the threshold
    store.add(0, 0, values, np.ones((400, 600), np.float32))
    options = RenderOptions(threshold=0.5, tiff_tile=128, contours=("geojson",), heatmap_max_side=100)
    fields = render_slide(
        slide, store, tmp_path, output_mpp=0.5, level0_per_mask_px=1.0, mpp_level0=0.5, options=options
    )
    mask = tifffile.imread(tmp_path / "mask.tif", key=0)
    np.testing.assert_array_equal(mask, np.rint(values[0] * 255).astype(np.uint8))
    assert fields["tumour_pixels"] == 200 * 200 and fields["threshold"] == 0.5
    assert fields["tumour_area_mm2"] == pytest.approx(200 * 200 * (0.5e-3) ** 2)
    with tifffile.TiffFile(tmp_path / "mask.tif") as tif:
        assert len(tif.series[0].levels) == fields["mask_levels"] == 4  # 600x400 halved down to one 128 px tile
        assert tif.pages[0].tilewidth == 128
    assert Image.open(tmp_path / "heatmap.png").size == (100, 67)  # the 150 x 100 thumbnail fitted into 100 px
    features = json.loads((tmp_path / "tumour.geojson").read_text())["features"]
    assert len(features) == 1
    xs = [x for x, _ in features[0]["geometry"]["coordinates"][0]]
    assert min(xs) == pytest.approx(200) and max(xs) == pytest.approx(400)  # level-0 px


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threshold": 0.0}, r"writer.threshold must be in \(0, 1\], got 0.0"),
        ({"compression": "jpeg"}, "writer.compression must be one of lzw, deflate, zlib, zstd"),
        ({"layout": "qupath"}, "writer.layout must be one of generic, ome"),
        ({"simplify_um": -1.0}, "writer.simplify_um must be >= 0"),
        ({"tiff_tile": 100}, "writer.tiff_tile must be a positive multiple of 16"),
    ],
)
def test_bad_render_options_name_the_option(options: dict, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        RenderOptions(**options)
