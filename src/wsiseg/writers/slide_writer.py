"""``SlideWriter``: blends predicted tiles per slide and writes ``mask.tif``, ``heatmap.png`` and ``report.json``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from wsiseg.atomic import atomic_path, write_json_atomic
from wsiseg.contours import contour_formats, write_contours
from wsiseg.data.datasets import SlideTiles
from wsiseg.data.grid import BLEND_MODES, blend_window
from wsiseg.errors import UserInputError
from wsiseg.writers._batch import as_ints, to_host_async
from wsiseg.writers.heatmap import png_bytes, render_heatmap
from wsiseg.writers.store import BlendingAccumulator, TileMosaic, probabilities_to_u8
from wsiseg.writers.tiff import ENCODERS, pyramid_sizes, write_pyramid_tiff

__all__ = ["SlideWriter", "config_hash"]

log = logging.getLogger(__name__)


def config_hash(config: dict[str, Any] | None) -> str:
    """Stable short hash of the parts of a run config that change a slide's outputs."""
    relevant = {k: (config or {}).get(k) for k in ("model", "data", "writer")}
    if isinstance(relevant.get("data"), dict):
        relevant["data"] = {k: v for k, v in relevant["data"].items() if k not in ("slides", "num_workers")}
    if isinstance(relevant.get("writer"), dict):
        relevant["writer"] = {k: v for k, v in relevant["writer"].items() if k != "output_dir"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class _SlideState:
    accumulator: BlendingAccumulator | None = None
    started: float = 0.0
    tiles_seen: set[int] = field(default_factory=set)
    duplicates: int = 0
    error: str = ""
    tiles_per_rank: list[int] = field(default_factory=list)


class SlideWriter(BasePredictionWriter):
    """Stitches tile predictions into per-slide outputs under ``output_dir/<slide name>/``.

    Tiles (output px, from ``SegmentationModule``) are blended with per-pixel weights ``writer.blend`` and normalised
    by the accumulated weights in a chunked on-disk store, so memory does not grow with slide area. When a slide's last
    tile has arrived (or, under DDP, after all ranks have merged their partial stores) it writes, each atomically:

    * ``mask.tif`` — pyramidal tiled TIFF, uint8 probability 0-255 (or class labels for ``model.reduction=none``),
      X/YResolution set from the slide's mpp so viewers overlay it on the slide;
    * ``heatmap.png`` — the mask colour-mapped over the slide thumbnail;
    * ``report.json`` — geometry, tile counts, tissue fraction, tumour area, timing, the composed config.

    Args:
        output_dir: run folder; one sub-folder per slide.
        blend: ``none`` | ``linear`` | ``gaussian`` (see :func:`wsiseg.data.grid.blend_window`).
        output_downsample: read-level px per mask px (the module pools on the device by the same factor).
        sigma_scale: Gaussian width relative to the tile side (``blend=gaussian``).
        threshold: probability at or above which a pixel counts as tumour for the reported area.
        chunk: accumulator chunk side, output px.
        cache_mb: memory for accumulator chunks held in RAM, MiB.
        tiff_tile: TIFF tile side, px.
        compression: TIFF compression (lossless).
        heatmap_max_side: longer side of ``heatmap.png`` (the thumbnail is resized to fit).
        run_config: the composed config, stored in each report (set by the entry point).
        contours: ``geojson`` and/or ``asap_xml`` (a list or comma-separated), or None / ``none``: also trace the
            thresholded mask into ``tumour.geojson`` (QuPath) / ``tumour.xml`` (ASAP), level-0 px; see
            :mod:`wsiseg.contours`.
        min_area_um2: contour regions smaller than this are dropped (µm², or level-0 px² without mpp).
        blend_thread: blend on a background thread (``true``) or between batches on the main thread (``false``);
            ``auto``: a thread on GPUs (the host blends while the device runs), none on CPUs (the network's threads
            already use every core).
        provenance: what produced the outputs (versions, the weights and their SHA-256), copied into each report.

    Example::

        writer = SlideWriter("outputs/run", blend="gaussian")
        trainer = Trainer(callbacks=[writer])
        trainer.predict(module, datamodule=dm, return_predictions=False)
    """

    def __init__(
        self,
        output_dir: str | Path,
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
        if blend_thread not in ("auto", True, False):
            raise UserInputError(f"writer.blend_thread must be auto, true or false; got '{blend_thread}'")
        self.blend_thread = blend_thread
        if blend not in BLEND_MODES:
            raise UserInputError(f"writer.blend must be one of {', '.join(BLEND_MODES)}; got '{blend}'")
        if not 0.0 < threshold <= 1.0:
            raise UserInputError(f"writer.threshold must be in (0, 1], got {threshold}")
        if compression not in ENCODERS:
            raise UserInputError(
                f"writer.compression must be one of {', '.join(ENCODERS)} (lossless TIFF codecs OpenSlide reads); "
                f"got '{compression}'"
            )
        if isinstance(tiff_tile, bool) or not isinstance(tiff_tile, int) or tiff_tile < 16 or tiff_tile % 16:
            raise UserInputError(
                f"writer.tiff_tile must be a positive multiple of 16 (the TIFF tile rule), e.g. 256; got {tiff_tile}"
            )
        if chunk % (2 * tiff_tile):
            raise UserInputError(
                f"writer.chunk ({chunk}) must be a multiple of 2 x writer.tiff_tile ({tiff_tile}), e.g. "
                f"{2 * tiff_tile * max(1, round(chunk / (2 * tiff_tile)))}"
            )
        self.output_dir = Path(output_dir)
        _check_writable(self.output_dir)
        self.blend, self.output_downsample, self.sigma_scale = blend, output_downsample, sigma_scale
        self.threshold, self.chunk, self.cache_bytes = threshold, chunk, cache_mb << 20
        self.tiff_tile, self.compression, self.heatmap_max_side = tiff_tile, compression, heatmap_max_side
        self.run_config = run_config
        self.provenance = dict(provenance or {})
        self.contours, self.min_area_um2 = contour_formats(contours), float(min_area_um2)
        self.results: list[dict[str, Any]] = []
        self._slides: list[SlideTiles] = []
        self._states: dict[int, _SlideState] = {}
        self._finished: set[int] = set()
        self._windows: dict[int, np.ndarray] = {}
        self._channels = 1
        self._batch_clock = 0.0  # when the batch now arriving started: the end of the previous one
        self._batch_size_used = 0
        self._rank, self._world = 0, 1
        self._owned: set[int] | None = None
        self._blender: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._blender_error: BaseException | None = None
        self._blend_inline = False

    # -- Lightning hooks -----------------------------------------------------------------------------------------
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(trainer.datamodule, trainer.global_rank, trainer.world_size)
        self._owned = self._claim_tiles(trainer) if self._world > 1 else None
        # On a GPU the host blends while the device runs the next batch. On a CPU the network's OpenMP threads already
        # take every core: a blending thread beside them stalls each parallel region (demo U-Net, 512², 2 cores:
        # 36 patches/s with the thread, 38-39 blending between batches).
        on_cpu = trainer.strategy.root_device.type == "cpu"
        self._blend_inline = not self.blend_thread if self.blend_thread != "auto" else on_cpu

    def write_without_tiles(self, datamodule: Any) -> None:
        """Write every planned slide when no slide has a tissue tile (Lightning runs no predict hooks then):
        each gets an all-background mask, heatmap and report."""
        self._begin(datamodule, 0, 1)
        for index in range(len(self._slides)):
            self._finish(index)
        self._write_summary()

    def _begin(self, datamodule: Any, rank: int, world: int) -> None:
        self._slides = list(datamodule.slides)
        self._rank, self._world = rank, world
        self._states, self._finished, self.results = {}, set(), []
        self._batch_clock = time.perf_counter()
        for path, reason in getattr(datamodule, "failed", []):
            self.results.append({"slide": str(path), "status": "skipped", "tiles": 0, "seconds": 0.0, "reason": reason})
        for path, name in getattr(datamodule, "resumed", []):
            self.results.append(
                {
                    "slide": str(path),
                    "name": name,
                    "status": "complete",
                    "tiles": 0,
                    "seconds": 0.0,
                    "reason": "resumed: complete outputs kept",
                }
            )
        if self._rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            # Before any rank writes (under DDP the tile-claiming all-gather that follows is the barrier).
            for index in range(len(self._slides)):
                _remove_stale(self._slide_dir(index))

    def _claim_tiles(self, trainer: pl.Trainer) -> set[int]:
        """Agree across ranks which rank blends each dataset index: the lowest rank whose sampler yields it.

        Lightning's predict sampler (``UnrepeatedDistributedSampler``) gives each index to exactly one rank; this
        makes blending correct even with a sampler that repeats indices (e.g. a padding ``DistributedSampler``),
        and reports indices no rank will see.
        """
        import torch.distributed as dist

        loader = trainer.predict_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        sampler = getattr(loader.batch_sampler, "sampler", None) or loader.sampler
        mine = [int(i) for i in sampler]
        gathered: list[list[int] | None] = [None] * self._world
        dist.all_gather_object(gathered, mine)
        owner: dict[int, int] = {}
        for rank, indices in enumerate(gathered):
            for index in indices or []:
                owner.setdefault(index, rank)
        total = len(loader.dataset)
        repeated = sum(len(indices or []) for indices in gathered) - len(owner)
        if repeated:
            log.warning("the predict sampler hands %d tile(s) to more than one rank; each is blended once", repeated)
        if len(owner) != total:
            raise RuntimeError(f"the predict sampler leaves {total - len(owner)} of {total} tiles to no rank")
        return {index for index, rank in owner.items() if rank == self._rank}

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
        slide_indices = as_ints(prediction["slide_index"])
        errors = list(prediction.get("error") or [""] * len(slide_indices))
        dataset_indices = list(batch_indices) if batch_indices is not None else [None] * len(slide_indices)
        self._batch_size_used = max(self._batch_size_used, len(slide_indices))
        # A slide's clock starts with the batch holding its first tile (read and computed before it reaches here).
        started, self._batch_clock = self._batch_clock, time.perf_counter()
        item = (probs, ready, slide_indices, as_ints(prediction["tile_index"]), errors, dataset_indices, started)
        if self._blend_inline:
            self._blend_batch(*item)
        else:
            self._submit(item)

    # -- on a GPU, blending runs on one background thread so the device is not kept waiting by the host ------------
    def _submit(self, item: tuple[Any, ...]) -> None:
        self._raise_blender_error()
        if self._blender is None:
            self._queue = queue.Queue(maxsize=4)  # bounds host memory: at most 4 batches wait
            self._blender = threading.Thread(target=self._blend_loop, name="wsiseg-blend", daemon=True)
            self._blender.start()
        assert self._queue is not None
        self._queue.put(item)

    def _blend_loop(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._blender_error is None:
                try:
                    self._blend_batch(*item)
                except BaseException as exc:  # re-raised on the main thread
                    self._blender_error = exc

    def _drain(self) -> None:
        """Wait until every submitted batch is blended (and the slides it completed are written)."""
        if self._blender is not None:
            assert self._queue is not None
            self._queue.put(None)
            self._blender.join()
            self._blender, self._queue = None, None
        self._raise_blender_error()

    def _raise_blender_error(self) -> None:
        if self._blender_error is not None:
            error, self._blender_error = self._blender_error, None
            raise error

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Stop blending and remove this rank's partial stores of unfinished slides (finished slides stay; a re-run
        with ``resume=true`` redoes the rest)."""
        if self._blender is not None and self._queue is not None:
            self._blender_error = self._blender_error or exception
            self._queue.put(None)
            self._blender.join(timeout=60)
        for index, state in self._states.items():
            if index not in self._finished and state.accumulator is not None:
                state.accumulator.delete()
        unfinished = [self._slides[i].name for i in self._states if i not in self._finished]
        if unfinished and self._rank == 0:
            log.error(
                "interrupted (%s): unfinished slide(s) %s left without outputs",
                type(exception).__name__,
                ", ".join(unfinished),
            )
        if self._rank == 0:
            # summary.json describes this run even when it stops early: finished slides as they ended, the rest not
            reason = f"interrupted ({type(exception).__name__}) before this slide was written"
            for index, slide in enumerate(self._slides):
                if index not in self._finished:
                    row = {"slide": str(slide.path), "name": slide.name, "status": "interrupted", "tiles": 0}
                    self.results.append({**row, "seconds": 0.0, "reason": reason})
            self._write_summary()

    def _blend_batch(
        self,
        host_probs: torch.Tensor,
        ready: torch.cuda.Event | None,
        slide_indices: list[int],
        tile_indices: list[int],
        errors: list[str],
        dataset_indices: list[int | None],
        batch_started: float,
    ) -> None:
        if ready is not None:
            ready.synchronize()  # the device-to-host copy of this batch has landed
        probs = host_probs.numpy()  # float16 or float32; blending computes in float32
        self._channels = probs.shape[1]
        for i, (slide_index, tile_index) in enumerate(zip(slide_indices, tile_indices)):
            if self._owned is not None and dataset_indices[i] is not None and dataset_indices[i] not in self._owned:
                self._state(slide_index, batch_started).duplicates += 1
                continue
            if self._world == 1:
                # Tiles arrive in slide order: every earlier slide is complete.
                for earlier in range(slide_index):
                    if earlier not in self._finished:
                        self._finish(earlier)
            state = self._state(slide_index, batch_started)
            if errors[i]:
                state.error = state.error or errors[i]
                continue
            if tile_index in state.tiles_seen:
                state.duplicates += 1
                continue
            state.tiles_seen.add(tile_index)
            slide = self._slides[slide_index]
            x, y = (int(v) for v in slide.origins[tile_index])
            tile = probs[i]
            assert state.accumulator is not None
            state.accumulator.add(
                x // self.output_downsample, y // self.output_downsample, tile, self._window(tile.shape[-1])
            )

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drain()
        if self._world > 1:
            for index in range(len(self._slides)):
                state = self._state(index)
                assert state.accumulator is not None
                state.accumulator.flush()
                _write_rank_meta(state, self._partial_dir(index, self._rank))
            trainer.strategy.barrier("wsiseg-merge")
            if self._rank == 0:
                for index in range(len(self._slides)):
                    self._merge_ranks(index)
                    self._finish(index)
            trainer.strategy.barrier("wsiseg-written")
        else:
            for index in range(len(self._slides)):
                if index not in self._finished:
                    self._finish(index)
        if self._rank == 0:
            self._write_summary()

    # -- helpers -------------------------------------------------------------------------------------------------
    def _window(self, size: int) -> np.ndarray:
        if size not in self._windows:
            self._windows[size] = blend_window(size, self.blend, self.sigma_scale)
        return self._windows[size]

    def _slide_dir(self, index: int) -> Path:
        return self.output_dir / self._slides[index].name

    def _partial_dir(self, index: int, rank: int) -> Path:
        return self._slide_dir(index) / f".partial-rank{rank}"

    def _state(self, index: int, started: float | None = None) -> _SlideState:
        state = self._states.get(index)
        if state is None:
            slide = self._slides[index]
            self._slide_dir(index).mkdir(parents=True, exist_ok=True)
            partial, size = self._partial_dir(index, self._rank), slide.grid.output_size
            accumulator: BlendingAccumulator
            if slide.grid.overlap == 0 and self._channels == 1:
                # no two tiles share a pixel: nothing to blend, keep the final uint8 values
                accumulator = TileMosaic(partial, size, self.chunk, self.cache_bytes)
            else:
                accumulator = BlendingAccumulator(partial, self._channels, size, self.chunk, self.cache_bytes)
            state = _SlideState(
                accumulator=accumulator,
                started=self._batch_clock if started is None else started,
            )
            self._states[index] = state
        return state

    def _merge_ranks(self, index: int) -> None:
        state = self._state(index)
        assert state.accumulator is not None
        state.tiles_per_rank = [len(state.tiles_seen)]
        for rank in range(1, self._world):
            partial = self._partial_dir(index, rank)
            meta = json.loads((partial / "rank.json").read_text())
            overlap = state.tiles_seen.intersection(meta["tiles"])
            if overlap:
                log.warning("slide %s: %d tile(s) predicted on several ranks", self._slides[index].name, len(overlap))
                state.duplicates += len(overlap)
            state.tiles_seen.update(meta["tiles"])
            state.tiles_per_rank.append(len(meta["tiles"]))
            state.duplicates += meta["duplicates"]
            state.error = state.error or meta["error"]
            state.accumulator.merge_from(partial)
            shutil.rmtree(partial, ignore_errors=True)

    def _finish(self, index: int) -> None:
        """Write one slide's outputs (rank 0 only) and free its store."""
        self._finished.add(index)
        slide = self._slides[index]
        state = self._state(index)
        out_dir = self._slide_dir(index)
        accumulator = state.accumulator
        assert accumulator is not None
        report = self._base_report(slide, state)
        try:
            if state.error:
                raise RuntimeError(state.error)
            self._write_outputs(slide, accumulator, out_dir, report)
            report["status"] = "complete"
        except Exception as exc:
            report["status"] = "failed"
            report["error"] = str(exc)
            for name in ("mask.tif", "heatmap.png", "tumour.geojson", "tumour.xml"):
                (out_dir / name).unlink(missing_ok=True)
            log.error("slide '%s' failed: %s", slide.path, exc)
        finally:
            accumulator.delete()
            shutil.rmtree(out_dir / ".scratch", ignore_errors=True)
        seconds = max(time.perf_counter() - state.started, 1e-9)
        report["wall_time_s"] = round(seconds, 3)
        report["patches_per_s"] = round(len(state.tiles_seen) / seconds, 2)
        write_json_atomic(out_dir / "report.json", report)
        self.results.append(
            {
                "slide": str(slide.path),
                "name": slide.name,
                "status": report["status"],
                "tiles": len(state.tiles_seen),
                "seconds": report["wall_time_s"],
                "reason": report.get("error", ""),
            }
        )
        if report["status"] == "complete":
            log.info(
                "slide %d/%d %s: %d tiles in %.1f s (%.1f patches/s) -> %s",
                index + 1,
                len(self._slides),
                slide.name,
                len(state.tiles_seen),
                seconds,
                report["patches_per_s"],
                out_dir,
            )

    def _base_report(self, slide: SlideTiles, state: _SlideState) -> dict[str, Any]:
        output_mpp = None if slide.level.mpp is None else slide.level.mpp * self.output_downsample
        return {
            "slide": str(slide.path),
            "name": slide.name,
            "status": "incomplete",
            "level0_size": list(slide.level0_size),
            "level": slide.level.level,
            "level_downsample": slide.level.downsample,
            "level_size": list(slide.level.size),
            "mpp_level0": None if slide.level.mpp is None else slide.level.mpp / slide.level.downsample,
            "mpp_read_level": slide.level.mpp,
            "resampled": slide.level.resampled,
            "read_scale": slide.level.scale,
            "source_downsample": slide.level.source_downsample,
            "source_level_size": list(slide.level.source_size),
            "output_downsample": self.output_downsample,
            "output_size": list(slide.grid.output_size),
            "output_mpp": output_mpp,
            "patch_size": slide.grid.patch_size,
            "overlap": slide.grid.overlap,
            "blend": self.blend,
            "tiles_total": slide.tiles_total,
            "tiles_tissue": slide.tiles_tissue,
            "tiles_processed": len(state.tiles_seen),
            "tiles_duplicated": state.duplicates,
            "tissue_fraction": round(slide.tissue_fraction, 6),
            "world_size": self._world,
            "tiles_per_rank": state.tiles_per_rank or [len(state.tiles_seen)],
            "batch_size": self._batch_size_used or None,
            "config_hash": config_hash(self.run_config),
            "provenance": self.provenance,
            "config": self.run_config,
        }

    def _write_outputs(
        self, slide: SlideTiles, accumulator: BlendingAccumulator, out_dir: Path, report: dict[str, Any]
    ) -> None:
        labels = accumulator.channels > 1
        threshold_u8 = int(np.ceil(self.threshold * 255 - 1e-9))
        positive = [0]

        width = slide.grid.output_size[0]

        def bands() -> Any:
            for _, rows, chunks in accumulator.band_chunks():
                band = np.zeros((rows, width), np.uint8)
                for x0, mean, covered in chunks:
                    if labels:
                        assert covered is not None
                        block = np.where(covered, mean.argmax(axis=0), 0).astype(np.uint8)
                        positive[0] += int(np.count_nonzero(block))
                    else:  # a TileMosaic already holds round(255·p)
                        block = mean[0] if isinstance(accumulator, TileMosaic) else probabilities_to_u8(mean[0])
                        positive[0] += int(np.count_nonzero(block >= threshold_u8))
                    band[:, x0 : x0 + block.shape[1]] = block
                yield band

        output_mpp = report["output_mpp"]
        with atomic_path(out_dir / "mask.tif") as tmp:
            preview = write_pyramid_tiff(
                tmp,
                bands(),
                slide.grid.output_size,
                out_dir / ".scratch",
                output_mpp,
                labels=labels,
                tile=self.tiff_tile,
                compression=self.compression,
                preview_side=self.heatmap_max_side,
            )
        thumbnail = slide.thumbnail.rgb
        scale = min(1.0, self.heatmap_max_side / max(thumbnail.shape[:2]))
        if scale < 1.0:
            size = (max(1, round(thumbnail.shape[1] * scale)), max(1, round(thumbnail.shape[0] * scale)))
            thumbnail = np.asarray(Image.fromarray(thumbnail).resize(size, Image.Resampling.BILINEAR))
        heatmap = render_heatmap(thumbnail, preview, labels=labels)
        with atomic_path(out_dir / "heatmap.png") as tmp:
            Path(tmp).write_bytes(png_bytes(heatmap))
        report["mask_levels"] = len(pyramid_sizes(slide.grid.output_size, self.tiff_tile))
        report["tumour_pixels"] = positive[0]
        report["threshold"] = self.threshold
        report["tumour_area_mm2"] = None if output_mpp is None else positive[0] * (output_mpp * 1e-3) ** 2
        if self.contours:
            report.update(
                write_contours(
                    out_dir / "mask.tif",
                    out_dir,
                    self.contours,
                    threshold=self.threshold,
                    min_area_um2=self.min_area_um2,
                    level0_per_mask_px=report["level_downsample"] * report["output_downsample"],
                    mpp=report["mpp_level0"],
                    level0_size=tuple(report["level0_size"]),
                    labels=labels,
                )
            )

    def _write_summary(self) -> None:
        write_json_atomic(self.output_dir / "summary.json", {"slides": self.results})
        lines = [f"{'slide':<40} {'status':<9} {'tiles':>7} {'seconds':>9}  reason"]
        for row in self.results:
            name = Path(row["slide"]).name
            lines.append(f"{name:<40} {row['status']:<9} {row['tiles']:>7} {row['seconds']:>9.1f}  {row['reason']}")
        log.info("summary (%s):\n%s", self.output_dir / "summary.json", "\n".join(lines))


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".wsiseg-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserInputError(
            f"writer.output_dir '{folder}' is not writable ({exc.strerror or exc}): choose another folder"
        ) from None


def _remove_stale(slide_dir: Path) -> None:
    """Remove what an interrupted run left in a slide folder: the old report (the slide is being redone), partial
    stores, scratch pyramids and temporary files. Completed outputs are replaced atomically later."""
    (slide_dir / "report.json").unlink(missing_ok=True)
    for leftover in slide_dir.glob(".*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def read_complete_report(slide_dir: Path, expected_hash: str) -> dict[str, Any] | None:
    """The slide's report if it says ``complete`` for the same config hash and its outputs exist, else None."""
    try:
        report = json.loads((slide_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if report.get("status") != "complete" or report.get("config_hash") != expected_hash:
        return None
    if not (slide_dir / "mask.tif").is_file() or not (slide_dir / "heatmap.png").is_file():
        return None
    return report


def _write_rank_meta(state: _SlideState, partial: Path) -> None:
    partial.mkdir(parents=True, exist_ok=True)
    meta = {"tiles": sorted(state.tiles_seen), "error": state.error, "duplicates": state.duplicates}
    (partial / "rank.json").write_text(json.dumps(meta))
