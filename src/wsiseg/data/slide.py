"""Slide access through OpenSlide: opening with clear errors, choosing the read level, reading RGB tiles."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide

from wsiseg.data.grid import level0_location
from wsiseg.errors import UserInputError

__all__ = ["open_slide", "SlideLevel", "choose_level", "read_rgb", "rgba_to_rgb", "slide_mpp"]


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """Open ``path`` with OpenSlide.

    Raises:
        UserInputError: the path is missing, is a directory, or OpenSlide cannot open it (message says why).
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"slide '{path}' does not exist: check data.slides")
    if path.is_dir():
        raise UserInputError(f"slide '{path}' is a directory: pass slide files (a glob such as '{path}/*.svs' works)")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise UserInputError(
            f"slide '{path}' cannot be opened by OpenSlide: unsupported or not a whole-slide image "
            "(tiled TIFF/SVS/NDPI/MRXS/DICOM... expected)"
        ) from None
    except openslide.OpenSlideError as exc:
        raise UserInputError(f"slide '{path}' cannot be opened by OpenSlide: {exc}") from None


def slide_mpp(slide: openslide.OpenSlide) -> float | None:
    """Level-0 microns per pixel (mean of x and y), or None when the slide does not record it."""
    try:
        mpp_x = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
        mpp_y = float(slide.properties[openslide.PROPERTY_NAME_MPP_Y])
    except (KeyError, ValueError):
        return None
    if not (mpp_x > 0 and mpp_y > 0):
        return None
    return (mpp_x + mpp_y) / 2.0


@dataclass(frozen=True)
class SlideLevel:
    """The pyramid level tiles are read from.

    Attributes:
        level: OpenSlide level index.
        downsample: level-0 px per read-level px (OpenSlide's ``level_downsamples[level]``).
        size: (W, H) of the level, read-level px.
        mpp: microns per read-level px, or None when the slide has no mpp.
    """

    level: int
    downsample: float
    size: tuple[int, int]
    mpp: float | None


def choose_level(slide: openslide.OpenSlide, level: int | None, mpp: float | None, name: str) -> SlideLevel:
    """Pick the read level from an explicit ``level`` or a target ``mpp`` (microns per px).

    With ``mpp`` the level whose resolution is closest to the target is used (no resampling; the report records the
    actual mpp). ``level`` wins when both are given.

    Raises:
        UserInputError: the level does not exist, or ``mpp`` was asked for on a slide that records none.
    """
    base_mpp = slide_mpp(slide)
    if level is None and mpp is not None:
        if base_mpp is None:
            raise UserInputError(
                f"slide '{name}' records no microns-per-pixel, so data.mpp={mpp} cannot be honoured: use data.level"
            )
        if mpp <= 0:
            raise UserInputError(f"data.mpp must be positive, got {mpp}")
        level_mpps = [base_mpp * ds for ds in slide.level_downsamples]
        level = min(range(slide.level_count), key=lambda i: abs(math.log(level_mpps[i] / mpp)))
    level = 0 if level is None else int(level)
    if not 0 <= level < slide.level_count:
        raise UserInputError(
            f"data.level={level} does not exist in slide '{name}' "
            f"({slide.level_count} levels: 0..{slide.level_count - 1})"
        )
    downsample = float(slide.level_downsamples[level])
    return SlideLevel(
        level=level,
        downsample=downsample,
        size=tuple(slide.level_dimensions[level]),  # type: ignore[arg-type]
        mpp=None if base_mpp is None else base_mpp * downsample,
    )


def rgba_to_rgb(rgba: np.ndarray, background: int = 255) -> np.ndarray:
    """Composite an (H, W, 4) uint8 RGBA read over a ``background`` grey; transparent pixels (outside the slide or
    outside scanned regions) become background."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        # OpenCV drops the alpha channel ~40x faster than numpy's strided copy (512² tile: 0.02 vs 0.87 ms)
        return cv2.cvtColor(np.ascontiguousarray(rgba), cv2.COLOR_RGBA2RGB)
    a = alpha.astype(np.float32) / 255.0
    out = rgb.astype(np.float32) * a + float(background) * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def read_rgb(
    slide: openslide.OpenSlide, x_level: int, y_level: int, level: SlideLevel, width: int, height: int
) -> np.ndarray:
    """Read a ``width × height`` read-level px region at read-level origin (x, y) as (H, W, 3) uint8 RGB.

    Pixels past the slide's edge come back white (OpenSlide returns them transparent).
    """
    location = level0_location(x_level, y_level, level.downsample)
    region = slide.read_region(location, level.level, (width, height))
    return rgba_to_rgb(np.asarray(region))
