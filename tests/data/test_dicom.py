"""DICOM WSI: OpenSlide reads a series from any of its files, so a series is one slide whichever of its files, or its
folder, is given; its mask has OpenSlide's read geometry; a DICOM file OpenSlide cannot read is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from tests.conftest import shared_slide
from tests.helpers import predict
from wsiseg.data.datamodule import expand_slide_paths
from wsiseg.data.slide import rgba_to_rgb


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The two files of the shared DICOM series (same SeriesInstanceUID), alone in a folder."""
    folder = tmp_path_factory.mktemp("dicom") / "boxes"
    folder.mkdir()
    files = [shared_slide(f"openslide-python__boxes_{i}.dcm") for i in (0, 1)]
    return [Path(shutil.copy(f, folder / f.name)) for f in files]


def test_a_series_is_one_slide_given_as_either_file_both_or_its_folder(series: list[Path]) -> None:
    first, second = series
    with openslide.OpenSlide(str(first)) as a, openslide.OpenSlide(str(second)) as b:
        assert a.properties["dicom.SeriesInstanceUID"] == b.properties["dicom.SeriesInstanceUID"]
    assert expand_slide_paths([str(first), str(second)]) == [first]
    assert expand_slide_paths([str(second), str(first)]) == [second]
    assert expand_slide_paths(str(first.parent)) == [first]
    assert expand_slide_paths(str(first.parent / "*.dcm")) == [first]
    assert expand_slide_paths(str(second)) == [second]


def test_the_series_mask_has_openslides_read_geometry(series: list[Path], tmp_path: Path) -> None:
    """The probe model (red / 255) over the folder: one slide, its mask the red channel OpenSlide reads, px for px."""
    out = tmp_path / "run"
    overrides = ["model=probe", "data.patch_size=16", "data.tissue.enabled=false", "model.output_dtype=float32"]
    assert predict(series[0].parent, out, overrides) == 0
    reports = sorted(out.glob("*/report.json"))
    assert [r.parent.name for r in reports] == [series[0].stem]
    with openslide.OpenSlide(str(series[0])) as slide:
        red = rgba_to_rgb(np.asarray(slide.read_region((0, 0), 0, slide.dimensions)))[..., 0]
        assert json.loads(reports[0].read_text())["level0_size"] == list(slide.dimensions)
    np.testing.assert_array_equal(tifffile.imread(reports[0].parent / "mask.tif", key=0), red)


def test_a_dicom_file_openslide_cannot_read_is_one_line(series: list[Path], tmp_path: Path) -> None:
    broken = shared_slide("pathml__small_dicom.dcm")
    out = tmp_path / "run"
    overrides = ["model=probe", "data.patch_size=16", "data.tissue.enabled=false"]
    assert predict([broken, series[1]], out, overrides) == 1  # one slide skipped, the other complete
    rows = {Path(r["slide"]).name: r for r in json.loads((out / "summary.json").read_text())["slides"]}
    assert rows[broken.name]["status"] == "skipped"
    assert rows[broken.name]["reason"].startswith(f"slide '{broken}' cannot be opened by OpenSlide: ")
    assert "\n" not in rows[broken.name]["reason"] and rows[series[1].name]["status"] == "complete"
