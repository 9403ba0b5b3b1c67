"""The chunked stores on their own: blending arithmetic, rounding to uint8, spills, merges and the chunk cache."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.writers.conftest import dense
from wsiseg.data.grid import blend_window
from wsiseg.writers import store as store_module
from wsiseg.writers.mosaic import TileMosaic
from wsiseg.writers.store import BlendingAccumulator, probabilities_to_u8


def test_weighted_mean_across_chunks_and_edges_with_a_tiny_cache(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    size = (70, 50)
    acc = BlendingAccumulator(tmp_path / "acc", 2, size, chunk=16, cache_bytes=1)  # evicts on every new chunk
    sums = np.zeros((2, 50, 70))
    weights = np.zeros((50, 70))
    for x0, y0 in [(0, 0), (20, 10), (50, 30), (60, 45), (5, 40)]:
        values = rng.random((2, 24, 24)).astype(np.float32)
        w = rng.random((24, 24)).astype(np.float32) + 0.1
        acc.add(x0, y0, values, w)
        h, wd = min(24, 50 - y0), min(24, 70 - x0)
        sums[:, y0 : y0 + h, x0 : x0 + wd] += values[:, :h, :wd] * w[:h, :wd]
        weights[y0 : y0 + h, x0 : x0 + wd] += w[:h, :wd]
    expected = np.divide(sums, weights, out=np.zeros_like(sums), where=weights > 0)
    np.testing.assert_allclose(dense(acc), expected, rtol=1e-5, atol=1e-6)
    untouched = {(cy, cx) for cy in range(4) for cx in range(5)} - acc.touched
    assert untouched, "chunks no tile touched are never created"


def test_merging_partial_accumulators_adds_up(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tiles = [((x, y), rng.random((1, 16, 16)).astype(np.float32)) for x in (0, 8, 24) for y in (0, 12)]
    window = np.linspace(0.1, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    whole = BlendingAccumulator(tmp_path / "whole", 1, (40, 28), chunk=16)
    rank0 = BlendingAccumulator(tmp_path / "r0", 1, (40, 28), chunk=16)
    rank1 = BlendingAccumulator(tmp_path / "r1", 1, (40, 28), chunk=16)
    for i, ((x, y), values) in enumerate(tiles):
        whole.add(x, y, values, window)
        (rank0 if i % 2 == 0 else rank1).add(x, y, values, window)
    rank1.flush()
    rank0.merge_from(tmp_path / "r1")
    np.testing.assert_allclose(dense(rank0), dense(whole), rtol=1e-6, atol=1e-7)


def test_tile_mosaic_keeps_rounded_probabilities_of_disjoint_tiles(tmp_path: Path) -> None:
    """No-overlap grids: each pixel is round(255·p) of the one tile that covers it (saturated to 0-255, float16 tiles
    as the module sends them), edge tiles cropped, chunks evicted and read back."""
    rng = np.random.default_rng(2)
    size = (70, 50)
    mosaic = TileMosaic(tmp_path / "m", size, chunk=16, cache_bytes=1)  # evicts on every new chunk
    expected = np.zeros((50, 70), np.uint8)
    for y0 in range(0, 50, 24):
        for x0 in range(0, 70, 24):
            if (x0, y0) == (24, 24):
                continue  # a tile with no tissue: stays background
            probs = rng.uniform(-0.2, 1.2, (1, 24, 24)).astype(np.float16)
            mosaic.add(x0, y0, probs, np.ones((24, 24), np.float32))
            h, w = min(24, 50 - y0), min(24, 70 - x0)
            expected[y0 : y0 + h, x0 : x0 + w] = np.clip(np.rint(probs[0, :h, :w].astype(np.float32) * 255), 0, 255)
    out = np.zeros((50, 70), np.uint8)
    for y0, rows, chunks in mosaic.band_chunks():
        for x0, values, covered in chunks:
            assert values.dtype == np.uint8 and covered is None
            out[y0 : y0 + rows, x0 : x0 + values.shape[2]] = values[0]
    np.testing.assert_array_equal(out, expected)


def test_tile_mosaics_of_two_ranks_merge_into_the_whole(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tiles = [((x, y), rng.random((1, 12, 12)).astype(np.float32)) for x in (0, 12, 24) for y in (0, 12)]
    ones = np.ones((12, 12), np.float32)
    whole, rank0, rank1 = (TileMosaic(tmp_path / n, (36, 24), chunk=16) for n in ("whole", "r0", "r1"))
    for i, ((x, y), values) in enumerate(tiles):
        whole.add(x, y, values, ones)
        (rank0 if i % 2 == 0 else rank1).add(x, y, values, ones)
    rank0.add(*tiles[1][0], tiles[1][1], ones)  # a tile predicted on both ranks: same value twice
    rank1.flush()
    rank0.merge_from(tmp_path / "r1")
    as_dense = [
        {(y0, x0): v.copy() for y0, _, chunks in m.band_chunks() for x0, v, _ in chunks} for m in (rank0, whole)
    ]
    assert as_dense[0].keys() == as_dense[1].keys()
    for key in as_dense[1]:
        np.testing.assert_array_equal(as_dense[0][key], as_dense[1][key])


def _raster_tiles(size: tuple[int, int], tile: int, step: int) -> list[tuple[int, int]]:
    """Tile origins (output px) covering ``size`` (W, H) in raster order; the last row and column run past the edge."""
    xs = list(range(0, max(1, size[0] - tile + step), step))
    ys = list(range(0, max(1, size[1] - tile + step), step))
    return [(x, y) for y in ys for x in xs]


@pytest.mark.parametrize("opencv_float16", [True, False], ids=["opencv-f16", "numpy-cast"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_blending_equals_a_float64_reference_and_todays_float32_arithmetic_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: type, channels: int, opencv_float16: bool
) -> None:
    """Overlapping tiles (gaussian and random weights) over chunk and image edges, partial edge tiles, a cache of one
    chunk's budget: the weighted mean is the float64 one to float32 rounding, and bit for bit what numpy's float32
    ``sums += values.astype(float32) * weights`` then ``sums / weights`` gives (the arithmetic before issue 27), so
    uint8 masks are unchanged too."""
    monkeypatch.setattr(store_module, "_OPENCV_FLOAT16", opencv_float16 and store_module._OPENCV_FLOAT16)
    rng = np.random.default_rng(channels)
    size, tile = (157, 101), 48  # W, H: neither a multiple of the chunk nor of the step
    acc = BlendingAccumulator(tmp_path / "acc", channels, size, chunk=32, cache_bytes=1, row_step=20)
    sums64 = np.zeros((channels, size[1], size[0]))
    weights64 = np.zeros((size[1], size[0]))
    sums32 = np.zeros((channels, size[1], size[0]), np.float32)
    weights32 = np.zeros((size[1], size[0]), np.float32)
    windows = [blend_window(tile, "gaussian"), rng.random((tile, tile), dtype=np.float32) + 0.01]
    for i, (x0, y0) in enumerate(_raster_tiles(size, tile, 20)):
        values = rng.uniform(-0.1, 1.1, (channels, tile, tile)).astype(dtype)
        window = windows[i % 2]
        acc.add(x0, y0, values, window)
        h, w = min(tile, size[1] - y0), min(tile, size[0] - x0)
        v, wt = values[:, :h, :w], window[:h, :w]
        sums64[:, y0 : y0 + h, x0 : x0 + w] += v.astype(np.float64) * wt
        weights64[y0 : y0 + h, x0 : x0 + w] += wt
        sums32[:, y0 : y0 + h, x0 : x0 + w] += v.astype(np.float32) * wt[None]
        weights32[y0 : y0 + h, x0 : x0 + w] += wt
    assert acc.stats()["reloads"] == 0 and acc.stats()["evictions"] > 0
    expected64 = sums64 / weights64
    expected32 = np.zeros_like(sums32)
    np.divide(sums32, weights32[None], out=expected32, where=weights32[None] > 0)
    got = dense(acc)
    np.testing.assert_allclose(got, expected64, rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(got, expected32)
    for c in range(channels):
        np.testing.assert_array_equal(probabilities_to_u8(got[c]), _u8_before_issue_27(expected32[c]))


def _u8_before_issue_27(probs: np.ndarray) -> np.ndarray:
    """``probabilities_to_u8`` as it was written before issue 27."""
    return cv2.convertScaleAbs(np.maximum(probs.astype(np.float32, copy=False), 0.0), alpha=255.0)


@pytest.mark.parametrize("opencv_float16", [True, False], ids=["opencv-f16", "numpy-cast"])
def test_probabilities_to_u8_rounds_as_before_for_every_float16_and_float32_ties(
    monkeypatch: pytest.MonkeyPatch, opencv_float16: bool
) -> None:
    """Every float16 (NaN, ±inf, subnormals, negatives included), and float32 values on and a few ulps around each
    rounding tie ``(k + 0.5) / 255``."""
    monkeypatch.setattr(store_module, "_OPENCV_FLOAT16", opencv_float16 and store_module._OPENCV_FLOAT16)
    every_half = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(256, 256)
    np.testing.assert_array_equal(probabilities_to_u8(every_half), _u8_before_issue_27(every_half))
    ties = ((np.arange(-2, 258) + 0.5) / 255).astype(np.float32)
    near, up, down = [ties], ties, ties
    for _ in range(3):
        up, down = np.nextafter(up, np.float32(2)), np.nextafter(down, np.float32(-2))
        near += [up, down]
    singles = np.concatenate([*near, np.float32([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, 3.0])])
    singles = np.concatenate([singles, np.random.default_rng(5).uniform(-0.5, 1.5, 4096 - singles.size)])
    singles = singles.astype(np.float32).reshape(64, 64)
    np.testing.assert_array_equal(probabilities_to_u8(singles), _u8_before_issue_27(singles))
    out, scratch = np.zeros((64, 128), np.uint8), np.empty((64, 64), np.float32)
    probabilities_to_u8(singles, out=out[:, 64:], scratch=scratch)  # into views, as TileMosaic writes its chunks
    np.testing.assert_array_equal(out[:, 64:], _u8_before_issue_27(singles))
    assert not out[:, :64].any()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_tile_mosaic_of_float16_and_float32_tiles_equals_the_rounded_probabilities(tmp_path: Path, dtype: type) -> None:
    rng = np.random.default_rng(7)
    size, tile = (101, 75), 20
    mosaic = TileMosaic(tmp_path / "m", size, chunk=32, cache_bytes=1)
    expected = np.zeros((size[1], size[0]), np.uint8)
    for x0, y0 in _raster_tiles(size, tile, tile):
        probs = rng.uniform(-0.2, 1.2, (1, tile, tile)).astype(dtype)
        mosaic.add(x0, y0, probs, np.ones((tile, tile), np.float32))
        h, w = min(tile, size[1] - y0), min(tile, size[0] - x0)
        expected[y0 : y0 + h, x0 : x0 + w] = _u8_before_issue_27(probs[0, :h, :w])
    assert mosaic.stats()["reloads"] == 0
    out = np.zeros_like(expected)
    for y0, rows, chunks in mosaic.band_chunks():
        for x0, values, _ in chunks:
            out[y0 : y0 + rows, x0 : x0 + values.shape[2]] = values[0]
    np.testing.assert_array_equal(out, expected)


def test_a_cache_the_memory_cap_cannot_widen_keeps_the_budget_warns_once_and_counts_reloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(store_module, "CACHE_SHARE_OF_AVAILABLE", 0.0)
    acc = BlendingAccumulator(tmp_path / "acc", 1, (400, 96), chunk=16, cache_bytes=4 * 2 * 16 * 16 * 4)
    window = blend_window(32, "gaussian")
    with caplog.at_level(logging.WARNING, logger="wsiseg.writers.store"):
        for x0, y0 in _raster_tiles(acc.size, 32, 16):
            acc.add(x0, y0, np.full((1, 32, 32), 0.5, np.float16), window)
    assert [r.message.count("re-read from disk") for r in caplog.records] == [1]
    stats = acc.stats()
    assert stats["cache_chunks"] == 4 and stats["reloads"] > 0 and stats["evictions"] > stats["reloads"]
    np.testing.assert_array_equal(dense(acc), np.full((1, 96, 400), 0.5, np.float32))


@pytest.mark.parametrize(
    ("tile", "step", "chunk", "size"),
    [
        (32, 16, 32, (300, 140)),
        (32, 8, 16, (250, 100)),
        (24, 20, 32, (301, 133)),
        (16, 16, 64, (200, 150)),
        (48, 40, 16, (260, 150)),
        (20, 20, 32, (190, 90)),
    ],
)
@pytest.mark.parametrize("row_step", [True, False], ids=["row-step", "no-row-step"])
def test_raster_order_and_its_subsets_never_reload_a_chunk_whatever_the_geometry(
    tmp_path: Path, tile: int, step: int, chunk: int, size: tuple[int, int], row_step: bool
) -> None:
    """A one-chunk budget: the cache grows to the chunks the tiles keep open and no further than the chunk rows a tile
    row spans; every tile, or a sparse random subset, in raster order."""
    rng = np.random.default_rng(tile + step + chunk)
    origins = _raster_tiles(size, tile, step)
    window = np.ones((tile, tile), np.float32)
    spans = max((min(y + tile, size[1]) - 1) // chunk - y // chunk + 1 for _, y in origins)
    for share in (1.0, 0.3):
        acc = BlendingAccumulator(
            tmp_path / f"{share}", 1, size, chunk=chunk, cache_bytes=1, row_step=step if row_step else None
        )
        for x0, y0 in origins:
            if rng.random() < share:
                acc.add(x0, y0, np.ones((1, tile, tile), np.float16), window)
        stats = acc.stats()
        assert stats["reloads"] == 0 and stats["cache_chunks"] <= spans * acc.chunk_grid[1], (share, stats)


@pytest.mark.parametrize(
    ("mosaic", "channels"), [(False, 1), (False, 3), (True, 1)], ids=["blend1", "blend3", "mosaic"]
)
def test_final_on_pass_gives_the_masks_of_the_float_store_bit_for_bit(
    tmp_path: Path, channels: int, mosaic: bool
) -> None:
    """``final_on_pass``: chunks the raster order passed are kept as their final uint8 blocks (held within the budget,
    the rest spilled) instead of float32 planes, and weights are summed per chunk from the tile pieces it recorded
    (two windows alternating) instead of in a weight plane; every block equals the float store's read-back rounded
    as the mask is (round(255·p), or the label of the largest mean), chunk and image edges included."""
    rng = np.random.default_rng(7 + channels)
    size, tile, step = (157, 101), 48, 48 if mosaic else 20
    budget = 4 * 32 * 32  # four uint8 blocks; the float cache grows to the chunks the tiles keep open
    make = (
        (lambda path, final: TileMosaic(path, size, 32, budget, step, final))
        if mosaic
        else (lambda path, final: BlendingAccumulator(path, channels, size, 32, budget, step, final))
    )
    final, floats = make(tmp_path / "final", True), make(tmp_path / "floats", False)
    windows = [blend_window(tile, "gaussian"), rng.random((tile, tile), dtype=np.float32) + 0.01]
    for i, (x0, y0) in enumerate(_raster_tiles(size, tile, step)):
        values = rng.uniform(-0.1, 1.1, (channels, tile, tile)).astype(np.float16)
        final.add(x0, y0, values, windows[i % 2])
        floats.add(x0, y0, values, windows[i % 2])
    assert final.stats()["evictions"] > 3 and final.stats()["reloads"] == 0
    assert any(p.name.endswith(".final.npy") for p in (tmp_path / "final").iterdir()), "finals spilled past the budget"
    got = {(y0, x0): b.copy() for y0, _, blocks in final.final_blocks() for x0, b in blocks}
    expected = {(y0, x0): b.copy() for y0, _, blocks in floats.final_blocks() for x0, b in blocks}
    assert got.keys() == expected.keys() and len(got) == 4 * 5
    for key, block in expected.items():
        assert got[key].dtype == np.uint8 and np.array_equal(got[key], block), key
    if not mosaic:  # the float store's read-back, rounded as render_slide did before final_blocks
        again = make(tmp_path / "again", False)
        rng = np.random.default_rng(7 + channels)
        windows = [blend_window(tile, "gaussian"), rng.random((tile, tile), dtype=np.float32) + 0.01]
        for i, (x0, y0) in enumerate(_raster_tiles(size, tile, step)):
            values = rng.uniform(-0.1, 1.1, (channels, tile, tile)).astype(np.float16)
            again.add(x0, y0, values, windows[i % 2])
        for y0, _, chunks in again.band_chunks():
            for x0, mean, covered in chunks:
                u8 = probabilities_to_u8(mean[0]) if channels == 1 else np.where(covered, mean.argmax(0), 0)
                assert np.array_equal(got[(y0, x0)], u8.astype(np.uint8))


def test_final_on_pass_refuses_a_tile_out_of_raster_order_and_a_merge(tmp_path: Path) -> None:
    """A tile that reaches a chunk already made final cannot be blended any more: an error, not a wrong mask."""
    acc = BlendingAccumulator(tmp_path / "acc", 1, (96, 96), chunk=32, cache_bytes=1, row_step=32, final_on_pass=True)
    tile, window = np.ones((1, 32, 32), np.float32), np.ones((32, 32), np.float32)
    for y0 in (0, 32, 64):
        for x0 in (0, 32, 64):
            acc.add(x0, y0, tile, window)
    with pytest.raises(RuntimeError, match="raster order"):
        acc.add(0, 0, tile, window)
    with pytest.raises(RuntimeError, match="cannot be merged"):
        acc.flush()
