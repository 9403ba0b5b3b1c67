"""Compare the outputs of two wsiseg-predict runs (e.g. before and after a refactoring): exit 0 only if identical.

Usage::

    python scripts/compare_outputs.py RUN_A RUN_B            # two run dirs (hydra.run.dir of each run)
    python scripts/compare_outputs.py ROOT_A ROOT_B          # two roots holding one run dir per case (same names)
    python scripts/compare_outputs.py --max-diffs 20 A B     # show more differences per file

    bash /tmp/before-runs/COMMANDS.sh "/work/main/.venv/bin/python -m wsiseg.predict" /tmp/after-runs
    python scripts/compare_outputs.py /tmp/before-runs /tmp/after-runs

A directory is a run dir when it holds ``summary.json``, ``report.json``, ``exit_status.txt`` or ``.hydra/``;
otherwise its sub-directories that are run dirs are compared pairwise by name.

Slide runs (``writer=slide``), for every slide folder present in either run:

- ``mask.tif``: page count, BigTIFF/byte order, every page (pyramid level) read with ``tifffile.imread(key=i)``
  compared pixel-exactly (shape, dtype, values), and every TIFF tag of every page (ImageWidth/Length, TileWidth/
  Length, X/YResolution, ResolutionUnit, Compression, NewSubfileType, ImageDescription, Software, ...) except the
  byte-layout tags TileOffsets, TileByteCounts, StripOffsets, StripByteCounts (where the encoded tiles sit in the
  file; the pixels they decode to are compared);
- ``heatmap.png``: mode, size and pixels (and PNG text chunks);
- ``tumour.geojson``: parsed JSON, exact equality of every coordinate and property;
- ``tumour.xml``: parsed XML (tag, attributes, text of every element, in order), exact equality;
- ``report.json``: every field, recursively, except EXCLUDED_REPORT (below);
- any other file in a slide folder: bytes; the set of file names (hidden ones included) must match.

Per run: ``summary.json`` rows in order, every field but ``seconds``; ``exit_status.txt`` (written by COMMANDS.sh);
the set of top-level files and folders. Not compared: ``*.log`` (``predict.log``, and ``train_ddp_process_1.log``
of DDP rank 1: timestamps, timings) and ``.hydra/`` (holds the run dir, timestamps and the overrides as typed).

Patch-folder runs (``writer=patches``, a top-level ``report.json`` with ``results``), for every image: each
``*_heatmap.png`` / ``*_mask.png`` pixel-exactly (plus PNG text chunks: config hash and source name) and its row of
``report.json["results"]``; for the run: ``report.json`` minus ``results`` and the timing fields.

Excluded fields (wall-clock measurements, different on every run):

- slide ``report.json``: ``wall_time_s``, ``patches_per_s``, ``contour_seconds``, ``finished_at``;
- patch ``report.json``: ``wall_time_s``, ``images_per_s``, ``results[*].seconds``;
- ``summary.json``: ``slides[*].seconds`` and each rank's timings (``ranks[*]``: :data:`RANK_TIMINGS`; its rank,
  slides and tile count are compared).

Normalised fields (compared after a rewrite, so equal values up to the location of the run or the checkout match):

- in ``report.json`` and ``summary.json``, every string containing the run dir's absolute path (where the run dir
  is now, and the report's own ``config.writer.output_dir``, where it was written) has it replaced by ``<RUN>``:
  in practice ``config.writer.output_dir`` (slide and patch runs) and the patch report's ``output_dir``;
- strings of the form ``.../wsiseg/assets/<file>`` become ``<wsiseg>/assets/<file>``: ``provenance.weights`` and
  ``config.model.checkpoint`` of ``model=demo`` name the packaged demo checkpoint inside whichever checkout runs
  (``/tmp/before-wt/src/...`` vs ``/work/main/src/...``); ``provenance.weights_sha256`` still checks its content.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

EXCLUDED_REPORT = ("wall_time_s", "patches_per_s", "contour_seconds", "finished_at")
EXCLUDED_PATCH_REPORT = ("wall_time_s", "images_per_s", "results[*].seconds")
# summary.json ranks[*]: when each rank started, waited and finished (the writer's figures, issue 27)
RANK_TIMINGS = (
    "start_at",
    "first_batch_at",
    "last_batch_at",
    "done_at",
    "blocked_s",
    "stitch_cpu_s",
    "finalise_cpu_s",
    "finalise_s",
    "idle_at_end_s",
)
EXCLUDED_SUMMARY = ("slides[*].seconds", *(f"ranks[*].{field}" for field in RANK_TIMINGS))
TIFF_LAYOUT_TAGS = frozenset({"TileOffsets", "TileByteCounts", "StripOffsets", "StripByteCounts"})
NOT_COMPARED_RUN_FILES = frozenset({"*.log", ".hydra"})
HEATMAP_SUFFIX, MASK_SUFFIX = "_heatmap.png", "_mask.png"
_ASSET = re.compile(r"^.*/wsiseg/assets/")
_MARKERS = ("summary.json", "report.json", "exit_status.txt", ".hydra")


class Diffs:
    """Differences found in one comparison entry (a slide, an image or a run), capped per file for printing."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def tree(self, where: str, a: Any, b: Any) -> None:
        """Recursive comparison of two parsed JSON/XML values; at most ``limit`` differences listed."""
        found: list[str] = []
        _diff_tree(a, b, "", found)
        if found:
            more = f" (+{len(found) - self.limit} more)" if len(found) > self.limit else ""
            self.add(f"{where}: " + "; ".join(found[: self.limit]) + more)


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _diff_tree(a: Any, b: Any, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a:
                out.append(f"{sub}: only in B ({_short(b[key])})")
            elif key not in b:
                out.append(f"{sub}: only in A ({_short(a[key])})")
            else:
                _diff_tree(a[key], b[key], sub, out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path or '<root>'}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _diff_tree(x, y, f"{path}[{i}]", out)
    elif type(a) is not type(b) and not (_is_number(a) and _is_number(b)):
        out.append(f"{path or '<root>'}: {_short(a)} ({type(a).__name__}) != {_short(b)} ({type(b).__name__})")
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        out.append(f"{path or '<root>'}: {_short(a)} != {_short(b)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _drop(value: Any, pattern: str) -> Any:
    """Copy of ``value`` without the field named by ``pattern`` (``a.b``, ``list[*].field``)."""
    head, _, rest = pattern.partition(".")
    if isinstance(value, dict):
        if head.endswith("[*]"):
            key = head[:-3]
            if key in value and isinstance(value[key], list):
                return {**value, key: [_drop(item, rest) for item in value[key]]}
            return value
        if not rest:
            return {k: v for k, v in value.items() if k != head}
        if head in value:
            return {**value, head: _drop(value[head], rest)}
    return value


def _normalise(value: Any, run_dirs: list[str]) -> Any:
    """Replace the run dir by ``<RUN>`` and a checkout's ``.../wsiseg/assets/`` by ``<wsiseg>/assets/``."""
    if isinstance(value, dict):
        return {k: _normalise(v, run_dirs) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v, run_dirs) for v in value]
    if isinstance(value, str):
        for run_dir in run_dirs:
            value = value.replace(run_dir, "<RUN>")
        return _ASSET.sub("<wsiseg>/assets/", value)
    return value


def _load_json(path: Path, run_dir: Path, excluded: tuple[str, ...]) -> Any:
    """A report/summary without the excluded fields, normalised. The run dir is where the run is now and where it
    was written (``config.writer.output_dir`` of a report), so a moved or copied run compares too."""
    value = json.loads(path.read_text())
    for pattern in excluded:
        value = _drop(value, pattern)
    run_dirs = {str(run_dir.resolve())}
    written = value.get("config", {}).get("writer", {}).get("output_dir") if isinstance(value, dict) else None
    if isinstance(written, str) and written:
        run_dirs.add(written.rstrip("/"))
    return _normalise(value, sorted(run_dirs, key=len, reverse=True))


def _both(name: str, a: Path, b: Path, diffs: Diffs) -> bool:
    """True when both files exist; records a difference when only one does."""
    if a.exists() and b.exists():
        return True
    if a.exists() or b.exists():
        diffs.add(f"{name}: only in {'A' if a.exists() else 'B'}")
    return False


def _tag_value(tag: tifffile.TiffTag) -> Any:
    value = tag.value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return [int(v) if isinstance(v, np.integer) else v for v in value]
    if isinstance(value, np.integer):
        return int(value)
    return value.value if hasattr(value, "value") and not isinstance(value, (bytes, str)) else value


def _pixels(where: str, a: np.ndarray, b: np.ndarray, diffs: Diffs) -> None:
    if a.shape != b.shape or a.dtype != b.dtype:
        diffs.add(f"{where}: shape/dtype {a.shape} {a.dtype} != {b.shape} {b.dtype}")
    elif not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
        differ = a != b
        delta = np.abs(a.astype(np.float64) - b.astype(np.float64))
        mask = differ if differ.ndim == 2 else differ.any(axis=-1)
        ys, xs = np.nonzero(mask)
        diffs.add(
            f"{where}: {int(mask.sum())} of {mask.size} px differ (max |diff| {delta.max():g}, "
            f"first at x={int(xs[0])} y={int(ys[0])})"
        )


def compare_tiff(a: Path, b: Path, diffs: Diffs) -> None:
    with tifffile.TiffFile(a) as ta, tifffile.TiffFile(b) as tb:
        if (ta.is_bigtiff, ta.byteorder) != (tb.is_bigtiff, tb.byteorder):
            diffs.add(f"{a.name}: BigTIFF/byte order {ta.is_bigtiff}/{ta.byteorder} != {tb.is_bigtiff}/{tb.byteorder}")
        na, nb = len(ta.pages), len(tb.pages)
        if na != nb:
            diffs.add(f"{a.name}: {na} != {nb} pages (pyramid levels)")
        for i in range(min(na, nb)):
            tags_a = {t.name: _tag_value(t) for t in ta.pages[i].tags.values() if t.name not in TIFF_LAYOUT_TAGS}
            tags_b = {t.name: _tag_value(t) for t in tb.pages[i].tags.values() if t.name not in TIFF_LAYOUT_TAGS}
            diffs.tree(f"{a.name} level {i} tags", tags_a, tags_b)
    for i in range(min(na, nb)):
        _pixels(f"{a.name} level {i}", tifffile.imread(a, key=i), tifffile.imread(b, key=i), diffs)


def compare_png(a: Path, b: Path, diffs: Diffs, name: str | None = None) -> None:
    name = name or a.name
    with Image.open(a) as ia, Image.open(b) as ib:
        if (ia.mode, ia.size) != (ib.mode, ib.size):
            diffs.add(f"{name}: mode/size {ia.mode} {ia.size} != {ib.mode} {ib.size}")
            return
        text_a, text_b = dict(getattr(ia, "text", {})), dict(getattr(ib, "text", {}))
        diffs.tree(f"{name} text chunks", text_a, text_b)
        _pixels(name, np.asarray(ia), np.asarray(ib), diffs)


def _xml_tree(element: ET.Element) -> dict[str, Any]:
    return {
        "tag": element.tag,
        "attrib": dict(element.attrib),
        "text": (element.text or "").strip(),
        "children": [_xml_tree(child) for child in element],
    }


def compare_slide(a: Path, b: Path, run_a: Path, run_b: Path, diffs: Diffs) -> None:
    names_a = {p.name for p in a.iterdir()} if a.is_dir() else set()
    names_b = {p.name for p in b.iterdir()} if b.is_dir() else set()
    for only, side in ((names_a - names_b, "A"), (names_b - names_a, "B")):
        if only:
            diffs.add(f"files only in {side}: {', '.join(sorted(only))}")
    handlers: dict[str, Callable[[Path, Path], None]] = {
        "mask.tif": lambda x, y: compare_tiff(x, y, diffs),
        "heatmap.png": lambda x, y: compare_png(x, y, diffs),
        "tumour.geojson": lambda x, y: diffs.tree(x.name, json.loads(x.read_text()), json.loads(y.read_text())),
        "tumour.xml": lambda x, y: diffs.tree(
            x.name, _xml_tree(ET.parse(x).getroot()), _xml_tree(ET.parse(y).getroot())
        ),
        "report.json": lambda x, y: diffs.tree(
            x.name, _load_json(x, run_a, EXCLUDED_REPORT), _load_json(y, run_b, EXCLUDED_REPORT)
        ),
    }
    for name in sorted(names_a & names_b):
        x, y = a / name, b / name
        if name in handlers:
            handlers[name](x, y)
        elif x.is_file() and y.is_file():
            if x.read_bytes() != y.read_bytes():
                diffs.add(f"{name}: bytes differ")
        elif x.is_dir() != y.is_dir():
            diffs.add(f"{name}: a folder in one run, a file in the other")
        else:
            diffs.add(f"{name}: unexpected folder in a slide folder")


def _not_compared(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in NOT_COMPARED_RUN_FILES)


def _exit_status(run: Path) -> str | None:
    path = run / "exit_status.txt"
    return path.read_text().strip() if path.is_file() else None


def _compare_run_files(a: Path, b: Path, diffs: Diffs, entries: set[str]) -> None:
    """Top-level files of a run other than the per-slide / per-image entries."""
    sa, sb = _exit_status(a), _exit_status(b)
    if sa != sb:
        diffs.add(f"exit status {sa} != {sb}")
    top_a = {p.name for p in a.iterdir() if not _not_compared(p.name)} - entries
    top_b = {p.name for p in b.iterdir() if not _not_compared(p.name)} - entries
    for only, side in ((top_a - top_b, "A"), (top_b - top_a, "B")):
        if only:
            diffs.add(f"top-level entries only in {side}: {', '.join(sorted(only))}")
    if _both("summary.json", a / "summary.json", b / "summary.json", diffs):
        diffs.tree(
            "summary.json",
            _load_json(a / "summary.json", a, EXCLUDED_SUMMARY),
            _load_json(b / "summary.json", b, EXCLUDED_SUMMARY),
        )


def _is_patch_run(run: Path) -> bool:
    report = run / "report.json"
    if not report.is_file():
        return False
    try:
        return "results" in json.loads(report.read_text())
    except json.JSONDecodeError:
        return False


def _patch_outputs(run: Path) -> dict[str, dict[str, Path]]:
    """image key (relative path without suffix) -> {suffix: path} of every heatmap/mask PNG."""
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(run.rglob("*.png")):
        rel = path.relative_to(run).as_posix()
        if rel.startswith(".hydra/"):
            continue
        for suffix in (HEATMAP_SUFFIX, MASK_SUFFIX):
            if rel.endswith(suffix):
                found.setdefault(rel[: -len(suffix)], {})[suffix] = path
    return found


def _row_key(row: dict[str, Any]) -> str:
    """A results row's image key: its heatmap's name without ``_heatmap.png`` (a failed image: its input name)."""
    heatmap = row.get("heatmap")
    if isinstance(heatmap, str) and heatmap.endswith(HEATMAP_SUFFIX):
        return heatmap[: -len(HEATMAP_SUFFIX)]
    return str(row.get("image"))


def compare_patch_run(label: str, a: Path, b: Path, limit: int) -> list[tuple[str, list[str]]]:
    results: list[tuple[str, list[str]]] = []
    report_a = _load_json(a / "report.json", a, EXCLUDED_PATCH_REPORT) if (a / "report.json").is_file() else {}
    report_b = _load_json(b / "report.json", b, EXCLUDED_PATCH_REPORT) if (b / "report.json").is_file() else {}
    rows_a = {_row_key(row): row for row in report_a.get("results", [])}
    rows_b = {_row_key(row): row for row in report_b.get("results", [])}
    out_a, out_b = _patch_outputs(a), _patch_outputs(b)
    for key in sorted(set(out_a) | set(out_b) | set(rows_a) | set(rows_b), key=str):
        diffs = Diffs(limit)
        files_a, files_b = out_a.get(key, {}), out_b.get(key, {})
        for suffix in (HEATMAP_SUFFIX, MASK_SUFFIX):
            if suffix in files_a and suffix in files_b:
                compare_png(files_a[suffix], files_b[suffix], diffs, name=suffix.lstrip("_"))
            elif suffix in files_a or suffix in files_b:
                diffs.add(f"{suffix.lstrip('_')}: only in {'A' if suffix in files_a else 'B'}")
        diffs.tree("report.json results row", rows_a.get(key), rows_b.get(key))
        results.append((f"{label}{key}", diffs.items))
    run_diffs = Diffs(limit)
    # top-level names holding the images' outputs (the PNGs, or the sub-folders mirroring the input's)
    entries = {
        path.relative_to(run).parts[0]
        for run, out in ((a, out_a), (b, out_b))
        for v in out.values()
        for path in v.values()
    }
    _compare_run_files(a, b, run_diffs, entries | {"report.json"})
    if _both("report.json", a / "report.json", b / "report.json", run_diffs):
        strip_a = {k: v for k, v in report_a.items() if k != "results"}
        strip_b = {k: v for k, v in report_b.items() if k != "results"}
        run_diffs.tree("report.json", strip_a, strip_b)
        if list(rows_a) != list(rows_b):
            run_diffs.add("report.json: results rows in another order")
    results.append((f"{label}(run)", run_diffs.items))
    return results


def compare_run(label: str, a: Path, b: Path, limit: int) -> list[tuple[str, list[str]]]:
    """(entry name, differences) for every slide folder (or patch image) of two run dirs, then the run itself."""
    if not a.is_dir() or not b.is_dir():
        return [(f"{label}(run)", [f"run dir only in {'A' if a.is_dir() else 'B'}"])]
    if _is_patch_run(a) or _is_patch_run(b):
        return compare_patch_run(label, a, b, limit)
    results: list[tuple[str, list[str]]] = []
    slides_a = {p.name for p in a.iterdir() if p.is_dir() and not _not_compared(p.name)}
    slides_b = {p.name for p in b.iterdir() if p.is_dir() and not _not_compared(p.name)}
    for name in sorted(slides_a | slides_b):
        diffs = Diffs(limit)
        if name not in slides_a or name not in slides_b:
            diffs.add(f"slide folder only in {'A' if name in slides_a else 'B'}")
        else:
            compare_slide(a / name, b / name, a, b, diffs)
        results.append((f"{label}{name}", diffs.items))
    run_diffs = Diffs(limit)
    _compare_run_files(a, b, run_diffs, slides_a | slides_b)
    results.append((f"{label}(run)", run_diffs.items))
    return results


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in _MARKERS)


