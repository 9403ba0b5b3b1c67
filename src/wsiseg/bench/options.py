"""The ``bench`` section of ``wsiseg-bench``'s config (``conf/bench.yaml``): what to time and on how many tiles."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from wsiseg.errors import UserInputError

__all__ = ["BenchOptions"]


@dataclass(frozen=True)
class BenchOptions:
    """The ``bench`` section of ``wsiseg-bench`` (its ``_target_``), checked on construction.

    Attributes:
        slide: the slide to time; None generates a synthetic one in the run folder.
        generated_size: side of the generated slide, px.
        seed: seed of the generated slide.
        max_tiles: tissue tiles every case runs on.
        naive_tiles: the naive loop runs on the first this many of them.
        model_batches: batches timed for the model bound.
        ddp_ranks: rank counts of the whole-run CPU DDP timings (e.g. ``[1, 2]``); empty: none.
        cohort_slides: the DDP timings run on this many generated slides (a cohort, for ``data.shard``); 0: the
            bench's slide.
        peers: also time the peers (MONAI's WSI pipeline) on the naive loop's tiles and weights; a peer that is not
            installed is skipped with a line saying so.
        host_bound: also run the pipeline with a zero-cost network (:mod:`wsiseg.bench.host`): the host's ceiling.

    Raises:
        UserInputError: one line naming the ``bench.*`` key.
    """

    slide: str | None = None
    generated_size: int = 20480
    seed: int = 3
    max_tiles: int = 512
    naive_tiles: int = 128
    model_batches: int = 16
    ddp_ranks: Sequence[int] = ()
    cohort_slides: int = 0
    peers: bool = True
    host_bound: bool = True

    def __post_init__(self) -> None:
        for key in ("generated_size", "max_tiles", "naive_tiles", "model_batches"):
            if int(getattr(self, key)) < 1:
                raise UserInputError(f"bench.{key} must be a positive integer, got {getattr(self, key)}")
        if any(int(r) < 1 for r in self.ddp_ranks):
            raise UserInputError(f"bench.ddp_ranks must list rank counts >= 1, got {list(self.ddp_ranks)}")
        if int(self.cohort_slides) < 0:
            raise UserInputError(f"bench.cohort_slides must be >= 0 (0: the bench slide), got {self.cohort_slides}")
