"""``data.mpp`` between pyramid levels: the network sees the source level area-resampled to exactly the requested
resolution. With the probe model (output = red channel / 255) the stitched mask.tif equals the red channel of the whole
source level, read once with OpenSlide and resampled by the independent reference (np.repeat, then block mean)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from tests.conftest import shared_slide
from tests.data.test_resample import reference_resample, resample_whole
from tests.helpers import assert_matches_rounded, block_mean, predict
from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.data.readers.jpeg.dataset import plan_layouts
from wsiseg.data.slide import rgba_to_rgb
from wsiseg.errors import UserInputError

TARGET_MPP = 0.75  # between levels 1 (0.5) and 2 (1.0): level 1 resampled by 1.5 = 3/2


@pytest.fixture(scope="module")
def pyramid_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2100 x 1300 at 0.25 um/px, levels x1/x2/x4 (0.25, 0.5, 1.0 um/px): 0.75 um/px is on no level."""
    from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide

    path = tmp_path_factory.mktemp("pyramid") / "pyr.tif"
    return write_synthetic_slide(path, SyntheticSlide(2100, 1300, seed=3, mpp=0.25), level_factor=2)


def source_red(slide_path: Path, level: int) -> np.ndarray:
    """Red channel of the whole level, read in one call (transparent → white)."""
    with openslide.OpenSlide(str(slide_path)) as slide:
        rgb = rgba_to_rgb(np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level])))
    return rgb[..., 0]


def tiff_mpp(page: tifffile.TiffPage) -> float:
    """Microns per px from a page's XResolution/YResolution (pixels per centimetre)."""
    assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
    mpps = [1e4 * den / num for num, den in (page.tags[t].value for t in ("XResolution", "YResolution"))]
    assert mpps[0] == pytest.approx(mpps[1])
    return mpps[0]


def run_probe(slide: Path, out: Path, *overrides: str) -> tuple[np.ndarray, dict, float]:
    """(mask.tif level 0, report.json, the mask's TIFF mpp) of a probe-model run."""
    status = predict(slide, out, ["model=probe", "data.tissue.enabled=false", "model.output_dtype=float32", *overrides])
    assert status == 0
    folder = out / slide.name.split(".")[0]
    with tifffile.TiffFile(folder / "mask.tif") as tiff:
        mask, mpp = tiff.pages[0].asarray(), tiff_mpp(tiff.pages[0])
    return mask, json.loads((folder / "report.json").read_text()), mpp


@pytest.mark.parametrize(
    ("patch", "overlap", "blend", "downsample", "reader"),
    [
        (128, 0, "none", 1, "auto"),  # auto picks JPEG tiles on this CPU: a resampled slide falls back to OpenSlide
        (128, 32, "gaussian", 1, "openslide"),
        (96, 0, "none", 2, "openslide"),
        (96, 16, "linear", 2, "jpeg"),
    ],
)
def test_probe_mask_equals_resampled_source_level(
    pyramid_slide: Path, tmp_path: Path, patch: int, overlap: int, blend: str, downsample: int, reader: str
) -> None:
    mask, report, mask_mpp = run_probe(
        pyramid_slide,
        tmp_path,
        f"data.mpp={TARGET_MPP}",
        f"data.patch_size={patch}",
        f"data.overlap={overlap}",
        f"writer.blend={blend}",
        f"writer.output_downsample={downsample}",
        f"data.reader={reader}",
    )
    resampled = np.rint(reference_resample(source_red(pyramid_slide, 1), 3, 2))  # (434, 700): 650 / 1.5 rounds up
    assert resampled.shape == (434, 700)
    assert_matches_rounded(mask, block_mean(resampled, downsample))
    assert report["mpp_read_level"] == TARGET_MPP
    assert report["output_mpp"] == pytest.approx(TARGET_MPP * downsample)
    assert mask_mpp == pytest.approx(TARGET_MPP * downsample)
    assert report["mpp_level0"] == pytest.approx(0.25)
    assert (report["level"], report["level_downsample"], report["level_size"]) == (1, 3.0, [700, 434])
    assert report["output_size"] == [math.ceil(700 / downsample), math.ceil(434 / downsample)]


def test_probe_mask_of_a_real_svs_at_1_mpp(tmp_path: Path) -> None:
    # CMU-1-Small-Region.svs has one level, 0.499 um/px: data.mpp=1.0 resamples it by 2.004 (tiles straddle the file's
    # 240 px JPEG tiles and the resampled grid at once). The reference is the whole level resampled in one go.
    slide = shared_slide("CMU-1-Small-Region.svs")
    mask, report, mask_mpp = run_probe(
        slide, tmp_path, "data.mpp=1.0", "data.patch_size=256", "data.overlap=64", "writer.blend=gaussian"
    )
    red = source_red(slide, 0)
    _, expected = resample_whole(red, 1 / 0.499, (1108, 1481))
    assert_matches_rounded(mask, expected.astype(np.float64))
    assert (report["level"], report["level_size"], report["mpp_read_level"]) == (0, [1108, 1481], 1.0)
    assert mask_mpp == pytest.approx(1.0)


def test_too_fine_mpp_skips_only_that_slide(pyramid_slide: Path, synthetic_slide: Path) -> None:
    # 0.3 um/px: the 0.25 um/px slide is resampled by 1.2; the 0.5 um/px one would need upsampling
    dm = SlideTileDataModule([str(pyramid_slide), str(synthetic_slide)], level=None, mpp=0.3, num_workers=0)
    dm.setup("predict")
    assert [s.path for s in dm.slides] == [pyramid_slide]
    assert dm.slides[0].level.scale == pytest.approx(1.2) and dm.slides[0].level.mpp == 0.3
    [(path, error)] = dm.failed
    assert path == synthetic_slide
    assert error == (
        f"slide '{synthetic_slide}' has 0.5 um/px at level 0, so data.mpp=0.3 would need upsampling: "
        "set data.mpp >= 0.4762 or raise data.mpp_tolerance"
    )
    layouts, problems = plan_layouts(dm.slides)
    assert layouts == [None] and problems == ["pyr.tif: resampled to data.mpp from level 0"]


def test_mpp_tolerance_is_validated() -> None:
    for bad in (-0.1, 1.0):
        with pytest.raises(UserInputError, match=r"data\.mpp_tolerance must be in \[0, 1\)"):
            SlideTileDataModule(["a.svs"], mpp=1.0, mpp_tolerance=bad)
