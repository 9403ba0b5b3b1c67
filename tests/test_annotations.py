"""Ground-truth readers (ASAP XML, GeoJSON, mask images) and rasterisation (wsiseg.annotations)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from PIL import Image

from wsiseg.annotations import (
    find_annotation,
    ground_truth_mask,
    rasterise,
    read_asap_xml,
    read_geojson,
    read_mask_image,
)
from wsiseg.errors import UserInputError

# Camelyon16 style: _0 and _1 are tumour, _2 is an exclusion; coordinates out of order (Order decides), a decimal
# comma, and a Dot annotation (no area).
CAMELYON_XML = """<?xml version="1.0"?>
<ASAP_Annotations>
\t<Annotations>
\t\t<Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
\t\t\t<Coordinates>
\t\t\t\t<Coordinate Order="0" X="100" Y="100" />
\t\t\t\t<Coordinate Order="2" X="500" Y="500" />
\t\t\t\t<Coordinate Order="1" X="500" Y="100" />
\t\t\t\t<Coordinate Order="3" X="100,0" Y="500" />
\t\t\t</Coordinates>
\t\t</Annotation>
\t\t<Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="_2" Color="#64FE2E">
\t\t\t<Coordinates>
\t\t\t\t<Coordinate Order="0" X="200" Y="200" />
\t\t\t\t<Coordinate Order="1" X="300" Y="200" />
\t\t\t\t<Coordinate Order="2" X="300" Y="300" />
\t\t\t\t<Coordinate Order="3" X="200" Y="300" />
\t\t\t</Coordinates>
\t\t</Annotation>
\t\t<Annotation Name="Annotation 2" Type="Spline" PartOfGroup="_1" Color="#F4FA58">
\t\t\t<Coordinates>
\t\t\t\t<Coordinate Order="0" X="600" Y="100" />
\t\t\t\t<Coordinate Order="1" X="880" Y="100" />
\t\t\t\t<Coordinate Order="2" X="600" Y="380" />
\t\t\t</Coordinates>
\t\t</Annotation>
\t\t<Annotation Name="Annotation 3" Type="Dot" PartOfGroup="_0" Color="#F4FA58">
\t\t\t<Coordinates>
\t\t\t\t<Coordinate Order="0" X="900" Y="900" />
\t\t\t</Coordinates>
\t\t</Annotation>
\t</Annotations>
\t<AnnotationGroups>
\t\t<Group Name="_0" PartOfGroup="None" Color="#ff0000"><Attributes /></Group>
\t\t<Group Name="_1" PartOfGroup="None" Color="#ff0000"><Attributes /></Group>
\t\t<Group Name="_2" PartOfGroup="None" Color="#00ff00"><Attributes /></Group>
\t</AnnotationGroups>
</ASAP_Annotations>
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_asap_xml_with_exclusion_group(tmp_path: Path) -> None:
    truth = read_asap_xml(write(tmp_path / "tumor_001.xml", CAMELYON_XML))
    square = shapely.box(100, 100, 500, 500)
    triangle = shapely.Polygon([(600, 100), (880, 100), (600, 380)])
    assert len(truth.positive) == 2 and len(truth.exclusion) == 1
    assert truth.positive[0].equals(square)
    assert truth.positive[1].equals(triangle)
    assert truth.exclusion[0].equals(shapely.box(200, 200, 300, 300))
    tumour = truth.tumour
    assert tumour.symmetric_difference(square.difference(shapely.box(200, 200, 300, 300)).union(triangle)).area == 0
    assert tumour.area == 400 * 400 - 100 * 100 + 280 * 280 / 2


def test_rasterised_annotation_matches_hand_counted_pixels(tmp_path: Path) -> None:
    path = write(tmp_path / "tumor_001.xml", CAMELYON_XML)
    mask = ground_truth_mask(path, (1000, 1000), 100)
    # Eval px (j, i) is in when its centre (100 j + 50, 100 i + 50) is: the square holds centres 150..450 (4 × 4),
    # less the excluded centre (250, 250); the triangle x + y < 980 holds (650, 150), (750, 150), (650, 250).
    expected = np.zeros((10, 10), bool)
    expected[1:5, 1:5] = True
    expected[2, 2] = False
    expected[1, 6] = expected[1, 7] = expected[2, 6] = True
    assert np.array_equal(mask, expected)


