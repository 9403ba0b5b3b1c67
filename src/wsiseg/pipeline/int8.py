"""``model.runtime=openvino_int8``: INT8 on the CPU with one flag, calibrated on the run's own tissue tiles.

Before the first batch, the run's planned tissue tiles are sampled (spread over its slides, seeded) into a calibration
set and a disjoint check set, exactly as the network will see them (read, stain-normalised, normalised). NNCF
quantises the torch network (exported to ONNX: :mod:`wsiseg.deploy.int8_openvino`, the same quantiser as ``wsiseg-export
export.quantize=int8``) on the calibration set, and the INT8 OpenVINO IR is cached in ``model.int8.cache_dir`` under a
key of the weights' SHA-256 and the calibration settings: a later run with the same key loads it instead of
calibrating again (its ranges then come from the tiles of the run that made it). Every run checks the INT8 network
against FP32 (both by OpenVINO) on its own check tiles: Dice of the masks at ``writer.threshold``, max and mean |Δp|.
Under ``model.int8.dice_floor`` the run uses OpenVINO FP32 instead, with a warning. The outcome (runtime used, the
figures, whether it calibrated) goes into every ``report.json`` under ``provenance.int8``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsiseg.atomic import write_json_atomic
from wsiseg.errors import UserInputError
from wsiseg.runtimes.choice import Int8Options

__all__ = ["Int8Options", "Int8Outcome", "prepare_int8", "spread_indices"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8Outcome:
    """What ``model.runtime=openvino_int8`` did, for ``report.json`` (``provenance.int8``)."""

    runtime: str  # openvino_int8, or openvino (FP32) when the check failed
    calibrated: bool  # False: the cached network was used
    ir: str
    dice: float
    max_abs_diff: float
    mean_abs_diff: float
    threshold: float
    dice_floor: float
    calibration_tiles: int
    check_tiles: int
    seconds: float

    def as_report(self) -> dict[str, Any]:
        return asdict(self)


def spread_indices(counts: list[int], wanted: int, seed: int) -> list[int]:
    """``wanted`` distinct flat tile indices over slides holding ``counts`` tiles each (slide order, then tile order,
    as :class:`wsiseg.data.datasets.SlideTileDataset` flattens them), taken in turn from each slide's own seeded
    shuffle so every slide contributes (as long as it has tiles left). Fewer when there are fewer tiles."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    shuffles = [list(offsets[i] + rng.permutation(c)) for i, c in enumerate(counts)]
    picked: list[int] = []
    while len(picked) < wanted and any(shuffles):
        for order in shuffles:
            if order and len(picked) < wanted:
                picked.append(int(order.pop()))
    return picked


