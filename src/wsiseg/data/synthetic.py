"""Synthetic H&E-like whole-slide images with a known tumour mask (demo, tests, benchmarks).

A slide is defined by low-resolution label fields (tissue, tumour) drawn as random smooth blobs; pixels are rendered
tile by tile from those fields, so slides of any size (60,000² and more) are written with bounded memory. Normal
tissue is pink stroma with sparse small nuclei; tumour is darker with dense, large nuclei.

    wsiseg-synth outputs/demo/demo_slide.tif --width 8192 --height 6144 --seed 1
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import tifffile
from PIL import Image

from wsiseg.atomic import atomic_path

__all__ = ["SyntheticSlide", "write_synthetic_slide", "main"]

_BACKGROUND = np.array([244, 244, 246], np.float32)
_STROMA = np.array([236, 168, 200], np.float32)
_TUMOUR = np.array([196, 122, 182], np.float32)
_NUCLEUS_NORMAL = (120, 72, 165)
_NUCLEUS_TUMOUR = (70, 36, 118)


@dataclass(frozen=True)
class SyntheticSlide:
    """A procedural slide.

    Args:
        width: level-0 width, px.
        height: level-0 height, px.
        seed: random seed (layout and texture).
        tissue_blobs: number of tissue islands.
        tumour_blobs: number of tumour regions (placed inside tissue).
        tissue_scale: tissue island radius as a fraction of the shorter side.
        field_downsample: level-0 px per label-field px.
        mpp: microns per level-0 px recorded in the file.
    """

    width: int
    height: int
    seed: int = 0
    tissue_blobs: int = 3
    tumour_blobs: int = 3
    tissue_scale: float = 0.22
    field_downsample: int = 32
    mpp: float = 0.5

    def fields(self) -> tuple[np.ndarray, np.ndarray]:
        """(tissue, tumour) float32 fields in [0, 1] at ``field_downsample``; a pixel is in a class where > 0.5."""
        fw = math.ceil(self.width / self.field_downsample)
        fh = math.ceil(self.height / self.field_downsample)
        rng = np.random.default_rng(self.seed)
        tissue = np.zeros((fh, fw), np.float32)
        short = min(fw, fh)
        centres = []
        for _ in range(self.tissue_blobs):
            cx, cy = rng.uniform(0.2, 0.8) * fw, rng.uniform(0.2, 0.8) * fh
            axes = (
                max(2, int(short * self.tissue_scale * rng.uniform(0.7, 1.3))),
                max(2, int(short * self.tissue_scale * rng.uniform(0.5, 1.0))),
            )
            cv2.ellipse(tissue, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
            centres.append((cx, cy, min(axes)))
        tumour = np.zeros_like(tissue)
        for i in range(self.tumour_blobs):
            cx, cy, r = centres[i % len(centres)]
            ox, oy = rng.uniform(-0.4, 0.4, size=2) * r
            axes = (max(1, int(r * rng.uniform(0.25, 0.5))), max(1, int(r * rng.uniform(0.2, 0.4))))
            cv2.ellipse(tumour, (int(cx + ox), int(cy + oy)), axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
        blur = max(3, (short // 40) | 1)
        noise = cv2.GaussianBlur(rng.uniform(-0.35, 0.35, (fh, fw)).astype(np.float32), (0, 0), blur / 2 + 1)
        tissue = cv2.GaussianBlur(tissue, (blur, blur), 0) + noise
        tumour = cv2.GaussianBlur(tumour, (blur, blur), 0) + noise * 0.5
        tumour = np.minimum(tumour, tissue)
        return np.clip(tissue, 0, 1), np.clip(tumour, 0, 1)

    def sample(self, field: np.ndarray, x0: float, y0: float, w: int, h: int, downsample: float) -> np.ndarray:
        """Bilinear sample of a label field over a (h, w) region whose origin (x0, y0) is in px of a level with
        ``downsample`` level-0 px per px."""
        scale = downsample / self.field_downsample
        xs = ((x0 + np.arange(w, dtype=np.float32) + 0.5) * scale - 0.5).astype(np.float32)
        ys = ((y0 + np.arange(h, dtype=np.float32) + 0.5) * scale - 0.5).astype(np.float32)
        map_x = np.broadcast_to(xs[None, :], (h, w)).copy()
        map_y = np.broadcast_to(ys[:, None], (h, w)).copy()
        return cv2.remap(field, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def ground_truth(self, downsample: float, size: tuple[int, int] | None = None) -> np.ndarray:
        """Boolean tumour mask at ``downsample`` level-0 px per px, of ``size`` (W, H) (default: rounded up)."""
        _, tumour = self.fields()
        w, h = size or (math.ceil(self.width / downsample), math.ceil(self.height / downsample))
        return self.sample(tumour, 0, 0, w, h, downsample) > 0.5

    def is_background(self, tissue: np.ndarray, x0: int, y0: int, w: int, h: int, downsample: float) -> bool:
        """True when no pixel of the region can be tissue: bilinear samples never exceed their neighbours, so a field
        window at or below 0.5 means pure background (checked on the low-resolution field, no rendering)."""
        scale = downsample / self.field_downsample
        fx0, fy0 = max(0, int(x0 * scale) - 1), max(0, int(y0 * scale) - 1)
        fx1, fy1 = int((x0 + w) * scale) + 2, int((y0 + h) * scale) + 2
        window = tissue[fy0:fy1, fx0:fx1]
        return window.size == 0 or float(window.max()) <= 0.5

    def render(
        self, fields: tuple[np.ndarray, np.ndarray], x0: int, y0: int, w: int, h: int, downsample: float
    ) -> np.ndarray:
        """(h, w, 3) uint8 RGB of a region at a level with ``downsample``; origin (x0, y0) in that level's px."""
        tissue_f, tumour_f = fields
        tissue = None
        if not self.is_background(tissue_f, x0, y0, w, h, downsample):
            tissue = self.sample(tissue_f, x0, y0, w, h, downsample) > 0.5
        if tissue is None or not tissue.any():
            return np.broadcast_to(_BACKGROUND.astype(np.uint8), (h, w, 3)).copy()
        tumour = (self.sample(tumour_f, x0, y0, w, h, downsample) > 0.5) & tissue
        rng = np.random.default_rng([self.seed, int(downsample * 16), x0, y0])
        image = np.where(tumour[..., None], _TUMOUR, np.where(tissue[..., None], _STROMA, _BACKGROUND)).astype(
            np.float32
        )
        texture = cv2.GaussianBlur(rng.normal(0, 6, (h, w)).astype(np.float32), (0, 0), 1.5)
        image += (texture * tissue)[..., None]
        image = np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8))
        area = w * h * downsample * downsample
        for is_tumour, density, radius, colour in (
            (False, 1 / 900, 3.5, _NUCLEUS_NORMAL),
            (True, 1 / 140, 6.0, _NUCLEUS_TUMOUR),
        ):
            count = rng.poisson(area * density)
            xs = rng.integers(0, w, count)
            ys = rng.integers(0, h, count)
            for x, y in zip(xs, ys):
                if tumour[y, x] != is_tumour or not tissue[y, x]:
                    continue
                r = radius * rng.uniform(0.7, 1.3) / downsample
                if r < 0.6:
                    image[y, x] = colour
                else:
                    cv2.circle(image, (int(x), int(y)), max(1, int(round(r))), colour, -1, lineType=cv2.LINE_AA)
        noise = rng.normal(0, 3, image.shape).astype(np.float32)
        return np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def _level_sizes(width: int, height: int, factor: int, min_side: int) -> list[tuple[int, int, int]]:
    levels = [(width, height, 1)]
    while max(levels[-1][:2]) > min_side:
        ds = levels[-1][2] * factor
        levels.append((math.ceil(width / ds), math.ceil(height / ds), ds))
    return levels


