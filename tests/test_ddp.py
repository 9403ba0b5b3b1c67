"""DDP: tiles spread over ranks with none lost or repeated; 2 CPU processes over gloo give the 1-process masks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
from torch.utils.data import SequentialSampler

from tests.conftest import shared_slide
from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide


@pytest.mark.parametrize(("tiles", "world"), [(t, w) for t in (2, 3, 7, 10, 13, 1001) for w in (2, 3, 4) if t >= w])
def test_lightning_predict_sampler_neither_repeats_nor_drops(tiles: int, world: int) -> None:
    """The sampler Lightning installs for trainer.predict under DDP (UnrepeatedDistributedSamplerWrapper); tile
    counts not divisible by the world size included. (Lightning requires at least one tile per rank.)"""
    per_rank = [
        list(
            UnrepeatedDistributedSamplerWrapper(
                SequentialSampler(range(tiles)), num_replicas=world, rank=rank, shuffle=False
            )
        )
        for rank in range(world)
    ]
    flat = [i for indices in per_rank for i in indices]
    assert sorted(flat) == list(range(tiles)), "every tile exactly once"
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


def run(args: list[str]) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "wsiseg-predict"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(("overlap", "blend", "workers"), [(64, "gaussian", 1), (0, "none", 0)])
def test_two_process_gloo_equals_one_process(tmp_path: Path, overlap: int, blend: str, workers: int) -> None:
    """overlap 64: blended partial sums merged across ranks (OpenSlide reader workers); overlap 0: the uint8 tile
    mosaics merged, tiles read by data.reader=auto in each rank's main process (JPEG tiles on this CPU machine)."""
    real = shared_slide("CMU-1-Small-Region.svs")
    generated = write_synthetic_slide(tmp_path / "gen.tif", SyntheticSlide(2400, 1800, seed=21))
    common = [
        "model=demo",
        f"data.slides=[{real},{generated}]",
        "data.patch_size=256",
        f"data.overlap={overlap}",
        f"writer.blend={blend}",
        "writer.output_downsample=2",
        f"data.num_workers={workers}",
        "trainer.enable_progress_bar=false",
    ]
    single = run([*common, "trainer=cpu", "trainer.precision=32", f"hydra.run.dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    double = run([*common, "trainer=ddp_cpu", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'two'}"])
    assert double.returncode == 0, double.stderr[-3000:]

    for name in ("CMU-1-Small-Region", "gen"):
        one = tifffile.imread(tmp_path / "one" / name / "mask.tif", key=0).astype(int)
        two = tifffile.imread(tmp_path / "two" / name / "mask.tif", key=0).astype(int)
        assert one.shape == two.shape
        diff = np.abs(one - two)
        # Ranks sum their tiles separately and the merge adds the partial sums: float summation order may move a
        # value across a rounding boundary, so allow 1 grey level on a tiny fraction of pixels.
        assert diff.max() <= 1, f"{name}: max difference {diff.max()}"
        assert (diff > 0).mean() < 0.001, f"{name}: {(diff > 0).mean():.4%} of pixels differ"
        assert one.max() > 0

        report = json.loads((tmp_path / "two" / name / "report.json").read_text())
        assert report["status"] == "complete"
        assert report["world_size"] == 2
        assert len(report["tiles_per_rank"]) == 2 and min(report["tiles_per_rank"]) > 0
        assert sum(report["tiles_per_rank"]) == report["tiles_processed"] == report["tiles_tissue"]
        assert report["tiles_duplicated"] == 0
        single_report = json.loads((tmp_path / "one" / name / "report.json").read_text())
        assert single_report["tiles_processed"] == report["tiles_processed"]
    leftovers = [p for p in (tmp_path / "two").rglob(".partial-*")]
    assert not leftovers, leftovers


def test_a_rank_that_dies_fails_the_run_loudly(tmp_path: Path) -> None:
    """Kill rank 1 (SIGKILL) mid-run: rank 0 must exit non-zero soon, with no complete-looking outputs."""
    import os
    import signal
    import time

    import psutil

    slide = write_synthetic_slide(tmp_path / "big.tif", SyntheticSlide(6144, 6144, seed=31, tissue_scale=0.4))
    run_dir = tmp_path / "run"
    script = Path(sys.executable).parent / "wsiseg-predict"
    process = subprocess.Popen(
        [
            str(script),
            "model=demo",
            f"data.slides={slide}",
            "data.patch_size=256",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.tissue.enabled=false",
            "trainer=ddp_cpu",
            "trainer.enable_progress_bar=false",
            "trainer.strategy.timeout.minutes=1",
            f"hydra.run.dir={run_dir}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        rank1 = None
        deadline = time.time() + 120
        while rank1 is None and time.time() < deadline and process.poll() is None:
            for child in psutil.Process(process.pid).children(recursive=True):
                try:
                    if any("train_ddp_process_1" in part for part in child.cmdline()):
                        rank1 = child
                except psutil.Error:
                    pass
            time.sleep(0.2)
        assert rank1 is not None, "rank 1 never started"
        time.sleep(4)  # let both ranks start predicting
        assert process.poll() is None, "the run ended before rank 1 could be killed"
        os.kill(rank1.pid, signal.SIGKILL)
        started = time.time()
        _, stderr = process.communicate(timeout=240)
        waited = time.time() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    print(f"rank 0 exited {process.returncode} after {waited:.1f} s")
    assert process.returncode != 0
    assert not (run_dir / "big" / "mask.tif").exists()
    report = run_dir / "big" / "report.json"
    assert not report.exists() or json.loads(report.read_text())["status"] != "complete"
