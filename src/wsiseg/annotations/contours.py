"""Tumour regions as polygons: trace a probability mask chunk by chunk; :func:`write_contours` writes them as QuPath
GeoJSON (:mod:`wsiseg.annotations.geojson`) and ASAP XML (:mod:`wsiseg.annotations.asap_xml`).

Coordinate frames:

* **mask px** — pixels of ``mask.tif`` level 0. Polygons are traced in the *pixel-edge* frame: pixel (x, y) is the
  unit square [x, x+1) × [y, y+1), so a region's polygon runs along the outer edges of its pixels (not through
  their centres) and a one-pixel region is a unit square.
* **level-0 px** — pixels of the slide's level 0; what QuPath and ASAP expect. One mask px is
  ``level0_per_mask_px`` (= ``level_downsample × output_downsample`` in ``report.json``) level-0 px.

Tracing never holds the full mask: each ``chunk`` × ``chunk`` window is thresholded and traced with OpenCV
(:func:`cv2.findContours` on a half-pixel grid, so polygons follow pixel edges and touch exactly across chunk borders);
pieces that reach a chunk border are merged with shapely afterwards, so a region crossing chunks comes out as one
polygon. Regions are 8-connected, like the tracing: pixels touching only at a corner belong to one region. Concave
corners, and such corner contacts, are cut by a half-pixel diagonal (OpenCV's border following), which adds ⅛ px² per
corner and never changes which pixel centres lie inside; across a chunk border a corner contact stays a point (the
region is then a MultiPolygon whose parts meet there).

    regions = trace_regions(mask_array, threshold_u8=128)
    write_geojson(regions, "tumour.geojson", level0_per_mask_px=4, mpp=0.25)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import shapely
import tifffile
import zarr
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from wsiseg.annotations.asap_xml import write_asap_xml
from wsiseg.annotations.geojson import write_geojson
from wsiseg.annotations.shapes import Region, polygon_parts, polygonal
from wsiseg.errors import UserInputError

__all__ = [
    "CONTOUR_FORMATS",
    "CONTOUR_FILES",
    "DEFAULT_MIN_AREA_UM2",
    "contour_formats",
    "trace_regions",
    "scale_regions",
    "write_contours",
    "open_mask_level",
]

log = logging.getLogger(__name__)

CONTOUR_FORMATS = ("geojson", "asap_xml")
CONTOUR_FILES = {"geojson": "tumour.geojson", "asap_xml": "tumour.xml"}
DEFAULT_MIN_AREA_UM2 = 200.0
"""``writer.min_area_um2``'s default: about two tumour cells (a cell ~15 µm across). Regions under it are specks of a
noisy map, not a finding; isolated tumour cell clusters (ITC, up to 0.2 mm across by the TNM/Camelyon convention) are
far larger and kept. 0 keeps every region."""


def contour_formats(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalise ``writer.contours``: None / ``none`` / ``[]`` → (); ``geojson``; ``geojson,asap_xml``; a list.

    Raises:
        UserInputError: an unknown format (the message lists the valid ones).
    """
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    formats: list[str] = []
    for item in (i.strip().lower() for i in items):
        if item in ("", "none", "null"):
            continue
        if item not in CONTOUR_FORMATS:
            raise UserInputError(
                f"writer.contours: unknown format '{item}'; use none, {', '.join(CONTOUR_FORMATS)} "
                "or a list such as writer.contours='[geojson,asap_xml]'"
            )
        if item not in formats:
            formats.append(item)
    return tuple(formats)


