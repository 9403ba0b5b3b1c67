"""The timed cases of ``wsiseg-bench`` and their timer: the naive loop (the replaced script) and the FP32 reference it
runs, the model bound's loop, the mixed-precision module's agreement with that reference, and :func:`timed`, which runs
one case and records its throughput and peak memory (:class:`CaseResult`)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import psutil
import torch
from hydra.utils import instantiate

from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.data.slide import read_rgb
from wsiseg.errors import UserInputError
from wsiseg.head import apply_activation, dice
from wsiseg.model import has_fixed_weights
from wsiseg.module import SegmentationModule
from wsiseg.runtimes.files import is_file_network

__all__ = [
    "CaseResult",
    "PeakMemory",
    "model_only",
    "naive_loop",
    "naive_reference",
    "precision_agreement",
    "sync_device",
    "timed",
]

log = logging.getLogger(__name__)


@dataclass
class CaseResult:
    """Throughput of one case over ``patches`` tiles."""

    name: str
    patches: int
    seconds: float
    peak_gpu_mb: float | None
    peak_rss_mb: float

    @property
    def patches_per_s(self) -> float:
        return self.patches / self.seconds if self.seconds > 0 else float("nan")

    @property
    def ms_per_patch(self) -> float:
        return 1e3 * self.seconds / self.patches if self.patches else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "patches_per_s": round(self.patches_per_s, 2),
            "ms_per_patch": round(self.ms_per_patch, 3),
        }


class PeakMemory:
    """Samples the RSS of this process plus its children (DataLoader workers) every 20 ms, and the CUDA peak."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_rss = device, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
            self.peak_rss = max(self.peak_rss, total)
            self._stop.wait(0.02)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_gpu_mb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**20


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(name: str, device: torch.device, patches: int, fn: Any) -> CaseResult:
    with PeakMemory(device) as memory:
        sync_device(device)
        start = time.perf_counter()
        fn()
        sync_device(device)
        seconds = time.perf_counter() - start
    result = CaseResult(name, patches, seconds, memory.peak_gpu_mb, memory.peak_rss / 2**20)
    log.info(
        "%-12s %6d patches  %8.2f patches/s  %8.2f ms/patch", name, patches, result.patches_per_s, result.ms_per_patch
    )
    return result


def naive_loop(
    datamodule: SlideTileDataModule,
    net: torch.nn.Module,
    device: torch.device,
    mean: torch.Tensor,
    std: torch.Tensor,
    limit: int,
    skip: int = 0,
) -> Iterator[np.ndarray]:
    """The replaced script: one OpenSlide read, CPU preprocessing, FP32 batch 1, result to the host, per tile, for
    ``limit`` tiles after the first ``skip`` (in the datamodule's order)."""
    mean_np = mean.view(1, 1, -1).cpu().numpy()
    std_np = std.view(1, 1, -1).cpu().numpy()
    start, end = skip, skip + max(0, limit)
    for slide in datamodule.slides:
        count = len(slide.origins)
        if end <= 0:
            return
        if start < count:
            handle = openslide.OpenSlide(str(slide.path))
            size = slide.grid.patch_size
            for x, y in slide.origins[max(0, start) : end]:
                rgb = read_rgb(handle, int(x), int(y), slide.level, size, size)
                normalised = (rgb.astype(np.float32) / 255.0 - mean_np) / std_np
                tensor = torch.from_numpy(normalised.transpose(2, 0, 1).copy())[None].to(device)
                with torch.no_grad():
                    yield net(tensor).max(dim=1).values.cpu().numpy()
            handle.close()
        start, end = start - count, end - count


def naive_reference(module: SegmentationModule) -> torch.nn.Module:
    """The FP32 eager PyTorch network the naive loop and the agreement figures run: a copy of the module's own torch
    network (a second instantiate would draw other weights for ``checkpoint=random``), or, for an ONNX file
    (``model=onnx`` / ``model=openvino``), the torch network its sidecar records (architecture and checkpoint, checked
    by SHA-256), so the naive loop is the replaced script and not the runtime under test.

    Raises:
        UserInputError: the ONNX file's sidecar does not name a checkpoint that is still there unchanged.
    """
    if not is_file_network(module.net):
        return copy.deepcopy(module.net).eval()
    from wsiseg.model import load_checkpoint
    from wsiseg.provenance import sha256_file
    from wsiseg.runtimes.files import sidecar_path

    sidecar = sidecar_path(Path(str(module.net.path)).expanduser().absolute())
    try:
        data = json.loads(sidecar.read_text())
        architecture, checkpoint = data["architecture"], data["checkpoint"]
    except (OSError, ValueError, KeyError) as exc:
        raise UserInputError(
            f"wsiseg-bench with an ONNX network needs its wsiseg-export sidecar '{sidecar}' for the naive loop's torch "
            f"network ({type(exc).__name__}: {exc}); re-export it with wsiseg-export"
        ) from None
    net = instantiate(architecture)
    if is_file_network(net) or has_fixed_weights(net):
        return net.eval()
    path = Path(str((checkpoint or {}).get("path", "")))
    if not checkpoint or not path.is_file() or sha256_file(path) != checkpoint.get("sha256"):
        raise UserInputError(
            f"wsiseg-bench with an ONNX network runs the naive loop on the checkpoint it was exported from, which "
            f"'{sidecar}' names as '{path}': that file is missing or changed; bench the checkpoint instead "
            "(model=unet_camelyon model.checkpoint=...)"
        )
    return load_checkpoint(net, path).eval()


def model_only(module: SegmentationModule, trainer: Any, batch: torch.Tensor, batches: int) -> None:
    with torch.inference_mode(), trainer.precision_plugin.forward_context():
        for _ in range(batches):
            module(batch)


def precision_agreement(
    module: SegmentationModule, trainer: Any, reference: torch.nn.Module, tiles: torch.Tensor
) -> dict[str, float]:
    """Mixed-precision module vs FP32 eager reference on the same tiles: Dice of masks at 0.5, max |Δp|."""
    module.to(tiles.device)  # trainer.predict's teardown moves the module back to the CPU
    with torch.inference_mode():
        with trainer.precision_plugin.forward_context():
            mixed = module(tiles).float()
        x = module.normalise(tiles)
        fp32 = apply_activation(reference(x).float(), module.activation)
        fp32 = fp32.amax(dim=1, keepdim=True) if module.reduction == "max" else fp32[:, module.channel_index :][:, :1]
        if module.output_downsample > 1:
            fp32 = torch.nn.functional.avg_pool2d(fp32, module.output_downsample)
    diff = (mixed - fp32).abs()
    return {
        "dice_vs_fp32": round(dice(mixed >= 0.5, fp32 >= 0.5), 6),
        "max_abs_prob_diff": float(diff.max()),
        "mean_abs_prob_diff": float(diff.mean()),
    }
