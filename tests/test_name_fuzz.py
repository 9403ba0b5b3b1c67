"""Name fuzz: slides named like nothing a scanner writes (``...svs``, a run file's name, separators, bytes that are not
UTF-8, very long names) are processed into their own folders, and nothing outside the run folder changes (the parent
tree is hashed before and after)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.helpers import run_main
from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide

HOSTILE = [
    "...svs",
    "..svs",
    ".svs",
    ".hidden.svs",
    "summary.json.svs",
    ".wsiseg.lock.svs",
    "index.html.svs",
    "predict.log.svs",
    "report.json.svs",
    "with space.svs",
    "x" * 240 + ".svs",
    os.fsdecode(b"caf\xe9-\xff.svs"),  # Latin-1 bytes: not UTF-8
]


def tree_digest(root: Path, skip: Path) -> dict[str, str]:
    """Every entry under ``root`` but ``skip``: relative path -> content hash (files), ``dir`` or the link target."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in dirnames:
            out[os.fsencode(here / name).hex()] = "dir"
        for name in filenames:
            path = here / name
            key = os.fsencode(path).hex()
            out[key] = os.readlink(path) if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.slow
def test_hostile_slide_names_stay_inside_the_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_synthetic_slide(tmp_path / "source.tif", SyntheticSlide(512, 512, seed=3))
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in HOSTILE:
        (slides / name).symlink_to(source)
    parent = tmp_path / "parent"
    run = parent / "run"
    (parent / ".keep").mkdir(parents=True)
    (parent / ".keep" / "note").write_text("keep me")
    (parent / ".precious_file").write_text("precious")
    (parent / "report.json").write_text('{"mine": true}')
    (parent / "mask.tif").write_bytes(b"not a mask")
    before = tree_digest(tmp_path, skip=run)

    listed = ",".join(f"'{slides / name}'" for name in HOSTILE)
    status, err = run_main(
        [
            "model=demo",
            "trainer=cpu",
            "data.num_workers=0",
            "data.patch_size=256",
            "writer.output_downsample=4",
            "trainer.enable_progress_bar=false",
            f"data.slides=[{listed}]",
            f"hydra.run.dir={run}",
        ],
        monkeypatch,
        capsys,
    )
    assert status == 0, err[-2000:]
    assert "Logging error" not in err
    assert tree_digest(tmp_path, skip=run) == before  # nothing outside the run folder changed

    summary = json.loads((run / "summary.json").read_text())
    rows = summary["slides"]
    assert len(rows) == len(HOSTILE) and all(row["status"] == "complete" for row in rows), rows
    folders = [run / row["name"] for row in rows]
    assert len(set(folders)) == len(HOSTILE)
    for folder in folders:
        assert folder.parent == run and not folder.name.startswith(".")
        assert (folder / "mask.tif").is_file() and (folder / "report.json").is_file()
    assert (run / ".hydra" / "config.yaml").is_file()  # Hydra's own folder survived ``..svs``
    for name in ("summary.csv", "index.html"):
        assert (run / name).is_file()
