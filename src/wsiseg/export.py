"""``wsiseg-export``: a checkpoint in, a verified ONNX or TorchScript file (plus a JSON sidecar) out.

    wsiseg-export model.checkpoint=/models/UNet_17.pth export.format=onnx export.path=unet.onnx export.opset=17
    wsiseg-export model=demo export.format=torchscript export.path=unet.pt

The exported graph is the network only. Its input ``input`` is float32 N×3×H×W, RGB, **already normalised** as
``(pixel/255 - mean) / std`` with the model config's mean/std (0.5/0.5 for the users' ``Unet``); N, H and W are
dynamic, H and W must be multiples of the network's stride (16). Its output (``probabilities`` when the network applies
its activation itself, as the users' ``Unet`` does with its sigmoid, otherwise ``logits``) is float32 N×C×H×W. With
``export.fp16=true`` the weights and the arithmetic are float16 while the input and output stay float32.

After writing, the command loads the file back (onnxruntime, or ``torch.jit.load``), runs it and the eager float32
PyTorch model on random normalised images of two batch sizes and two spatial sizes, prints the largest absolute
difference of the probabilities and fails above ``export.tolerance`` (default 1e-4 for float32, 5e-2 for float16).

:class:`wsiseg.onnx_net.OnnxRuntimeNet` runs such a file inside ``SegmentationModule`` (``model=onnx
model.net.path=unet.onnx``); :func:`wsiseg.onnx_net.onnx_settings` reads the sidecar back there, so mean, std,
activation and stride come from the export and a config that contradicts it is refused.

The weights must be trained ones: ``model.checkpoint=random`` is refused; a network with fixed weights
(``model=probe``) exports without a checkpoint.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from wsiseg.atomic import write_json_atomic
from wsiseg.cli import exit_if_overrides_bad, exit_if_run_dir_unusable, user_errors
from wsiseg.config import build, config_dir
from wsiseg.errors import UserInputError
from wsiseg.model import RANDOM_WEIGHTS, has_fixed_weights, holds_weights, load_checkpoint, network_stride
from wsiseg.module import apply_activation
from wsiseg.onnx_graph import (
    INPUT_NAME,
    MIN_OPSET,
    check_opset,
    check_size,
    example_input,
    export_onnx,
    prepared_copy,
    quiet,
)
from wsiseg.onnx_net import OnnxRuntimeNet, sidecar_path
from wsiseg.openvino_net import ir_weights_path
from wsiseg.options import check_option_types
from wsiseg.provenance import sha256_file
from wsiseg.quantize import NNCF_MISSING, nncf_available

__all__ = [
    "FORMATS",
    "FP32_TOLERANCE",
    "FP16_TOLERANCE",
    "ExportOptions",
    "MIN_OPSET",
    "VerificationError",
    "VerifyResult",
    "export_onnx",
    "export_torchscript",
    "verify_onnx",
    "verify_torchscript",
    "run_export",
    "main",
]

FORMATS = ("onnx", "torchscript", "openvino")
QUANTIZE = ("none", "int8")
FP32_TOLERANCE = 1e-4  # max abs diff of probabilities (0-1) between the exported file and eager float32 PyTorch
# The same for export.fp16=true. float16 keeps ~3 significant digits through ~20 conv layers; the demo network on
# random-pixel inputs measures 1.3-1.7e-2, so 5e-2 (~13 grey levels of the 0-255 mask) leaves room for other weights.
FP16_TOLERANCE = 5e-2

log = logging.getLogger(__name__)


class VerificationError(UserInputError):
    """The exported file's outputs differ from the PyTorch model's by more than the tolerance."""


# -- helpers ---------------------------------------------------------------------------------------------------------
def _check_output_path(path: str | Path, option: str = "export.path") -> Path:
    """Resolve ``path`` and make sure its folder exists and accepts new files (tried, not guessed from mode bits)."""
    path = Path(str(path)).expanduser().absolute()
    if path.is_dir():
        raise UserInputError(f"{option} '{path}' is a folder: give a file name, e.g. {option}={path / 'unet.onnx'}")
    folder = path.parent
    if not folder.is_dir():
        raise UserInputError(
            f"{option} '{path}': folder '{folder}' does not exist: create it or choose another {option}"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise UserInputError(
            f"{option} '{path}': folder '{folder}' is not writable ({exc.strerror}): choose a writable folder"
        ) from None
    return path


# -- TorchScript -------------------------------------------------------------------------------------------------
def export_torchscript(
    net: nn.Module, path: str | Path, *, fp16: bool = False, example_size: Sequence[int] = (64, 64)
) -> Path:
    """Trace ``net`` on a CPU example, freeze it (weights become constants, BatchNorm folded) and save it.

    The traced graph has no size-dependent branches (the U-Nets' pooling/concat paths are shape-generic), so it runs
    any batch size and any height/width that are multiples of the stride; verification checks two of each.

    Args:
        net: the network (a float32 CPU copy is traced).
        path: output ``.pt`` file (``torch.jit.load`` reads it; move it to a GPU with ``.to('cuda')``).
        fp16: float16 weights and arithmetic inside; input and output stay float32.
        example_size: (H, W) of the tracing example, px.
    """
    path = Path(path)
    model = prepared_copy(net, fp16)
    example = example_input(example_size, network_stride(net))
    try:
        with quiet(), torch.no_grad():
            traced = torch.jit.trace(model, (example,), check_trace=False)
            frozen = torch.jit.freeze(traced.eval())
            torch.jit.save(frozen, str(path))
    except Exception as exc:
        raise UserInputError(f"TorchScript export failed: {str(exc).splitlines()[0]}") from exc
    return path


# -- verification ------------------------------------------------------------------------------------------------
@dataclass
class VerifyResult:
    """Outcome of a parity check: the largest abs difference over all cases, and each case's (N, H, W, diff)."""

    max_abs_diff: float
    tolerance: float
    cases: list[tuple[int, int, int, float]] = field(default_factory=list)
    runtime: str = ""

    def summary(self) -> str:
        shapes = ", ".join(f"{n}x3x{h}x{w}: {d:.2e}" for n, h, w, d in self.cases)
        return f"max abs diff {self.max_abs_diff:.2e} (tolerance {self.tolerance:.0e}) [{shapes}]"


def random_inputs(
    batches: Sequence[int], sizes: Sequence[Sequence[int]], mean: Sequence[float], std: Sequence[float], seed: int = 0
) -> Iterator[torch.Tensor]:
    """Normalised float32 batches from uniformly random uint8 RGB pixels, one per (batch size, size) pair."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    for n in batches:
        for h, w in sizes:
            pixels = torch.randint(0, 256, (int(n), 3, int(h), int(w)), generator=gen, dtype=torch.uint8)
            yield (pixels.float() / 255.0 - m) / s


def _compare(
    run: Any,
    reference: nn.Module,
    *,
    activation: str,
    mean: Sequence[float],
    std: Sequence[float],
    batches: Sequence[int],
    sizes: Sequence[Sequence[int]],
    tolerance: float,
    label: str,
    runtime: str,
) -> VerifyResult:
    stride = network_stride(reference)
    sizes = [check_size(s, stride) for s in sizes]
    ref_net = copy.deepcopy(reference).cpu().float().eval()
    result = VerifyResult(0.0, float(tolerance), runtime=runtime)
    with torch.no_grad():
        for x in random_inputs(batches, sizes, mean, std):
            expected = apply_activation(ref_net(x).float(), activation)
            got = apply_activation(run(x).float(), activation)
            if got.shape != expected.shape:
                raise VerificationError(
                    f"{label} returns shape {tuple(got.shape)} for input {tuple(x.shape)}, PyTorch "
                    f"{tuple(expected.shape)}: the file was exported from a different network"
                )
            diff = float((got - expected).abs().max())
            n, _, h, w = x.shape
            result.cases.append((n, h, w, diff))
            result.max_abs_diff = max(result.max_abs_diff, diff)
    if not result.max_abs_diff <= tolerance:  # also catches NaN
        worst = max(result.cases, key=lambda c: c[3] if c[3] == c[3] else float("inf"))
        raise VerificationError(
            f"{label} verification failed: max abs diff {result.max_abs_diff:.3g} of probabilities exceeds "
            f"export.tolerance={tolerance:g} (worst at input {worst[0]}x3x{worst[1]}x{worst[2]}); check the model "
            "config matches the checkpoint, or raise export.tolerance"
        )
    return result


def verify_onnx(
    path: str | Path,
    reference: nn.Module,
    *,
    activation: str = "none",
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    batches: Sequence[int] = (1, 3),
    sizes: Sequence[Sequence[int]] = ((64, 64), (96, 128)),
    tolerance: float = FP32_TOLERANCE,
    providers: Sequence[str] | None = None,
    runtime: str = "onnxruntime",
) -> VerifyResult:
    """Run the ONNX file in onnxruntime (or the ONNX / IR file in OpenVINO) and the eager float32 ``reference`` on the
    same random inputs.

    Args:
        path: the ``.onnx`` file, or with ``runtime="openvino"`` an IR ``.xml``.
        reference: the PyTorch network it was exported from (weights loaded).
        activation: applied to both outputs before comparing, so the difference is on probabilities.
        mean, std: normalisation of the random uint8 images, /255 scale.
        batches: batch sizes to try.
        sizes: (H, W) pairs to try, px, multiples of the stride.
        tolerance: largest allowed absolute difference.
        providers: onnxruntime providers (default: CUDA when available, else CPU).
        runtime: ``onnxruntime`` or ``openvino`` (its CPU plugin, float32).

    Raises:
        VerificationError: the difference exceeds ``tolerance`` or the shapes differ.
    """
    runner: nn.Module
    if runtime == "openvino":
        from wsiseg.openvino_net import OpenVinoNet

        runner = OpenVinoNet(path, stride=network_stride(reference))
        label, used = "OpenVINO", f"OpenVINO {__import__('openvino').__version__} CPU"
    else:
        runner = OnnxRuntimeNet(path, stride=network_stride(reference), providers=providers)
        label = "ONNX (onnxruntime)"
        used = f"onnxruntime {__import__('onnxruntime').__version__} {','.join(runner.active_providers)}"
    return _compare(
        runner,
        reference,
        activation=activation,
        mean=mean,
        std=std,
        batches=batches,
        sizes=sizes,
        tolerance=tolerance,
        label=label,
        runtime=used,
    )


def verify_torchscript(
    path: str | Path,
    reference: nn.Module,
    *,
    activation: str = "none",
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    batches: Sequence[int] = (1, 3),
    sizes: Sequence[Sequence[int]] = ((64, 64), (96, 128)),
    tolerance: float = FP32_TOLERANCE,
) -> VerifyResult:
    """Load the TorchScript file on the CPU and compare it with eager ``reference`` (arguments: :func:`verify_onnx`)."""
    try:
        with quiet():
            scripted = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise VerificationError(f"TorchScript file '{path}' cannot be loaded: {str(exc).splitlines()[0]}") from None
    return _compare(
        scripted,
        reference,
        activation=activation,
        mean=mean,
        std=std,
        batches=batches,
        sizes=sizes,
        tolerance=tolerance,
        label="TorchScript",
        runtime=f"torch {torch.__version__} cpu",
    )


# -- the command -------------------------------------------------------------------------------------------------
def _required(cfg: DictConfig, key: str, hint: str) -> Any:
    """``cfg[key]`` (dotted), or one line naming the option when it is missing or empty."""
    if OmegaConf.select(cfg, key, default=None) in (None, ""):
        raise UserInputError(f"{key} is required: {hint}")
    return OmegaConf.select(cfg, key)


def build_network(cfg: DictConfig) -> tuple[nn.Module, str | None]:
    """Instantiate ``model.net`` and load ``model.checkpoint`` into it strictly; returns (net, checkpoint path).

    A network with fixed weights (``ProbeNet``, see :func:`wsiseg.model.has_fixed_weights`) exports without a
    checkpoint (path None); ``model.checkpoint=random`` is refused (an untrained network is not worth deploying).

    Raises:
        UserInputError: no checkpoint, ``random``, or a checkpoint that is missing or does not match ``model.net``.
    """
    if holds_weights(get_class(cfg.model.net._target_)):
        raise UserInputError(
            "model.net is an ONNX file: wsiseg-export exports a PyTorch checkpoint; use a torch model config "
            "(e.g. model=unet_camelyon model.checkpoint=/path/to/UNet_17.pth)"
        )
    checkpoint = OmegaConf.select(cfg, "model.checkpoint", default=None)
    if checkpoint == RANDOM_WEIGHTS:
        raise UserInputError(
            "model.checkpoint=random: wsiseg-export refuses untrained weights (nothing worth deploying); "
            "pass model.checkpoint=/path/to/UNet_17.pth"
        )
    if checkpoint in (None, "") and has_fixed_weights(get_class(cfg.model.net._target_)):
        return instantiate(cfg.model.net).eval(), None
    checkpoint = str(_required(cfg, "model.checkpoint", "pass model.checkpoint=/path/to/UNet_17.pth (or model=demo)"))
    net = instantiate(cfg.model.net)
    load_checkpoint(net, checkpoint, trust=bool(cfg.model.get("trust_checkpoint", False)))
    return net.eval(), checkpoint


def _output_channels(net: nn.Module, stride: int) -> int:
    with torch.no_grad():
        return int(copy.deepcopy(net).cpu().float().eval()(torch.zeros(1, 3, stride, stride)).shape[1])


@dataclass(frozen=True)
class ExportOptions:
    """The ``export`` section of ``wsiseg-export`` (its ``_target_``), checked on construction.

    Attributes:
        format: ``onnx``, ``torchscript`` or ``openvino`` (an IR pair ``<name>.xml`` + ``<name>.bin`` converted from
            the verified ONNX graph, for ``model=openvino``).
        path: the output file (its folder must exist and accept files; ``.xml`` for ``openvino``); the sidecar is
            ``<path>.json``.
        opset: ONNX opset (also of the graph an OpenVINO IR is converted from; ignored for TorchScript).
        fp16: float16 weights and arithmetic inside; input and output stay float32.
        verify: run the written file against eager float32 PyTorch and fail above ``tolerance``.
        tolerance: largest absolute probability difference; None: 1e-4 (fp32) or 5e-2 (fp16).
        batches: verification batch sizes, each >= 1.
        sizes: verification [height, width] pairs, px (checked against the network's stride by :func:`run_export`).
        quantize: ``none``, or ``int8``: post-training static INT8 calibrated on tissue tiles of
            ``calibration_slides`` (:mod:`wsiseg.quantize`): NNCF for ``openvino``, onnxruntime's QDQ quantiser for
            ``onnx``; float32 only.
        calibration_slides: slides the calibration and held-out tiles are sampled from.
        calibration_tiles: tiles the activation ranges are measured on.
        holdout_tiles: other tiles of the same slides the INT8 model is checked on against FP32.
        holdout_slides: check on tiles of these slides instead (empty: the calibration slides, disjoint tiles).
        calibration_patch_size: tile side of both sets, px at the read level.
        calibration_level, calibration_mpp: the read level (as ``data.level`` / ``data.mpp``; both None: level 0).
        calibration_seed: seed of the random tile sample.
        dice_floor: smallest Dice (INT8 vs FP32 masks at 0.5, held-out tiles) for the INT8 model to be written.
        force: write an INT8 model under ``dice_floor`` anyway (with a warning).

    Raises:
        UserInputError: one line naming the ``export.*`` key.
    """

    format: str = "onnx"
    path: str | Path | None = None
    opset: int = 17
    fp16: bool = False
    verify: bool = True
    tolerance: float | None = None
    batches: Sequence[int] = (1, 3)
    sizes: Sequence[Sequence[int]] = ((64, 64), (96, 128))
    quantize: str = "none"
    calibration_slides: Sequence[str] = ()
    calibration_tiles: int = 64
    holdout_tiles: int = 32
    holdout_slides: Sequence[str] = ()
    calibration_patch_size: int = 256
    calibration_level: int | None = None
    calibration_mpp: float | None = None
    calibration_seed: int = 0
    dice_floor: float = 0.99
    force: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UserInputError(f"export.format must be one of {', '.join(FORMATS)}; got '{self.format}'")
        if self.path in (None, ""):
            raise UserInputError("export.path is required: pass export.path=unet.onnx (or unet.pt for torchscript)")
        object.__setattr__(self, "path", _check_output_path(self.path))
        if self.format != "torchscript":  # an OpenVINO IR is converted from the ONNX graph
            object.__setattr__(self, "opset", check_opset(int(self.opset)))
        if self.format == "openvino":
            if Path(self.path).suffix != ".xml":
                raise UserInputError(
                    f"export.format=openvino writes an OpenVINO IR pair (.xml + .bin): export.path must end in .xml, "
                    f"got '{self.path}'"
                )
            if self.fp16:
                raise UserInputError("export.fp16=true is for onnx and torchscript; OpenVINO IR keeps float32 weights")
        if self.tolerance is None:
            object.__setattr__(self, "tolerance", FP16_TOLERANCE if self.fp16 else FP32_TOLERANCE)
        if not self.sizes or not self.batches or min(int(b) for b in self.batches) < 1:
            raise UserInputError("export.batches and export.sizes need at least one entry each (batches >= 1)")
        if self.quantize not in QUANTIZE:
            raise UserInputError(f"export.quantize must be one of {', '.join(QUANTIZE)}; got '{self.quantize}'")
        # checked even when nothing is quantised: a value out of range is a mistake whether or not it is used now
        if self.calibration_tiles < 1 or self.holdout_tiles < 1:
            raise UserInputError("export.calibration_tiles and export.holdout_tiles must be >= 1")
        if not 0 < self.dice_floor <= 1:
            raise UserInputError(f"export.dice_floor must be in (0, 1], got {self.dice_floor}")
        if self.quantize == "int8":
            if self.format == "torchscript" or self.fp16:
                raise UserInputError(
                    "export.quantize=int8 quantises the float32 ONNX graph: export.format=openvino (NNCF, fastest "
                    "in OpenVINO) or export.format=onnx (onnxruntime's quantiser), export.fp16=false"
                )
            if self.format == "openvino" and not nncf_available():
                raise UserInputError(NNCF_MISSING)
            if not self.calibration_slides:
                raise UserInputError(
                    "export.quantize=int8 needs tissue to calibrate on: export.calibration_slides='[/data/a.svs]'"
                )


def run_export(cfg: DictConfig) -> dict[str, Any]:
    """Export, verify and describe the network of ``cfg.model`` as ``cfg.export`` (:class:`ExportOptions`) says;
    returns the sidecar dict."""
    from wsiseg._version import __version__

    if OmegaConf.is_missing(cfg.export, "path"):
        raise UserInputError("export.path is required: pass export.path=unet.onnx (or unet.pt for torchscript)")
    check_option_types(cfg, ("export", "model", "model.net"))
    ex: ExportOptions = build(cfg.export)
    fmt, path, fp16 = ex.format, Path(ex.path or ""), bool(ex.fp16)
    opset = ex.opset if fmt != "torchscript" else None
    tolerance = float(ex.tolerance or 0.0)
    net, checkpoint = build_network(cfg)
    stride = network_stride(net)
    sizes = [check_size(s, stride) for s in ex.sizes]
    batches = [int(b) for b in ex.batches]
    activation = str(cfg.model.get("activation", "none"))
    mean = [float(v) for v in cfg.model.get("mean", (0.0, 0.0, 0.0))]
    std = [float(v) for v in cfg.model.get("std", (1.0, 1.0, 1.0))]
    output_name = "probabilities" if activation == "none" else "logits"
    channels = _output_channels(net, stride)

    quantization = None
    int8 = ex.quantize == "int8"
    # everything is written in a scratch folder next to export.path and renamed into place once checked
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        fp32 = Path(scratch) / ("model.pt" if fmt == "torchscript" else "fp32.onnx")
        if fmt == "torchscript":
            export_torchscript(net, fp32, fp16=fp16, example_size=sizes[0])
        else:
            export_onnx(net, fp32, opset=opset or 17, fp16=fp16, example_size=sizes[0], output_name=output_name)
        checks = {"activation": activation, "mean": mean, "std": std, "batches": batches, "sizes": sizes}
        verify = verify_torchscript if fmt == "torchscript" else verify_onnx
        result = None
        if ex.verify and (int8 or fmt != "openvino"):  # a float32 IR is verified itself, below
            result = verify(fp32, net, tolerance=tolerance, **checks)  # type: ignore[operator]
        final = fp32
        if int8:
            final = Path(scratch) / ("int8.xml" if fmt == "openvino" else "int8.onnx")
            quantization = _quantize(ex, fp32, final, mean, std, activation, stride)
        elif fmt == "openvino":  # the verified ONNX graph as OpenVINO IR, checked again as OpenVINO runs it
            from wsiseg.openvino_net import openvino_core, save_ir

            final = Path(scratch) / "fp32.xml"
            save_ir(openvino_core().read_model(str(fp32)), final)
            if ex.verify:
                result = verify_onnx(final, net, tolerance=tolerance, runtime="openvino", **checks)
        if fmt == "openvino":
            from wsiseg.openvino_net import move_ir

            move_ir(final, path)
        else:
            os.replace(final, path)

    net_cfg = OmegaConf.to_container(cfg.model.net, resolve=True)
    sidecar: dict[str, Any] = {
        "format": fmt,
        "file": path.name,
        "opset": opset,
        "fp16": fp16,
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", 3, "height", "width"],
            "layout": "NCHW, RGB",
            "height_width_multiple_of": stride,
            "normalisation": "(pixel / 255 - mean) / std, pixel = uint8 RGB",
        },
        "normalisation": {"mean": mean, "std": std},
        "output": {
            "name": output_name if fmt == "onnx" else None,
            "dtype": "float32",
            "shape": ["batch", channels, "height", "width"],
            "channels": channels,
        },
        "activation_applied": activation == "none",
        "activation_to_apply": activation,
        "reduction": cfg.model.get("reduction"),
        "channel_index": cfg.model.get("channel_index"),
        "architecture": net_cfg,
        "checkpoint": None
        if checkpoint is None
        else {"path": str(Path(checkpoint).expanduser().absolute()), "sha256": sha256_file(checkpoint)},
        "wsiseg_version": __version__,
        "torch_version": torch.__version__,
        "verification": None
        if result is None
        else {
            "runtime": result.runtime,
            "max_abs_diff": result.max_abs_diff,
            "tolerance": result.tolerance,
            "compared": f"outputs after activation={activation}",
            "cases": [{"batch": n, "height": h, "width": w, "max_abs_diff": d} for n, h, w, d in result.cases],
        },
    }
    if fmt != "torchscript":
        import onnx

        sidecar["onnx_version"] = onnx.__version__
    if fmt == "openvino":
        import openvino

        sidecar["weights_file"] = ir_weights_path(path).name
        sidecar["openvino_version"] = openvino.__version__
    if quantization is not None:
        sidecar["quantization"] = quantization
        sidecar["verification"] = sidecar["verification"] and {
            **sidecar["verification"],
            "compared": f"the FP32 graph before quantisation, outputs after activation={activation}",
        }
    write_json_atomic(sidecar_path(path), sidecar)
    files = [path, ir_weights_path(path)] if fmt == "openvino" else [path]
    size_mb = sum(f.stat().st_size for f in files) / 2**20
    precision = "int8" if quantization else "fp16" if fp16 else "fp32"
    what = f"{fmt}{f' opset {opset}' if opset and fmt == 'onnx' else ''} {precision}"
    print(f"wsiseg-export: wrote {path} ({what}, {size_mb:.1f} MiB) and {sidecar_path(path).name}")
    if quantization is not None:
        print(f"wsiseg-export: int8 vs fp32 on held-out tissue tiles: {quantization['summary']}")
    if result is None:
        print("wsiseg-export: not verified (export.verify=false)")
    else:
        print(f"wsiseg-export: verified with {result.runtime} against PyTorch: {result.summary()}")
    return sidecar


def _quantize(
    ex: ExportOptions,
    fp32: Path,
    out: Path,
    mean: Sequence[float],
    std: Sequence[float],
    activation: str,
    stride: int,
) -> dict[str, Any]:
    """INT8 of the FP32 file ``fp32`` into ``out``, calibrated and checked on tissue tiles (:mod:`wsiseg.quantize`);
    returns the sidecar's ``quantization`` record. Refuses a model under ``export.dice_floor`` (unless forced)."""
    from wsiseg.quantize import (
        QUANTIZERS,
        check_dice_floor,
        int8_agreement,
        quantize_int8,
        quantize_int8_nncf,
        sample_tissue_tiles,
    )

    patch = check_size((ex.calibration_patch_size, ex.calibration_patch_size), stride, "export.calibration_patch_size")
    where = (ex.calibration_seed, ex.calibration_level, ex.calibration_mpp)
    slides = [str(s) for s in ex.calibration_slides]
    if not ex.holdout_slides:  # disjoint tiles of the same slides
        calibration, held_out = sample_tissue_tiles(slides, patch[0], (ex.calibration_tiles, ex.holdout_tiles), *where)
    else:
        (calibration,) = sample_tissue_tiles(slides, patch[0], (ex.calibration_tiles,), *where)
        (held_out,) = sample_tissue_tiles([str(s) for s in ex.holdout_slides], patch[0], (ex.holdout_tiles,), *where)
    log.info(
        "calibrating INT8 on %d tissue tiles, checking on %d others", len(calibration.origins), len(held_out.origins)
    )
    if ex.format == "openvino":
        from wsiseg.openvino_net import save_ir

        save_ir(quantize_int8_nncf(fp32, calibration.normalised(mean, std)), out)
    else:
        quantize_int8(fp32, out, calibration.normalised(mean, std), INPUT_NAME)
    agreement = int8_agreement(fp32, out, held_out, mean, std, activation)
    used = sorted({slide for slide, _, _ in calibration.origins})
    check_dice_floor(agreement, ex.dice_floor, ex.force, f"{len(calibration.origins)} tiles of {', '.join(used)}")
    return {
        "scheme": QUANTIZERS[ex.format],
        "calibration": {
            "tiles": [{"slide": s, "x": x, "y": y} for s, x, y in calibration.origins],
            "patch_size": patch[0],
            "level": ex.calibration_level,
            "mpp": ex.calibration_mpp,
            "seed": ex.calibration_seed,
        },
        "held_out": {"tiles": [{"slide": s, "x": x, "y": y} for s, x, y in held_out.origins]},
        "dice_vs_fp32": agreement.dice,
        "dice_vs_fp32_per_slide": agreement.per_slide,
        "max_abs_diff": agreement.max_abs_diff,
        "mean_abs_diff": agreement.mean_abs_diff,
        "runtime": agreement.runtime,
        "dice_floor": ex.dice_floor,
        "forced": agreement.dice < ex.dice_floor,
        "summary": agreement.summary(),
    }


@hydra.main(config_path=str(config_dir()), config_name="export", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    with user_errors("wsiseg-export", run_dir=Path(HydraConfig.get().runtime.output_dir)):
        run_export(cfg)


def main() -> None:
    """Console entry point ``wsiseg-export``; a run folder Hydra cannot create is one line, exit 2."""
    exit_if_run_dir_unusable("wsiseg-export")
    exit_if_overrides_bad("wsiseg-export", "export")
    _hydra_main()


if __name__ == "__main__":
    main()
