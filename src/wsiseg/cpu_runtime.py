"""Which runtime runs a PyTorch network on the CPU (``model.runtime``), and the OpenVINO one for a torch network.

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

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsiseg.errors import UserInputError

__all__ = ["RUNTIMES", "Int8Options", "TorchOnOpenVino", "choose_runtime"]

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


class TorchOnOpenVino(nn.Module):
    """A PyTorch network run by OpenVINO on the CPU: same inputs and outputs (normalised float N×3×H×W in, the
    network's raw float32 output out), any batch and tile size that is a multiple of the stride.

    The torch network is kept (so the module pickles and moves as before); on the first call it is exported to ONNX in
    a temporary folder (:func:`wsiseg.onnx_graph.export_onnx`: dynamic batch and tile size), compiled by OpenVINO in
    float32 (:func:`wsiseg.openvino_net.compile_for_cpu`) and the file deleted. Compiled models do not pickle: a copy
    compiles again on its first call.

    Args:
        net: the torch network (weights loaded).
        threads: OpenVINO inference threads; None: torch's thread count.
        ir: an OpenVINO IR file (``.xml``) of ``net`` to compile instead of exporting it (the INT8 model
            :mod:`wsiseg.int8_runtime` made of it).
    """

    def __init__(self, net: nn.Module, threads: int | None = None, ir: Path | None = None) -> None:
        super().__init__()
        self.net, self.threads, self.ir = net, threads, ir
        self._compiled: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_compiled": None}

    @property
    def compiled(self) -> Any:
        """The OpenVINO ``CompiledModel`` (exported and compiled on first access)."""
        if self._compiled is None and self.ir is not None:
            from wsiseg.openvino_net import compile_for_cpu

            self._compiled = compile_for_cpu(self.ir, threads=self.threads)
        if self._compiled is None:
            from wsiseg.model import network_stride
            from wsiseg.onnx_graph import export_onnx
            from wsiseg.openvino_net import compile_for_cpu

            side = 4 * network_stride(self.net)
            # exported outside inference mode (the first call comes from inside trainer.predict's)
            with torch.inference_mode(False), tempfile.TemporaryDirectory(prefix="wsiseg-openvino-") as tmp:
                path = export_onnx(self.net, Path(tmp) / "net.onnx", opset=17, example_size=(side, side))
                self._compiled = compile_for_cpu(path, threads=self.threads)  # reads the file: nothing shared
        return self._compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from wsiseg.openvino_net import run_compiled

        return run_compiled(self.compiled, x)
