"""Ground-truth annotations in: ASAP XML, GeoJSON (QuPath) and mask images, rasterised at an evaluation resolution.

Coordinate frames: annotation polygons are in **level-0 px** of the slide, pixel-edge frame (level-0 pixel (x, y) is
the square [x, x+1) × [y, y+1)). An evaluation grid has ``downsample`` level-0 px per px: eval pixel (j, i) covers
level-0 [j·d, (j+1)·d) × [i·d, (i+1)·d) and counts as inside a polygon when its centre ((j+½)·d, (i+½)·d) is.

Tumour = the union of the positive polygons minus the exclusion polygons. An exclusion polygon cuts only polygons
that are larger than itself, so a tumour island drawn inside an exclusion (a hole) is kept. Exclusion groups / classes
are matched case-insensitively: by default Camelyon16's ``_2``, ``Exclusion`` (what :mod:`wsiseg.contours` writes for
holes), ``Exclude``, ``Ignore`` and ``Normal``; everything else is tumour.

    truth = read_annotation(Path("annotations/tumor_001.xml"))
    mask = rasterise(truth.tumour, (3000, 2000), downsample=32)
"""

from __future__ import annotations

import json
import logging
import math
import xml.parsers.expat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import shapely
import tifffile
from PIL import Image
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry

from wsiseg.errors import UserInputError

__all__ = [
    "DEFAULT_EXCLUDE",
    "ANNOTATION_SUFFIXES",
    "MASK_SUFFIXES",
    "GroundTruth",
    "read_asap_xml",
    "read_geojson",
    "read_annotation",
    "read_mask_image",
    "find_annotation",
    "rasterise",
    "ground_truth_mask",
]

log = logging.getLogger(__name__)

DEFAULT_EXCLUDE = ("_2", "Exclusion", "Exclude", "Ignore", "Normal")
ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")
MASK_SUFFIXES = tuple(f"{tag}{ext}" for tag in ("_mask", "_tumour", "_tumor") for ext in (".tif", ".tiff", ".png"))
_AREA_TYPES = {"polygon", "spline", "rectangle"}


@dataclass
class GroundTruth:
    """Polygons read from one annotation file, level-0 px.

    Attributes:
        path: the file.
        positive: tumour polygons (valid; self-intersections repaired).
        exclusion: exclusion polygons, cut out of larger positive polygons.
    """

    path: Path
    positive: list[Polygon] = field(default_factory=list)
    exclusion: list[Polygon] = field(default_factory=list)

    @property
    def tumour(self) -> BaseGeometry:
        """Union of the positive polygons, each minus the exclusions smaller than itself that it intersects."""
        if not self.exclusion:
            return shapely.unary_union(self.positive) if self.positive else Polygon()
        tree = shapely.STRtree(self.exclusion)
        parts = []
        for polygon in self.positive:
            cuts = [
                self.exclusion[i]
                for i in tree.query(polygon, predicate="intersects")
                if self.exclusion[i].area < polygon.area
            ]
            parts.append(polygon.difference(shapely.unary_union(cuts)) if cuts else polygon)
        return shapely.unary_union(parts) if parts else Polygon()


def _valid_polygons(geometry: BaseGeometry) -> list[Polygon]:
    """Valid polygons of ``geometry`` (self-intersecting outlines are repaired, lines and points dropped)."""
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry, method="structure", keep_collapsed=False)
    polygons = []
    for part in shapely.get_parts(geometry):
        if isinstance(part, Polygon) and not part.is_empty:
            polygons.append(part)
        elif isinstance(part, MultiPolygon):
            polygons.extend(p for p in part.geoms if not p.is_empty)
    return polygons


def _is_excluded(name: str | None, exclude: Iterable[str]) -> bool:
    return name is not None and name.strip().lower() in {e.lower() for e in exclude}


