"""onnxruntime as a network: a file written by ``wsiseg-export`` run by onnxruntime behind the ``nn.Module``
interface :class:`~wsiseg.module.SegmentationModule` expects (``model=onnx model.net.path=unet.onnx``; the file and its
sidecar: :mod:`wsiseg.runtimes.files`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsiseg.errors import UserInputError
from wsiseg.runtimes.base import run_on_host
from wsiseg.runtimes.files import FileNetwork

__all__ = ["OnnxRuntimeNet", "default_providers", "onnx_output_channels"]


def default_providers() -> list[str]:
    """onnxruntime providers: CUDA first when this onnxruntime build has it, CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeNet(FileNetwork):
    """An ONNX file from ``wsiseg-export`` run by onnxruntime.

    ``forward`` takes the normalised float N×3×H×W batch (any device) and returns the graph's first output as a float32
    tensor on the input's device. The onnxruntime session is created on the first call (so the module pickles and
    deep-copies without it) and uses the CUDA execution provider when onnxruntime has it (with TF32 off, so results
    match float32 PyTorch), otherwise the CPU one with as many threads as torch uses. Data crosses via host memory.

    Args:
        path: the ``.onnx`` file (``model.net.path``).
        stride: input height/width must be multiples of this, px; None: the sidecar's, else 16.
        providers: onnxruntime execution providers to use instead of the default.

    Raises:
        UserInputError: the file does not exist, or its sidecar is not one ``wsiseg-export`` wrote.
    """

    _runtime_handles = ("_session",)

    def __init__(self, path: str | Path, stride: int | None = None, providers: Sequence[str] | None = None) -> None:
        super().__init__(path, stride=stride)
        self.providers = list(providers) if providers else None
        self._session: Any = None
        self._device_id: int | None = None

    @property
    def session(self) -> Any:
        """The onnxruntime ``InferenceSession`` (created on first access, on GPU 0 if CUDA is used)."""
        if self._session is None:
            self._session = self._create_session(0)
        return self._session

    def _create_session(self, device_id: int) -> Any:
        import onnxruntime as ort

        providers: list[Any] = list(self.providers or default_providers())
        providers = [
            ("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": 0}) if p == "CUDAExecutionProvider" else p
            for p in providers
        ]
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.log_severity_level = 3
        # Idle worker threads sleep instead of spinning: the DataLoader workers and the writer share these cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:
            raise UserInputError(
                f"model.net.path '{self.path}' cannot be loaded by onnxruntime {ort.__version__}: "
                f"{str(exc).splitlines()[0]}; re-export it with wsiseg-export (e.g. export.opset=17)"
            ) from None
        self._device_id = device_id
        return session

    def output_channels(self) -> int:
        """The file's output channels (:func:`onnx_output_channels`)."""
        return onnx_output_channels(self.path, self.stride)

    @property
    def active_providers(self) -> list[str]:
        """Providers the session really uses (onnxruntime drops unavailable ones)."""
        return list(self.session.get_providers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_id = (x.device.index or 0) if x.is_cuda else 0
        if self._session is None or (x.is_cuda and self._device_id != device_id):
            self._session = self._create_session(device_id)
        inp = self._session.get_inputs()[0]
        dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        return run_on_host(lambda array: self._session.run(None, {inp.name: array})[0], x, dtype)


def onnx_output_channels(path: str | Path, stride: int) -> int:
    """Output channels of the ONNX file at ``path``: the graph's static channel axis, or (when that axis is symbolic)
    the channels of one ``stride``×``stride`` zero tile run on the CPU.

    Raises:
        UserInputError: the file is not ONNX, or its first output is not N×C×H×W.
    """
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UserInputError(
            f"model.net.path '{path}' is not an ONNX file ({type(exc).__name__}: {str(exc)[:200].splitlines()[0]}): "
            "export one with wsiseg-export"
        ) from None
    dims = proto.graph.output[0].type.tensor_type.shape.dim if proto.graph.output else []
    if len(dims) == 4 and dims[1].HasField("dim_value"):
        return int(dims[1].dim_value)
    runner = OnnxRuntimeNet(path, stride=stride, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        shape = tuple(runner(torch.zeros(1, 3, stride, stride)).shape)
    if len(shape) != 4:
        raise UserInputError(
            f"model.net.path '{path}' returns shape {shape} for a 1x3x{stride}x{stride} input, not N×C×H×W: "
            "export the network with wsiseg-export"
        )
    return int(shape[1])
