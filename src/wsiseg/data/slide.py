"""Slide access through OpenSlide: opening with clear errors, choosing the read level, reading RGB tiles."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide

from wsiseg.data.grid import level0_location
from wsiseg.data.resample import area_resample, resampled_length, source_span
from wsiseg.errors import UserInputError

__all__ = ["open_slide", "SlideLevel", "choose_level", "read_rgb", "rgba_to_rgb", "slide_mpp"]


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """Open ``path`` with OpenSlide.

    Raises:
        UserInputError: the path is missing, is a directory or not a regular file, or OpenSlide cannot open it
            (message says why).
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"slide '{path}' does not exist: check data.slides")
    if path.is_dir():
        raise UserInputError(
            f"slide '{path}' is a directory holding no file OpenSlide can open: pass slide files, or a folder of them"
        )
    if not path.is_file():  # a FIFO, socket or device would block or fail inside OpenSlide's open
        raise UserInputError(f"slide '{path}' is not a regular file (a pipe, socket or device): pass slide files")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise UserInputError(f"slide '{path}' cannot be opened by OpenSlide: {_unsupported_hint(path)}") from None
    except openslide.OpenSlideError as exc:
        raise UserInputError(f"slide '{path}' cannot be opened by OpenSlide: {exc}") from None


def _unsupported_hint(path: Path) -> str:
    """Why OpenSlide refused ``path`` and what to do, for the formats users most often pass by mistake."""
    with open(path, "rb") as handle:
        magic = handle.read(8)
    if magic[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                tiled = tif.pages[0].is_tiled
        except Exception:
            tiled = True
        if not tiled:
            return (
                "a plain (strip-organised, untiled) TIFF, which OpenSlide does not read; convert it to a tiled "
                f"pyramid, e.g. vips tiffsave '{path}' '{path.with_suffix('')}.pyramid.tif' --tile --pyramid "
                "--compression jpeg --Q 90"
            )
    if magic[:8] == b"\x89PNG\r\n\x1a\n" or magic[:3] == b"\xff\xd8\xff":
        return "an ordinary PNG/JPEG image, not a whole-slide image; for folders of such patches use data=patches"
    return "unsupported or not a whole-slide image (tiled TIFF/SVS/NDPI/MRXS/DICOM... expected)"


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
    """The read level: the pixel grid tiles are cut from, and the OpenSlide level its pixels come from.

    Three frames are involved: **level-0 px** (the slide's full resolution), **source-level px** (the OpenSlide level
    ``level`` that is read) and **read-level px** (the tile frame: the pixel grid of the tiles, the tile grid and the
    mask). Without resampling (``scale == 1``) the read level *is* the source level. With ``data.mpp`` between pyramid
    levels the source level is area-averaged onto a coarser grid of exactly the requested mpp: read-level px ``u``
    covers source-level px ``[u·scale, (u+1)·scale)`` on each axis (see :mod:`wsiseg.data.resample`).

    Attributes:
        level: OpenSlide level index that is read (the source level).
        downsample: level-0 px per read-level px (``source_downsample × scale``; OpenSlide's
            ``level_downsamples[level]`` when not resampled).
        size: (W, H) of the read level, read-level px: the source level's size, or ``resampled_length(source_size,
            scale)`` per axis (ceil of source size / scale: the last pixel may run past the source edge, where the
            source is white).
        mpp: microns per read-level px (the requested ``data.mpp`` when resampled), or None when the slide has no mpp.
        scale: source-level px per read-level px (1.0: no resampling; > 1 when resampled).
        source_downsample: level-0 px per source-level px (``level_downsamples[level]``); defaults to ``downsample``
            when ``scale`` is 1.
        source_size: (W, H) of the source level, source-level px; defaults to ``size`` when ``scale`` is 1.
    """

    level: int
    downsample: float
    size: tuple[int, int]
    mpp: float | None
    scale: float = 1.0
    source_downsample: float | None = None
    source_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"SlideLevel.scale must be > 0, got {self.scale}")
        if self.scale == 1.0:
            # frozen: fill the defaults the way dataclasses do for their own fields
            if self.source_downsample is None:
                object.__setattr__(self, "source_downsample", self.downsample)
            if self.source_size is None:
                object.__setattr__(self, "source_size", tuple(self.size))
        elif self.source_downsample is None or self.source_size is None:
            raise ValueError("a resampled SlideLevel (scale != 1) needs source_downsample and source_size")

    @property
    def resampled(self) -> bool:
        """True when tiles are area-resampled from the source level (``scale != 1``)."""
        return self.scale != 1.0


def _within(value: float, target: float, tolerance: float) -> bool:
    return abs(value - target) <= tolerance * target


