"""What this machine offers a run: the CPU's precision, cores for readers, writers and threads.

Plain functions read by the config resolvers (:mod:`wsiseg.config`), the data module and the TIFF writer; nothing here
imports Hydra or Lightning.
"""

from __future__ import annotations

import os

__all__ = [
    "CPU_AUTO_BATCH",
    "GPU_DEFAULT_BATCH",
    "cpu_precision",
    "default_batch_size",
    "default_precision",
    "default_workers",
    "spare_cores",
    "usable_cores",
    "visible_device_type",
]


def visible_device_type() -> str:
    """``cuda`` when PyTorch sees a CUDA device, else ``cpu``: the device a run goes to when none is named."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_precision() -> str:
    """The Lightning precision CPU runs use: ``bf16-mixed`` where oneDNN runs bfloat16 (AVX-512 or Arm BF16 CPUs),
    else ``32-true`` (elsewhere bfloat16 convolutions fall back to slow reference kernels). Spelled as Lightning
    reports ``trainer.precision``, so the config, the report and the trainer agree."""
    import torch

    try:
        bf16 = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    return "bf16-mixed" if bf16 else "32-true"


def default_precision() -> str:
    """``trainer.precision`` when not given: ``16-mixed`` where a CUDA device is visible, else :func:`cpu_precision`
    (Lightning would turn 16-mixed into bf16-mixed on CPU with a warning; say what each device really runs)."""
    return "16-mixed" if visible_device_type() == "cuda" else cpu_precision()


def default_workers(device_type: str | None = None, cores: int | None = None) -> int:
    """DataLoader workers when ``data.num_workers`` is not given, for a run on ``device_type`` (``cuda``, ``cpu``;
    None: CUDA when a device is visible) on a machine of ``cores`` cores (None: this one's).

    GPU runs: every core but one, without a cap (the main process feeds the GPU; reading and decoding tiles is what
    holds a GPU run back, so every other core reads). CPU-only runs: a quarter of the cores, at most 8 (the network's
    threads use the cores).
    """
    device_type = device_type or visible_device_type()
    cores = cores or os.cpu_count() or 2
    if device_type != "cpu":
        return max(1, cores - 1)
    # On CPU the network's threads use every core: a reader process only competes with them (on 2 cores one worker was
    # slower than reading in the main process). Workers pay off from 4 cores up.
    return min(8, cores // 4)


def usable_cores(limit: int = 8) -> int:
    """This machine's cores, 1 to ``limit``: threads for work the main process spreads over every core (reading a
    batch's tiles, decoding JPEG tiles, encoding TIFF tiles)."""
    return max(1, min(limit, os.cpu_count() or 1))


def spare_cores() -> int:
    """Cores but one, 1 to 8: patch-writer threads (PNG encoding + heatmap rendering, which overlaps the network on
    any machine)."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


# On CPU small batches keep activations in cache, so throughput falls as the batch grows; batch 2 keeps most of batch
# 1's rate while amortising per-batch overhead (measurements: docs/performance.md, "Batch size on CPU").
CPU_AUTO_BATCH = 2
# data.batch_size=null on a GPU (at most one network chunk; auto probes the memory instead): enough tiles per batch
# that the GPU's kernels stay large and the per-batch host work (collation, the copy, the writer's hand-off) is shared.
GPU_DEFAULT_BATCH = 32


def default_batch_size(device_type: str | None = None) -> int:
    """``data.batch_size=null`` (the default) where the network is not known (the data module's own loader):
    :data:`CPU_AUTO_BATCH` on CPUs and :data:`GPU_DEFAULT_BATCH` elsewhere; None: the device this process would run
    on (CUDA when visible). :func:`resolve_batch_size` also caps the GPU default at one network chunk."""
    device_type = device_type or visible_device_type()
    return CPU_AUTO_BATCH if device_type == "cpu" else GPU_DEFAULT_BATCH
