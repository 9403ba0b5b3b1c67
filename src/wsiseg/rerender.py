"""``wsiseg-render RUN_DIR [writer.threshold=0.3] [writer.contours=[geojson]] ...``: post-process a finished slide run
again from its ``mask.tif`` files, without the network (:mod:`wsiseg.writers.postprocess`).

Only the post-processing options may be given (:data:`wsiseg.writers.render.POST_PROCESSING`, with or without the
``writer.`` prefix); the others come from each slide's report. The slides' reports, contour files, ``summary.csv``
and ``index.html`` are rewritten; masks and heatmaps stay.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from wsiseg.errors import UserInputError

__all__ = ["main", "render_run"]

log = logging.getLogger(__name__)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (YAML values: ``0.3``, ``[geojson,asap_xml]``, ``null``) of post-processing options.

    Raises:
        UserInputError: a pair without ``=``, or a key that is not a post-processing option (with the closest one).
    """
    from wsiseg.writers.render import POST_PROCESSING

    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name = key.removeprefix("writer.")
        if not sep or name not in POST_PROCESSING:
            known = [f"writer.{k}" for k in POST_PROCESSING]
            close = difflib.get_close_matches(key if key.startswith("writer.") else f"writer.{key}", known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserInputError(
                f"'{item}': {hint}wsiseg-render takes only post-processing options as key=value: {', '.join(known)}"
            )
        try:
            options[name] = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            raise UserInputError(
                f"'{item}': the value is not valid (e.g. writer.contours=[geojson,asap_xml])"
            ) from None
    return options


def render_run(run_dir: str | Path, **overrides: Any) -> list[str]:
    """Post-process every complete slide of the slide run in ``run_dir`` with ``overrides`` (post-processing
    options; the rest as each slide's report records), then rewrite ``summary.csv`` and ``index.html``. Returns the
    names of the slides whose outputs changed.

    Raises:
        UserInputError: ``run_dir`` is not a finished slide run, or an option is out of range (one line).
    """
    from wsiseg.run_lock import run_folder_lock
    from wsiseg.writers.options import writer_section_options
    from wsiseg.writers.postprocess import refresh
    from wsiseg.writers.render import POST_PROCESSING
    from wsiseg.writers.run_index import write_run_index

    run_dir = Path(run_dir)
    summary = run_dir / "summary.json"
    if not summary.is_file():
        raise UserInputError(f"'{run_dir}' holds no summary.json: pass the folder of a finished wsiseg-predict run")
    unknown = set(overrides) - set(POST_PROCESSING)
    if unknown:
        raise UserInputError(f"not post-processing options: {', '.join(sorted(unknown))}")
    changed = []
    with run_folder_lock(run_dir):
        rows = json.loads(summary.read_text()).get("slides", [])
        for row in rows:
            slide_dir = run_dir / str(row.get("name", ""))
            if row.get("status") != "complete" or not (slide_dir / "report.json").is_file():
                continue
            report = json.loads((slide_dir / "report.json").read_text())
            config = report.get("config") or {}
            writer = {**(config.get("writer") or {}), **overrides}
            options = writer_section_options(writer).render  # checked as wsiseg-predict checks them
            if refresh(slide_dir, options, {**config, "writer": writer}):
                changed.append(slide_dir.name)
        write_run_index(run_dir, rows)
    return changed


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``wsiseg-render`` (``--version`` as the other commands answer it)."""
    from wsiseg.cli import exit_if_version_asked, user_errors

    if argv is None:
        exit_if_version_asked("wsiseg-render")
    parser = argparse.ArgumentParser(
        prog="wsiseg-render",
        description="Post-process a finished slide run again from its mask.tif files (no network): tumour figures "
        "at another threshold, contour files; summary.csv and index.html rewritten.",
        epilog="e.g. wsiseg-render outputs/run1 writer.threshold=0.3 writer.contours=[geojson,asap_xml] "
        "writer.min_area_um2=2000",
    )
    parser.add_argument("run_dir", help="the folder of a finished wsiseg-predict run (hydra.run.dir)")
    parser.add_argument(
        "options", nargs="*", help="writer.threshold= writer.contours= writer.min_area_um2= writer.simplify_um="
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    with user_errors("wsiseg-render"):
        changed = render_run(args.run_dir, **parse_overrides(args.options))
        run_dir = Path(args.run_dir)
        print(
            f"wsiseg-render: {len(changed)} slide(s) post-processed again; results: {run_dir / 'index.html'} and "
            f"{run_dir / 'summary.csv'}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
