"""The run plan's pure parts: output names unique within a run, slide identity, literal paths."""

from __future__ import annotations

from pathlib import Path

from wsiseg.data.datamodule import expand_slide_paths
from wsiseg.data.plan import output_names, slide_identity


def test_output_names_are_unique_and_never_take_another_slides_own_name() -> None:
    paths = [Path("A/x.tif"), Path("B/x.tif"), Path("C/x-2.tif")]
    assert output_names(paths) == ["x", "x-3", "x-2"]  # B's x-2 would have overwritten C
    assert output_names([Path("p.v1.svs"), Path("p.v2.svs")]) == ["p.v1", "p.v2"]  # the stem was 'p' for both
    assert output_names([Path("s.ome.tif"), Path("t.ome.tiff"), Path("u.svs")]) == ["s", "t", "u"]
    assert output_names([Path("a/x.svs"), Path("b/x.svs"), Path("c/x.svs")]) == ["x", "x-2", "x-3"]
    assert len(set(output_names([Path(f"{d}/x-{i}.tif") for d in "ab" for i in (2, 3)]))) == 4


def test_slide_identity_changes_when_the_file_does(tmp_path: Path) -> None:
    slide = tmp_path / "s.svs"
    slide.write_bytes(b"one")
    first = slide_identity(slide)
    assert first["path"] == str(slide.resolve()) and first["size"] == 3
    slide.write_bytes(b"other")
    assert slide_identity(slide) != first


def test_an_existing_file_is_taken_literally_even_with_glob_characters(tmp_path: Path) -> None:
    literal = tmp_path / "slide[1].tif"
    literal.write_bytes(b"x")
    (tmp_path / "slide1.tif").write_bytes(b"y")  # what the glob 'slide[1].tif' matches
    assert expand_slide_paths(str(literal)) == [literal]
    assert expand_slide_paths(str(tmp_path / "slide[12].tif")) == [tmp_path / "slide1.tif"]  # a real glob still globs
