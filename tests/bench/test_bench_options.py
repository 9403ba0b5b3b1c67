"""The ``bench`` config section of wsiseg-bench (:mod:`wsiseg.bench.options`), checked when built."""

from __future__ import annotations

import pytest


def test_bench_section_is_checked_when_built() -> None:
    """``bench`` is a structured section (``BenchOptions``): a bad value is one line naming the key."""
    from wsiseg.bench.options import BenchOptions
    from wsiseg.errors import UserInputError

    with pytest.raises(UserInputError, match=r"bench.max_tiles must be a positive integer, got 0"):
        BenchOptions(max_tiles=0)
    with pytest.raises(UserInputError, match=r"bench.ddp_ranks must list rank counts >= 1"):
        BenchOptions(ddp_ranks=[2, 0])
    assert BenchOptions(ddp_ranks=[1, 2]).naive_tiles == 128
