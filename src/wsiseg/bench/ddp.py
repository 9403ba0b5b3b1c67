"""The CPU DDP timings of ``wsiseg-bench`` (``bench.ddp_ranks``): whole ``wsiseg-predict`` runs on 1, 2, ... gloo
ranks over the bench's slide or a generated cohort (``bench.cohort_slides``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from wsiseg.bench.options import BenchOptions
from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide

__all__ = ["cohort", "ddp_throughput"]


def ddp_throughput(cfg: DictConfig, slides: Sequence[Path], ranks: int, out_dir: Path) -> dict[str, Any]:
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
