"""Writing a network as an ONNX graph (dynamic batch and spatial axes), checked by ``onnx.checker``: the part of
``wsiseg-export`` that other parts use too (the INT8 calibration, tests). No Hydra, no command."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsiseg.errors import UserInputError
from wsiseg.model import network_stride

__all__ = [
    "INPUT_NAME",
    "LEGACY_MAX_OPSET",
    "MIN_OPSET",
    "check_opset",
    "check_size",
    "example_input",
    "export_onnx",
    "prepared_copy",
    "quiet",
]

MIN_OPSET = 11  # first opset whose Pad/Resize take run-time shapes; older ones are not worth supporting
LEGACY_MAX_OPSET = 20  # highest opset of torch's TorchScript-based exporter; above it the torch.export one is used
INPUT_NAME = "input"


class _Float32IO(nn.Module):
    """Runs a float16 copy of ``net`` on float32 input and returns float32 (``export.fp16=true``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.half()).float()


def prepared_copy(net: nn.Module, fp16: bool) -> nn.Module:
    """A CPU, eval-mode copy of ``net`` to trace (float16 inside with float32 I/O when ``fp16``)."""
    net = copy.deepcopy(net).cpu().float().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return _Float32IO(net.half()).eval() if fp16 else net


def example_input(size: Sequence[int], stride: int) -> torch.Tensor:
    """Batch-2 normalised-range example for tracing (batch 2 keeps the exporter from specialising N=1)."""
    h, w = check_size(size, stride)
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1


def check_size(size: Sequence[int], stride: int, option: str = "export.sizes") -> tuple[int, int]:
    if len(size) != 2 or any(int(s) <= 0 or int(s) % stride for s in size):
        raise UserInputError(
            f"{option} entry {list(size)} must be [height, width], both positive multiples of the network's stride "
            f"{stride}: e.g. [{4 * stride}, {4 * stride}]"
        )
    return int(size[0]), int(size[1])


def quiet() -> contextlib.AbstractContextManager[Any]:
    """Silence the exporters' deprecation chatter and progress prints (real errors still raise)."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logger = logging.getLogger(name)
        stack.callback(logger.setLevel, logger.level)
        logger.setLevel(logging.WARNING)
    return stack


def check_opset(opset: int) -> int:
    """Fail with one line unless the installed onnx (and torch) can write ``opset``."""
    import onnx

    highest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= int(opset) <= highest:
        raise UserInputError(
            f"export.opset={opset} cannot be written: the installed onnx {onnx.__version__} writes opsets "
            f"{MIN_OPSET}-{highest}; use export.opset=17 (or upgrade onnx for newer opsets)"
        )
    return int(opset)


def export_onnx(
    net: nn.Module,
    path: str | Path,
    *,
    opset: int = 17,
    fp16: bool = False,
    example_size: Sequence[int] = (64, 64),
    output_name: str = "probabilities",
) -> Path:
    """Write ``net`` as ONNX with dynamic batch/height/width and run ``onnx.checker`` on the file.

    Opsets up to 20 use torch's TorchScript-based exporter (it writes exactly the requested opset; the
    torch.export-based one cannot write the users' replicate padding below opset 18), newer ones the
    torch.export-based exporter.

    Args:
        net: the network (any device/dtype; a float32 CPU copy is exported).
        path: output ``.onnx`` file.
        opset: ONNX opset.
        fp16: float16 weights and arithmetic inside the graph; input and output stay float32.
        example_size: (H, W) of the tracing example, px; a multiple of the network's stride.
        output_name: name of the graph output.

    Raises:
        UserInputError: unsupported opset, or the exporter/checker rejected the graph.
    """
    import onnx

    opset = check_opset(opset)
    path = Path(path)
    model = prepared_copy(net, fp16)
    example = example_input(example_size, network_stride(net))
    axes = {0: "batch", 2: "height", 3: "width"}
    try:
        with quiet(), torch.no_grad():
            if opset <= LEGACY_MAX_OPSET:
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[output_name],
                    dynamic_axes={INPUT_NAME: axes, output_name: axes},
                    do_constant_folding=True,
                )
            else:
                dyn = torch.export.Dim.DYNAMIC
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamo=True,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[output_name],
                    dynamic_shapes=({0: dyn, 2: dyn, 3: dyn},),
                    external_data=False,
                    verbose=False,
                )
    except Exception as exc:
        raise UserInputError(f"torch.onnx.export failed for export.opset={opset}: {str(exc).splitlines()[0]}") from exc
    proto = onnx.load(str(path))
    written = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=-1)
    if written != opset:
        raise UserInputError(
            f"export.opset={opset}: torch {torch.__version__} wrote opset {written} instead; use export.opset={written}"
        )
    # Name the dynamic axes the same way whichever exporter ran (torch.export calls them s0, s1, ...).
    for value in (*proto.graph.input, *proto.graph.output):
        for dim, name in zip(value.type.tensor_type.shape.dim, ("batch", None, "height", "width")):
            if name and not dim.HasField("dim_value"):
                dim.dim_param = name
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise UserInputError(f"onnx.checker rejected the exported graph: {str(exc).splitlines()[0]}") from exc
    return path
