"""The path-safety rule: output names are plain folder names, removals never leave their folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wsiseg.data.plan import output_names
from wsiseg.safe_paths import MAX_NAME_BYTES, UnsafePathError, inside, remove_inside, safe_output_name
from wsiseg.writers.run_record import clear_outputs, remove_stale


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("CMU-1", "CMU-1"),
        ("p.v1", "p.v1"),
        ("..", "slide"),
        (".", "slide"),
        ("", "slide"),
        ("   ", "slide"),
        (".hidden", "hidden"),
        (".wsiseg.lock", "wsiseg.lock"),
        ("summary.json", "summary.json-slide"),
        ("SUMMARY.CSV", "SUMMARY.CSV-slide"),
        ("index.html", "index.html-slide"),
        ("report.json", "report.json-slide"),
        ("predict.log", "predict.log-slide"),
        ("a/b", "a_b"),
        ("a\\b", "a_b"),
        ("tab\there", "tab_here"),
        ("caf\udcc3", "caf_xc3"),  # a byte that was not UTF-8 in the file name
        ("ümlaut", "ümlaut"),
    ],
)
def test_safe_output_name(stem: str, expected: str) -> None:
    assert safe_output_name(stem) == expected


def test_long_names_are_cut_on_a_character_boundary() -> None:
    name = safe_output_name("é" * 300)
    assert len(name.encode("utf-8")) <= MAX_NAME_BYTES
    assert name == "é" * (MAX_NAME_BYTES // 2)


def test_output_names_of_hostile_file_names_are_unique_plain_children() -> None:
    paths = [Path(p) for p in ["/s/...svs", "/s/..svs", "/s/.svs", "/t/slide.svs", "/s/summary.json.svs", "/s/x.svs"]]
    names = output_names(paths)
    assert len(set(names)) == len(names)
    for name in names:
        assert name not in ("", ".", "..") and "/" not in name and not name.startswith(".")
        assert Path(name).name == name
    assert names[-1] == "x"


def test_inside_refuses_the_root_itself_its_parent_and_links_out(tmp_path: Path) -> None:
    root = tmp_path / "run"
    (root / "a").mkdir(parents=True)
    assert inside(root, root / "a") == (root / "a").resolve()
    for bad in (root, root / "..", root / ".", tmp_path / "elsewhere", root / "a" / ".." / ".."):
        with pytest.raises(UnsafePathError):
            inside(root, bad)
    (root / "out").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError):
        inside(root, root / "out")


def test_remove_inside_removes_a_link_not_its_target(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    (root / ".link").symlink_to(precious)
    remove_inside(root, root / ".link")
    assert not os.path.lexists(root / ".link") and (precious / "keep.txt").is_file()
    with pytest.raises(UnsafePathError):
        remove_inside(root, precious / "keep.txt")
    assert (precious / "keep.txt").is_file()


def test_clean_up_of_a_slide_folder_outside_the_run_folder_touches_nothing(tmp_path: Path) -> None:
    """The red team's case: a slide folder named ``..`` pointed clean-up at the run folder's parent."""
    parent = tmp_path / "parent"
    run = parent / "run"
    run.mkdir(parents=True)
    (parent / ".keep").mkdir()
    (parent / ".precious_file").write_text("x")
    (parent / "report.json").write_text("{}")
    (run / ".hydra").mkdir()
    for slide_dir in (run / "..", run / "."):
        with pytest.raises(UnsafePathError):
            clear_outputs(slide_dir, root=run)
        with pytest.raises(UnsafePathError):
            remove_stale(slide_dir, root=run)
    assert (parent / ".keep").is_dir() and (parent / ".precious_file").is_file() and (parent / "report.json").is_file()
    assert (run / ".hydra").is_dir()
