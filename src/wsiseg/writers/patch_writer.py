"""``PatchWriter``: per-image heatmaps (and masks) for patch-folder mode, mirrored under ``output_dir``."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from wsiseg.atomic import atomic_path, write_json_atomic
from wsiseg.data.grid import BLEND_MODES, blend_window
from wsiseg.data.patches import PatchFolderDataModule, PatchImage
from wsiseg.errors import UserInputError
from wsiseg.writers._batch import as_ints
from wsiseg.writers.heatmap import LABEL_COLOURS, render_heatmap

__all__ = ["PatchWriter", "outputs_hash", "colour_map", "HEATMAP_SUFFIX", "MASK_SUFFIX"]

log = logging.getLogger(__name__)

HEATMAP_SUFFIX = "_heatmap.png"
MASK_SUFFIX = "_mask.png"
_HASH_KEY = "wsiseg:config"
_SOURCE_KEY = "wsiseg:source"

# Options that change how fast or where a run writes, not what it writes.
_RUN_ONLY = {
    "data": {"input_dir", "batch_size", "num_workers", "pin_memory", "prefetch_factor", "extensions"},
    "writer": {"output_dir", "overwrite", "write_workers", "mask"},
    "model": {"compile", "max_chunk", "channels_last", "output_dtype"},
}


def outputs_hash(run_config: dict[str, Any] | None, writer_options: dict[str, Any]) -> str:
    """Short hash of what changes an image's heatmap/mask: model, piece geometry, writer rendering options and the
    trainer's precision. Stored in each output PNG; a re-run only keeps outputs whose hash matches."""
    config = dict(run_config or {})
    relevant: dict[str, Any] = {"writer_options": writer_options}
    for section in ("model", "data", "writer"):
        value = config.get(section)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in _RUN_ONLY[section]}
        relevant[section] = value
    trainer = config.get("trainer")
    relevant["precision"] = trainer.get("precision") if isinstance(trainer, dict) else None
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def colour_map(mask: np.ndarray, labels: bool) -> np.ndarray:
    """(H, W) uint8 mask → (H, W, 3) uint8 RGB: JET colour map of the probability, or a fixed colour per class label."""
    if labels:
        return LABEL_COLOURS[mask % len(LABEL_COLOURS)]
    return np.ascontiguousarray(cv2.applyColorMap(mask, cv2.COLORMAP_JET)[..., ::-1])


@dataclass
class _ImageState:
    """Predictions of one image gathered so far (image px frame, cropped to the image)."""

    started: float
    probs: np.ndarray | None = None  # (C, H, W) float32: the prediction, or the blended sum for tiled images
    weights: np.ndarray | None = None  # (H, W) float32 blending weights (tiled images only)
    rgb: np.ndarray | None = None  # (H, W, 3) uint8 input pixels (for the overlay)
    pieces: int = 0
    error: str = ""


