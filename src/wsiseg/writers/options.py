"""The slide writer's options (``writer.*`` of ``writer=slide``), checked once, before any slide is opened."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from wsiseg.annotations.contours import DEFAULT_MIN_AREA_UM2, contour_formats
from wsiseg.errors import UserInputError
from wsiseg.writers.render import RenderOptions
from wsiseg.writers.stitcher import StoreOptions

__all__ = ["SlideWriterOptions", "slide_writer_options", "writer_section_options"]


@dataclass(frozen=True)
class SlideWriterOptions:
    """How tiles are stitched (``store``), how slides are rendered (``render``) and where blending runs."""

    store: StoreOptions
    render: RenderOptions
    blend_thread: bool | str = "auto"


def slide_writer_options(
    blend: str = "gaussian",
    sigma_scale: float = 0.125,
    chunk: int = 512,
    cache_mb: int = 128,
    threshold: float = 0.5,
    tiff_tile: int = 256,
    compression: str = "deflate",
    heatmap_max_side: int = 2048,
    contours: str | list[str] | None = None,
    min_area_um2: float = DEFAULT_MIN_AREA_UM2,
    layout: str = "generic",
    simplify_um: float | None = None,
    blend_thread: bool | Literal["auto"] = "auto",
    **unknown: Any,
) -> SlideWriterOptions:
    """Check the slide writer's options and group them.

    Args:
        blend: ``none`` | ``linear`` | ``gaussian`` (see :func:`wsiseg.data.grid.blend_window`).
        sigma_scale: Gaussian width relative to the tile side (``blend=gaussian``).
        chunk: store chunk side, output px; a multiple of ``2 × tiff_tile``.
        cache_mb: memory for store chunks held in RAM, MiB.
        threshold: probability at or above which a pixel counts as tumour (area, contours), in (0, 1].
        tiff_tile: TIFF tile side, px; a multiple of 16.
        compression: lossless TIFF compression: ``lzw`` or ``deflate`` (every viewer's reader, ASAP's included),
            ``zlib`` (deflate under tag 8) or ``zstd`` (not ASAP's native reader).
        heatmap_max_side: longer side of ``heatmap.png``.
        contours: ``geojson`` and/or ``asap_xml`` (list or comma-separated), or None / ``none``.
        min_area_um2: contour regions and holes smaller than this are dropped (µm², or level-0 px² without mpp).
        layout: ``generic`` (successive-directory pyramid: OpenSlide, ASAP) or ``ome`` (OME-TIFF, SubIFD levels:
            QuPath / Bio-Formats).
        simplify_um: contour simplification tolerance, µm (level-0 px without mpp); None: half a mask px; 0: none.
        blend_thread: blend on a background thread (``true``) or between batches (``false``); ``auto``: a thread on
            GPUs (the host blends while the device runs), none on CPUs (the network's threads use every core).

    Raises:
        UserInputError: an option outside its allowed values, or one the slide writer does not have (the message
            names the ``writer.*`` key).
    """
    if unknown:
        raise UserInputError(f"writer.{sorted(unknown)[0]} is not an option of writer=slide: drop it")
    if cache_mb < 1:
        raise UserInputError(f"writer.cache_mb must be >= 1 (MiB of store chunks kept in memory), got {cache_mb}")
    if blend_thread not in ("auto", True, False):
        raise UserInputError(f"writer.blend_thread must be auto, true or false; got '{blend_thread}'")
    render = RenderOptions(
        threshold,
        tiff_tile,
        compression,
        heatmap_max_side,
        contour_formats(contours),
        float(min_area_um2),
        layout,
        None if simplify_um is None else float(simplify_um),
    )
    if chunk < 1 or chunk % (2 * tiff_tile):
        raise UserInputError(
            f"writer.chunk ({chunk}) must be a multiple of 2 x writer.tiff_tile ({tiff_tile}), e.g. "
            f"{2 * tiff_tile * max(1, round(chunk / (2 * tiff_tile)))}"
        )
    return SlideWriterOptions(StoreOptions(blend, sigma_scale, chunk, cache_mb << 20), render, blend_thread)


def writer_section_options(writer: Mapping[str, Any]) -> SlideWriterOptions:
    """:func:`slide_writer_options` over a composed ``writer`` config section (a run's, or the one a report records),
    less the keys that are the writer's own arguments (``_target_``, ``output_dir``, ``output_downsample``)."""
    own = ("_target_", "output_dir", "output_downsample")
    return slide_writer_options(**{key: value for key, value in writer.items() if key not in own})
