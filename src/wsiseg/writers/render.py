"""A stitched slide's files: ``mask.tif`` (pyramidal TIFF), ``heatmap.png`` and the contour files, each written
atomically from the slide's store.

Plain code, no Lightning: :func:`render_slide` reads a finished store band by band and returns the report fields it
measured (mask levels, tumour pixels and area, contour counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wsiseg.atomic import atomic_path
from wsiseg.contours import write_contours
from wsiseg.data.datasets import SlideTiles
from wsiseg.errors import UserInputError
from wsiseg.writers.heatmap import png_bytes, render_heatmap
from wsiseg.writers.store import BlendingAccumulator
from wsiseg.writers.tiff import ENCODERS, LAYOUTS, pyramid_sizes, write_pyramid_tiff

__all__ = ["RenderOptions", "render_slide", "OUTPUT_FILES"]

# What render_slide writes into a slide folder (removed again when the slide fails).
OUTPUT_FILES = ("mask.tif", "heatmap.png", "tumour.geojson", "tumour.xml")


@dataclass(frozen=True)
class RenderOptions:
    """How a slide's outputs are rendered (``writer.*``).

    Attributes:
        threshold: probability at or above which a mask pixel counts as tumour (area, contours).
        tiff_tile: TIFF tile side, output px.
        compression: lossless TIFF compression (:data:`wsiseg.writers.tiff.ENCODERS`).
        heatmap_max_side: longer side of ``heatmap.png``, px.
        contours: contour formats to write (``geojson``, ``asap_xml``).
        min_area_um2: contour regions and holes smaller than this are dropped (µm², level-0 px² without mpp).
        layout: ``generic`` or ``ome`` pyramid (:func:`wsiseg.writers.tiff.write_pyramid_tiff`).
        simplify_um: contour simplification tolerance, µm; None: half a mask px (see
            :func:`wsiseg.contours.write_contours`).
    """

    threshold: float = 0.5
    tiff_tile: int = 256
    compression: str = "deflate"
    heatmap_max_side: int = 2048
    contours: tuple[str, ...] = ()
    min_area_um2: float = 0.0
    layout: str = "generic"
    simplify_um: float | None = None

    def __post_init__(self) -> None:
        """Raises UserInputError naming the ``writer.*`` option outside its allowed values."""
        if not 0.0 < self.threshold <= 1.0:
            raise UserInputError(f"writer.threshold must be in (0, 1], got {self.threshold}")
        if self.heatmap_max_side < 1:
            raise UserInputError(
                f"writer.heatmap_max_side must be a positive number of px, got {self.heatmap_max_side}"
            )
        if self.min_area_um2 < 0:
            raise UserInputError(f"writer.min_area_um2 must be >= 0 (0 keeps every region), got {self.min_area_um2}")
        if self.layout not in LAYOUTS:
            raise UserInputError(
                f"writer.layout must be one of {', '.join(LAYOUTS)} (generic: OpenSlide and ASAP; ome: QuPath); "
                f"got '{self.layout}'"
            )
        if self.simplify_um is not None and self.simplify_um < 0:
            raise UserInputError(
                f"writer.simplify_um must be >= 0 (0: none) or null (half a mask pixel), got {self.simplify_um}"
            )
        if self.compression not in ENCODERS:
            raise UserInputError(
                f"writer.compression must be one of {', '.join(ENCODERS)} (lossless TIFF codecs OpenSlide reads); "
                f"got '{self.compression}'"
            )
        tile = self.tiff_tile
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 16 or tile % 16:
            raise UserInputError(
                f"writer.tiff_tile must be a positive multiple of 16 (the TIFF tile rule), e.g. 256; got {tile}"
            )


def render_slide(
    slide: SlideTiles,
    store: BlendingAccumulator,
    out_dir: Path,
    *,
    output_mpp: float | None,
    level0_per_mask_px: float,
    mpp_level0: float | None,
    options: RenderOptions,
) -> dict[str, Any]:
    """Write ``mask.tif``, ``heatmap.png`` and the asked-for contours of ``slide`` from its finished ``store``.

    Args:
        slide: the slide's plan (output size, thumbnail, level-0 size).
        store: the slide's blended (or mosaic) store, output px.
        out_dir: the slide's output folder (a ``.scratch`` sub-folder is used while the pyramid is built).
        output_mpp: µm per mask px (TIFF resolution, tumour area), None when the slide records no mpp.
        level0_per_mask_px: level-0 px per mask px (contours are written in level-0 px).
        mpp_level0: µm per level-0 px, None when unknown.
        options: rendering options.

    Returns:
        report fields: ``mask_levels``, ``tumour_pixels``, ``threshold``, ``tumour_area_mm2`` and, with contours, the
        fields :func:`wsiseg.contours.write_contours` returns.
    """
    labels = store.channels > 1
    threshold_u8 = int(np.ceil(options.threshold * 255 - 1e-9))
    positive = [0]
    width = slide.grid.output_size[0]

    def bands() -> Any:
        for _, rows, blocks in store.final_blocks():  # round(255·p), or labels
            band = np.zeros((rows, width), np.uint8)
            for x0, block in blocks:
                positive[0] += int(np.count_nonzero(block if labels else block >= threshold_u8))
                band[:, x0 : x0 + block.shape[1]] = block
            yield band

    with atomic_path(out_dir / "mask.tif") as tmp:
        preview = write_pyramid_tiff(
            tmp,
            bands(),
            slide.grid.output_size,
            out_dir / ".scratch",
            output_mpp,
            labels=labels,
            tile=options.tiff_tile,
            compression=options.compression,
            preview_side=options.heatmap_max_side,
            layout=options.layout,
        )
    thumbnail = slide.thumbnail.rgb
    scale = min(1.0, options.heatmap_max_side / max(thumbnail.shape[:2]))
    if scale < 1.0:
        size = (max(1, round(thumbnail.shape[1] * scale)), max(1, round(thumbnail.shape[0] * scale)))
        thumbnail = np.asarray(Image.fromarray(thumbnail).resize(size, Image.Resampling.BILINEAR))
    heatmap = render_heatmap(thumbnail, preview, labels=labels)
    with atomic_path(out_dir / "heatmap.png") as tmp:
        Path(tmp).write_bytes(png_bytes(heatmap))
    fields: dict[str, Any] = {
        "mask_levels": len(pyramid_sizes(slide.grid.output_size, options.tiff_tile)),
        "tumour_pixels": positive[0],
        "threshold": options.threshold,
        "tumour_area_mm2": None if output_mpp is None else positive[0] * (output_mpp * 1e-3) ** 2,
    }
    if options.contours:
        fields.update(
            write_contours(
                out_dir / "mask.tif",
                out_dir,
                options.contours,
                threshold=options.threshold,
                min_area_um2=options.min_area_um2,
                level0_per_mask_px=level0_per_mask_px,
                mpp=mpp_level0,
                level0_size=tuple(slide.level0_size),
                labels=labels,
                simplify_um=options.simplify_um,
            )
        )
    return fields
