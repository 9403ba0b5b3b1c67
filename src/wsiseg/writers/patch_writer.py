"""``PatchWriter``: per-image heatmaps (and masks) for patch-folder mode, mirrored under ``output_dir``.

The same parts as the slide writer: tiles of an image larger than one patch are blended in a
:class:`~wsiseg.writers.store.BlendingAccumulator` (held in memory), rows and the run's ``report.json`` go through a
:class:`~wsiseg.writers.run_record.RunRecord` with the same config hash, and ``resume=true`` is the one rule that
keeps complete outputs (the entry point hands the data module :meth:`PatchOutputs.is_complete`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from wsiseg.atomic import atomic_path, remove_leftovers
from wsiseg.data.grid import BLEND_MODES, blend_window
from wsiseg.data.patches import PatchImage, PatchPlan
from wsiseg.errors import UserInputError
from wsiseg.writers._batch import as_ints
from wsiseg.writers.heatmap import colour_map, render_heatmap
from wsiseg.writers.run_record import RunRecord, check_writable, config_hash
from wsiseg.writers.store import BlendingAccumulator

__all__ = ["PatchWriter", "PatchOutputs", "PatchWriterOptions", "patch_writer_options", "HEATMAP_SUFFIX", "MASK_SUFFIX"]

log = logging.getLogger(__name__)

HEATMAP_SUFFIX = "_heatmap.png"
MASK_SUFFIX = "_mask.png"
_HASH_KEY = "wsiseg:config"
_SOURCE_KEY = "wsiseg:source"
_STAMP_KEY = "wsiseg:source-stamp"


@dataclass(frozen=True)
class PatchOutputs:
    """Where an image's outputs go and when they count as complete.

    Attributes:
        output_dir: the output folder; ``<key>_heatmap.png`` (and ``<key>_mask.png``) are written under it.
        mask: whether ``<key>_mask.png`` is written (and so required for completeness).
        hash: the config hash stored in every PNG (text chunk ``wsiseg:config``).
    """

    output_dir: Path
    mask: bool
    hash: str

    def paths(self, image: PatchImage) -> dict[str, Path]:
        """The files written for ``image``: ``heatmap`` always, ``mask`` when asked for."""
        paths = {"heatmap": self.output_dir / f"{image.key}{HEATMAP_SUFFIX}"}
        if self.mask:
            paths["mask"] = self.output_dir / f"{image.key}{MASK_SUFFIX}"
        return paths

    def is_complete(self, image: PatchImage) -> bool:
        """True when every output of ``image`` exists, is a PNG of its size written under this hash, from the input
        file as it is now (its size and modification time in ns, recorded in the PNG: a changed input whose mtime was
        set back is redone). Reads PNG headers only."""
        for path in self.paths(image).values():
            try:
                with Image.open(path) as im:
                    if im.format != "PNG" or im.size != image.size or im.info.get(_HASH_KEY) != self.hash:
                        return False
                    if im.info.get(_STAMP_KEY) != image.stamp:
                        return False
            except Exception:  # missing or unreadable output: not complete
                return False
        return True

    def written(self, images: Sequence[PatchImage]) -> set[Path]:
        """Resolved paths of the files this run writes for ``images``, and of those an earlier run wrote there (a
        mask written with ``writer.mask=true``), so an output folder inside the input folder never feeds outputs back
        as inputs. A user's own file of such a name (``case1_mask.png`` ground truth) stays an input: see
        :meth:`foreign`."""
        paths = set()
        for image in images:
            for suffix in (HEATMAP_SUFFIX, MASK_SUFFIX):
                path = self.output_dir / f"{image.key}{suffix}"
                written_by_us = _written_by_wsiseg(path)  # one header read per path
                if written_by_us or ((suffix == HEATMAP_SUFFIX or self.mask) and not os.path.lexists(path)):
                    paths.add(path.resolve())
        return paths

    def foreign(self, images: Sequence[PatchImage]) -> list[Path]:
        """Files this run would write for ``images`` that exist and were not written by wsiseg (a user's own
        ``case1_mask.png``): never overwritten; the entry point refuses the run instead."""
        return [path for image in images for path in self.paths(image).values() if _foreign(path)]


@dataclass(frozen=True)
class PatchWriterOptions:
    """The patch writer's checked options (see :func:`patch_writer_options`)."""

    mask: bool
    overlay: bool
    opacity: float
    blend: str
    sigma_scale: float
    write_workers: int

    @property
    def rendering(self) -> dict[str, Any]:
        """What changes a heatmap's pixels (part of the outputs' hash)."""
        return {"overlay": self.overlay, "opacity": self.opacity, "blend": self.blend, "sigma_scale": self.sigma_scale}


