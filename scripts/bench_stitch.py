"""Host cost of stitching: per-tile CPU of ``Stitcher.add_batch`` and per-chunk read-back, this tree against a git
revision, measured in the same session (issue 27).

    .venv/bin/python scripts/bench_stitch.py                   # every case, 3 repeats, against HEAD
    .venv/bin/python scripts/bench_stitch.py --cases strip --repeats 1 --reference ''   # this tree only
    .venv/bin/python scripts/bench_stitch.py --warm --cases mosaic blend   # a second slide per process

No Lightning: a ``Stitcher`` over a synthetic slide plan (every tile of its grid, raster order) gets batches of 32
random float16 tiles (one channel), as ``SlideWriter`` hands them over. Cases:

* ``mosaic``: 16,384 × 8,192 read-level px, 512 px tiles, overlap 0, output downsample 1 (``TileMosaic``);
* ``blend``: 8,192 × 8,192, overlap 256, gaussian (``BlendingAccumulator``), the default 128 MiB chunk cache (its
  finished chunk rows are spilled to disk);
* ``blend_in_memory``: the same with a cache that holds the whole slide (the blending arithmetic without spills);
* ``mosaic_ds4`` / ``blend_ds4``: the same at output downsample 4 (128 px tiles in output px);
* ``strip``: 98,000 × 4,096 (a Camelyon-wide slide's width), overlap 256, gaussian: the chunk cache's evictions and
  reloads, and the process's peak RSS.

Every repeat of a case runs in a fresh child process per implementation (so its peak RSS is its own), the
implementations alternating; ``--warm`` measures a second slide in each process instead, with glibc keeping freed
memory as CPU runs do. Printed per case and implementation, min-max (median) over the repeats:

* the thread CPU time (``time.thread_time``) of ``add_batch`` per tile, split into user and system time
  (``RUSAGE_THREAD``; system time is the page faults of fresh chunk memory and the writes of spilled chunks), the
  process CPU time beside it (a larger figure would mean work on other threads) and the median over the batches;
* the read-back per chunk: ``band_chunks`` alone (also as the median over the rows of chunks) and with the uint8
  conversion ``render_slide`` applies to a blended chunk (``probabilities_to_u8``);
* the peak RSS (``ru_maxrss``; the imports alone take 0.6-0.9 GiB, see ``rss_before_mib``) and the store's counters
  (``stats()``; the reference's are counted by wrapping its ``_evict`` and ``_load``).

The reference implementation is ``stitcher.py`` and ``store.py`` of ``--reference`` (``git show``), its stitcher
importing that store. torch is limited to one thread; OpenCV keeps its default (the process figure shows whether it
used more).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
CASES: dict[str, dict[str, Any]] = {
    "mosaic": {"size": (16384, 8192), "overlap": 0, "downsample": 1},
    "blend": {"size": (8192, 8192), "overlap": 256, "downsample": 1},
    "blend_in_memory": {"size": (8192, 8192), "overlap": 256, "downsample": 1, "cache_mb": 1024},
    "mosaic_ds4": {"size": (16384, 8192), "overlap": 0, "downsample": 4},
    "blend_ds4": {"size": (8192, 8192), "overlap": 256, "downsample": 4},
    "strip": {"size": (98000, 4096), "overlap": 256, "downsample": 1},
}
PATCH, BATCH, POOL = 512, 32, 64


def _module_from_source(name: str, source: str) -> ModuleType:
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


def implementation(reference: str | None) -> tuple[Any, Any]:
    """(stitcher module, store module): this tree's, or those of git revision ``reference``."""
    if not reference:
        from wsiseg.writers import stitcher, store

        return stitcher, store

    def show(path: str) -> str:
        return subprocess.run(
            ["git", "show", f"{reference}:{path}"], cwd=REPO, check=True, capture_output=True, text=True
        ).stdout

    store = _module_from_source("reference_store", show("src/wsiseg/writers/store.py"))
    source = show("src/wsiseg/writers/stitcher.py")
    pointed = source.replace("from wsiseg.writers.store import", "from reference_store import")
    if pointed == source:
        raise SystemExit(f"{reference}'s stitcher.py does not import wsiseg.writers.store as expected")
    return _module_from_source("reference_stitcher", pointed), store


