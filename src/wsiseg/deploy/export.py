"""One export, assembled: the ``export`` options (:class:`ExportOptions`), the torch network (:func:`build_network`)
and :func:`run_export`, which picks the exporter of ``export.format`` from :data:`EXPORTERS`, writes its file in a
scratch folder, verifies it, optionally quantises it to INT8 and checks that, publishes the file(s) atomically and
writes the JSON sidecar ``<path>.json``.

The exported graph is the network only. Its input ``input`` is float32 N×3×H×W, RGB, **already normalised** as
``(pixel/255 - mean) / std`` with the model config's mean/std (0.5/0.5 for the users' ``Unet``); N, H and W are
dynamic, H and W must be multiples of the network's stride (16). Its output is float32 N×C×H×W. With
``export.fp16=true`` the weights and the arithmetic are float16 while the input and output stay float32.

Verification runs the written file and the eager float32 PyTorch model on random normalised images of two batch sizes
and two spatial sizes, prints the largest absolute difference of the probabilities and fails above
``export.tolerance`` (default 1e-4 for float32, 5e-2 for float16).

:class:`wsiseg.runtimes.onnxruntime.OnnxRuntimeNet` runs such a file inside ``SegmentationModule`` (``model=onnx
model.net.path=unet.onnx``); :func:`wsiseg.runtimes.files.onnx_settings` reads the sidecar back there, so mean, std,
activation and stride come from the export and a config that contradicts it is refused.

The weights must be trained ones: ``model.checkpoint=random`` is refused; a network with fixed weights
(``model=probe``) exports without a checkpoint.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from wsiseg.atomic import write_json_atomic
from wsiseg.config import build
from wsiseg.deploy.calibration import Int8Quantizer, check_dice_floor, int8_agreement, sample_tissue_tiles
from wsiseg.deploy.exporter import Exporter
from wsiseg.deploy.onnx import OnnxExporter, verify_onnx
from wsiseg.deploy.openvino import OpenVinoExporter
from wsiseg.deploy.torchscript import TorchScriptExporter
from wsiseg.deploy.verify import FP16_TOLERANCE, FP32_TOLERANCE, VerifyResult
from wsiseg.errors import UserInputError
from wsiseg.head import probe_output_channels
from wsiseg.model import RANDOM_WEIGHTS, has_fixed_weights, load_checkpoint, network_stride
from wsiseg.options import check_option_types
from wsiseg.provenance import sha256_file
from wsiseg.runtimes.files import is_file_network, sidecar_path
from wsiseg.runtimes.onnx_graph import INPUT_NAME, check_opset, check_size

__all__ = ["EXPORTERS", "FORMATS", "ExportOptions", "build_network", "quantise_on_tissue", "run_export"]

log = logging.getLogger(__name__)

# export.format -> its exporter; the order is the one error messages list
EXPORTERS: dict[str, Exporter] = {e.format: e for e in (OnnxExporter(), TorchScriptExporter(), OpenVinoExporter())}
FORMATS = tuple(EXPORTERS)
QUANTIZE = ("none", "int8")


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
            ``calibration_slides`` (:mod:`wsiseg.deploy.calibration`): NNCF for ``openvino``, onnxruntime's QDQ
            quantiser for ``onnx``; float32 only.
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
        if self.format not in EXPORTERS:
            raise UserInputError(f"export.format must be one of {', '.join(FORMATS)}; got '{self.format}'")
        exporter = EXPORTERS[self.format]
        if self.path in (None, ""):
            raise UserInputError("export.path is required: pass export.path=unet.onnx (or unet.pt for torchscript)")
        object.__setattr__(self, "path", _check_output_path(self.path))
        if exporter.onnx_graph:  # an OpenVINO IR is converted from the ONNX graph
            object.__setattr__(self, "opset", check_opset(int(self.opset)))
        exporter.check_options(Path(self.path), self.fp16)
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
            if exporter.quantizer is None or self.fp16:
                raise UserInputError(
                    "export.quantize=int8 quantises the float32 ONNX graph: export.format=openvino (NNCF, fastest "
                    "in OpenVINO) or export.format=onnx (onnxruntime's quantiser), export.fp16=false"
                )
            exporter.quantizer.check_available()
            if not self.calibration_slides:
                raise UserInputError(
                    "export.quantize=int8 needs tissue to calibrate on: export.calibration_slides='[/data/a.svs]'"
                )


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
    if is_file_network(get_class(cfg.model.net._target_)):
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


def run_export(cfg: DictConfig) -> dict[str, Any]:
    """Export, verify and describe the network of ``cfg.model`` as ``cfg.export`` (:class:`ExportOptions`) says;
    returns the sidecar dict."""
    if OmegaConf.is_missing(cfg.export, "path"):
        raise UserInputError("export.path is required: pass export.path=unet.onnx (or unet.pt for torchscript)")
    check_option_types(cfg, ("export", "model", "model.net"))
    ex: ExportOptions = build(cfg.export)
    exporter, path, tolerance = EXPORTERS[ex.format], Path(ex.path or ""), float(ex.tolerance or 0.0)
    net, checkpoint = build_network(cfg)
    stride = network_stride(net)
    checks: dict[str, Any] = {
        "activation": str(cfg.model.get("activation", "none")),
        "mean": [float(v) for v in cfg.model.get("mean", (0.0, 0.0, 0.0))],
        "std": [float(v) for v in cfg.model.get("std", (1.0, 1.0, 1.0))],
        "batches": [int(b) for b in ex.batches],
        "sizes": [check_size(s, stride) for s in ex.sizes],
    }
    output_name = _graph_output_name(checks["activation"])
    channels = probe_output_channels(copy.deepcopy(net).cpu().float().eval(), stride)

    result: VerifyResult | None = None
    quantization = None
    # everything is written in a scratch folder next to export.path and renamed into place once checked
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        graph = exporter.write(
            net,
            Path(scratch) / exporter.graph_name,
            opset=ex.opset,
            fp16=bool(ex.fp16),
            example_size=checks["sizes"][0],
            output_name=output_name,
        )
        if ex.quantize == "int8" and exporter.quantizer is not None:
            # the quantisers read the float32 ONNX graph: it is checked, as onnxruntime runs it, before
            if ex.verify:
                result = verify_onnx(graph, net, tolerance=tolerance, **checks)
            final = Path(scratch) / exporter.quantizer.file_name
            quantization = quantise_on_tissue(
                exporter.quantizer, ex, graph, final, checks["mean"], checks["std"], checks["activation"], stride
            )
        else:
            final = exporter.deployable(graph)
            if ex.verify:
                result = exporter.verify(final, net, tolerance=tolerance, **checks)
        exporter.publish(final, path)

    sidecar = _sidecar(cfg, ex, checks, checkpoint, stride, channels, result, quantization)
    write_json_atomic(sidecar_path(path), sidecar)
    _report(ex, result, quantization)
    return sidecar


def _graph_output_name(activation: str) -> str:
    """The graph output's name: ``probabilities`` when the network applies its activation itself."""
    return "probabilities" if activation == "none" else "logits"


