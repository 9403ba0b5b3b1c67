"""Heatmap rendering: a probability (or label) mask colour-mapped over the slide thumbnail."""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["HIDDEN_BELOW", "LABEL_COLOURS", "colour_map", "png_bytes", "render_heatmap"]

LABEL_COLOURS = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180]],
    np.uint8,
)


HIDDEN_BELOW = 0.1
"""Probabilities under this are not drawn: background inside predicted tiles (glass, fat) comes out at a few
percent, and drawn faintly it outlined every tile at the tissue's edge."""


def colour_map(mask: np.ndarray, labels: bool = False) -> np.ndarray:
    """(H, W) uint8 mask → (H, W, 3) uint8 RGB: the viridis colour map of the probability 0-255 (perceptually uniform
    and colour-blind safe; its green to yellow upper half stands apart from H&E's pinks and purples), or a fixed
    colour per class label (0 = background, black)."""
    if labels:
        return LABEL_COLOURS[mask % len(LABEL_COLOURS)]
    return np.ascontiguousarray(cv2.applyColorMap(mask, cv2.COLORMAP_VIRIDIS)[..., ::-1])


def render_heatmap(thumbnail: np.ndarray, mask: np.ndarray, labels: bool = False, opacity: float = 0.6) -> np.ndarray:
    """Blend ``mask`` over ``thumbnail``.

    Args:
        thumbnail: (h, w, 3) uint8 RGB of the whole slide.
        mask: (mh, mw) uint8 covering the same slide extent at any resolution (probability 0-255, or class labels).
        labels: ``mask`` holds class labels (0 = background) rather than probabilities.
        opacity: opacity of the overlay where the probability is 1, falling linearly to 0 at :data:`HIDDEN_BELOW`
            (labels use it as is).

    Returns:
        (h, w, 3) uint8 RGB of the thumbnail's size.
    """
    h, w = thumbnail.shape[:2]
    if labels:
        resized = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        colours = colour_map(resized, labels=True)
        alpha = np.where(resized > 0, np.float32(opacity), np.float32(0.0))
    else:
        resized = cv2.resize(mask, (w, h), interpolation=cv2.INTER_AREA)
        colours = colour_map(resized)
        floor = 255.0 * HIDDEN_BELOW
        alpha = np.clip((resized.astype(np.float32) - floor) * np.float32(opacity / (255.0 - floor)), 0.0, opacity)
    # per-pixel (1 - alpha)·thumbnail + alpha·colour, rounded (OpenCV, multi-threaded: much faster than numpy float32)
    return cv2.blendLinear(np.ascontiguousarray(thumbnail), colours, np.float32(1.0) - alpha, alpha)


def png_bytes(rgb: np.ndarray) -> bytes:
    """(h, w, 3) uint8 RGB as PNG, zlib level 1: faster to encode than PIL's default level 6, for a slightly larger
    file."""
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding of the heatmap failed")
    return encoded.tobytes()