def patch_writer_options(
    mask: bool = False,
    overlay: bool = True,
    opacity: float = 0.6,
    blend: str = "gaussian",
    sigma_scale: float = 0.125,
    output_downsample: int = 1,
    write_workers: int = 2,
    **unknown: Any,
) -> PatchWriterOptions:
    """Check the patch writer's options (``writer.*`` of ``writer=patches``).

    Args:
        mask: also write ``<key>_mask.png``: uint8 probability 0-255, or class labels for ``model.reduction=none``.
        overlay: blend the colour-mapped probability over the input; False writes the colour map alone.
        opacity: overlay opacity where the probability is 1 (scaled by the probability; labels use it as is).
        blend: ``none`` | ``linear`` | ``gaussian`` weights for the tiles of images larger than ``data.patch_size``.
        sigma_scale: Gaussian width relative to the tile side (``blend=gaussian``).
        output_downsample: must be 1 (outputs keep the input's pixels); the model's config reads it from here.
        write_workers: threads encoding and writing PNGs (0 writes on the main thread).

    Raises:
        UserInputError: an option outside its values, or one the patch writer does not have (naming the key).
    """
    if unknown:
        raise UserInputError(f"writer.{sorted(unknown)[0]} is not an option of writer=patches: drop it")
    if blend not in BLEND_MODES:
        raise UserInputError(f"writer.blend must be one of {', '.join(BLEND_MODES)}; got '{blend}'")
    if output_downsample != 1:
        raise UserInputError(
            f"writer.output_downsample must be 1 in patch mode (outputs keep the input's pixels), got "
            f"{output_downsample}: drop the override"
        )
    if not sigma_scale > 0:
        raise UserInputError(f"writer.sigma_scale must be > 0 (Gaussian width / tile side), got {sigma_scale}")
    if not 0.0 <= opacity <= 1.0:
        raise UserInputError(f"writer.opacity must be in [0, 1], got {opacity}")
    if write_workers < 0:
        raise UserInputError(f"writer.write_workers must be >= 0, got {write_workers}")
    return PatchWriterOptions(bool(mask), overlay, opacity, blend, sigma_scale, write_workers)


