"""One finished slide, from its store to its files: the report's geometry and counts, the rendered outputs, then
``report.json`` and the summary row; a slide that fails leaves only its report (``status: failed``). The files are
written into a staging folder and appear in the slide folder together (:func:`wsiseg.writers.run_record.publish_slide`).

Plain code, no Lightning: the slide writer calls :func:`write_slide` once per slide, on the rank that writes it.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from pathlib import Path

from wsiseg.data.datasets import SlideTiles
from wsiseg.errors import first_line
from wsiseg.safe_paths import remove_inside
from wsiseg.writers.render import OUTPUT_FILES, RenderOptions, render_slide
from wsiseg.writers.run_record import RunRecord, base_report, publish_slide, staging_dir
from wsiseg.writers.stitcher import SlideState

__all__ = ["incomplete_reason", "write_slide"]

log = logging.getLogger(__name__)


def write_slide(
    slide: SlideTiles,
    state: SlideState,
    out_dir: Path,
    record: RunRecord,
    render: RenderOptions,
    *,
    output_downsample: int,
    blend: str,
    world_size: int,
    batch_size: int | None,
    root: Path,
    release: Callable[[], None],
    position: str = "",
    rank: int = 0,
) -> str:
    """Render ``slide``'s outputs from ``state.store`` into ``out_dir`` and record them; returns the status
    (``complete`` or ``failed``). A slide is complete only when every planned tile was predicted with a finite map: a
    tile error recorded in ``state`` (unreadable, NaN/inf out of the network) or a planned tile that never arrived
    fails the slide without rendering (the reason gives the count); a failure while
    rendering removes whatever was written.

    Everything is written into :func:`~wsiseg.writers.run_record.staging_dir` first; then ``release`` (which frees
    the slide's store and scratch, inside ``out_dir``) is called, once, also when writing raised, and the staged files
    are published into ``out_dir`` at once, so a process killed at any moment leaves a slide folder with all of its
    files or none. ``root`` is the run folder (every path touched lies inside it). ``position`` (``2/5``) prefixes the
    log line of a completed slide; ``rank`` (the DDP rank writing it) goes into the report."""
    try:
        staging = staging_dir(out_dir)
        remove_inside(root, staging)
        staging.mkdir(parents=True)
        report = base_report(
            slide,
            output_downsample=output_downsample,
            blend=blend,
            tiles_processed=len(state.tiles_seen),
            tiles_duplicated=state.duplicates,
            tiles_per_rank=state.tiles_per_rank,
            world_size=world_size,
            batch_size=batch_size,
        )
        report["rank"] = rank
        report["store"] = state.store.stats()  # evictions and reloads of its chunk cache (a thrashing cache shows here)
        try:
            if state.error:
                raise RuntimeError(state.error)
            if len(state.tiles_seen) != slide.tiles_tissue:
                raise RuntimeError(incomplete_reason(len(state.tiles_seen), slide.tiles_tissue))
            fields = render_slide(
                slide,
                state.store,
                staging,
                output_mpp=report["output_mpp"],
                level0_per_mask_px=report["level_downsample"] * output_downsample,
                mpp_level0=report["mpp_level0"],
                options=render,
            )
            report.update(fields, status="complete")
        except Exception as exc:
            report.update(status="failed", error=_reason(exc))
            for name in OUTPUT_FILES:
                (staging / name).unlink(missing_ok=True)
            log.error("slide '%s' failed: %s", slide.path, exc)
        seconds = max(time.perf_counter() - state.started, 1e-9)
        report.update(
            wall_time_s=round(seconds, 3),
            patches_per_s=round(len(state.tiles_seen) / seconds, 2),
            finished_at=round(time.time(), 3),  # unix seconds: when this slide's outputs were complete
        )
        record.write_report(staging, report)
    finally:  # the store goes whatever happens; only then can the staged files replace the folder
        release()
    publish_slide(staging, out_dir, root=root)
    if report["status"] == "complete":
        log.info(
            "slide %s%s: %d tiles in %.1f s (%.1f patches/s) -> %s",
            f"{position} " if position else "",
            slide.name,
            len(state.tiles_seen),
            seconds,
            report["patches_per_s"],
            out_dir,
        )
    return str(report["status"])


def incomplete_reason(predicted: int, planned: int) -> str:
    """Why a slide with ``predicted`` of its ``planned`` tiles is not complete: its mask would be partly blank."""
    return (
        f"only {predicted} of {planned} planned tiles were predicted (the run stopped feeding this slide early, e.g. "
        "trainer.limit_predict_batches or fast_dev_run): its mask would be partly blank; run without those options"
    )


def _reason(exc: BaseException) -> str:
    """A failed slide's one-line reason; a full disk says so (TIFF writers report it as "N requested and M written")."""
    text = first_line(exc)
    full = getattr(exc, "errno", None) == errno.ENOSPC or ("requested and" in text and "written" in text)
    if full:
        return f"no space left on the output device ({text}): free space or choose another writer.output_dir"
    return text
