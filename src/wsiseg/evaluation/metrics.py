"""Evaluation metrics, pure functions of arrays on the evaluation grid: pixel Dice / IoU / precision / recall,
Camelyon16-style lesions and detections, FROC and slide-level ROC AUC (the method: :mod:`wsiseg.evaluation.evaluate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

__all__ = [
    "FP_RATES",
    "SlideEval",
    "pixel_metrics",
    "evaluation_lesions",
    "match_detections",
    "froc",
    "slide_auc",
]

FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def pixel_metrics(tp: int, fp: int, fn: int) -> dict[str, float | None]:
    """Dice, IoU, precision and recall from pixel counts; None where the denominator is 0."""

    def ratio(num: float, den: float) -> float | None:
        return None if den == 0 else num / den

    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
    }


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask.astype(np.uint8), 1)
    outside = padded.copy()
    flood = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(outside, flood, (0, 0), 2)
    return (outside != 2)[1:-1, 1:-1]


def evaluation_lesions(truth: np.ndarray, merge_px: float = 0.0, itc_px: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Label the ground-truth lesions of one slide (evaluation-grid px).

    Args:
        truth: (H, W) bool ground truth.
        merge_px: dilation radius, px: lesions closer than twice this merge into one.
        itc_px: lesions whose longest extent (of their undilated ground-truth pixels, minimum-area rectangle) is below
            this are isolated tumour cells.

    Returns:
        (labels, itc): int32 (H, W) lesion labels of the dilated, hole-filled mask (0 = none), and a bool array
        indexed by label (``itc[0]`` unused) marking isolated tumour cells.
    """
    area = truth.copy()
    if merge_px > 0 and truth.any():
        distance = cv2.distanceTransform((~truth).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        area = distance <= merge_px
    area = _fill_holes(area)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(area.astype(np.uint8), connectivity=8)
    itc = np.zeros(count, bool)
    if itc_px > 0:
        for label in range(1, count):
            x, y, w, h = (int(v) for v in stats[label, :4])
            inside = (labels[y : y + h, x : x + w] == label) & truth[y : y + h, x : x + w]
            points = cv2.findNonZero(inside.astype(np.uint8))
            if points is None:
                itc[label] = True
                continue
            (_, _), (side_a, side_b), _ = cv2.minAreaRect(points)
            itc[label] = max(side_a, side_b) + 1.0 < itc_px
    return labels.astype(np.int32), itc


@dataclass
class SlideEval:
    """One slide's evaluation (counts in evaluation-grid px)."""

    name: str
    annotation: str | None
    tumour: bool
    tp: int
    fp: int
    fn: int
    lesions: int  # not counting isolated tumour cells
    itc: int
    max_probability: float
    detections: list[tuple[float, str]] = field(default_factory=list)
    lesion_scores: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        kinds = [kind for _, kind in self.detections]
        return {
            "slide": self.name,
            "annotation": self.annotation,
            "tumour": self.tumour,
            "tp_px": self.tp,
            "fp_px": self.fp,
            "fn_px": self.fn,
            **pixel_metrics(self.tp, self.fp, self.fn),
            "lesions": self.lesions,
            "itc_lesions": self.itc,
            "lesions_detected": sum(score > 0 for score in self.lesion_scores),
            "detections": len(self.detections),
            "true_positive_detections": kinds.count("tp"),
            "false_positive_detections": kinds.count("fp"),
            "itc_only_detections": kinds.count("itc"),
            "max_probability": self.max_probability,
            "detection_list": [{"probability": round(p, 4), "kind": kind} for p, kind in self.detections],
        }


def match_detections(
    probability: np.ndarray, lesions: np.ndarray, itc: np.ndarray, threshold: float = 0.5
) -> tuple[list[tuple[float, str]], list[float]]:
    """Detections of one slide and the score each lesion gets.

    Args:
        probability: (H, W) float probabilities, evaluation grid.
        lesions: (H, W) lesion labels from :func:`evaluation_lesions`.
        itc: isolated-tumour-cell flag per lesion label.
        threshold: detections are the 8-connected regions with probability >= this.

    Returns:
        (detections, lesion_scores): ``(max probability, kind)`` per detection, kind ``tp`` (overlaps a lesion that
        is not ITC), ``itc`` (overlaps only ITC lesions) or ``fp``; and for each non-ITC lesion the highest
        probability of a detection overlapping it (0.0 when missed).
    """
    count, regions = cv2.connectedComponents((probability >= threshold).astype(np.uint8), connectivity=8)
    best = np.zeros(count, np.float64)
    inside = regions > 0
    np.maximum.at(best, regions[inside], probability[inside].astype(np.float64))
    both = inside & (lesions > 0)
    pairs = np.unique(regions[both].astype(np.int64) * (int(lesions.max()) + 1) + lesions[both])
    hit_region, hit_lesion = np.divmod(pairs, int(lesions.max()) + 1)
    lesion_score = np.zeros(len(itc), np.float64)
    kinds = ["fp"] * count
    for region, lesion in zip(hit_region.tolist(), hit_lesion.tolist()):
        if itc[lesion]:
            if kinds[region] == "fp":
                kinds[region] = "itc"
        else:
            kinds[region] = "tp"
            lesion_score[lesion] = max(lesion_score[lesion], best[region])
    detections = [(float(best[r]), kinds[r]) for r in range(1, count)]
    scores = [float(lesion_score[label]) for label in range(1, len(itc)) if not itc[label]]
    return detections, scores


def froc(
    false_positives: Sequence[float],
    lesion_scores: Sequence[float],
    slides: int,
    fp_rates: Sequence[float] = FP_RATES,
) -> dict[str, Any]:
    """Free-response ROC over all slides.

    Args:
        false_positives: probabilities of every false-positive detection (all slides).
        lesion_scores: per lesion (all slides, ITC excluded), the highest probability of a detection hitting it; 0 =
            missed.
        slides: number of slides (the FP rate is per slide).
        fp_rates: average false positives per slide at which to read the sensitivity.

    Returns:
        ``curve`` (list of [FPs per slide, sensitivity], one point per probability cut, starting at [0, 0]),
        ``fp_per_slide`` (= ``fp_rates``), ``sensitivity`` (best sensitivity at an FP rate <= each value) and
        ``score`` (their mean); sensitivities and score are None without lesions.
    """
    fps = np.sort(np.asarray(false_positives, np.float64))
    hits = np.sort(np.asarray([s for s in lesion_scores if s > 0], np.float64))
    cuts = np.unique(np.concatenate([fps, hits]))[::-1]
    lesions = len(lesion_scores)
    curve = [(0.0, 0.0)]
    for cut in cuts:
        fp_rate = (len(fps) - np.searchsorted(fps, cut, side="left")) / max(slides, 1)
        sensitivity = (len(hits) - np.searchsorted(hits, cut, side="left")) / lesions if lesions else 0.0
        curve.append((float(fp_rate), float(sensitivity)))
    if not lesions:
        sensitivities: list[float | None] = [None] * len(fp_rates)
        score = None
    else:
        sensitivities = [max(s for f, s in curve if f <= rate + 1e-12) for rate in fp_rates]
        score = float(np.mean(sensitivities))
    return {
        "fp_per_slide": list(fp_rates),
        "sensitivity": sensitivities,
        "score": score,
        "curve": [[round(f, 6), round(s, 6)] for f, s in curve],
    }


def slide_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """ROC AUC of ``scores`` for tumour (True) vs tumour-free slides: the probability that a random tumour slide
    scores higher than a random tumour-free one (ties count ½). None unless both kinds are present."""
    values = np.asarray(scores, np.float64)
    truth = np.asarray(labels, bool)
    positive, negative = values[truth], values[~truth]
    if not len(positive) or not len(negative):
        return None
    greater = (positive[:, None] > negative[None, :]).sum()
    ties = (positive[:, None] == negative[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positive) * len(negative)))
