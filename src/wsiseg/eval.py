"""``wsiseg-eval``: compare a ``wsiseg-predict`` run with ground-truth annotations.

    wsiseg-eval eval.predictions=outputs/2026-11-30/10-00-00 eval.annotations=/data/camelyon16/annotations/ eval.level=5

Per slide (matched to its annotation by stem, see :func:`wsiseg.annotations.find_annotation`; no file = tumour-free)
and overall it computes, on an evaluation grid of ``2**eval.level`` level-0 px per px:

* pixel level: Dice, IoU, precision, recall of ``probability >= eval.threshold`` against the ground truth;
* lesion level, Camelyon16 style: detections are the 8-connected regions of the thresholded prediction, scored by
  their maximum probability. Lesions are the 8-connected ground-truth regions after dilating by ``eval.merge_um / 2``
  (lesions closer than ``merge_um`` merge) and filling holes. A detection overlapping a lesion is a true positive;
  one overlapping only isolated tumour cells (lesions whose longest extent is under ``eval.itc_um``) is neither true
  nor false; any other is a false positive. FROC: sensitivity at 1/4, 1/2, 1, 2, 4, 8 average false positives per
  slide (the best sensitivity of any probability cut whose FP rate does not exceed the value), and their mean;
* slide level: ROC AUC of each slide's maximum probability (on the evaluation grid), tumour vs tumour-free slides.

Writes ``eval.json`` and ``froc.png`` to the run folder and prints a table.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
import tifffile
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from wsiseg.annotations import DEFAULT_EXCLUDE, find_annotation, ground_truth_mask
from wsiseg.atomic import atomic_path, write_json_atomic
from wsiseg.cli import exit_if_overrides_bad, exit_if_run_dir_unusable, user_errors
from wsiseg.config import build, config_dir
from wsiseg.errors import UserInputError
from wsiseg.options import check_option_types

__all__ = [
    "FP_RATES",
    "SlideEval",
    "pixel_metrics",
    "evaluation_lesions",
    "match_detections",
    "froc",
    "slide_auc",
    "load_prediction",
    "find_predictions",
    "evaluate",
    "format_table",
    "draw_froc",
    "run_eval",
    "main",
]

log = logging.getLogger(__name__)

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


def load_prediction(slide_dir: Path, report: dict[str, Any], downsample: float, size: tuple[int, int]) -> np.ndarray:
    """The slide's ``mask.tif`` as probabilities (float32, 0-1) on the evaluation grid of ``size`` (W, H),
    ``downsample`` level-0 px per px.

    Mask px are ``level_downsample × output_downsample`` level-0 px; of the mask pyramid, the coarsest level that is
    still at least as fine as the grid is read and area-averaged onto it. Class-label masks (``model.reduction=none``)
    count any non-zero label as probability 1.
    """
    path = slide_dir / "mask.tif"
    per_mask_px = float(report["level_downsample"]) * float(report["output_downsample"])
    labels = ((report.get("config") or {}).get("model") or {}).get("reduction") == "none"
    try:
        with tifffile.TiffFile(path) as tif:
            levels = tif.series[0].levels
            index = max((i for i in range(len(levels)) if per_mask_px * 2**i <= downsample), default=0)
            image = levels[index].asarray()
    except Exception as exc:  # tifffile, or its codec on a truncated or corrupt tile (e.g. imagecodecs.DeflateError)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserInputError(
            f"prediction '{path}' cannot be read ({type(exc).__name__}: {first}): re-run wsiseg-predict for it"
        ) from None
    values = (image > 0).astype(np.float32) if labels else image.astype(np.float32) / 255.0
    scale = per_mask_px * 2**index / downsample
    target = (max(1, round(values.shape[1] * scale)), max(1, round(values.shape[0] * scale)))
    if target != (values.shape[1], values.shape[0]):
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
        values = cv2.resize(values, target, interpolation=interpolation)
    out = np.zeros((size[1], size[0]), np.float32)
    h, w = min(size[1], values.shape[0]), min(size[0], values.shape[1])
    out[:h, :w] = values[:h, :w]
    return out


def find_predictions(predictions: str | Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[dict[str, str]]]:
    """Complete slides of a ``wsiseg-predict`` run folder (``<slide>/report.json`` with status ``complete`` and
    ``mask.tif``), and the others with the reason they were left out. A single slide folder also works.

    Raises:
        UserInputError: the folder is missing or holds no complete slide.
    """
    root = Path(predictions)
    if not root.is_dir():
        raise UserInputError(f"eval.predictions '{root}' is not a folder: pass a wsiseg-predict run folder")
    folders = [root] if (root / "report.json").is_file() else sorted(p for p in root.iterdir() if p.is_dir())
    complete, skipped = [], []
    for folder in folders:
        report_path = folder / "report.json"
        if not report_path.is_file():
            continue
        try:
            report = json.loads(report_path.read_text())
        except (json.JSONDecodeError, OSError) as exc:
            skipped.append({"slide": folder.name, "reason": f"unreadable report.json ({exc})"})
            continue
        status = report.get("status")
        if status != "complete":
            skipped.append({"slide": folder.name, "reason": f"status {status!r}: {report.get('error', '')}".strip()})
        elif not (folder / "mask.tif").is_file():
            skipped.append({"slide": folder.name, "reason": "mask.tif missing"})
        else:
            complete.append((folder, report))
    if not complete:
        found = f"{len(skipped)} incomplete slide(s)" if skipped else "no slide folders with report.json"
        raise UserInputError(
            f"eval.predictions '{root}' has no complete slides ({found}): point it at a finished wsiseg-predict run "
            "folder (<slide>/report.json with status 'complete' and mask.tif), or re-run wsiseg-predict"
        )
    for row in skipped:
        log.warning("slide %s left out: %s", row["slide"], row["reason"])
    return complete, skipped


def _names(report: dict[str, Any], folder: Path) -> list[str]:
    names = [str(report.get("name") or folder.name)]
    if report.get("slide"):
        file_name = Path(str(report["slide"])).name
        names += [Path(file_name).stem, file_name.split(".")[0]]
    return list(dict.fromkeys(names))


def evaluate(
    predictions: str | Path,
    annotations: str | Path,
    level: int = 5,
    threshold: float = 0.5,
    merge_um: float = 75.0,
    itc_um: float = 200.0,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    output_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate every complete slide of ``predictions`` against ``annotations``; see the module docstring.

    Args:
        predictions: ``wsiseg-predict`` run folder.
        annotations: folder of ground-truth files named by slide stem.
        level: evaluation grid of ``2**level`` level-0 px per px (Camelyon16 evaluates at level 5).
        threshold: probability at or above which a pixel is predicted tumour.
        merge_um: lesions closer than this (µm) count as one (0: off, or when a slide has no mpp).
        itc_um: lesions shorter than this (µm) are isolated tumour cells (0: off, or when a slide has no mpp).
        exclude: annotation groups / classes that are cut out of tumour.
        output_dir: where to write ``eval.json`` and ``froc.png`` (None: write nothing).

    Returns:
        The content of ``eval.json``.
    """
    if not 0.0 < threshold <= 1.0:
        raise UserInputError(f"eval.threshold must be in (0, 1], got {threshold}")
    if level < 0:
        raise UserInputError(f"eval.level must be >= 0, got {level}")
    annotations = Path(annotations)
    if not annotations.is_dir():
        raise UserInputError(f"eval.annotations '{annotations}' is not a folder of annotation files")
    complete, skipped = find_predictions(predictions)
    downsample = float(2**level)
    results: list[SlideEval] = []
    for folder, report in complete:
        level0_size = (int(report["level0_size"][0]), int(report["level0_size"][1]))
        size = (math.ceil(level0_size[0] / downsample), math.ceil(level0_size[1] / downsample))
        try:
            probability = load_prediction(folder, report, downsample, size)
        except UserInputError as exc:  # one unreadable mask leaves that slide out, not the others
            log.error("slide %s left out: %s", folder.name, exc)
            skipped.append({"slide": folder.name, "reason": str(exc)})
            continue
        annotation = find_annotation(annotations, _names(report, folder))
        truth = ground_truth_mask(annotation, level0_size, downsample, exclude)
        predicted = probability >= threshold
        mpp = report.get("mpp_level0")
        eval_mpp = None if not mpp else float(mpp) * downsample
        if eval_mpp is None and (merge_um or itc_um):
            log.warning("slide %s has no mpp: lesion merging and ITC exclusion are off for it", folder.name)
        lesions, itc = evaluation_lesions(
            truth,
            merge_px=0.0 if eval_mpp is None else merge_um / 2.0 / eval_mpp,
            itc_px=0.0 if eval_mpp is None else itc_um / eval_mpp,
        )
        detections, lesion_scores = match_detections(probability, lesions, itc, threshold)
        results.append(
            SlideEval(
                name=str(report.get("name") or folder.name),
                annotation=None if annotation is None else str(annotation),
                tumour=bool(truth.any()),
                tp=int(np.count_nonzero(predicted & truth)),
                fp=int(np.count_nonzero(predicted & ~truth)),
                fn=int(np.count_nonzero(~predicted & truth)),
                lesions=len(lesion_scores),
                itc=int(itc[1:].sum()),
                max_probability=float(probability.max(initial=0.0)),
                detections=detections,
                lesion_scores=lesion_scores,
            )
        )
    if not results:
        raise UserInputError(
            f"eval.predictions '{predictions}': none of its {len(complete)} complete slide(s) could be read "
            "(reasons above): re-run wsiseg-predict for them"
        )
    if all(r.annotation is None for r in results):
        log.warning(
            "no file in eval.annotations '%s' matches any of the %d slide(s), so every slide is scored tumour-free: "
            "check the folder (annotations are named by slide: <name>.xml, <name>.geojson or <name>_mask.tif)",
            annotations,
            len(results),
        )
    tp, fp, fn = (sum(getattr(r, key) for r in results) for key in ("tp", "fp", "fn"))
    dices = [d for d in (pixel_metrics(r.tp, r.fp, r.fn)["dice"] for r in results) if d is not None]
    curve = froc(
        [p for r in results for p, kind in r.detections if kind == "fp"],
        [s for r in results for s in r.lesion_scores],
        len(results),
    )
    result = {
        "predictions": str(predictions),
        "annotations": str(annotations),
        "level": level,
        "downsample": downsample,
        "threshold": threshold,
        "merge_um": merge_um,
        "itc_um": itc_um,
        "overall": {
            "slides": len(results),
            "tumour_slides": sum(r.tumour for r in results),
            "tp_px": tp,
            "fp_px": fp,
            "fn_px": fn,
            **pixel_metrics(tp, fp, fn),
            "mean_dice": float(np.mean(dices)) if dices else None,
            "lesions": sum(len(r.lesion_scores) for r in results),
            "itc_lesions": sum(r.itc for r in results),
            "froc": curve,
            "slide_auc": slide_auc([r.max_probability for r in results], [r.tumour for r in results]),
        },
        "slides": [r.as_dict() for r in results],
        "skipped": skipped,
    }
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / "eval.json", result)
        draw_froc(curve, output_dir / "froc.png")
    return result


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


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Run :func:`evaluate` with the composed ``eval`` section as its arguments (the section's ``_target_``)."""
    for key in ("predictions", "annotations"):
        if OmegaConf.is_missing(cfg.eval, key):
            raise UserInputError(
                f"eval.{key} is required: wsiseg-eval eval.predictions=<wsiseg-predict run folder> "
                "eval.annotations=<folder of annotations named by slide>"
            )
    check_option_types(cfg, ("eval",))
    return build(cfg.eval)()


@hydra.main(config_path=str(config_dir()), config_name="eval", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    with user_errors("wsiseg-eval", run_dir=Path(HydraConfig.get().runtime.output_dir)):
        result = run_eval(cfg)
    print(format_table(result))
    print(f"wrote {Path(cfg.eval.output_dir) / 'eval.json'} and froc.png")


def main() -> None:
    """Console entry point ``wsiseg-eval``; a run folder Hydra cannot create is one line, exit 2."""
    exit_if_run_dir_unusable("wsiseg-eval")
    exit_if_overrides_bad("wsiseg-eval", "eval")
    _hydra_main()


if __name__ == "__main__":
    main()
