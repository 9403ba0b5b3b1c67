"""wsiseg-eval: metrics against hand-computed values, and the whole path on slides predicted by the demo model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import shape

from wsiseg.contours import scale_regions, trace_regions, write_asap_xml
from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide
from wsiseg.errors import UserInputError
from wsiseg.eval import evaluate, evaluation_lesions, froc, match_detections, pixel_metrics, slide_auc

BIN = Path(sys.executable).parent


def test_pixel_metrics_by_hand() -> None:
    truth = np.array([[1, 1, 1, 0], [0, 0, 0, 0]], bool)
    predicted = np.array([[1, 1, 0, 1], [0, 0, 0, 0]], bool)
    tp, fp, fn = (int((predicted & truth).sum()), int((predicted & ~truth).sum()), int((~predicted & truth).sum()))
    assert (tp, fp, fn) == (2, 1, 1)
    metrics = pixel_metrics(tp, fp, fn)
    assert metrics["dice"] == pytest.approx(4 / 6)
    assert metrics["iou"] == pytest.approx(2 / 4)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert pixel_metrics(0, 0, 0) == {"dice": None, "iou": None, "precision": None, "recall": None}
    assert pixel_metrics(0, 5, 0)["dice"] == 0.0


def test_froc_known_case() -> None:
    # Slide A: lesions L1, L2; detections hit L1 (p 0.875) and L2 (p 0.625), two false positives (0.75, 0.5625).
    # (Probabilities exact in float32.)
    truth_a = np.zeros((20, 20), bool)
    truth_a[2:6, 2:6] = truth_a[12:16, 2:6] = True
    prob_a = np.zeros((20, 20), np.float32)
    prob_a[3:5, 3:5] = 0.875
    prob_a[13:15, 4:7] = 0.625
    prob_a[2:4, 12:14] = 0.75
    prob_a[15:18, 15:18] = 0.5625
    # Slide B: tumour-free, one false positive (0.6875).
    prob_b = np.zeros((20, 20), np.float32)
    prob_b[8:10, 8:10] = 0.6875
    lesions_a, itc_a = evaluation_lesions(truth_a)
    detections_a, scores_a = match_detections(prob_a, lesions_a, itc_a, 0.5)
    lesions_b, itc_b = evaluation_lesions(np.zeros((20, 20), bool))
    detections_b, scores_b = match_detections(prob_b, lesions_b, itc_b, 0.5)
    assert sorted(detections_a) == [(0.5625, "fp"), (0.625, "tp"), (0.75, "fp"), (0.875, "tp")]
    assert sorted(scores_a) == [0.625, 0.875]
    assert detections_b == [(0.6875, "fp")] and scores_b == []
    false_positives = [p for p, kind in detections_a + detections_b if kind == "fp"]
    curve = froc(false_positives, scores_a + scores_b, slides=2)
    # Cuts 0.875: 0 FP/slide, sensitivity ½; 0.75: ½, ½; 0.6875: 1, ½; 0.625: 1, 1; 0.5625: 1.5, 1.
    assert curve["curve"] == [[0, 0], [0, 0.5], [0.5, 0.5], [1, 0.5], [1, 1], [1.5, 1]]
    assert curve["sensitivity"] == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert curve["score"] == pytest.approx(5 / 6)
    assert froc([0.7], [], slides=1)["score"] is None


def test_lesion_merging_and_isolated_tumour_cells() -> None:
    truth = np.zeros((40, 40), bool)
    truth[5:15, 5:15] = True
    truth[5:15, 18:28] = True  # 3 px gap to the first lesion
    truth[30:32, 30:32] = True  # 2 px across: an isolated-tumour-cell cluster under a 5 px limit
    labels, itc = evaluation_lesions(truth)
    assert labels.max() == 3 and not itc.any()
    labels, itc = evaluation_lesions(truth, merge_px=2.0, itc_px=5.0)
    assert labels.max() == 2 and labels[10, 10] == labels[10, 20]
    assert itc[labels[31, 31]] and not itc[labels[10, 10]]
    probability = np.zeros((40, 40), np.float32)
    probability[30:33, 30:33] = 0.875  # on the ITC only: neither hit nor false positive
    probability[0:2, 36:40] = 0.75  # nowhere: false positive
    detections, scores = match_detections(probability, labels, itc, 0.5)
    assert sorted(detections) == [(0.75, "fp"), (0.875, "itc")]
    assert scores == [0.0]  # the merged lesion, missed


def test_slide_auc_by_hand() -> None:
    assert slide_auc([0.9, 0.4, 0.6, 0.2], [True, False, True, False]) == 1.0
    # Pairs (tumour, normal): 0.8>0.5, 0.8>0.3, 0.3<0.5, 0.3=0.3 (½): 2.5 / 4.
    assert slide_auc([0.8, 0.3, 0.5, 0.3], [True, True, False, False]) == pytest.approx(0.625)
    assert slide_auc([0.8, 0.3], [True, True]) is None


@pytest.fixture(scope="module")
def predicted(synthetic_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The conftest tumour slide plus a tumour-free one, predicted by the demo model with contours on, and an
    annotation folder holding the tumour slide's ground truth as ASAP XML (written by the contour writer)."""
    root = tmp_path_factory.mktemp("eval")
    normal = write_synthetic_slide(root / "normal.tif", SyntheticSlide(2000, 1500, seed=3, tumour_blobs=0))
    run = root / "run"
    command = [
        str(BIN / "wsiseg-predict"),
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
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
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
    command = [
        str(BIN / "wsiseg-eval"),
        f"eval.predictions={predicted['run']}",
        f"eval.annotations={predicted['annotations']}",
        "eval.level=2",
        "eval.itc_um=0",
        f"hydra.run.dir={out}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    print(done.stdout)
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
    assert "synth" in done.stdout and "FROC sensitivity" in done.stdout
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
    command = [
        str(BIN / "wsiseg-eval"),
        f"eval.predictions={predicted['run']}",
        f"eval.annotations={broken}",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"wsiseg-eval: error: {broken / 'synth.xml'}:4: not well-formed" in done.stderr


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
