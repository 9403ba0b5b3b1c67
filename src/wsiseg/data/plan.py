"""The run's plan: which slides are processed (each with its read level, grid and tissue tiles), which are kept from
an earlier run (resume) and which cannot be processed, and why.

Built once per process, before prediction starts, and handed to the parts that need it (the data module reads the
planned tiles, the module weighs their count, the writer stitches and reports them); nothing changes it afterwards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from wsiseg.data.datasets import SlideTiles

__all__ = ["RunPlan"]


@dataclass(frozen=True)
class RunPlan:
    """What one run does with its slides.

    Attributes:
        slides: slides to process, in ``data.slides`` order (dataset indices run over them in this order).
        failed: ``(path, one-line reason)`` of slides that cannot be processed (skipped).
        resumed: ``(path, output name)`` of slides whose outputs are complete for this config (``resume=true``).
    """

    slides: tuple[SlideTiles, ...] = ()
    failed: tuple[tuple[Path, str], ...] = ()
    resumed: tuple[tuple[Path, str], ...] = ()

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
