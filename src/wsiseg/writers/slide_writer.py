"""``SlideWriter``: the Lightning callback that routes predicted tiles to the stitcher and finished slides to output
rendering and the run record.

It holds no geometry, rendering or bookkeeping of its own: :mod:`~wsiseg.writers.stitcher` blends tiles into per-slide
stores, :mod:`~wsiseg.writers.render` writes ``mask.tif``/``heatmap.png``/contours, :mod:`~wsiseg.writers.run_record`
writes ``report.json``/``summary.json``, and :mod:`~wsiseg.writers.distribution` decides which rank blends which tile
and which rank writes which slide.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from wsiseg.contours import contour_formats
from wsiseg.data.plan import RunPlan
from wsiseg.errors import UserInputError
from wsiseg.writers._batch import as_ints, to_host_async
from wsiseg.writers.distribution import Distribution, SingleProcess, distribution_for
from wsiseg.writers.render import OUTPUT_FILES, RenderOptions
from wsiseg.writers.run_record import RunRecord, check_writable, remove_stale
from wsiseg.writers.slide_outputs import write_slide
from wsiseg.writers.stitcher import Stitcher, StoreOptions
from wsiseg.writers.worker import OrderedWorker

__all__ = ["SlideWriter"]

log = logging.getLogger(__name__)


class SlideWriter(BasePredictionWriter):
    """Stitches tile predictions of ``plan``'s slides into ``output_dir/<slide name>/`` outputs.

    A slide is written (``mask.tif``, ``heatmap.png``, contours, then ``report.json``, each atomically) as soon as all
    its tiles have arrived (one process) or after the ranks' partial stores are merged (DDP); ``summary.json`` follows
    at the end, and also when the run is interrupted.

    Args:
        output_dir: run folder; one sub-folder per slide.
        plan: the run's plan (slides to stitch, skipped and resumed ones), built by the entry point.
        blend: ``none`` | ``linear`` | ``gaussian`` (see :func:`wsiseg.data.grid.blend_window`).
        output_downsample: read-level px per mask px (the module pools on the device by the same factor).
        sigma_scale: Gaussian width relative to the tile side (``blend=gaussian``).
        threshold: probability at or above which a pixel counts as tumour (area, contours), in (0, 1].
        chunk: store chunk side, output px; a multiple of ``2 × tiff_tile``.
        cache_mb: memory for store chunks held in RAM, MiB.
        tiff_tile: TIFF tile side, px; a multiple of 16.
        compression: lossless TIFF compression, ``zlib`` or ``zstd``.
        heatmap_max_side: longer side of ``heatmap.png``.
        run_config: the composed config, stored in each report (its hash decides what ``resume=true`` keeps).
        contours: ``geojson`` and/or ``asap_xml`` (list or comma-separated), or None / ``none``.
        min_area_um2: contour regions smaller than this are dropped (µm², or level-0 px² without mpp).
        blend_thread: blend on a background thread (``true``) or between batches (``false``); ``auto``: a thread on
            GPUs (the host blends while the device runs), none on CPUs (the network's threads use every core).
        provenance: what produced the outputs (versions, weights and their SHA-256), copied into each report.

    Raises:
        UserInputError: an option outside its allowed values (the message names it), or an unwritable output folder.

    Example::

        writer = SlideWriter("outputs/run", plan=plan, blend="gaussian")
        Trainer(callbacks=[writer]).predict(module, datamodule=dm, return_predictions=False)
    """

    def __init__(
        self,
        output_dir: str | Path,
        plan: RunPlan,
        blend: str = "gaussian",
        output_downsample: int = 1,
        sigma_scale: float = 0.125,
        threshold: float = 0.5,
        chunk: int = 512,
        cache_mb: int = 128,
        tiff_tile: int = 256,
        compression: str = "zlib",
        heatmap_max_side: int = 2048,
        run_config: dict[str, Any] | None = None,
        contours: str | list[str] | None = None,
        min_area_um2: float = 0.0,
        blend_thread: bool | str = "auto",
        provenance: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.store, self.render = self.options(
            blend,
            sigma_scale,
            chunk,
            cache_mb,
            threshold,
            tiff_tile,
            compression,
            heatmap_max_side,
            contours,
            min_area_um2,
            blend_thread,
        )
        self.output_dir, self.plan = Path(output_dir), plan
        check_writable(self.output_dir)
        self.output_downsample, self.blend_thread = output_downsample, blend_thread
        self.record = RunRecord(self.output_dir, run_config, provenance)
        self.results = self.record.rows
        self._distribution: Distribution = SingleProcess()
        self._stitcher = Stitcher(list(plan.slides), self.output_dir, output_downsample, self.store)
        self._owned: set[int] | None = None
        self._finished: set[int] = set()
        self._in_order = 0
        self._worker: OrderedWorker | None = None
        self._batch_clock, self._batch_size = time.perf_counter(), 0

    @staticmethod
    def options(
        blend: str = "gaussian",
        sigma_scale: float = 0.125,
        chunk: int = 512,
        cache_mb: int = 128,
        threshold: float = 0.5,
        tiff_tile: int = 256,
        compression: str = "zlib",
        heatmap_max_side: int = 2048,
        contours: str | list[str] | None = None,
        min_area_um2: float = 0.0,
        blend_thread: bool | str = "auto",
        **_: Any,
    ) -> tuple[StoreOptions, RenderOptions]:
        """The writer's options checked (UserInputError naming the ``writer.*`` key), without building a writer: the
        entry point calls it with ``cfg.writer`` before any slide is opened."""
        if blend_thread not in ("auto", True, False):
            raise UserInputError(f"writer.blend_thread must be auto, true or false; got '{blend_thread}'")
        render = RenderOptions(
            threshold, tiff_tile, compression, heatmap_max_side, contour_formats(contours), float(min_area_um2)
        )
        if chunk % (2 * tiff_tile):
            raise UserInputError(
                f"writer.chunk ({chunk}) must be a multiple of 2 x writer.tiff_tile ({tiff_tile}), e.g. "
                f"{2 * tiff_tile * max(1, round(chunk / (2 * tiff_tile)))}"
            )
        return StoreOptions(blend, sigma_scale, chunk, cache_mb << 20), render

    def _begin(self, distribution: Distribution) -> None:
        self._distribution = distribution
        self._stitcher = Stitcher(
            list(self.plan.slides), self.output_dir, self.output_downsample, self.store, distribution.rank
        )
        self.record.rows.clear()
        self._finished, self._batch_clock = set(), time.perf_counter()
        self._in_order = 0  # slides before this index are written (one process: tiles arrive in slide order)
        for path, reason in self.plan.failed:
            self.record.add_row(path, "skipped", reason=reason)
        for path, name in self.plan.resumed:
            self.record.add_row(path, "complete", name=name, reason="resumed: complete outputs kept")
        if distribution.rank == 0:  # before any rank writes (under DDP the claiming all-gather is the barrier)
            for index in range(len(self.plan.slides)):
                remove_stale(self._stitcher.slide_dir(index))

    # -- Lightning hooks -----------------------------------------------------------------------------------------
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(distribution_for(trainer))
        self._owned = self._distribution.claim(trainer)
        on_cpu = trainer.strategy.root_device.type == "cpu"
        inline = not self.blend_thread if self.blend_thread != "auto" else on_cpu
        self._worker = None if inline else OrderedWorker(self._blend)

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
        probs, ready = to_host_async(prediction["probs"])
        slides, tiles = as_ints(prediction["slide_index"]), as_ints(prediction["tile_index"])
        errors = list(prediction.get("error") or [""] * len(slides))
        owned, indices = self._owned, list(batch_indices) if batch_indices is not None else [None] * len(slides)
        mine = [owned is None or i is None or i in owned for i in indices]
        self._batch_size = max(self._batch_size, len(slides))
        # A slide's clock starts with the batch holding its first tile (read and computed before it reaches here).
        started, self._batch_clock = self._batch_clock, time.perf_counter()
        if self._worker is None:
            self._blend(probs, ready, slides, tiles, errors, mine, started)
        else:
            self._worker.submit(probs, ready, slides, tiles, errors, mine, started)

    def _blend(self, probs: Any, ready: Any, slides: list[int], *rest: Any) -> None:
        if ready is not None:
            ready.synchronize()  # the device-to-host copy of this batch has landed
        self._stitcher.add_batch(probs.numpy(), slides, *rest)
        if self._distribution.in_slide_order and slides:
            while self._in_order < max(slides):  # tiles arrive in slide order: every earlier slide is complete
                self._finish(self._in_order)
                self._in_order += 1

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker.raise_error()
            self._worker = None
        for index in self._distribution.slides_to_write(self._stitcher, trainer):
            self._finish(index)
        self._distribution.written(trainer)
        if self._distribution.rank == 0:
            self.record.write_summary()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Stop blending, drop this rank's partial stores of unfinished slides (finished ones stay; ``resume=true``
        redoes the rest) and, on rank 0, write ``summary.json`` with the unfinished slides as ``interrupted``."""
        if self._worker is not None:
            self._worker.close(timeout=60, error=exception)
            self._worker = None
        unfinished = [i for i in range(len(self.plan.slides)) if i not in self._finished]
        for index in unfinished:
            self._stitcher.release(index)
        if self._distribution.rank != 0:
            return
        for index in unfinished:  # a slide stopped while its files were written: no report, so none of them stays
            slide_dir = self._stitcher.slide_dir(index)
            if not (slide_dir / "report.json").exists():
                for name in OUTPUT_FILES:
                    (slide_dir / name).unlink(missing_ok=True)
                remove_stale(slide_dir)
        started = [self.plan.slides[i].name for i in unfinished if i in self._stitcher.states]
        if started:
            log.error(
                "interrupted (%s): unfinished slide(s) %s left without outputs",
                type(exception).__name__,
                ", ".join(started),
            )
        reason = f"interrupted ({type(exception).__name__}) before this slide was written"
        for slide in (self.plan.slides[i] for i in unfinished):
            self.record.add_row(slide.path, "interrupted", name=slide.name, reason=reason)
        self.record.write_summary()

    def write_without_tiles(self) -> None:
        """Write every planned slide when no slide has a tissue tile (Lightning runs no predict hooks then): each
        gets an all-background mask, heatmap and report."""
        self._begin(SingleProcess())
        for index in range(len(self.plan.slides)):
            self._finish(index)
        self.record.write_summary()

    def _finish(self, index: int) -> None:
        """Write slide ``index``'s outputs and report once, then free its store."""
        if index in self._finished:
            return
        try:
            write_slide(
                self.plan.slides[index],
                self._stitcher.state(index),
                self._stitcher.slide_dir(index),
                self.record,
                self.render,
                output_downsample=self.output_downsample,
                blend=self.store.blend,
                world_size=self._distribution.world,
                batch_size=self._batch_size or None,
                position=f"{index + 1}/{len(self.plan.slides)}",
            )
        finally:
            self._stitcher.release(index)
        self._finished.add(index)  # only now: interrupted while writing, the slide counts as unfinished
        pending = [s for i, s in enumerate(self.plan.slides) if i not in self._finished]
        self.record.write_summary(pending=pending)  # summary.json describes the run at every moment
