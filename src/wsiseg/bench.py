"""``wsiseg-bench``: naive per-patch inference vs the optimised pipeline, with the read and model bounds.

All cases run on the same tiles in one process, one after the other, so their ratios are measured side by side:

1. **naive** — the replaced script's loop: read one region with OpenSlide, preprocess on the CPU, FP32 batch 1,
   result back to the host, one tile at a time;
2. **optimised** — the real ``wsiseg-predict`` pipeline (DataLoader workers, the trainer's precision, channels_last,
   optional compile, the writer included);
3. **read bound** — the data pipeline alone (workers reading and decoding tiles, nothing else);
4. **model bound** — the module on device-resident batches;
5. **host bound** — the pipeline with a zero-cost network (:mod:`wsiseg.bench_host`): the ceiling any device reaches
   on this host, with the host's CPU time per tile by thread.

    wsiseg-bench                                   # generated slide, demo-sized defaults
    wsiseg-bench bench.slide=/data/test_040.tif model=unet_camelyon trainer=gpu model.compile=true
    wsiseg-bench data=patches data.input_dir=patches/ writer=patches   # per-image loop vs batched, images/s
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import openslide
import psutil
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from wsiseg.atomic import write_json_atomic
from wsiseg.batch_size import resolve_batch_size
from wsiseg.bench_host import host_bound_case
from wsiseg.cli import exit_if_overrides_bad, exit_if_run_dir_unusable, user_errors
from wsiseg.config import build, build_trainer, config_dir
from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.data.jpeg_tiles import decode_batch
from wsiseg.data.slide import read_rgb
from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide
from wsiseg.errors import UserInputError
from wsiseg.model import has_fixed_weights, holds_weights
from wsiseg.module import SegmentationModule, apply_activation
from wsiseg.options import check_option_types
from wsiseg.pipeline.assemble import assemble
from wsiseg.quantize import dice

__all__ = ["CaseResult", "PeakMemory", "main", "run_bench"]

log = logging.getLogger(__name__)

MODEL_BOUND_TILES = 128  # tiles timed for the model bound when bench.model_batches batches hold fewer


@dataclass
class CaseResult:
    """Throughput of one case over ``patches`` tiles."""

    name: str
    patches: int
    seconds: float
    peak_gpu_mb: float | None
    peak_rss_mb: float

    @property
    def patches_per_s(self) -> float:
        return self.patches / self.seconds if self.seconds > 0 else float("nan")

    @property
    def ms_per_patch(self) -> float:
        return 1e3 * self.seconds / self.patches if self.patches else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "patches_per_s": round(self.patches_per_s, 2),
            "ms_per_patch": round(self.ms_per_patch, 3),
        }


class PeakMemory:
    """Samples the RSS of this process plus its children (DataLoader workers) every 20 ms, and the CUDA peak."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_rss = device, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
            self.peak_rss = max(self.peak_rss, total)
            self._stop.wait(0.02)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_gpu_mb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(name: str, device: torch.device, patches: int, fn: Any) -> CaseResult:
    with PeakMemory(device) as memory:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds = time.perf_counter() - start
    result = CaseResult(name, patches, seconds, memory.peak_gpu_mb, memory.peak_rss / 2**20)
    log.info(
        "%-12s %6d patches  %8.2f patches/s  %8.2f ms/patch", name, patches, result.patches_per_s, result.ms_per_patch
    )
    return result


def naive_loop(
    datamodule: SlideTileDataModule,
    net: torch.nn.Module,
    device: torch.device,
    mean: torch.Tensor,
    std: torch.Tensor,
    limit: int,
    skip: int = 0,
) -> Iterator[np.ndarray]:
    """The replaced script: one OpenSlide read, CPU preprocessing, FP32 batch 1, result to the host, per tile, for
    ``limit`` tiles after the first ``skip`` (in the datamodule's order)."""
    mean_np = mean.view(1, 1, -1).cpu().numpy()
    std_np = std.view(1, 1, -1).cpu().numpy()
    start, end = skip, skip + max(0, limit)
    for slide in datamodule.slides:
        count = len(slide.origins)
        if end <= 0:
            return
        if start < count:
            handle = openslide.OpenSlide(str(slide.path))
            size = slide.grid.patch_size
            for x, y in slide.origins[max(0, start) : end]:
                rgb = read_rgb(handle, int(x), int(y), slide.level, size, size)
                normalised = (rgb.astype(np.float32) / 255.0 - mean_np) / std_np
                tensor = torch.from_numpy(normalised.transpose(2, 0, 1).copy())[None].to(device)
                with torch.no_grad():
                    yield net(tensor).max(dim=1).values.cpu().numpy()
            handle.close()
        start, end = start - count, end - count


