"""Reading GeoJSON ground truth (wsiseg.annotations.geojson): holes, classes, QuPath variants, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.annotations.samples import write
from wsiseg.annotations.geojson import read_geojson
from wsiseg.errors import UserInputError


def qupath_feature(geometry: dict, name: str | None = "Tumor") -> dict:
    properties: dict = {"objectType": "annotation"}
    if name:
        properties["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def test_geojson_holes_classes_and_skipped_points(tmp_path: Path) -> None:
    with_hole = {
        "type": "Polygon",
        "coordinates": [
            [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]],
            [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]],
        ],
    }
    ignored = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    unclassified = {"type": "MultiPolygon", "coordinates": [[[[200, 0], [220, 0], [220, 20], [200, 20], [200, 0]]]]}
    collection = {
        "type": "FeatureCollection",
        "features": [
            qupath_feature(with_hole),
            qupath_feature(ignored, "Ignore"),
            qupath_feature(unclassified, None),
            qupath_feature({"type": "Point", "coordinates": [500, 500]}),
        ],
    }
    truth = read_geojson(write(tmp_path / "s.geojson", json.dumps(collection)))
    assert len(truth.positive) == 2 and len(truth.exclusion) == 1
    assert truth.tumour.area == 100 * 100 - 20 * 20 - 10 * 10 + 20 * 20
    # A bare list of features (older QuPath exports) reads the same.
    again = read_geojson(write(tmp_path / "l.json", json.dumps(collection["features"])))
    assert again.tumour.equals(truth.tumour)


def test_unparsable_geojson_names_file_and_line_or_element(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"bad\.geojson:3: invalid JSON"):
        read_geojson(write(tmp_path / "bad.geojson", '{"type": "FeatureCollection",\n "features": [\n  {"type": }]}'))
    bad_ring = {"type": "Polygon", "coordinates": [[[0, 0], [1]]]}
    text = json.dumps({"type": "FeatureCollection", "features": [qupath_feature(bad_ring, None)] * 2})
    with pytest.raises(UserInputError, match=r"bad2\.geojson: features\[0\]\.geometry: invalid Polygon"):
        read_geojson(write(tmp_path / "bad2.geojson", text))
    text = json.dumps({"type": "FeatureCollection", "features": [qupath_feature(None), {"geometry": {}}]})
    with pytest.raises(UserInputError, match=r"features\[1\] is not a GeoJSON Feature"):
        read_geojson(write(tmp_path / "bad3.geojson", text))
