"""Which runtime runs the network (``model.runtime``): the one place the choice is made.

A file network (:mod:`wsiseg.runtimes.files`) runs in its own runtime. A torch network runs in torch or OpenVINO;
``model.runtime=auto`` (the default) is a rule from measurements recorded in docs/performance.md ("CPU runtimes"):

- on a CUDA device: torch (mixed precision, compiled);
- on a CPU that runs bfloat16 natively (AVX-512-BF16 / AMX: the trainer's precision is ``bf16-mixed``): torch, whose
  bf16 + ``torch.compile`` path is the measured fast one there;
- on a float32 CPU (AVX2, the common case): OpenVINO when it is installed and the run has at least
  ``runtime_min_tiles`` tiles — the network is exported to ONNX and compiled by OpenVINO once per process (about 2 s
  for the demo network on 2 cores), which short runs do not win back; otherwise torch.

The choice and its reason are logged. ``model.runtime=torch`` / ``openvino`` force one.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from wsiseg.errors import UserInputError
from wsiseg.runtimes.base import Runtime, TorchRuntime
from wsiseg.runtimes.files import is_file_network

__all__ = ["RUNTIMES", "Int8Options", "choose_runtime", "runtime_for"]

RUNTIMES = ("auto", "torch", "openvino", "openvino_int8")


@dataclass(frozen=True)
class Int8Options:
    """``model.int8.*``.

    Attributes:
        calibration_tiles: tissue tiles the activation ranges are measured on.
        check_tiles: other tissue tiles of the run the INT8 network is compared with FP32 on.
        seed: the sampling seed.
        dice_floor: INT8 vs FP32 Dice (masks at ``writer.threshold``) under which the run uses FP32.
        cache_dir: where quantised networks are kept between runs; None: ``<run folder>/.int8`` (a resumed run
            reuses it; point several runs at one folder to share it).
    """

    calibration_tiles: int = 64
    check_tiles: int = 32
    seed: int = 0
    dice_floor: float = 0.99
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        """Raises UserInputError naming the ``model.int8.*`` key out of range."""
        if not isinstance(self.calibration_tiles, int) or self.calibration_tiles < 1:
            raise UserInputError(f"model.int8.calibration_tiles must be >= 1, got {self.calibration_tiles}")
        if not isinstance(self.check_tiles, int) or self.check_tiles < 1:
            raise UserInputError(f"model.int8.check_tiles must be >= 1, got {self.check_tiles}")
        if isinstance(self.dice_floor, bool) or not 0.0 <= float(self.dice_floor) <= 1.0:
            raise UserInputError(f"model.int8.dice_floor must be in [0, 1], got {self.dice_floor}")


def choose_runtime(
    requested: str,
    device_type: str,
    precision: str,
    planned_tiles: int | None,
    min_tiles: int,
    openvino_installed: bool,
) -> tuple[str, str]:
    """The runtime (``torch`` or ``openvino``) a run of ``planned_tiles`` tiles uses, and why (one phrase).

    Args:
        requested: ``model.runtime``: ``auto``, ``torch`` or ``openvino``.
        device_type: the trainer's device type (``cpu``, ``cuda``).
        precision: the trainer's precision as Lightning spells it (``32-true``, ``bf16-mixed``, ...).
        planned_tiles: the run's tile count; None when unknown (patch mode).
        min_tiles: ``model.runtime_min_tiles``.
        openvino_installed: whether OpenVINO can be imported.

    Raises:
        UserInputError: ``openvino`` asked for on a non-CPU device or without OpenVINO installed, or an unknown value.
    """
    if requested not in RUNTIMES:
        raise UserInputError(f"model.runtime must be one of {', '.join(RUNTIMES)}; got '{requested}'")
    if requested in ("openvino", "openvino_int8"):
        if device_type != "cpu":
            raise UserInputError(f"model.runtime={requested} runs on the CPU; the trainer runs on {device_type}")
        if not openvino_installed:
            raise UserInputError(f"model.runtime={requested} needs OpenVINO: pip install 'openvino>=2026.4.1,<2026.5'")
        return requested, "asked for"
    if requested == "torch":
        return "torch", "asked for"
    if device_type != "cpu":
        return "torch", f"{device_type} device"
    if not precision.startswith("32"):
        return "torch", f"precision {precision} (this CPU's fast path is torch's)"
    if not openvino_installed:
        return "torch", "OpenVINO not installed"
    if planned_tiles is None or planned_tiles < min_tiles:
        tiles = "unknown" if planned_tiles is None else str(planned_tiles)
        return "torch", f"{tiles} tiles, under model.runtime_min_tiles={min_tiles}"
    return "openvino", f"float32 CPU, {planned_tiles} tiles"


def runtime_for(
    net: nn.Module,
    requested: str,
    device_type: str,
    precision: str,
    planned_tiles: int | None,
    min_tiles: int,
) -> tuple[Runtime, str]:
    """The runtime that runs ``net`` in this run, and why (one phrase): a file network's own runtime, else the one
    :func:`choose_runtime` picks for a torch network (OpenVINO's is built here and compiles on its first call).

    Raises:
        UserInputError: as :func:`choose_runtime`; ``openvino_int8``, which only the pipeline can set up (it
            calibrates on the run's tiles: :mod:`wsiseg.pipeline.int8`).
    """
    from wsiseg.runtimes.openvino import TorchOnOpenVino, openvino_available

    if is_file_network(net):
        return TorchRuntime(net, ", ".join(net.active_providers)), "the file's own runtime"
    used, why = choose_runtime(requested, device_type, precision, planned_tiles, min_tiles, openvino_available())
    if used == "openvino_int8":
        raise UserInputError(
            "model.runtime=openvino_int8 calibrates on the run's own tiles: run the module through wsiseg-predict "
            "or wsiseg.predict (wsiseg.pipeline.assemble), or use model.runtime=openvino"
        )
    if used == "openvino":
        return TorchOnOpenVino(net), why
    return TorchRuntime(net), why
