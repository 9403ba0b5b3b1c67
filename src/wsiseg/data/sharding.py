"""How a run's tiles are shared between DDP ranks (``data.shard``): pure functions of the plan's tile counts.

* ``slides`` — each rank gets whole slides, balanced by planned tile count (longest first, each to the rank with the
  fewest tiles so far), and runs its slides in ``data.slides`` order; it writes each one itself when it is done.
* ``tiles`` — every slide's tiles are spread over all ranks (index ``i`` to rank ``i mod world``, as Lightning's
  predict sampler does) and rank 0 merges and writes every slide at the end: for one or a few huge slides.
* ``auto`` — ``slides`` when there are at least :data:`SLIDES_PER_RANK` slides per rank and no slide holds more than a
  rank's fair share of the tiles (``total / world``), else ``tiles``. With greedy balancing, the ranks' tile counts
  then differ by at most the largest slide, which is at most one rank's share.
"""

from __future__ import annotations

from collections.abc import Sequence

from wsiseg.errors import UserInputError

__all__ = ["SHARD_MODES", "SLIDES_PER_RANK", "assign_slides", "choose_shard", "tiles_of_rank"]

SHARD_MODES = ("auto", "slides", "tiles")
SLIDES_PER_RANK = 2  # auto shards by slide from this many slides per rank


def choose_shard(mode: str, tile_counts: Sequence[int], world: int) -> str:
    """``slides`` or ``tiles`` for a run of slides with ``tile_counts`` tiles each on ``world`` ranks (see the module
    docstring for ``auto``). One rank always runs ``slides`` (there is nothing to share); ``slides`` with fewer slides
    holding tiles than ranks runs ``tiles`` (a rank without a slide would be idle, and Lightning would wait for it:
    a resumed run with any number of ranks finishes what is left)."""
    if mode not in SHARD_MODES:
        raise UserInputError(f"data.shard must be one of {', '.join(SHARD_MODES)}; got '{mode}'")
    if world <= 1:
        return "slides"
    counts = [int(c) for c in tile_counts]
    if mode == "slides":
        # fewer slides with tiles than ranks (a resumed run's remainder, say) would leave a rank idle: share tiles
        return "slides" if sum(1 for c in counts if c) >= world else "tiles"
    if mode != "auto":
        return mode
    total = sum(counts)
    if len(counts) >= SLIDES_PER_RANK * world and max(counts, default=0) * world <= total:
        return "slides"
    return "tiles"


def assign_slides(tile_counts: Sequence[int], world: int) -> list[list[int]]:
    """Slide indices per rank, each rank's in ascending (``data.slides``) order: longest slide first to the rank with
    the fewest planned tiles so far (ties: the lower rank; equal slides: the earlier one). Deterministic, so every rank
    computes the same assignment from the same plan."""
    load = [0] * world
    ranks: list[list[int]] = [[] for _ in range(world)]
    for index in sorted(range(len(tile_counts)), key=lambda i: (-int(tile_counts[i]), i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        ranks[rank].append(index)
        load[rank] += int(tile_counts[index])
    return [sorted(indices) for indices in ranks]


def tiles_of_rank(
    mode: str, slide_starts: Sequence[int], tile_counts: Sequence[int], rank: int, world: int
) -> list[int]:
    """Dataset indices rank ``rank`` predicts, in the order it predicts them. ``slide_starts[i]`` is slide ``i``'s
    first dataset index (slides are contiguous in the dataset). ``slides``: its slides' tiles in slide order;
    ``tiles``: every ``world``-th index from ``rank`` (Lightning's unrepeated predict split)."""
    total = sum(int(c) for c in tile_counts)
    if mode == "tiles":
        return list(range(rank, total, world))
    mine = assign_slides(tile_counts, world)[rank]
    return [i for s in mine for i in range(int(slide_starts[s]), int(slide_starts[s]) + int(tile_counts[s]))]