@dataclass
class _ImageState:
    """Predictions of one image gathered so far (image px frame, cropped to the image)."""

    started: float
    probs: np.ndarray | None = None  # (C, H, W) float32: a single-piece image's prediction
    store: BlendingAccumulator | None = None  # a tiled image's blended tiles
    rgb: np.ndarray | None = None  # (H, W, 3) uint8 input pixels (for the overlay)
    pieces: int = 0
    error: str = ""


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
        checked = patch_writer_options(**options)
        self.outputs = _outputs(output_dir, checked, run_config)
        self.plan, self.output_dir, self.mask = plan, self.outputs.output_dir, checked.mask
        self.overlay, self.opacity, self.blend = checked.overlay, checked.opacity, checked.blend
        self.sigma_scale, self.write_workers = checked.sigma_scale, checked.write_workers
        self.record = RunRecord(self.output_dir, run_config, provenance, hash=self.outputs.hash)
        self.results = self.record.rows
        self.report: dict[str, Any] = {}
        self._states: dict[int, _ImageState] = {}
        self._pending: deque[tuple[int, float, Future]] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._windows: dict[int, np.ndarray] = {}
        self._started = 0.0
        self._counts = {"done": 0, "skipped": 0, "failed": 0}
        self._batch_size = 0  # the largest batch seen

    @staticmethod
    def outputs_for(output_dir: str | Path, run_config: dict[str, Any] | None = None, **options: Any) -> PatchOutputs:
        """The outputs' naming and hash for these options (checked: UserInputError naming the ``writer.*`` key),
        without building a writer: the entry point calls it with ``cfg.writer`` before any image is read."""
        return _outputs(output_dir, patch_writer_options(**options), run_config)

    # -- Lightning hooks (setup and teardown run even when every image is kept and no batch is predicted) ---------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._started = time.perf_counter()
        self._states, self._pending, self.report = {}, deque(), {}
        self.record.rows.clear()
        self._counts = {"done": 0, "skipped": 0, "failed": 0}
        self._batch_size = 0
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if removed := remove_leftovers(self.output_dir):  # a killed run's half-written PNGs
            log.info("removed %d temporary file(s) an interrupted run left in %s", removed, self.output_dir)
        if self.write_workers:
            self._executor = ThreadPoolExecutor(self.write_workers, thread_name_prefix="wsiseg-write")
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
        pixels = batch["image"].cpu().numpy() if self.overlay else None
        image_indices = as_ints(prediction["image_index"])
        piece_indices = as_ints(prediction["piece_index"])
        errors = prediction.get("error") or [""] * len(image_indices)
        finite = prediction["finite"].cpu().tolist()
        self._batch_size = max(self._batch_size, len(image_indices))
        for i, (index, piece_index) in enumerate(zip(image_indices, piece_indices)):
            image = self.plan.images[index]
            state = self._states.get(index)
            if state is None:
                state = self._states[index] = _ImageState(started=time.perf_counter())
            state.pieces += 1
            if errors[i]:
                state.error = state.error or errors[i]
            elif not finite[i]:
                state.error = state.error or (
                    f"image '{image.path}': the network output NaN/infinite values for piece {piece_index}: check the "
                    "checkpoint, model.mean/std and trainer.precision (float16 can overflow)"
                )
            elif not state.error:
                try:
                    self._add_piece(image, state, piece_index, probs[i], None if pixels is None else pixels[i])
                except Exception as exc:
                    state.error = f"image '{image.path}': {exc}"
            if state.pieces == len(image.origins):
                self._finish(index)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for index in sorted(self._states):  # only when the loop stopped early (e.g. limit_predict_batches)
            state = self._states[index]
            total = len(self.plan.images[index].origins)
            state.error = state.error or f"only {state.pieces} of {total} piece(s) were predicted"
            self._finish(index)
        self._drain(0)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._write_report()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    # -- helpers -------------------------------------------------------------------------------------------------
    def _window(self, size: int) -> np.ndarray:
        if size not in self._windows:
            self._windows[size] = blend_window(size, self.blend, self.sigma_scale)
        return self._windows[size]

    def _add_piece(
        self, image: PatchImage, state: _ImageState, piece_index: int, probs: np.ndarray, pixels: np.ndarray | None
    ) -> None:
        """Put one piece's prediction (C, h, w) and pixels (3, h, w) into the image's arrays, cropped to the image."""
        if probs.shape[-2:] != image.piece:
            raise RuntimeError(
                f"the model returned {probs.shape[-2]}x{probs.shape[-1]} px for a {image.piece[0]}x{image.piece[1]} "
                "piece: patch mode needs model.output_downsample=1"
            )
        width, height = image.size
        x, y = (int(v) for v in image.origins[piece_index])
        if not image.tiled:
            state.probs = np.ascontiguousarray(probs[:, :height, :width])
            if pixels is not None:
                state.rgb = np.ascontiguousarray(pixels[:, :height, :width].transpose(1, 2, 0))
            return
        if state.store is None:
            state.store = BlendingAccumulator(None, probs.shape[0], image.size, chunk=max(width, height))
            if pixels is not None:
                state.rgb = np.zeros((height, width, 3), np.uint8)
        state.store.add(x, y, probs, self._window(image.piece[0]))
        if pixels is not None and state.rgb is not None:
            w, h = min(image.piece[1], width - x), min(image.piece[0], height - y)
            state.rgb[y : y + h, x : x + w] = pixels[:, :h, :w].transpose(1, 2, 0)

    def _finish(self, index: int) -> None:
        """Turn one image's gathered predictions into its mask and hand the PNGs to the writer threads."""
        image = self.plan.images[index]
        state = self._states.pop(index)
        probs = state.store.read_all() if state.store is not None else state.probs
        if state.error or probs is None:
            self._fail(image, state, state.error or "no prediction arrived")
            return
        labels = probs.shape[0] > 1
        if labels:
            mask = probs.argmax(axis=0).astype(np.uint8)
        else:
            mask = np.clip(np.rint(probs[0] * 255.0), 0, 255).astype(np.uint8)
        if self._executor is None:
            self._complete(index, state.started, self._write_pair, image, state.rgb, mask, labels)
            return
        future = self._executor.submit(self._write_pair, image, state.rgb, mask, labels)
        self._pending.append((index, state.started, future))
        self._drain(4 * self.write_workers)

    def _drain(self, keep: int) -> None:
        """Collect finished writes, oldest first, until at most ``keep`` are in flight (bounds memory)."""
        while len(self._pending) > keep:
            index, started, future = self._pending.popleft()
            self._complete(index, started, future.result)

    def _complete(self, index: int, started: float, write: Any, *args: Any) -> None:
        image = self.plan.images[index]
        try:
            write(*args)
        except Exception as exc:
            self._fail(image, None, f"image '{image.path}': writing outputs failed: {exc}", started)
            return
        self._row(image.path, "done", len(image.origins), time.perf_counter() - started, "", image)

    def _write_pair(self, image: PatchImage, rgb: np.ndarray | None, mask: np.ndarray, labels: bool) -> None:
        """Render and write the heatmap (and mask) of one image, each atomically (runs on a writer thread)."""
        paths = self.outputs.paths(image)
        paths["heatmap"].parent.mkdir(parents=True, exist_ok=True)
        info = PngInfo()
        info.add_text(_HASH_KEY, self.outputs.hash)
        info.add_text(_SOURCE_KEY, image.rel)
        info.add_text(_STAMP_KEY, image.stamp)
        if self.overlay and rgb is not None:
            heatmap = render_heatmap(rgb, mask, labels=labels, opacity=self.opacity)
        else:
            heatmap = colour_map(mask, labels)
        if "mask" in paths:
            with atomic_path(paths["mask"]) as tmp:
                Image.fromarray(mask).save(tmp, format="PNG", pnginfo=info)
        with atomic_path(paths["heatmap"]) as tmp:
            Image.fromarray(heatmap).save(tmp, format="PNG", pnginfo=info)

    def _fail(self, image: PatchImage, state: _ImageState | None, reason: str, started: float | None = None) -> None:
        for path in self.outputs.paths(image).values():  # stale outputs of an earlier run must not look complete
            path.unlink(missing_ok=True)
        log.error("%s; skipped", reason)
        start = state.started if state is not None else started
        seconds = 0.0 if start is None else time.perf_counter() - start
        self._row(image.path, "failed", 0 if state is None else state.pieces, seconds, reason, image)

    def _row(
        self, path: Path, outcome: str, pieces: int, seconds: float, reason: str, image: PatchImage | None = None
    ) -> None:
        """One result row; ``status`` is ``complete`` for done and skipped (predict's exit status reads it)."""
        self._counts[outcome] += 1
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
        done, skipped, failed = self._counts["done"], self._counts["skipped"], self._counts["failed"]
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
                "mask": self.mask,
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


def _written_by_wsiseg(path: Path) -> bool:
    """``path`` is a PNG a wsiseg patch run wrote (it carries the config hash text chunk)."""
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and _HASH_KEY in im.info
    except Exception:
        return False


def _foreign(path: Path) -> bool:
    """``path`` exists and is not a wsiseg output."""
    return os.path.lexists(path) and not _written_by_wsiseg(path)


def _outputs(output_dir: str | Path, options: PatchWriterOptions, run_config: dict[str, Any] | None) -> PatchOutputs:
    """The outputs of a writer with these (checked) options, in a folder proven writable."""
    check_writable(output_dir)
    return PatchOutputs(Path(output_dir), options.mask, config_hash(run_config, extra=options.rendering))


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
