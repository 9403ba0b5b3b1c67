"""Area resampling against an independent reference (upsample by q with np.repeat, then block mean over p × p), and
tile independence: a crop resampled with its global offset equals the same window of the whole image resampled."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.helpers import assert_matches_rounded
from wsiseg.data.resample import area_resample, area_resample_float, resampled_length, source_span


def reference_resample(image: np.ndarray, p: int, q: int) -> np.ndarray:
    """Float mean of each output px at scale p/q: every source px repeated q × q times, padded white (255) to whole
    p × p blocks, block mean."""
    h, w = image.shape[:2]
    out_w, out_h = resampled_length(w, p / q), resampled_length(h, p / q)
    fine = np.repeat(np.repeat(image.astype(np.float64), q, axis=0), q, axis=1)
    padded = np.full((out_h * p, out_w * p, *image.shape[2:]), 255.0)
    padded[: fine.shape[0], : fine.shape[1]] = fine[: out_h * p, : out_w * p]
    return padded.reshape(out_h, p, out_w, p, *image.shape[2:]).mean(axis=(1, 3))


def white_padded(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` extended to (height, width) with white, as reads past the slide edge are."""
    out = np.full((height, width, *image.shape[2:]), 255, np.uint8)
    out[: image.shape[0], : image.shape[1]] = image
    return out


def resample_whole(image: np.ndarray, scale: float, out_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(float, uint8) resampling of the whole ``image`` (white past its edge) onto ``out_size`` output px."""
    _, x1 = source_span(0, out_size[0], scale)
    _, y1 = source_span(0, out_size[1], scale)
    source = white_padded(image, max(x1, image.shape[1]), max(y1, image.shape[0]))
    args = (source, scale, (0, 0), (0, 0), out_size)
    return area_resample_float(*args), area_resample(*args)


@pytest.mark.parametrize(
    ("p", "q", "shape"), [(3, 2, (41, 37, 3)), (2, 1, (30, 25)), (7, 4, (23, 29, 3)), (501, 250, (6, 5, 3))]
)
def test_area_resample_equals_repeat_then_block_mean(p: int, q: int, shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(p * q).integers(0, 256, shape, dtype=np.uint8)
    expected = reference_resample(image, p, q)
    out_size = (expected.shape[1], expected.shape[0])
    value, rounded = resample_whole(image, p / q, out_size)
    np.testing.assert_allclose(value, expected, rtol=0, atol=1e-9)
    for channel in range(rounded.shape[2] if rounded.ndim == 3 else 1):
        pick = (..., channel) if rounded.ndim == 3 else (...,)
        assert_matches_rounded(rounded[pick], expected[pick])


@pytest.mark.parametrize("scale", [1.5, 2.004, 1 / 0.499, 3.7, 4.0])
def test_crop_with_global_offset_equals_window_of_whole_image(scale: float) -> None:
    image = np.random.default_rng(3).integers(0, 256, (190, 230, 3), dtype=np.uint8)
    frame = (resampled_length(230, scale), resampled_length(190, scale))
    patch = 32
    # windows inside the frame, straddling its edges and running past it (as the last grid tiles do)
    windows = [(0, 0), (5, 3), (17, 29), (frame[0] - patch, frame[1] - patch), (frame[0] - 9, frame[1] - 20)]
    far = (frame[0] + patch, frame[1] + patch)
    whole_value, whole = resample_whole(image, scale, far)
    for x, y in windows:
        x0, x1 = source_span(x, patch, scale)
        y0, y1 = source_span(y, patch, scale)
        crop = white_padded(image, max(x1, 230), max(y1, 190))[y0:y1, x0:x1]
        value = area_resample_float(crop, scale, (x0, y0), (x, y), (patch, patch))
        np.testing.assert_array_equal(value, whole_value[y : y + patch, x : x + patch], err_msg=f"float at {(x, y)}")
        tile = area_resample(crop, scale, (x0, y0), (x, y), (patch, patch))
        np.testing.assert_array_equal(tile, whole[y : y + patch, x : x + patch], err_msg=f"tile at {(x, y)}")


def test_scale_one_is_identity() -> None:
    image = np.random.default_rng(5).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    np.testing.assert_array_equal(area_resample(image, 1.0, (0, 0), (0, 0), (50, 40)), image)
    window = area_resample(image, 1.0, (100, 200), (107, 211), (20, 15))
    np.testing.assert_array_equal(window, image[11:26, 7:27])
    value = area_resample_float(image, 1.0, (100, 200), (107, 211), (20, 15))  # the weighted path gives the same
    np.testing.assert_array_equal(value, image[11:26, 7:27].astype(np.float64))


def test_lengths_spans_and_a_crop_that_does_not_cover() -> None:
    assert [resampled_length(n, 1.5) for n in (1, 2, 3, 1000, 999, 650)] == [1, 2, 2, 667, 666, 434]
    assert resampled_length(2220, 1 / 0.499) == math.ceil(2220 * 0.499)
    assert source_span(0, 4, 1.5) == (0, 6) and source_span(3, 4, 1.5) == (4, 11)
    image = np.zeros((10, 10), np.uint8)
    with pytest.raises(ValueError, match="does not cover"):
        area_resample(image, 1.5, (1, 0), (0, 0), (4, 4))
    with pytest.raises(ValueError, match="scale must be > 0"):
        area_resample_float(image, 0.0, (0, 0), (0, 0), (4, 4))
