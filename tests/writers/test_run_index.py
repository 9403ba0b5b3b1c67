"""summary.csv and index.html: the run at a glance, from the run's rows and the slides' reports."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsiseg.writers.heatmap import png_bytes
from wsiseg.writers.run_index import CSV_COLUMNS, write_run_index


def _slide_folder(run: Path, name: str) -> None:
    folder = run / name
    folder.mkdir(parents=True)
    report = {
        "status": "complete",
        "level0_size": [2000, 1000],
        "mpp_level0": 0.5,
        "tissue_fraction": 0.25,
        "tumour_area_mm2": 0.0123,
        "largest_region_mm2": 0.01,
        "output_mpp": 2.0,
        "mpp_read_level": 0.5,
        "slide_score": 0.875,
        "tumour_pct_of_tissue": 9.84,
        "threshold": 0.4,
        "figures_note": "",
    }
    (folder / "report.json").write_text(json.dumps(report))
    heatmap = np.zeros((500, 1000, 3), np.uint8)
    heatmap[:, :500] = (255, 0, 0)
    (folder / "heatmap.png").write_bytes(png_bytes(heatmap))


@pytest.fixture()
def run(tmp_path: Path) -> tuple[Path, list[dict]]:
    _slide_folder(tmp_path, "a")
    rows = [
        {"slide": "/data/a.svs", "name": "a", "status": "complete", "tiles": 9, "seconds": 3.5, "reason": ""},
        {"slide": "/data/b.svs", "status": "skipped", "tiles": 0, "seconds": 0.0, "reason": "cannot be opened"},
    ]
    return tmp_path, rows


def test_summary_csv_has_a_row_per_slide_with_its_figures(run: tuple[Path, list[dict]]) -> None:
    folder, rows = run
    csv_path, _ = write_run_index(folder, rows)
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(CSV_COLUMNS)
    a, b = table
    assert a["slide"] == "/data/a.svs" and a["status"] == "complete"
    assert float(a["tissue_mm2"]) == pytest.approx(0.25 * 2000 * 1000 * 0.5**2 * 1e-6)  # 0.125 mm²
    assert float(a["tumour_mm2"]) == 0.0123 and float(a["largest_region_mm2"]) == 0.01
    assert float(a["mpp_mask"]) == 2.0 and float(a["mpp_read"]) == 0.5  # the mask's µm/px and the slide's as read
    assert float(a["slide_score"]) == 0.875 and float(a["tumour_pct_of_tissue"]) == 9.84 and a["threshold"] == "0.4"
    assert float(a["seconds"]) == 3.5 and a["output_folder"] == str(folder / "a") and a["note"] == ""
    assert b["status"] == "skipped" and b["tissue_mm2"] == "" and b["output_folder"] == ""


def test_index_html_is_self_contained_with_every_row_and_a_legend(run: tuple[Path, list[dict]]) -> None:
    folder, rows = run
    _, page = write_run_index(folder, rows)
    text = page.read_text()
    assert text.count("<tr class=") == 2 and "a.svs" in text and "b.svs" in text and "cannot be opened" in text
    assert text.count("data:image/jpeg;base64,") == 1  # the thumbnail is embedded: the page needs no other file
    assert "data:image/png;base64," in text and "tumour probability 0" in text  # the colour map's legend
    assert "http://" not in text and "https://" not in text  # nothing from the network


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="needs Debian's chromium: make test installs it where it can (root and apt-get; scripts/ensure_chromium.sh)",
)
def test_index_html_renders_every_row_and_image_in_headless_chromium(run: tuple[Path, list[dict]]) -> None:
    """The page in a real browser: the screenshot shows the embedded thumbnail, the rendered table holds every
    slide's figures, and the browser logs no console error."""
    folder, rows = run
    _, page = write_run_index(folder, rows)
    shot = folder / "shot.png"
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    shown = subprocess.run(
        [*browser, f"--screenshot={shot}", "--window-size=1600,900", page.as_uri()],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    assert red.sum() > 1000  # the embedded heatmap thumbnail (half of it pure red) was drawn
    dom = subprocess.run(
        [*browser, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True, timeout=120
    )
    table = dom.stdout
    assert table.count("<tr class=") == 2 and "cannot be opened" in table
    for figure in ("0.875", "0.125", "9.840", "0.400", "0.500", "2.000", "3.500"):  # score, areas, %, mpps, seconds
        assert f"<td>{figure}</td>" in table, figure
    console = [line for line in (shown.stderr + dom.stderr).splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
