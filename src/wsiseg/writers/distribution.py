"""Who blends and who writes which slide when several processes predict: one small interface, one class per way of
sharing the work.

* :class:`SingleProcess` — one process sees every tile, in slide order: a slide is complete as soon as a tile of a
  later slide arrives, and is written then.
* :class:`TileSharded` — DDP with Lightning's predict sampler spreading the tiles of every slide over the ranks: each
  rank blends the tiles it owns into its own partial store; at the end rank 0 adds the partial stores and writes every
  slide.

A strategy that shards by slide (each rank writes whole slides) is another class with the same four methods.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import lightning.pytorch as pl

from wsiseg.writers.stitcher import Stitcher

__all__ = ["Distribution", "SingleProcess", "TileSharded", "distribution_for"]

log = logging.getLogger(__name__)


class Distribution(Protocol):
    """How the ranks share a run's tiles and slides."""

    rank: int
    world: int
    in_slide_order: bool  # tiles arrive in slide order, so a slide is complete once a later one starts

    def claim(self, trainer: pl.Trainer) -> set[int] | None:
        """Dataset indices this rank blends (None: every index it is handed)."""
        ...

    def slides_to_write(self, stitcher: Stitcher, trainer: pl.Trainer) -> list[int]:
        """At the end of prediction: make every slide's store complete where it will be written; return the slide
        indices this rank writes."""
        ...

    def written(self, trainer: pl.Trainer) -> None:
        """After this rank wrote its slides: wait for the others where needed."""
        ...


class SingleProcess:
    """One process: it blends and writes everything."""

    rank, world, in_slide_order = 0, 1, True

    def claim(self, trainer: pl.Trainer) -> set[int] | None:
        return None

    def slides_to_write(self, stitcher: Stitcher, trainer: pl.Trainer) -> list[int]:
        return list(range(len(stitcher.slides)))

    def written(self, trainer: pl.Trainer) -> None:
        return None


class TileSharded:
    """DDP: each tile is blended by exactly one rank (the lowest rank whose sampler yields it); rank 0 merges the
    partial stores and writes every slide.

    Lightning's predict sampler (``UnrepeatedDistributedSampler``) gives each index to exactly one rank; claiming makes
    blending correct even with a sampler that repeats indices (e.g. a padding ``DistributedSampler``) and reports
    indices no rank will see.
    """

    in_slide_order = False

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def claim(self, trainer: pl.Trainer) -> set[int] | None:
        import torch.distributed as dist

        loader: Any = trainer.predict_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        sampler = loader.batch_sampler.sampler if loader.batch_sampler is not None else loader.sampler
        mine = [int(i) for i in sampler]
        gathered: list[list[int] | None] = [None] * self.world
        dist.all_gather_object(gathered, mine)
        owner: dict[int, int] = {}
        for rank, indices in enumerate(gathered):
            for index in indices or []:
                owner.setdefault(index, rank)
        total = len(loader.dataset)
        repeated = sum(len(indices or []) for indices in gathered) - len(owner)
        if repeated:
            log.warning("the predict sampler hands %d tile(s) to more than one rank; each is blended once", repeated)
        if len(owner) != total:
            raise RuntimeError(f"the predict sampler leaves {total - len(owner)} of {total} tiles to no rank")
        return {index for index, rank in owner.items() if rank == self.rank}

    def slides_to_write(self, stitcher: Stitcher, trainer: pl.Trainer) -> list[int]:
        slides = range(len(stitcher.slides))
        for index in slides:
            stitcher.save_partial(index)
        trainer.strategy.barrier("wsiseg-merge")
        if self.rank != 0:
            return []
        for index in slides:
            state = stitcher.state(index)
            state.tiles_per_rank = [len(state.tiles_seen)]
            for rank in range(1, self.world):
                shared = stitcher.merge_partial(index, rank)
                if shared:
                    log.warning("slide %s: %d tile(s) predicted on several ranks", stitcher.slides[index].name, shared)
        return list(slides)

    def written(self, trainer: pl.Trainer) -> None:
        trainer.strategy.barrier("wsiseg-written")


def distribution_for(trainer: pl.Trainer) -> SingleProcess | TileSharded:
    """The strategy for ``trainer``'s world: one process, or tiles sharded over the DDP ranks."""
    if trainer.world_size > 1:
        return TileSharded(trainer.global_rank, trainer.world_size)
    return SingleProcess()
