"""A ``wsiseg-predict`` run as evaluation input: its complete slides, the names each goes by (to find its
annotation), and each ``mask.tif`` as probabilities on the evaluation grid.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from wsiseg.errors import UserInputError

__all__ = ["load_prediction", "find_predictions", "slide_names"]

log = logging.getLogger(__name__)


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


def slide_names(report: dict[str, Any], folder: Path) -> list[str]:
    """Names the slide of ``folder`` goes by (report name, file stem, name up to the first dot), to find its
    annotation by."""
    names = [str(report.get("name") or folder.name)]
    if report.get("slide"):
        file_name = Path(str(report["slide"])).name
        names += [Path(file_name).stem, file_name.split(".")[0]]
    return list(dict.fromkeys(names))
