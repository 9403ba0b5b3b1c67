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
from tests.helpers import run_command
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
    # the 1-process reference runs in this process; the DDP run launches ranks, so it stays a process of its own
    status, _, stderr = run_command(
        [*common, "trainer=cpu", "trainer.precision=32", f"hydra.run.dir={tmp_path / 'one'}"]
    )
    assert status == 0, stderr[-3000:]
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


# -- cohorts: data.shard=slides ------------------------------------------------------------------------------------
COHORT_SIZES = [(1536, 1536), (2048, 1536), (2560, 1536), (3072, 1536), (3584, 1536)]


def cohort_args(slides: list[Path]) -> list[str]:
    return [
        "model=demo",
        f"data.slides=[{','.join(map(str, slides))}]",
        "data.patch_size=256",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
    ]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """Five generated slides of different sizes and their 1-process outputs: (slides, run folder)."""
    folder = tmp_path_factory.mktemp("cohort")
    slides = [
        write_synthetic_slide(folder / f"s{i}.tif", SyntheticSlide(w, h, seed=40 + i))
        for i, (w, h) in enumerate(COHORT_SIZES)
    ]
    status, _, stderr = run_command(  # in this process: no ranks to launch
        [*cohort_args(slides), "trainer=cpu", "trainer.precision=32", f"hydra.run.dir={folder / 'one'}"]
    )
    assert status == 0, stderr[-3000:]
    return slides, folder / "one"


def assert_same_masks(run_dir: Path, reference: Path, names: list[str]) -> None:
    """Every slide's mask equals the 1-process mask; batches that span two slides in one process and not in the other
    may move a value across a rounding boundary: at most 1 grey level, on a tiny fraction of pixels."""
    for name in names:
        one = tifffile.imread(reference / name / "mask.tif", key=0).astype(int)
        two = tifffile.imread(run_dir / name / "mask.tif", key=0).astype(int)
        diff = np.abs(one - two)
        assert one.shape == two.shape and diff.max() <= 1, f"{name}: max difference {diff.max()}"
        assert (diff > 0).mean() < 0.001, f"{name}: {(diff > 0).mean():.4%} of pixels differ"


def test_cohort_sharded_by_slide_streams_outputs_and_equals_one_process(
    tmp_path: Path, cohort: tuple[list[Path], Path]
) -> None:
    """5 slides on 2 gloo ranks with data.shard=slides: a slide's outputs are on disk while the run still goes (seen by
    watching the folder), every mask equals the 1-process mask, and the ranks' tile counts differ by no more than the
    largest slide."""
    import subprocess as sp
    import time

    slides, reference = cohort
    run_dir = tmp_path / "two"
    script = Path(sys.executable).parent / "wsiseg-predict"
    args = [*cohort_args(slides), "trainer=ddp_cpu", "trainer.devices=2", "data.shard=slides"]
    process = sp.Popen([str(script), *args, f"hydra.run.dir={run_dir}"], stdout=sp.PIPE, stderr=sp.STDOUT, text=True)
    seen_while_running: list[str] = []
    while process.poll() is None and not seen_while_running:
        done = sorted(p.parent.name for p in run_dir.glob("*/report.json"))
        if done and process.poll() is None:
            seen_while_running = done
            for name in done:  # complete the moment they appear: every output beside the report
                assert (run_dir / name / "mask.tif").is_file() and (run_dir / name / "heatmap.png").is_file()
        time.sleep(0.02)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    assert 0 < len(seen_while_running) < len(slides), seen_while_running

    names = [s.stem for s in slides]
    assert_same_masks(run_dir, reference, names)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(r["name"] for r in summary["slides"]) == sorted(names)
    assert all(r["status"] == "complete" for r in summary["slides"])
    ranks = summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["slides"] > 0 for r in ranks)
    tiles = {name: json.loads((reference / name / "report.json").read_text())["tiles_processed"] for name in names}
    assert sum(r["tiles"] for r in ranks) == sum(tiles.values())
    assert abs(ranks[0]["tiles"] - ranks[1]["tiles"]) <= max(tiles.values())
    for name in names:
        report = json.loads((run_dir / name / "report.json").read_text())
        assert report["rank"] in (0, 1) and report["tiles_per_rank"] == [tiles[name]]
        assert report["wall_time_s"] > 0 and report["patches_per_s"] > 0  # its rank's own timing
        assert report["tiles_processed"] == tiles[name]
    assert "(rank 1, " in output and " of its slides left)" in output  # the per-slide log line
    assert not list(run_dir.rglob(".partial-*"))


