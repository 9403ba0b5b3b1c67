"""The documentation runs: the example notebook is executed on a kernel of this interpreter (demo model, a generated
slide), so a renamed argument or a changed result fails here, not in a user's notebook."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_example_notebook_runs(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]' installs nbformat")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' installs nbclient")
    notebook = nbformat.read(REPO / "docs" / "example.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()
    outputs = "".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "slide complete" in outputs
    assert "(3, 1, 64, 64) float32" in outputs
    assert "onnx 17" in outputs and "optimised / naive:" in outputs
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the heatmap is shown inline"
