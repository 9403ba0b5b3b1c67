"""Hardware figures of ``wsiseg-bench``: the network's FLOP per tile, this machine's measured matrix-multiply peaks,
and how much of them the naive loop and the model bound use."""

from __future__ import annotations

import time
from typing import Any

import torch

from wsiseg.bench.cases import sync_device

__all__ = ["compute_dtype", "hardware_figures", "matmul_peak_tflops", "network_gflop_per_patch"]


def network_gflop_per_patch(net: torch.nn.Module, patch: int, device: torch.device) -> float:
    """GFLOP of one ``patch × patch`` tile through ``net`` (FP32, counted by ``torch.utils.flop_counter``: 2 per
    multiply-add of convolutions and matrix products; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, patch, patch, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return counter.get_total_flops() / 1e9


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Measured dense matrix-multiply throughput on ``device`` in ``dtype`` (TFLOP/s): what this hardware and PyTorch's
    BLAS reach on large square products, a practical ceiling for the network's convolutions."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync_device(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 2:
        a @ b
        count += 1
        if count % 4 == 0:
            sync_device(device)
    sync_device(device)
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the network's convolutions run in under a Lightning ``precision``."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    return torch.float16 if precision.startswith("16") else torch.float32


def hardware_figures(
    reference: torch.nn.Module, patch: int, device: torch.device, precision: str, naive_rate: float, model_rate: float
) -> dict[str, Any]:
    """FLOP per tile, measured matrix-multiply peaks (the run's compute dtype and FP32) and how much of them the naive
    network and the model bound use: says whether the network is near the hardware's ceiling."""
    gflop = network_gflop_per_patch(reference, patch, device)
    dtype = compute_dtype(precision)
    peak = matmul_peak_tflops(device, dtype)
    peak_fp32 = peak if dtype == torch.float32 else matmul_peak_tflops(device, torch.float32)
    model_tflops, naive_tflops = model_rate * gflop / 1e3, naive_rate * gflop / 1e3
    return {
        "network_gflop_per_patch": _significant(gflop),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "matmul_peak_tflops": _significant(peak),
        "matmul_peak_fp32_tflops": _significant(peak_fp32),
        "flop_ceiling_patches_per_s": round(peak * 1e3 / gflop, 1) if gflop else None,
        "model_bound_tflops": _significant(model_tflops),
        "model_bound_fraction_of_peak": _significant(model_tflops / peak),
        "naive_tflops": _significant(naive_tflops),
        "naive_fraction_of_fp32_peak": _significant(naive_tflops / peak_fp32),
    }


def _significant(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant figures: small rates (a slow FP32 CPU reaches ~0.01 TFLOP/s) keep their
    precision, which a fixed number of decimals would round away."""
    return float(f"{value:.{digits}g}")
