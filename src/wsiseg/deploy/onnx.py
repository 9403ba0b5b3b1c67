"""``export.format=onnx``: the network as an ONNX graph (:func:`wsiseg.runtimes.onnx_graph.export_onnx`: dynamic batch,
height and width), verified by onnxruntime; INT8 by onnxruntime's static QDQ quantiser
(:mod:`~wsiseg.deploy.int8_onnx`).

Its input ``input`` is float32 N×3×H×W, RGB, already normalised; its output is named ``probabilities`` when the
network applies its activation itself, otherwise ``logits``. :class:`wsiseg.runtimes.onnxruntime.OnnxRuntimeNet`
(``model=onnx``) and :class:`wsiseg.runtimes.openvino.OpenVinoNet` (``model=openvino``) run it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from wsiseg.deploy.exporter import Exporter
from wsiseg.deploy.int8_onnx import OnnxRuntimeQuantizer
from wsiseg.deploy.verify import VerifyResult, compare_outputs
from wsiseg.model import network_stride
from wsiseg.runtimes.onnxruntime import OnnxRuntimeNet

__all__ = ["OnnxExporter", "verify_onnx"]


def verify_onnx(
    path: str | Path, reference: nn.Module, *, providers: Sequence[str] | None = None, **checks: Any
) -> VerifyResult:
    """Run the ONNX file in onnxruntime and the eager float32 ``reference`` on the same random inputs.

    Args:
        path: the ``.onnx`` file.
        reference: the PyTorch network it was exported from (weights loaded).
        providers: onnxruntime providers (default: CUDA when available, else CPU).
        checks: activation, mean, std, batches, sizes, tolerance (:func:`wsiseg.deploy.verify.compare_outputs`).

    Raises:
        VerificationError: the difference exceeds the tolerance or the shapes differ.
    """
    runner = OnnxRuntimeNet(path, stride=network_stride(reference), providers=providers)
    used = f"onnxruntime {__import__('onnxruntime').__version__} {','.join(runner.active_providers)}"
    return compare_outputs(runner, reference, label="ONNX (onnxruntime)", runtime=used, **checks)


class OnnxExporter(Exporter):
    """``export.format=onnx``: ``<path>`` (``.onnx``), opset ``export.opset``, float32 or (``export.fp16``) float16
    inside with float32 input and output."""

    format = "onnx"
    graph_name = "fp32.onnx"
    quantizer = OnnxRuntimeQuantizer()

    def verify(self, path: Path, reference: nn.Module, **checks: Any) -> VerifyResult:
        return verify_onnx(path, reference, **checks)

    def output_name(self, graph_output: str) -> str | None:
        return graph_output

    def describe(self, opset: int | None) -> str:
        return f"onnx opset {opset}" if opset else "onnx"

    def sidecar_extras(self, path: Path) -> dict[str, Any]:
        import onnx

        return {"onnx_version": onnx.__version__}