def _trace_window(
    positive: np.ndarray, values: np.ndarray | None, x0: int, y0: int
) -> list[tuple[BaseGeometry, int, float | None]]:
    """Trace one window: (geometry in mask px, pixel count, probability sum) per 8-connected region.

    The window's pixels are placed at the odd points of a (2h+1, 2w+1) grid and dilated by 3×3, so the grid holds
    the closed unit square of every positive pixel; OpenCV's border following on it yields rings along pixel edges
    (in half-pixel units).
    """
    h, w = positive.shape
    half = np.zeros((2 * h + 1, 2 * w + 1), np.uint8)
    half[1::2, 1::2] = positive
    half = cv2.dilate(half, np.ones((3, 3), np.uint8))
    contours, hierarchy = cv2.findContours(half, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    count, labels, stats, _ = cv2.connectedComponentsWithStats(positive.view(np.uint8), connectivity=8)
    sums = None if values is None else np.bincount(labels.ravel(), weights=values.ravel(), minlength=count) / 255.0
    links = hierarchy[0]
    holes: dict[int, list[np.ndarray]] = {}
    for index, link in enumerate(links):
        if link[3] >= 0:
            holes.setdefault(int(link[3]), []).append(contours[index][:, 0, :])
    offset = np.array([x0, y0], np.float64)
    pieces = []
    for index, link in enumerate(links):
        if link[3] >= 0:
            continue
        ring = contours[index][:, 0, :]
        # The ring's top-most, then left-most vertex is the top-left corner of a pixel of this region.
        first = ring[np.lexsort((ring[:, 0], ring[:, 1]))[0]]
        label = int(labels[first[1] // 2, first[0] // 2])
        shell = ring / 2.0 + offset
        inner = [hole / 2.0 + offset for hole in holes.get(index, []) if len(hole) >= 3]
        geometry = Polygon(shell, inner) if len(shell) >= 3 else Polygon()
        geometry = polygonal(geometry)
        if geometry.is_empty:
            continue
        pieces.append((geometry, int(stats[label, cv2.CC_STAT_AREA]), None if sums is None else float(sums[label])))
    return pieces


def trace_regions(mask: Any, threshold_u8: int = 128, labels: bool = False, chunk: int = 2048) -> list[Region]:
    """Tumour regions of a 2-D uint8 mask, traced window by window.

    Args:
        mask: (H, W) uint8 array-like that supports 2-D slicing (numpy array, zarr array of ``mask.tif``); only
            ``chunk`` × ``chunk`` windows are read at a time.
        threshold_u8: a pixel is tumour where its value is at least this (probabilities stored as 0-255).
        labels: the mask holds class labels: tumour is any non-zero label, and there is no probability.
        chunk: window side, mask px.

    Returns:
        Regions in mask px (pixel-edge frame), largest first.
    """
    height, width = (int(s) for s in mask.shape)
    final: list[Region] = []
    pending: list[Region] = []
    for y0 in range(0, height, chunk):
        y1 = min(height, y0 + chunk)
        for x0 in range(0, width, chunk):
            x1 = min(width, x0 + chunk)
            window = np.asarray(mask[y0:y1, x0:x1])
            positive = window > 0 if labels else window >= threshold_u8
            if not positive.any():
                continue
            values = None if labels else np.where(positive, window, 0)
            for geometry, pixels, total in _trace_window(positive, values, x0, y0):
                minx, miny, maxx, maxy = geometry.bounds
                at_border = (minx == x0 > 0) or (miny == y0 > 0) or (maxx == x1 < width) or (maxy == y1 < height)
                (pending if at_border else final).append(Region(geometry, pixels, total))
    final.extend(_merge_pieces(pending))
    final.sort(key=lambda r: r.pixels, reverse=True)
    return final


def _merge_pieces(pieces: list[Region]) -> list[Region]:
    """Join pieces from neighbouring windows that touch (share an edge or a corner) into single regions."""
    if not pieces:
        return []
    geometries = [p.geometry for p in pieces]
    tree = shapely.STRtree(geometries)
    parent = list(range(len(pieces)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    left, right = tree.query(geometries, predicate="intersects")
    for a, b in zip(left.tolist(), right.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(len(pieces)):
        groups.setdefault(root(i), []).append(i)
    merged = []
    for members in groups.values():
        if len(members) == 1:
            merged.append(pieces[members[0]])
            continue
        geometry = polygonal(shapely.unary_union([geometries[i] for i in members]))
        pixels = sum(pieces[i].pixels for i in members)
        sums = [pieces[i].probability_sum for i in members]
        total = None if any(s is None for s in sums) else float(sum(s for s in sums if s is not None))
        merged.append(Region(geometry, pixels, total))
    return merged


def scale_regions(
    regions: Iterable[Region], level0_per_mask_px: float, level0_size: tuple[int, int] | None = None
) -> list[Region]:
    """Regions from mask px to level-0 px, clipped to the slide's level-0 rectangle when ``level0_size`` is given."""
    scaled = []
    bounds = None if level0_size is None else shapely.box(0, 0, float(level0_size[0]), float(level0_size[1]))
    integral = float(level0_per_mask_px).is_integer()
    for region in regions:
        geometry = affinity.scale(region.geometry, level0_per_mask_px, level0_per_mask_px, origin=(0, 0))
        if not integral:
            geometry = shapely.set_precision(geometry, 1e-3)
        if bounds is not None and not bounds.contains(geometry):
            geometry = geometry.intersection(bounds)
        geometry = polygonal(geometry)
        if not geometry.is_empty:
            scaled.append(Region(geometry, region.pixels, region.probability_sum))
    return scaled


def _midpoints(ring: Any, pixel: float = 1.0) -> np.ndarray:
    """The ring through the midpoints of its pixel edges (closed): its edges are first cut into pieces of at most
    ``pixel`` (one mask px in the ring's units; traced rings keep only their corners), so a straight run keeps its
    line and a staircase becomes the line through the middle of each step, which simplification then changes far
    less than the staircase's corners."""
    coords = shapely.get_coordinates(shapely.segmentize(shapely.LinearRing(ring.coords), pixel))[:-1]
    middle = (coords + np.roll(coords, -1, axis=0)) / 2
    return np.vstack([middle, middle[:1]])


def simplify_regions(
    regions: Iterable[Region], min_hole_area: float, tolerance: float, pixel: float = 1.0
) -> list[Region]:
    """Regions a viewer can hold: holes with an area under ``min_hole_area`` filled, then (``tolerance`` > 0) every
    ring taken through its edges' midpoints and simplified by GEOS's coverage simplification (Visvalingam-Whyatt:
    vertices whose triangle with their neighbours has an area under ``tolerance``², topology kept, so rings neither
    cross nor vanish; its cost grows with the vertex count, not with the rings squared as Douglas-Peucker's
    topology-preserving variant does); results are valid polygons. Units: the geometry's (level-0 px and level-0 px²
    after :func:`scale_regions`). ``pixels`` (the reported areas) are kept: they count the mask px."""
    cleaned = []
    for region in regions:
        parts = []
        for polygon in polygon_parts(region.geometry):
            holes = [ring for ring in polygon.interiors if Polygon(ring).area >= min_hole_area]
            if tolerance > 0:
                parts.append(Polygon(_midpoints(polygon.exterior, pixel), [_midpoints(h, pixel) for h in holes]))
            else:
                parts.append(Polygon(polygon.exterior, holes))
        geometry: BaseGeometry = parts[0] if len(parts) == 1 else MultiPolygon(parts)
        if tolerance > 0:  # linear in the rings; shapely.simplify(preserve_topology=True) took minutes on many holes
            geometry = shapely.coverage_simplify(polygonal(geometry), tolerance)
        geometry = polygonal(geometry)
        if not geometry.is_empty:
            cleaned.append(Region(geometry, region.pixels, region.probability_sum))
    return cleaned


def vertex_count(regions: Iterable[Region]) -> int:
    """Vertices of every ring of every region (what a viewer has to draw)."""
    return sum(int(shapely.get_num_coordinates(region.geometry)) for region in regions)


def open_mask_level(path: str | Path, level: int = 0) -> Any:
    """A lazily read (H, W) uint8 zarr array of one pyramid level of a (pyramidal) TIFF such as ``mask.tif``.

    Raises:
        UserInputError: the file is missing or not a readable single-channel TIFF.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"mask '{path}' does not exist: run wsiseg-predict for this slide first")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            levels = len(series.levels)
        store = tifffile.imread(path, aszarr=True, level=min(level, levels - 1))
        array = zarr.open(store, mode="r")
        if isinstance(array, zarr.Group):
            array = array["0"]
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError) as exc:
        raise UserInputError(f"mask '{path}' cannot be read as a TIFF ({exc}): re-run wsiseg-predict") from None
    if array.ndim != 2:
        raise UserInputError(f"mask '{path}' has shape {array.shape}; a single-channel (H, W) mask is expected")
    return array


def write_contours(
    mask_path: str | Path,
    out_dir: str | Path,
    formats: Sequence[str] = ("geojson",),
    threshold: float = 0.5,
    min_area_um2: float = 0.0,
    level0_per_mask_px: float = 1.0,
    mpp: float | None = None,
    level0_size: tuple[int, int] | None = None,
    labels: bool = False,
    chunk: int = 2048,
    simplify_um: float | None = None,
) -> dict[str, Any]:
    """Trace ``mask_path`` (``mask.tif``) chunk by chunk and write ``tumour.geojson`` / ``tumour.xml`` to ``out_dir``.

    Args:
        mask_path: pyramidal uint8 mask (probability 0-255, or class labels with ``labels``); level 0 is traced.
        out_dir: folder for the contour files.
        formats: any of ``geojson``, ``asap_xml`` (see :func:`contour_formats`).
        threshold: probability at or above which a mask px is tumour (the same rounding as ``SlideWriter``).
        min_area_um2: regions, and holes in regions, smaller than this are dropped (holes filled); µm² when ``mpp`` is
            known, else level-0 px².
        level0_per_mask_px: level-0 px per mask px.
        mpp: microns per level-0 px, or None.
        level0_size: (W, H) of the slide's level 0, level-0 px; polygons are clipped to it.
        labels: the mask holds class labels (tumour = any non-zero label).
        chunk: tracing window side, mask px.
        simplify_um: simplification tolerance, µm (level-0 px without mpp), applied to the rings through the pixel
            edges' midpoints (:func:`simplify_regions`); None: half a mask px (it removes the pixel staircase; the
            polygons' area moves by under 0.5 %); 0: none (pixel edges).

    Returns:
        Fields for ``report.json``: ``tumour_regions``, ``largest_region_mm2``, ``tumour_regions_area_mm2`` (None
        without mpp), the same two areas in level-0 px², ``contour_files`` and ``contour_seconds`` (wall time of
        tracing, simplifying and writing).
    """
    started = time.perf_counter()
    formats = contour_formats(formats)
    out_dir = Path(out_dir)
    threshold_u8 = int(math.ceil(threshold * 255 - 1e-9))
    regions = trace_regions(open_mask_level(mask_path), threshold_u8, labels=labels, chunk=chunk)
    pixel_area = float(level0_per_mask_px) ** 2
    unit_area = pixel_area * (mpp * mpp if mpp else 1.0)
    dropped = [r for r in regions if r.pixels * unit_area < min_area_um2]
    regions = [r for r in regions if r.pixels * unit_area >= min_area_um2]
    if dropped:
        log.info("%s: dropped %d region(s) under %g %s", mask_path, len(dropped), min_area_um2, "µm²" if mpp else "px²")
    regions = scale_regions(regions, level0_per_mask_px, level0_size)
    per_um = 1.0 / mpp if mpp else 1.0  # level-0 px per µm (per level-0 px without mpp)
    tolerance = 0.5 * level0_per_mask_px if simplify_um is None else float(simplify_um) * per_um
    regions = simplify_regions(regions, min_area_um2 * per_um * per_um, tolerance, level0_per_mask_px)
    files, sizes = [], {}
    for fmt in formats:
        target = out_dir / CONTOUR_FILES[fmt]
        if fmt == "geojson":
            write_geojson(regions, target, level0_per_mask_px, mpp)
        else:
            write_asap_xml(regions, target)
        files.append(target.name)
        sizes[target.name] = target.stat().st_size
    areas_px2 = [r.pixels * pixel_area for r in regions]
    to_mm2 = None if not mpp else mpp * mpp * 1e-6
    return {
        "tumour_regions": len(regions),
        "largest_region_mm2": None if to_mm2 is None else (max(areas_px2, default=0.0) * to_mm2),
        "tumour_regions_area_mm2": None if to_mm2 is None else sum(areas_px2) * to_mm2,
        "largest_region_level0_px2": max(areas_px2, default=0.0),
        "tumour_regions_area_level0_px2": sum(areas_px2),
        "contour_min_area": min_area_um2,
        "contour_simplify_level0_px": round(tolerance, 6),
        "contour_vertices": vertex_count(regions),
        "contour_files": files,
        "contour_file_bytes": sizes,
        "contour_seconds": round(time.perf_counter() - started, 3),
    }
