"""Post-processing a finished slide again from its ``mask.tif``, without the network: the threshold's tumour figures
and the contour files (:data:`wsiseg.writers.render.POST_PROCESSING`).

A resumed run whose post-processing options differ from a complete slide's report refreshes that slide here
(``resume=true``), and ``wsiseg-render RUN_DIR writer.threshold=...`` does it for every complete slide of a finished
run. The mask, the heatmap and the inference figures stay as they are; ``report.json`` gets the new fields, the new
options in its ``config`` and the new ``post_hash``, written last (atomically): a refresh cut short leaves the old
hash, so the next one redoes it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.annotations.contours import open_mask_level
from wsiseg.atomic import write_json_atomic
from wsiseg.writers.render import POST_PROCESSING, RenderOptions, post_process, threshold_u8
from wsiseg.writers.run_record import post_hash

__all__ = ["count_positive", "refresh"]

log = logging.getLogger(__name__)


def count_positive(mask_path: Path, threshold: float, labels: bool, rows: int = 2048) -> int:
    """Mask px of level 0 of ``mask_path`` at or above ``threshold`` (``labels``: with a non-zero label), read
    ``rows`` rows at a time."""
    mask = open_mask_level(mask_path)
    cut = threshold_u8(threshold)
    total = 0
    for y0 in range(0, int(mask.shape[0]), rows):
        band = np.asarray(mask[y0 : y0 + rows])
        total += int(np.count_nonzero(band if labels else band >= cut))
    return total


def refresh(slide_dir: Path, options: RenderOptions, run_config: dict[str, Any]) -> bool:
    """Post-process the complete slide in ``slide_dir`` with ``options`` when its report was written with other
    post-processing options; returns whether it did. ``run_config``'s ``writer`` section supplies the
    :data:`~wsiseg.writers.render.POST_PROCESSING` values recorded in the report (they must match ``options``)."""
    report_path = slide_dir / "report.json"
    report = json.loads(report_path.read_text())
    wanted = post_hash(run_config)
    if report.get("status") != "complete" or report.get("post_hash") == wanted:
        return False
    labels = report.get("mask_kind") == "labels"
    mask = slide_dir / "mask.tif"
    output_downsample = int(report["output_downsample"])
    fields = post_process(
        slide_dir,
        count_positive(mask, options.threshold, labels),
        options,
        labels=labels,
        output_mpp=report.get("output_mpp"),
        level0_per_mask_px=float(report["level_downsample"]) * output_downsample,
        mpp_level0=report.get("mpp_level0"),
        level0_size=tuple(report["level0_size"]),
        tile_mask_px=int(report["patch_size"]) / output_downsample,
        tissue_level0_px2=float(report.get("tissue_fraction", 0.0)) * math.prod(report["level0_size"]),
    )
    for key in [k for k in report if k.startswith("contour_") or k in _CONTOUR_FIGURES]:
        del report[key]
    config = report.get("config") if isinstance(report.get("config"), dict) else {}
    writer = dict(config.get("writer") or {})
    writer.update({key: (run_config.get("writer") or {}).get(key) for key in POST_PROCESSING})
    report.update(fields, post_hash=wanted, config={**config, "writer": writer})
    write_json_atomic(report_path, report)
    log.info(
        "slide %s: post-processing redone from mask.tif (threshold %s, contours %s), no network",
        report.get("name", slide_dir.name),
        options.threshold,
        ",".join(options.contours) or "none",
    )
    return True


_CONTOUR_FIGURES = (
    "largest_region_source",
    "tumour_regions",
    "largest_region_mm2",
    "tumour_regions_area_mm2",
    "largest_region_level0_px2",
    "tumour_regions_area_level0_px2",
)
