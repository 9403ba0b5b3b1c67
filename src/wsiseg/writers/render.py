"""A stitched slide's files: ``mask.tif`` (pyramidal TIFF), ``heatmap.png`` and the contour files, each written
atomically from the slide's store.

Plain code, no Lightning: :func:`render_slide` reads a finished store band by band and returns the report fields it
measured (mask levels, tumour pixels and area, contour counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from wsiseg.annotations.contours import CONTOUR_FILES, DEFAULT_MIN_AREA_UM2, write_contours
from wsiseg.atomic import atomic_path
from wsiseg.data.datasets import SlideTiles
from wsiseg.errors import UserInputError
from wsiseg.writers.figures import largest_region, slide_score, tumour_share_of_tissue
from wsiseg.writers.heatmap import png_bytes, render_heatmap
from wsiseg.writers.store import BlendingAccumulator
from wsiseg.writers.tiff import ENCODERS, LAYOUTS, pyramid_sizes, write_pyramid_tiff

__all__ = ["OUTPUT_FILES", "POST_PROCESSING", "RenderOptions", "post_process", "render_slide", "threshold_u8"]

# What render_slide writes into a slide folder (removed again when the slide fails).
OUTPUT_FILES = ("mask.tif", "heatmap.png", "thumbnail.jpg", "tumour.geojson", "tumour.xml")


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
            :func:`wsiseg.annotations.contours.write_contours`).
    """

    threshold: float = 0.5
    tiff_tile: int = 256
    compression: str = "deflate"
    heatmap_max_side: int = 2048
    contours: tuple[str, ...] = ()
    min_area_um2: float = DEFAULT_MIN_AREA_UM2
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
    """Write ``mask.tif``, ``heatmap.png``, ``thumbnail.jpg`` (the slide under the heatmap) and the asked-for contours
    of ``slide`` from its finished ``store``.

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
        fields :func:`wsiseg.annotations.contours.write_contours` returns.
    """
    labels = store.channels > 1
    cut = threshold_u8(options.threshold)
    positive = [0]
    width = slide.grid.output_size[0]

    def bands() -> Any:
        for _, rows, blocks in store.final_blocks():  # round(255·p), or labels
            band = np.zeros((rows, width), np.uint8)
            for x0, block in blocks:
                positive[0] += int(np.count_nonzero(block if labels else block >= cut))
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
    with atomic_path(out_dir / "thumbnail.jpg") as tmp:  # the slide as the heatmap shows it, for side by side views
        ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(thumbnail[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise RuntimeError("JPEG encoding of the slide thumbnail failed")
        Path(tmp).write_bytes(encoded.tobytes())
    fields: dict[str, Any] = {"mask_levels": len(pyramid_sizes(slide.grid.output_size, options.tiff_tile))}
    fields.update(
        post_process(
            out_dir,
            positive[0],
            options,
            labels=labels,
            output_mpp=output_mpp,
            level0_per_mask_px=level0_per_mask_px,
            mpp_level0=mpp_level0,
            level0_size=tuple(slide.level0_size),
            tile_mask_px=slide.grid.output_patch_size,
            tissue_level0_px2=slide.tissue_fraction * slide.level0_size[0] * slide.level0_size[1],
        )
    )
    return fields


POST_PROCESSING = ("threshold", "contours", "min_area_um2", "simplify_um")
"""The ``writer.*`` options applied to a finished ``mask.tif`` (:func:`post_process`): a resumed run or
``wsiseg-render`` changes them without running the network again."""


def post_process(
    out_dir: Path,
    positive: int,
    options: RenderOptions,
    *,
    labels: bool,
    output_mpp: float | None,
    level0_per_mask_px: float,
    mpp_level0: float | None,
    level0_size: tuple[int, int],
    tile_mask_px: float,
    tissue_level0_px2: float,
) -> dict[str, Any]:
    """The report fields of the :data:`POST_PROCESSING` options on the slide's ``out_dir/mask.tif``: the slide's
    figures from ``positive`` (mask px at or above the threshold, or with a non-zero label) and the mask's pyramid
    (:mod:`wsiseg.writers.figures`), and the contour files asked for (written; those not asked for are removed).

    Args:
        tile_mask_px: a tile's side in mask px (the slide score's window).
        tissue_level0_px2: the slide's tissue area, level-0 px² (the tumour share's denominator).

    Returns:
        ``mask_kind``, ``tumour_pixels``, ``threshold``, ``tumour_area_mm2``, ``tumour_pct_of_tissue``,
        ``slide_score`` (and the pyramid level it was read at), ``largest_region_mm2`` and
        ``largest_region_level0_px2`` (from the contours when they are written, else from the mask:
        ``largest_region_source``), ``figures_note`` (why a figure is missing, or empty) and, with contours, the
        fields :func:`wsiseg.annotations.contours.write_contours` returns.
    """
    mask = out_dir / "mask.tif"
    to_level0 = level0_per_mask_px**2
    score, score_level = slide_score(mask, tile_mask_px, labels)
    fields: dict[str, Any] = {
        "mask_kind": "labels" if labels else "probability",
        "tumour_pixels": positive,
        "threshold": options.threshold,
        "tumour_area_mm2": None if output_mpp is None else positive * (output_mpp * 1e-3) ** 2,
        "tumour_pct_of_tissue": tumour_share_of_tissue(positive * to_level0, tissue_level0_px2),
        "slide_score": score,
        "slide_score_level": score_level,
        "figures_note": "" if mpp_level0 else "the slide records no mpp: areas in mm² unknown (level-0 px² given)",
    }
    for fmt, name in CONTOUR_FILES.items():
        if fmt not in options.contours:
            (out_dir / name).unlink(missing_ok=True)
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
                level0_size=level0_size,
                labels=labels,
                simplify_um=options.simplify_um,
            )
        )
        fields["largest_region_source"] = "contours"
    else:
        area, level = largest_region(mask, threshold_u8(options.threshold), labels)
        fields["largest_region_level0_px2"] = area * to_level0
        fields["largest_region_mm2"] = None if not mpp_level0 else area * to_level0 * (mpp_level0 * 1e-3) ** 2
        fields["largest_region_source"] = f"mask level {level}"
    return fields


def threshold_u8(threshold: float) -> int:
    """The uint8 mask value at and above which a pixel counts as tumour: ``ceil(255·threshold)``."""
    return int(np.ceil(threshold * 255 - 1e-9))
