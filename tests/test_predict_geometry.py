"""Geometry is pixel-exact: with the probe model (output = red channel / 255) the stitched mask.tif equals the red
channel of the same region read directly with OpenSlide, for every overlap, blend, level and output downsample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from tests.conftest import shared_slide
from tests.helpers import assert_matches_rounded, block_mean, predict
from wsiseg.data.slide import rgba_to_rgb


def reference_red(slide_path: Path, level: int, downsample: int) -> np.ndarray:
    """Red channel of the whole level (read in one call, transparent → white), block-averaged by ``downsample``."""
    with openslide.OpenSlide(str(slide_path)) as slide:
        size = slide.level_dimensions[level]
        rgb = rgba_to_rgb(np.asarray(slide.read_region((0, 0), level, size)))
    return block_mean(rgb[..., 0].astype(np.float64), downsample)


def run_probe(slide: Path, tmp_path: Path, *overrides: str) -> np.ndarray:
    status = predict(slide, tmp_path, ["model=probe", "data.tissue.enabled=false", *overrides])
    assert status == 0
    name = slide.name.split(".")[0]
    return tifffile.imread(tmp_path / name / "mask.tif", key=0)


CASES = [
    # (level, patch, overlap, blend, output_downsample, reader): auto reads JPEG tiles on this CPU, openslide the rest
    (0, 256, 0, "none", 1, "auto"),
    (0, 256, 64, "none", 1, "openslide"),
    (0, 256, 48, "linear", 1, "auto"),
    (0, 256, 96, "gaussian", 1, "openslide"),
    (0, 256, 64, "gaussian", 4, "auto"),
    (0, 128, 0, "linear", 4, "openslide"),
    (1, 128, 32, "gaussian", 1, "auto"),
    (1, 96, 16, "none", 2, "openslide"),
]


@pytest.mark.parametrize(("level", "patch", "overlap", "blend", "downsample", "reader"), CASES)
def test_probe_mask_equals_direct_read_synthetic(
    synthetic_slide: Path,
    tmp_path: Path,
    level: int,
    patch: int,
    overlap: int,
    blend: str,
    downsample: int,
    reader: str,
) -> None:
    # 2000 x 1500 at level 0 (500 x 375 at level 1): not a multiple of the patch, the stride or 16.
    mask = run_probe(
        synthetic_slide,
        tmp_path,
        f"data.reader={reader}",
        f"data.level={level}",
        f"data.patch_size={patch}",
        f"data.overlap={overlap}",
        f"writer.blend={blend}",
        f"writer.output_downsample={downsample}",
        "model.output_dtype=float32",
    )
    assert_matches_rounded(mask, reference_red(synthetic_slide, level, downsample))


@pytest.mark.parametrize(
    ("overlap", "blend", "downsample", "blend_thread", "reader"),
    [(64, "gaussian", 1, "auto", "openslide"), (128, "linear", 4, "true", "auto")],
)
def test_probe_mask_equals_direct_read_real_svs(
    tmp_path: Path, overlap: int, blend: str, downsample: int, blend_thread: str, reader: str
) -> None:
    # Real Aperio SVS (JPEG tiles of 240 px, 2220 x 2967): tiles straddle the file's own tiles. blend_thread=true: the
    # background blending thread that GPU runs use (auto blends between batches on this CPU).
    slide = shared_slide("CMU-1-Small-Region.svs")
    mask = run_probe(
        slide,
        tmp_path,
        "data.patch_size=512",
        f"data.overlap={overlap}",
        f"writer.blend={blend}",
        f"writer.output_downsample={downsample}",
        f"writer.blend_thread={blend_thread}",
        f"data.reader={reader}",
        "model.output_dtype=float32",
    )
    assert_matches_rounded(mask, reference_red(slide, 0, downsample))


def test_probe_mask_default_float16_output_is_exact_at_full_resolution(tmp_path: Path) -> None:
    slide = shared_slide("histolab__tcga-cr-7395-01a-01-ts1.svs")  # JPEG 2000, 4443 x 3567, no mpp
    mask = run_probe(slide, tmp_path, "data.patch_size=512", "data.overlap=32", "writer.blend=gaussian")
    expected = reference_red(slide, 0, 1)
    np.testing.assert_array_equal(mask, expected.astype(np.uint8))


def test_probe_mask_lower_level_of_real_pyramid(tmp_path: Path) -> None:
    slide = shared_slide("openslide-python__boxes.tiff")  # level 1 has downsample exactly 2
    mask = run_probe(slide, tmp_path, "data.level=1", "data.patch_size=64", "data.overlap=16", "writer.blend=linear")
    np.testing.assert_array_equal(mask, reference_red(slide, 1, 1).astype(np.uint8))


def test_tissue_mask_skips_background_and_keeps_tissue(synthetic_slide: Path, tmp_path: Path) -> None:
    mask = run_probe(synthetic_slide, tmp_path, "data.tissue.enabled=true", "data.patch_size=256", "writer.blend=none")
    report = __import__("json").loads((tmp_path / "synth" / "report.json").read_text())
    assert 0 < report["tiles_processed"] == report["tiles_tissue"] < report["tiles_total"]
    expected = reference_red(synthetic_slide, 0, 1).astype(np.uint8)
    processed = mask > 0  # the probe outputs R/255 > 0 wherever a tile was processed (no pure-black pixels here)
    assert 0.1 < processed.mean() < 0.9
    np.testing.assert_array_equal(mask[processed], expected[processed])
    # every tissue pixel (saturated pink/purple) lies in a processed tile
    with openslide.OpenSlide(str(synthetic_slide)) as slide:
        rgb = rgba_to_rgb(np.asarray(slide.read_region((0, 0), 0, slide.dimensions)))
    saturated = (rgb.max(axis=2).astype(int) - rgb.min(axis=2)) > 40
    assert processed[saturated].all()
