"""data.shard: the slide assignment and the auto rule are pure functions of the planned tile counts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from wsiseg.data.sharding import SLIDES_PER_RANK, assign_slides, choose_shard, tiles_of_rank
from wsiseg.errors import UserInputError


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_assignment_covers_every_slide_once_and_balances_within_the_largest_slide(seed: int, world: int) -> None:
    rng = np.random.default_rng(seed)
    counts = [int(c) for c in rng.integers(0, 500, size=int(rng.integers(world, 40)))]
    ranks = assign_slides(counts, world)
    flat = sorted(itertools.chain.from_iterable(ranks))
    assert flat == list(range(len(counts)))
    assert all(r == sorted(r) for r in ranks)  # each rank runs its slides in data.slides order
    load = [sum(counts[i] for i in r) for r in ranks]
    assert max(load) - min(load) <= max(counts)
    assert assign_slides(counts, world) == ranks  # deterministic: every rank derives the same assignment


def test_longest_first_greedy_on_a_small_example() -> None:
    # 24 -> r0, 19 -> r1, 18 -> r1, 17 -> r0, 14 -> r1: loads 41 / 51
    assert assign_slides([17, 14, 18, 24, 19], 2) == [[0, 3], [1, 2, 4]]


@pytest.mark.parametrize(
    ("counts", "world", "expected"),
    [
        ([10] * 4, 2, "slides"),  # 2 slides per rank, none above a rank's share
        ([10] * 3, 2, "tiles"),  # fewer than SLIDES_PER_RANK slides per rank
        ([100, 10, 10, 10], 2, "tiles"),  # one slide holds more than a rank's share (65)
        ([1000], 4, "tiles"),
        ([5, 5], 1, "slides"),  # one rank: nothing to share
    ],
)
def test_auto_rule(counts: list[int], world: int, expected: str) -> None:
    assert SLIDES_PER_RANK == 2
    assert choose_shard("auto", counts, world) == expected
    assert choose_shard("tiles", counts, world) == ("slides" if world == 1 else "tiles")


def test_unknown_mode_is_one_line() -> None:
    with pytest.raises(UserInputError, match="data.shard must be one of auto, slides, tiles; got 'nodes'"):
        choose_shard("nodes", [1, 2], 2)


@pytest.mark.parametrize("mode", ["slides", "tiles"])
def test_tiles_of_rank_partition_the_dataset(mode: str) -> None:
    counts = [3, 0, 7, 5, 2]
    starts = [0, 3, 3, 10, 15]
    per_rank = [tiles_of_rank(mode, starts, counts, r, 3) for r in range(3)]
    assert sorted(itertools.chain.from_iterable(per_rank)) == list(range(17))
    if mode == "tiles":  # Lightning's unrepeated split: rank r takes r, r + world, ...
        assert per_rank[1] == list(range(1, 17, 3))
    else:  # whole slides, each rank's in slide order
        for indices, slides in zip(per_rank, assign_slides(counts, 3)):
            assert indices == [i for s in slides for i in range(starts[s], starts[s] + counts[s])]


def test_slides_with_fewer_slides_than_ranks_shares_tiles() -> None:
    """A resumed ``data.shard=slides`` run with 1 slide left for 2 ranks (the red team's kill -9 of rank 0) shares
    that slide's tiles instead of refusing the run."""
    assert choose_shard("slides", [7], 2) == "tiles"
    assert choose_shard("slides", [7, 0, 0], 2) == "tiles"  # slides without tissue give a rank nothing either
    assert choose_shard("slides", [7, 3], 2) == "slides"
