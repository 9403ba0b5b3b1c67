"""The patch stitcher on its own: pieces (image px) into whole-image predictions, without Lightning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsiseg.data.grid import blend_window
from wsiseg.data.patch_images import PatchImage, plan_pieces
from wsiseg.writers.patch_stitcher import PatchStitcher, probabilities_to_mask
from wsiseg.writers.stitcher import StoreOptions


def planned_image(name: str, size: tuple[int, int], patch: int = 64, overlap: int = 0) -> PatchImage:
    """An image of ``size`` (W, H) image px cut as patch mode cuts it (pieces padded to multiples of 16)."""
    origins, piece = plan_pieces(size, patch, overlap, 16)
    return PatchImage(Path(f"/in/{name}.png"), f"{name}.png", name, size, origins, piece, 0.0, "1:1")


def pieces_of(image: PatchImage, values: np.ndarray, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (K, C, h, w) maps and (K, 3, h, w) pixels of every piece of ``image``, cut from whole-image ``values``
    (C, H, W) and ``pixels`` (H, W, 3), padded past the edge (values 0, pixels white)."""
    h, w = image.piece
    channels, height, width = values.shape
    maps, rgbs = [], []
    for x, y in image.origins.tolist():
        tile = np.zeros((channels, h, w), np.float32)
        rgb = np.full((h, w, 3), 255, np.uint8)
        crop = values[:, y : y + h, x : x + w]
        tile[:, : crop.shape[1], : crop.shape[2]] = crop
        rgb[: crop.shape[1], : crop.shape[2]] = pixels[y : y + h, x : x + w]
        maps.append(tile)
        rgbs.append(rgb.transpose(2, 0, 1))
    return np.stack(maps), np.stack(rgbs)


def test_a_single_piece_is_cropped_back_from_its_padding() -> None:
    image = planned_image("small", (50, 30))
    assert image.piece == (32, 64) and not image.tiled
    rng = np.random.default_rng(0)
    values = rng.random((1, 30, 50), dtype=np.float32)
    pixels = rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)
    maps, rgbs = pieces_of(image, values, pixels)
    stitcher = PatchStitcher([image], StoreOptions("gaussian"))
    assert stitcher.add_batch(maps, rgbs, [0], [0], [""], [True]) == [0]
    state = stitcher.take(0)
    assert not state.error and state.pieces == 1 and stitcher.unfinished() == []
    np.testing.assert_array_equal(state.prediction(), values)
    np.testing.assert_array_equal(state.rgb, pixels)


def test_overlapping_tiles_blend_to_the_weighted_mean_with_the_slide_writers_weights() -> None:
    """Against a direct float64 computation of the weighted mean over the same tiles, and the pixels reassembled."""
    image = planned_image("big", (150, 100), patch=64, overlap=16)
    assert image.tiled and len(image.origins) == 6
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (100, 150, 3), dtype=np.uint8)
    maps = rng.random((len(image.origins), 1, 64, 64), dtype=np.float32)  # each tile its own values: they differ
    _, rgbs = pieces_of(image, np.zeros((1, 100, 150), np.float32), pixels)
    options = StoreOptions("gaussian", 0.2)
    window = blend_window(64, "gaussian", 0.2)
    sums, weights = np.zeros((100, 150)), np.zeros((100, 150))
    for (x, y), tile in zip(image.origins.tolist(), maps):
        h, w = min(64, 100 - y), min(64, 150 - x)
        sums[y : y + h, x : x + w] += window[:h, :w] * tile[0, :h, :w]
        weights[y : y + h, x : x + w] += window[:h, :w]

    stitcher = PatchStitcher([image], options)
    order = [5, 0, 3, 1, 4, 2]  # any order, over two batches
    assert stitcher.add_batch(maps[order[:3]], rgbs[order[:3]], [0] * 3, order[:3], [""] * 3, [True] * 3) == []
    assert stitcher.unfinished() == [0]
    assert stitcher.add_batch(maps[order[3:]], rgbs[order[3:]], [0] * 3, order[3:], [""] * 3, [True] * 3) == [0]
    state = stitcher.take(0)
    np.testing.assert_allclose(state.prediction()[0], sums / weights, rtol=1e-5)
    np.testing.assert_array_equal(state.rgb, pixels)
    assert options.window(64) is options.window(64)  # one array per size, shared by every store
    np.testing.assert_array_equal(options.window(64), window)


def test_errors_fail_their_image_alone() -> None:
    """A read error, a non-finite map and a map of the wrong size each fail their image with its own reason; the
    first error of an image is kept, and the other images are stitched."""
    broken, bad_map = planned_image("a", (100, 64)), planned_image("b", (40, 40))
    wrong, clean = planned_image("c", (40, 40)), planned_image("d", (40, 40))
    assert len(broken.origins) == 2 and wrong.piece == clean.piece == (48, 48)
    stitcher = PatchStitcher([broken, bad_map, wrong, clean], StoreOptions("none"))
    tiles = np.zeros((2, 1, 64, 64), np.float32)
    assert stitcher.add_batch(tiles, None, [0, 1], [0, 0], ["cannot be decoded", ""], [True, False]) == [1]
    assert stitcher.take(1).error == (
        "image '/in/b.png': the network output NaN/infinite values for piece 0: check the checkpoint, model.mean/std "
        "and trainer.precision (float16 can overflow)"
    )
    assert stitcher.add_batch(tiles, None, [0, 2], [1, 0], ["", ""], [True, True]) == [0, 2]
    state = stitcher.take(0)
    assert state.error == "cannot be decoded" and state.pieces == 2
    assert stitcher.take(2).error == (
        "image '/in/c.png': the model returned 64x64 px for a 48x48 piece: patch mode needs model.output_downsample=1"
    )
    assert stitcher.add_batch(np.ones((1, 1, 48, 48), np.float32), None, [3], [0], [""], [True]) == [3]
    state = stitcher.take(3)
    assert not state.error and state.rgb is None
    np.testing.assert_array_equal(state.prediction(), np.ones((1, 40, 40), np.float32))
    assert not stitcher.states


@pytest.mark.parametrize(
    ("probs", "mask", "labels"),
    [
        (np.array([[[0.0, 0.2, 0.5, 1.2, -0.3]]], np.float32), [[0, 51, 128, 255, 0]], False),
        (np.array([[[0.1, 0.7]], [[0.6, 0.2]], [[0.3, 0.1]]], np.float32), [[1, 0]], True),
    ],
)
def test_mask_rounds_half_to_even_and_clips_or_takes_the_largest_channel(
    probs: np.ndarray, mask: list[list[int]], labels: bool
) -> None:
    got, got_labels = probabilities_to_mask(probs)
    assert got.dtype == np.uint8 and got.tolist() == mask and got_labels is labels
