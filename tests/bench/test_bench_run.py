"""wsiseg-bench runs every case on the same tiles and records figures (no timing assertions: figures only)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.helpers import run_command
from wsiseg.hardware import cpu_precision

SMALL_SLIDE_BENCH = [
    "trainer=cpu",
    "trainer.enable_progress_bar=false",
    "bench.generated_size=2048",
    "data.patch_size=256",
    "bench.model_batches=2",
    "data.batch_size=4",
    "data.num_workers=1",
]


def run_bench(run_dir: Path, *overrides: str) -> tuple[str, dict]:
    """Run what the ``wsiseg-bench`` console script runs, in this process; returns its stdout and its bench.json."""
    status, stdout, stderr = run_command([*overrides, f"hydra.run.dir={run_dir}"], command="wsiseg-bench")
    assert status == 0, stderr[-3000:]
    return stdout, json.loads((run_dir / "bench.json").read_text())


def conv_gflop(patch: int) -> float:
    """2 FLOP per multiply-add of every (transposed) convolution of the demo network on one tile, from hooks."""
    import torch

    from wsiseg.model import Unet

    net, total = Unet(3, 1, base_width=8).eval(), [0]

    def count(module: torch.nn.Module, _: tuple, out: torch.Tensor) -> None:
        if isinstance(module, torch.nn.ConvTranspose2d):  # stride == kernel: one tap of every input channel
            per_output = module.in_channels
        else:
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total[0] += 2 * per_output * out.numel()

    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            m.register_forward_hook(count)
    with torch.no_grad():
        net(torch.zeros(1, 3, patch, patch))
    return total[0] / 1e9


def test_bench_writes_all_cases_and_ratios(tmp_path: Path) -> None:
    stdout, report = run_bench(tmp_path, *SMALL_SLIDE_BENCH, "bench.max_tiles=24", "bench.naive_tiles=8")
    assert "speedup optimised/naive" in stdout
    cases = report["cases"]
    assert set(cases) == {"naive", "optimised", "read_bound", "model_bound", "host_bound"}
    host = cases.pop("host_bound")
    tiles = report["settings"]["tiles"]
    # the host-bound case: the same tiles through the real reader and writer with a zero-cost network
    assert host["patches"] == tiles and host["slides"] == 1 and host["patches_per_s"] > 0
    assert host["reader_in"] == "workers" and all(
        host["host_cpu_us_per_tile"][k] > 0 for k in ("main", "stitch", "reader")
    )
    assert len(host["finalise_s"]) == 1 and host["finalise_s"][0] > 0
    assert 0 <= host["blocked_s"] < host["seconds"] and host["blocked_fraction"] < 1
    host_report = json.loads((tmp_path / "host_bound" / "bench_slide" / "report.json").read_text())
    assert host_report["status"] == "complete" and host_report["tiles_processed"] == tiles
    assert "host_bound" in stdout
    assert 0 < tiles <= 24
    assert cases["optimised"]["patches"] == cases["read_bound"]["patches"] == tiles
    assert cases["naive"]["patches"] == min(8, tiles)
    for case in cases.values():
        assert case["seconds"] > 0 and case["patches_per_s"] > 0 and case["peak_rss_mb"] > 100
        assert case["patches_per_s"] == pytest.approx(case["patches"] / case["seconds"], rel=1e-2)
    summary = report["summary"]
    assert summary["speedup_optimised_vs_naive"] == pytest.approx(
        cases["optimised"]["patches_per_s"] / cases["naive"]["patches_per_s"], rel=1e-2
    )
    bound = min(cases["read_bound"]["patches_per_s"], cases["model_bound"]["patches_per_s"])
    assert summary["pipeline_efficiency"] == pytest.approx(cases["optimised"]["patches_per_s"] / bound, rel=1e-2)
    read, model = cases["read_bound"]["patches_per_s"], cases["model_bound"]["patches_per_s"]
    serial = read * model / (read + model)
    assert summary["serial_bound_patches_per_s"] == pytest.approx(serial, rel=1e-2)
    optimised = cases["optimised"]["patches_per_s"]
    assert summary["efficiency_vs_serial_bound"] == pytest.approx(optimised / serial, rel=1e-2)
    halves = summary["naive_patches_per_s_before_after_optimised"]
    assert len(halves) == 2 and min(halves) > 0
    assert min(halves) * 0.99 <= cases["naive"]["patches_per_s"] <= max(halves) * 1.01  # the two halves combined
    assert 0.9 <= summary["dice_vs_fp32"] <= 1.0
    assert 0 <= summary["max_abs_prob_diff"] < 0.2
    assert report["settings"]["precision"] == cpu_precision()  # bf16-mixed where oneDNN runs bfloat16, else 32
    # hardware figures: FLOP per tile against an independent count of the demo net's convolutions, and the ratios
    patch = report["settings"]["patch_size"]
    assert summary["network_gflop_per_patch"] == pytest.approx(conv_gflop(patch), rel=1e-3)
    assert summary["matmul_peak_tflops"] > 0 and summary["matmul_peak_fp32_tflops"] > 0
    assert summary["model_bound_tflops"] == pytest.approx(model * conv_gflop(patch) / 1e3, rel=1e-2)
    assert summary["model_bound_fraction_of_peak"] == pytest.approx(
        summary["model_bound_tflops"] / summary["matmul_peak_tflops"], rel=2e-2
    )
    # the optimised case ran the real writer
    assert (tmp_path / "predict" / "bench_slide" / "mask.tif").exists()
    # the peer: MONAI's WSI pipeline on the naive tiles with the same FP32 weights, when MONAI is installed
    monai = report["peers"]["monai"]
    if importlib.util.find_spec("monai") is None:
        assert "MONAI is not installed" in monai["skipped"] and "monai skipped" in stdout
    else:
        assert monai["tiles"] == cases["naive"]["patches"] and monai["patches_per_s"] > 0
        assert monai["mean_abs_grey_diff_vs_naive"] < 0.05  # same FP32 network, same tiles: equal within rounding
        assert monai["speedup_optimised_vs_peer"] == pytest.approx(
            cases["optimised"]["patches_per_s"] / monai["patches_per_s"], rel=2e-2
        )
        assert "peer monai:" in stdout


def test_bench_peer_is_skipped_with_a_line_without_monai(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With MONAI unimportable (its import fails in the process, as when it is not installed) the bench still runs
    and says in one line how to get the peer."""
    for name in ["monai", *(n for n in sys.modules if n.startswith("monai."))]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of it or of a submodule already loaded fails
    stdout, report = run_bench(tmp_path, *SMALL_SLIDE_BENCH, "bench.max_tiles=4", "bench.naive_tiles=2")
    assert report["peers"]["monai"] == {
        "skipped": "MONAI is not installed: pip install 'wsiseg[peers]' to time MONAI's WSI pipeline beside wsiseg"
    }
    assert "wsiseg-bench: monai skipped: MONAI is not installed" in stdout


