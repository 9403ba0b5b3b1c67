"""The slide writer's own contract, driven through its hooks without a Trainer: a slide's files appear together."""

from __future__ import annotations

import json
from pathlib import Path

from tests.writers.conftest import planned_slide
from wsiseg.data.plan import RunPlan
from wsiseg.writers.slide_writer import SlideWriter


def test_an_interrupt_while_a_slide_is_written_leaves_none_of_its_files(tmp_path: Path) -> None:
    """Stopped after mask.tif was renamed into place but before report.json: the folder has no report, so the
    interrupt removes what is there and summary.json lists the slide as interrupted."""
    slides = (planned_slide("written"), planned_slide("half"))
    writer = SlideWriter(tmp_path, plan=RunPlan(slides), blend="none")
    (tmp_path / "written").mkdir()
    (tmp_path / "written" / "report.json").write_text("{}")
    (tmp_path / "written" / "mask.tif").write_bytes(b"done")
    writer._finished.add(0)  # noqa: SLF001 - the first slide is finished, as the writer would have recorded
    half = tmp_path / "half"
    half.mkdir()
    for name in ("mask.tif", ".heatmap.png.tmp", "tumour.geojson"):
        (half / name).write_bytes(b"partial")
    writer.on_exception(None, None, KeyboardInterrupt())  # type: ignore[arg-type]
    assert list(half.iterdir()) == []
    assert (tmp_path / "written" / "mask.tif").exists(), "a finished slide keeps its outputs"
    rows = {row["name"]: row for row in json.loads((tmp_path / "summary.json").read_text())["slides"]}
    assert rows["half"]["status"] == "interrupted" and "written" not in rows


def test_a_full_disk_is_named_in_the_slide_reason() -> None:
    import errno
    import os

    from wsiseg.writers.slide_outputs import _reason

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert _reason(full).startswith("no space left on the output device")
    short = OSError("2304000 requested and 798592 written")  # how a short TIFF write reads
    assert "choose another writer.output_dir" in _reason(short)
    assert _reason(ValueError("tile 3: corrupt\nTraceback-like detail")) == "tile 3: corrupt"  # one line


def test_slides_finalised_on_their_own_thread_equal_inline_ones(tmp_path: Path) -> None:
    """``writer.blend_thread=true`` (the GPU default): tiles blend on one thread and finished slides are written on
    another while the next slide's tiles keep coming; every output equals the inline run's, byte for byte, and the
    rank's host figures list one finalisation per slide."""
    import tifffile

    from tests.helpers import predict
    from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide

    slides = [
        write_synthetic_slide(tmp_path / f"s{i}.tif", SyntheticSlide(1024 + 256 * i, 768, seed=20 + i))
        for i in range(3)
    ]
    base = ["model=demo", "data.patch_size=256", "data.overlap=32", "writer.output_downsample=2", "data.batch_size=3"]
    runs = {}
    for threaded in ("true", "false"):
        out = tmp_path / f"threaded-{threaded}"
        assert predict(slides, out, [*base, f"writer.blend_thread={threaded}"]) == 0
        runs[threaded] = out
    for i in range(3):
        threaded, inline = runs["true"] / f"s{i}", runs["false"] / f"s{i}"
        for level in range(len(tifffile.TiffFile(inline / "mask.tif").pages)):
            assert (
                tifffile.imread(threaded / "mask.tif", key=level) == tifffile.imread(inline / "mask.tif", key=level)
            ).all()
        assert (threaded / "heatmap.png").read_bytes() == (inline / "heatmap.png").read_bytes()
    ranks = json.loads((runs["true"] / "summary.json").read_text())["ranks"]
    assert len(ranks) == 1 and len(ranks[0]["finalise_s"]) == 3 and min(ranks[0]["finalise_s"]) > 0
    assert ranks[0]["stitch_cpu_s"] > 0 and ranks[0]["blocked_s"] >= 0
