"""What a prediction run gives back: its folder and one row per slide (or patch image), with the files behind them.

Plain data and file reads; importing it loads no deep-learning library.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """The outcome of :func:`wsiseg.pipeline.run`.

    Attributes:
        output_dir: the run folder (``writer.output_dir``): ``<slide name>/`` folders, ``summary.json``, ``summary.csv``
            and ``index.html`` (slide mode) or ``report.json`` and the images' outputs (patch mode).
        rows: one per slide or image, in the run's order, as in ``summary.json``: ``slide`` (path), ``name`` (its
            output folder, slide mode), ``status`` (``complete``, ``skipped``, ``failed``), ``tiles``, ``seconds``,
            ``reason``.

    Example::

        result = run(cfg)
        result.status                      # 0: every slide complete
        result.mask("CMU-1", level=2)      # (H, W) uint8 array, round(255 p), of that mask.tif level
    """

    output_dir: Path
    rows: tuple[dict[str, Any], ...]

    @property
    def status(self) -> int:
        """The command's exit status: 0 when every slide (image) completed, 1 when any was skipped or failed."""
        return 0 if all(row["status"] == "complete" for row in self.rows) else 1

    @property
    def summary_csv(self) -> Path:
        return self.output_dir / "summary.csv"

    @property
    def index_html(self) -> Path:
        return self.output_dir / "index.html"

    def row(self, slide: str | Path) -> dict[str, Any]:
        """The row of ``slide``: its output name (``CMU-1``), its file name or its path.

        Raises:
            KeyError: no slide of this run is called so.
        """
        key = str(slide)
        for row in self.rows:
            path = Path(row["slide"])
            if key in (row.get("name"), path.name, str(path), path.stem):
                return row
        known = ", ".join(str(row.get("name") or Path(row["slide"]).name) for row in self.rows)
        raise KeyError(f"no slide '{slide}' in this run (it has: {known})")

    def folder(self, slide: str | Path) -> Path:
        """``slide``'s output folder (slide mode)."""
        row = self.row(slide)
        if not row.get("name"):
            raise KeyError(f"slide '{slide}' has no output folder ({row['status']}: {row.get('reason', '')})")
        return self.output_dir / row["name"]

    def report(self, slide: str | Path) -> dict[str, Any]:
        """``slide``'s ``report.json`` as a dict (geometry, areas, timings, provenance)."""
        return json.loads((self.folder(slide) / "report.json").read_text())

    def mask(self, slide: str | Path, level: int = 0) -> Any:
        """Level ``level`` of ``slide``'s ``mask.tif`` (0: full mask resolution, each next level half as large) as a
        numpy array: (H, W) uint8 ``round(255·p)`` (or class labels for ``model.reduction=none``)."""
        import tifffile

        return tifffile.imread(self.folder(slide) / "mask.tif", key=level)

    def heatmap(self, slide: str | Path) -> Any:
        """``slide``'s ``heatmap.png`` as a PIL image (displays inline in Jupyter)."""
        from PIL import Image

        with Image.open(self.folder(slide) / "heatmap.png") as image:
            return image.copy()

    def log_where(self) -> None:
        """Log where the run's overview is (``index.html`` and ``summary.csv`` when written)."""
        pages = [p for p in (self.index_html, self.summary_csv) if p.is_file()]
        if pages:
            log.info("results: %s", " and ".join(str(p) for p in pages))
