"""The run record on its own: report.json rows, summary.json, the config hash that decides resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.writers.conftest import planned_slide
from wsiseg.errors import UserInputError
from wsiseg.writers.run_record import (
    RunRecord,
    base_report,
    check_writable,
    config_hash,
    publish_slide,
    read_complete_report,
    remove_leftovers,
    remove_stale,
    staging_dir,
)


def test_config_hash_ignores_what_does_not_change_outputs() -> None:
    config = {
        "model": {"checkpoint": "w.pth"},
        "data": {"slides": ["a.svs"], "num_workers": 0, "patch_size": 512},
        "writer": {"output_dir": "/x", "blend": "gaussian"},
        "trainer": {"devices": 1},
    }
    same = json.loads(json.dumps(config))
    same["data"].update(slides=["b.svs"], num_workers=8)
    same["writer"]["output_dir"] = "/elsewhere"
    same["trainer"]["devices"] = 4
    assert config_hash(same) == config_hash(config)
    same["data"]["input_dir"] = "/patches"  # patch mode's input folder, as slide mode's list of slides
    same["writer"].update(write_workers=4, blend_thread=True, cache_mb=1024, mask=True)
    same["model"]["compile"] = True
    assert config_hash(same) == config_hash(config)
    other = json.loads(json.dumps(config))
    other["data"]["patch_size"] = 256
    assert config_hash(other) != config_hash(config)
    precision = json.loads(json.dumps(config))
    precision["trainer"]["precision"] = "bf16-mixed"  # a lower precision changes the probabilities
    assert config_hash(precision) != config_hash(config)
    assert config_hash(config, extra={"opacity": 0.3}) != config_hash(config)  # options a writer got directly
    assert len(config_hash(config)) == 16


def test_reports_rows_and_summary(tmp_path: Path) -> None:
    slide = planned_slide("s1", size=(200, 150), patch=64, output_downsample=2)
    record = RunRecord(tmp_path, {"model": {"x": 1}}, {"wsiseg_version": "0.1.0"})
    record.add_row(Path("/slides/bad.svs"), "skipped", reason="cannot be opened")
    counts = {"tiles_processed": 12, "tiles_duplicated": 0, "tiles_per_rank": [], "world_size": 1, "batch_size": 4}
    report = base_report(slide, output_downsample=2, blend="none", **counts)
    assert report["output_size"] == [100, 75] and report["output_mpp"] == 1.0 and report["tiles_per_rank"] == [12]
    assert report["status"] == "incomplete" and report["resampled"] is False and report["read_scale"] == 1.0
    report.update(status="complete", wall_time_s=2.0, patches_per_s=6.0)
    (tmp_path / "s1").mkdir()
    record.write_report(tmp_path / "s1", report)
    record.write_summary()
    written = json.loads((tmp_path / "s1" / "report.json").read_text())
    assert written["config_hash"] == record.hash == config_hash({"model": {"x": 1}})
    assert written["provenance"] == {"wsiseg_version": "0.1.0"} and written["config"] == {"model": {"x": 1}}
    rows = json.loads((tmp_path / "summary.json").read_text())["slides"]
    assert rows == [
        {"slide": "/slides/bad.svs", "status": "skipped", "tiles": 0, "seconds": 0.0, "reason": "cannot be opened"},
        {
            "slide": "/slides/s1.svs",
            "name": "s1",
            "status": "complete",
            "tiles": 12,
            "seconds": 2.0,
            "reason": "",
            "rank": 0,
        },
    ]


def test_resume_keeps_only_complete_reports_of_the_same_config_with_their_outputs(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    assert read_complete_report(folder, "abc") is None  # no report
    (folder / "report.json").write_text(json.dumps({"status": "complete", "config_hash": "abc"}))
    assert read_complete_report(folder, "abc") is None  # outputs missing
    (folder / "mask.tif").write_bytes(b"x")
    (folder / "heatmap.png").write_bytes(b"x")
    assert read_complete_report(folder, "abc") == {"status": "complete", "config_hash": "abc"}
    assert read_complete_report(folder, "other") is None
    (folder / ".partial-rank0").mkdir()
    (folder / ".mask.tif.tmp").write_bytes(b"x")
    remove_stale(folder, root=tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["heatmap.png", "mask.tif"]


def test_unwritable_output_dir_names_the_option(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserInputError, match=r"writer.output_dir '.*file/out' is not writable"):
        check_writable(blocker / "out")


def test_reported_tiles_count_what_resumed_slides_processed(tmp_path: Path) -> None:
    """A resumed run weighs its own tiles plus these for model.compile=auto, as the uninterrupted run did."""
    from wsiseg.writers.run_record import reported_tiles

    for name, tiles in (("a", 300), ("b", 250)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps({"status": "complete", "tiles_processed": tiles}))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "report.json").write_text("{not json")
    assert reported_tiles(tmp_path, ["a", "b", "c", "missing"]) == 550


def _stage(slide_dir: Path, files: dict[str, bytes]) -> Path:
    staging = staging_dir(slide_dir)
    staging.mkdir()
    for name, data in files.items():
        (staging / name).write_bytes(data)
    return staging


def test_publish_replaces_a_missing_or_scratch_only_folder_in_one_rename(tmp_path: Path) -> None:
    files = {"mask.tif": b"m", "heatmap.png": b"h", "report.json": b"{}"}
    fresh = tmp_path / "fresh"
    publish_slide(_stage(fresh, {**files, ".scratch": b""}), fresh, root=tmp_path)
    assert sorted(p.name for p in fresh.iterdir()) == sorted(files)
    used = tmp_path / "used"  # what a store and a killed run's temporary file leave
    (used / ".partial-rank0").mkdir(parents=True)
    (used / ".mask.tif.123.tmp").write_bytes(b"x")
    publish_slide(_stage(used, files), used, root=tmp_path)
    assert sorted(p.name for p in used.iterdir()) == sorted(files)
    assert not list(tmp_path.glob(".*")), "a staging folder stayed"


def test_publish_keeps_files_of_someone_else_and_writes_the_report_last(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    publish_slide(_stage(folder, {"report.json": b"{}", "mask.tif": b"m"}), folder, root=tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["mask.tif", "notes.txt", "report.json"]
    assert (folder / "notes.txt").read_text() == "mine"
    assert not staging_dir(folder).exists()


def test_publish_and_leftover_removal_stay_inside_the_run_folder(tmp_path: Path) -> None:
    from wsiseg.safe_paths import UnsafePathError

    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    run.mkdir()
    with pytest.raises(UnsafePathError):
        publish_slide(_stage(tmp_path / "elsewhere", {"mask.tif": b"m"}), outside, root=run)
    assert (outside / "keep.txt").exists()
    staging = _stage(run / "s", {"mask.tif": b"m"})  # a killed run's staging folder goes with the leftovers
    remove_leftovers(run / "s", root=run)
    assert not staging.exists()


_PUBLISHER = """
import sys
from pathlib import Path
from wsiseg.writers.run_record import publish_slide, staging_dir

