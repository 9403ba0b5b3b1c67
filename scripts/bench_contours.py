"""Contour cost on a noisy map (issue 29): trace and simplify a disc of tumour with a share of its pixels flipped
(holes in it, specks around it), as ``write_contours`` does, and print the seconds of each step.

    .venv/bin/python scripts/bench_contours.py --height 2400 --width 3200 --noise 0.01
    env PYTHONPATH=<old checkout>/src .venv/bin/python scripts/bench_contours.py ...   # another version, same scene
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from wsiseg.annotations import contours
from wsiseg.annotations.shapes import polygon_parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--width", type=int, default=3200)
    parser.add_argument("--noise", type=float, default=0.01, help="share of the disc's pixels flipped to background")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    mask = np.zeros((args.height, args.width), np.uint8)
    cv2.circle(mask, (args.width // 2, args.height // 2), min(args.height, args.width) // 2 - 10, 255, -1)
    mask[rng.random(mask.shape) < args.noise] = 0
    mask[rng.random(mask.shape) < args.noise / 4] = 255
    start = time.perf_counter()
    regions = contours.trace_regions(mask, 128)
    traced = time.perf_counter() - start
    rings = sum(len(p.interiors) + 1 for r in regions for p in polygon_parts(r.geometry))
    scaled = contours.scale_regions(regions, 1.0)
    area = sum(r.geometry.area for r in scaled)
    start = time.perf_counter()
    simplified = contours.simplify_regions(scaled, 0.0, 0.5)
    seconds = time.perf_counter() - start
    change = 100 * (sum(r.geometry.area for r in simplified) - area) / area
    print(
        f"{len(regions)} regions, {rings} rings, {contours.vertex_count(regions)} vertices: trace {traced:.2f} s, "
        f"simplify {seconds:.2f} s -> {contours.vertex_count(simplified)} vertices, area {change:+.3f} %"
    )


if __name__ == "__main__":
    main()
