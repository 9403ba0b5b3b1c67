"""Slide-level figures read from a finished ``mask.tif`` (its pyramid levels, so a Camelyon-sized mask costs a few
MB of reading): the slide score, the largest tumour region, the tumour share of the tissue.

Frames: mask px are ``mask.tif`` level-0 px; level ``k`` of the pyramid has ``2^k`` mask px per px (levels are
halved, :func:`wsiseg.writers.tiff.pyramid_sizes`; probability levels hold rounded 2×2 means, label levels the
top-left label).
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import tifffile

__all__ = ["LARGEST_REGION_MAX_PX", "largest_region", "slide_score", "tumour_share_of_tissue"]

LARGEST_REGION_MAX_PX = 64 << 20
"""The most px of the pyramid level :func:`largest_region` reads: the finest level under it (a 100,000 × 150,000 px
mask is read at level 4, 6,250 × 9,375 px of 16 × 16 mask px; masks up to 64 Mpx at level 0, exactly)."""


def _levels(mask_path: Path) -> list[tuple[int, int]]:
    """(height, width) of every pyramid level of ``mask_path``, finest first."""
    with tifffile.TiffFile(mask_path) as tif:
        return [tuple(int(v) for v in level.shape[:2]) for level in tif.series[0].levels]  # type: ignore[misc]


def _read_level(mask_path: Path, level: int) -> np.ndarray:
    return np.asarray(tifffile.imread(mask_path, level=level))


def slide_score(mask_path: Path, tile_mask_px: float, labels: bool = False) -> tuple[float, int]:
    """The slide's score: the largest mean tumour probability (0-1) over a sliding square window one tile wide
    (``tile_mask_px``: the tile's side in mask px), read at the pyramid level ``k`` whose px are at most a quarter of
    a tile (``2^k <= tile_mask_px / 4``), so the window is at least 4 px of that level. Label masks: the largest share
    of tumour (non-zero) labels in the window. Windows are clipped at the mask's border (a window past the edge
    averages the part inside).

    Returns:
        (score, k): the score rounded to 4 decimals and the level it was read at.
    """
    levels = _levels(mask_path)
    k = max(0, min(len(levels) - 1, int(math.floor(math.log2(max(tile_mask_px / 4, 1.0))))))
    level = _read_level(mask_path, k)
    values = (level > 0).astype(np.float32) if labels else level.astype(np.float32) / 255.0
    side = max(1, round(tile_mask_px / 2**k))
    # mean over the part of each window inside the mask: box sums of the values / box sums of ones
    sums = cv2.boxFilter(values, -1, (side, side), normalize=False, borderType=cv2.BORDER_CONSTANT)
    counts = cv2.boxFilter(np.ones_like(values), -1, (side, side), normalize=False, borderType=cv2.BORDER_CONSTANT)
    return round(float((sums / np.maximum(counts, 1.0)).max()), 4), k


def largest_region(mask_path: Path, threshold_u8: int, labels: bool = False) -> tuple[int, int]:
    """The largest 8-connected tumour region (px at or above ``threshold_u8``, or non-zero labels), in mask px, read
    at the finest pyramid level of at most :data:`LARGEST_REGION_MAX_PX` px (``2^k`` mask px a side per px: its
    area is the level's px count × 4^k, exact at level 0).

    Returns:
        (area in mask px², k).
    """
    levels = _levels(mask_path)
    k = next((i for i, (h, w) in enumerate(levels) if h * w <= LARGEST_REGION_MAX_PX), len(levels) - 1)
    level = _read_level(mask_path, k)
    positive = ((level > 0) if labels else (level >= threshold_u8)).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(positive, connectivity=8)
    largest = int(stats[1:, cv2.CC_STAT_AREA].max()) if count > 1 else 0
    return largest * 4**k, k


def tumour_share_of_tissue(tumour_level0_px2: float, tissue_level0_px2: float) -> float | None:
    """Tumour area as a % of the tissue area (both level-0 px², so no mpp is needed), 3 decimals; None without
    tissue."""
    return None if tissue_level0_px2 <= 0 else round(100.0 * tumour_level0_px2 / tissue_level0_px2, 3)
