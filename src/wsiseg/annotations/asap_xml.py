"""ASAP's annotation XML (``<ASAP_Annotations>``, also Camelyon16's format): read ground truth, write tumour regions.

Coordinates are level-0 px. ASAP polygons have no holes: the writer puts each hole into group ``Exclusion``, which the
reader (like every exclusion group, see :mod:`wsiseg.annotations.shapes`) subtracts again.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
import xml.parsers.expat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shapely.geometry import Polygon

from wsiseg.annotations.shapes import (
    DEFAULT_EXCLUDE,
    EXCLUSION_GROUP,
    TUMOUR_CLASS,
    GroundTruth,
    Region,
    is_excluded,
    polygon_parts,
    valid_polygons,
)
from wsiseg.atomic import atomic_path
from wsiseg.errors import UserInputError

__all__ = ["read_asap_xml", "write_asap_xml"]

log = logging.getLogger(__name__)

_AREA_TYPES = {"polygon", "spline", "rectangle"}
_ASAP_COLOURS = {TUMOUR_CLASS: "#c80000", EXCLUSION_GROUP: "#64fe2e"}


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
        polygons = valid_polygons(Polygon(points))
        target = truth.exclusion if is_excluded(annotation["group"], exclude) else truth.positive
        target.extend(polygons)
    return truth


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}".rstrip("0")


def write_asap_xml(regions: Sequence[Region], path: str | Path) -> None:
    """Write level-0-px ``regions`` in ASAP's annotation format (atomically).

    ASAP polygons have no holes: each outer ring becomes a ``Polygon`` in group ``Tumor``, each hole a ``Polygon`` in
    group ``Exclusion`` (the role Camelyon16's ``_2`` group plays), which :func:`read_asap_xml` subtracts again.
    """
    root = ET.Element("ASAP_Annotations")
    annotations = ET.SubElement(root, "Annotations")
    count = 0

    def add(ring: Any, group: str, name: str) -> None:
        nonlocal count
        element = ET.SubElement(
            annotations,
            "Annotation",
            {"Name": name, "Type": "Polygon", "PartOfGroup": group, "Color": _ASAP_COLOURS[group]},
        )
        coordinates = ET.SubElement(element, "Coordinates")
        for order, (x, y) in enumerate(list(ring.coords)[:-1]):
            ET.SubElement(coordinates, "Coordinate", {"Order": str(order), "X": _format(x), "Y": _format(y)})
        count += 1

    for number, region in enumerate(regions, 1):
        for part, polygon in enumerate(polygon_parts(region.geometry), 1):
            suffix = f"{number}" if len(polygon_parts(region.geometry)) == 1 else f"{number}.{part}"
            add(polygon.exterior, TUMOUR_CLASS, f"{TUMOUR_CLASS} {suffix}")
            for hole_number, hole in enumerate(polygon.interiors, 1):
                add(hole, EXCLUSION_GROUP, f"{EXCLUSION_GROUP} {suffix}.{hole_number}")
    groups = ET.SubElement(root, "AnnotationGroups")
    for group in (TUMOUR_CLASS, EXCLUSION_GROUP):
        element = ET.SubElement(groups, "Group", {"Name": group, "PartOfGroup": "None", "Color": _ASAP_COLOURS[group]})
        ET.SubElement(element, "Attributes")
    ET.indent(root)
    with atomic_path(path) as tmp:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
