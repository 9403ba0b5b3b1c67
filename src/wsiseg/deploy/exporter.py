"""The interface every deployment format implements (one class per ``export.format``, registered in
:data:`wsiseg.deploy.export.EXPORTERS`), so :func:`wsiseg.deploy.export.run_export` has no format switch.

An exporter knows how to write its file from the torch network, how to verify it against eager float32 PyTorch, which
files it publishes, what it adds to the sidecar, and its INT8 quantiser if it has one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from wsiseg.deploy.calibration import Int8Quantizer
from wsiseg.deploy.verify import VerifyResult
from wsiseg.runtimes.onnx_graph import export_onnx

__all__ = ["Exporter"]


class Exporter:
    """One ``export.format``: a file written in a scratch folder, verified there, then published under ``export.path``.

    Attributes:
        format: the ``export.format`` value.
        graph_name: name of the file :meth:`write` creates in the scratch folder.
        onnx_graph: the file is, or is converted from, an ONNX graph: ``export.opset`` applies (and is recorded).
        quantizer: what ``export.quantize=int8`` runs on the float32 ONNX graph; None: INT8 is refused.
    """

    format: ClassVar[str]
    graph_name: ClassVar[str]
    onnx_graph: ClassVar[bool] = True
    quantizer: ClassVar[Int8Quantizer | None] = None

    def check_options(self, path: Path, fp16: bool) -> None:
        """Refuse options this format cannot honour (one line naming the ``export.*`` key); called by
        :class:`~wsiseg.deploy.export.ExportOptions`."""

    def write(
        self, net: nn.Module, path: Path, *, opset: int, fp16: bool, example_size: Sequence[int], output_name: str
    ) -> Path:
        """Write ``net`` to ``path`` (traced on an ``example_size`` (H, W) px example); returns ``path``. Default: the
        ONNX graph (:func:`wsiseg.runtimes.onnx_graph.export_onnx`) the ONNX-based formats start from."""
        return export_onnx(net, path, opset=opset, fp16=fp16, example_size=example_size, output_name=output_name)

    def deployable(self, graph: Path) -> Path:
        """The float file to publish, made from the written ``graph`` in its folder (default: the graph itself)."""
        return graph

    def verify(self, path: Path, reference: nn.Module, **checks: Any) -> VerifyResult:
        """Run the :meth:`deployable` file against eager float32 ``reference`` (keyword arguments of
        :func:`wsiseg.deploy.verify.compare_outputs`: activation, mean, std, batches, sizes, tolerance)."""
        raise NotImplementedError

    def publish(self, source: Path, target: Path) -> None:
        """Rename the finished file(s) at ``source`` (scratch folder) to ``target`` (same file system)."""
        os.replace(source, target)

    def files(self, path: Path) -> list[Path]:
        """Every file published for ``path``."""
        return [path]

    def output_name(self, graph_output: str) -> str | None:
        """The output name the sidecar records (None: the file does not keep the graph's name)."""
        return None

    def describe(self, opset: int | None) -> str:
        """The format as the final message names it (``onnx opset 17``)."""
        return self.format

    def sidecar_extras(self, path: Path) -> dict[str, Any]:
        """Format-specific sidecar keys (library versions, companion files), after ``verification``."""
        return {}
