"""``export.format=openvino``: an OpenVINO IR pair (``<name>.xml`` + ``<name>.bin``, float32 weights) converted from
the ONNX graph, verified as OpenVINO's CPU plugin runs it; INT8 by NNCF (:mod:`~wsiseg.deploy.int8_openvino`).
:class:`wsiseg.runtimes.openvino.OpenVinoNet` (``model=openvino``) runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from wsiseg.deploy.exporter import Exporter
from wsiseg.deploy.int8_openvino import NncfQuantizer
from wsiseg.deploy.verify import VerifyResult, compare_outputs
from wsiseg.errors import UserInputError
from wsiseg.model import network_stride
from wsiseg.runtimes.openvino import ir_weights_path, move_ir

__all__ = ["OpenVinoExporter", "verify_openvino"]


def verify_openvino(path: str | Path, reference: nn.Module, **checks: Any) -> VerifyResult:
    """Compile the IR ``.xml`` (or ONNX) file for OpenVINO's CPU plugin (float32) and compare it with eager
    ``reference`` (``checks``: activation, mean, std, batches, sizes, tolerance of
    :func:`wsiseg.deploy.verify.compare_outputs`).

    Raises:
        VerificationError: the difference exceeds the tolerance or the shapes differ.
    """
    from wsiseg.runtimes.openvino import OpenVinoNet

    runner = OpenVinoNet(path, stride=network_stride(reference))
    used = f"OpenVINO {__import__('openvino').__version__} CPU"
    return compare_outputs(runner, reference, label="OpenVINO", runtime=used, **checks)


class OpenVinoExporter(Exporter):
    """``export.format=openvino``: ``<path>`` (must end in ``.xml``) and its weights ``<path stem>.bin``; float32 only
    (``export.fp16`` is refused)."""

    format = "openvino"
    graph_name = "fp32.onnx"
    quantizer = NncfQuantizer()

    def check_options(self, path: Path, fp16: bool) -> None:
        if path.suffix != ".xml":
            raise UserInputError(
                f"export.format=openvino writes an OpenVINO IR pair (.xml + .bin): export.path must end in .xml, "
                f"got '{path}'"
            )
        if fp16:
            raise UserInputError("export.fp16=true is for onnx and torchscript; OpenVINO IR keeps float32 weights")

    def deployable(self, graph: Path) -> Path:
        """The ONNX ``graph`` as OpenVINO IR (``fp32.xml`` + ``fp32.bin`` next to it)."""
        from wsiseg.runtimes.openvino import openvino_core, save_ir

        ir = graph.with_name("fp32.xml")
        save_ir(openvino_core().read_model(str(graph)), ir)
        return ir

    def verify(self, path: Path, reference: nn.Module, **checks: Any) -> VerifyResult:
        return verify_openvino(path, reference, **checks)

    def publish(self, source: Path, target: Path) -> None:
        move_ir(source, target)

    def files(self, path: Path) -> list[Path]:
        return [path, ir_weights_path(path)]

    def sidecar_extras(self, path: Path) -> dict[str, Any]:
        import onnx
        import openvino

        return {
            "onnx_version": onnx.__version__,
            "weights_file": ir_weights_path(path).name,
            "openvino_version": openvino.__version__,
        }
