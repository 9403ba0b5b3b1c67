"""Exact area resampling of a pyramid level to a coarser pixel grid (``data.mpp`` between pyramid levels).

Frames:

* **source-level px** — pixels of the OpenSlide level that is read;
* **output px** (the tile frame, "read-level px" elsewhere in wsiseg) — pixels of the resampled grid, ``scale``
  source-level px wide: output px ``u`` covers the source-level interval ``[u·scale, (u+1)·scale)`` on each axis.

An output pixel is the area-weighted mean of the source pixels it overlaps. The weights are computed from global
coordinates only (``u``, ``scale`` and the source pixel's global index), and each output pixel sums its source pixels
in the same order wherever the crop starts, so resampling a crop gives bit-for-bit the same pixels as the same window
of the whole level resampled in one go: tiles are independent of the grid that cut them.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["area_resample", "area_resample_float", "resampled_length", "source_span"]


def resampled_length(length: int, scale: float) -> int:
    """Output px along one axis of ``length`` source-level px at ``scale`` source-level px per output px: the output
    pixels that start inside the source (``u·scale < length``), so the last one may run past the edge.

    Raises:
        ValueError: ``length < 1`` or ``scale <= 0``.

    Example::

        >>> resampled_length(1000, 1.5), resampled_length(999, 1.5), resampled_length(7, 1.0)
        (667, 666, 7)
    """
    if length < 1 or not scale > 0:
        raise ValueError(f"length ({length}) must be >= 1 and scale ({scale}) > 0")
    count = math.ceil(length / scale)
    # the same float product as the resampler's pixel edges decides, not the quotient's rounding
    while count > 1 and (count - 1) * scale >= length:
        count -= 1
    while count * scale < length:
        count += 1
    return count


def source_span(start: int, count: int, scale: float) -> tuple[int, int]:
    """Source-level px ``[first, end)`` that output px ``[start, start + count)`` at ``scale`` overlap:
    ``(floor(start·scale), ceil((start + count)·scale))`` — the crop to read before :func:`area_resample`."""
    return math.floor(start * scale), math.ceil((start + count) * scale)


def _axis_weights(start: int, count: int, scale: float, src_first: int, src_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output px ``start + i``: (count, taps) indices into a crop whose first px is source px ``src_first``, and
    the matching weights (overlap length / scale, so each row sums to 1; taps past the pixel's interval weigh 0)."""
    taps = math.ceil(scale) + 1
    u = np.arange(start, start + count, dtype=np.float64)
    lo, hi = u * scale, (u + 1) * scale
    first = np.floor(lo)
    j = first[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # global source px index of each tap
    weights = np.clip(np.minimum(hi[:, None], j + 1) - np.maximum(lo[:, None], j), 0.0, None) / scale
    index = j.astype(np.int64) - src_first
    used = weights > 0
    if used.any() and (index[used].min() < 0 or index[used].max() >= src_len):
        raise ValueError(
            f"source crop [{src_first}, {src_first + src_len}) does not cover output px [{start}, {start + count}) at "
            f"scale {scale}: read source_span(...) = {source_span(start, count, scale)}"
        )
    return np.clip(index, 0, src_len - 1), weights


def area_resample_float(
    src: np.ndarray, scale: float, src_origin: tuple[int, int], out_origin: tuple[int, int], out_size: tuple[int, int]
) -> np.ndarray:
    """Area-average ``src`` onto the output grid, as float64 (the value before rounding).

    Args:
        src: (h, w) or (h, w, C) array of source-level px; ``src[0, 0]`` is source-level px ``src_origin``.
        scale: source-level px per output px, the same on both axes (> 0; wsiseg only downsamples, ``scale >= 1``).
        src_origin: (x, y) of the crop's first pixel, source-level px.
        out_origin: (x, y) of the first output pixel, output px.
        out_size: (W, H) of the result, output px.

    Returns:
        (H, W) or (H, W, C) float64; output px ``(x, y)`` is the mean of the source over
        ``[x·scale, (x+1)·scale) × [y·scale, (y+1)·scale)`` weighted by overlap area.

    Raises:
        ValueError: ``scale <= 0``, or the crop does not cover the source span of the output window (read
            :func:`source_span` on each axis; the caller pads past the slide edge, e.g. with white).
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    (out_x, out_y), (out_w, out_h) = out_origin, out_size
    index_x, weight_x = _axis_weights(out_x, out_w, scale, src_origin[0], src.shape[1])
    index_y, weight_y = _axis_weights(out_y, out_h, scale, src_origin[1], src.shape[0])
    # one tap at a time, in a fixed order: the sum for a pixel does not depend on the crop (see module docstring)
    trailing = (1,) * (src.ndim - 2)
    rows = np.zeros((src.shape[0], out_w, *src.shape[2:]), np.float64)
    for k in range(index_x.shape[1]):
        rows += src[:, index_x[:, k]] * weight_x[:, k].reshape(1, out_w, *trailing)
    out = np.zeros((out_h, out_w, *src.shape[2:]), np.float64)
    for k in range(index_y.shape[1]):
        out += rows[index_y[:, k]] * weight_y[:, k].reshape(out_h, 1, *trailing)
    return out


def area_resample(
    src: np.ndarray, scale: float, src_origin: tuple[int, int], out_origin: tuple[int, int], out_size: tuple[int, int]
) -> np.ndarray:
    """:func:`area_resample_float` rounded to the nearest integer (``np.rint``: halves to even) as uint8.

    ``src`` holds uint8 values (0-255); arguments and frames as for :func:`area_resample_float`. A scale of exactly 1
    with matching origins returns a copy of the window.
    """
    if scale == 1.0:
        dx, dy = out_origin[0] - src_origin[0], out_origin[1] - src_origin[1]
        if dx >= 0 and dy >= 0 and dx + out_size[0] <= src.shape[1] and dy + out_size[1] <= src.shape[0]:
            return np.array(src[dy : dy + out_size[1], dx : dx + out_size[0]], dtype=np.uint8)
    out = area_resample_float(src, scale, src_origin, out_origin, out_size)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
