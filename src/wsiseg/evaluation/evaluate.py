"""``wsiseg-eval``: compare a ``wsiseg-predict`` run with ground-truth annotations.

    wsiseg-eval eval.predictions=outputs/2026-11-30/10-00-00 eval.annotations=/data/camelyon16/annotations/ eval.level=5

Per slide (matched to its annotation by stem, see :func:`wsiseg.annotations.ground_truth.find_annotation`; no file =
tumour-free) and overall it computes, on an evaluation grid of ``2**eval.level`` level-0 px per px (the metrics:
:mod:`wsiseg.evaluation.metrics`):

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

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from wsiseg.annotations.ground_truth import find_annotation, ground_truth_mask
from wsiseg.annotations.shapes import DEFAULT_EXCLUDE
from wsiseg.atomic import write_json_atomic
from wsiseg.cli import before_hydra, user_errors
from wsiseg.config import build, config_dir
from wsiseg.errors import UserInputError
from wsiseg.evaluation.metrics import SlideEval, evaluation_lesions, froc, match_detections, pixel_metrics, slide_auc
from wsiseg.evaluation.predictions import find_predictions, load_prediction, slide_names
from wsiseg.evaluation.summary import draw_froc, format_table
from wsiseg.options import check_option_types

__all__ = ["evaluate", "run_eval", "main"]

log = logging.getLogger(__name__)


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
        annotation = find_annotation(annotations, slide_names(report, folder))
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
    """Console entry point ``wsiseg-eval``
    (:func:`wsiseg.cli.before_hydra` answers --version, an unusable run folder and unknown options)."""
    before_hydra("wsiseg-eval", "eval")
    _hydra_main()


if __name__ == "__main__":
    main()
