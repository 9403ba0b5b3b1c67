"""Ground truth on an evaluation grid (wsiseg.annotations.ground_truth): rasterisation, mask images, lookup."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import shapely
import tifffile
from PIL import Image

from tests.annotations.samples import CAMELYON_XML, write
from wsiseg.annotations.ground_truth import find_annotation, ground_truth_mask, rasterise, read_mask_image


def test_rasterised_annotation_matches_hand_counted_pixels(tmp_path: Path) -> None:
    path = write(tmp_path / "tumor_001.xml", CAMELYON_XML)
    mask = ground_truth_mask(path, (1000, 1000), 100)
    # Eval px (j, i) is in when its centre (100 j + 50, 100 i + 50) is: the square holds centres 150..450 (4 × 4),
    # less the excluded centre (250, 250); the triangle x + y < 980 holds (650, 150), (750, 150), (650, 250).
    expected = np.zeros((10, 10), bool)
    expected[1:5, 1:5] = True
    expected[2, 2] = False
    expected[1, 6] = expected[1, 7] = expected[2, 6] = True
    assert np.array_equal(mask, expected)


def test_rasterise_samples_pixel_centres_exactly() -> None:
    angles = np.linspace(0, 2 * np.pi, 23, endpoint=False)
    radii = np.where(np.arange(23) % 2, 180.0, 410.0)
    star = shapely.Polygon(np.c_[500 + radii * np.cos(angles), 470 + radii * np.sin(angles)])
    shape_ = star.difference(shapely.Point(500, 470).buffer(90))
    downsample, size = 3.7, (280, 260)
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]]
    expected = shapely.contains_xy(shape_, (xs + 0.5) * downsample, (ys + 0.5) * downsample)
    result = rasterise(shape_, size, downsample)
    assert expected.sum() > 1000
    assert np.array_equal(result, expected)


def test_mask_images_are_resampled_to_the_evaluation_grid(tmp_path: Path) -> None:
    # A 16-px-per-px mask of a 320 × 160 level 0: 20 × 10 px, tumour block at columns 4..11, rows 2..5.
    truth = np.zeros((10, 20), np.uint8)
    truth[2:6, 4:12] = 255
    png = tmp_path / "s_tumour.png"
    Image.fromarray(truth).save(png)
    assert np.array_equal(read_mask_image(png, (20, 10), (320, 160)), truth > 0)
    coarse = read_mask_image(png, (10, 5), (320, 160))  # 32 px per px: 2 × 2 blocks, half or more tumour counts
    expected = np.zeros((5, 10), bool)
    expected[1:3, 2:6] = True
    assert np.array_equal(coarse, expected)
    fine = read_mask_image(png, (40, 20), (320, 160))
    assert np.array_equal(fine, np.kron(truth > 0, np.ones((2, 2), bool)))
    # A pyramidal TIFF: the level matching the grid is read.
    tif = tmp_path / "s_mask.tif"
    with tifffile.TiffWriter(tif) as writer:
        writer.write(np.kron(truth, np.ones((4, 4), np.uint8)), subifds=1, tile=(16, 16))
        writer.write(truth, subfiletype=1, tile=(16, 16))
    assert np.array_equal(read_mask_image(tif, (20, 10), (320, 160)), truth > 0)


def test_find_annotation_by_stem(tmp_path: Path) -> None:
    assert find_annotation(tmp_path, ["s"]) is None
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "s_tumour.png")
    (tmp_path / "s.tif").write_bytes(b"slide, not a mask")
    assert find_annotation(tmp_path, ["s"]) == tmp_path / "s_tumour.png"
    write(tmp_path / "s.xml", CAMELYON_XML)
    assert find_annotation(tmp_path, ["other", "s"]) == tmp_path / "s.xml"
    assert not ground_truth_mask(None, (100, 50), 10).any()
    assert ground_truth_mask(None, (101, 50), 10).shape == (5, 11)
