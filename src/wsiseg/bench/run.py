"""Runs ``wsiseg-bench``'s cases one after the other on the same tiles and writes ``bench.json``: on one slide
(:func:`run_bench`: naive, optimised, read, model and host bounds, peers, DDP) or, with ``data=patches``, on a folder
of patches (:func:`run_patch_bench`: the per-image loop vs the batched pipeline). The cases are in
:mod:`wsiseg.bench.cases`; the optimised case is the product's run (:func:`wsiseg.pipeline.assemble.assemble`)."""

from __future__ import annotations

import copy
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from wsiseg.atomic import write_json_atomic
from wsiseg.bench.cases import (
    CaseResult,
    model_only,
    naive_loop,
    naive_reference,
    precision_agreement,
    sync_device,
    timed,
)
from wsiseg.bench.ddp import cohort, ddp_throughput
from wsiseg.bench.hardware import hardware_figures
from wsiseg.bench.host import host_bound_case
from wsiseg.bench.options import BenchOptions
from wsiseg.bench.peers import peer_cases
from wsiseg.bench.report import bench_warnings, format_table, int8_figures
from wsiseg.config import build, build_trainer
from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.data.readers.jpeg.decode import decode_batch
from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide
from wsiseg.errors import UserInputError
from wsiseg.module import SegmentationModule
from wsiseg.pipeline.assemble import assemble
from wsiseg.pipeline.batch_size import resolve_batch_size

__all__ = ["run_bench", "run_patch_bench"]

log = logging.getLogger(__name__)

MODEL_BOUND_TILES = 128  # tiles timed for the model bound when bench.model_batches batches hold fewer


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
        from wsiseg.pipeline.int8 import prepare_int8

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
    sync_device(device)
    warmup_s = time.perf_counter() - start
    # at least bench.model_batches batches and, for small (CPU) batches, about MODEL_BOUND_TILES tiles, so the bound is
    # not a sub-second sample; never more tiles than the run has
    wanted = max(bench.model_batches, -(-MODEL_BOUND_TILES // batch_size))
    model_batches = max(2, min(wanted, -(-tiles // batch_size)))
    results["model_bound"] = timed(
        "model_bound", device, model_batches * batch_size, lambda: model_only(module, trainer, images, model_batches)
    )

    # 3. read bound: the real DataLoader (workers read + decode), nothing else
    def read_all() -> None:
        for batch in datamodule.predict_dataloader():
            if "jpeg_tiles" in batch:  # data.reader=jpeg: decoding + assembly on the device are part of reading
                decode_batch(batch, device)

    results["read_bound"] = timed("read_bound", device, tiles, read_all)

    # 1. naive: the replaced script's loop on the first naive_tiles of the same tiles, half before and half after the
    # optimised run, so a machine whose speed drifts during the bench (shared CPUs) does not favour either side
    naive_tiles = max(1, min(tiles, bench.naive_tiles))
    halves = (naive_tiles // 2, naive_tiles - naive_tiles // 2)

    naive_outputs: list[np.ndarray] = []  # the FP32 batch-1 reference of the first naive_tiles tiles, in order

    def naive(limit: int, skip: int) -> None:
        naive_outputs.extend(naive_loop(datamodule, reference, device, module.mean, module.std, limit, skip))

    naive_first = timed("naive (1st half)", device, halves[0], lambda: naive(halves[0], 0))

    # 2. optimised: the product's run (wsiseg.pipeline.assemble: plan, data module, writer, trainer) on the same tiles,
    # with the module prepared (and compiled) above
    assembly = assemble(_run_config(cfg, out_dir / "predict", [str(slide_path)]), module=module, first_tiles=tiles)
    results["optimised"] = timed("optimised", device, assembly.tiles, assembly.execute)

    naive_second = timed("naive (2nd half)", device, halves[1], lambda: naive(halves[1], halves[0]))
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
        **int8_figures(int8, results["optimised"], results["naive"].patches_per_s),
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
    ddp = [ddp_throughput(cfg, ddp_slides, int(r), out_dir / f"ddp{r}") for r in bench.ddp_ranks]
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

    results = {"naive": timed("naive", device, len(images), naive)}
    assembly = assemble(_run_config(cfg, out_dir / "predict"))  # the product's run: wsiseg.pipeline.assemble
    results["optimised"] = timed("optimised", device, len(images), assembly.execute)
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


def _run_config(cfg: DictConfig, output_dir: Path, slides: list[str] | None = None) -> DictConfig:
    """The bench's config as a prediction run's (``predict.yaml``'s keys): outputs in ``output_dir``, and in slide mode
    ``data.slides`` the bench slide."""
    run = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.update(run, "writer.output_dir", str(output_dir))
    if slides is not None:
        OmegaConf.update(run, "data.slides", slides)
    return run
