from pathlib import Path

import numpy as np
import openslide
import pytest

from tests.conftest import shared_slide
from wsiseg.data.resample import resampled_length
from wsiseg.data.slide import SlideLevel, choose_level, open_slide, rgba_to_rgb, slide_mpp
from wsiseg.errors import UserInputError


def test_choose_level_by_index_and_by_mpp(synthetic_slide: Path) -> None:
    with openslide.OpenSlide(str(synthetic_slide)) as slide:  # levels: downsample 1 and 4, 0.5 um/px
        assert slide_mpp(slide) == pytest.approx(0.5)
        assert choose_level(slide, None, None, "s").level == 0
        level = choose_level(slide, 1, None, "s")
        assert (level.level, level.downsample, level.size) == (1, 4.0, (500, 375))
        assert level.mpp == pytest.approx(2.0)
        assert choose_level(slide, None, 1.95, "s").level == 1
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


def test_mpp_within_tolerance_reads_the_level_as_is(synthetic_slide: Path) -> None:
    with openslide.OpenSlide(str(synthetic_slide)) as slide:  # levels: 0.5 and 2.0 um/px
        for target, index in [(0.5, 0), (0.52, 0), (0.48, 0), (1.95, 1), (2.0, 1), (2.09, 1)]:
            level = choose_level(slide, None, target, "s")
            assert (level.level, level.resampled, level.scale) == (index, False, 1.0), target
            assert level.mpp == pytest.approx(0.5 * 4**index), "the level's own mpp is reported, not the target"
        assert choose_level(slide, None, 0.5, "s") == choose_level(slide, 0, None, "s")


def test_mpp_between_levels_resamples_the_next_finer_level(synthetic_slide: Path) -> None:
    with openslide.OpenSlide(str(synthetic_slide)) as slide:  # 2000 x 1500 at 0.5 um/px, 500 x 375 at 2.0
        level = choose_level(slide, None, 1.0, "s")
        assert level == SlideLevel(0, 2.0, (1000, 750), 1.0, 2.0, 1.0, (2000, 1500))
        assert level.resampled
        level = choose_level(slide, None, 3.0, "s")
        assert (level.level, level.scale, level.source_downsample, level.source_size) == (1, 1.5, 4.0, (500, 375))
        assert (level.downsample, level.size, level.mpp) == (6.0, (334, 250), 3.0)
        level = choose_level(slide, None, 1.9, "s")  # 2.0 is 5.3 % off: outside the default 5 %
        assert (level.level, level.mpp, level.downsample) == (0, 1.9, pytest.approx(3.8))
        assert choose_level(slide, None, 1.9, "s", mpp_tolerance=0.06).level == 1
        assert choose_level(slide, None, 1.95, "s", mpp_tolerance=0.0).resampled
        assert choose_level(slide, None, 10.0, "s").scale == 5.0, "coarser than the coarsest level: resample it"


def test_mpp_between_levels_of_a_real_svs() -> None:
    with openslide.OpenSlide(str(shared_slide("CMU-1-Small-Region.svs"))) as slide:  # one level, 0.499 um/px
        level = choose_level(slide, None, 1.0, "cmu")
        scale = 1.0 / 0.499
        assert (level.level, level.mpp, level.scale) == (0, 1.0, pytest.approx(scale))
        assert level.size == (resampled_length(2220, level.scale), resampled_length(2967, level.scale)) == (1108, 1481)
        assert level.mpp / level.downsample == pytest.approx(0.499)


def test_mpp_finer_than_level0_is_a_user_error_naming_the_option(synthetic_slide: Path) -> None:
    with openslide.OpenSlide(str(synthetic_slide)) as slide:
        with pytest.raises(
            UserInputError, match=r"slide 's' has 0\.5 um/px at level 0, so data\.mpp=0\.4 would need up"
        ):
            choose_level(slide, None, 0.4, "s")
        assert not choose_level(slide, None, 0.477, "s").resampled, "within 5 % of level 0: read level 0"


def test_explicit_level_wins_over_mpp_and_is_never_resampled(synthetic_slide: Path) -> None:
    with openslide.OpenSlide(str(synthetic_slide)) as slide:
        for target in (0.1, 1.0, 3.0):
            level = choose_level(slide, 1, target, "s")
            assert (level.level, level.resampled, level.size, level.mpp) == (1, False, (500, 375), 2.0)


def test_slide_level_defaults_describe_an_unresampled_level() -> None:
    level = SlideLevel(2, 16.0, (300, 200), 4.0)
    assert (level.scale, level.source_downsample, level.source_size, level.resampled) == (1.0, 16.0, (300, 200), False)
    with pytest.raises(ValueError, match="needs source_downsample and source_size"):
        SlideLevel(0, 2.0, (10, 10), None, scale=2.0)


def test_a_plain_tiff_or_image_gets_a_hint_of_what_to_do() -> None:
    strip_tiff = shared_slide("histolab__kidney-48-5.tif")  # strip-organised RGB TIFF, no tiles, no pyramid
    with pytest.raises(UserInputError) as info:
        open_slide(strip_tiff)
    message = str(info.value)
    assert message.startswith(f"slide '{strip_tiff}' cannot be opened by OpenSlide: a plain (strip-organised")
    assert f"vips tiffsave '{strip_tiff}'" in message and "--tile --pyramid" in message
    png = shared_slide("openslide-python__boxes.png")
    with pytest.raises(UserInputError, match="an ordinary PNG/JPEG image, not a whole-slide image; .* data=patches"):
        open_slide(png)
