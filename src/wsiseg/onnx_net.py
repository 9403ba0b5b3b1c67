"""The ONNX runtime as a network: a file written by ``wsiseg-export`` run by onnxruntime behind the ``nn.Module``
interface :class:`~wsiseg.module.SegmentationModule` expects (``model=onnx model.net.path=unet.onnx``).

The file holds the weights (no checkpoint is read); its sidecar ``<file>.json`` holds how the input is made and the
output read, and :func:`onnx_settings` resolves the module's mean, std and activation against it, so a config that
contradicts the export is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsiseg.errors import UserInputError

__all__ = [
    "OnnxRuntimeNet",
    "OnnxSettings",
    "OnnxSidecar",
    "default_providers",
    "onnx_output_channels",
    "onnx_settings",
    "read_sidecar",
    "sidecar_path",
]

log = logging.getLogger(__name__)


def sidecar_path(path: str | Path) -> Path:
    """``unet.onnx`` → ``unet.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def default_providers() -> list[str]:
    """onnxruntime providers: CUDA first when this onnxruntime build has it, CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeNet(nn.Module):
    """An ONNX file from ``wsiseg-export`` behind the ``nn.Module`` interface ``SegmentationModule`` expects.

    ``forward`` takes the normalised float N×3×H×W batch (any device) and returns the graph's first output as a float32
    tensor on the input's device. The onnxruntime session is created on the first call (so the module pickles and
    deep-copies without it) and uses the CUDA execution provider when onnxruntime has it (with TF32 off, so results
    match float32 PyTorch), otherwise the CPU one with as many threads as torch uses. Data crosses via host memory.

    The file holds its own weights (:attr:`holds_weights`: the module reads no checkpoint for it) and its sidecar,
    read once here (:attr:`sidecar`, None without one), supplies the stride unless one is given.

    Args:
        path: the ``.onnx`` file (``model.net.path``).
        stride: input height/width must be multiples of this, px; None: the sidecar's, else 16.
        providers: onnxruntime execution providers to use instead of the default.

    Raises:
        UserInputError: the file does not exist, or its sidecar is not one ``wsiseg-export`` wrote.
    """

    holds_weights = True

    def __init__(self, path: str | Path, stride: int | None = None, providers: Sequence[str] | None = None) -> None:
        super().__init__()
        self.path = Path(str(path)).expanduser().absolute()
        if not self.path.is_file():
            raise UserInputError(
                f"model.net.path '{self.path}' does not exist: export one with "
                f"wsiseg-export export.format={'openvino' if self.path.suffix == '.xml' else 'onnx'} "
                f"export.path={self.path}"
            )
        self.sidecar = read_sidecar(self.path)
        self.stride = int(stride or (self.sidecar.stride if self.sidecar else 16))
        self.providers = list(providers) if providers else None
        self._session: Any = None
        self._device_id: int | None = None

    _runtime_handles: tuple[str, ...] = ("_session",)  # do not pickle; a copy makes its own on first use

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, **dict.fromkeys(self._runtime_handles)}

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, stride={self.stride}"

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
        array = x.detach().to("cpu", torch.float32).contiguous().numpy().astype(dtype, copy=False)
        (out, *_) = self._session.run(None, {inp.name: array})
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(x.device)


# -- the sidecar ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OnnxSidecar:
    """What ``wsiseg-export`` recorded in ``<file>.onnx.json`` that decides how the file's input is made and its
    output read.

    Attributes:
        path: the sidecar file.
        mean: per-channel mean the graph's input was normalised with, /255 scale.
        std: per-channel std, /255 scale.
        activation: activation still to apply to the graph's output (``none`` when the graph applies it).
        channels: output channels.
        stride: input height and width must be multiples of this, px.
    """

    path: Path
    mean: list[float]
    std: list[float]
    activation: str
    channels: int
    stride: int


def read_sidecar(onnx_path: str | Path) -> OnnxSidecar | None:
    """The sidecar of ``onnx_path`` (:func:`sidecar_path`), or None when there is none.

    Raises:
        UserInputError: the sidecar exists but is not JSON or lacks ``normalisation.mean/std``,
            ``activation_to_apply``, ``output.channels`` or ``input.height_width_multiple_of``.
    """
    path = sidecar_path(Path(str(onnx_path)).expanduser().absolute())
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return OnnxSidecar(
            path=path,
            mean=[float(v) for v in data["normalisation"]["mean"]],
            std=[float(v) for v in data["normalisation"]["std"]],
            activation=str(data["activation_to_apply"]),
            channels=int(data["output"]["channels"]),
            stride=int(data["input"]["height_width_multiple_of"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserInputError(
            f"'{path}' is not a wsiseg-export sidecar ({type(exc).__name__}: {exc}): re-export the model with "
            "wsiseg-export or delete the file"
        ) from None


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


def _check_stride_runs(net: Any, sidecar: OnnxSidecar) -> None:
    """The file runs on one tile of the side its sidecar says inputs must be a multiple of: a hand-edited stride
    would otherwise let a patch size through that fails mid-run inside the runtime.

    Raises:
        UserInputError: naming the file, the sidecar and the stride.
    """
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, sidecar.stride, sidecar.stride))
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(
            f"model.net.path '{net.path}' does not run on a {sidecar.stride}x{sidecar.stride} tile although "
            f"{sidecar.path} says inputs are multiples of {sidecar.stride} ({type(exc).__name__}): the sidecar was "
            "edited or belongs to another export; re-export with wsiseg-export"
        ) from None


@dataclass
class OnnxSettings:
    """The module settings :func:`onnx_settings` resolved for an ONNX network."""

    mean: list[float]
    std: list[float]
    activation: str
    channels: int
    sidecar: OnnxSidecar | None


def _agreed(option: str, given: Any, recorded: Any, sidecar: OnnxSidecar) -> Any:
    """``recorded`` when ``given`` is None or equal to it; otherwise the one-line refusal."""
    if given is None:
        return recorded
    same = (
        given == recorded
        if isinstance(recorded, str)
        else len(given) == len(recorded) and all(abs(float(a) - b) <= 1e-6 for a, b in zip(given, recorded))
    )
    if not same:
        shown = given if isinstance(given, str) else [float(v) for v in given]
        raise UserInputError(
            f"{option}={shown} but {sidecar.path} says {recorded}: drop the override (model=onnx takes it from the "
            "sidecar) or re-export the model with that setting"
        )
    return recorded


def onnx_settings(
    net: OnnxRuntimeNet,
    *,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    activation: str | None,
    reduction: str,
    channel_index: int,
) -> OnnxSettings:
    """Resolve ``SegmentationModule``'s settings for ``net``, an ONNX file whose sidecar is the source of truth:

    - ``mean``, ``std``, ``activation``: None takes the sidecar's value; a value equal to the sidecar's is accepted;
      a different one is refused (the graph was exported for the sidecar's, so another would silently change every
      output).
    - the ONNX file's real output channel count must equal the sidecar's (a swapped or hand-edited sidecar is refused),
      and ``reduction="channel"`` needs ``0 <= channel_index < channels``.

    Without a sidecar a warning says mean/std/activation come from the arguments unchecked, and all three must then be
    given (not None).

    Args:
        net: the ONNX network (its sidecar was read when it was built).
        mean, std: normalisation, /255 scale, or None for the sidecar's.
        activation: ``none`` | ``sigmoid`` | ``softmax``, or None for the sidecar's.
        reduction: the module's channel reduction (``max`` | ``channel`` | ``none``).
        channel_index: channel kept by ``reduction="channel"``.

    Raises:
        UserInputError: one line naming the option, both values and the file, for each refusal above.
    """
    sidecar = net.sidecar
    channels = net.output_channels()
    if sidecar is not None:
        if sidecar.channels != channels:
            raise UserInputError(
                f"model.net.path '{net.path}' outputs {channels} channel(s) but {sidecar.path} says "
                f"{sidecar.channels}: the sidecar belongs to another export; re-export with wsiseg-export"
            )
        _check_stride_runs(net, sidecar)
        mean = _agreed("model.mean", mean, sidecar.mean, sidecar)
        std = _agreed("model.std", std, sidecar.std, sidecar)
        activation = _agreed("model.activation", activation, sidecar.activation, sidecar)
        log.info("model.net=onnx: mean, std, activation and stride from %s", sidecar.path)
    else:
        log.warning(
            "model.net.path '%s' has no sidecar %s: model.mean, model.std and model.activation come from the "
            "config unchecked",
            net.path,
            sidecar_path(net.path).name,
        )
        unset = [name for name, value in (("mean", mean), ("std", std), ("activation", activation)) if value is None]
        if unset:
            raise UserInputError(
                f"model.net.path '{net.path}' has no sidecar {sidecar_path(net.path).name} to take "
                f"{', '.join('model.' + n for n in unset)} from: pass them (e.g. model.mean=[0.5,0.5,0.5] "
                "model.std=[0.5,0.5,0.5] model.activation=none) or re-export with wsiseg-export"
            )
    if reduction == "channel" and not 0 <= channel_index < channels:
        where = f" ({sidecar.path})" if sidecar else ""
        raise UserInputError(
            f"model.channel_index={channel_index} but model.net.path '{net.path}' outputs {channels} channel(s)"
            f"{where}: use model.channel_index between 0 and {channels - 1}, or model.reduction=max"
        )
    assert mean is not None and std is not None and activation is not None
    return OnnxSettings([float(v) for v in mean], [float(v) for v in std], str(activation), channels, sidecar)