def planned_slide(size: tuple[int, int], overlap: int, downsample: int) -> Any:
    """Every tile of a ``size`` (W, H) read level, raster order (the plan ``SlideWriter`` gets, tissue everywhere)."""
    from wsiseg.data.datasets import SlideTiles
    from wsiseg.data.grid import TileGrid
    from wsiseg.data.slide import SlideLevel
    from wsiseg.data.tissue import Thumbnail

    grid = TileGrid(size, PATCH, overlap, downsample)
    origins = grid.origins()
    return SlideTiles(
        path=Path("/slides/bench.svs"),
        name="bench",
        level=SlideLevel(level=0, downsample=1.0, size=size, mpp=0.5),
        level0_size=size,
        grid=grid,
        origins=origins,
        tiles_total=len(origins),
        tissue_fraction=1.0,
        thumbnail=Thumbnail(np.full((64, 64, 3), 230, np.uint8), (size[0] / 64, size[1] / 64)),
    )


def run_case(case: str, reference: str | None, scratch: Path, warm: bool = False) -> dict[str, Any]:
    """One repeat of one case with one implementation, in this (fresh) process; with ``warm``, after the same slide
    once unmeasured and with glibc keeping freed memory (``wsiseg.malloc.keep_freed_memory``, as CPU runs do), so the
    measured slide reuses chunk memory instead of faulting fresh pages in."""
    import torch

    from wsiseg.malloc import keep_freed_memory

    torch.set_num_threads(1)
    stitcher_module, store_module = implementation(reference)
    spec = CASES[case]
    slide = planned_slide(spec["size"], spec["overlap"], spec["downsample"])
    side = PATCH // spec["downsample"]
    pool = np.random.default_rng(0).random((POOL, 1, side, side), dtype=np.float32).astype(np.float16)
    options = stitcher_module.StoreOptions(cache_bytes=spec.get("cache_mb", 128) << 20)
    out = scratch / f"{case}-{reference or 'tree'}"
    if warm:
        keep_freed_memory()
        one_slide(stitcher_module, store_module, slide, spec["downsample"], options, pool, out)
    return {
        "case": case,
        "impl": reference or "tree",
        **one_slide(stitcher_module, store_module, slide, spec["downsample"], options, pool, out),
    }


def count_cache_events(store_module: Any) -> dict[str, Any]:
    """For a store without ``stats()`` (the reference): count its evictions and its chunk loads while adding, by
    wrapping its ``_evict`` and ``_load``; the counts stop when ``adding`` is set False."""
    counts: dict[str, Any] = {"evictions": 0, "reloads": 0, "adding": True}
    store_class = store_module.BlendingAccumulator
    if hasattr(store_class, "stats"):
        return counts
    evict, load = store_class._evict, store_class._load

    def counted_evict(self: Any) -> None:
        counts["evictions"] += counts["adding"]
        evict(self)

    def counted_load(self: Any, *args: Any) -> np.ndarray:
        counts["reloads"] += counts["adding"]
        return load(self, *args)

    store_class._evict, store_class._load = counted_evict, counted_load
    return counts