def _weights_sha256(net: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _network_input(datamodule: Any, module: Any, indices: list[int]) -> np.ndarray:
    """The float32 batch the network gets for the tiles ``indices``: read, moved to the CPU device as the run does
    (``data.stain`` applied there), normalised."""
    items = [datamodule.dataset[i] for i in indices]
    batch = datamodule.transfer_batch_to_device(torch.utils.data.default_collate(items), torch.device("cpu"), 0)
    with torch.inference_mode():
        return module.normalise(batch["image"]).numpy()


def prepare_int8(module: Any, datamodule: Any, options: Int8Options, run_dir: Path, threshold: float) -> Int8Outcome:
    """Quantise (or load from the cache) ``module``'s torch network for this run, check it, and give ``module`` the
    runtime to use (:meth:`wsiseg.module.SegmentationModule.use_runtime`).

    Args:
        module: the run's :class:`wsiseg.module.SegmentationModule` (a torch network, weights loaded).
        datamodule: the run's planned :class:`wsiseg.data.datamodule.SlideTileDataModule`.
        options: ``model.int8``.
        run_dir: the run folder (the cache's default home).
        threshold: ``writer.threshold``: the masks the check's Dice compares.

    Raises:
        UserInputError: the run has fewer tissue tiles than the calibration and check sets need, or NNCF is missing.
    """
    from wsiseg.deploy.calibration import probabilities
    from wsiseg.deploy.int8_openvino import NNCF_MISSING, nncf_available, quantize_int8_nncf
    from wsiseg.head import dice
    from wsiseg.model import network_stride
    from wsiseg.runtimes.onnx_graph import export_onnx
    from wsiseg.runtimes.openvino import TorchOnOpenVino, compile_for_cpu, move_ir, save_ir

    started = time.perf_counter()
    if not nncf_available():
        raise UserInputError(
            NNCF_MISSING.replace("export.format=openvino export.quantize=int8", "model.runtime=openvino_int8")
        )
    plan = datamodule.plan
    counts = [slide.tiles_tissue for slide in plan.slides]
    wanted = options.calibration_tiles + options.check_tiles
    if sum(counts) < wanted:
        raise UserInputError(
            f"model.runtime=openvino_int8 needs {wanted} tissue tiles (model.int8.calibration_tiles + check_tiles), "
            f"the run has {sum(counts)}: lower them, or use model.runtime=openvino for so short a run"
        )
    picked = spread_indices(counts, wanted, options.seed)
    calibration_idx, check_idx = picked[: options.calibration_tiles], picked[options.calibration_tiles :]
    settings = {
        "weights_sha256": _weights_sha256(module.net),
        "calibration_tiles": options.calibration_tiles,
        "seed": options.seed,
        "patch_size": int(datamodule.patch_size),
        "mean": module.mean.flatten().tolist(),
        "std": module.std.flatten().tolist(),
        "stain": datamodule.stain.method,
        "openvino": _version("openvino"),
        "nncf": _version("nncf"),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    cache = Path(options.cache_dir).expanduser() if options.cache_dir else run_dir / ".int8"
    cache.mkdir(parents=True, exist_ok=True)
    ir = cache / f"int8-{key}.xml"
    side = 4 * network_stride(module.net)
    with tempfile.TemporaryDirectory(prefix="wsiseg-int8-", dir=cache) as tmp:
        with torch.inference_mode(False):
            fp32 = export_onnx(module.net, Path(tmp) / "fp32.onnx", opset=17, example_size=(side, side))
        calibrated = not ir.is_file()
        if calibrated:
            log.info(
                "model.runtime=openvino_int8: calibrating INT8 on %d tissue tiles of this run (cached in %s)",
                len(calibration_idx),
                cache,
            )
            model = quantize_int8_nncf(fp32, _network_input(datamodule, module, calibration_idx))
            staged = Path(tmp) / ir.name
            save_ir(model, staged)
            write_json_atomic(cache / f"int8-{key}.json", settings)  # what the key stands for
            move_ir(staged, ir)
        else:
            log.info("model.runtime=openvino_int8: the INT8 network in %s (no calibration)", ir)
        x = _network_input(datamodule, module, check_idx)
        head = (module.activation, module.reduction, module.channel_index)
        # compiled as the run will run them (compile_for_cpu), and handed to the runtime: the check measures what
        # runs, and nothing is exported or compiled twice
        compiled = {"openvino": compile_for_cpu(fp32), "openvino_int8": compile_for_cpu(ir)}
        a = probabilities(compiled["openvino"], x, *head)
        b = probabilities(compiled["openvino_int8"], x, *head)
    agreement = dice(a >= threshold, b >= threshold)
    difference = np.abs(a - b)
    used = "openvino_int8" if agreement >= options.dice_floor else "openvino"
    if used == "openvino":
        log.warning(
            "model.runtime=openvino_int8: INT8 vs FP32 Dice %.4f on %d tiles of this run is under "
            "model.int8.dice_floor=%s: running OpenVINO FP32 instead",
            agreement,
            len(check_idx),
            options.dice_floor,
        )
    else:
        log.info(
            "model.runtime=openvino_int8: INT8 vs FP32 Dice %.5f, max |dp| %.4f on %d tiles of this run",
            agreement,
            float(difference.max()),
            len(check_idx),
        )
    module.use_runtime(
        TorchOnOpenVino(module.net, ir=ir if used == "openvino_int8" else None, name=used, compiled=compiled[used])
    )
    return Int8Outcome(
        runtime=used,
        calibrated=calibrated,
        ir=str(ir),
        dice=round(float(agreement), 6),
        max_abs_diff=round(float(difference.max()), 6),
        mean_abs_diff=round(float(difference.mean()), 6),
        threshold=float(threshold),
        dice_floor=float(options.dice_floor),
        calibration_tiles=len(calibration_idx),
        check_tiles=len(check_idx),
        seconds=round(time.perf_counter() - started, 3),
    )


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
