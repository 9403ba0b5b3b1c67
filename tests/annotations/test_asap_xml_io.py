"""Reading ASAP XML ground truth (wsiseg.annotations.asap_xml): groups, exclusions, repairs, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import shapely

from tests.annotations.samples import CAMELYON_XML, write
from wsiseg.annotations.asap_xml import read_asap_xml
from wsiseg.errors import UserInputError


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
