"""Progress of a slide run on Lightning's bar: :class:`TileProgressBar` counts tiles (rate and ETA in tiles, the
slide being read in its description); :class:`SlideProgress` adds, under DDP, the slides every rank has written."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

__all__ = ["SlideProgress", "TileProgressBar"]


class TileProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting this rank's tiles instead of batches: ``slide 3/12 name: 45%|... 1234/2741
    [00:31<00:38, 39.61tile/s]``. A batch is a few seconds on a CPU; counted in batches the rate read ``0.00it/s`` and
    there was no ETA.

    Args:
        slide_names: the run's slides' output names (the batches' ``slide_index`` indexes them).
    """

    def __init__(self, slide_names: Sequence[str]) -> None:
        super().__init__()
        self.slide_names = list(slide_names)
        self._tiles = 0

    def init_predict_tqdm(self) -> Any:
        bar = super().init_predict_tqdm()
        bar.unit = "tile"
        return bar

    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self.has_dataloader_changed(dataloader_idx):
            return
        loader: Any = trainer.predict_dataloaders
        loader = loader[dataloader_idx] if isinstance(loader, (list, tuple)) else loader
        self.predict_progress_bar.reset()
        self.predict_progress_bar.total = len(loader.dataset)  # this rank's tiles (the data module shards slides)
        self.predict_progress_bar.initial = 0
        self._tiles = 0

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        indices = batch.get("slide_index") if isinstance(batch, dict) else None
        if indices is None or self.predict_progress_bar is None:
            return super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        indices = indices.tolist() if hasattr(indices, "tolist") else list(indices)
        self._tiles += len(indices)
        bar = self.predict_progress_bar
        if self._should_update(self._tiles, bar.total):
            slide = int(indices[-1])
            bar.set_description(f"slide {slide + 1}/{len(self.slide_names)} {self.slide_names[slide]}", refresh=False)
            bar.n = self._tiles
            bar.refresh()
        return None


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
