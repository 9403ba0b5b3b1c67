"""``PatchWriter``: Lightning hooks routing patch-folder predictions to plain parts, as the slide writer does: pieces
into whole images (:class:`~wsiseg.writers.patch_stitcher.PatchStitcher`), images into PNGs
(:mod:`~wsiseg.writers.patch_outputs`) on background writers (:class:`~wsiseg.writers.worker.OrderedWorker`), rows and
the run's ``report.json`` through a :class:`~wsiseg.writers.run_record.RunRecord` with the same config hash.
``resume=true`` is the one rule that keeps complete outputs (the entry point hands the data module
:meth:`PatchOutputs.is_complete`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from wsiseg.atomic import remove_leftovers
from wsiseg.data.patch_images import PatchImage
from wsiseg.data.patches import PatchPlan
from wsiseg.writers._batch import as_ints
from wsiseg.writers.patch_outputs import (
    HEATMAP_SUFFIX,
    MASK_SUFFIX,
    PatchOutputs,
    PatchWriterOptions,
    patch_outputs,
    patch_writer_options,
    write_image_outputs,
)
from wsiseg.writers.patch_stitcher import PatchStitcher, probabilities_to_mask
from wsiseg.writers.run_record import RunRecord
from wsiseg.writers.worker import OrderedWorker

__all__ = ["PatchWriter", "PatchOutputs", "PatchWriterOptions", "patch_writer_options", "HEATMAP_SUFFIX", "MASK_SUFFIX"]

log = logging.getLogger(__name__)

# images that may wait per writer thread (bounds the host memory their pixels and masks hold)
_PENDING_PER_WRITER = 4


class PatchWriter(BasePredictionWriter):
    """Writes ``<key>_heatmap.png`` (and ``<key>_mask.png``) for every image of a :class:`PatchPlan`.

    ``<key>`` is the input's path relative to ``data.input_dir`` without its extension, so sub-folders are mirrored
    under ``output_dir``. Outputs have the input's size (image px): single-piece images are cropped back from their
    padding, larger ones blended from their tiles with ``blend`` weights. Each file is written atomically and carries
    the run's config hash (PNG text ``wsiseg:config``). Images the plan keeps (``resume=true``) are reported as
    skipped; unreadable inputs are reported by name and fail; the others are written. At the end ``report.json``
    (counts, wall time, images/s, one row per image) is written to ``output_dir`` and a summary is logged.

    Args:
        output_dir: output folder (the Hydra run folder by default).
        plan: the run's plan (:meth:`wsiseg.data.patches.PatchFolderDataModule.plan_run`).
        run_config: the composed config (set by the entry point); its hash is stored in each output and the report.
        provenance: what produced the outputs (versions, the weights and their SHA-256), stored in the report.
        options: masks, overlay, blending and writer threads (:func:`patch_writer_options`).

    Raises:
        UserInputError: an option outside its allowed values (the message names it).

    Example::

        plan = datamodule.plan_run(module.stride)
        trainer = Trainer(callbacks=[PatchWriter("out/", plan=plan, mask=True)])
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    """

    options_signature = staticmethod(patch_writer_options)  # what ``**options`` takes (checked from the config)

    def __init__(
        self,
        output_dir: str | Path,
        plan: PatchPlan,
        run_config: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(write_interval="batch")
        self.options = patch_writer_options(**options)
        self.outputs = patch_outputs(output_dir, self.options, run_config)
        self.plan, self.output_dir = plan, self.outputs.output_dir
        self.record = RunRecord(self.output_dir, run_config, provenance, hash=self.outputs.hash)
        self.results = self.record.rows
        self.report: dict[str, Any] = {}
        self._stitcher = PatchStitcher(plan.images, self.options.blending)
        self._writers: list[OrderedWorker] = []
        self._handed = 0  # images handed to the writers: dealt to them in turn
        self._started = 0.0
        self._batch_size = 0  # the largest batch seen

    @staticmethod
    def outputs_for(output_dir: str | Path, run_config: dict[str, Any] | None = None, **options: Any) -> PatchOutputs:
        """The outputs' naming and hash for these options (checked: UserInputError naming the ``writer.*`` key),
        without building a writer: the entry point calls it with ``cfg.writer`` before any image is read."""
        return patch_outputs(output_dir, patch_writer_options(**options), run_config)

    # -- Lightning hooks (setup and teardown run even when every image is kept and no batch is predicted) ---------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._started = time.perf_counter()
        self._stitcher, self.report = PatchStitcher(self.plan.images, self.options.blending), {}
        self.record.rows.clear()
        self._handed, self._batch_size = 0, 0
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if removed := remove_leftovers(self.output_dir):  # a killed run's half-written PNGs
            log.info("removed %d temporary file(s) an interrupted run left in %s", removed, self.output_dir)
        self._writers = [
            OrderedWorker(self._write, max_pending=_PENDING_PER_WRITER, name=f"wsiseg-write-{n}")
            for n in range(self.options.write_workers)
        ]
        for path, reason in self.plan.failed:
            self._row(path, "failed", 0, 0.0, reason)
        for index in self.plan.kept:
            image = self.plan.images[index]
            self._row(image.path, "skipped", 0, 0.0, "resumed: complete outputs kept", image)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        probs = prediction["probs"].float().cpu().numpy()
        pixels = batch["image"].cpu().numpy() if self.options.overlay else None
        images, pieces = as_ints(prediction["slide_index"]), as_ints(prediction["tile_index"])
        errors = prediction.get("error") or [""] * len(images)
        finite = prediction["finite"].cpu().tolist()
        self._batch_size = max(self._batch_size, len(images))
        for index in self._stitcher.add_batch(probs, pixels, images, pieces, errors, finite):
            self._finish(index)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for index in self._stitcher.unfinished():  # only when the loop stopped early (e.g. limit_predict_batches)
            state = self._stitcher.states[index]
            total = len(self.plan.images[index].origins)
            state.error = state.error or f"only {state.pieces} of {total} piece(s) were predicted"
            self._finish(index)
        self._close_writers()
        self._write_report()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_writers(exception)

    # -- helpers -------------------------------------------------------------------------------------------------
    def _close_writers(self, error: BaseException | None = None) -> None:
        """Let the writers finish the images queued (with ``error``, the run is failing: skip them) and stop; without,
        re-raise what a writer raised beyond an image's own failure."""
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.close(error=error)
        if error is None:
            for writer in writers:
                writer.raise_error()

    def _finish(self, index: int) -> None:
        """Turn one image's gathered predictions into its mask and hand it to a writer thread (or write it here)."""
        image = self.plan.images[index]
        state = self._stitcher.take(index)
        probs = None if state.error else state.prediction()
        if probs is None:
            self._fail(image, state.error or "no prediction arrived", state.pieces, state.started)
            return
        mask, labels = probabilities_to_mask(probs)
        rgb = state.rgb if self.options.overlay else None
        if not self._writers:
            self._write(index, state.started, rgb, mask, labels)
            return
        self._writers[self._handed % len(self._writers)].submit(index, state.started, rgb, mask, labels)
        self._handed += 1

    def _write(self, index: int, started: float, rgb: np.ndarray | None, mask: np.ndarray, labels: bool) -> None:
        """Write one image's PNGs and record its row; a failed write fails that image alone."""
        image = self.plan.images[index]
        try:
            write_image_outputs(self.outputs, image, rgb, mask, labels, self.options.opacity)
        except Exception as exc:
            self._fail(image, f"image '{image.path}': writing outputs failed: {exc}", 0, started)
            return
        self._row(image.path, "done", len(image.origins), time.perf_counter() - started, "", image)

    def _fail(self, image: PatchImage, reason: str, pieces: int, started: float) -> None:
        for path in self.outputs.paths(image).values():  # stale outputs of an earlier run must not look complete
            path.unlink(missing_ok=True)
        log.error("%s; skipped", reason)
        self._row(image.path, "failed", pieces, time.perf_counter() - started, reason, image)

    def _row(
        self, path: Path, outcome: str, pieces: int, seconds: float, reason: str, image: PatchImage | None = None
    ) -> None:
        """One result row; ``status`` is ``complete`` for done and skipped (predict's exit status reads it)."""
        self.record.add_row(
            path,
            "failed" if outcome == "failed" else "complete",
            name=None if image is None else image.key,
            tiles=pieces,
            seconds=round(seconds, 4),
            reason=reason,
            image=image.rel if image is not None else _relative(path, self.plan.input_dir),
            outcome=outcome,
            heatmap=None if image is None or outcome == "failed" else image.key + HEATMAP_SUFFIX,
        )

    def _write_report(self) -> None:
        wall = max(time.perf_counter() - self._started, 1e-9)
        self.results.sort(key=lambda row: row["image"])
        outcomes = Counter(row["outcome"] for row in self.results)
        done, skipped, failed = outcomes["done"], outcomes["skipped"], outcomes["failed"]
        report_path = self.record.write_run_report(
            {
                "input_dir": str(self.plan.input_dir),
                "output_dir": str(self.output_dir),
                "images": done + skipped + failed,
                "done": done,
                "skipped": skipped,
                "failed": failed,
                "ignored_outputs": len(self.plan.ignored),
                "pieces": sum(row["tiles"] for row in self.results if row["outcome"] == "done"),
                "wall_time_s": round(wall, 3),
                "images_per_s": round(done / wall, 2),
                "patch_size": self.plan.patch_size,
                "batch_size": self._batch_size or None,
                "mask": self.options.mask,
            }
        )
        self.report = self.record.run_report
        failures = [f"  {row['image']}: {row['reason']}" for row in self.results if row["outcome"] == "failed"]
        log.info(
            "patches: %d image(s): %d done, %d skipped (outputs complete), %d failed in %.1f s (%.1f images/s) -> %s%s",
            self.report["images"],
            done,
            skipped,
            failed,
            wall,
            self.report["images_per_s"],
            report_path,
            "".join(f"\n{line}" for line in (["failed:", *failures] if failures else [])),
        )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
