"""The images of patch-folder mode and how each is cut into pieces the network takes: listing, naming, header reads,
decoding and the piece/batch plan, as plain functions (frames: **image px**, origin at the top-left of the image).

* an image no larger than ``patch_size`` on either side is one piece, padded at the bottom/right to a multiple of the
  network's stride (a ``patch_size`` × ``patch_size`` image is therefore one unpadded piece);
* a larger image is tiled like a slide level (:class:`wsiseg.data.grid.TileGrid`: ``patch_size`` tiles with
  ``overlap``, the last row/column padded past the edge) and the writer blends the tiles back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from wsiseg.data.grid import TileGrid
from wsiseg.data.slide import rgba_to_rgb
from wsiseg.errors import UserInputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "PatchImage",
    "cut_piece",
    "list_images",
    "load_rgb",
    "output_keys",
    "plan_batches",
    "plan_pieces",
    "read_header",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# PIL modes with 8 bits per channel that convert to RGB without guessing a value range.
_RGB_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


@dataclass(frozen=True)
class PatchImage:
    """One input image and the pieces it is cut into.

    Attributes:
        path: the file.
        rel: its path relative to ``input_dir`` (POSIX separators).
        key: output name relative to ``output_dir``, without the ``_heatmap.png`` / ``_mask.png`` ending: ``rel``
            without its extension (with it, when two inputs of one folder share a stem).
        size: (W, H) image px.
        origins: (K, 2) int64 piece origins (x, y), image px, raster order.
        piece: (h, w) shape of every piece, px (bottom/right padded past the image).
        mtime: the file's modification time, s since the epoch.
        stamp: ``<size in bytes>:<mtime in ns>`` of the file when planned: a resumed run redoes an image whose file
            changed, even with its modification time set back.
    """

    path: Path
    rel: str
    key: str
    size: tuple[int, int]
    origins: np.ndarray
    piece: tuple[int, int]
    mtime: float
    stamp: str = ""

    @property
    def tiled(self) -> bool:
        """True when the image is larger than one patch and its pieces are blended back."""
        return len(self.origins) > 1


def _round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


def plan_pieces(
    size: tuple[int, int], patch_size: int, overlap: int, multiple: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """Pieces of an image of ``size`` (W, H) image px: ``(origins (K, 2) int64 (x, y), (h, w) piece shape)``.

    An image with both sides ``<= patch_size`` is one piece at (0, 0) padded up to multiples of ``multiple`` px; a
    larger one is tiled by ``TileGrid(size, patch_size, overlap)`` with ``patch_size`` × ``patch_size`` pieces.

    Example::

        >>> plan_pieces((100, 70), 256, 0, 16)[1]
        (80, 112)
        >>> plan_pieces((300, 200), 256, 0, 16)[0].tolist()
        [[0, 0], [256, 0]]
    """
    width, height = size
    if width <= patch_size and height <= patch_size:
        return np.zeros((1, 2), np.int64), (_round_up(height, multiple), _round_up(width, multiple))
    return TileGrid((width, height), patch_size, overlap).origins(), (patch_size, patch_size)


def plan_batches(images: Sequence[PatchImage], indices: Iterable[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """Group the pieces of ``images[i]`` for ``i`` in ``indices`` into batches of one piece shape.

    Pieces are visited in image order; each shape fills its own open batch, which is emitted as soon as it holds
    ``batch_size`` pieces. Unfilled batches follow at the end, in order of their first piece. Every piece appears
    exactly once and the plan depends only on the inputs (deterministic).

    Returns:
        batches of ``(image index, piece index)`` pairs.
    """
    open_batches: dict[tuple[int, int], list[tuple[int, int]]] = {}
    batches: list[list[tuple[int, int]]] = []
    for index in indices:
        image = images[index]
        for piece_index in range(len(image.origins)):
            batch = open_batches.setdefault(image.piece, [])
            batch.append((index, piece_index))
            if len(batch) == batch_size:
                batches.append(batch)
                del open_batches[image.piece]
    batches.extend(open_batches.values())
    return batches


def list_images(input_dir: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under ``input_dir`` (recursively) whose extension is in ``extensions`` (case-insensitive).

    Hidden files and folders (name starting with ``.``: partial writes, ``.hydra``, macOS ``._*`` files) are left out.
    Sorted by relative POSIX path, so the order does not depend on the file system.
    """
    wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    found = []
    for path in input_dir.rglob("*"):
        rel = path.relative_to(input_dir)
        if path.suffix.lower() in wanted and not any(part.startswith(".") for part in rel.parts) and path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(input_dir).as_posix())