def _sidecar(
    cfg: DictConfig,
    ex: ExportOptions,
    checks: dict[str, Any],
    checkpoint: str | None,
    stride: int,
    channels: int,
    result: VerifyResult | None,
    quantization: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ``<path>.json`` record: how to feed the file and read its output, where it came from, how it was checked
    (read back by :func:`wsiseg.runtimes.files.read_sidecar`)."""
    from wsiseg._version import __version__

    exporter, path, activation = EXPORTERS[ex.format], Path(ex.path or ""), checks["activation"]
    sidecar: dict[str, Any] = {
        "format": ex.format,
        "file": path.name,
        "opset": ex.opset if exporter.onnx_graph else None,
        "fp16": bool(ex.fp16),
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", 3, "height", "width"],
            "layout": "NCHW, RGB",
            "height_width_multiple_of": stride,
            "normalisation": "(pixel / 255 - mean) / std, pixel = uint8 RGB",
        },
        "normalisation": {"mean": checks["mean"], "std": checks["std"]},
        "output": {
            "name": exporter.output_name(_graph_output_name(activation)),
            "dtype": "float32",
            "shape": ["batch", channels, "height", "width"],
            "channels": channels,
        },
        "activation_applied": activation == "none",
        "activation_to_apply": activation,
        "reduction": cfg.model.get("reduction"),
        "channel_index": cfg.model.get("channel_index"),
        "architecture": OmegaConf.to_container(cfg.model.net, resolve=True),
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
        **exporter.sidecar_extras(path),
    }
    if quantization is not None:
        sidecar["quantization"] = quantization
        sidecar["verification"] = sidecar["verification"] and {
            **sidecar["verification"],
            "compared": f"the FP32 graph before quantisation, outputs after activation={activation}",
        }
    return sidecar


def _report(ex: ExportOptions, result: VerifyResult | None, quantization: dict[str, Any] | None) -> None:
    """The command's closing lines: what was written, how large, and how it was checked."""
    exporter, path = EXPORTERS[ex.format], Path(ex.path or "")
    size_mb = sum(f.stat().st_size for f in exporter.files(path)) / 2**20
    precision = "int8" if quantization else "fp16" if ex.fp16 else "fp32"
    what = f"{exporter.describe(ex.opset if exporter.onnx_graph else None)} {precision}"
    print(f"wsiseg-export: wrote {path} ({what}, {size_mb:.1f} MiB) and {sidecar_path(path).name}")
    if quantization is not None:
        print(f"wsiseg-export: int8 vs fp32 on held-out tissue tiles: {quantization['summary']}")
    if result is None:
        print("wsiseg-export: not verified (export.verify=false)")
    else:
        print(f"wsiseg-export: verified with {result.runtime} against PyTorch: {result.summary()}")


def quantise_on_tissue(
    quantizer: Int8Quantizer,
    ex: ExportOptions,
    fp32: Path,
    out: Path,
    mean: Sequence[float],
    std: Sequence[float],
    activation: str,
    stride: int,
) -> dict[str, Any]:
    """INT8 of the FP32 file ``fp32`` into ``out`` by ``quantizer``, calibrated and checked on tissue tiles as the
    ``export.calibration_*`` / ``export.holdout_*`` options say; returns the sidecar's ``quantization`` record.

    Raises:
        UserInputError: too few tissue tiles, or a model under ``export.dice_floor`` (unless ``export.force``).
    """
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
    quantizer.quantize(fp32, out, calibration.normalised(mean, std))
    agreement = int8_agreement(fp32, out, held_out, mean, std, activation)
    used = sorted({slide for slide, _, _ in calibration.origins})
    check_dice_floor(agreement, ex.dice_floor, ex.force, f"{len(calibration.origins)} tiles of {', '.join(used)}")
    return {
        "scheme": quantizer.scheme,
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