def test_tumour_island_inside_an_exclusion_is_kept(tmp_path: Path) -> None:
    island = CAMELYON_XML.replace(
        "\t</Annotations>",
        '\t\t<Annotation Name="island" Type="Polygon" PartOfGroup="_0"><Coordinates>'
        '<Coordinate Order="0" X="220" Y="220" /><Coordinate Order="1" X="280" Y="220" />'
        '<Coordinate Order="2" X="280" Y="280" /><Coordinate Order="3" X="220" Y="280" />'
        "</Coordinates></Annotation>\n\t</Annotations>",
    )
    tumour = read_asap_xml(write(tmp_path / "a.xml", island)).tumour
    assert tumour.contains(shapely.Point(250, 250))
    assert not tumour.contains(shapely.Point(210, 210))


def test_self_intersecting_outline_is_repaired(tmp_path: Path) -> None:
    bow_tie = CAMELYON_XML.replace('X="500" Y="500"', 'X="100" Y="500"').replace('X="100,0" Y="500"', 'X="500" Y="500"')
    truth = read_asap_xml(write(tmp_path / "a.xml", bow_tie))
    outline = truth.positive[:2]
    assert all(p.is_valid for p in truth.positive)
    # (100,100) (500,100) (100,500) (500,500): two triangles meeting at (300, 300), 2 × ½ · 400 · 200.
    assert sum(p.area for p in outline) == pytest.approx(80000)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            CAMELYON_XML.replace('X="100" Y="100"', 'X=100 Y="100"', 1),
            r"a\.xml:6: not well-formed XML \(not well-formed",
        ),
        (
            CAMELYON_XML.replace('X="300" Y="200"', 'X="3OO" Y="200"'),
            r"a\.xml:15: <Coordinate> of annotation 'Annotation 1'",
        ),
        ("<?xml version='1.0'?>\n<Annotations/>", r"a\.xml:2: root element is <Annotations>"),
        ("", r"a\.xml:1: not well-formed"),
    ],
)
def test_unparsable_asap_xml_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        read_asap_xml(write(tmp_path / "a.xml", text))


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


def test_rasterise_samples_pixel_centres_exactly() -> None:
    angles = np.linspace(0, 2 * np.pi, 23, endpoint=False)
    radii = np.where(np.arange(23) % 2, 180.0, 410.0)
    star = shapely.Polygon(np.c_[500 + radii * np.cos(angles), 470 + radii * np.sin(angles)])
    shape_ = star.difference(shapely.Point(500, 470).buffer(90))
    downsample, size = 3.7, (280, 260)
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]]
    expected = shapely.contains_xy(shape_, (xs + 0.5) * downsample, (ys + 0.5) * downsample)
    result = rasterise(shape_, size, downsample)
    assert expected.sum() > 1000
    assert np.array_equal(result, expected)


def test_mask_images_are_resampled_to_the_evaluation_grid(tmp_path: Path) -> None:
    # A 16-px-per-px mask of a 320 × 160 level 0: 20 × 10 px, tumour block at columns 4..11, rows 2..5.
    truth = np.zeros((10, 20), np.uint8)
    truth[2:6, 4:12] = 255
    png = tmp_path / "s_tumour.png"
    Image.fromarray(truth).save(png)
    assert np.array_equal(read_mask_image(png, (20, 10), (320, 160)), truth > 0)
    coarse = read_mask_image(png, (10, 5), (320, 160))  # 32 px per px: 2 × 2 blocks, half or more tumour counts
    expected = np.zeros((5, 10), bool)
    expected[1:3, 2:6] = True
    assert np.array_equal(coarse, expected)
    fine = read_mask_image(png, (40, 20), (320, 160))
    assert np.array_equal(fine, np.kron(truth > 0, np.ones((2, 2), bool)))
    # A pyramidal TIFF: the level matching the grid is read.
    tif = tmp_path / "s_mask.tif"
    with tifffile.TiffWriter(tif) as writer:
        writer.write(np.kron(truth, np.ones((4, 4), np.uint8)), subifds=1, tile=(16, 16))
        writer.write(truth, subfiletype=1, tile=(16, 16))
    assert np.array_equal(read_mask_image(tif, (20, 10), (320, 160)), truth > 0)


def test_find_annotation_by_stem(tmp_path: Path) -> None:
    assert find_annotation(tmp_path, ["s"]) is None
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "s_tumour.png")
    (tmp_path / "s.tif").write_bytes(b"slide, not a mask")
    assert find_annotation(tmp_path, ["s"]) == tmp_path / "s_tumour.png"
    write(tmp_path / "s.xml", CAMELYON_XML)
    assert find_annotation(tmp_path, ["other", "s"]) == tmp_path / "s.xml"
    assert not ground_truth_mask(None, (100, 50), 10).any()
    assert ground_truth_mask(None, (101, 50), 10).shape == (5, 11)
