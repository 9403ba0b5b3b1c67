"""What both INT8 quantisers share: tissue tiles to calibrate on and to check with, the INT8-vs-FP32 agreement on
the held-out ones, the Dice floor, and the procedure around a quantiser (:func:`quantise_on_tissue`).

    wsiseg-export model=demo export.path=demo-int8.onnx export.quantize=int8 \\
        'export.calibration_slides=[/data/a.svs,/data/b.svs]'

Tissue tiles are sampled from the calibration slides (the same tissue detection as ``wsiseg-predict``), split at
random into a calibration set and a disjoint held-out set. The exporter of ``export.format`` names its quantiser
(:class:`Int8Quantizer`):

- ``openvino``: NNCF (:mod:`~wsiseg.deploy.int8_openvino`) quantises the OpenVINO model and the IR file (``.xml`` +
  ``.bin``) is written; the fastest CPU path measured (docs/performance.md).
- ``onnx``: onnxruntime's static quantiser (:mod:`~wsiseg.deploy.int8_onnx`) writes a QDQ ONNX model, which OpenVINO
  and onnxruntime both run.

The INT8 model is then compared with the FP32 one on the held-out tiles, both run by OpenVINO: Dice of the masks
thresholded at 0.5, max and mean |Δp|. A Dice under ``export.dice_floor`` refuses to write the model unless
``export.force=true``. Calibrating on random pixels instead of tissue moves probabilities by up to 0.4-0.5.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from wsiseg.errors import UserInputError
from wsiseg.head import dice
from wsiseg.runtimes.onnx_graph import check_size

if TYPE_CHECKING:
    from wsiseg.deploy.export import ExportOptions

__all__ = [
    "CalibrationTiles",
    "Int8Agreement",
    "Int8Quantizer",
    "check_dice_floor",
    "int8_agreement",
    "probabilities",
    "quantise_on_tissue",
    "sample_tissue_tiles",
]

log = logging.getLogger(__name__)


class Int8Quantizer:
    """A post-training static INT8 quantiser of a float32 ONNX graph, calibrated on normalised tissue tiles.

    Attributes:
        scheme: what its INT8 file is (the sidecar's ``quantization.scheme``).
        file_name: name of the INT8 file in the scratch folder (its suffix is the published file's).
    """

    scheme: ClassVar[str]
    file_name: ClassVar[str]

    def check_available(self) -> None:
        """Refuse (UserInputError, one line) when the library it needs is not installed; cheap, imports nothing."""

    def quantize(self, fp32: Path, out: Path, calibration: np.ndarray) -> None:
        """Write the INT8 version of the ONNX file ``fp32`` to ``out``, ranges from ``calibration`` (normalised
        float32 N×3×H×W)."""
        raise NotImplementedError


@dataclass(frozen=True)
class CalibrationTiles:
    """uint8 RGB tiles (N, 3, P, P) and where each came from: ``(slide path, x, y)`` read-level px origins."""

    images: torch.Tensor
    origins: list[tuple[str, int, int]]

    def normalised(self, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
        """float32 ``(pixel/255 - mean) / std``, the exported graph's input."""
        from wsiseg.head import normalise

        return normalise(self.images, mean, std).numpy()


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
    from wsiseg.head import apply_activation

    maps = []
    for i in range(len(x)):
        y = apply_activation(torch.from_numpy(np.asarray(compiled(x[i : i + 1])[0], np.float32)), activation)
        maps.append(y[:, channel_index] if reduction == "channel" else y.amax(dim=1))
    return torch.cat(maps).numpy()


def int8_agreement(
    fp32: Path, int8: Path, held_out: CalibrationTiles, mean: Sequence[float], std: Sequence[float], activation: str
) -> Int8Agreement:
    """Run both files by OpenVINO (float32 inference precision) on the ``held_out`` tiles and compare the channel-max
    probabilities after ``activation``."""
    from wsiseg.runtimes.openvino import compile_for_cpu

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