run = Path(sys.argv[1])
print("ready", flush=True)
for i in range(100000):
    slide_dir = run / f"s{i}"
    staging = staging_dir(slide_dir)
    staging.mkdir()
    for name in ("mask.tif", "heatmap.png", "report.json"):  # the order the writer renders them in
        (staging / name).write_bytes(b"x" * 400_000)
    publish_slide(staging, slide_dir, root=run)
"""


def test_a_process_killed_at_any_moment_leaves_each_slide_with_all_of_its_files_or_none(tmp_path: Path) -> None:
    """SIGKILL (no handler runs) a real process publishing slide after slide, at several moments: every slide folder
    holds all three files or none (the old way, files written into the folder one by one, left masks without
    reports)."""
    import random
    import signal
    import subprocess
    import sys
    import time

    rng, published, cut = random.Random(0), 0, 0
    for attempt in range(4):
        run = tmp_path / f"run{attempt}"
        run.mkdir()
        process = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(run)], stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None and process.stdout.readline() == "ready\n"  # imported, into the loop
        time.sleep(rng.uniform(0.05, 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        for folder in run.iterdir():
            if folder.name.startswith("."):
                cut += 1  # a staging folder the kill cut short
                continue
            names = sorted(p.name for p in folder.iterdir())
            assert names == ["heatmap.png", "mask.tif", "report.json"], (folder, names)
            published += 1
    assert published > 0 and cut > 0, (published, cut)
