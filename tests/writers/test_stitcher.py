"""The stitcher on its own: tiles (output px) into per-slide stores, without Lightning."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.writers.conftest import dense, planned_slide
from wsiseg.errors import UserInputError
from wsiseg.writers.mosaic import TileMosaic
from wsiseg.writers.stitcher import Stitcher, StoreOptions
from wsiseg.writers.store import BlendingAccumulator


def tile_values(slide_tiles: int, patch: int) -> np.ndarray:
    """A distinct constant probability per tile: (N, 1, patch, patch) float32."""
    return np.stack([np.full((1, patch, patch), (i + 1) / (slide_tiles + 1), np.float32) for i in range(slide_tiles)])


def test_tiles_without_overlap_land_at_their_origins_in_a_uint8_mosaic(tmp_path: Path) -> None:
    slide = planned_slide("a", size=(200, 150), patch=64, output_downsample=2)
    stitcher = Stitcher([slide], tmp_path, output_downsample=2)
    n = slide.tiles_tissue
    probs = tile_values(n, 32)  # output px: 64 / 2
    stitcher.add_batch(probs, [0] * n, list(range(n)), [""] * n, [True] * n, batch_started=1.5)
    state = stitcher.state(0)
    assert isinstance(state.store, TileMosaic) and state.started == 1.5
    assert state.tiles_seen == set(range(n)) and state.duplicates == 0
    mask = dense(state.store)[0]
    assert mask.shape == (75, 100)  # ceil(150 / 2), ceil(200 / 2)
    for i, (x, y) in enumerate(slide.origins):
        expected = round(255 * float(probs[i, 0, 0, 0]))
        block = mask[y // 2 : y // 2 + 32, x // 2 : x // 2 + 32]
        assert np.all(block == expected), (i, x, y)


def test_overlapping_tiles_blend_and_repeats_errors_and_foreign_tiles_are_not_blended(tmp_path: Path) -> None:
    slide = planned_slide("b", size=(100, 64), patch=64, overlap=28)  # two tiles sharing 28 px
    assert [tuple(o) for o in slide.origins] == [(0, 0), (36, 0)]
    stitcher = Stitcher([slide], tmp_path, options=StoreOptions(blend="none"))
    ones, zeros = np.ones((1, 1, 64, 64), np.float32), np.zeros((1, 1, 64, 64), np.float32)
    stitcher.add_batch(np.concatenate([ones, zeros]), [0, 0], [0, 1], ["", ""], [True, True], 0.0)
    stitcher.add_batch(zeros, [0], [0], [""], [True], 0.0)  # tile 0 again: a duplicate, not blended
    stitcher.add_batch(zeros, [0], [1], [""], [False], 0.0)  # another rank's tile
    state = stitcher.state(0)
    assert isinstance(state.store, BlendingAccumulator) and not isinstance(state.store, TileMosaic)
    assert state.duplicates == 2 and state.tiles_seen == {0, 1} and not state.error
    row = dense(state.store)[0, 10]
    np.testing.assert_allclose(row[:36], 1.0)
    np.testing.assert_allclose(row[36:64], 0.5)  # plain average where the two tiles overlap
    np.testing.assert_allclose(row[64:], 0.0)
    stitcher.add_batch(ones[:1], [0], [1], ["tile at (36, 0) unreadable"], [True], 0.0)
    assert state.error == "tile at (36, 0) unreadable"


def test_partial_stores_of_two_ranks_merge_into_the_single_process_result(tmp_path: Path) -> None:
    slide = planned_slide("c", size=(160, 96), patch=64, overlap=32)
    n = slide.tiles_tissue
    rng = np.random.default_rng(3)
    probs = rng.random((n, 1, 64, 64)).astype(np.float32)
    single = Stitcher([slide], tmp_path / "single")
    single.add_batch(probs, [0] * n, list(range(n)), [""] * n, [True] * n, 0.0)
    ranks = [Stitcher([slide], tmp_path / "ddp", rank=r) for r in (0, 1)]
    for r, stitcher in enumerate(ranks):
        mine = [i % 2 == r for i in range(n)]
        stitcher.add_batch(probs, [0] * n, list(range(n)), [""] * n, mine, 0.0)
    ranks[1].save_partial(0)
    assert ranks[0].merge_partial(0, 1) == 0  # no tile blended by both
    merged = ranks[0].state(0)
    assert merged.tiles_seen == set(range(n)) and merged.tiles_per_rank == [n - n // 2]
    np.testing.assert_allclose(dense(merged.store), dense(single.state(0).store), rtol=1e-6, atol=1e-6)
    assert not ranks[0].partial_dir(0, 1).exists()


def test_release_deletes_the_store_and_scratch(tmp_path: Path) -> None:
    slide = planned_slide("d")
    stitcher = Stitcher([slide], tmp_path, options=StoreOptions(chunk=32, cache_bytes=1))  # spills to disk
    n = slide.tiles_tissue
    stitcher.add_batch(tile_values(n, 64), [0] * n, list(range(n)), [""] * n, [True] * n, 0.0)
    (stitcher.slide_dir(0) / ".scratch").mkdir()
    stitcher.release(0)
    assert [p.name for p in stitcher.slide_dir(0).iterdir()] == []


def test_unknown_blend_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="writer.blend must be one of none, linear, gaussian; got 'cubic'"):
        StoreOptions(blend="cubic")


@pytest.mark.parametrize(
    ("overlap", "tissue", "most_chunks"), [(16, 1.0, 192 + 2), (16, 0.7, 192 + 2), (24, 0.2, 2 * 192)]
)
def test_a_camelyon_wide_strip_in_raster_order_never_reads_a_spilled_chunk_back(
    tmp_path: Path, overlap: int, tissue: float, most_chunks: int
) -> None:
    """98,000 × 4,096 px at output downsample 1 (512 px tiles, overlap 256, 512 px chunks, a 128 MiB budget of 64
    chunks) scaled down 16× on each axis: the same 192 chunks a row, 8 chunk rows and 64-chunk budget. With all tiles
    or a random tissue subset, none is re-read, and the cache holds one chunk row and the tile's two chunks (not the
    two chunk rows a tile row spans); at a smaller step (tiles 4 steps high), at most two chunk rows."""
    slide = planned_slide("strip", size=(98000 // 16, 4096 // 16), patch=32, overlap=overlap)
    keep = np.random.default_rng(0).random(slide.tiles_tissue) < tissue
    slide = replace(slide, origins=slide.origins[keep])
    chunk_bytes = 2 * 32 * 32 * 4  # one sum plane and the weight plane, float32
    stitcher = Stitcher([slide], tmp_path, options=StoreOptions(chunk=32, cache_bytes=64 * chunk_bytes))
    n = slide.tiles_tissue
    tiles = np.random.default_rng(1).random((32, 1, 32, 32), dtype=np.float32).astype(np.float16)
    for start in range(0, n, 32):
        count = min(32, n - start)
        stitcher.add_batch(
            tiles[:count], [0] * count, list(range(start, start + count)), [""] * count, [True] * count, 0
        )
    store = stitcher.state(0).store
    assert store.chunk_grid == (8, 192)
    stats = store.stats()
    assert stats["reloads"] == 0 and 64 < stats["cache_chunks"] <= most_chunks
    assert stats["evictions"] == len(store.touched) - len(store._cache)  # the finished chunks are spilled, once each
