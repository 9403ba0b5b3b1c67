"""The run at a glance: ``summary.csv`` (one row per slide) and a self-contained ``index.html`` beside
``summary.json``: every slide's heatmap thumbnail (embedded, so the page opens from disk anywhere, no server, no
network), status and figures, with a legend of the heatmap's colour map."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsiseg.atomic import atomic_path

__all__ = ["CSV_COLUMNS", "slide_figures", "write_run_index"]

CSV_COLUMNS = (
    "slide",
    "status",
    "slide_score",
    "tissue_mm2",
    "tumour_mm2",
    "tumour_pct_of_tissue",
    "largest_region_mm2",
    "threshold",
    "mpp_read",
    "mpp_mask",
    "seconds",
    "output_folder",
    "note",
)
# index.html's figure columns: (key, header)
_HTML_FIGURES = (
    ("slide_score", "slide score"),
    ("tissue_mm2", "tissue mm²"),
    ("tumour_mm2", "tumour mm²"),
    ("tumour_pct_of_tissue", "tumour % of tissue"),
    ("largest_region_mm2", "largest region mm²"),
    ("threshold", "threshold"),
    ("mpp_read", "µm/px read"),
    ("mpp_mask", "µm/px mask"),
    ("seconds", "seconds"),
)
THUMBNAIL_SIDE = 320  # px, longer side of the embedded heatmap thumbnails


def _mm2(value: Any) -> float | None:
    return None if value is None else round(float(value), 4)


def slide_figures(row: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """One slide's ``summary.csv`` fields from its summary row and, when it has one, its ``report.json``: the slide
    score (:func:`wsiseg.writers.figures.slide_score`), tissue area (the tissue fraction of the level-0 area), tumour
    area (thresholded mask px) and its % of the tissue, the largest region, the threshold, the µm per px the slide
    was read at and of the mask, seconds, and a note where a figure is missing (no mpp). Areas in mm², None where
    the slide has no mpp."""
    folder = output_dir / row["name"] if row.get("name") else None
    report: dict[str, Any] = {}
    if folder is not None and (folder / "report.json").is_file():
        try:
            report = json.loads((folder / "report.json").read_text())
        except (OSError, ValueError):
            report = {}
    tissue = None
    mpp0 = report.get("mpp_level0")
    if mpp0 and report.get("level0_size"):
        w, h = report["level0_size"]
        tissue = float(report.get("tissue_fraction", 0.0)) * w * h * (mpp0 * 1e-3) ** 2
    return {
        "slide": row["slide"],
        "status": row["status"],
        "tissue_mm2": _mm2(tissue),
        "tumour_mm2": _mm2(report.get("tumour_area_mm2")),
        "largest_region_mm2": _mm2(report.get("largest_region_mm2")),
        "slide_score": report.get("slide_score"),
        "tumour_pct_of_tissue": report.get("tumour_pct_of_tissue"),
        "threshold": report.get("threshold"),
        "mpp_read": report.get("mpp_read_level"),
        "mpp_mask": report.get("output_mpp"),
        "seconds": row.get("seconds"),
        "output_folder": str(folder) if folder is not None and folder.is_dir() else "",
        "note": report.get("figures_note", ""),
        "reason": row.get("reason", ""),
    }


def _thumbnail_uri(heatmap: Path) -> str | None:
    image = cv2.imread(str(heatmap), cv2.IMREAD_COLOR)
    if image is None:
        return None
    scale = THUMBNAIL_SIDE / max(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode() if ok else None


def _legend_uri() -> str:
    """The heatmap's colour map (:func:`wsiseg.writers.heatmap.colour_map`, probability 0 → 1) as a PNG strip."""
    from wsiseg.writers.heatmap import colour_map, png_bytes

    ramp = np.tile(np.arange(256, dtype=np.uint8), (16, 1))
    return "data:image/png;base64," + base64.b64encode(png_bytes(colour_map(ramp))).decode()


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def write_run_index(output_dir: Path, rows: Sequence[dict[str, Any]]) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``index.html`` for ``rows`` (the run's summary rows) into ``output_dir``, each
    atomically; returns their paths."""
    figures = [slide_figures(row, output_dir) for row in rows]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(figures)
    csv_path, html_path = output_dir / "summary.csv", output_dir / "index.html"
    with atomic_path(csv_path) as tmp:
        Path(tmp).write_text(buffer.getvalue())

    body = []
    for row, fig in zip(rows, figures):
        name = html.escape(Path(row["slide"]).name)
        pictures = []
        for file, what in (("thumbnail.jpg", "slide"), ("heatmap.png", "heatmap")):
            path = output_dir / row["name"] / file if row.get("name") else None
            uri = _thumbnail_uri(path) if path is not None and path.is_file() else None
            if uri:  # the embedded thumbnail links to the full-size file beside the page
                href = html.escape(f"{row['name']}/{file}")
                pictures.append(f'<a href="{href}"><img src="{uri}" alt="{what} of {name}"></a>')
        image = " ".join(pictures) if pictures else "no heatmap"
        folder = fig["output_folder"]
        link = f'<a href="{html.escape(Path(folder).name)}/">{html.escape(Path(folder).name)}</a>' if folder else "–"
        body.append(
            f'<tr class="{html.escape(fig["status"])}"><td>{image}</td>'
            f"<td>{html.escape(Path(fig['slide']).name)}<br><small>{html.escape(fig['slide'])}</small></td>"
            f"<td>{html.escape(fig['status'])}<br><small>{html.escape(fig['reason'])}</small>"
            + (f"<br><small>{html.escape(fig['note'])}</small>" if fig["note"] else "")
            + "</td>"
            + "".join(f"<td>{_cell(fig[key])}</td>" for key, _ in _HTML_FIGURES)
            + f"<td>{link}</td></tr>"
        )
    counts: dict[str, int] = {}
    for fig in figures:
        counts[fig["status"]] = counts.get(fig["status"], 0) + 1
    overview = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    headers = "".join(f"<th>{html.escape(header)}</th>" for _, header in _HTML_FIGURES)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>wsiseg run: {html.escape(output_dir.name)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }}
img {{ max-width: {THUMBNAIL_SIDE * 3 // 4}px; }}
td:first-child {{ white-space: nowrap; }}
tr.failed, tr.skipped, tr.interrupted {{ background: #fde8e8; }}
.legend img {{ width: 256px; height: 16px; vertical-align: middle; }}
</style></head><body>
<h1>wsiseg run {html.escape(str(output_dir))}</h1>
<p>{len(figures)} slide(s): {html.escape(overview)}. Every slide's figures are in <code>summary.csv</code> and its
<code>report.json</code>.</p>
<p class="legend">Heatmap colour: tumour probability 0 <img src="{_legend_uri()}" alt="colour map"> 1 (viridis),
blended over the slide thumbnail with an opacity that grows with the probability; under 0.1 it is not drawn. Click a
picture for the full-size image.</p>
<p>Slide score: the largest mean tumour probability in a window one tile wide. Tumour: mask px at or above each
slide's threshold (column). Areas need the slide's µm per px; where it has none, the note says so.</p>
<table><thead><tr><th>slide | heatmap</th><th>slide</th><th>status</th>{headers}<th>outputs</th></tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table></body></html>
"""
    with atomic_path(html_path) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return csv_path, html_path
