"""wsiseg-eval metrics against hand-computed values (wsiseg.evaluation.metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from wsiseg.evaluation.metrics import evaluation_lesions, froc, match_detections, pixel_metrics, slide_auc


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
