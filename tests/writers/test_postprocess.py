"""Post-processing apart from inference: a resumed run or ``wsiseg-render`` applies another threshold and other
contours to the kept ``mask.tif`` without the network, and gets what a fresh run with those options writes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.helpers import predict, run_command
from wsiseg.module import SegmentationModule
from wsiseg.writers.postprocess import count_positive

DEMO = ["model=demo", "data.patch_size=256", "writer.output_downsample=2"]
FIRST = ["writer.threshold=0.5", "writer.contours=none"]
SECOND = ["writer.threshold=0.3", "writer.contours=[geojson,asap_xml]", "writer.min_area_um2=50"]
# what changes between runs that predicted the same mask: timings, the post-processing's own time
TIMED = {"wall_time_s", "patches_per_s", "finished_at", "contour_seconds", "config"}


@pytest.fixture(scope="module")
def first_run(synthetic_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("post") / "run"
    assert predict(synthetic_slide, out, [*DEMO, *FIRST]) == 0
    return out


@pytest.fixture(scope="module")
def fresh_second(synthetic_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh run with the second post-processing options: what a refresh must reproduce."""
    out = tmp_path_factory.mktemp("post") / "fresh"
    assert predict(synthetic_slide, out, [*DEMO, *SECOND]) == 0
    return out


def _csv_row(path: Path) -> dict:
    """The slide's ``summary.csv`` row less the columns that differ between two runs (time, folder)."""
    (row,) = csv.DictReader(path.read_text().splitlines())
    return {k: v for k, v in row.items() if k not in ("seconds", "output_folder")}


def _report(run: Path) -> dict:
    return json.loads((run / "synth" / "report.json").read_text())


def _same_outputs(run: Path, fresh: Path) -> None:
    got, want = _report(run), _report(fresh)
    assert {k: v for k, v in got.items() if k not in TIMED} == {k: v for k, v in want.items() if k not in TIMED}
    for name in ("tumour.geojson", "tumour.xml", "heatmap.png"):
        assert (run / "synth" / name).read_bytes() == (fresh / "synth" / name).read_bytes(), name
    for level in range(len(tifffile.TiffFile(fresh / "synth" / "mask.tif").series[0].levels)):
        np.testing.assert_array_equal(
            tifffile.imread(run / "synth" / "mask.tif", level=level),
            tifffile.imread(fresh / "synth" / "mask.tif", level=level),
        )


