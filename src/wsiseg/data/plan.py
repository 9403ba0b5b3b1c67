"""The run's plan: which slides are processed (each with its read level, grid and tissue tiles), which are kept from
an earlier run (resume) and which cannot be processed, and why.

Built once per process, before prediction starts, and handed to the parts that need it (the data module reads the
planned tiles, the module weighs their count, the writer stitches and reports them); nothing changes it afterwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiseg.data.datasets import SlideTiles
from wsiseg.data.sharding import assign_slides, choose_shard, tiles_of_rank
from wsiseg.safe_paths import safe_output_name

__all__ = ["RunPlan", "output_names", "slide_identity"]

# Suffixes that belong together: "x.ome.tif" is slide "x", not "x.ome".
_DOUBLE_SUFFIXES = (".ome.tif", ".ome.tiff")


def _base_name(path: Path) -> str:
    name = path.name
    for suffix in _DOUBLE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return path.stem or name


def output_names(paths: Sequence[Path]) -> list[str]:
    """One output folder name per slide, unique within the run: the file name without its extension (``p.v1.svs`` →
    ``p.v1``; ``x.ome.tif`` → ``x``), made a plain folder name by :func:`wsiseg.safe_paths.safe_output_name` (``...svs``
    → ``slide``, ``summary.json.svs`` → ``summary.json-slide``); a name already taken gets ``-2``, ``-3``, … — never one
    that another slide's own name is, so ``[A/x.tif, B/x.tif, C/x-2.tif]`` become ``x``, ``x-3``, ``x-2``. The same list
    gives the same names."""
    natural = [safe_output_name(_base_name(Path(p))) for p in paths]
    counts: dict[str, int] = {}
    for name in natural:
        counts[name] = counts.get(name, 0) + 1
    reserved = {name for name, count in counts.items() if count == 1}  # names some slide has on its own
    taken: set[str] = set()
    names: list[str] = []
    for name in natural:
        candidate, n = name, 1
        while candidate in taken or (candidate != name and candidate in reserved):
            n += 1
            candidate = f"{name}-{n}"
        taken.add(candidate)
        names.append(candidate)
    return names


def slide_identity(path: Path) -> dict[str, Any]:
    """What a resumed run compares to know an output folder belongs to this very slide file: its absolute path, size
    in bytes and modification time (ns)."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@dataclass(frozen=True)
class RunPlan:
    """What one run does with its slides.

    Attributes:
        slides: slides to process, in ``data.slides`` order (dataset indices run over them in this order).
        failed: ``(path, one-line reason)`` of slides that cannot be processed (skipped).
        resumed: ``(path, output name)`` of slides whose outputs are complete for this config (``resume=true``).
        failed_names: output folder names of the ``failed`` slides (whatever an earlier run left there is cleared).
        shard: ``data.shard``: how DDP ranks share the slides (:mod:`wsiseg.data.sharding`); every rank derives the
            same assignment from the same plan (:meth:`shard_mode`, :meth:`slides_of_rank`, :meth:`tiles_of_rank`).
    """

    slides: tuple[SlideTiles, ...] = ()
    failed: tuple[tuple[Path, str], ...] = ()
    resumed: tuple[tuple[Path, str], ...] = ()
    failed_names: tuple[str, ...] = ()
    shard: str = "auto"

    def shard_mode(self, world: int) -> str:
        """``slides`` or ``tiles`` on ``world`` ranks (:func:`wsiseg.data.sharding.choose_shard`)."""
        return choose_shard(self.shard, [s.tiles_tissue for s in self.slides], world)

    def slides_of_rank(self, rank: int, world: int) -> list[int]:
        """Indices of the slides rank ``rank`` writes, in order: its share under ``slides``; under ``tiles`` rank 0
        writes every slide and the others none."""
        if self.shard_mode(world) == "slides":
            return assign_slides([s.tiles_tissue for s in self.slides], world)[rank]
        return self._all() if rank == 0 else []

    def tiles_of_rank(self, rank: int, world: int) -> list[int]:
        """Dataset indices rank ``rank`` predicts, in order (:func:`wsiseg.data.sharding.tiles_of_rank`)."""
        counts = [s.tiles_tissue for s in self.slides]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return tiles_of_rank(self.shard_mode(world), starts, counts, rank, world)

    def _all(self) -> list[int]:
        return list(range(len(self.slides)))

    @property
    def tiles(self) -> int:
        """Tissue tiles to predict, over all slides."""
        return sum(slide.tiles_tissue for slide in self.slides)

    def first_tiles(self, count: int) -> RunPlan:
        """The same plan keeping only the first ``count`` tiles over the slides (slide order, then raster order), e.g.
        for a benchmark."""
        kept: list[SlideTiles] = []
        remaining = count
        for slide in self.slides:
            kept.append(dataclasses.replace(slide, origins=slide.origins[: max(0, remaining)]))
            remaining -= kept[-1].tiles_tissue
        return dataclasses.replace(self, slides=tuple(kept))
