"""Polygons shared by the annotation readers and writers and by contour tracing.

Coordinate frames: annotation polygons are in **level-0 px** of the slide, pixel-edge frame (level-0 pixel (x, y) is
the square [x, x+1) × [y, y+1)); a traced :class:`Region` is in mask px until
:func:`wsiseg.annotations.contours.scale_regions` takes it to level-0 px.

Tumour = the union of the positive polygons minus the exclusion polygons. An exclusion polygon cuts only polygons
that are larger than itself, so a tumour island drawn inside an exclusion (a hole) is kept. Exclusion groups / classes
are matched case-insensitively: by default Camelyon16's ``_2``, ``Exclusion`` (what the ASAP XML writer uses for
holes), ``Exclude``, ``Ignore`` and ``Normal``; everything else is tumour.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

__all__ = [
    "DEFAULT_EXCLUDE",
    "TUMOUR_CLASS",
    "EXCLUSION_GROUP",
    "GroundTruth",
    "Region",
    "valid_polygons",
    "is_excluded",
    "polygonal",
    "polygon_parts",
]

DEFAULT_EXCLUDE = ("_2", "Exclusion", "Exclude", "Ignore", "Normal")
TUMOUR_CLASS = "Tumor"
EXCLUSION_GROUP = "Exclusion"


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


@dataclass
class Region:
    """One 8-connected tumour region.

    Attributes:
        geometry: Polygon or MultiPolygon (holes included); mask px, pixel-edge frame (see
            :mod:`wsiseg.annotations.contours`) — or level-0 px after
            :func:`~wsiseg.annotations.contours.scale_regions`.
        pixels: number of mask px in the region.
        probability_sum: sum of the region's probabilities (0-1); None for class-label masks.
    """

    geometry: BaseGeometry
    pixels: int
    probability_sum: float | None

    @property
    def mean_probability(self) -> float | None:
        return None if self.probability_sum is None else self.probability_sum / max(self.pixels, 1)


def valid_polygons(geometry: BaseGeometry) -> list[Polygon]:
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


def is_excluded(name: str | None, exclude: Iterable[str]) -> bool:
    """Whether the group / class ``name`` is one of ``exclude`` (case-insensitive)."""
    return name is not None and name.strip().lower() in {e.lower() for e in exclude}


def polygonal(geometry: BaseGeometry) -> BaseGeometry:
    """``geometry`` made valid, keeping only its polygonal parts (Polygon, MultiPolygon or empty)."""
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry, method="structure", keep_collapsed=False)
    if isinstance(geometry, (Polygon, MultiPolygon)):
        return geometry
    parts = [p for p in shapely.get_parts(geometry) if isinstance(p, (Polygon, MultiPolygon)) and not p.is_empty]
    polygons = [q for p in parts for q in (p.geoms if isinstance(p, MultiPolygon) else [p])]
    if not polygons:
        return Polygon()
    return polygons[0] if len(polygons) == 1 else MultiPolygon(polygons)


def polygon_parts(geometry: BaseGeometry) -> list[Polygon]:
    """The polygons of a Polygon or MultiPolygon."""
    return list(geometry.geoms) if isinstance(geometry, MultiPolygon) else [geometry]
