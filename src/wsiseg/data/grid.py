"""Tile-grid geometry as small pure functions.

Frames used throughout wsiseg:

* **level-0 px** — pixels of the slide's full-resolution level (what OpenSlide's ``read_region`` location takes);
* **read-level px** — pixels of the pyramid level the tiles are read from (``level``, downsample ``level_downsample``);
* **output px** — pixels of the stitched mask: read-level px divided by ``output_downsample``.

A grid covers the read level with ``patch_size`` tiles whose origins advance by ``step = patch_size - overlap``. The
last row/column of tiles may run past the level's edge: that part is padded on read (white) and cropped on write, so
no edge pixel is ever dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MAX_PATCH_SIZE",
    "check_patch_size",
    "TileGrid",
    "tile_origins",
    "output_size",
    "level0_location",
    "blend_window",
    "BLEND_MODES",
]

# The largest tile side wsiseg reads, px: a 8192² tile is 192 MiB of RGB and tens of GiB of a U-Net's activations; a
# larger one is a typo that would try to allocate far more than any machine has.
MAX_PATCH_SIZE = 8192


def check_patch_size(patch_size: object) -> None:
    """``data.patch_size`` is a positive integer of at most :data:`MAX_PATCH_SIZE` px.

    Raises:
        UserInputError: naming ``data.patch_size`` and the limit.
    """
    from wsiseg.errors import UserInputError

    if isinstance(patch_size, (str, bool)) or not isinstance(patch_size, int) or patch_size < 1:
        raise UserInputError(f"data.patch_size must be a positive integer, got {patch_size}")
    if patch_size > MAX_PATCH_SIZE:
        raise UserInputError(
            f"data.patch_size={patch_size} is larger than {MAX_PATCH_SIZE} px, the largest tile wsiseg reads (its "
            "pixels and the network's activations would not fit in memory): use 512-2048"
        )


BLEND_MODES = ("none", "linear", "gaussian")


def tile_origins(length: int, patch_size: int, overlap: int) -> list[int]:
    """Origins (read-level px) of tiles covering ``[0, length)`` along one axis.

    Origins are ``0, step, 2·step, …`` with ``step = patch_size - overlap``; the last tile is the first whose end
    reaches ``length`` (it may extend past the edge). A length shorter than a patch gets one tile.

    Raises:
        ValueError: ``length < 1``, ``patch_size < 1`` or ``overlap`` outside ``[0, patch_size)``.

    Example::

        >>> tile_origins(1000, 512, 64)
        [0, 448, 896]
        >>> tile_origins(1000, 256, 0)
        [0, 256, 512, 768]
    """
    if length < 1 or patch_size < 1:
        raise ValueError(f"length ({length}) and patch_size ({patch_size}) must be positive")
    if not 0 <= overlap < patch_size:
        raise ValueError(f"overlap must satisfy 0 <= overlap < patch_size, got overlap={overlap}, patch={patch_size}")
    step = patch_size - overlap
    count = 1 if length <= patch_size else math.ceil((length - patch_size) / step) + 1
    return [i * step for i in range(count)]


def output_size(level_size: tuple[int, int], output_downsample: int) -> tuple[int, int]:
    """Size (W, H) in output px of a read level of ``level_size`` (W, H) read-level px; partial blocks count."""
    return (math.ceil(level_size[0] / output_downsample), math.ceil(level_size[1] / output_downsample))


def level0_location(x_level: int, y_level: int, level_downsample: float) -> tuple[int, int]:
    """Level-0 px location for a read-level px origin (what ``OpenSlide.read_region`` expects).

    Exact for integer downsamples. For non-integer ones (e.g. 2.0005) OpenSlide itself places the read at a sub-pixel
    offset; rounding keeps that offset under half a read-level pixel.
    """
    return (int(round(x_level * level_downsample)), int(round(y_level * level_downsample)))


@dataclass(frozen=True)
class TileGrid:
    """The tile grid over one read level.

    Args:
        level_size: (W, H) of the read level, read-level px.
        patch_size: tile side, read-level px.
        overlap: overlap between neighbouring tiles, read-level px (``0 <= overlap < patch_size``).
        output_downsample: read-level px per output px (1 keeps full resolution). ``patch_size`` and ``overlap`` must
            be multiples of it so tile origins land on whole output px.
    """

    level_size: tuple[int, int]
    patch_size: int
    overlap: int = 0
    output_downsample: int = 1

    def __post_init__(self) -> None:
        if self.output_downsample < 1:
            raise ValueError(f"output_downsample must be >= 1, got {self.output_downsample}")
        if self.patch_size % self.output_downsample or self.overlap % self.output_downsample:
            raise ValueError(
                f"patch_size ({self.patch_size}) and overlap ({self.overlap}) must be multiples of "
                f"output_downsample ({self.output_downsample})"
            )
        tile_origins(self.level_size[0], self.patch_size, self.overlap)  # validates

    @property
    def step(self) -> int:
        """Step between tile origins, read-level px (not the network's stride, which input sizes are multiples of)."""
        return self.patch_size - self.overlap

    @property
    def columns(self) -> list[int]:
        """Tile x origins, read-level px."""
        return tile_origins(self.level_size[0], self.patch_size, self.overlap)

    @property
    def rows(self) -> list[int]:
        """Tile y origins, read-level px."""
        return tile_origins(self.level_size[1], self.patch_size, self.overlap)

    def origins(self) -> np.ndarray:
        """All tile origins as an ``(N, 2)`` int64 array of (x, y) read-level px, row-major (raster) order."""
        xs, ys = np.meshgrid(np.asarray(self.columns), np.asarray(self.rows))
        return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)

    @property
    def output_size(self) -> tuple[int, int]:
        """(W, H) of the stitched mask, output px."""
        return output_size(self.level_size, self.output_downsample)

    @property
    def output_patch_size(self) -> int:
        """Tile side in output px."""
        return self.patch_size // self.output_downsample


def blend_window(size: int, mode: str, sigma_scale: float = 0.125, min_weight: float = 1e-3) -> np.ndarray:
    """Per-pixel blending weights for one ``size × size`` tile (output px), float32, all > 0.

    Args:
        size: tile side in output px.
        mode: ``"none"`` — uniform weights (a plain average where tiles overlap; with no overlap each pixel comes from
            exactly one tile); ``"linear"`` — a tent rising from the tile's edges to its centre; ``"gaussian"`` — a
            Gaussian centred on the tile with ``sigma = sigma_scale · size`` (MONAI's default 0.125).
        sigma_scale: Gaussian width relative to the tile side.
        min_weight: floor (relative to the peak) so edge pixels that no other tile covers keep a usable weight.

    Raises:
        ValueError: unknown ``mode``; the message lists the allowed ones.
    """
    if mode not in BLEND_MODES:
        raise ValueError(f"writer.blend must be one of {', '.join(BLEND_MODES)}; got '{mode}'")
    centres = np.arange(size, dtype=np.float64) + 0.5
    if mode == "none":
        profile = np.ones(size)
    elif mode == "linear":
        profile = np.minimum(centres, size - centres) / (size / 2.0)
    else:
        sigma = sigma_scale * size
        profile = np.exp(-0.5 * ((centres - size / 2.0) / sigma) ** 2)
    window = np.outer(profile, profile)
    window = np.maximum(window / window.max(), min_weight)
    return window.astype(np.float32)
