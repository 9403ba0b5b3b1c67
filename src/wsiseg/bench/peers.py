"""The peers ``wsiseg-bench`` times beside the pipeline: MONAI's whole-slide pipeline on the same tiles and weights.

MONAI is optional (``pip install 'wsiseg[peers]'``); without it the case is skipped with one line saying so.
TIAToolbox's ``SemanticSegmentor`` is not among the peers: its newest release requires torch < 2.13 (see
docs/performance.md, "CPU runtimes, INT8 and the peers").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wsiseg.head import normalise, reduce_channels

if TYPE_CHECKING:
    from wsiseg.bench.options import BenchOptions
    from wsiseg.data.datamodule import SlideTileDataModule
    from wsiseg.module import SegmentationModule

__all__ = ["MONAI_MISSING", "PeerResult", "monai_available", "monai_wsi_case", "mean_abs_grey_diff", "peer_cases"]

MONAI_MISSING = "MONAI is not installed: pip install 'wsiseg[peers]' to time MONAI's WSI pipeline beside wsiseg"


@dataclass(frozen=True)
class PeerResult:
    """One peer's figures: ``tiles`` inferred in ``seconds`` and its whole-level output (1, C, H, W), read-level px."""

    name: str
    tiles: int
    seconds: float
    output: torch.Tensor


def monai_available() -> bool:
    """Whether MONAI's inferers can be imported here."""
    try:
        import monai.inferers  # noqa: F401
    except ImportError:
        return False
    return True


def monai_wsi_case(
    slide: str,
    level: int,
    patch_size: int,
    origins: np.ndarray,
    net: Callable[[torch.Tensor], torch.Tensor],
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int,
) -> PeerResult:
    """MONAI's WSI pipeline as its docs put it together: ``PatchInferer`` with a ``WSISlidingWindowSplitter``
    (OpenSlide reader, no overlap) and an ``AvgMerger``, running ``net`` eagerly in FP32 at ``batch_size`` on the
    tiles whose (x, y) read-level origins are ``origins`` (every other grid position is filtered out, so both sides
    infer the same tiles). Preprocessing is wsiseg's: ``(pixel/255 - mean) / std``; the output is the channel max.

    Args:
        slide: the slide file.
        level: OpenSlide level read (unresampled: the read level is this level).
        patch_size: tile side, read-level px.
        origins: (N, 2) tile origins (x, y), read-level px, multiples of ``patch_size``.
        net: the FP32 torch network (normalised N×3×H×W in, N×C×H×W out).
        mean, std: (1, 3, 1, 1) normalisation on the /255 scale.
        batch_size: tiles per network call.
    """
    from monai.inferers import AvgMerger, PatchInferer, WSISlidingWindowSplitter

    wanted = {(int(y), int(x)) for x, y in origins}  # MONAI's locations are (row, col)
    splitter = WSISlidingWindowSplitter(
        patch_size=patch_size,
        overlap=0,
        filter_fn=lambda _patch, location: (int(location[0]), int(location[1])) in wanted,
        reader="OpenSlide",
        level=level,
    )
    inferer = PatchInferer(
        splitter=splitter,
        merger_cls=AvgMerger,
        batch_size=batch_size,
        preprocessing=lambda patches: normalise(patches, mean, std),
        postprocessing=lambda out: reduce_channels(out, "max"),
        match_spatial_shape=True,
    )
    start = time.perf_counter()
    with torch.no_grad():
        output = inferer(slide, net)
    return PeerResult("monai", len(wanted), time.perf_counter() - start, output)


def mean_abs_grey_diff(whole: torch.Tensor, tiles: dict[tuple[int, int], np.ndarray], patch_size: int) -> float:
    """Mean |Δ| in grey levels (probability × 255) between a whole-level output (1, 1, H, W) and per-tile reference
    outputs keyed by (x, y) origin, over the reference tiles."""
    diffs = []
    for (x, y), reference in tiles.items():
        region = whole[0, 0, y : y + patch_size, x : x + patch_size].float().numpy()
        ref = np.asarray(reference, np.float32).reshape(region.shape)
        diffs.append(np.abs(region - ref).mean() * 255.0)
    return float(np.mean(diffs)) if diffs else float("nan")


def peer_cases(
    bench: BenchOptions,
    datamodule: SlideTileDataModule,
    reference: torch.nn.Module,
    module: SegmentationModule,
    naive_outputs: list[np.ndarray],
) -> dict[str, dict[str, Any]]:
    """The peers on the naive loop's tiles with the same FP32 weights (:func:`monai_wsi_case`): per peer
    ``patches_per_s`` and ``mean_abs_grey_diff_vs_naive``, or ``skipped`` with the reason."""
    slide = datamodule.slides[0]
    if not monai_available():
        print(f"wsiseg-bench: monai skipped: {MONAI_MISSING}")
        return {"monai": {"skipped": MONAI_MISSING}}
    if len(datamodule.slides) != 1 or slide.level.scale != 1.0:
        why = "MONAI's splitter reads one unresampled level of one slide: bench one slide at a pyramid level"
        print(f"wsiseg-bench: monai skipped: {why}")
        return {"monai": {"skipped": why}}
    origins = slide.origins[: len(naive_outputs)]
    cpu_reference = reference.cpu()
    result = monai_wsi_case(
        str(slide.path),
        slide.level.level,
        slide.grid.patch_size,
        origins,
        cpu_reference,
        module.mean.cpu(),
        module.std.cpu(),
        datamodule.batch_size,
    )
    patch = slide.grid.patch_size
    by_origin = {(int(x), int(y)): out for (x, y), out in zip(origins, naive_outputs)}
    return {
        "monai": {
            "tiles": result.tiles,
            "seconds": round(result.seconds, 3),
            "patches_per_s": round(result.tiles / result.seconds, 2),
            "batch_size": datamodule.batch_size,
            "mean_abs_grey_diff_vs_naive": round(mean_abs_grey_diff(result.output, by_origin, patch), 4),
            "pipeline": "PatchInferer + WSISlidingWindowSplitter(OpenSlide) + AvgMerger, FP32 eager, on the CPU",
        }
    }
