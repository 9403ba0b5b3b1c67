"""The host-bound case of ``wsiseg-bench``: the real reader, data module, writer, stitcher and renderer with a zero-cost
network, so what is timed is everything a run does on the host around the network — the ceiling any device reaches on
this host.

The network is replaced by :class:`CachedMaps`: its ``predict_step`` returns maps the real module computed once
(same shape, dtype and device as the real ones, values of real tissue), so reading, transfer, the writer's blending
and slide finalisation see a real run's data. The writer blends on its own thread, as on GPUs, so the main loop, the
stitching and the readers are timed apart.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from wsiseg.config import build_trainer
from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.hardware import GPU_DEFAULT_BATCH
from wsiseg.module import step_outputs

__all__ = ["CachedMaps", "host_bound_case"]


class CachedMaps(pl.LightningModule):
    """A zero-cost stand-in for :class:`~wsiseg.module.SegmentationModule` in ``trainer.predict``: every batch gets
    the first ``n`` of ``maps`` (N, C, h, w; output px, the real module's dtype), with the batch's other keys and
    ``finite`` as the real ``predict_step`` returns them (:func:`wsiseg.module.step_outputs`). Like the maps,
    ``finite`` is the device's work and is computed once (on a CPU it costs ~1 ms per 512² float16 tile, which a GPU
    host does not pay).

    It keeps the clock of the steady state: wall and main-thread CPU time at the first and last batch, and the tiles
    of the batches after the first (:meth:`steady_state`).

    Args:
        maps: the maps to hand out, at least one batch's worth, on the device the batches arrive on.
    """

    def __init__(self, maps: torch.Tensor) -> None:
        super().__init__()
        self.maps = maps
        # the device's work, done once before the run (on a GPU host it is not the host's; inside the timed window it
        # cost ~40 ms on a CPU, more than a hundred tiles' worth of the host's own work)
        self.finite = self._finite(maps)
        self._first: tuple[float, float] | None = None
        self._last: tuple[float, float] = (0.0, 0.0)
        self._tiles_after_first = 0

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0, dataloader_idx: int = 0) -> dict[str, Any]:
        now = (time.perf_counter(), time.thread_time())
        count = batch["image"].shape[0]
        if self._first is None:
            self._first = now
        else:
            self._tiles_after_first += count
        self._last = now
        if count > self.maps.shape[0]:  # repeated once, not per batch: the stand-in itself costs nothing per tile
            self.maps = self.maps.repeat(-(-count // self.maps.shape[0]), 1, 1, 1)
            self.finite = self._finite(self.maps)
        device = batch["image"].device
        return step_outputs(batch, self.maps[:count].to(device), self.finite[:count].to(device))

    @staticmethod
    def _finite(maps: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(maps).flatten(1).all(dim=1)

    def steady_state(self) -> dict[str, float]:
        """``tiles`` after the first batch, the ``seconds`` and main-thread ``cpu_s`` from the first batch to the last
        (the start-up before the first batch and the writing after the last are left out)."""
        first = self._first or self._last
        return {
            "tiles": self._tiles_after_first,
            "seconds": self._last[0] - first[0],
            "cpu_s": self._last[1] - first[1],
        }


def _children_cpu_s() -> float:
    """CPU seconds of this process's finished children (DataLoader workers, once joined)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def host_bound_case(
    cfg: DictConfig, datamodule: SlideTileDataModule, maps: torch.Tensor, out_dir: Path
) -> dict[str, Any]:
    """Run ``datamodule``'s planned tiles through ``trainer.predict`` with :class:`CachedMaps` (``maps``: the real
    module's output on a batch of real tiles) and ``cfg.writer`` blending on its thread, as a GPU host runs them: in
    batches of :data:`wsiseg.hardware.GPU_DEFAULT_BATCH` tiles (fewer for a run of under 4 such batches); outputs go
    to ``out_dir``.

    Returns ``bench.json``'s ``cases.host_bound``: ``patches``, ``seconds`` (the whole ``trainer.predict``),
    ``patches_per_s`` (steady state: first to last batch), ``host_cpu_us_per_tile`` (``main``: the main thread,
    Lightning's loop, the data module's hooks and the writer's hand-over, between the first and last batch;
    ``stitch``: blending, on the writer's thread; ``reader``: the DataLoader workers' CPU, summed; without workers
    the process's other threads: its read threads and the thread pools finalisation encodes TIFF tiles on),
    ``finalise_s`` (per slide), ``blocked_s`` (the main loop waiting to hand a batch to the writer) and
    ``blocked_fraction`` (of the whole run).
    """
    # a GPU host's batches: the loop's per-batch cost is shared by as many tiles as on a GPU (CPU runs batch 2); at
    # least 4 batches, so there is a steady state to time after the first
    gpu_batch = min(GPU_DEFAULT_BATCH, max(1, datamodule.plan.tiles // 4))
    datamodule = datamodule.with_batch_size(max(datamodule.batch_size or 1, gpu_batch))
    if maps.shape[0] < datamodule.batch_size:  # a whole batch's maps up front: the stand-in's set-up is not timed
        maps = maps.repeat(-(-datamodule.batch_size // maps.shape[0]), 1, 1, 1)
    stand_in = CachedMaps(maps)
    writer = instantiate(cfg.writer, output_dir=str(out_dir), blend_thread=True, _partial_=True)(plan=datamodule.plan)
    trainer = build_trainer(cfg.trainer, callbacks=[writer])
    tiles = datamodule.plan.tiles
    children, process = _children_cpu_s(), time.process_time()
    start = time.perf_counter()
    trainer.predict(stand_in, datamodule=datamodule, return_predictions=False)
    seconds = time.perf_counter() - start
    children, process = _children_cpu_s() - children, time.process_time() - process
    steady, host = stand_in.steady_state(), writer.host_figures()
    steady_tiles = max(steady["tiles"], 1)
    workers = datamodule.num_workers > 0
    # without workers the main process reads, on its read threads: its CPU less the main thread, the stitching and
    # the finalising thread (what is left holds the read threads and the thread pools finalisation encodes on)
    others = process - steady["cpu_s"] - host["stitch_cpu_s"] - host["finalise_cpu_s"]
    reader_s = children if workers else max(0.0, others)
    return {
        "patches": tiles,
        "seconds": round(seconds, 3),
        "patches_per_s": round(steady["tiles"] / steady["seconds"], 2) if steady["seconds"] > 0 else None,
        "host_cpu_us_per_tile": {
            "main": round(1e6 * steady["cpu_s"] / steady_tiles, 1),
            "stitch": round(1e6 * host["stitch_cpu_s"] / tiles, 1),
            "reader": round(1e6 * reader_s / tiles, 1),
        },
        "reader_in": "workers" if workers else "main process",
        "finalise_s": host["finalise_s"],
        "blocked_s": host["blocked_s"],
        "blocked_fraction": round(host["blocked_s"] / seconds, 4),
        "slides": len(datamodule.plan.slides),
        "batch_size": datamodule.batch_size,
    }