def test_bench_patch_mode_naive_vs_batched(tmp_path: Path) -> None:
    import numpy as np
    import openslide
    from PIL import Image

    from tests.conftest import shared_slide

    folder = tmp_path / "patches"
    folder.mkdir()
    with openslide.OpenSlide(str(shared_slide("CMU-1-Small-Region.svs"))) as slide:
        for i in range(12):
            region = slide.read_region((150 * i, 200 * i), 0, (256, 256)).convert("RGB")
            Image.fromarray(np.asarray(region)).save(folder / f"p{i:02d}.png")
    _, report = run_bench(
        tmp_path / "run",
        "data=patches",
        f"data.input_dir={folder}",
        "data.patch_size=256",
        "data.batch_size=4",
        "data.num_workers=1",
        "writer=patches",
        "writer.write_workers=1",
        "trainer=cpu",
        "trainer.enable_progress_bar=false",
    )
    assert report["mode"] == "patches"
    assert {c["patches"] for c in report["cases"].values()} == {12}
    ratio = report["cases"]["optimised"]["images_per_s"] / report["cases"]["naive"]["images_per_s"]
    assert report["summary"]["speedup_optimised_vs_naive"] == pytest.approx(ratio, rel=1e-2)
    assert len(list((tmp_path / "run" / "naive").glob("*_heatmap.png"))) == 12
    assert len(list((tmp_path / "run" / "predict").glob("*_heatmap.png"))) == 12


def test_bench_gpu_jpeg_reader_is_used_and_timed(tmp_path: Path) -> None:
    """data.reader=gpu_jpeg on this CPU machine: the read bound includes decoding (on the CPU device here)."""
    _, report = run_bench(
        tmp_path, *SMALL_SLIDE_BENCH, "data.reader=gpu_jpeg", "bench.max_tiles=16", "bench.naive_tiles=4"
    )
    assert report["settings"]["reader"] == "gpu_jpeg"
    assert report["settings"]["reader_used"] == "JpegTileDataset"
    assert report["cases"]["read_bound"]["patches"] == report["settings"]["tiles"] > 0
