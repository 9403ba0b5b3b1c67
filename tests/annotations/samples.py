"""Annotation files shared by the annotation tests."""

from __future__ import annotations

from pathlib import Path

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
