from pathlib import Path

import numpy as np
import openslide
import pytest

from tests.conftest import shared_slide
from wsiseg.data.slide import choose_level, open_slide, rgba_to_rgb, slide_mpp
from wsiseg.errors import UserInputError


def test_choose_level_by_index_and_by_mpp(synthetic_slide: Path) -> None:
    with openslide.OpenSlide(str(synthetic_slide)) as slide:  # levels: downsample 1 and 4, 0.5 um/px
        assert slide_mpp(slide) == pytest.approx(0.5)
        assert choose_level(slide, None, None, "s").level == 0
        level = choose_level(slide, 1, None, "s")
        assert (level.level, level.downsample, level.size) == (1, 4.0, (500, 375))
        assert level.mpp == pytest.approx(2.0)
        assert choose_level(slide, None, 1.9, "s").level == 1
        assert choose_level(slide, None, 0.6, "s").level == 0
        assert choose_level(slide, 0, 2.0, "s").level == 0, "an explicit level wins"
        with pytest.raises(UserInputError, match=r"data.level=2 does not exist in slide 's' \(2 levels: 0..1\)"):
            choose_level(slide, 2, None, "s")


def test_mpp_on_a_slide_without_mpp_is_a_clear_error() -> None:
    with openslide.OpenSlide(str(shared_slide("histolab__tcga-cr-7395-01a-01-ts1.svs"))) as slide:
        assert slide_mpp(slide) is None
        with pytest.raises(UserInputError, match="records no microns-per-pixel.*use data.level"):
            choose_level(slide, None, 1.0, "tcga")


def test_open_slide_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(UserInputError, match="is a directory"):
        open_slide(tmp_path)
    with pytest.raises(UserInputError, match="Unsupported TIFF compression"):
        open_slide(shared_slide("openslide-python__unopenable.tiff"))


def test_rgba_to_rgb_composites_over_white() -> None:
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [200, 100, 0, 128]]], np.uint8)
    rgb = rgba_to_rgb(rgba)
    assert rgb[0, 0].tolist() == [10, 20, 30]
    assert rgb[0, 1].tolist() == [255, 255, 255]
    a = 128 / 255
    assert rgb[0, 2].tolist() == [round(200 * a + 255 * (1 - a)), round(100 * a + 255 * (1 - a)), round(255 * (1 - a))]


def test_rgba_to_rgb_of_an_opaque_read_is_its_rgb_planes() -> None:
    rgba = np.random.default_rng(1).integers(0, 256, (37, 53, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgb = rgba_to_rgb(rgba)
    assert rgb.flags.c_contiguous and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, rgba[..., :3])