def compare(a: Path, b: Path, limit: int) -> list[tuple[str, list[str]]]:
    if _is_run_dir(a) or _is_run_dir(b):
        return compare_run("", a, b, limit)
    runs = sorted({p.name for root in (a, b) if root.is_dir() for p in root.iterdir() if _is_run_dir(p)})
    if not runs:
        raise SystemExit(f"no run dirs in {a} or {b}")
    results: list[tuple[str, list[str]]] = []
    for name in runs:
        results.extend(compare_run(f"{name}/", a / name, b / name, limit))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path, help="run dir (or root of run dirs) A, e.g. the reference")
    parser.add_argument("run_b", type=Path, help="run dir (or root of run dirs) B")
    parser.add_argument("--max-diffs", type=int, default=5, help="differences listed per file (default 5)")
    args = parser.parse_args(argv)
    for path in (args.run_a, args.run_b):
        if not path.is_dir():
            parser.error(f"not a folder: {path}")
    print(f"A: {args.run_a.resolve()}\nB: {args.run_b.resolve()}")
    print(
        f"excluded: slide report.json {', '.join(EXCLUDED_REPORT)}; patch report.json "
        f"{', '.join(EXCLUDED_PATCH_REPORT)}; summary.json {', '.join(EXCLUDED_SUMMARY)}; mask.tif tags "
        f"{', '.join(sorted(TIFF_LAYOUT_TAGS))}; run files {', '.join(sorted(NOT_COMPARED_RUN_FILES))}"
    )
    print(
        "normalised: run dir path -> <RUN> (config.writer.output_dir, patch report output_dir); "
        ".../wsiseg/assets/ -> <wsiseg>/assets/ (provenance.weights, config.model.checkpoint)"
    )
    results = compare(args.run_a, args.run_b, args.max_diffs)
    same = 0
    for name, items in results:
        if items:
            print(f"{name}: DIFFERS")
            for item in items:
                print(f"    {item}")
        else:
            same += 1
            print(f"{name}: identical")
    print(f"{same} identical, {len(results) - same} differ")
    return 0 if same == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
