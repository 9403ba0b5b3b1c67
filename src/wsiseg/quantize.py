"""Post-training static INT8 quantisation of an exported ONNX network, calibrated and checked on real tissue tiles.

    wsiseg-export model=demo export.path=demo-int8.onnx export.quantize=int8 \\
        'export.calibration_slides=[/data/a.svs,/data/b.svs]'

Tissue tiles are sampled from the calibration slides (the same tissue detection as ``wsiseg-predict``), split at
random into a calibration set and a disjoint held-out set. Two quantisers, chosen by ``export.format``
(:data:`QUANTIZERS`):

- ``openvino``: NNCF (OpenVINO's own) quantises the OpenVINO model and the IR file (``.xml`` + ``.bin``) is written:
  INT8 per-channel weights, asymmetric INT8 activations (NNCF's ``mixed`` preset), min-max ranges. OpenVINO only;
  the fastest CPU path measured (docs/performance.md).
- ``onnx``: onnxruntime's static quantiser writes a QDQ ONNX model (INT8 per-channel weights, UINT8 activations,
  min-max ranges), which OpenVINO and onnxruntime both run.

The INT8 model is then compared with the FP32 one on the held-out tiles, both run by OpenVINO: Dice of the masks
thresholded at 0.5, max and mean |Δp|. A Dice under ``export.dice_floor`` refuses to write the model unless
``export.force=true``. Calibrating on random pixels instead of tissue moves probabilities by up to 0.4-0.5.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsiseg.errors import UserInputError

__all__ = [
    "QUANTIZERS",
    "CalibrationTiles",
    "Int8Agreement",
    "check_dice_floor",
    "dice",
    "int8_agreement",
    "quantize_int8",
    "quantize_int8_nncf",
    "nncf_available",
    "NNCF_MISSING",
    "probabilities",
    "sample_tissue_tiles",
]

log = logging.getLogger(__name__)

# export.format -> what its INT8 file is (the sidecar's quantization.scheme)
QUANTIZERS = {
    "onnx": "static QDQ: int8 per-channel weights, uint8 activations, min-max ranges (onnxruntime quantiser)",
    "openvino": "static int8: int8 per-channel weights, asymmetric int8 activations, min-max ranges (NNCF, mixed "
    "preset, OpenVINO IR)",
}
NNCF_MISSING = (
    "export.format=openvino export.quantize=int8 needs NNCF: pip install 'wsiseg[int8]' (or export.format=onnx for "
    "onnxruntime's quantiser)"
)


@dataclass(frozen=True)
class CalibrationTiles:
    """uint8 RGB tiles (N, 3, P, P) and where each came from: ``(slide path, x, y)`` read-level px origins."""

    images: torch.Tensor
    origins: list[tuple[str, int, int]]

    def normalised(self, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
        """float32 ``(pixel/255 - mean) / std``, the exported graph's input."""
        m = torch.tensor(list(mean)).view(1, 3, 1, 1)
        s = torch.tensor(list(std)).view(1, 3, 1, 1)
        return ((self.images.float() / 255.0 - m) / s).numpy()


def sample_tissue_tiles(
    slides: Sequence[str], patch_size: int, counts: Sequence[int], seed: int, level: int | None, mpp: float | None
) -> list[CalibrationTiles]:
    """Disjoint random samples of tissue tiles of ``slides``: one :class:`CalibrationTiles` per entry of ``counts``.

    Tiles are cut and tissue-detected as ``wsiseg-predict`` does (``data.level`` / ``data.mpp``, default tissue
    options, no overlap), pooled over the slides, shuffled with ``seed`` and split in order.

    Raises:
        UserInputError: no slide can be read, or the slides hold fewer tissue tiles than ``sum(counts)``.
    """
    from wsiseg.data.datamodule import SlideTileDataModule

    data = SlideTileDataModule(
        slides=list(slides), level=level, mpp=mpp, patch_size=patch_size, num_workers=0, on_error="raise"
    )
    data.plan_run()
    dataset = data.dataset
    wanted = int(sum(counts))
    if len(dataset) < wanted:
        raise UserInputError(
            f"export.calibration_slides hold {len(dataset)} tissue tiles of {patch_size} px, "
            f"{wanted} are needed (export.calibration_tiles + export.holdout_tiles): add slides or ask for fewer tiles"
        )
    order = np.random.default_rng(seed).permutation(len(dataset))[:wanted]
    starts = np.cumsum([0, *counts])
    where = [(slide, int(x), int(y)) for slide in data.slides for x, y in slide.origins]
    samples = []
    for start, end in zip(starts[:-1], starts[1:]):
        picked = [int(i) for i in order[start:end]]
        images = torch.stack([dataset[i]["image"] for i in picked])
        samples.append(CalibrationTiles(images, [(str(where[i][0].path), where[i][1], where[i][2]) for i in picked]))
    return samples


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray, input_name: str, batch: int = 1) -> None:
    """Write the static INT8 (QDQ) version of the ONNX file ``fp32`` to ``out``, ranges from ``calibration``
    (normalised float32 N×3×H×W)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = iter(
                calibration[i : i + batch] for i in range(0, len(calibration), batch)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self.batches, None)
            return None if chunk is None else {input_name: chunk}

    prepared = out.with_name(out.name + ".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,  # the calibrating graph keeps each tensor's min/max per tile
        )
    finally:
        prepared.unlink(missing_ok=True)


def nncf_available() -> bool:
    """Whether NNCF can be imported here (looked up, not imported: importing it loads much of torch's tooling)."""
    import importlib.util

    try:
        return importlib.util.find_spec("nncf") is not None
    except ValueError:  # an entry of None in sys.modules: import blocked
        return False


def quantize_int8_nncf(fp32: Path, calibration: np.ndarray, batch: int = 1) -> Any:
    """The static INT8 ``openvino.Model`` of the ONNX file ``fp32`` quantised by NNCF, ranges from ``calibration``
    (normalised float32 N×3×H×W): per-channel weights, asymmetric activations (``mixed`` preset), min-max ranges of
    the whole set (NNCF's default, the mean of per-batch extremes, moved masks further from FP32 on held-out tissue).

    Raises:
        UserInputError: NNCF is not installed.
    """
    # NNCF imports torch's extension builder, which warns that this machine has no CUDA: not a problem here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import nncf
    except ImportError:
        raise UserInputError(NNCF_MISSING) from None
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    from wsiseg.openvino_net import openvino_core

    nncf.set_log_level(logging.ERROR)
    model = openvino_core().read_model(str(fp32))
    batches = [calibration[i : i + batch] for i in range(0, len(calibration), batch)]
    return nncf.quantize(
        model,
        nncf.Dataset(batches),
        subset_size=len(batches),
        preset=nncf.QuantizationPreset.MIXED,
        advanced_parameters=AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX
        ),
    )


