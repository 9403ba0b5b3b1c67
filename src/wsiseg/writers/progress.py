"""``SlideProgress``: under DDP, the cohort's progress on rank 0's progress bar (slides written by every rank)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

__all__ = ["SlideProgress"]


class SlideProgress(Callback):
    """Lightning's bar counts rank 0's own batches; under DDP this adds ``slides 12/400`` to it: how many of the run's
    slides any rank has written, counted from their ``report.json`` files (rank 0 cleared those of every redone slide
    at the start) at most every ``every_s`` seconds. Does nothing in one process or without a progress bar.

    Args:
        slide_dirs: the output folders of the run's slides (``output_dir/<slide name>``).
        every_s: seconds between two counts.
    """

    def __init__(self, slide_dirs: Sequence[Path], every_s: float = 2.0) -> None:
        self.slide_dirs, self.every_s = [Path(d) for d in slide_dirs], every_s
        self._last = 0.0

    def written(self) -> int:
        """Slides of the run with a report on disk."""
        return sum((folder / "report.json").is_file() for folder in self.slide_dirs)

    def on_predict_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.world_size <= 1 or trainer.global_rank != 0 or time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        bar = getattr(trainer.progress_bar_callback, "predict_progress_bar", None)
        if bar is not None:
            bar.set_postfix_str(f"slides {self.written()}/{len(self.slide_dirs)} written (all ranks)")