def naive_reference(module: SegmentationModule) -> torch.nn.Module:
    """The FP32 eager PyTorch network the naive loop and the agreement figures run: a copy of the module's own torch
    network (a second instantiate would draw other weights for ``checkpoint=random``), or, for an ONNX file
    (``model=onnx`` / ``model=openvino``), the torch network its sidecar records (architecture and checkpoint, checked
    by SHA-256), so the naive loop is the replaced script and not the runtime under test.

    Raises:
        UserInputError: the ONNX file's sidecar does not name a checkpoint that is still there unchanged.
    """
    if not holds_weights(module.net):
        return copy.deepcopy(module.net).eval()
    from wsiseg.model import load_checkpoint
    from wsiseg.onnx_net import sidecar_path
    from wsiseg.provenance import sha256_file

    sidecar = sidecar_path(Path(str(module.net.path)).expanduser().absolute())
    try:
        data = json.loads(sidecar.read_text())
        architecture, checkpoint = data["architecture"], data["checkpoint"]
    except (OSError, ValueError, KeyError) as exc:
        raise UserInputError(
            f"wsiseg-bench with an ONNX network needs its wsiseg-export sidecar '{sidecar}' for the naive loop's torch "
            f"network ({type(exc).__name__}: {exc}); re-export it with wsiseg-export"
        ) from None
    net = instantiate(architecture)
    if holds_weights(net) or has_fixed_weights(net):
        return net.eval()
    path = Path(str((checkpoint or {}).get("path", "")))
    if not checkpoint or not path.is_file() or sha256_file(path) != checkpoint.get("sha256"):
        raise UserInputError(
            f"wsiseg-bench with an ONNX network runs the naive loop on the checkpoint it was exported from, which "
            f"'{sidecar}' names as '{path}': that file is missing or changed; bench the checkpoint instead "
            "(model=unet_camelyon model.checkpoint=...)"
        )
    return load_checkpoint(net, path).eval()


def peer_cases(
    bench: BenchOptions,
    datamodule: SlideTileDataModule,
    reference: torch.nn.Module,
    module: SegmentationModule,
    naive_outputs: list[np.ndarray],
) -> dict[str, dict[str, Any]]:
    """The peers on the naive loop's tiles with the same FP32 weights (:mod:`wsiseg.bench_peers`): per peer
    ``patches_per_s`` and ``mean_abs_grey_diff_vs_naive``, or ``skipped`` with the reason."""
    from wsiseg.bench_peers import MONAI_MISSING, mean_abs_grey_diff, monai_available, monai_wsi_case

    slide = datamodule.slides[0]
    if not monai_available():
        print(f"wsiseg-bench: monai skipped: {MONAI_MISSING}")
        return {"monai": {"skipped": MONAI_MISSING}}
    if len(datamodule.slides) != 1 or slide.level.scale != 1.0:
        why = "MONAI's splitter reads one unresampled level of one slide: bench one slide at a pyramid level"
        print(f"wsiseg-bench: monai skipped: {why}")
        return {"monai": {"skipped": why}}
    origins = slide.origins[: len(naive_outputs)]
    cpu_reference = reference.cpu()
    result = monai_wsi_case(
        str(slide.path),
        slide.level.level,
        slide.grid.patch_size,
        origins,
        cpu_reference,
        module.mean.cpu(),
        module.std.cpu(),
        datamodule.batch_size,
    )
    patch = slide.grid.patch_size
    by_origin = {(int(x), int(y)): out for (x, y), out in zip(origins, naive_outputs)}
    return {
        "monai": {
            "tiles": result.tiles,
            "seconds": round(result.seconds, 3),
            "patches_per_s": round(result.tiles / result.seconds, 2),
            "batch_size": datamodule.batch_size,
            "mean_abs_grey_diff_vs_naive": round(mean_abs_grey_diff(result.output, by_origin, patch), 4),
            "pipeline": "PatchInferer + WSISlidingWindowSplitter(OpenSlide) + AvgMerger, FP32 eager, on the CPU",
        }
    }


def model_only(module: SegmentationModule, trainer: Any, batch: torch.Tensor, batches: int) -> None:
    with torch.inference_mode(), trainer.precision_plugin.forward_context():
        for _ in range(batches):
            module(batch)