def test_a_resumed_run_with_other_post_processing_runs_no_network_and_matches_a_fresh_run(
    first_run: Path, fresh_second: Path, synthetic_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(first_run, run)
    mask_before = (run / "synth" / "mask.tif").read_bytes()
    calls = []
    predict_step = SegmentationModule.predict_step
    monkeypatch.setattr(
        SegmentationModule, "predict_step", lambda self, *a, **k: calls.append(1) or predict_step(self, *a, **k)
    )
    assert predict(synthetic_slide, run, [*DEMO, *SECOND, "resume=true"]) == 0
    assert calls == []  # no batch went through the network
    assert (run / "synth" / "mask.tif").read_bytes() == mask_before
    _same_outputs(run, fresh_second)
    report = _report(run)
    assert report["threshold"] == 0.3 and report["config"]["writer"]["threshold"] == 0.3
    assert report["tumour_pixels"] == count_positive(run / "synth" / "mask.tif", 0.3, labels=False)
    # and back: the contours no longer asked for are removed
    assert predict(synthetic_slide, run, [*DEMO, *FIRST, "resume=true"]) == 0
    assert calls == []
    assert not (run / "synth" / "tumour.geojson").exists() and not (run / "synth" / "tumour.xml").exists()
    assert {k: v for k, v in _report(run).items() if k not in TIMED} == {
        k: v for k, v in _report(first_run).items() if k not in TIMED
    }


def test_wsiseg_render_post_processes_a_finished_run_again(first_run: Path, fresh_second: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(first_run, run)
    status, _, stderr = run_command(
        [str(run), "writer.threshold=0.3", "writer.contours=[geojson,asap_xml]", "min_area_um2=50"],
        command="wsiseg-render",
    )
    assert status == 0, stderr
    assert "1 slide(s) post-processed again" in stderr
    _same_outputs(run, fresh_second)
    rows = [_csv_row(folder / "summary.csv") for folder in (run, fresh_second)]
    assert rows[0] == rows[1] and rows[0]["largest_region_mm2"]  # the new figures, as a fresh run lists them
    import wsiseg  # the same from Python, back to the first run's options

    assert wsiseg.render_run(run, threshold=0.5, contours="none", min_area_um2=200.0) == ["synth"]
    assert {k: v for k, v in _report(run).items() if k not in TIMED} == {
        k: v for k, v in _report(first_run).items() if k not in TIMED
    }
    status, _, stderr = run_command([str(run), "writer.treshold=0.3"], command="wsiseg-render")
    assert status == 2 and stderr.count("\n") == 1, stderr
    assert "did you mean writer.threshold?" in stderr
    status, _, stderr = run_command([str(tmp_path / "nope")], command="wsiseg-render")
    assert status == 2 and "holds no summary.json" in stderr


def test_the_slide_figures_match_values_computed_from_mask_tif(first_run: Path, synthetic_slide: Path) -> None:
    """report.json's and summary.csv's figures against mask.tif read here: tumour px and % of tissue at the
    threshold, the largest 8-connected region (scipy's labelling, exact at this size), the slide score (the largest
    mean over one-tile windows, from the pyramid level the report names, with an integral image; and within 0.03 of
    the same at level 0), the µm/px the slide was read at and of the mask."""
    import openslide
    from scipy import ndimage

    report = _report(first_run)
    mask_path = first_run / "synth" / "mask.tif"
    mask = tifffile.imread(mask_path)
    positive = mask >= 128  # threshold 0.5: ceil(127.5)
    assert report["tumour_pixels"] == int(positive.sum()) > 0
    per_mask_px = report["level_downsample"] * report["output_downsample"]
    tissue = report["tissue_fraction"] * report["level0_size"][0] * report["level0_size"][1]
    assert report["tumour_pct_of_tissue"] == pytest.approx(100 * positive.sum() * per_mask_px**2 / tissue, abs=1e-3)
    labels, count = ndimage.label(positive, structure=np.ones((3, 3)))
    largest = np.bincount(labels.ravel())[1:].max()
    assert report["largest_region_source"] == "mask level 0"
    assert report["largest_region_level0_px2"] == largest * per_mask_px**2
    mpp = float(openslide.OpenSlide(synthetic_slide).properties["openslide.mpp-x"])
    assert report["largest_region_mm2"] == pytest.approx(largest * per_mask_px**2 * (mpp * 1e-3) ** 2)

    def window_max(values: np.ndarray, side: int) -> float:  # largest mean over side x side windows clipped at edges
        padded = np.pad(values.astype(np.float64), side)
        ones = np.pad(np.ones(values.shape), side)
        integral = [np.pad(a.cumsum(0).cumsum(1), ((1, 0), (1, 0))) for a in (padded, ones)]
        h, w = padded.shape
        lo, hi = side // 2, side - side // 2
        ys, xs = np.arange(side, h - side)[:, None], np.arange(side, w - side)[None, :]
        box = [i[ys + hi, xs + hi] - i[ys - lo, xs + hi] - i[ys + hi, xs - lo] + i[ys - lo, xs - lo] for i in integral]
        return float((box[0] / box[1]).max())

    tile = report["patch_size"] / report["output_downsample"]
    level = report["slide_score_level"]
    levels = len(tifffile.TiffFile(mask_path).series[0].levels)
    assert level == min(levels - 1, int(np.log2(tile / 4)))  # a quarter tile a px, or the coarsest level there is
    pyramid = tifffile.imread(mask_path, level=level) / 255.0
    assert report["slide_score"] == pytest.approx(window_max(pyramid, round(tile / 2**level)), abs=1e-4)
    assert report["slide_score"] == pytest.approx(window_max(mask / 255.0, round(tile)), abs=0.03)
    (row,) = csv.DictReader((first_run / "summary.csv").read_text().splitlines())
    assert float(row["mpp_read"]) == pytest.approx(mpp * report["level_downsample"])
    assert float(row["mpp_mask"]) == pytest.approx(mpp * per_mask_px)
    assert float(row["slide_score"]) == report["slide_score"] and row["threshold"] == "0.5" and row["note"] == ""
    assert float(row["tumour_pct_of_tissue"]) == report["tumour_pct_of_tissue"]
