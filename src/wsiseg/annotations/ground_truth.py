"""Ground truth on an evaluation grid: find a slide's annotation (ASAP XML, GeoJSON or a mask image) and rasterise it.

Coordinate frames: annotation polygons are in **level-0 px** of the slide, pixel-edge frame (level-0 pixel (x, y) is
the square [x, x+1) × [y, y+1)). An evaluation grid has ``downsample`` level-0 px per px: eval pixel (j, i) covers
level-0 [j·d, (j+1)·d) × [i·d, (i+1)·d) and counts as inside a polygon when its centre ((j+½)·d, (i+½)·d) is.
Which polygons are tumour: :mod:`wsiseg.annotations.shapes`.

    truth = read_annotation(Path("annotations/tumor_001.xml"))
    mask = rasterise(truth.tumour, (3000, 2000), downsample=32)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import shapely
import tifffile
from PIL import Image
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from wsiseg.annotations.asap_xml import read_asap_xml
from wsiseg.annotations.geojson import read_geojson
from wsiseg.annotations.shapes import DEFAULT_EXCLUDE, GroundTruth
from wsiseg.errors import UserInputError

__all__ = [
    "ANNOTATION_SUFFIXES",
    "MASK_SUFFIXES",
    "read_annotation",
    "read_mask_image",
    "find_annotation",
    "rasterise",
    "ground_truth_mask",
]

ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")
MASK_SUFFIXES = tuple(f"{tag}{ext}" for tag in ("_mask", "_tumour", "_tumor") for ext in (".tif", ".tiff", ".png"))


def read_annotation(path: str | Path, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> GroundTruth:
    """Read an ASAP XML (``.xml``) or GeoJSON (``.geojson`` / ``.json``) annotation file."""
    path = Path(path)
    if path.suffix.lower() == ".xml":
        return read_asap_xml(path, exclude)
    if path.suffix.lower() in (".geojson", ".json"):
        return read_geojson(path, exclude)
    raise UserInputError(f"annotation '{path}': unknown format; use ASAP .xml, .geojson/.json or a mask image")


def rasterise(geometry: BaseGeometry, size: tuple[int, int], downsample: float = 1.0) -> np.ndarray:
    """Boolean (H, W) mask of ``geometry`` (level-0 px) on a grid of ``size`` (W, H) with ``downsample`` level-0 px
    per px: a pixel is set when its centre lies inside the geometry (holes respected).

    OpenCV's ``fillPoly`` fills the interior; pixels within a pixel of an edge, where its rounding may differ, are
    decided exactly with shapely's point-in-polygon test.
    """
    width, height = size
    out = np.zeros((height, width), np.uint8)
    if geometry.is_empty:
        return out.astype(bool)
    shift = 8
    scale = float(1 << shift)

    def fixed(ring: Any) -> np.ndarray:
        coords = np.asarray(ring.coords, np.float64) / downsample - 0.5
        return np.round(coords * scale).astype(np.int32)

    polygons = [p for p in shapely.get_parts(geometry) if isinstance(p, Polygon)]
    for polygon in polygons:
        minx, miny, maxx, maxy = polygon.bounds
        x0, y0 = max(0, int(minx / downsample) - 1), max(0, int(miny / downsample) - 1)
        x1, y1 = min(width, int(math.ceil(maxx / downsample)) + 1), min(height, int(math.ceil(maxy / downsample)) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        box = np.zeros((y1 - y0, x1 - x0), np.uint8)
        edges = np.zeros_like(box)
        origin = np.array([x0, y0], np.int32) * int(scale)
        rings = [fixed(polygon.exterior) - origin] + [fixed(hole) - origin for hole in polygon.interiors]
        cv2.fillPoly(box, rings[:1], 1, lineType=cv2.LINE_8, shift=shift)
        if len(rings) > 1:
            cv2.fillPoly(box, rings[1:], 0, lineType=cv2.LINE_8, shift=shift)
        cv2.polylines(edges, rings, True, 1, thickness=1, lineType=cv2.LINE_8, shift=shift)
        edges = cv2.dilate(edges, np.ones((3, 3), np.uint8))
        ys, xs = np.nonzero(edges)
        if len(xs):
            inside = shapely.contains_xy(polygon, (xs + x0 + 0.5) * downsample, (ys + y0 + 0.5) * downsample)
            box[ys, xs] = inside
        region = out[y0:y1, x0:x1]
        np.maximum(region, box, out=region)
    return out.astype(bool)


def read_mask_image(path: str | Path, size: tuple[int, int], level0_size: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask image (PNG, or a possibly pyramidal TIFF; tumour = non-zero) resampled to the evaluation
    grid of ``size`` (W, H).

    The image's scale is inferred from its width: it covers the slide's level 0 (``level0_size``, level-0 px). Of a
    pyramid, the coarsest level still at least as fine as the evaluation grid is read. Downsampling counts an eval
    pixel as tumour when at least half of it is; upsampling is nearest-neighbour.

    Raises:
        UserInputError: the file cannot be read as an image.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tif:
                levels = tif.series[0].levels
                widths = [lvl.shape[1] if len(lvl.shape) >= 2 else 0 for lvl in levels]
                index = max((i for i, w in enumerate(widths) if w >= size[0]), default=0)
                image = levels[index].asarray()
        else:
            with Image.open(path) as handle:
                image = np.asarray(handle.convert("L") if handle.mode not in ("L", "1", "I", "I;16") else handle)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise UserInputError(f"mask '{path}' cannot be read as an image ({exc}): use PNG or TIFF") from None
    if image.ndim == 3:
        image = image.max(axis=-1)
    if image.ndim != 2 or image.size == 0:
        raise UserInputError(f"mask '{path}' has shape {image.shape}; a single-channel mask is expected")
    binary = (image > 0).astype(np.float32)
    # image px per level-0 px from the width; map its extent onto the eval grid.
    per_level0 = binary.shape[1] / level0_size[0]
    eval_per_level0 = size[0] / level0_size[0]
    target = (
        max(1, round(binary.shape[1] * eval_per_level0 / per_level0)),
        max(1, round(binary.shape[0] * eval_per_level0 / per_level0)),
    )
    shrinking = target[0] < binary.shape[1]
    resized = cv2.resize(binary, target, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_NEAREST)
    out = np.zeros((size[1], size[0]), bool)
    h, w = min(size[1], resized.shape[0]), min(size[0], resized.shape[1])
    out[:h, :w] = resized[:h, :w] >= 0.5
    return out


def find_annotation(folder: str | Path, names: Iterable[str]) -> Path | None:
    """The ground-truth file for a slide in ``folder``: first ``<name>.xml``, ``.geojson``, ``.json``, then mask
    images ``<name>_mask``/``_tumour``/``_tumor`` + ``.tif``/``.tiff``/``.png``, for each name in ``names``
    (e.g. the slide's stem). None when there is none (the slide counts as tumour-free)."""
    folder = Path(folder)
    for name in names:
        for suffix in ANNOTATION_SUFFIXES + MASK_SUFFIXES:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def ground_truth_mask(
    path: Path | None,
    level0_size: tuple[int, int],
    downsample: float,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> np.ndarray:
    """Tumour mask on the evaluation grid (``downsample`` level-0 px per px, size rounded up) from an annotation
    file or mask image; all False when ``path`` is None."""
    size = (math.ceil(level0_size[0] / downsample), math.ceil(level0_size[1] / downsample))
    if path is None:
        return np.zeros((size[1], size[0]), bool)
    if path.name.lower().endswith(MASK_SUFFIXES) or path.suffix.lower() in (".png", ".tif", ".tiff"):
        return read_mask_image(path, size, level0_size)
    return rasterise(read_annotation(path, exclude).tumour, size, downsample)
