"""OpenVINO on the CPU: compiling a file or model, and the two OpenVINO runtimes.

- :class:`OpenVinoNet`: a file written by ``wsiseg-export`` (ONNX, or OpenVINO IR ``.xml`` + ``.bin`` from
  ``export.format=openvino``) as a network (``model=openvino model.net.path=u.onnx``; the same sidecar as
  :class:`~wsiseg.runtimes.onnxruntime.OnnxRuntimeNet`, :mod:`wsiseg.runtimes.files`);
- :class:`TorchOnOpenVino`: a torch network exported and compiled by OpenVINO when the run starts
  (``model.runtime=openvino``, or the INT8 IR of ``model.runtime=openvino_int8``).

OpenVINO is a dependency of wsiseg (installed with it); a missing one is one line saying how to install it.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsiseg.errors import UserInputError, first_line
from wsiseg.runtimes.base import Runtime, run_on_host
from wsiseg.runtimes.files import FileNetwork

__all__ = [
    "OpenVinoNet",
    "INFERENCE_PRECISIONS",
    "TorchOnOpenVino",
    "compile_for_cpu",
    "ir_weights_path",
    "openvino_available",
    "move_ir",
    "openvino_core",
    "static_output_channels",
    "run_compiled",
    "save_ir",
]

INFERENCE_PRECISIONS = ("f32", "bf16", "f16")


def openvino_available() -> bool:
    """Whether OpenVINO is installed here. Found without importing it: its runtime (and its own threading library) is
    loaded into the process only when a network is compiled."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


@functools.cache
def openvino_core() -> Any:
    """One ``openvino.Core`` for the process, never released, so the CPU plugin it loads stays loaded for the
    process's lifetime (compiled models of every network share it)."""
    import openvino as ov

    return ov.Core()


def compile_for_cpu(
    path: str | Path | Any, threads: int | None = None, precision: str = "f32", cache_dir: str | None = None
) -> Any:
    """Compile the ONNX (or OpenVINO IR) file ``path``, or an ``openvino.Model``, for the CPU: ``threads`` inference
    threads (None: torch's count, so DataLoader workers and the writer keep theirs), one request at a time (the
    pipeline's own batches), ``precision`` as the inference precision hint, compiled blobs cached in ``cache_dir``
    when given.

    Raises:
        UserInputError: the file does not compile (names the file).
    """
    import openvino as ov

    core = openvino_core()
    config: dict[str, Any] = {
        "INFERENCE_NUM_THREADS": int(threads or max(1, torch.get_num_threads())),
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": precision,
    }
    if cache_dir:
        Path(cache_dir).expanduser().mkdir(parents=True, exist_ok=True)
        config["CACHE_DIR"] = str(Path(cache_dir).expanduser())
    try:
        model = core.read_model(str(path)) if isinstance(path, (str, Path)) else path
        return core.compile_model(model, "CPU", config)
    except Exception as exc:
        raise UserInputError(
            f"model.net.path '{path}' cannot be compiled by OpenVINO {ov.__version__}: {first_line(exc)}; "
            "re-export it with wsiseg-export"
        ) from None


def ir_weights_path(path: str | Path) -> Path:
    """``unet.xml`` → ``unet.bin``: where OpenVINO looks for an IR file's weights."""
    return Path(path).with_suffix(".bin")


def save_ir(model: Any, path: Path) -> None:
    """Save the ``openvino.Model`` ``model`` as IR at ``path`` (``.xml``) and its weights at :func:`ir_weights_path`,
    float32 weights kept as they are (no float16 compression)."""
    import openvino as ov

    ov.save_model(model, str(path), compress_to_fp16=False)


def move_ir(source: Path, target: Path) -> None:
    """Rename the IR pair at ``source`` to ``target`` (same file system), weights first, so the ``.xml`` under the
    final name only ever appears with its whole ``.bin``."""
    import os

    os.replace(ir_weights_path(source), ir_weights_path(target))
    os.replace(source, target)


def static_output_channels(path: str | Path) -> int | None:
    """The channel axis of the first output of the ONNX or IR file ``path`` when it is static, else None.

    Raises:
        UserInputError: OpenVINO cannot read the file (names it).
    """
    try:
        shape = openvino_core().read_model(str(path)).outputs[0].get_partial_shape()
    except Exception as exc:
        raise UserInputError(
            f"model.net.path '{path}' cannot be read by OpenVINO: {first_line(exc)}; re-export it with wsiseg-export"
        ) from None
    return int(shape[1].get_length()) if shape.rank.is_static and len(shape) == 4 and shape[1].is_static else None


def run_compiled(compiled: Any, x: torch.Tensor) -> torch.Tensor:
    """``compiled``'s first output for the float batch ``x``, as float32 on ``x``'s device."""
    return run_on_host(lambda array: compiled(array)[0], x)


