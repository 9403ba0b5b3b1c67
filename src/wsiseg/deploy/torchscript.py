"""``export.format=torchscript``: the network traced and frozen (weights become constants, BatchNorm folded) into a
``.pt`` file that ``torch.jit.load`` reads, verified on the CPU. No INT8 quantiser; ``export.opset`` does not apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsiseg.deploy.exporter import Exporter
from wsiseg.deploy.verify import VerificationError, VerifyResult, compare_outputs
from wsiseg.errors import UserInputError
from wsiseg.model import network_stride
from wsiseg.runtimes.onnx_graph import example_input, prepared_copy, quiet

__all__ = ["TorchScriptExporter", "export_torchscript", "verify_torchscript"]


def export_torchscript(
    net: nn.Module, path: str | Path, *, fp16: bool = False, example_size: Sequence[int] = (64, 64)
) -> Path:
    """Trace ``net`` on a CPU example, freeze it (weights become constants, BatchNorm folded) and save it.

    The traced graph has no size-dependent branches (the U-Nets' pooling/concat paths are shape-generic), so it runs
    any batch size and any height/width that are multiples of the stride; verification checks two of each.

    Args:
        net: the network (a float32 CPU copy is traced).
        path: output ``.pt`` file (``torch.jit.load`` reads it; move it to a GPU with ``.to('cuda')``).
        fp16: float16 weights and arithmetic inside; input and output stay float32.
        example_size: (H, W) of the tracing example, px.

    Raises:
        UserInputError: tracing, freezing or saving failed (its first line).
    """
    path = Path(path)
    model = prepared_copy(net, fp16)
    example = example_input(example_size, network_stride(net))
    try:
        with quiet(), torch.no_grad():
            traced = torch.jit.trace(model, (example,), check_trace=False)
            frozen = torch.jit.freeze(traced.eval())
            torch.jit.save(frozen, str(path))
    except Exception as exc:
        raise UserInputError(f"TorchScript export failed: {str(exc).splitlines()[0]}") from exc
    return path


def verify_torchscript(path: str | Path, reference: nn.Module, **checks: Any) -> VerifyResult:
    """Load the TorchScript file on the CPU and compare it with eager ``reference`` (``checks``: activation, mean,
    std, batches, sizes, tolerance of :func:`wsiseg.deploy.verify.compare_outputs`).

    Raises:
        VerificationError: the file cannot be loaded, the difference exceeds the tolerance or the shapes differ.
    """
    try:
        with quiet():
            scripted = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise VerificationError(f"TorchScript file '{path}' cannot be loaded: {str(exc).splitlines()[0]}") from None
    return compare_outputs(scripted, reference, label="TorchScript", runtime=f"torch {torch.__version__} cpu", **checks)


class TorchScriptExporter(Exporter):
    """``export.format=torchscript``: ``<path>`` (``.pt``), float32 or (``export.fp16``) float16 inside."""

    format = "torchscript"
    graph_name = "model.pt"  # the archive's top folder is named after it
    onnx_graph = False

    def write(
        self, net: nn.Module, path: Path, *, opset: int, fp16: bool, example_size: Sequence[int], output_name: str
    ) -> Path:
        return export_torchscript(net, path, fp16=fp16, example_size=example_size)

    def verify(self, path: Path, reference: nn.Module, **checks: Any) -> VerifyResult:
        return verify_torchscript(path, reference, **checks)
