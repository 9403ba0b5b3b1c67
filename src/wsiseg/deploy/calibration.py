"""What both INT8 quantisers share: tissue tiles to calibrate on and to check with, the INT8-vs-FP32 agreement on
the held-out ones, the Dice floor (the procedure around a quantiser: :func:`wsiseg.deploy.export.quantise_on_tissue`).

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
from typing import Any, ClassVar

import numpy as np
import torch

from wsiseg.errors import UserInputError
from wsiseg.head import dice

__all__ = [
    "CalibrationTiles",
    "Int8Agreement",
    "Int8Quantizer",
    "check_dice_floor",
    "int8_agreement",
    "probabilities",
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