def one_slide(
    stitcher_module: Any, store_module: Any, slide: Any, downsample: int, options: Any, pool: np.ndarray, out: Path
) -> dict[str, Any]:
    """Stitch ``slide`` (batches cut from ``pool``) and read it back as ``render_slide`` does; the figures."""
    # one process in raster order, as SlideWriter runs it: passed chunks kept as their final uint8 (where supported)
    in_order = {"in_order": True} if "in_order" in inspect.signature(stitcher_module.Stitcher).parameters else {}
    stitcher = stitcher_module.Stitcher([slide], out, output_downsample=downsample, options=options, **in_order)
    counted = count_cache_events(store_module)
    baseline_mib = psutil.Process().memory_info().rss / 2**20
    n = slide.tiles_tissue
    thread = process = user = system = 0.0
    per_batch = []  # thread µs per tile of each full batch
    for start in range(0, n, BATCH):
        count = min(BATCH, n - start)
        first = start % (POOL - BATCH)
        probs = pool[first : first + count]
        usage0, t0, p0 = resource.getrusage(resource.RUSAGE_THREAD), time.thread_time(), time.process_time()
        stitcher.add_batch(probs, [0] * count, list(range(start, start + count)), [""] * count, [True] * count, 0.0)
        thread += time.thread_time() - t0
        if count == BATCH:
            per_batch.append(1e6 * (time.thread_time() - t0) / count)
        process += time.process_time() - p0
        usage1 = resource.getrusage(resource.RUSAGE_THREAD)
        user += usage1.ru_utime - usage0.ru_utime
        system += usage1.ru_stime - usage0.ru_stime
    peak_adding_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    store = stitcher.state(0).store
    stats = store.stats() if hasattr(store, "stats") else {k: v for k, v in counted.items() if k != "adding"}
    counted["adding"] = False
    is_mosaic = type(store).__name__ == "TileMosaic"  # the store module of either checkout
    chunks, read, to_u8 = 0, 0.0, 0.0
    per_row = []  # thread µs per chunk of each row of chunks
    final = hasattr(store, "final_blocks")  # its rows are the uint8 blocks render_slide writes
    t0 = time.thread_time()
    for _, _, row in store.final_blocks() if final else store.band_chunks():
        read += time.thread_time() - t0
        if row:
            per_row.append(1e6 * (time.thread_time() - t0) / len(row))
        t1 = time.thread_time()
        for _, value, *_ in row:
            if not is_mosaic and not final:  # as render_slide did with a blended chunk
                store_module.probabilities_to_u8(value[0])
        to_u8 += time.thread_time() - t1
        chunks += len(row)
        t0 = time.thread_time()
    del row
    stitcher.release(0)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "tiles": n,
        "chunks": chunks,
        "add_us_per_tile": 1e6 * thread / n,
        "add_user_us_per_tile": 1e6 * user / n,
        "add_sys_us_per_tile": 1e6 * system / n,
        "add_process_us_per_tile": 1e6 * process / n,
        "add_batch_median_us_per_tile": statistics.median(per_batch),
        "read_us_per_chunk": 1e6 * read / chunks,
        "read_row_median_us_per_chunk": statistics.median(per_row),
        "read_u8_us_per_chunk": 1e6 * (read + to_u8) / chunks,
        "rss_before_mib": round(baseline_mib),
        "peak_rss_adding_mib": round(peak_adding_mib),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        **stats,
    }


FIGURES = {
    "add_us_per_tile": "add µs/tile",
    "add_user_us_per_tile": "user",
    "add_sys_us_per_tile": "sys",
    "add_process_us_per_tile": "process",
    "add_batch_median_us_per_tile": "median batch",
    "read_us_per_chunk": "read µs/chunk",
    "read_row_median_us_per_chunk": "median row",
    "read_u8_us_per_chunk": "+u8",
    "peak_rss_mib": "peak RSS MiB",
}


def summarise(runs: list[dict[str, Any]]) -> str:
    """One line: min-max (median) of each figure over the repeats, and the last repeat's cache figures."""

    def span(key: str) -> str:
        values = [run[key] for run in runs]
        return f"{min(values):.0f}-{max(values):.0f} ({statistics.median(values):.0f})"

    counts = {k: v for k, v in runs[-1].items() if k not in FIGURES and k not in {"case", "impl"}}
    figures = "  ".join(f"{label} {span(key)}" for key, label in FIGURES.items())
    return f"{runs[0]['case']:15s} {runs[0]['impl']:5s} {figures}  {counts}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", default="HEAD", help="git revision to compare with ('' for this tree only)")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for spilled chunks (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument(
        "--warm", action="store_true", help="measure a second slide per process, glibc keeping freed memory"
    )
    parser.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bench_stitch-"))
    if args.child:
        case, impl = args.child
        print(json.dumps(run_case(case, None if impl == "tree" else impl, scratch, args.warm)))
        return
    implementations = [args.reference, "tree"] if args.reference else ["tree"]
    results: list[dict[str, Any]] = []
    try:
        for case in args.cases:
            runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in implementations}
            for _ in range(args.repeats):
                for impl in implementations:
                    command = [sys.executable, __file__, "--child", case, impl, "--scratch", str(scratch)]
                    command += ["--warm"] if args.warm else []
                    child = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
                    runs[impl].append(json.loads(child.stdout.strip().splitlines()[-1]))
            for impl in implementations:
                print(summarise(runs[impl]), flush=True)
                results += runs[impl]
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