def _number(text: str | None) -> float:
    """A coordinate attribute as float; accepts a decimal comma (some ASAP versions write one)."""
    if text is None:
        raise ValueError("missing")
    text = text.strip()
    if "," in text and "." not in text:
        text = text.replace(",", ".")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def read_asap_xml(path: str | Path, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> GroundTruth:
    """Read an ASAP annotation file (``<ASAP_Annotations><Annotations><Annotation PartOfGroup=...><Coordinates>``).

    ``Polygon``, ``Spline`` and ``Rectangle`` annotations are areas (their coordinates in ``Order`` are the outline);
    ``Dot`` / ``PointSet`` carry no area and are skipped, as are outlines with fewer than 3 points (with a warning).

    Raises:
        UserInputError: the file is not well-formed XML or not ASAP's format; the message names the file and line.
    """
    path = Path(path)
    parser = xml.parsers.expat.ParserCreate()
    truth = GroundTruth(path)
    state: dict[str, Any] = {"root": None, "annotation": None}
    annotations: list[dict[str, Any]] = []

    def where() -> str:
        return f"{path}:{parser.CurrentLineNumber}"

    def start(tag: str, attrs: dict[str, str]) -> None:
        if state["root"] is None:
            state["root"] = tag
            if tag != "ASAP_Annotations":
                raise UserInputError(
                    f"{where()}: root element is <{tag}>, not <ASAP_Annotations>: is this an ASAP annotation file?"
                )
        if tag == "Annotation":
            state["annotation"] = {
                "name": attrs.get("Name", f"#{len(annotations) + 1}"),
                "type": attrs.get("Type", "Polygon"),
                "group": attrs.get("PartOfGroup"),
                "line": parser.CurrentLineNumber,
                "points": [],
            }
            annotations.append(state["annotation"])
        elif tag == "Coordinate":
            annotation = state["annotation"]
            if annotation is None:
                raise UserInputError(f"{where()}: <Coordinate> outside an <Annotation> element")
            try:
                point = (_number(attrs.get("X")), _number(attrs.get("Y")))
                order = int(attrs.get("Order", len(annotation["points"])))
            except ValueError:
                raise UserInputError(
                    f"{where()}: <Coordinate> of annotation '{annotation['name']}' needs numeric X, Y (and integer "
                    f"Order); got X={attrs.get('X')!r} Y={attrs.get('Y')!r} Order={attrs.get('Order')!r}"
                ) from None
            annotation["points"].append((order, point))

    def end(tag: str) -> None:
        if tag == "Annotation":
            state["annotation"] = None

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        with path.open("rb") as handle:
            parser.ParseFile(handle)
    except xml.parsers.expat.ExpatError as exc:
        raise UserInputError(
            f"{path}:{exc.lineno}: not well-formed XML ({xml.parsers.expat.errors.messages[exc.code]}, column "
            f"{exc.offset + 1}): fix or re-export the annotation"
        ) from None
    except OSError as exc:
        raise UserInputError(f"annotation '{path}' cannot be read: {exc.strerror or exc}") from None
    if state["root"] is None:
        raise UserInputError(f"{path}:1: empty file, expected an ASAP annotation XML")
    for annotation in annotations:
        if annotation["type"].lower() not in _AREA_TYPES:
            continue
        points = [p for _, p in sorted(annotation["points"], key=lambda item: item[0])]
        if len(points) < 3:
            log.warning(
                "%s:%d: annotation '%s' has %d point(s); skipped (an area needs 3)",
                path,
                annotation["line"],
                annotation["name"],
                len(points),
            )
            continue
        polygons = _valid_polygons(Polygon(points))
        target = truth.exclusion if _is_excluded(annotation["group"], exclude) else truth.positive
        target.extend(polygons)
    return truth


def _geojson_class(properties: Any) -> str | None:
    if not isinstance(properties, dict):
        return None
    classification = properties.get("classification")
    if isinstance(classification, dict):
        return classification.get("name")
    if isinstance(classification, str):
        return classification
    return None


def read_geojson(path: str | Path, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> GroundTruth:
    """Read a GeoJSON FeatureCollection / Feature / geometry, or a list of features (older QuPath exports).

    Polygon and MultiPolygon geometries are areas (holes kept); points and lines are skipped. A feature is an
    exclusion when its QuPath ``classification`` name is in ``exclude``.

    Raises:
        UserInputError: invalid JSON (file, line and column) or a malformed element (file and element path, e.g.
            ``features[3].geometry``).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserInputError(
            f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno}): fix or re-export the annotation"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"annotation '{path}' cannot be read: {exc}") from None
    truth = GroundTruth(path)

    def add_geometry(geometry: Any, where: str, excluded: bool) -> None:
        if geometry is None:
            return
        if not isinstance(geometry, dict) or "type" not in geometry:
            raise UserInputError(f"{path}: {where} is not a GeoJSON geometry object (needs a 'type')")
        kind = geometry["type"]
        if kind == "GeometryCollection":
            for index, part in enumerate(geometry.get("geometries") or []):
                add_geometry(part, f"{where}.geometries[{index}]", excluded)
            return
        if kind not in ("Polygon", "MultiPolygon"):
            return
        try:
            parsed = shape(geometry)
        except Exception as exc:
            raise UserInputError(f"{path}: {where}: invalid {kind} coordinates ({exc})") from None
        (truth.exclusion if excluded else truth.positive).extend(_valid_polygons(parsed))

    def add_feature(feature: Any, where: str) -> None:
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise UserInputError(f'{path}: {where} is not a GeoJSON Feature (needs "type": "Feature")')
        if "geometry" not in feature:
            raise UserInputError(f"{path}: {where} has no 'geometry'")
        add_geometry(
            feature["geometry"], f"{where}.geometry", _is_excluded(_geojson_class(feature.get("properties")), exclude)
        )

    if isinstance(data, list):
        for index, feature in enumerate(data):
            add_feature(feature, f"[{index}]")
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise UserInputError(f"{path}: FeatureCollection has no 'features' list")
        for index, feature in enumerate(features):
            add_feature(feature, f"features[{index}]")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        add_feature(data, "Feature")
    elif isinstance(data, dict):
        add_geometry(data, "root", False)
    else:
        raise UserInputError(f"{path}: top-level JSON is a {type(data).__name__}, not a GeoJSON object")
    return truth


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
