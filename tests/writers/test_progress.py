"""SlideProgress counts the run's slides that any rank has written, from their reports on disk."""

from __future__ import annotations

from pathlib import Path

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