def test_cohort_rank_killed_keeps_finished_slides_and_resume_finishes_the_rest(
    tmp_path: Path, cohort: tuple[list[Path], Path]
) -> None:
    """SIGKILL rank 1 once it has written a slide: the run fails, every slide with a report keeps complete outputs,
    none without one looks complete; ``resume=true`` (DDP again) keeps them and redoes only the others; the final
    masks equal the uninterrupted run's."""
    import os
    import signal
    import subprocess as sp
    import time

    import psutil

    slides, reference = cohort
    run_dir = tmp_path / "run"
    script = Path(sys.executable).parent / "wsiseg-predict"
    args = [*cohort_args(slides), "trainer=ddp_cpu", "trainer.devices=2", "data.shard=slides"]
    args += ["trainer.strategy.timeout.minutes=1", f"hydra.run.dir={run_dir}"]
    process = sp.Popen([str(script), *args], stdout=sp.DEVNULL, stderr=sp.PIPE, text=True, start_new_session=True)
    try:
        killed = False
        deadline = time.time() + 300
        while not killed and time.time() < deadline and process.poll() is None:
            by_rank1 = [p for p in run_dir.glob("*/report.json") if json.loads(p.read_text() or "{}").get("rank") == 1]
            if by_rank1:
                for child in psutil.Process(process.pid).children(recursive=True):
                    if any("train_ddp_process_1" in part for part in child.cmdline()):
                        os.kill(child.pid, signal.SIGKILL)
                        killed = True
            time.sleep(0.02)
        assert killed, "rank 1 wrote no slide before the run ended"
        _, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    kept = {}
    for folder in run_dir.iterdir():
        if folder.is_dir() and not folder.name.startswith("."):
            report = folder / "report.json"
            if report.exists():
                assert json.loads(report.read_text())["status"] == "complete"
                assert (folder / "mask.tif").is_file() and (folder / "heatmap.png").is_file()
                kept[folder.name] = (folder / "mask.tif").stat().st_mtime_ns
            else:
                assert not (folder / "mask.tif").exists(), f"{folder.name}: a mask without a report"
    assert 0 < len(kept) < len(slides), kept

    resumed = run([*args, "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name, mtime in kept.items():  # kept, not redone
        assert (run_dir / name / "mask.tif").stat().st_mtime_ns == mtime
    assert_same_masks(run_dir, reference, [s.stem for s in slides])
    # no store, scratch pyramid, temporary file or staging folder of the killed run
    leftovers = [*run_dir.glob("*/.*"), *run_dir.glob(".*.staging")]
    assert not leftovers, leftovers
    rows = json.loads((run_dir / "summary.json").read_text())["slides"]
    assert sorted(r["name"] for r in rows) == sorted(s.stem for s in slides)
    assert sum(r["reason"].startswith("resumed") for r in rows) == len(kept)


def test_torchrun_launch_equals_one_process(tmp_path: Path, cohort: tuple[list[Path], Path]) -> None:
    slides, reference = cohort
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "wsiseg.predict"]
    command += [*cohort_args(slides), "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DDP over 2 ranks: data.shard=auto -> slides" in result.stdout + result.stderr
    assert_same_masks(tmp_path / "run", reference, [s.stem for s in slides])


def test_slurm_environment_launch_equals_one_process(tmp_path: Path, cohort: tuple[list[Path], Path]) -> None:
    """Two local processes with the variables srun sets (Lightning's SLURM environment): each is one rank."""
    import os
    import socket

    slides, reference = cohort
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(sys.executable).parent / "wsiseg-predict"
    command = [str(script), *cohort_args(slides), "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'run'}"]
    processes = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NODEID": "0",
            "SLURM_NODELIST": "localhost",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "wsiseg",
            "MASTER_PORT": str(port),
        }
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert all("DDP over 2 ranks" in out for out in outputs)  # each process is a rank, not a launcher of two
    assert_same_masks(tmp_path / "run", reference, [s.stem for s in slides])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {r["rank"] for r in summary["slides"]} == {0, 1}