def precision_agreement(
    module: SegmentationModule, trainer: Any, reference: torch.nn.Module, tiles: torch.Tensor
) -> dict[str, float]:
    """Mixed-precision module vs FP32 eager reference on the same tiles: Dice of masks at 0.5, max |Δp|."""
    module.to(tiles.device)  # trainer.predict's teardown moves the module back to the CPU
    with torch.inference_mode():
        with trainer.precision_plugin.forward_context():
            mixed = module(tiles).float()
        x = module.normalise(tiles)
        fp32 = apply_activation(reference(x).float(), module.activation)
        fp32 = fp32.amax(dim=1, keepdim=True) if module.reduction == "max" else fp32[:, module.channel_index :][:, :1]
        if module.output_downsample > 1:
            fp32 = torch.nn.functional.avg_pool2d(fp32, module.output_downsample)
    diff = (mixed - fp32).abs()
    return {
        "dice_vs_fp32": round(dice(mixed >= 0.5, fp32 >= 0.5), 6),
        "max_abs_prob_diff": float(diff.max()),
        "mean_abs_prob_diff": float(diff.mean()),
    }


def network_gflop_per_patch(net: torch.nn.Module, patch: int, device: torch.device) -> float:
    """GFLOP of one ``patch × patch`` tile through ``net`` (FP32, counted by ``torch.utils.flop_counter``: 2 per
    multiply-add of convolutions and matrix products; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, patch, patch, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return counter.get_total_flops() / 1e9


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Measured dense matrix-multiply throughput on ``device`` in ``dtype`` (TFLOP/s): what this hardware and PyTorch's
    BLAS reach on large square products, a practical ceiling for the network's convolutions."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 2:
        a @ b
        count += 1
        if count % 4 == 0:
            _sync(device)
    _sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def bench_warnings(efficiency: float, naive_halves: list[float]) -> list[str]:
    """What makes a bench run's figures untrustworthy: the pipeline beating its own bound by more than 5 % (the bound's
    case ran while the machine was busier), or the two naive halves more than 10 % apart (the machine's speed moved)."""
    warnings = []
    if efficiency > 1.05:
        warnings.append(
            f"pipeline efficiency {efficiency:.0%} exceeds the bound: the machine's load changed between the "
            "cases; re-run on a quiet machine before quoting these figures"
        )
    low, high = min(naive_halves), max(naive_halves)
    if low > 0 and high / low > 1.10:
        warnings.append(
            f"the naive halves differ by {high / low - 1:.0%} ({low:.2f} vs {high:.2f} patches/s): the machine's "
            "speed drifted during the run; repeat it and quote ratios"
        )
    for warning in warnings:
        log.warning("bench: %s", warning)
    return warnings


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the network's convolutions run in under a Lightning ``precision``."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    return torch.float16 if precision.startswith("16") else torch.float32


def hardware_figures(
    reference: torch.nn.Module, patch: int, device: torch.device, precision: str, naive_rate: float, model_rate: float
) -> dict[str, Any]:
    """FLOP per tile, measured matrix-multiply peaks (the run's compute dtype and FP32) and how much of them the naive
    network and the model bound use: says whether the network is near the hardware's ceiling."""
    gflop = network_gflop_per_patch(reference, patch, device)
    dtype = compute_dtype(precision)
    peak = matmul_peak_tflops(device, dtype)
    peak_fp32 = peak if dtype == torch.float32 else matmul_peak_tflops(device, torch.float32)
    model_tflops, naive_tflops = model_rate * gflop / 1e3, naive_rate * gflop / 1e3
    return {
        "network_gflop_per_patch": _significant(gflop),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "matmul_peak_tflops": _significant(peak),
        "matmul_peak_fp32_tflops": _significant(peak_fp32),
        "flop_ceiling_patches_per_s": round(peak * 1e3 / gflop, 1) if gflop else None,
        "model_bound_tflops": _significant(model_tflops),
        "model_bound_fraction_of_peak": _significant(model_tflops / peak),
        "naive_tflops": _significant(naive_tflops),
        "naive_fraction_of_fp32_peak": _significant(naive_tflops / peak_fp32),
    }


def _significant(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant figures: small rates (a slow FP32 CPU reaches ~0.01 TFLOP/s) keep their
    precision, which a fixed number of decimals would round away."""
    return float(f"{value:.{digits}g}")


def _ddp_throughput(cfg: DictConfig, slides: Sequence[Path], ranks: int, out_dir: Path) -> dict[str, Any]:
    """Whole ``wsiseg-predict`` run over ``slides`` on ``ranks`` CPU processes (gloo), with the bench's
    ``data.shard``: throughput from wall time, and from the run's reports and ``summary.json`` how long each rank
    waited for the others at the end (rank 0's and the longest) and how long the first slide took to appear."""
    script = Path(sys.executable).parent / "wsiseg-predict"
    trainer = "trainer=cpu" if ranks == 1 else "trainer=ddp_cpu"
    args = [
        str(script),
        trainer,
        f"trainer.devices={ranks}",
        "trainer.precision=32",
        "trainer.enable_progress_bar=false",
        f"data.slides=[{','.join(str(s) for s in slides)}]",
        f"data.patch_size={cfg.data.patch_size}",
        f"data.num_workers={cfg.data.num_workers}",
        f"data.batch_size={'null' if cfg.data.batch_size is None else cfg.data.batch_size}",
        f"data.shard={cfg.data.get('shard', 'auto')}",
        f"hydra.run.dir={out_dir}",
    ]
    if cfg.model.get("checkpoint"):
        args.append(f"model.checkpoint={cfg.model.checkpoint}")
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("model")
        if choice:
            args.append(f"model={choice}")
    start = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the {ranks}-rank wsiseg-predict run failed (exit {result.returncode}): {tail[0]}")
    reports = [json.loads(p.read_text()) for p in out_dir.glob("*/report.json")]
    tiles = sum(r["tiles_processed"] for r in reports)
    clocks = json.loads((out_dir / "summary.json").read_text()).get("ranks") or []
    first_batch = min((c["first_batch_at"] for c in clocks if "first_batch_at" in c), default=None)
    first_slide = min((r["finished_at"] for r in reports), default=None)
    return {
        "ranks": ranks,
        "shard": str(cfg.data.get("shard", "auto")),
        "slides": len(slides),
        "tiles": tiles,
        "seconds": round(seconds, 2),
        "patches_per_s": round(tiles / seconds, 2),
        "rank0_idle_at_end_s": clocks[0]["idle_at_end_s"] if clocks else None,
        "max_idle_at_end_s": max((c["idle_at_end_s"] for c in clocks), default=None),
        "first_tile_to_first_slide_s": None
        if first_batch is None or first_slide is None
        else round(first_slide - first_batch, 3),
    }


def cohort(bench: BenchOptions, slide: Path, out_dir: Path) -> list[Path]:
    """The slides the DDP timings run on: ``bench.cohort_slides`` generated slides of varied sizes (a cohort), or
    the bench's own slide."""
    if bench.cohort_slides <= 0:
        return [slide]
    slides = []
    for i in range(bench.cohort_slides):
        side = max(1024, bench.generated_size // 2 + (i % 4) * bench.generated_size // 8)
        path = out_dir / "cohort" / f"cohort_{i:03d}.tif"
        if not path.exists():
            write_synthetic_slide(path, SyntheticSlide(side, side, seed=bench.seed + 1 + i, tissue_scale=0.3))
        slides.append(path)
    return slides


@dataclass(frozen=True)
class BenchOptions:
    """The ``bench`` section of ``wsiseg-bench`` (its ``_target_``), checked on construction.

    Attributes:
        slide: the slide to time; None generates a synthetic one in the run folder.
        generated_size: side of the generated slide, px.
        seed: seed of the generated slide.
        max_tiles: tissue tiles every case runs on.
        naive_tiles: the naive loop runs on the first this many of them.
        model_batches: batches timed for the model bound.
        ddp_ranks: rank counts of the whole-run CPU DDP timings (e.g. ``[1, 2]``); empty: none.
        cohort_slides: the DDP timings run on this many generated slides (a cohort, for ``data.shard``); 0: the
            bench's slide.
        peers: also time the peers (MONAI's WSI pipeline) on the naive loop's tiles and weights; a peer that is not
            installed is skipped with a line saying so.
        host_bound: also run the pipeline with a zero-cost network (:mod:`wsiseg.bench_host`): the host's ceiling.

    Raises:
        UserInputError: one line naming the ``bench.*`` key.
    """

    slide: str | None = None
    generated_size: int = 20480
    seed: int = 3
    max_tiles: int = 512
    naive_tiles: int = 128
    model_batches: int = 16
    ddp_ranks: Sequence[int] = ()
    cohort_slides: int = 0
    peers: bool = True
    host_bound: bool = True

    def __post_init__(self) -> None:
        for key in ("generated_size", "max_tiles", "naive_tiles", "model_batches"):
            if int(getattr(self, key)) < 1:
                raise UserInputError(f"bench.{key} must be a positive integer, got {getattr(self, key)}")
        if any(int(r) < 1 for r in self.ddp_ranks):
            raise UserInputError(f"bench.ddp_ranks must list rank counts >= 1, got {list(self.ddp_ranks)}")
        if int(self.cohort_slides) < 0:
            raise UserInputError(f"bench.cohort_slides must be >= 0 (0: the bench slide), got {self.cohort_slides}")


def run_bench(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run every case on the same tiles; returns the dict written to ``bench.json``."""
    bench: BenchOptions = build(cfg.bench)
    out_dir.mkdir(parents=True, exist_ok=True)
    slide_path = Path(bench.slide) if bench.slide else None
    if slide_path is None:
        slide_path = out_dir / "bench_slide.tif"
        if not slide_path.exists():
            spec = SyntheticSlide(bench.generated_size, bench.generated_size, seed=bench.seed, tissue_scale=0.3)
            write_synthetic_slide(slide_path, spec)
    datamodule: SlideTileDataModule = instantiate(cfg.data, slides=[str(slide_path)])
    module: SegmentationModule = instantiate(cfg.model)
    trainer = build_trainer(cfg.trainer, callbacks=[])
    device = trainer.strategy.root_device
    datamodule = datamodule.with_batch_size(
        resolve_batch_size(datamodule.batch_size, module, datamodule.patch_size, device, trainer)
    )
    tiles = datamodule.keep_first_tiles(bench.max_tiles)
    if tiles == 0:
        raise UserInputError(
            f"bench.slide '{slide_path}' has no tissue tiles at this level: choose another slide, or "
            "data.tissue.enabled=false"
        )
    reference = naive_reference(module).to(device)
    int8 = None
    if module.runtime == "openvino_int8":  # calibrated on the bench's tiles as a run would; its seconds are reported
        from wsiseg.int8_runtime import prepare_int8

        threshold = float(OmegaConf.select(cfg, "writer.threshold", default=0.5))
        int8 = prepare_int8(module, datamodule, module.int8, out_dir, threshold).as_report()
    module.prepare(device.type, planned_tiles=tiles, precision=str(trainer.precision))
    module.to(device).eval()
    batch_size = datamodule.batch_size
    patch = datamodule.patch_size
    log.info(
        "bench: %d tiles of %d px, batch %d, %d workers, %s, precision %s, compile %s, channels_last %s",
        tiles,
        patch,
        batch_size,
        datamodule.num_workers,
        device,
        trainer.precision,
        module.compiled,
        module.channels_last,
    )
    results: dict[str, CaseResult] = {}

    # 4. model bound (first: it also triggers compilation, timed separately)
    with torch.inference_mode():  # like the DataLoader's batches under trainer.predict (no defensive copy per call)
        images = torch.randint(0, 256, (batch_size, 3, patch, patch), dtype=torch.uint8, device=device)
    start = time.perf_counter()
    model_only(module, trainer, images, 1)
    _sync(device)
    warmup_s = time.perf_counter() - start
    # at least bench.model_batches batches and, for small (CPU) batches, about MODEL_BOUND_TILES tiles, so the bound is
    # not a sub-second sample; never more tiles than the run has
    wanted = max(bench.model_batches, -(-MODEL_BOUND_TILES // batch_size))
    model_batches = max(2, min(wanted, -(-tiles // batch_size)))
    results["model_bound"] = _timed(
        "model_bound", device, model_batches * batch_size, lambda: model_only(module, trainer, images, model_batches)
    )

    # 3. read bound: the real DataLoader (workers read + decode), nothing else
    def read_all() -> None:
        for batch in datamodule.predict_dataloader():
            if "jpeg_tiles" in batch:  # data.reader=jpeg: decoding + assembly on the device are part of reading
                decode_batch(batch, device)

    results["read_bound"] = _timed("read_bound", device, tiles, read_all)

    # 1. naive: the replaced script's loop on the first naive_tiles of the same tiles, half before and half after the
    # optimised run, so a machine whose speed drifts during the bench (shared CPUs) does not favour either side
    naive_tiles = max(1, min(tiles, bench.naive_tiles))
    halves = (naive_tiles // 2, naive_tiles - naive_tiles // 2)

    naive_outputs: list[np.ndarray] = []  # the FP32 batch-1 reference of the first naive_tiles tiles, in order

    def naive(limit: int, skip: int) -> None:
        naive_outputs.extend(naive_loop(datamodule, reference, device, module.mean, module.std, limit, skip))

    naive_first = _timed("naive (1st half)", device, halves[0], lambda: naive(halves[0], 0))

    # 2. optimised: the product's run (wsiseg.pipeline.assemble: plan, data module, writer, trainer) on the same tiles,
    # with the module prepared (and compiled) above
    assembly = assemble(_run_config(cfg, out_dir / "predict", [str(slide_path)]), module=module, first_tiles=tiles)
    results["optimised"] = _timed("optimised", device, assembly.tiles, assembly.execute)

    naive_second = _timed("naive (2nd half)", device, halves[1], lambda: naive(halves[1], halves[0]))
    results["naive"] = CaseResult(
        "naive",
        naive_tiles,
        naive_first.seconds + naive_second.seconds,
        max((m for m in (naive_first.peak_gpu_mb, naive_second.peak_gpu_mb) if m is not None), default=None),
        max(naive_first.peak_rss_mb, naive_second.peak_rss_mb),
    )
    naive_halves = [round(naive_first.patches_per_s, 2), round(naive_second.patches_per_s, 2)]

    peers = peer_cases(bench, datamodule, reference, module, naive_outputs) if bench.peers else {}
    for row in peers.values():
        if "patches_per_s" in row:
            row["speedup_optimised_vs_peer"] = round(results["optimised"].patches_per_s / row["patches_per_s"], 3)

    # as many tiles as a batch, so a compiled network sees the shape it was compiled for
    sample = torch.stack([datamodule.dataset[i]["image"] for i in range(min(batch_size, tiles))]).to(device)
    agreement = precision_agreement(module, trainer, reference, sample)
    host_bound = None
    if bench.host_bound:
        with torch.inference_mode(), trainer.precision_plugin.forward_context():
            maps = module(sample).to(module.output_dtype)
        host_bound = host_bound_case(cfg, datamodule, maps, out_dir / "host_bound")
        log.info("host_bound: %s", host_bound)

    optimised = results["optimised"].patches_per_s
    read_rate, model_rate = results["read_bound"].patches_per_s, results["model_bound"].patches_per_s
    bound = min(read_rate, model_rate)
    # Reading and the network on the same cores (a CPU run) cannot overlap for free: this bound assumes they take
    # turns. On a GPU the pipeline should beat it.
    serial_bound = 1 / (1 / read_rate + 1 / model_rate)
    summary = {
        "speedup_optimised_vs_naive": round(optimised / results["naive"].patches_per_s, 3),
        **_int8_figures(int8, results["optimised"], results["naive"].patches_per_s),
        "pipeline_efficiency": round(optimised / bound, 3),
        "serial_bound_patches_per_s": round(serial_bound, 2),
        "efficiency_vs_serial_bound": round(optimised / serial_bound, 3),
        "bound": "read" if read_rate < model_rate else "model",
        "warmup_first_batch_s": round(warmup_s, 2),
        "warnings": bench_warnings(optimised / bound, naive_halves),
        "naive_patches_per_s_before_after_optimised": naive_halves,
        "precision": str(trainer.precision),
        **agreement,
        **hardware_figures(
            reference, patch, device, str(trainer.precision), results["naive"].patches_per_s, model_rate
        ),
    }
    ddp_slides = cohort(bench, slide_path, out_dir) if bench.ddp_ranks else []
    ddp = [_ddp_throughput(cfg, ddp_slides, int(r), out_dir / f"ddp{r}") for r in bench.ddp_ranks]
    report = {
        "cases": {k: v.as_dict() for k, v in results.items()} | ({"host_bound": host_bound} if host_bound else {}),
        "summary": summary,
        "peers": peers,
        "ddp_cpu": ddp,
        "settings": {
            "slide": str(slide_path),
            "tiles": tiles,
            "patch_size": patch,
            "batch_size": batch_size,
            "num_workers": datamodule.num_workers,
            "reader": datamodule.reader,
            "reader_used": type(datamodule.predict_dataloader().dataset).__name__,
            "precision": str(trainer.precision),
            "compile": module.compiled,
            "runtime": module.runtime_used,
            "channels_last": module.channels_last,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "parameters": sum(p.numel() for p in reference.parameters()),
        },
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json_atomic(out_dir / "bench.json", report)
    print(format_table(report))
    return report


def run_patch_bench(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """``data=patches``: the replaced script's per-image loop (PIL read, CPU preprocessing, FP32 batch 1, heatmap PNG
    per image) vs the batched patch pipeline (``trainer.predict`` with the patch writer), on the same images."""
    from PIL import Image

    from wsiseg.data.patches import list_images
    from wsiseg.writers.heatmap import render_heatmap

    out_dir.mkdir(parents=True, exist_ok=True)
    datamodule = instantiate(cfg.data)
    module: SegmentationModule = instantiate(cfg.model)
    datamodule.plan_run(module.stride)  # the pipeline's own checks: a missing folder, no images (one line each)
    trainer = build_trainer(cfg.trainer, callbacks=[])
    device = trainer.strategy.root_device
    images = list_images(datamodule.input_dir, datamodule.extensions)
    if not images:
        raise UserInputError(f"data.input_dir '{datamodule.input_dir}' holds no images: pass a folder of patches")
    reference = copy.deepcopy(module.net).eval().to(device)
    stride = module.stride
    mean = module.mean.view(1, 1, -1).numpy()
    std = module.std.view(1, 1, -1).numpy()
    naive_dir = out_dir / "naive"
    naive_dir.mkdir(exist_ok=True)

    def naive() -> None:
        for index, path in enumerate(images):
            rgb = np.asarray(Image.open(path).convert("RGB"))
            h, w = rgb.shape[:2]
            padded = np.pad(rgb, ((0, -h % stride), (0, -w % stride), (0, 0)), constant_values=255)
            x = torch.from_numpy(((padded / 255.0 - mean) / std).astype(np.float32).transpose(2, 0, 1).copy())
            with torch.no_grad():
                probs = reference(x[None].to(device)).max(dim=1).values[0, :h, :w].cpu().numpy()
            heatmap = render_heatmap(rgb, np.clip(np.rint(probs * 255), 0, 255).astype(np.uint8))
            Image.fromarray(heatmap).save(naive_dir / f"{index}_heatmap.png")

    results = {"naive": _timed("naive", device, len(images), naive)}
    assembly = assemble(_run_config(cfg, out_dir / "predict"))  # the product's run: wsiseg.pipeline.assemble
    results["optimised"] = _timed("optimised", device, len(images), assembly.execute)
    report = {
        "mode": "patches",
        "cases": {k: {**v.as_dict(), "images_per_s": round(v.patches_per_s, 2)} for k, v in results.items()},
        "summary": {
            "speedup_optimised_vs_naive": round(results["optimised"].patches_per_s / results["naive"].patches_per_s, 3)
        },
        "settings": {
            "images": len(images),
            "batch_size": datamodule.batch_size,
            "num_workers": datamodule.num_workers,
            "precision": str(trainer.precision),
            "device": str(device),
        },
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json_atomic(out_dir / "bench.json", report)
    lines = [f"{'case':<12} {'images':>7} {'images/s':>9} {'ms/image':>9}"]
    for name, case in report["cases"].items():
        lines.append(f"{name:<12} {case['patches']:>7} {case['images_per_s']:>9.2f} {case['ms_per_patch']:>9.2f}")
    lines.append(f"speedup batched/naive: {report['summary']['speedup_optimised_vs_naive']:.2f}x")
    print("\n".join(lines))
    return report


def _int8_figures(int8: dict[str, Any] | None, optimised: CaseResult, naive_rate: float) -> dict[str, Any]:
    """``model.runtime=openvino_int8``: the outcome of its calibration and check, and the optimised run's speed-up
    over the naive loop with the calibration's seconds counted in (what a run of this many tiles costs end to end)."""
    if int8 is None:
        return {}
    with_calibration = optimised.patches / (optimised.seconds + int8["seconds"])
    return {
        "int8": int8,
        "speedup_optimised_with_int8_calibration_vs_naive": round(with_calibration / naive_rate, 3),
    }


def _run_config(cfg: DictConfig, output_dir: Path, slides: list[str] | None = None) -> DictConfig:
    """The bench's config as a prediction run's (``predict.yaml``'s keys): outputs in ``output_dir``, and in slide mode
    ``data.slides`` the bench slide."""
    run = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.update(run, "writer.output_dir", str(output_dir))
    if slides is not None:
        OmegaConf.update(run, "data.slides", slides)
    return run


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'case':<12} {'patches':>8} {'patches/s':>10} {'ms/patch':>9} {'peak GPU MB':>12} {'peak RSS MB':>12}"]
    for name in ("naive", "optimised", "read_bound", "model_bound"):
        c = report["cases"][name]
        gpu = "-" if c["peak_gpu_mb"] is None else f"{c['peak_gpu_mb']:.0f}"
        lines.append(
            f"{name:<12} {c['patches']:>8} {c['patches_per_s']:>10.2f} {c['ms_per_patch']:>9.2f} "
            f"{gpu:>12} {c['peak_rss_mb']:>12.0f}"
        )
    host = report["cases"].get("host_bound")
    if host:
        cpu = host["host_cpu_us_per_tile"]
        rate = "-" if host["patches_per_s"] is None else f"{host['patches_per_s']:.2f}"
        lines.append(
            f"{'host_bound':<12} {host['patches']:>8} {rate:>10}   (zero-cost network, steady state) host CPU per "
            f"tile: main {cpu['main']:.0f} us, stitch {cpu['stitch']:.0f} us, reader {cpu['reader']:.0f} us "
            f"({host['reader_in']}); finalise {host['finalise_s']} s; blocked {host['blocked_s']:.2f} s "
            f"({host['blocked_fraction']:.1%})"
        )
    s = report["summary"]
    lines.append(
        f"speedup optimised/naive: {s['speedup_optimised_vs_naive']:.2f}x   pipeline efficiency "
        f"{s['pipeline_efficiency']:.0%} of the {s['bound']} bound   first batch {s['warmup_first_batch_s']} s"
    )
    before, after = s["naive_patches_per_s_before_after_optimised"]
    lines.append(f"naive in two halves, before / after the optimised run: {before:.2f} / {after:.2f} patches/s")
    lines.append(
        f"read and model taking turns: {s['serial_bound_patches_per_s']:.1f} patches/s; optimised is "
        f"{s['efficiency_vs_serial_bound']:.0%} of that"
    )
    lines.append(
        f"{s['precision']} vs fp32: Dice {s['dice_vs_fp32']:.5f}, max |dp| {s['max_abs_prob_diff']:.4f}, "
        f"mean |dp| {s['mean_abs_prob_diff']:.5f}"
    )
    lines.append(
        f"network {s['network_gflop_per_patch']:.2f} GFLOP/patch; model bound "
        f"{s['model_bound_tflops']:.3f} TFLOP/s = {s['model_bound_fraction_of_peak']:.0%} of the measured "
        f"{s['compute_dtype']} matmul peak {s['matmul_peak_tflops']:.3f} TFLOP/s "
        f"(ceiling {s['flop_ceiling_patches_per_s']} patches/s); naive {s['naive_tflops']:.3f} TFLOP/s = "
        f"{s['naive_fraction_of_fp32_peak']:.0%} of the fp32 peak {s['matmul_peak_fp32_tflops']:.3f}"
    )
    for name, row in report.get("peers", {}).items():
        if "skipped" in row:
            lines.append(f"peer {name}: skipped ({row['skipped']})")
        else:
            lines.append(
                f"peer {name}: {row['patches_per_s']:.2f} patches/s on {row['tiles']} tiles, mean |d| vs naive "
                f"{row['mean_abs_grey_diff_vs_naive']:.3f} grey levels; optimised is "
                f"{row['speedup_optimised_vs_peer']:.2f}x"
            )
    lines.extend(f"WARNING: {w}" for w in s.get("warnings", []))
    for row in report["ddp_cpu"]:
        lines.append(
            f"ddp cpu {row['ranks']} rank(s), data.shard={row['shard']}, {row['slides']} slide(s): "
            f"{row['patches_per_s']:.2f} patches/s ({row['tiles']} tiles, {row['seconds']} s); rank 0 idle at the end "
            f"{row['rank0_idle_at_end_s']} s (longest {row['max_idle_at_end_s']} s); first slide written "
            f"{row['first_tile_to_first_slide_s']} s after the first tile"
        )
    return "\n".join(lines)


@hydra.main(config_path=str(config_dir()), config_name="bench", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    with user_errors("wsiseg-bench", run_dir=Path(HydraConfig.get().runtime.output_dir)):
        check_option_types(cfg, ("bench", "data", "model", "model.net", "trainer"))
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        if str(cfg.data.get("_target_", "")).endswith("PatchFolderDataModule"):
            run_patch_bench(cfg, out_dir)
        else:
            run_bench(cfg, out_dir)


def main() -> None:
    """Console entry point ``wsiseg-bench``; a run folder Hydra cannot create is one line, exit 2."""
    exit_if_run_dir_unusable("wsiseg-bench")
    exit_if_overrides_bad("wsiseg-bench", "bench")
    _hydra_main()


if __name__ == "__main__":
    main()