def output_keys(input_dir: Path, paths: Sequence[Path]) -> list[str]:
    """One output key per image, unique within the run: its path relative to ``input_dir`` without the extension, or
    with it when two images of one folder share a stem (``x.png`` and ``x.jpg`` become ``x.png`` and ``x.jpg``)."""
    stems: dict[str, int] = {}
    for path in paths:
        stem = path.relative_to(input_dir).with_suffix("").as_posix()
        stems[stem] = stems.get(stem, 0) + 1
    keys: list[str] = []
    taken: set[str] = set()
    for path in paths:
        rel = path.relative_to(input_dir).as_posix()
        stem = path.relative_to(input_dir).with_suffix("").as_posix()
        key = stem if stems[stem] == 1 and stem not in taken else rel
        n = 1
        while key in taken:  # only for names such as x.png next to x.png.jpg
            n += 1
            key = f"{rel}-{n}"
        taken.add(key)
        keys.append(key)
    return keys


def _check_mode(path: Path, mode: str) -> None:
    if mode not in _RGB_MODES:
        raise UserInputError(
            f"image '{path}' has pixel mode '{mode}' (16-bit, float or multi-channel), which patch mode does not "
            "read: convert it to 8-bit RGB"
        )


def read_header(path: Path) -> tuple[int, int]:
    """(W, H) of an image from its header (no pixel decoding).

    Raises:
        UserInputError: the file cannot be identified as an image, or its pixel mode is not 8-bit.
    """
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
    except Image.DecompressionBombError as exc:
        raise UserInputError(
            f"image '{path}' is too large for patch mode ({exc}): run it as a slide (data=slides)"
        ) from None
    except Exception as exc:  # PIL raises UnidentifiedImageError, SyntaxError, OSError... for broken files
        raise UserInputError(f"image '{path}' cannot be read: {type(exc).__name__}: {exc}") from None
    _check_mode(path, mode)
    return size


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image as (H, W, 3) uint8 RGB; transparent pixels are composited over white (as slides are).

    Multi-page files give their first page. EXIF orientation is not applied: the pixels are used as stored.

    Raises:
        UserInputError: the file cannot be decoded (truncated, corrupt) or its mode is not 8-bit.
    """
    try:
        with Image.open(path) as im:
            _check_mode(path, im.mode)
            im.load()
            if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
                return rgba_to_rgb(np.asarray(im.convert("RGBA")))
            return np.asarray(im.convert("RGB"))
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"image '{path}' cannot be decoded: {type(exc).__name__}: {exc}") from None


def cut_piece(rgb: np.ndarray, x: int, y: int, shape: tuple[int, int], pad: str) -> np.ndarray:
    """The ``shape`` (h, w) piece of ``rgb`` (H, W, 3) at image px (x, y), padded past the bottom/right edge with white
    (``pad='white'``) or the edge pixels (``pad='replicate'``)."""
    h, w = shape
    crop = rgb[y : y + h, x : x + w]
    ch, cw = crop.shape[:2]
    if (ch, cw) == (h, w):
        return crop
    if pad == "replicate":
        return np.pad(crop, ((0, h - ch), (0, w - cw), (0, 0)), mode="edge")
    out = np.full((h, w, 3), 255, np.uint8)
    out[:ch, :cw] = crop
    return out
