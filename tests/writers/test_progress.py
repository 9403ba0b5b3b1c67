"""The run's progress: SlideProgress counts the slides any rank has written (from their reports on disk); the bar
counts tiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import predict
from wsiseg.writers.progress import SlideProgress


def test_counts_written_slides_of_the_run_only(tmp_path: Path) -> None:
    folders = [tmp_path / name for name in ("a", "b", "c")]
    for folder in folders:
        folder.mkdir()
    (tmp_path / "resumed").mkdir()
    (tmp_path / "resumed" / "report.json").write_text("{}")  # not a slide of this run's plan
    progress = SlideProgress(folders)
    assert progress.written() == 0
    (folders[1] / "report.json").write_text("{}")
    (folders[2] / "mask.tif").write_bytes(b"")  # outputs without a report are not written yet
    assert progress.written() == 1


def test_the_bar_counts_tiles_with_a_rate_and_names_the_slide(
    synthetic_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real run with the bar on: it ends at the slide's tissue tiles (not batches), in tiles per second, with the
    slide's position and name in its description."""
    out = tmp_path / "run"
    assert predict(synthetic_slide, out, ["model=demo", "data.patch_size=256", "trainer.enable_progress_bar=true"]) == 0
    tiles = json.loads((out / "synth" / "report.json").read_text())["tiles_tissue"]
    text = capsys.readouterr().out.replace("\r", "\n")
    final = [line for line in text.splitlines() if "tile/s" in line][-1]
    assert f"{tiles}/{tiles}" in final and "slide 1/1 synth" in final, final