def write_synthetic_slide(
    path: str | Path,
    slide: SyntheticSlide,
    tile: int = 256,
    quality: int = 90,
    level_factor: int = 4,
    ground_truth_downsample: int = 16,
) -> Path:
    """Write ``slide`` as a pyramidal JPEG-tiled TIFF (levels ×``level_factor``) plus ``<stem>_tumour.png``, the
    ground-truth tumour mask at ``ground_truth_downsample``. Returns the TIFF path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = slide.fields()
    blank = imagecodecs.jpeg_encode(
        np.broadcast_to(_BACKGROUND.astype(np.uint8), (tile, tile, 3)).copy(), level=quality
    )
    pixels_per_cm = 1e4 / slide.mpp

    def tiles(width: int, height: int, ds: int) -> Iterator[bytes]:
        for ty in range(0, height, tile):
            for tx in range(0, width, tile):
                if slide.is_background(fields[0], tx, ty, tile, tile, ds):
                    yield blank
                else:
                    yield imagecodecs.jpeg_encode(slide.render(fields, tx, ty, tile, tile, ds), level=quality)

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=slide.width * slide.height > 2**31) as tiff:
        for index, (w, h, ds) in enumerate(_level_sizes(slide.width, slide.height, level_factor, 1024)):
            tiff.write(
                tiles(w, h, ds),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="jpeg",
                photometric="rgb",
                subfiletype=0 if index == 0 else 1,
                resolution=(pixels_per_cm / ds, pixels_per_cm / ds),
                resolutionunit="CENTIMETER",
                description=f"wsiseg synthetic slide seed={slide.seed}" if index == 0 else None,
                metadata=None,
            )
    truth = slide.ground_truth(ground_truth_downsample)
    with atomic_path(path.with_name(f"{path.name.split('.')[0]}_tumour.png")) as tmp:
        Image.fromarray((truth * 255).astype(np.uint8)).save(tmp, format="PNG")
    return path


def main(argv: list[str] | None = None) -> None:
    """``wsiseg-synth``: write a synthetic slide."""
    parser = argparse.ArgumentParser(prog="wsiseg-synth", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--height", type=int, default=6144)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tissue-blobs", type=int, default=3)
    parser.add_argument("--tumour-blobs", type=int, default=3)
    parser.add_argument("--tissue-scale", type=float, default=0.22)
    parser.add_argument("--skip-existing", action="store_true", help="do nothing if the file exists")
    args = parser.parse_args(argv)
    if args.skip_existing and args.path.exists():
        print(f"{args.path} exists; kept")
        return
    problem = _argument_problem(args)
    if problem:
        parser.exit(2, f"wsiseg-synth: error: {problem}\n")
    spec = SyntheticSlide(args.width, args.height, args.seed, args.tissue_blobs, args.tumour_blobs, args.tissue_scale)
    try:
        args.path.parent.mkdir(parents=True, exist_ok=True)  # the folder is made as for any output (make demo)
        write_synthetic_slide(args.path, spec)
    except OSError as exc:
        parser.exit(2, f"wsiseg-synth: error: cannot write '{args.path}': {exc.strerror or exc}\n")
    print(f"wrote {args.path}")


def _argument_problem(args: argparse.Namespace) -> str | None:
    """Why ``wsiseg-synth``'s arguments cannot make a slide (one line naming the option), else None."""
    for option in ("width", "height"):
        if getattr(args, option) < 64:
            return f"--{option} must be at least 64 px, got {getattr(args, option)}"
    if args.tissue_blobs < 1:
        return f"--tissue-blobs must be at least 1 (a slide needs tissue), got {args.tissue_blobs}"
    if args.tumour_blobs < 0:
        return f"--tumour-blobs must be >= 0, got {args.tumour_blobs}"
    if not 0 < args.tissue_scale <= 1:
        return f"--tissue-scale must be in (0, 1] (island radius / shorter side), got {args.tissue_scale}"
    if args.path.is_dir():
        return f"'{args.path}' is a folder: give a file name, e.g. {args.path / 'slide.tif'}"
    return None


if __name__ == "__main__":
    main()
