"""Who blends and who writes which slide when several processes predict: one small interface, one class per way of
sharing the work.

* :class:`SingleProcess` — one process sees every tile, in slide order: a slide is complete as soon as a tile of a
  later slide arrives, and is written then.
* :class:`SlideSharded` — DDP, ``data.shard=slides``: each rank predicts whole slides (its share of
  :meth:`wsiseg.data.plan.RunPlan.slides_of_rank`) in slide order and writes each one itself as soon as its tiles are
  in: no merge, no barrier per slide; at the end rank 0 gathers every rank's result rows for ``summary.json``.
* :class:`TileSharded` — DDP, ``data.shard=tiles``: the tiles of every slide spread over the ranks: each rank blends
  the tiles it owns into its own partial store; at the end rank 0 adds the partial stores and writes every slide.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import lightning.pytorch as pl

from wsiseg.data.plan import RunPlan
from wsiseg.writers.stitcher import Stitcher

__all__ = ["Distribution", "SingleProcess", "SlideSharded", "TileSharded", "distribution_for"]

log = logging.getLogger(__name__)


class Distribution(Protocol):
    """How the ranks share a run's tiles and slides."""

    rank: int
    world: int
    in_slide_order: bool  # tiles arrive in slide order, so a slide is complete once a later one starts
    mine: list[int]  # the slides this rank writes, in the order it writes them

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

    def gather(self, value: Any, trainer: pl.Trainer) -> list[Any]:
        """Every rank's ``value`` (picklable) in rank order, on every rank; the run's last meeting of the ranks."""
        ...


class SingleProcess:
    """One process: it blends and writes everything."""

    rank, world, in_slide_order = 0, 1, True

    def __init__(self, slides: int = 0) -> None:
        self.mine = list(range(slides))

    def gather(self, value: Any, trainer: pl.Trainer) -> list[Any]:
        return [value]

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

    def __init__(self, rank: int, world: int, slides: int) -> None:
        self.rank, self.world = rank, world
        self.mine = list(range(slides)) if rank == 0 else []

    def gather(self, value: Any, trainer: pl.Trainer) -> list[Any]:
        return all_gather(value, self.world)

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


class SlideSharded:
    """DDP with whole slides per rank: the rank's slides arrive in slide order, so each is written by this rank as soon
    as a tile of its next slide arrives (the last at the end); ranks meet only at the start (after rank 0 cleared what
    an earlier run left) and at the end (rows gathered for ``summary.json``)."""

    in_slide_order = True

    def __init__(self, rank: int, world: int, mine: list[int]) -> None:
        self.rank, self.world, self.mine = rank, world, list(mine)

    def claim(self, trainer: pl.Trainer) -> set[int] | None:
        trainer.strategy.barrier("wsiseg-start")  # rank 0 has cleared earlier outputs of every redone slide
        return None

    def slides_to_write(self, stitcher: Stitcher, trainer: pl.Trainer) -> list[int]:
        return list(self.mine)

    def written(self, trainer: pl.Trainer) -> None:
        return None  # the rows' gather is the only meeting at the end

    def gather(self, value: Any, trainer: pl.Trainer) -> list[Any]:
        return all_gather(value, self.world)


def all_gather(value: Any, world: int) -> list[Any]:
    """``value`` of every rank, in rank order (``torch.distributed.all_gather_object``)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def distribution_for(trainer: pl.Trainer, plan: RunPlan) -> SingleProcess | TileSharded | SlideSharded:
    """The strategy for ``trainer``'s world and ``plan``'s ``data.shard``: one process, whole slides per rank, or
    tiles of every slide over the ranks."""
    world, slides = trainer.world_size, len(plan.slides)
    if world <= 1:
        return SingleProcess(slides)
    if plan.shard_mode(world) == "slides":
        return SlideSharded(trainer.global_rank, world, plan.slides_of_rank(trainer.global_rank, world))
    return TileSharded(trainer.global_rank, world, slides)
