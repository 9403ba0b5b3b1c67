"""Tissue detection on a slide thumbnail, so background tiles are never read."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import openslide

__all__ = ["Thumbnail", "read_thumbnail", "tissue_mask", "tile_tissue_fractions"]


@dataclass(frozen=True)
class Thumbnail:
    """A low-resolution RGB image of the whole slide.

    Attributes:
        rgb: (h, w, 3) uint8.
        downsample: (x, y) level-0 px per thumbnail px (they differ slightly because sizes are rounded).
    """

    rgb: np.ndarray
    downsample: tuple[float, float]


def read_thumbnail(slide: openslide.OpenSlide, max_side: int = 2048) -> Thumbnail:
    """Read a thumbnail whose longer side is at most ``max_side`` px (OpenSlide picks the best pyramid level)."""
    width0, height0 = slide.dimensions
    scale = min(1.0, max_side / max(width0, height0))
    size = (max(1, round(width0 * scale)), max(1, round(height0 * scale)))
    image = slide.get_thumbnail(size).convert("RGB")
    rgb = np.asarray(image)
    return Thumbnail(rgb=rgb, downsample=(width0 / rgb.shape[1], height0 / rgb.shape[0]))


def tissue_mask(rgb: np.ndarray, min_saturation: int = 20, kernel_px: int = 3) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: Otsu threshold on HSV saturation, never below ``min_saturation``
    (0-255), then a morphological close and open with a ``kernel_px`` square to drop specks and fill small holes.

    White glass has low saturation, stained tissue high; the floor keeps an all-background slide from splitting its
    noise into "tissue".
    """
    saturation = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (saturation > max(float(otsu), float(min_saturation))).astype(np.uint8)
    if kernel_px > 1:
        kernel = np.ones((kernel_px, kernel_px), np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    return mask.astype(bool)


def tile_tissue_fractions(
    mask: np.ndarray,
    mask_downsample: tuple[float, float],
    origins_level: np.ndarray,
    patch_size: int,
    level_downsample: float,
) -> np.ndarray:
    """Fraction of tissue pixels under each tile.

    Args:
        mask: (h, w) bool tissue mask of the thumbnail.
        mask_downsample: (x, y) level-0 px per mask px.
        origins_level: (N, 2) tile origins (x, y), read-level px.
        patch_size: tile side, read-level px.
        level_downsample: level-0 px per read-level px.

    Returns:
        (N,) float64 in [0, 1]; a tile's footprint is at least one mask pixel so small tiles still see the mask.
    """
    h, w = mask.shape
    integral = cv2.integral(mask.astype(np.uint8))  # (h+1, w+1)
    x0 = origins_level[:, 0] * level_downsample / mask_downsample[0]
    y0 = origins_level[:, 1] * level_downsample / mask_downsample[1]
    x1 = (origins_level[:, 0] + patch_size) * level_downsample / mask_downsample[0]
    y1 = (origins_level[:, 1] + patch_size) * level_downsample / mask_downsample[1]
    ix0 = np.clip(np.floor(x0).astype(np.int64), 0, w - 1)
    iy0 = np.clip(np.floor(y0).astype(np.int64), 0, h - 1)
    ix1 = np.clip(np.ceil(x1).astype(np.int64), ix0 + 1, w)
    iy1 = np.clip(np.ceil(y1).astype(np.int64), iy0 + 1, h)
    counts = integral[iy1, ix1] - integral[iy0, ix1] - integral[iy1, ix0] + integral[iy0, ix0]
    areas = (ix1 - ix0) * (iy1 - iy0)
    return counts / areas
