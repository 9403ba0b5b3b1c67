"""Networks held in a file that ``wsiseg-export`` wrote (ONNX, OpenVINO IR): what every file runtime shares.

A file network holds its own weights (no checkpoint is read for it) and its sidecar ``<file>.json`` says how the input
is made and the output read: :func:`onnx_settings` resolves the module's mean, std and activation against it, so a
config that contradicts the export is refused. :class:`FileNetwork` is the base of the runtimes that run such a file
(:class:`~wsiseg.runtimes.onnxruntime.OnnxRuntimeNet`, :class:`~wsiseg.runtimes.openvino.OpenVinoNet`);
:func:`is_file_network` is the one question the rest of wsiseg asks about a network's weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsiseg.errors import UserInputError

__all__ = [
    "FileNetwork",
    "OnnxSettings",
    "OnnxSidecar",
    "is_file_network",
    "onnx_settings",
    "read_sidecar",
    "sidecar_path",
]

log = logging.getLogger(__name__)


def sidecar_path(path: str | Path) -> Path:
    """``unet.onnx`` → ``unet.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def is_file_network(net: nn.Module | type[nn.Module]) -> bool:
    """Whether ``net`` (an instance or a class) is a network held in an exported file (:class:`FileNetwork`): its
    weights and head settings are the file's, and no checkpoint is read for it."""
    return isinstance(net, FileNetwork) or (isinstance(net, type) and issubclass(net, FileNetwork))


class FileNetwork(nn.Module):
    """An exported file (``model.net.path``) behind the ``nn.Module`` interface: the path checked, the sidecar read
    once (:attr:`sidecar`, None without one), the stride, and runtime handles that are not pickled (a copy makes its
    own on first use). Subclasses run the file (:meth:`forward`: normalised float N×3×H×W in, the graph's first output
    as float32 on the input's device out) and say which runtime runs it (:attr:`active_providers`).

    Args:
        path: the exported file.
        stride: input height/width must be multiples of this, px; None: the sidecar's, else 16.

    Raises:
        UserInputError: the file does not exist, or its sidecar is not one ``wsiseg-export`` wrote.
    """

    _runtime_handles: tuple[str, ...] = ()  # attributes holding runtime objects, which do not pickle

    def __init__(self, path: str | Path, stride: int | None = None) -> None:
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

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, **dict.fromkeys(self._runtime_handles)}

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, stride={self.stride}"

    @property
    def active_providers(self) -> list[str]:
        """The runtime(s) really running the file, as the report names them."""
        raise NotImplementedError

    def output_channels(self) -> int:
        """The file's output channels."""
        raise NotImplementedError


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
    net: FileNetwork,
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
