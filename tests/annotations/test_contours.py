"""Contour tracing (wsiseg.annotations.contours): round trip, chunk merging, measurements, GeoJSON / ASAP XML output."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from wsiseg.annotations.asap_xml import read_asap_xml
from wsiseg.annotations.contours import contour_formats, scale_regions, trace_regions, write_contours
from wsiseg.annotations.geojson import read_geojson
from wsiseg.annotations.ground_truth import rasterise
from wsiseg.data.synthetic import SyntheticSlide
from wsiseg.errors import UserInputError
from wsiseg.writers.tiff import write_pyramid_tiff

LEVEL0 = (2000, 1500)
PER_MASK_PX = 4


def write_mask(path: Path, values: np.ndarray, mpp: float | None = None, labels: bool = False) -> Path:
    """Write ``values`` (uint8, mask px) with the SlideWriter's own TIFF writer."""
    write_pyramid_tiff(
        path, [values], (values.shape[1], values.shape[0]), path.parent / ".scratch", mpp, labels=labels, tile=64
    )
    return path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    """The conftest slide's tumour mask at 4 level-0 px per px (500 × 375)."""
    return SyntheticSlide(*LEVEL0, seed=7).ground_truth(PER_MASK_PX)


def test_round_trip_of_ground_truth_through_geojson_and_asap_xml(tmp_path: Path, truth: np.ndarray) -> None:
    mask = write_mask(tmp_path / "mask.tif", truth.astype(np.uint8) * 255, mpp=2.0)
    report = write_contours(
        mask,
        tmp_path,
        ["geojson", "asap_xml"],
        level0_per_mask_px=PER_MASK_PX,
        mpp=0.5,
        level0_size=LEVEL0,
        chunk=128,
    )
    components = cv2.connectedComponents(truth.astype(np.uint8), connectivity=8)[0] - 1
    assert report["tumour_regions"] == components >= 2
    features = json.loads((tmp_path / "tumour.geojson").read_text())["features"]
    assert len(features) == components
    # The test is about chunk merging only if some region spans a 128-px chunk border (in level-0 px: 512).
    spans = [shape(f["geometry"]).bounds for f in features]
    assert any(
        int(x0 // 512) != int((x1 - 1) // 512) or int(y0 // 512) != int((y1 - 1) // 512) for x0, y0, x1, y1 in spans
    )
    size = (truth.shape[1], truth.shape[0])
    for reader, name in ((read_geojson, "tumour.geojson"), (read_asap_xml, "tumour.xml")):
        back = rasterise(reader(tmp_path / name).tumour, size, PER_MASK_PX)
        score = dice(back, truth)
        print(f"round trip via {name}: Dice {score:.4f}")
        assert score >= 0.99


def test_geojson_is_a_valid_qupath_feature_collection_inside_the_slide(tmp_path: Path, truth: np.ndarray) -> None:
    mask = write_mask(tmp_path / "mask.tif", truth.astype(np.uint8) * 255, mpp=2.0)
    write_contours(
        mask, tmp_path, "geojson", level0_per_mask_px=PER_MASK_PX, mpp=0.5, level0_size=LEVEL0, chunk=128, simplify_um=0
    )
    collection = json.loads((tmp_path / "tumour.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    slide = shapely.box(0, 0, *LEVEL0)
    total = 0.0
    for feature in collection["features"]:
        assert feature["type"] == "Feature"
        geometry = shape(feature["geometry"])
        assert feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
        assert geometry.is_valid and not geometry.is_empty
        assert slide.contains(geometry)
        properties = feature["properties"]
        assert properties["objectType"] == "annotation"
        assert properties["classification"]["name"] == "Tumor"
        assert len(properties["classification"]["color"]) == 3
        measurements = properties["measurements"]
        assert measurements["Mean probability"] == 1.0
        total += measurements["Area µm^2"]
        # The polygon follows pixel edges (concave corners cut by half a pixel): its area matches the pixel count.
        assert geometry.area * 0.25 == pytest.approx(measurements["Area µm^2"], rel=0.01)
    assert total == pytest.approx(np.count_nonzero(truth) * (PER_MASK_PX * 0.5) ** 2)


def test_chunk_size_does_not_change_the_regions() -> None:
    rng = np.random.default_rng(3)
    noise = cv2.GaussianBlur(rng.random((300, 420)).astype(np.float32), (0, 0), 2.0)
    values = np.clip((noise - noise.min()) / (noise.max() - noise.min()) * 255, 0, 255).astype(np.uint8)
    whole = trace_regions(values, 128, chunk=4096)
    chunked = trace_regions(values, 128, chunk=32)
    assert len(whole) > 20
    assert len(chunked) == len(whole)
    assert sorted(r.pixels for r in chunked) == sorted(r.pixels for r in whole)
    assert sorted(round(r.mean_probability, 9) for r in chunked) == sorted(round(r.mean_probability, 9) for r in whole)
    assert all(r.geometry.is_valid for r in chunked)
    positive = values >= 128
    for regions in (whole, chunked):
        back = rasterise(shapely.unary_union([r.geometry for r in regions]), (420, 300), 1.0)
        assert np.array_equal(back, positive)


def probability_scene() -> np.ndarray:
    """Hand-made probability mask (mask px) whose regions straddle 32-px chunk borders."""
    values = np.zeros((96, 96), np.uint8)
    values[10:50, 20:60] = 200  # 40 × 40 ring ...
    values[25:35, 35:45] = 0  # ... with a 10 × 10 hole: 1500 px, crosses the borders x=32 and y=32
    values[60:66, 60:66] = 255  # 36 px square, crosses x=64 and y=64
    values[80:82, 10:12] = 140  # 4 px island
    values[85, 40] = values[86, 41] = 255  # two pixels touching at a corner: one 8-connected region
    values[70:75, 20:25] = 127  # just under the threshold (127 < ceil(0.5 · 255) = 128): not tumour
    return values


def test_measurements_holes_and_min_area(tmp_path: Path) -> None:
    mask = write_mask(tmp_path / "mask.tif", probability_scene())
    # 2 level-0 px per mask px at 0.5 µm per level-0 px: one mask px is 1 µm².
    report = write_contours(
        mask, tmp_path, "geojson", min_area_um2=5.0, level0_per_mask_px=2, mpp=0.5, chunk=32, simplify_um=0
    )
    assert report["tumour_regions"] == 2
    assert report["largest_region_mm2"] == pytest.approx(1500e-6)
    assert report["tumour_regions_area_mm2"] == pytest.approx(1536e-6)
    features = json.loads((tmp_path / "tumour.geojson").read_text())["features"]
    ring, square = (shape(f["geometry"]) for f in features)
    assert features[0]["properties"]["measurements"] == {"Area µm^2": 1500.0, "Mean probability": round(200 / 255, 4)}
    assert features[1]["properties"]["measurements"] == {"Area µm^2": 36.0, "Mean probability": 1.0}
    assert ring.geom_type == "Polygon" and len(ring.interiors) == 1
    assert ring.bounds == (40.0, 20.0, 120.0, 100.0)  # level-0 px: mask px × 2, along pixel edges
    # 20 × 20 level-0 px hole less its 4 corners, each cut by a half-pixel diagonal (½ · 1² level-0 px²).
    assert shapely.Polygon(ring.interiors[0]).area == 400 - 4 * 0.5
    assert square.bounds == (120.0, 120.0, 132.0, 132.0)

    everything = write_contours(mask, tmp_path, "geojson", level0_per_mask_px=2, mpp=0.5, chunk=32, simplify_um=0)
    assert everything["tumour_regions"] == 4
    features = json.loads((tmp_path / "tumour.geojson").read_text())["features"]
    corner_pair = shape(features[-1]["geometry"])
    assert corner_pair.is_valid
    assert np.array_equal(np.argwhere(rasterise(corner_pair, (96, 96), 2)), [[85, 40], [86, 41]])
    assert features[-1]["properties"]["measurements"]["Area µm^2"] == 2.0


def test_without_mpp_min_area_and_measurements_are_level0_px2(tmp_path: Path) -> None:
    mask = write_mask(tmp_path / "mask.tif", probability_scene())
    report = write_contours(mask, tmp_path, "geojson", min_area_um2=100.0, level0_per_mask_px=3, mpp=None, chunk=32)
    # In level-0 px² (9 per mask px): ring 13500, square 324 stay; island 36 and corner pair 18 go.
    assert report["tumour_regions"] == 2
    assert report["largest_region_mm2"] is None
    assert report["largest_region_level0_px2"] == 13500
    features = json.loads((tmp_path / "tumour.geojson").read_text())["features"]
    assert features[1]["properties"]["measurements"]["Area px^2"] == 324.0


def test_class_label_masks_trace_every_non_zero_label(tmp_path: Path) -> None:
    values = np.zeros((64, 64), np.uint8)
    values[5:15, 5:15] = 1
    values[40:50, 30:60] = 2
    mask = write_mask(tmp_path / "mask.tif", values, labels=True)
    report = write_contours(mask, tmp_path, "geojson", labels=True, chunk=32)
    assert report["tumour_regions"] == 2
    features = json.loads((tmp_path / "tumour.geojson").read_text())["features"]
    assert [f["properties"]["measurements"] for f in features] == [{"Area px^2": 300.0}, {"Area px^2": 100.0}]


def test_asap_xml_puts_holes_in_an_exclusion_group(tmp_path: Path) -> None:
    mask = write_mask(tmp_path / "mask.tif", probability_scene())
    write_contours(
        mask, tmp_path, ["asap_xml"], min_area_um2=5.0, level0_per_mask_px=2, mpp=0.5, chunk=32, simplify_um=0
    )
    root = ET.parse(tmp_path / "tumour.xml").getroot()
    groups = [a.get("PartOfGroup") for a in root.iter("Annotation")]
    assert groups == ["Tumor", "Exclusion", "Tumor"]
    assert {g.get("Name") for g in root.iter("Group")} == {"Tumor", "Exclusion"}
    hole = [a for a in root.iter("Annotation") if a.get("PartOfGroup") == "Exclusion"][0]
    xs = [float(c.get("X")) for c in hole.iter("Coordinate")]
    assert min(xs) == 70 and max(xs) == 90  # mask px 35..45 × 2
    assert not (tmp_path / "tumour.geojson").exists()


def test_scale_regions_clips_to_the_slide() -> None:
    values = np.zeros((10, 10), np.uint8)
    values[6:10, 6:10] = 255
    regions = scale_regions(trace_regions(values, 128), 4, level0_size=(37, 35))
    assert regions[0].geometry.bounds == (24.0, 24.0, 37.0, 35.0)


def test_contour_formats() -> None:
    assert contour_formats(None) == contour_formats("none") == contour_formats([]) == ()
    assert contour_formats("geojson") == ("geojson",)
    assert contour_formats("geojson,asap_xml") == contour_formats(["asap_xml", "geojson"])[::-1]
    with pytest.raises(UserInputError, match="writer.contours: unknown format 'shp'"):
        contour_formats(["geojson", "shp"])


@pytest.mark.parametrize(("min_area", "holes"), [(50.0, 1), (200.0, 0)])
def test_min_area_also_fills_smaller_holes_and_simplified_rings_stay_valid(
    tmp_path: Path, min_area: float, holes: int
) -> None:
    """The ring's hole is 10 x 10 µm (100 µm² less its cut corners): kept under a 50 µm² limit, filled under 200.
    Simplified (the default: half a mask px) the polygons stay valid and keep their shape: straight edges stay on
    their line (a square is not turned into the diamond through its sides' midpoints), corners are cut by at most
    one mask px, so the area moves by under 0.5 %."""
    mask = write_mask(tmp_path / "mask.tif", probability_scene())
    exact = write_contours(
        mask, tmp_path, "geojson", min_area_um2=min_area, level0_per_mask_px=2, mpp=0.5, simplify_um=0
    )
    exact_ring = shape(json.loads((tmp_path / "tumour.geojson").read_text())["features"][0]["geometry"])
    report = write_contours(mask, tmp_path, "geojson", min_area_um2=min_area, level0_per_mask_px=2, mpp=0.5)
    features = json.loads((tmp_path / "tumour.geojson").read_text())["features"]
    ring = shape(features[0]["geometry"])
    assert ring.is_valid and len(ring.interiors) == holes
    assert report["tumour_regions"] == exact["tumour_regions"] == 1  # the ring; the 36 µm² square is dropped
    assert abs(ring.area - exact_ring.area) < 0.005 * exact_ring.area and ring.hausdorff_distance(exact_ring) <= 1.0
    assert ring.bounds == exact_ring.bounds  # the straight sides stay where the pixel edges are
    assert report["contour_simplify_level0_px"] == 1.0  # half a mask px of 2 level-0 px
    assert ring.hausdorff_distance(exact_ring) > 0  # simplified: the corners were cut
    assert features[0]["properties"]["measurements"]["Area µm^2"] == 1500.0  # areas count mask px, not the ring


def test_simplified_staircases_have_fewer_vertices_and_many_holes_stay_valid(tmp_path: Path) -> None:
    """A disc's pixel staircase, pierced by 400 one-to-four-pixel holes (in mask px: what a noisy map gives): the
    simplified contours are valid, keep every hole the area floor keeps, hold far fewer vertices than the pixel edges
    and move the area by under 0.5 %."""
    rng = np.random.default_rng(3)
    probs = np.zeros((400, 400), np.uint8)
    cv2.circle(probs, (200, 200), 180, 255, -1)
    for x, y in rng.integers(60, 340, (400, 2)):
        probs[y : y + rng.integers(1, 3), x : x + rng.integers(1, 3)] = 0
    mask = write_mask(tmp_path / "mask.tif", probs)
    exact = write_contours(mask, tmp_path, "geojson", level0_per_mask_px=1, mpp=0.5, simplify_um=0)
    exact_geometry = shape(json.loads((tmp_path / "tumour.geojson").read_text())["features"][0]["geometry"])
    report = write_contours(mask, tmp_path, "geojson", level0_per_mask_px=1, mpp=0.5)
    geometry = shape(json.loads((tmp_path / "tumour.geojson").read_text())["features"][0]["geometry"])
    assert geometry.is_valid and len(geometry.interiors) == len(exact_geometry.interiors) > 300
    assert report["contour_vertices"] < 0.8 * exact["contour_vertices"]
    assert abs(geometry.area - exact_geometry.area) < 0.005 * exact_geometry.area