def choose_level(
    slide: openslide.OpenSlide,
    level: int | None,
    mpp: float | None,
    name: str,
    mpp_tolerance: float = 0.05,
    base_mpp: float | None = None,
    mpp_option: str = "data.mpp",
) -> SlideLevel:
    """Plan the read level from an explicit ``level`` or a target ``mpp`` (microns per px).

    With ``mpp`` (and ``level`` None) the source is the coarsest level whose mpp is finer than or equal to the target
    within the tolerance (``level_mpp <= mpp · (1 + mpp_tolerance)``). When that level's mpp is within
    ``mpp_tolerance`` (relative) of the target it is read as is and ``SlideLevel.mpp`` is the level's own mpp;
    otherwise it is area-resampled to exactly ``mpp`` (``scale = mpp / level_mpp``). ``level`` wins when both are
    given (never resampled); neither reads level 0.

    Args:
        slide: the open slide.
        level: ``data.level``, or None.
        mpp: ``data.mpp``: target microns per read-level px, or None.
        name: the slide's name for error messages.
        mpp_tolerance: ``data.mpp_tolerance``: relative difference between a level's mpp and ``mpp`` within which the
            level is used without resampling (0.05 = 5 %).
        base_mpp: the slide's level-0 µm/px declared by the user (``data.slide_mpp``), used instead of its metadata;
            None: the metadata's (:func:`slide_mpp`).
        mpp_option: the option ``mpp`` came from, for messages (``data.mpp`` or ``model.mpp``).

    Raises:
        UserInputError: the level does not exist, ``mpp`` is not positive, was asked for on a slide that records none,
            or is finer than level 0 by more than the tolerance (that would need upsampling).
    """
    base_mpp = slide_mpp(slide) if base_mpp is None else base_mpp
    if level is None and mpp is not None:
        if base_mpp is None:
            raise UserInputError(
                f"slide '{name}' records no microns-per-pixel, so {mpp_option}={mpp} cannot be honoured: declare it "
                "(data.slide_mpp=0.25, or a CSV of slide,mpp) or use data.level"
            )
        if mpp <= 0:
            raise UserInputError(f"{mpp_option} must be positive, got {mpp}")
        level_mpps = [base_mpp * ds for ds in slide.level_downsamples]
        finer = [i for i in range(slide.level_count) if level_mpps[i] <= mpp * (1 + mpp_tolerance)]
        if not finer:
            raise UserInputError(
                f"slide '{name}' has {base_mpp:.4g} um/px at level 0, so {mpp_option}={mpp} would need upsampling: "
                f"set data.mpp >= {base_mpp / (1 + mpp_tolerance):.4g} or raise data.mpp_tolerance"
            )
        source = max(finer, key=lambda i: (level_mpps[i], -i))
        if not _within(level_mpps[source], mpp, mpp_tolerance):
            return _resampled_level(slide, source, mpp, level_mpps[source])
        level = source
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


def _resampled_level(slide: openslide.OpenSlide, source: int, mpp: float, source_mpp: float) -> SlideLevel:
    scale = mpp / source_mpp
    source_downsample = float(slide.level_downsamples[source])
    source_size = tuple(slide.level_dimensions[source])
    return SlideLevel(
        level=source,
        downsample=source_downsample * scale,
        size=(resampled_length(source_size[0], scale), resampled_length(source_size[1], scale)),
        mpp=mpp,
        scale=scale,
        source_downsample=source_downsample,
        source_size=source_size,  # type: ignore[arg-type]
    )


def rgba_to_rgb(rgba: np.ndarray, background: int = 255) -> np.ndarray:
    """Composite an (H, W, 4) uint8 RGBA read over a ``background`` grey; transparent pixels (outside the slide or
    outside scanned regions) become background."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        # OpenCV drops the alpha channel much faster than numpy's strided copy
        return cv2.cvtColor(np.ascontiguousarray(rgba), cv2.COLOR_RGBA2RGB)
    a = alpha.astype(np.float32) / 255.0
    out = rgb.astype(np.float32) * a + float(background) * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def read_rgb(
    slide: openslide.OpenSlide, x_level: int, y_level: int, level: SlideLevel, width: int, height: int
) -> np.ndarray:
    """Read a ``width × height`` read-level px region at read-level origin (x, y) as (H, W, 3) uint8 RGB.

    Pixels past the slide's edge come back white (OpenSlide returns them transparent). A resampled level reads the
    source-level crop the region overlaps (``floor(x·scale)`` to ``ceil((x + width)·scale)``, white past the edge) and
    area-averages it with global coordinates, so a tile equals the same window of the whole level resampled at once.
    """
    if not level.resampled:
        location = level0_location(x_level, y_level, level.downsample)
        region = slide.read_region(location, level.level, (width, height))
        return rgba_to_rgb(np.asarray(region))
    x0, x1 = source_span(x_level, width, level.scale)
    y0, y1 = source_span(y_level, height, level.scale)
    location = level0_location(x0, y0, level.source_downsample)  # type: ignore[arg-type]
    crop = rgba_to_rgb(np.asarray(slide.read_region(location, level.level, (x1 - x0, y1 - y0))))
    return area_resample(crop, level.scale, (x0, y0), (x_level, y_level), (width, height))
