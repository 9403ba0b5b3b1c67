from pathlib import Path

import numpy as np

from tests.writers.conftest import dense
from wsiseg.writers.store import BlendingAccumulator


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
    from wsiseg.writers.store import TileMosaic

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
    from wsiseg.writers.store import TileMosaic

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