class PatchWriter(BasePredictionWriter):
    """Writes ``<key>_heatmap.png`` (and ``<key>_mask.png``) for every input of a :class:`PatchFolderDataModule`.

    ``<key>`` is the input's path relative to ``data.input_dir`` without its extension, so sub-folders are mirrored
    under ``output_dir``. Outputs have the input's size (image px): single-piece images are cropped back from their
    padding, larger ones blended from their tiles with ``blend`` weights. Each file is written atomically and carries
    a hash of the settings that made it (PNG text ``wsiseg:config``); a re-run skips an input whose outputs exist, have
    its size and hash and are newer than it, unless ``overwrite``. Unreadable inputs are reported by name and fail;
    the others are written. At the end ``report.json`` (counts, wall time, images/s, one row per image) is written to
    ``output_dir`` and a summary is logged.

    Args:
        output_dir: output folder (the Hydra run folder by default).
        mask: also write ``<key>_mask.png``: uint8 probability 0-255, or class labels for ``model.reduction=none``.
        overlay: blend the colour-mapped probability over the input; False writes the colour map alone.
        opacity: overlay opacity where the probability is 1 (scaled by the probability; labels use it as is).
        blend: ``none`` | ``linear`` | ``gaussian`` weights for the tiles of images larger than ``data.patch_size``.
        sigma_scale: Gaussian width relative to the tile side (``blend=gaussian``).
        output_downsample: must be 1 (outputs keep the input's pixels); present because the model config reads it.
        overwrite: recompute inputs whose outputs are already complete.
        write_workers: threads encoding and writing PNGs (0 writes on the main thread).
        run_config: the composed config (set by the entry point); part of the outputs' hash and stored in the report.
        provenance: what produced the outputs (versions, the weights and their SHA-256), stored in the report.

    Example::

        writer = PatchWriter("out/", mask=True)
        trainer = Trainer(callbacks=[writer])
        trainer.predict(module, datamodule=PatchFolderDataModule("patches/", patch_size=256))
    """

    def __init__(
        self,
        output_dir: str | Path,
        mask: bool = False,
        overlay: bool = True,
        opacity: float = 0.6,
        blend: str = "gaussian",
        sigma_scale: float = 0.125,
        output_downsample: int = 1,
        overwrite: bool = False,
        write_workers: int = 2,
        run_config: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.provenance = dict(provenance or {})
        if blend not in BLEND_MODES:
            raise UserInputError(f"writer.blend must be one of {', '.join(BLEND_MODES)}; got '{blend}'")
        if output_downsample != 1:
            raise UserInputError(
                f"writer.output_downsample must be 1 in patch mode (outputs keep the input's pixels), got "
                f"{output_downsample}: drop the override"
            )
        if not 0.0 <= opacity <= 1.0:
            raise UserInputError(f"writer.opacity must be in [0, 1], got {opacity}")
        if write_workers < 0:
            raise UserInputError(f"writer.write_workers must be >= 0, got {write_workers}")
        self.output_dir = Path(output_dir)
        self.mask, self.overlay, self.opacity = mask, overlay, opacity
        self.blend, self.sigma_scale, self.output_downsample = blend, sigma_scale, output_downsample
        self.overwrite, self.write_workers = overwrite, write_workers
        self.run_config = run_config
        self.results: list[dict[str, Any]] = []
        self.report: dict[str, Any] = {}
        self._images: list[PatchImage] = []
        self._states: dict[int, _ImageState] = {}
        self._pending: deque[tuple[int, float, Future]] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._windows: dict[int, np.ndarray] = {}
        self._hash = ""
        self._started = 0.0
        self._counts = {"done": 0, "skipped": 0, "failed": 0, "ignored": 0}
        self._datamodule: PatchFolderDataModule | None = None

    # -- paths and completeness ----------------------------------------------------------------------------------
    def output_paths(self, image: PatchImage) -> dict[str, Path]:
        """The files written for ``image``: ``heatmap`` always, ``mask`` when asked for."""
        paths = {"heatmap": self.output_dir / f"{image.key}{HEATMAP_SUFFIX}"}
        if self.mask:
            paths["mask"] = self.output_dir / f"{image.key}{MASK_SUFFIX}"
        return paths

    def is_complete(self, image: PatchImage) -> bool:
        """True when every output of ``image`` exists, is a PNG of its size written with the current settings' hash,
        and is not older than the input. Reads PNG headers only."""
        for path in self.output_paths(image).values():
            try:
                if path.stat().st_mtime < image.mtime:
                    return False
                with Image.open(path) as im:
                    if im.format != "PNG" or im.size != image.size or im.info.get(_HASH_KEY) != self._hash:
                        return False
            except Exception:  # missing or unreadable output: not complete
                return False
        return True

    # -- Lightning hooks -----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, PatchFolderDataModule):
            raise UserInputError(
                f"writer=patches writes patch-folder outputs but data is {type(datamodule).__name__}: add data=patches"
            )
        self._datamodule = datamodule
        self._started = time.perf_counter()
        self._images = list(datamodule.images)
        self._states, self._pending, self.results, self.report = {}, deque(), [], {}
        self._counts = {"done": 0, "skipped": 0, "failed": 0, "ignored": 0}
        self._hash = outputs_hash(
            self.run_config,
            {"overlay": self.overlay, "opacity": self.opacity, "blend": self.blend, "sigma": self.sigma_scale},
        )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.write_workers:
            self._executor = ThreadPoolExecutor(self.write_workers, thread_name_prefix="wsiseg-write")
        for path, reason in datamodule.failed:
            self._row(path, "failed", 0, 0.0, reason)
        # Outputs of this run found among the inputs (output_dir inside input_dir) are never read as inputs.
        written = {
            (self.output_dir / f"{image.key}{suffix}").resolve()
            for image in self._images
            for suffix in (HEATMAP_SUFFIX, MASK_SUFFIX)
        }
        skip = []
        for index, image in enumerate(self._images):
            if image.path.resolve() in written:
                skip.append(index)
                self._counts["ignored"] += 1
            elif not self.overwrite and self.is_complete(image):
                skip.append(index)
                self._row(image.path, "skipped", 0, 0.0, "outputs complete (writer.overwrite=true recomputes)", image)
        datamodule.skip_images(skip)
        if self._counts["ignored"]:
            log.info(
                "%d file(s) in data.input_dir are outputs of this run; not read as inputs", self._counts["ignored"]
            )

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
        for i, (index, piece_index) in enumerate(zip(image_indices, piece_indices)):
            image = self._images[index]
            state = self._states.get(index)
            if state is None:
                state = self._states[index] = _ImageState(started=time.perf_counter())
            state.pieces += 1
            if errors[i]:
                state.error = state.error or errors[i]
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
            total = len(self._images[index].origins)
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
        w, h = min(image.piece[1], width - x), min(image.piece[0], height - y)
        if not image.tiled:
            state.probs = np.ascontiguousarray(probs[:, :height, :width])
            if pixels is not None:
                state.rgb = np.ascontiguousarray(pixels[:, :height, :width].transpose(1, 2, 0))
            return
        if state.probs is None:
            state.probs = np.zeros((probs.shape[0], height, width), np.float32)
            state.weights = np.zeros((height, width), np.float32)
            if pixels is not None:
                state.rgb = np.zeros((height, width, 3), np.uint8)
        assert state.weights is not None
        window = self._window(image.piece[0])[:h, :w]
        state.probs[:, y : y + h, x : x + w] += probs[:, :h, :w] * window
        state.weights[y : y + h, x : x + w] += window
        if pixels is not None and state.rgb is not None:
            state.rgb[y : y + h, x : x + w] = pixels[:, :h, :w].transpose(1, 2, 0)

    def _finish(self, index: int) -> None:
        """Turn one image's gathered predictions into its mask and hand the PNGs to the writer threads."""
        image = self._images[index]
        state = self._states.pop(index)
        if state.error or state.probs is None:
            self._fail(image, state, state.error or "no prediction arrived")
            return
        probs = state.probs
        if state.weights is not None:
            probs = probs / state.weights
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
        image = self._images[index]
        try:
            write(*args)
        except Exception as exc:
            self._fail(image, None, f"image '{image.path}': writing outputs failed: {exc}", started)
            return
        self._row(image.path, "done", len(image.origins), time.perf_counter() - started, "", image)

    def _write_pair(self, image: PatchImage, rgb: np.ndarray | None, mask: np.ndarray, labels: bool) -> None:
        """Render and write the heatmap (and mask) of one image, each atomically (runs on a writer thread)."""
        paths = self.output_paths(image)
        paths["heatmap"].parent.mkdir(parents=True, exist_ok=True)
        info = PngInfo()
        info.add_text(_HASH_KEY, self._hash)
        info.add_text(_SOURCE_KEY, image.rel)
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
        for path in self.output_paths(image).values():  # stale outputs of an earlier run must not look complete
            path.unlink(missing_ok=True)
        log.error("%s; skipped", reason)
        start = state.started if state is not None else started
        seconds = 0.0 if start is None else time.perf_counter() - start
        self._row(image.path, "failed", 0 if state is None else state.pieces, seconds, reason, image)

    def _row(
        self, path: Path, outcome: str, pieces: int, seconds: float, reason: str, image: PatchImage | None = None
    ) -> None:
        """One result row; ``status`` is ``complete`` for done and skipped (predict's exit status reads it)."""
        datamodule = self._datamodule
        rel = image.rel if image is not None else _relative(path, datamodule.input_dir if datamodule else None)
        self._counts[outcome] += 1
        self.results.append(
            {
                "slide": str(path),
                "image": rel,
                "status": "failed" if outcome == "failed" else "complete",
                "outcome": outcome,
                "tiles": pieces,
                "seconds": round(seconds, 4),
                "reason": reason,
                "heatmap": None if image is None or outcome == "failed" else image.key + HEATMAP_SUFFIX,
            }
        )

    def _write_report(self) -> None:
        wall = max(time.perf_counter() - self._started, 1e-9)
        self.results.sort(key=lambda row: row["image"])
        done, skipped, failed = self._counts["done"], self._counts["skipped"], self._counts["failed"]
        datamodule = self._datamodule
        self.report = {
            "input_dir": None if datamodule is None else str(datamodule.input_dir),
            "output_dir": str(self.output_dir),
            "images": done + skipped + failed,
            "done": done,
            "skipped": skipped,
            "failed": failed,
            "ignored_outputs": self._counts["ignored"],
            "pieces": sum(row["tiles"] for row in self.results if row["outcome"] == "done"),
            "wall_time_s": round(wall, 3),
            "images_per_s": round(done / wall, 2),
            "patch_size": None if datamodule is None else datamodule.patch_size,
            "batch_size": None if datamodule is None else datamodule.batch_size,
            "mask": self.mask,
            "config_hash": self._hash,
            "provenance": self.provenance,
            "config": self.run_config,
            "results": self.results,
        }
        report_path = self.output_dir / "report.json"
        write_json_atomic(report_path, self.report)
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


def _relative(path: Path, root: Path | None) -> str:
    try:
        return path.relative_to(root).as_posix() if root is not None else str(path)
    except ValueError:
        return str(path)
