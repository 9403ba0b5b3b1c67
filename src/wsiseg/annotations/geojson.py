"""GeoJSON as QuPath imports and exports it: read ground truth, write tumour regions as annotation features.

Coordinates are level-0 px.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry import MultiPolygon, Polygon, mapping, shape
from shapely.geometry.polygon import orient

from wsiseg.annotations.shapes import (
    DEFAULT_EXCLUDE,
    TUMOUR_CLASS,
    GroundTruth,
    Region,
    is_excluded,
    polygon_parts,
    valid_polygons,
)
from wsiseg.atomic import atomic_path
from wsiseg.errors import UserInputError

__all__ = ["read_geojson", "write_geojson"]

_TUMOUR_RGB = (200, 0, 0)


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
        (truth.exclusion if excluded else truth.positive).extend(valid_polygons(parsed))

    def add_feature(feature: Any, where: str) -> None:
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise UserInputError(f'{path}: {where} is not a GeoJSON Feature (needs "type": "Feature")')
        if "geometry" not in feature:
            raise UserInputError(f"{path}: {where} has no 'geometry'")
        add_geometry(
            feature["geometry"], f"{where}.geometry", is_excluded(_geojson_class(feature.get("properties")), exclude)
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


def _area_measurement(region: Region, pixel_area: float, mpp: float | None) -> tuple[str, float]:
    """(measurement name, value): area in µm² when ``mpp`` (µm per level-0 px) is known, else level-0 px²."""
    area = region.pixels * pixel_area
    return ("Area µm^2", area * mpp * mpp) if mpp else ("Area px^2", area)


def write_geojson(
    regions: Sequence[Region], path: str | Path, level0_per_mask_px: float = 1.0, mpp: float | None = None
) -> None:
    """Write level-0-px ``regions`` as a QuPath-importable GeoJSON FeatureCollection (atomically).

    Each region is one annotation feature classified ``Tumor`` with measurements ``Area µm^2`` (``Area px^2`` when
    the slide has no mpp; counted from mask pixels) and ``Mean probability`` (probability masks only).

    Args:
        regions: regions in level-0 px (see :func:`scale_regions`).
        path: destination, usually ``<slide dir>/tumour.geojson``.
        level0_per_mask_px: level-0 px per mask px, to turn pixel counts into areas.
        mpp: microns per level-0 px, or None.
    """
    pixel_area = float(level0_per_mask_px) ** 2
    features = []
    for number, region in enumerate(regions, 1):
        geometry = region.geometry
        oriented = [orient(p, sign=1.0) for p in polygon_parts(geometry)]
        geometry = oriented[0] if isinstance(geometry, Polygon) else MultiPolygon(oriented)
        name, area = _area_measurement(region, pixel_area, mpp)
        measurements: dict[str, float] = {name: round(area, 3)}
        if region.mean_probability is not None:
            measurements["Mean probability"] = round(region.mean_probability, 4)
        features.append(
            {
                "type": "Feature",
                "geometry": mapping(geometry),
                "properties": {
                    "objectType": "annotation",
                    "name": f"{TUMOUR_CLASS} {number}",
                    "classification": {"name": TUMOUR_CLASS, "color": list(_TUMOUR_RGB)},
                    "isLocked": False,
                    "measurements": measurements,
                },
            }
        )
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}, default=_json_number) + "\n")


def _json_number(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")
