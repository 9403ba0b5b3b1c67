from pathlib import Path

import numpy as np

from wsiseg.writers.store import BlendingAccumulator


def dense(accumulator: BlendingAccumulator) -> np.ndarray:
    width, height = accumulator.size
    out = np.zeros((accumulator.channels, height, width), np.float32)
    for y0, rows, chunks in accumulator.band_chunks():
        for x0, mean, _ in chunks:
            out[:, y0 : y0 + rows, x0 : x0 + mean.shape[2]] = mean
    return out


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
