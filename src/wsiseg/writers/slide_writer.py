"""``SlideWriter``: Lightning hooks routing predicted tiles to the :mod:`~wsiseg.writers.stitcher`, finished slides to
:mod:`~wsiseg.writers.render` and the :mod:`~wsiseg.writers.run_record`; :mod:`~wsiseg.writers.distribution` decides
which rank blends which tile and writes which slide. It holds no geometry, rendering or bookkeeping of its own."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from wsiseg.data.plan import RunPlan
from wsiseg.writers._batch import as_ints, to_host_async
from wsiseg.writers.distribution import Distribution, SingleProcess, distribution_for
from wsiseg.writers.options import slide_writer_options
from wsiseg.writers.run_record import (
    RunRecord,
    check_writable,
    clear_outputs,
    discard_unreported,
    read_complete_report,
    remove_leftovers,
)
from wsiseg.writers.slide_outputs import write_slide
from wsiseg.writers.stitcher import Stitcher
from wsiseg.writers.worker import OrderedWorker

__all__ = ["SlideWriter"]


@contextmanager
def _sigchld_held() -> Iterator[None]:
    """Hold SIGCHLD back on the main thread for the block (a no-op elsewhere and where the platform cannot)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass
class _HostFigures:
    """Host time of one rank's run (:meth:`SlideWriter.host_figures`)."""

    blocked_s: float = 0.0
    stitch_cpu_s: float = 0.0
    finalise_cpu_s: float = 0.0
    finalise_s: list[float] = field(default_factory=list)


