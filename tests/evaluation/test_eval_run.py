"""wsiseg-eval end to end (wsiseg.evaluation): the whole path on slides predicted by the demo model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import shape

from tests.helpers import run_command
from wsiseg.annotations.asap_xml import write_asap_xml
from wsiseg.annotations.contours import scale_regions, trace_regions
from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide
from wsiseg.errors import UserInputError
from wsiseg.evaluation.evaluate import evaluate


@pytest.fixture(scope="module")
def predicted(synthetic_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The conftest tumour slide plus a tumour-free one, predicted by the demo model with contours on, and an
    annotation folder holding the tumour slide's ground truth as ASAP XML (written by the contour writer)."""
    root = tmp_path_factory.mktemp("eval")
    normal = write_synthetic_slide(root / "normal.tif", SyntheticSlide(2000, 1500, seed=3, tumour_blobs=0))
    run = root / "run"
    argv = [
        "model=demo",
        "trainer=cpu",
        "trainer.precision=32",
        f"data.slides=[{synthetic_slide},{normal}]",
        "data.patch_size=256",
        "data.num_workers=0",
        "writer.output_downsample=4",
        "writer.contours=[geojson,asap_xml]",
        f"hydra.run.dir={run}",
    ]
    status, _, stderr = run_command(argv)
    assert status == 0, stderr[-3000:]
    annotations = root / "annotations"
    annotations.mkdir()
    truth = SyntheticSlide(2000, 1500, seed=7).ground_truth(4).astype(np.uint8) * 255
    write_asap_xml(scale_regions(trace_regions(truth, 128), 4, (2000, 1500)), annotations / "synth.xml")
    return {"run": run, "annotations": annotations, "slide": synthetic_slide, "root": root}


def test_predict_writes_contours_and_region_report(predicted: dict[str, Path]) -> None:
    slide_dir = predicted["run"] / "synth"
    report = json.loads((slide_dir / "report.json").read_text())
    assert report["status"] == "complete"
    assert report["contour_files"] == ["tumour.geojson", "tumour.xml"]
    assert report["tumour_regions"] >= 1
    # No minimum area: the regions hold every tumour pixel the report counts.
    assert report["tumour_regions_area_mm2"] == pytest.approx(report["tumour_area_mm2"])
    assert 0 < report["largest_region_mm2"] <= report["tumour_regions_area_mm2"]
    features = json.loads((slide_dir / "tumour.geojson").read_text())["features"]
    assert len(features) == report["tumour_regions"]
    slide = shapely.box(0, 0, *report["level0_size"])
    assert all(shape(f["geometry"]).is_valid and slide.contains(shape(f["geometry"])) for f in features)


def test_wsiseg_eval_on_demo_predictions(predicted: dict[str, Path]) -> None:
    out = predicted["root"] / "eval-run"
    argv = [
        f"eval.predictions={predicted['run']}",
        f"eval.annotations={predicted['annotations']}",
        "eval.level=2",
        "eval.itc_um=0",
        f"hydra.run.dir={out}",
    ]
    status, stdout, stderr = run_command(argv, command="wsiseg-eval")
    assert status == 0, stderr
    print(stdout)
    result = json.loads((out / "eval.json").read_text())
    slides = {row["slide"]: row for row in result["slides"]}
    assert set(slides) == {"synth", "normal"}
    assert slides["synth"]["tumour"] and slides["synth"]["annotation"].endswith("synth.xml")
    assert not slides["normal"]["tumour"] and slides["normal"]["annotation"] is None
    overall = result["overall"]
    assert overall["dice"] >= 0.90
    assert slides["synth"]["dice"] >= 0.90
    assert overall["lesions"] == slides["synth"]["lesions"] >= 2
    froc_ = overall["froc"]
    assert froc_["fp_per_slide"] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert all(0.0 <= s <= 1.0 for s in froc_["sensitivity"]) and froc_["sensitivity"][-1] >= 0.5
    expected_auc = 1.0 if slides["synth"]["max_probability"] > slides["normal"]["max_probability"] else 0.0
    assert overall["slide_auc"] == expected_auc
    assert "synth" in stdout and "FROC sensitivity" in stdout
    with Image.open(out / "froc.png") as image:
        assert image.format == "PNG" and image.size == (640, 480)


def test_mask_image_ground_truth(predicted: dict[str, Path]) -> None:
    # The synthetic slide's own <stem>_tumour.png (16 level-0 px per px) next to the slide.
    result = evaluate(predicted["run"], predicted["slide"].parent, level=4, itc_um=0)
    synth = next(row for row in result["slides"] if row["slide"] == "synth")
    assert synth["annotation"].endswith("synth_tumour.png")
    assert synth["dice"] >= 0.90


def test_bad_prediction_folders_and_annotations(predicted: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="has no complete slides .no slide folders"):
        evaluate(tmp_path, predicted["annotations"])
    failed = tmp_path / "run" / "s1"
    failed.mkdir(parents=True)
    (failed / "report.json").write_text(json.dumps({"status": "failed", "error": "corrupt tile"}))
    with pytest.raises(UserInputError, match=r"has no complete slides \(1 incomplete slide"):
        evaluate(tmp_path / "run", predicted["annotations"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "synth.xml").write_text('<?xml version="1.0"?>\n<ASAP_Annotations>\n<Annotations>\n<Annotation Name=x>')
    argv = [
        f"eval.predictions={predicted['run']}",
        f"eval.annotations={broken}",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    status, _, stderr = run_command(argv, command="wsiseg-eval")
    assert status == 2
    assert f"wsiseg-eval: error: {broken / 'synth.xml'}:4: not well-formed" in stderr


def test_an_unreadable_mask_leaves_that_slide_out_and_unmatched_annotations_warn(
    predicted: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import shutil

    run = tmp_path / "run"
    shutil.copytree(predicted["run"], run)
    mask = run / "normal" / "mask.tif"
    data = mask.read_bytes()
    mask.write_bytes(data[: len(data) // 3])  # truncated: its tiles do not decode
    result = evaluate(run, predicted["annotations"])
    assert [s["slide"] for s in result["slides"]] == ["synth"]  # the readable slide is still scored
    (left_out,) = [row for row in result["skipped"] if row["slide"] == "normal"]
    assert "mask.tif' cannot be read" in left_out["reason"] and "re-run wsiseg-predict" in left_out["reason"]

    empty = tmp_path / "no_annotations"
    empty.mkdir()
    with caplog.at_level(logging.WARNING, logger="wsiseg"):
        scored = evaluate(predicted["run"], empty)
    assert scored["overall"]["tumour_slides"] == 0
    assert any("matches any of the 2 slide(s)" in r.getMessage() for r in caplog.records)