class OpenVinoNet(FileNetwork):
    """An ONNX or OpenVINO IR file from ``wsiseg-export`` compiled by OpenVINO for the CPU.

    ``forward`` takes the normalised float N×3×H×W batch and returns the graph's first output as float32 on the
    input's device. The compiled model is created on the first call (so the module pickles and deep-copies without
    it), for dynamic batch and spatial sizes.

    Args:
        path: the ``.onnx`` file, or the ``.xml`` of an IR pair (``model.net.path``).
        stride: input height/width multiple, px; None: the sidecar's, else 16.
        threads: CPU threads OpenVINO infers with (``INFERENCE_NUM_THREADS``); None: as many as torch uses, so the
            DataLoader workers and the writer keep theirs.
        precision: ``f32`` (exact, the default), or ``bf16`` / ``f16`` where the CPU runs them natively
            (``INFERENCE_PRECISION_HINT``; OpenVINO would otherwise pick bf16 on AVX-512-BF16 CPUs by itself).
        cache_dir: folder where OpenVINO caches compiled models between runs (``CACHE_DIR``); None: no cache.

    Raises:
        UserInputError: OpenVINO is not installed, an option is outside its values, or the file does not compile.
    """

    _runtime_handles = ("_compiled",)  # compiled models do not pickle

    def __init__(
        self,
        path: str | Path,
        stride: int | None = None,
        threads: int | None = None,
        precision: str = "f32",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(path, stride=stride)
        if not openvino_available():
            raise UserInputError(
                "model/net=openvino needs OpenVINO: pip install 'openvino>=2026.4.1,<2026.5' (or use model=onnx)"
            )
        if precision not in INFERENCE_PRECISIONS:
            raise UserInputError(
                f"model.net.precision must be one of {', '.join(INFERENCE_PRECISIONS)}; got '{precision}'"
            )
        if threads is not None and threads < 1:
            raise UserInputError(f"model.net.threads must be >= 1 or null (torch's thread count), got {threads}")
        self.threads, self.precision, self.cache_dir = threads, precision, cache_dir
        self._compiled: Any = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, runtime=openvino, precision={self.precision}"

    @property
    def compiled(self) -> Any:
        """The OpenVINO ``CompiledModel`` (compiled on first access)."""
        if self._compiled is None:
            self._compiled = compile_for_cpu(
                self.path, threads=self.threads, precision=self.precision, cache_dir=self.cache_dir
            )
        return self._compiled

    @property
    def active_providers(self) -> list[str]:
        return ["OpenVINO CPU"]

    def output_channels(self) -> int:
        """The file's output channels: its static channel axis, else those of one stride-sized zero tile."""
        channels = static_output_channels(self.path)
        if channels is None:
            from wsiseg.head import probe_output_channels

            channels = probe_output_channels(self, self.stride)
        return channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_compiled(self.compiled, x)


class TorchOnOpenVino(Runtime):
    """A PyTorch network run by OpenVINO on the CPU: same inputs and outputs (normalised float N×3×H×W in, the
    network's raw float32 output out), any batch and tile size that is a multiple of the stride.

    The torch network is kept (so the module pickles and moves as before); on the first call it is exported to ONNX in
    a temporary folder (:func:`wsiseg.runtimes.onnx_graph.export_onnx`: dynamic batch and tile size), compiled by
    OpenVINO in float32 (:func:`compile_for_cpu`) and the file deleted. Compiled models do not pickle: a copy compiles
    again on its first call.

    Args:
        net: the torch network (weights loaded).
        threads: OpenVINO inference threads; None: torch's thread count.
        ir: an OpenVINO IR file (``.xml``) of ``net`` to compile instead of exporting it (the INT8 model
            :mod:`wsiseg.pipeline.int8` made of it).
        name: what :attr:`name` reports (``openvino``, ``openvino_int8``).
        compiled: the ``CompiledModel`` of ``ir`` (or of ``net`` exported) already made by :func:`compile_for_cpu`
            with ``threads``, to run instead of compiling it again (a pickled copy compiles its own).
    """

    def __init__(
        self,
        net: nn.Module,
        threads: int | None = None,
        ir: Path | None = None,
        name: str = "openvino",
        compiled: Any = None,
    ) -> None:
        self.net, self.threads, self.ir, self.name = net, threads, ir, name
        self._compiled: Any = compiled

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_compiled": None}

    @property
    def compiled(self) -> Any:
        """The OpenVINO ``CompiledModel`` (exported and compiled on first access)."""
        if self._compiled is None and self.ir is not None:
            self._compiled = compile_for_cpu(self.ir, threads=self.threads)
        if self._compiled is None:
            from wsiseg.model import network_stride
            from wsiseg.runtimes.onnx_graph import export_onnx

            side = 4 * network_stride(self.net)
            # exported outside inference mode (the first call comes from inside trainer.predict's)
            with torch.inference_mode(False), tempfile.TemporaryDirectory(prefix="wsiseg-openvino-") as tmp:
                path = export_onnx(self.net, Path(tmp) / "net.onnx", opset=17, example_size=(side, side))
                self._compiled = compile_for_cpu(path, threads=self.threads)  # reads the file: nothing shared
        return self._compiled

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return run_compiled(self.compiled, x)