class SlideWriter(BasePredictionWriter):
    """Stitches tile predictions of ``plan``'s slides into ``output_dir/<slide name>/`` outputs.

    A slide is written (``mask.tif``, ``heatmap.png``, contours and ``report.json``, staged, then published at once:
    :func:`wsiseg.writers.slide_outputs.write_slide`) as soon as all
    its tiles have arrived (one process) or after the ranks' partial stores are merged (DDP); ``summary.json`` follows
    at the end, and also when the run is interrupted.

    Args:
        output_dir: run folder; one sub-folder per slide.
        plan: the run's plan (slides to stitch, skipped and resumed ones), built by the entry point.
        output_downsample: read-level px per mask px (the module pools on the device by the same factor).
        run_config: the composed config, stored in each report (its hash decides what ``resume=true`` keeps).
        provenance: what produced the outputs (versions, weights and their SHA-256), copied into each report.
        options: blending, rendering and threading (:func:`wsiseg.writers.options.slide_writer_options`).

    Raises:
        UserInputError: an option outside its allowed values (the message names it), or an unwritable output folder.

    Example::

        writer = SlideWriter("outputs/run", plan=plan, blend="gaussian")
        Trainer(callbacks=[writer]).predict(module, datamodule=dm, return_predictions=False)
    """

    options_signature = staticmethod(slide_writer_options)  # what ``**options`` takes (checked from the config)

    def __init__(
        self,
        output_dir: str | Path,
        plan: RunPlan,
        output_downsample: int = 1,
        run_config: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(write_interval="batch")
        checked = slide_writer_options(**options)
        self.store, self.render, self.blend_thread = checked.store, checked.render, checked.blend_thread
        check_writable(output_dir)
        self.output_dir, self.plan, self.output_downsample = Path(output_dir), plan, output_downsample
        self.record = RunRecord(self.output_dir, run_config, provenance)
        self.results = self.record.rows
        self._distribution: Distribution = SingleProcess(len(plan.slides))
        self._stitcher = Stitcher(list(plan.slides), self.output_dir, output_downsample, self.store, in_order=True)
        self._owned: set[int] | None = None
        self._finished: set[int] = set()
        self._seen_reports: set[int] = set()  # slides other ranks are known to have written (a report stays)
        self._in_order = 0
        self._worker: OrderedWorker | None = None  # blends batches (GPU runs)
        self._finaliser: OrderedWorker | None = None  # writes finished slides, beside the blending (GPU runs)
        self._host = _HostFigures()
        self._batch_clock, self._batch_size = time.perf_counter(), 0
        self._clock: dict[str, float] = {}  # this rank's unix times: start, first and last batch, done writing
        self._tiles_seen = 0

    def _begin(self, distribution: Distribution) -> None:
        self._distribution = distribution
        self._stitcher = Stitcher(
            list(self.plan.slides),
            self.output_dir,
            self.output_downsample,
            self.store,
            distribution.rank,
            in_order=distribution.in_slide_order,
        )
        self.record.start(self.plan)
        self._finished, self._seen_reports, self._batch_clock = set(), set(), time.perf_counter()
        self._clock, self._tiles_seen, self._host = {"start_at": time.time()}, 0, _HostFigures()
        self._cleaned_up = False  # set once on_exception (or after_failure) has recorded an interrupted run
        self._in_order = 0  # position in distribution.mine of the next slide to write (tiles arrive in slide order)
        if distribution.rank == 0:  # before any rank writes (under DDP the claiming all-gather is the barrier)
            for index in range(len(self.plan.slides)):  # redone: an earlier run's outputs must not look complete
                clear_outputs(self._stitcher.slide_dir(index), root=self.output_dir)
            for name in self.plan.failed_names:  # cannot be processed now: neither may theirs
                clear_outputs(self.output_dir / name, root=self.output_dir)
            for _, name in self.plan.resumed:  # kept: only what a killed run left beside their outputs goes
                remove_leftovers(self.output_dir / name, root=self.output_dir)
            self.record.write_summary(pending=self.plan.slides)  # summary.json describes this run from its start

    # -- Lightning hooks -----------------------------------------------------------------------------------------
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(distribution_for(trainer, self.plan))
        self._owned = self._distribution.claim(trainer)
        on_cpu = trainer.strategy.root_device.type == "cpu"
        inline = not self.blend_thread if self.blend_thread != "auto" else on_cpu
        self._worker = None if inline else OrderedWorker(self._blend)
        # at most one slide finalising at a time (and one more waiting): the memory of two finished slides' stores
        self._finaliser = None if inline else OrderedWorker(self._finish, max_pending=1, name="wsiseg-finalise")

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
        probs, _ = to_host_async(prediction["probs"])
        finite, ready = to_host_async(prediction["finite"])  # same stream, after probs: one event says both landed
        slides, tiles = as_ints(prediction["slide_index"]), as_ints(prediction["tile_index"])
        errors = list(prediction.get("error") or [""] * len(slides))
        owned, indices = self._owned, list(batch_indices) if batch_indices is not None else [None] * len(slides)
        mine = [owned is None or i is None or i in owned for i in indices]
        self._batch_size = max(self._batch_size, len(slides))
        self._tiles_seen += len(slides)
        self._clock.setdefault("first_batch_at", time.time())
        self._clock["last_batch_at"] = time.time()
        # A slide's clock starts with the batch holding its first tile (read and computed before it reaches here).
        started, self._batch_clock = self._batch_clock, time.perf_counter()
        if self._worker is None:
            self._blend(probs, finite, ready, slides, tiles, errors, mine, started)
        else:
            waiting = time.perf_counter()
            self._worker.submit(probs, finite, ready, slides, tiles, errors, mine, started)
            self._host.blocked_s += time.perf_counter() - waiting  # > 0 when the blend queue was full

    def _blend(
        self, probs: Any, finite: Any, ready: Any, slides: list[int], tiles: list[int], errors: list[str], *rest: Any
    ) -> None:
        if ready is not None:
            ready.synchronize()  # the device-to-host copy of this batch has landed
        cpu = time.thread_time()
        if not bool(finite.all()):
            errors = [
                error or self._not_finite(s, t, ok) for s, t, ok, error in zip(slides, tiles, finite.tolist(), errors)
            ]
        self._stitcher.add_batch(probs.numpy(), slides, tiles, errors, *rest)
        self._host.stitch_cpu_s += time.thread_time() - cpu
        mine = self._distribution.mine
        if self._distribution.in_slide_order and slides:
            # tiles arrive in slide order: every earlier slide of this rank is complete
            while self._in_order < len(mine) and mine[self._in_order] < max(slides):
                self._hand_over(mine[self._in_order])
                self._in_order += 1

    def _hand_over(self, index: int) -> None:
        """Slide ``index`` is complete: write it, on the finaliser thread when there is one (it then waits while an
        earlier slide is still being written, so at most one finalises)."""
        if self._finaliser is None:
            self._finish(index)
            return
        self._finaliser.submit(index)

    def _not_finite(self, slide_index: int, tile_index: int, finite: bool) -> str:
        """The error of a tile whose map is not finite (empty when it is): the slide then fails, naming the tile."""
        if finite:
            return ""
        slide = self.plan.slides[slide_index]
        x, y = (int(v) for v in slide.origins[tile_index])
        return (
            f"the network output NaN/infinite values for the tile at read-level ({x}, {y}) (level {slide.level.level}) "
            "of this slide: check the checkpoint, model.mean/std and trainer.precision (float16 can overflow)"
        )

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        workers = [w for w in (self._worker, self._finaliser) if w is not None]
        for worker in workers:  # blending first: it hands slides to the finaliser
            worker.close()
        self._stop_workers()
        for worker in workers:
            worker.raise_error()
        for index in self._distribution.slides_to_write(self._stitcher, trainer):
            self._finish(index)
        self._clock["done_at"] = time.time()  # this rank's work is done; from here it waits for the others
        self._distribution.written(trainer)
        everyone = self._distribution.gather((list(self.record.rows), self._rank_figures()), trainer)
        if self._distribution.rank == 0:
            end = time.time()
            # rank 0's rows hold the plan's skipped and resumed slides; each rank adds the slides it wrote
            own = [row for row in self.record.rows if row.get("rank") is None]
            self.record.rows[:] = own + [row for rows, _ in everyone for row in rows if row.get("rank") is not None]
            ranks = [
                {**figures, "idle_at_end_s": round(max(0.0, end - figures["done_at"]), 3)} for _, figures in everyone
            ]
            self.record.write_summary(ranks=ranks)

    def _stop_workers(self) -> None:
        self._worker = self._finaliser = None

    def host_figures(self) -> dict[str, Any]:
        """Where this rank's host time went, for the benchmark and ``summary.json``: ``blocked_s``, seconds the main
        loop waited to hand a batch to the blend thread (its queue was full); ``stitch_cpu_s``, CPU seconds spent
        blending tiles (on the blend thread, or between batches when blending inline); ``finalise_s``, wall seconds
        each written slide took to finalise (pyramid, heatmap, contours, report), in the order written, and
        ``finalise_cpu_s``, the CPU seconds of the thread that finalised them (thread pools it used not counted)."""
        return {
            "blocked_s": round(self._host.blocked_s, 4),
            "stitch_cpu_s": round(self._host.stitch_cpu_s, 4),
            "finalise_cpu_s": round(self._host.finalise_cpu_s, 4),
            "finalise_s": [round(v, 3) for v in self._host.finalise_s],
        }

    def _rank_figures(self) -> dict[str, Any]:
        """This rank's share and clock (unix seconds): its first and last predicted batch, and when it had written
        its slides (the rest of the run it waits for the others); and :meth:`host_figures`."""
        return {
            "rank": self._distribution.rank,
            "slides": len(self._distribution.mine),
            "tiles": self._tiles_seen,
            **{key: round(value, 3) for key, value in self._clock.items()},
            **self.host_figures(),
        }

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Stop blending, drop this rank's partial stores of unfinished slides (finished ones stay; ``resume=true``
        redoes the rest) and, on rank 0, write ``summary.json`` with the unfinished slides as ``interrupted``.

        SIGCHLD is held back meanwhile: after a DataLoader worker died, PyTorch's SIGCHLD handler raises again at each
        further child's exit, which would cut this clean-up short (the summary left saying ``pending``); held back, it
        is raised once the clean-up is done."""
        self._record_stop(exception)

    def after_failure(self, exception: BaseException) -> None:
        """What :meth:`on_exception` does, when Lightning did not get it done: a second signal from a dead DataLoader
        worker can interrupt Lightning's exception handling before (or while) it reaches this callback, which left
        ``summary.json`` saying ``pending``. The pipeline calls this after ``trainer.predict`` raised; once the clean-up
        is done it does nothing."""
        if not getattr(self, "_cleaned_up", True):
            self._record_stop(exception)

    def _record_stop(self, exception: BaseException) -> None:
        with _sigchld_held():
            self._clean_up_after(exception)
        self._cleaned_up = True

    def _clean_up_after(self, exception: BaseException) -> None:
        for worker in (self._worker, self._finaliser):
            if worker is not None:
                worker.close(timeout=60, error=exception)
        self._stop_workers()
        unfinished = [i for i in range(len(self.plan.slides)) if i not in self._finished]
        for index in unfinished:
            self._stitcher.release(index)
        for index in self._distribution.mine:  # a slide stopped while its files were written: none of them stays
            if index not in self._finished:
                discard_unreported(self._stitcher.slide_dir(index), root=self.output_dir)
        if self._distribution.rank == 0:
            # slides other ranks completed before the stop keep their outputs: listed from their reports
            for index in unfinished:
                report = read_complete_report(self._stitcher.slide_dir(index), self.record.hash)
                if report is not None:
                    slide = self.plan.slides[index]
                    self.record.add_row(
                        slide.path,
                        "complete",
                        name=slide.name,
                        tiles=report["tiles_processed"],
                        seconds=report["wall_time_s"],
                        rank=report.get("rank"),
                    )
            unfinished = [i for i in unfinished if not self._reported(i)]
            now = time.perf_counter()
            started = {  # what this rank had predicted of them (tiles blended, seconds since their first batch)
                self.plan.slides[i].name: (len(state.tiles_seen), now - state.started)
                for i in unfinished
                if (state := self._stitcher.states.get(i)) is not None
            }
            self.record.write_interrupted([self.plan.slides[i] for i in unfinished], started, exception)

    def write_without_tiles(self) -> None:
        """Write every planned slide when no slide has a tissue tile (Lightning runs no predict hooks then): each
        gets an all-background mask, heatmap and report."""
        self._begin(SingleProcess(len(self.plan.slides)))
        for index in range(len(self.plan.slides)):
            self._finish(index)
        self.record.write_summary()

    def _finish(self, index: int) -> None:
        """Write slide ``index``'s outputs and report once, then free its store."""
        if index in self._finished:
            return
        started, cpu = time.perf_counter(), time.thread_time()
        write_slide(  # it releases the slide's store, whatever happens
            self.plan.slides[index],
            self._stitcher.state(index),
            self._stitcher.slide_dir(index),
            self.record,
            self.render,
            output_downsample=self.output_downsample,
            blend=self.store.blend,
            world_size=self._distribution.world,
            batch_size=self._batch_size or None,
            position=self._position(index),
            rank=self._distribution.rank,
            root=self.output_dir,
            release=lambda: self._stitcher.release(index),
        )
        self._host.finalise_s.append(time.perf_counter() - started)
        self._host.finalise_cpu_s += time.thread_time() - cpu
        self._finished.add(index)  # only now: interrupted while writing, the slide counts as unfinished
        if self._distribution.rank == 0:  # summary.json describes the run at every moment (rank 0's view under DDP)
            pending = [s for i, s in enumerate(self.plan.slides) if i not in self._finished and not self._reported(i)]
            self.record.write_summary(pending=pending)

    def _position(self, index: int) -> str:
        """``3/5`` (the slide's place in the run), and under DDP which rank writes it and how many of its slides
        are left after it."""
        mine = self._distribution.mine
        if self._distribution.world <= 1:
            return f"{index + 1}/{len(self.plan.slides)}"
        left = len(mine) - 1 - mine.index(index) if index in mine else 0
        return f"{index + 1}/{len(self.plan.slides)} (rank {self._distribution.rank}, {left} of its slides left)"

    def _reported(self, index: int) -> bool:
        """Whether slide ``index`` has been written by this run, by any rank (rank 0 cleared every redone slide's
        report at the start, so a report on disk is this run's). A report once seen is not looked for again, so rank 0
        rewriting the summary after each of its slides looks only for the reports still missing."""
        if index in self._finished or index in self._seen_reports:
            return True
        if self._distribution.world > 1 and (self._stitcher.slide_dir(index) / "report.json").is_file():
            self._seen_reports.add(index)
            return True
        return False
