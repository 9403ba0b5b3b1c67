"""What a person reads from an evaluation: the table ``wsiseg-eval`` prints and the FROC plot ``froc.png``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsiseg.atomic import atomic_path
from wsiseg.evaluation.metrics import FP_RATES

__all__ = ["format_table", "draw_froc"]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """A text table of per-slide and overall metrics (what ``wsiseg-eval`` prints)."""
    header = (
        f"{'slide':<32} {'tumour':>6} {'dice':>6} {'iou':>6} {'prec':>6} {'recall':>6} "
        f"{'lesions':>7} {'found':>5} {'ITC':>4} {'FP':>4} {'max p':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in result["slides"]:
        lines.append(
            f"{row['slide'][:32]:<32} {'yes' if row['tumour'] else 'no':>6} {_fmt(row['dice']):>6} "
            f"{_fmt(row['iou']):>6} {_fmt(row['precision']):>6} {_fmt(row['recall']):>6} {row['lesions']:>7} "
            f"{row['lesions_detected']:>5} {row['itc_lesions']:>4} {row['false_positive_detections']:>4} "
            f"{_fmt(row['max_probability']):>6}"
        )
    overall = result["overall"]
    lines.append("-" * len(header))
    lines.append(
        f"{'overall (pooled pixels)':<32} {overall['tumour_slides']:>6} {_fmt(overall['dice']):>6} "
        f"{_fmt(overall['iou']):>6} {_fmt(overall['precision']):>6} {_fmt(overall['recall']):>6} "
        f"{overall['lesions']:>7}"
    )
    froc_ = overall["froc"]
    pairs = ", ".join(f"{rate:g}: {_fmt(s)}" for rate, s in zip(froc_["fp_per_slide"], froc_["sensitivity"]))
    lines.append(f"mean Dice per slide {_fmt(overall['mean_dice'])}; slide AUC {_fmt(overall['slide_auc'])}")
    lines.append(f"FROC sensitivity at FPs/slide {pairs}; score {_fmt(froc_['score'])}")
    for row in result.get("skipped", []):
        lines.append(f"left out: {row['slide']} ({row['reason']})")
    return "\n".join(lines)


def draw_froc(curve: dict[str, Any], path: str | Path, width: int = 640, height: int = 480) -> np.ndarray:
    """Draw the FROC curve as a PNG (x: average FPs per slide on a log2 axis from 1/8 to 8, cuts with fewer FPs drawn
    at its left edge; y: sensitivity 0-1) with the six reported points; returns the RGB image."""
    image = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 70, width - 20, 40, height - 60
    x_min, x_max = min(FP_RATES) / 2, max(FP_RATES)

    def point(fp: float, sensitivity: float) -> tuple[int, int]:
        fraction = (math.log2(min(max(fp, x_min), x_max)) - math.log2(x_min)) / (math.log2(x_max) - math.log2(x_min))
        x = left + fraction * (right - left)
        y = bottom - sensitivity * (bottom - top)
        return int(round(x)), int(round(y))

    grey, black, blue, red = (200, 200, 200), (0, 0, 0), (31, 119, 180), (214, 39, 40)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for tick in range(0, 11, 2):
        y = point(0, tick / 10)[1]
        cv2.line(image, (left, y), (right, y), grey, 1)
        cv2.putText(image, f"{tick / 10:.1f}", (left - 45, y + 5), font, 0.45, black, 1, cv2.LINE_AA)
    for rate in FP_RATES:
        x = point(rate, 0)[0]
        cv2.line(image, (x, top), (x, bottom), grey, 1)
        label = f"1/{round(1 / rate)}" if rate < 1 else f"{rate:g}"
        cv2.putText(image, label, (x - 12, bottom + 20), font, 0.45, black, 1, cv2.LINE_AA)
    cv2.rectangle(image, (left, top), (right, bottom), black, 1)
    points = [point(fp, sensitivity) for fp, sensitivity in curve["curve"]]
    if points:
        # Past the last cut (every detection kept) the sensitivity cannot grow: extend it flat to the axis end.
        points.append(point(x_max, curve["curve"][-1][1]))
        cv2.polylines(image, [np.array(points, np.int32)], False, blue, 2, cv2.LINE_AA)
    for rate, sensitivity in zip(curve["fp_per_slide"], curve["sensitivity"]):
        if sensitivity is not None:
            cv2.circle(image, point(rate, sensitivity), 5, red, -1, cv2.LINE_AA)
    score = curve.get("score")
    title = f"FROC  (score {_fmt(score)})"
    cv2.putText(image, title, (left, top - 12), font, 0.6, black, 1, cv2.LINE_AA)
    cv2.putText(image, "average false positives per slide", (left + 120, height - 15), font, 0.5, black, 1, cv2.LINE_AA)
    cv2.putText(image, "sensitivity", (5, top - 12), font, 0.45, black, 1, cv2.LINE_AA)
    with atomic_path(path) as tmp:
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"cannot encode {path}")
        tmp.write_bytes(encoded.tobytes())
    return image
