"""The report of ``wsiseg-bench``: the warnings that make a run's figures untrustworthy, the INT8 calibration's
figures, and the table printed from ``bench.json``."""

from __future__ import annotations

import logging
from typing import Any

from wsiseg.bench.cases import CaseResult

__all__ = ["bench_warnings", "format_table", "int8_figures"]

log = logging.getLogger(__name__)


def bench_warnings(efficiency: float, naive_halves: list[float]) -> list[str]:
    """What makes a bench run's figures untrustworthy: the pipeline beating its own bound by more than 5 % (the bound's
    case ran while the machine was busier), or the two naive halves more than 10 % apart (the machine's speed moved)."""
    warnings = []
    if efficiency > 1.05:
        warnings.append(
            f"pipeline efficiency {efficiency:.0%} exceeds the bound: the machine's load changed between the "
            "cases; re-run on a quiet machine before quoting these figures"
        )
    low, high = min(naive_halves), max(naive_halves)
    if low > 0 and high / low > 1.10:
        warnings.append(
            f"the naive halves differ by {high / low - 1:.0%} ({low:.2f} vs {high:.2f} patches/s): the machine's "
            "speed drifted during the run; repeat it and quote ratios"
        )
    for warning in warnings:
        log.warning("bench: %s", warning)
    return warnings


def int8_figures(int8: dict[str, Any] | None, optimised: CaseResult, naive_rate: float) -> dict[str, Any]:
    """``model.runtime=openvino_int8``: the outcome of its calibration and check, and the optimised run's speed-up
    over the naive loop with the calibration's seconds counted in (what a run of this many tiles costs end to end)."""
    if int8 is None:
        return {}
    with_calibration = optimised.patches / (optimised.seconds + int8["seconds"])
    return {
        "int8": int8,
        "speedup_optimised_with_int8_calibration_vs_naive": round(with_calibration / naive_rate, 3),
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'case':<12} {'patches':>8} {'patches/s':>10} {'ms/patch':>9} {'peak GPU MB':>12} {'peak RSS MB':>12}"]
    for name in ("naive", "optimised", "read_bound", "model_bound"):
        c = report["cases"][name]
        gpu = "-" if c["peak_gpu_mb"] is None else f"{c['peak_gpu_mb']:.0f}"
        lines.append(
            f"{name:<12} {c['patches']:>8} {c['patches_per_s']:>10.2f} {c['ms_per_patch']:>9.2f} "
            f"{gpu:>12} {c['peak_rss_mb']:>12.0f}"
        )
    host = report["cases"].get("host_bound")
    if host:
        cpu = host["host_cpu_us_per_tile"]
        rate = "-" if host["patches_per_s"] is None else f"{host['patches_per_s']:.2f}"
        lines.append(
            f"{'host_bound':<12} {host['patches']:>8} {rate:>10}   (zero-cost network, steady state) host CPU per "
            f"tile: main {cpu['main']:.0f} us, stitch {cpu['stitch']:.0f} us, reader {cpu['reader']:.0f} us "
            f"({host['reader_in']}); finalise {host['finalise_s']} s; blocked {host['blocked_s']:.2f} s "
            f"({host['blocked_fraction']:.1%})"
        )
    s = report["summary"]
    lines.append(
        f"speedup optimised/naive: {s['speedup_optimised_vs_naive']:.2f}x   pipeline efficiency "
        f"{s['pipeline_efficiency']:.0%} of the {s['bound']} bound   first batch {s['warmup_first_batch_s']} s"
    )
    before, after = s["naive_patches_per_s_before_after_optimised"]
    lines.append(f"naive in two halves, before / after the optimised run: {before:.2f} / {after:.2f} patches/s")
    lines.append(
        f"read and model taking turns: {s['serial_bound_patches_per_s']:.1f} patches/s; optimised is "
        f"{s['efficiency_vs_serial_bound']:.0%} of that"
    )
    lines.append(
        f"{s['precision']} vs fp32: Dice {s['dice_vs_fp32']:.5f}, max |dp| {s['max_abs_prob_diff']:.4f}, "
        f"mean |dp| {s['mean_abs_prob_diff']:.5f}"
    )
    lines.append(
        f"network {s['network_gflop_per_patch']:.2f} GFLOP/patch; model bound "
        f"{s['model_bound_tflops']:.3f} TFLOP/s = {s['model_bound_fraction_of_peak']:.0%} of the measured "
        f"{s['compute_dtype']} matmul peak {s['matmul_peak_tflops']:.3f} TFLOP/s "
        f"(ceiling {s['flop_ceiling_patches_per_s']} patches/s); naive {s['naive_tflops']:.3f} TFLOP/s = "
        f"{s['naive_fraction_of_fp32_peak']:.0%} of the fp32 peak {s['matmul_peak_fp32_tflops']:.3f}"
    )
    for name, row in report.get("peers", {}).items():
        if "skipped" in row:
            lines.append(f"peer {name}: skipped ({row['skipped']})")
        else:
            lines.append(
                f"peer {name}: {row['patches_per_s']:.2f} patches/s on {row['tiles']} tiles, mean |d| vs naive "
                f"{row['mean_abs_grey_diff_vs_naive']:.3f} grey levels; optimised is "
                f"{row['speedup_optimised_vs_peer']:.2f}x"
            )
    lines.extend(f"WARNING: {w}" for w in s.get("warnings", []))
    for row in report["ddp_cpu"]:
        lines.append(
            f"ddp cpu {row['ranks']} rank(s), data.shard={row['shard']}, {row['slides']} slide(s): "
            f"{row['patches_per_s']:.2f} patches/s ({row['tiles']} tiles, {row['seconds']} s); rank 0 idle at the end "
            f"{row['rank0_idle_at_end_s']} s (longest {row['max_idle_at_end_s']} s); first slide written "
            f"{row['first_tile_to_first_slide_s']} s after the first tile"
        )
    return "\n".join(lines)
