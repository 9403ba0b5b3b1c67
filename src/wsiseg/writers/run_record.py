"""The run's account of its slides (or patch images): one ``report.json`` per slide, ``summary.json`` for the run (patch
mode: one ``report.json`` for the run), the config hash that decides what a resumed run keeps, and the clean-up of
what an interrupted run left.

Plain code, no Lightning: the writers call it as slides and images finish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsiseg.atomic import write_json_atomic
from wsiseg.data.datasets import SlideTiles
from wsiseg.data.plan import RunPlan
from wsiseg.errors import UserInputError, full_disk, interruption
from wsiseg.safe_paths import display_name, inside, remove_inside
from wsiseg.writers.render import OUTPUT_FILES, POST_PROCESSING

__all__ = [
    "RunRecord",
    "config_hash",
    "post_hash",
    "read_complete_report",
    "remove_leftovers",
    "remove_stale",
    "reported_tiles",
    "discard_unreported",
    "clear_outputs",
    "staging_dir",
    "publish_slide",
    "check_writable",
    "base_report",
]

log = logging.getLogger(__name__)


# Options that change how fast or where a run goes, not what it writes (left out of the config hash).
_RUN_ONLY = {
    "data": {
        "slides",
        "input_dir",
        "num_workers",
        "pin_memory",
        "prefetch_factor",
        "extensions",
        "read_threads",
        "shard",
    },
    "writer": {"output_dir", "write_workers", "blend_thread", "cache_mb", "mask"},
    "model": {"compile", "compile_min_tiles", "runtime", "runtime_min_tiles", "int8"},
}


def _slide_writer(config: dict[str, Any]) -> bool:
    writer = config.get("writer")
    return isinstance(writer, dict) and str(writer.get("_target_", "")).endswith(".SlideWriter")


def config_hash(config: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> str:
    """Stable short hash of what changes a run's outputs: the ``model``, ``data`` and ``writer`` sections less the
    options that only change where or how fast it runs (:data:`_RUN_ONLY`), the trainer's precision, and ``extra``
    (options a writer was given directly). ``resume=true`` keeps only outputs written under the same hash.

    In slide mode the post-processing options (:data:`wsiseg.writers.render.POST_PROCESSING`: threshold, contours)
    are left out too: they change what is derived from ``mask.tif``, not the mask, and have a hash of their own
    (:func:`post_hash`)."""
    config = config or {}
    relevant: dict[str, Any] = {}
    post = set(POST_PROCESSING) if _slide_writer(config) else set()
    for section in ("model", "data", "writer"):
        value = config.get(section)
        if isinstance(value, dict):
            # INT8 changes the maps: model.runtime=openvino_int8 and its settings count then
            int8 = section == "model" and value.get("runtime") == "openvino_int8"
            value = {
                k: v
                for k, v in value.items()
                if (k not in _RUN_ONLY[section] or (int8 and k in ("runtime", "int8")))
                and not (section == "writer" and k in post)
            }
        relevant[section] = value
    trainer = config.get("trainer")
    relevant["precision"] = trainer.get("precision") if isinstance(trainer, dict) else None
    if extra:
        relevant["extra"] = extra
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def post_hash(config: dict[str, Any] | None) -> str:
    """Stable short hash of a slide run's post-processing options (``writer.threshold``, ``contours``,
    ``min_area_um2``, ``simplify_um``): a complete slide whose report holds another is post-processed again from its
    ``mask.tif`` (:func:`wsiseg.writers.postprocess.refresh`), without the network."""
    writer = (config or {}).get("writer")
    writer = writer if isinstance(writer, dict) else {}
    relevant = {key: writer.get(key) for key in POST_PROCESSING}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_complete_report(
    slide_dir: Path, expected_hash: str, identity: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The slide's report if it says ``complete`` for the same config hash (and, given ``identity``, the same slide
    file: :func:`wsiseg.data.plan.slide_identity`) and its outputs exist, else None."""
    try:
        report = json.loads((slide_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if report.get("status") != "complete" or report.get("config_hash") != expected_hash:
        return None
    if identity is not None and report.get("slide_identity") != identity:
        return None
    if not (slide_dir / "mask.tif").is_file() or not (slide_dir / "heatmap.png").is_file():
        return None
    return report


def reported_tiles(output_dir: Path, names: Sequence[str]) -> int:
    """Tiles the complete reports of ``output_dir/<name>`` processed (0 for a report that cannot be read): a resumed
    run counts them with its own, so ``model.compile=auto`` decides as the uninterrupted run did."""
    return sum(_reported_work(output_dir / name)[0] for name in names)


def remove_stale(slide_dir: Path, *, root: Path) -> None:
    """Remove what an interrupted run left in a slide folder: the old report (the slide is being redone), partial
    stores, scratch pyramids and temporary files. Completed outputs are replaced atomically later.

    ``root`` is the run folder: ``slide_dir`` must lie inside it and every entry removed inside ``slide_dir``
    (:func:`wsiseg.safe_paths.inside`, links resolved), else nothing is removed.

    Raises:
        UnsafePathError: ``slide_dir`` is not inside ``root``.
    """
    inside(root, slide_dir)
    if not slide_dir.is_dir():
        return
    remove_inside(slide_dir, slide_dir / "report.json")
    remove_leftovers(slide_dir, root=root)


def remove_leftovers(slide_dir: Path, *, root: Path) -> None:
    """Remove the hidden entries of a slide folder (partial stores, scratch pyramids, temporary files) and its staging
    folder (:func:`staging_dir`): what a killed run left next to outputs that are complete and kept
    (``resume=true``). ``root`` as in :func:`remove_stale`."""
    inside(root, slide_dir)
    remove_inside(root, staging_dir(slide_dir))
    _remove_hidden(slide_dir)


def _remove_hidden(folder: Path) -> None:
    """Remove the hidden entries of ``folder`` (each checked to lie inside it), if it exists."""
    if folder.is_dir():
        for leftover in folder.glob(".*"):
            remove_inside(folder, leftover)


def staging_dir(slide_dir: Path) -> Path:
    """Where a slide's outputs and report are written before :func:`publish_slide` makes them the slide folder's:
    ``.<slide name>.staging`` beside it, in the run folder."""
    return slide_dir.parent / f".{slide_dir.name}.staging"


def publish_slide(staging: Path, slide_dir: Path, *, root: Path) -> None:
    """Make the files in ``staging`` (outputs and ``report.json``) the slide folder's, all at once: a process killed at
    any moment leaves either all of them in ``slide_dir`` or none (``staging`` is a leftover then, removed by the next
    run). The slide's store must be released first.

    ``slide_dir``'s hidden entries (scratch a killed run left) are removed, then ``staging`` replaces it in one rename
    when it is missing or holds nothing else. A folder that also holds files of someone else's (anything not
    hidden) keeps them: the files are moved in one by one, ``report.json`` last, so the report still appears only
    with its outputs. ``root`` as in :func:`remove_stale`.

    Raises:
        UnsafePathError: ``staging`` or ``slide_dir`` is not inside ``root``.
    """
    inside(root, staging)
    inside(root, slide_dir)
    _remove_hidden(staging)
    _remove_hidden(slide_dir)
    if not slide_dir.is_dir() or not any(slide_dir.iterdir()):
        os.replace(staging, slide_dir)  # rename(2) over a missing or empty folder is atomic
        return
    files = sorted(staging.iterdir(), key=lambda path: path.name == "report.json")
    for path in files:
        os.replace(path, slide_dir / path.name)
    staging.rmdir()


def clear_outputs(slide_dir: Path, *, root: Path) -> None:
    """Remove a slide folder's report, outputs (:data:`wsiseg.writers.render.OUTPUT_FILES`) and scratch files: the
    slide is redone by this run, or cannot be processed by it, so nothing an earlier run wrote there may look like
    this run's result. The folder itself stays. ``root`` as in :func:`remove_stale`."""
    inside(root, slide_dir)
    if not slide_dir.is_dir():
        return
    for name in OUTPUT_FILES:
        remove_inside(slide_dir, slide_dir / name)
    remove_stale(slide_dir, root=root)


def discard_unreported(slide_dir: Path, *, root: Path) -> None:
    """A slide stopped while its files were written has no ``report.json``: remove every output it may have left
    (:func:`clear_outputs`), so none looks complete."""
    if not (slide_dir / "report.json").exists():
        clear_outputs(slide_dir, root=root)


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there.

    Raises:
        UserInputError: naming ``writer.output_dir`` and why it is not writable, or that it is empty (an empty path
            would write into the working folder).
    """
    if not str(folder).strip():
        raise UserInputError("writer.output_dir is empty: give the run folder, e.g. writer.output_dir=outputs/run1")
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".wsiseg-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserInputError(
            f"writer.output_dir '{folder}' is not writable ({exc.strerror or exc}): choose another folder"
        ) from None


def base_report(
    slide: SlideTiles,
    *,
    output_downsample: int,
    blend: str,
    tiles_processed: int,
    tiles_duplicated: int,
    tiles_per_rank: list[int],
    world_size: int,
    batch_size: int | None,
) -> dict[str, Any]:
    """A slide's ``report.json`` fields known before its outputs are written (geometry in the frames of
    :mod:`wsiseg.data.grid`, tile counts); ``status`` starts ``incomplete``."""
    level = slide.level
    return {
        "slide": display_name(str(slide.path)),
        "name": slide.name,
        "slide_identity": slide.identity,
        "status": "incomplete",
        "level0_size": list(slide.level0_size),
        "level": level.level,
        "level_downsample": level.downsample,
        "level_size": list(level.size),
        "mpp_level0": None if level.mpp is None else level.mpp / level.downsample,
        "mpp_read_level": level.mpp,
        "mpp_source": slide.mpp_source,
        "mpp_target_source": slide.mpp_target,
        **({} if slide.stain is None else {"stain": slide.stain.report}),
        "resampled": level.resampled,
        "read_scale": level.scale,
        "source_downsample": level.source_downsample,
        "source_level_size": list(level.source_size),
        "output_downsample": output_downsample,
        "output_size": list(slide.grid.output_size),
        "output_mpp": None if level.mpp is None else level.mpp * output_downsample,
        "patch_size": slide.grid.patch_size,
        "overlap": slide.grid.overlap,
        "blend": blend,
        "tiles_total": slide.tiles_total,
        "tiles_tissue": slide.tiles_tissue,
        "tiles_processed": tiles_processed,
        "tiles_duplicated": tiles_duplicated,
        "tissue_fraction": round(slide.tissue_fraction, 6),
        "world_size": world_size,
        "tiles_per_rank": tiles_per_rank or [tiles_processed],
        "batch_size": batch_size,
    }


def _reported_work(slide_dir: Path) -> tuple[int, float]:
    """(tiles processed, wall seconds) a slide's ``report.json`` records; (0, 0.0) when it cannot be read."""
    try:
        report = json.loads((slide_dir / "report.json").read_text())
        return int(report.get("tiles_processed", 0)), float(report.get("wall_time_s", 0.0))
    except (OSError, ValueError, TypeError):
        return 0, 0.0


class RunRecord:
    """Result rows of one run and the files that hold them.

    Args:
        output_dir: the run folder; ``<slide name>/report.json`` and ``summary.json`` go there.
        run_config: the composed config, stored in each report; its :func:`config_hash` decides resumes.
        provenance: what produced the outputs (versions, weights and their SHA-256), stored in each report.
        hash: the config hash when the writer computed it with options of its own
            (``config_hash(run_config, extra=...)``); None: ``config_hash(run_config)``.

    Example::

        record = RunRecord(Path("outputs/run"), cfg_dict, {})
        record.add_row(path, "skipped", reason="cannot be opened")
        record.write_summary()
    """

    def __init__(
        self,
        output_dir: Path,
        run_config: dict[str, Any] | None,
        provenance: dict[str, Any] | None = None,
        hash: str | None = None,
    ) -> None:
        self.output_dir = output_dir
        self.run_config = run_config
        self.provenance = dict(provenance or {})
        self.hash = hash or config_hash(run_config)
        self.rows: list[dict[str, Any]] = []
        self.run_report: dict[str, Any] = {}

    def start(self, plan: RunPlan) -> None:
        """Begin the run's rows afresh with the plan's skipped (cannot be processed) and resumed slides."""
        self.rows.clear()
        for path, reason in plan.failed:
            self.add_row(path, "skipped", reason=reason)
        for path, name in plan.resumed:  # the tiles and time of the run that made their outputs
            tiles, seconds = _reported_work(self.output_dir / name)
            self.add_row(
                path, "complete", name=name, tiles=tiles, seconds=seconds, reason="resumed: complete outputs kept"
            )

    def add_row(
        self,
        path: Path,
        status: str,
        *,
        name: str | None = None,
        tiles: int = 0,
        seconds: float = 0.0,
        reason: str = "",
        **extra: Any,
    ) -> None:
        """One result row (``complete``, ``skipped``, ``failed`` or ``interrupted``); ``extra`` fields follow."""
        row: dict[str, Any] = {"slide": display_name(str(path))}
        if name is not None:
            row["name"] = name
        row.update({"status": status, "tiles": tiles, "seconds": seconds, "reason": reason, **extra})
        self.rows.append(row)

    def write_report(self, slide_dir: Path, report: dict[str, Any]) -> None:
        """Write a finished slide's ``report.json`` (with the config hash, provenance and config) and add its row."""
        report = {
            **report,
            "config_hash": self.hash,
            "post_hash": post_hash(self.run_config),
            "provenance": self.provenance,
            "config": self.run_config,
        }
        write_json_atomic(slide_dir / "report.json", report)
        self.add_row(
            Path(report["slide"]),
            report["status"],
            name=report["name"],
            tiles=report["tiles_processed"],
            seconds=report["wall_time_s"],
            reason=report.get("error", ""),
            rank=report.get("rank", 0),
        )

    def write_run_report(self, fields: dict[str, Any]) -> Path:
        """``output_dir/report.json`` for a run reported as a whole (patch mode): ``fields``, then the config hash,
        provenance, config and every row. Returns its path."""
        self.run_report = {
            **fields,
            "config_hash": self.hash,
            "provenance": self.provenance,
            "config": self.run_config,
            "results": self.rows,
        }
        path = self.output_dir / "report.json"
        write_json_atomic(path, self.run_report)
        return path

    def write_interrupted(
        self,
        unfinished: Sequence[SlideTiles],
        started: dict[str, tuple[int, float]],
        exception: BaseException,
    ) -> None:
        """The run stopped on ``exception`` (SIGTERM, Ctrl-C or an error): list the ``unfinished`` slides as
        ``interrupted``, the ``started`` ones (name -> tiles predicted, seconds since their first batch) with what
        they had done (they are left without outputs: ``resume=true`` redoes them), and write ``summary.json``."""
        kind = interruption(exception)
        reason = f"interrupted ({kind}) before this slide was written"
        if full_disk(exception) is not None:
            reason = "no space left on the output device before this slide was written: free space, then resume=true"
        if started:
            names = ", ".join(s.name for s in unfinished if s.name in started)
            log.error("interrupted (%s): unfinished slide(s) %s left without outputs", kind, names)
        for slide in unfinished:
            tiles, seconds = started.get(slide.name, (0, 0.0))
            self.add_row(
                slide.path, "interrupted", name=slide.name, tiles=tiles, seconds=round(seconds, 3), reason=reason
            )
        try:
            self.write_summary()
        except OSError as exc:  # a full disk cannot take the summary either: the reports of finished slides stay
            log.error("summary.json not written: %s", exc)

    def write_summary(
        self, pending: Sequence[SlideTiles] | None = None, ranks: Sequence[dict[str, Any]] | None = None
    ) -> None:
        """``summary.json`` with every row so far. With ``pending`` (a run still going: its slides not yet written are
        listed as ``pending``) nothing is logged; without, the run is over: the table goes to the log too, and
        ``summary.csv`` and ``index.html`` are written beside it (:mod:`wsiseg.writers.run_index`).
        ``ranks``: each process's share and clock at the end of a run (``ranks`` in the file)."""
        rows = self.rows + [
            {
                "slide": display_name(str(s.path)),
                "name": s.name,
                "status": "pending",
                "tiles": 0,
                "seconds": 0.0,
                "reason": "",
            }
            for s in pending or ()
        ]
        write_json_atomic(
            self.output_dir / "summary.json", {"slides": rows, **({"ranks": list(ranks)} if ranks else {})}
        )
        if pending is not None:
            return
        from wsiseg.writers.run_index import write_run_index

        try:  # the run's outputs are written: a page that cannot be made must not fail it
            write_run_index(self.output_dir, self.rows)
        except Exception as exc:
            log.warning("summary.csv / index.html not written: %s", exc)
        lines = [f"{'slide':<40} {'status':<9} {'tiles':>7} {'seconds':>9}  reason"]
        for row in self.rows:
            name = Path(row["slide"]).name
            lines.append(f"{name:<40} {row['status']:<9} {row['tiles']:>7} {row['seconds']:>9.1f}  {row['reason']}")
        log.info("summary (%s):\n%s", self.output_dir / "summary.json", "\n".join(lines))
