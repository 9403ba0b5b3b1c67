"""Verification every exporter shares: the written file and the eager float32 PyTorch network run on the same random
normalised images (two batch sizes × two spatial sizes by default), compared as probabilities.

Each format module (:mod:`~wsiseg.deploy.onnx`, :mod:`~wsiseg.deploy.torchscript`, :mod:`~wsiseg.deploy.openvino`)
loads its file into something callable on a normalised batch and hands it to :func:`compare_outputs`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from wsiseg.errors import UserInputError
from wsiseg.head import apply_activation, normalise
from wsiseg.model import network_stride
from wsiseg.runtimes.onnx_graph import check_size

__all__ = [
    "FP16_TOLERANCE",
    "FP32_TOLERANCE",
    "VerificationError",
    "VerifyResult",
    "compare_outputs",
    "random_inputs",
]

FP32_TOLERANCE = 1e-4  # max abs diff of probabilities (0-1) between the exported file and eager float32 PyTorch
# The same for export.fp16=true. float16 keeps ~3 significant digits through ~20 conv layers; the demo network on
# random-pixel inputs measures 1.3-1.7e-2, so 5e-2 (~13 grey levels of the 0-255 mask) leaves room for other weights.
FP16_TOLERANCE = 5e-2


class VerificationError(UserInputError):
    """The exported file's outputs differ from the PyTorch model's by more than the tolerance."""


@dataclass
class VerifyResult:
    """Outcome of a parity check: the largest abs difference over all cases, and each case's (N, H, W, diff)."""

    max_abs_diff: float
    tolerance: float
    cases: list[tuple[int, int, int, float]] = field(default_factory=list)
    runtime: str = ""

    def summary(self) -> str:
        shapes = ", ".join(f"{n}x3x{h}x{w}: {d:.2e}" for n, h, w, d in self.cases)
        return f"max abs diff {self.max_abs_diff:.2e} (tolerance {self.tolerance:.0e}) [{shapes}]"


def random_inputs(
    batches: Sequence[int], sizes: Sequence[Sequence[int]], mean: Sequence[float], std: Sequence[float], seed: int = 0
) -> Iterator[torch.Tensor]:
    """Normalised float32 batches from uniformly random uint8 RGB pixels, one per (batch size, size) pair."""
    gen = torch.Generator().manual_seed(seed)
    for n in batches:
        for h, w in sizes:
            pixels = torch.randint(0, 256, (int(n), 3, int(h), int(w)), generator=gen, dtype=torch.uint8)
            yield normalise(pixels, mean, std)


def compare_outputs(
    run: Callable[[torch.Tensor], torch.Tensor],
    reference: nn.Module,
    *,
    label: str,
    runtime: str,
    activation: str = "none",
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    batches: Sequence[int] = (1, 3),
    sizes: Sequence[Sequence[int]] = ((64, 64), (96, 128)),
    tolerance: float = FP32_TOLERANCE,
) -> VerifyResult:
    """Run ``run`` (the loaded file) and a float32 CPU copy of ``reference`` on :func:`random_inputs` and compare.
    The format modules' ``verify_*`` functions pass their keyword arguments (the checks) on to this one.

    Args:
        run: the exported file, loaded: a normalised float32 N×3×H×W batch in, the network's output out.
        reference: the PyTorch network it was exported from (weights loaded).
        label: the file's kind in messages (``TorchScript``, ``ONNX (onnxruntime)``, ``OpenVINO``).
        runtime: what ran the file, recorded in the result (and the sidecar).
        activation: applied to both outputs before comparing, so the difference is on probabilities.
        mean, std: normalisation of the random uint8 images, /255 scale.
        batches: batch sizes to try.
        sizes: (H, W) pairs to try, px, multiples of the stride.
        tolerance: largest allowed absolute difference.

    Raises:
        VerificationError: the difference exceeds ``tolerance`` (or is NaN), or the shapes differ.
    """
    stride = network_stride(reference)
    sizes = [check_size(s, stride) for s in sizes]
    ref_net = copy.deepcopy(reference).cpu().float().eval()
    result = VerifyResult(0.0, float(tolerance), runtime=runtime)
    with torch.no_grad():
        for x in random_inputs(batches, sizes, mean, std):
            expected = apply_activation(ref_net(x).float(), activation)
            got = apply_activation(run(x).float(), activation)
            if got.shape != expected.shape:
                raise VerificationError(
                    f"{label} returns shape {tuple(got.shape)} for input {tuple(x.shape)}, PyTorch "
                    f"{tuple(expected.shape)}: the file was exported from a different network"
                )
            diff = float((got - expected).abs().max())
            n, _, h, w = x.shape
            result.cases.append((n, h, w, diff))
            result.max_abs_diff = max(result.max_abs_diff, diff)
    if not result.max_abs_diff <= tolerance:  # also catches NaN
        worst = max(result.cases, key=lambda c: c[3] if c[3] == c[3] else float("inf"))
        raise VerificationError(
            f"{label} verification failed: max abs diff {result.max_abs_diff:.3g} of probabilities exceeds "
            f"export.tolerance={tolerance:g} (worst at input {worst[0]}x3x{worst[1]}x{worst[2]}); check the model "
            "config matches the checkpoint, or raise export.tolerance"
        )
    return result