@dataclass(frozen=True)
class Int8Agreement:
    """INT8 vs FP32 on held-out tiles: Dice of masks at 0.5, max and mean |Δp| of the probabilities, overall and per
    slide (``per_slide``: slide path → Dice)."""

    dice: float
    max_abs_diff: float
    mean_abs_diff: float
    tiles: int
    runtime: str
    per_slide: dict[str, float]

    def summary(self) -> str:
        return (
            f"Dice {self.dice:.5f}, max |dp| {self.max_abs_diff:.4f}, mean |dp| {self.mean_abs_diff:.5f} "
            f"on {self.tiles} held-out tiles ({self.runtime})"
        )


def probabilities(
    compiled: Any, x: np.ndarray, activation: str, reduction: str = "max", channel_index: int = 0
) -> np.ndarray:
    """(N, H, W) probabilities of the OpenVINO network ``compiled`` on the normalised batch ``x``, one tile at a time:
    its output through ``activation`` (:func:`wsiseg.module.apply_activation`), then channel ``channel_index`` for
    ``reduction="channel"``, else the channel maximum."""
    from wsiseg.module import apply_activation

    maps = []
    for i in range(len(x)):
        y = apply_activation(torch.from_numpy(np.asarray(compiled(x[i : i + 1])[0], np.float32)), activation)
        maps.append(y[:, channel_index] if reduction == "channel" else y.amax(dim=1))
    return torch.cat(maps).numpy()


def dice(a: Any, b: Any) -> float:
    """Dice of two boolean masks, numpy or torch (1.0 when both are empty)."""
    union = int(a.sum() + b.sum())
    return 1.0 if union == 0 else float(2 * (a & b).sum() / union)


def int8_agreement(
    fp32: Path, int8: Path, held_out: CalibrationTiles, mean: Sequence[float], std: Sequence[float], activation: str
) -> Int8Agreement:
    """Run both files by OpenVINO (float32 inference precision) on the ``held_out`` tiles and compare the channel-max
    probabilities after ``activation``."""
    from wsiseg.openvino_net import compile_for_cpu

    x = held_out.normalised(mean, std)
    a = probabilities(compile_for_cpu(fp32), x, activation)
    b = probabilities(compile_for_cpu(int8), x, activation)
    ma, mb = a >= 0.5, b >= 0.5
    slides = np.array([slide for slide, _, _ in held_out.origins])
    per_slide = {str(s): round(dice(ma[slides == s], mb[slides == s]), 6) for s in sorted(set(slides))}
    diff = np.abs(a - b)
    return Int8Agreement(
        round(dice(ma, mb), 6), float(diff.max()), float(diff.mean()), len(x), "OpenVINO CPU", per_slide
    )


def check_dice_floor(agreement: Int8Agreement, floor: float, force: bool, calibration: str) -> None:
    """Refuse (UserInputError) an INT8 model whose Dice is under ``floor`` unless ``force``; a forced one warns."""
    if agreement.dice >= floor:
        return
    message = (
        f"the INT8 model's Dice vs FP32 is {agreement.dice:.4f}, under export.dice_floor={floor} "
        f"({agreement.summary()}; calibrated on {calibration})"
    )
    if force:
        log.warning("%s; written anyway (export.force=true)", message)
        return
    raise UserInputError(
        f"{message}: not written. Calibrate on more tissue of the slides it will run on (export.calibration_slides, "
        "export.calibration_tiles), or pass export.force=true to write it anyway"
    )
