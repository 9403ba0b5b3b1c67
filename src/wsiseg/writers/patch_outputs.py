"""Patch-folder outputs: the writer's options, where an image's ``<key>_heatmap.png`` / ``<key>_mask.png`` go, when
they count as complete (``resume=true``), and writing them.

Each PNG carries the run's config hash and its input's stamp as text chunks, so a resumed run reads PNG headers only
to know what it keeps, and a file without the hash is a user's own and never overwritten. Plain code, no Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from wsiseg.atomic import atomic_path
from wsiseg.data.patch_images import PatchImage
from wsiseg.errors import UserInputError
from wsiseg.writers.heatmap import colour_map, render_heatmap
from wsiseg.writers.run_record import check_writable, config_hash
from wsiseg.writers.stitcher import StoreOptions

__all__ = [
    "HEATMAP_SUFFIX",
    "MASK_SUFFIX",
    "PatchOutputs",
    "PatchWriterOptions",
    "patch_outputs",
    "patch_writer_options",
    "write_image_outputs",
]

HEATMAP_SUFFIX = "_heatmap.png"
MASK_SUFFIX = "_mask.png"
_HASH_KEY = "wsiseg:config"
_SOURCE_KEY = "wsiseg:source"
_STAMP_KEY = "wsiseg:source-stamp"


@dataclass(frozen=True)
class PatchOutputs:
    """Where an image's outputs go and when they count as complete.

    Attributes:
        output_dir: the output folder; ``<key>_heatmap.png`` (and ``<key>_mask.png``) are written under it.
        mask: whether ``<key>_mask.png`` is written (and so required for completeness).
        hash: the config hash stored in every PNG (text chunk ``wsiseg:config``).
    """

    output_dir: Path
    mask: bool
    hash: str

    def paths(self, image: PatchImage) -> dict[str, Path]:
        """The files written for ``image``: ``heatmap`` always, ``mask`` when asked for."""
        paths = {"heatmap": self.output_dir / f"{image.key}{HEATMAP_SUFFIX}"}
        if self.mask:
            paths["mask"] = self.output_dir / f"{image.key}{MASK_SUFFIX}"
        return paths

    def is_complete(self, image: PatchImage) -> bool:
        """True when every output of ``image`` exists, is a PNG of its size written under this hash, from the input
        file as it is now (its size and modification time in ns, recorded in the PNG: a changed input whose mtime was
        set back is redone). Reads PNG headers only."""
        for path in self.paths(image).values():
            try:
                with Image.open(path) as im:
                    if im.format != "PNG" or im.size != image.size or im.info.get(_HASH_KEY) != self.hash:
                        return False
                    if im.info.get(_STAMP_KEY) != image.stamp:
                        return False
            except Exception:  # missing or unreadable output: not complete
                return False
        return True

    def written(self, images: Sequence[PatchImage]) -> set[Path]:
        """Resolved paths of the files this run writes for ``images``, and of those an earlier run wrote there (a
        mask written with ``writer.mask=true``), so an output folder inside the input folder never feeds outputs back
        as inputs. A user's own file of such a name (``case1_mask.png`` ground truth) stays an input: see
        :meth:`foreign`."""
        paths = set()
        for image in images:
            for suffix in (HEATMAP_SUFFIX, MASK_SUFFIX):
                path = self.output_dir / f"{image.key}{suffix}"
                written_by_us = _written_by_wsiseg(path)  # one header read per path
                if written_by_us or ((suffix == HEATMAP_SUFFIX or self.mask) and not os.path.lexists(path)):
                    paths.add(path.resolve())
        return paths

    def foreign(self, images: Sequence[PatchImage]) -> list[Path]:
        """Files this run would write for ``images`` that exist and were not written by wsiseg (a user's own
        ``case1_mask.png``): never overwritten; the entry point refuses the run instead."""
        return [path for image in images for path in self.paths(image).values() if _foreign(path)]


@dataclass(frozen=True)
class PatchWriterOptions:
    """The patch writer's checked options (see :func:`patch_writer_options`).

    Attributes:
        blending: the tile weights of images larger than one patch (the slide writer's :class:`StoreOptions`; its
            ``chunk`` and ``cache_bytes`` do not apply: an image's store is held whole in memory).
    """

    mask: bool
    overlay: bool
    opacity: float
    blending: StoreOptions
    write_workers: int

    @property
    def rendering(self) -> dict[str, Any]:
        """What changes a heatmap's pixels (part of the outputs' hash)."""
        return {
            "overlay": self.overlay,
            "opacity": self.opacity,
            "blend": self.blending.blend,
            "sigma_scale": self.blending.sigma_scale,
        }


def patch_writer_options(
    mask: bool = False,
    overlay: bool = True,
    opacity: float = 0.6,
    blend: str = "gaussian",
    sigma_scale: float = 0.125,
    output_downsample: int = 1,
    write_workers: int = 2,
    **unknown: Any,
) -> PatchWriterOptions:
    """Check the patch writer's options (``writer.*`` of ``writer=patches``).

    Args:
        mask: also write ``<key>_mask.png``: uint8 probability 0-255, or class labels for ``model.reduction=none``.
        overlay: blend the colour-mapped probability over the input; False writes the colour map alone.
        opacity: overlay opacity where the probability is 1 (scaled by the probability; labels use it as is).
        blend: ``none`` | ``linear`` | ``gaussian`` weights for the tiles of images larger than ``data.patch_size``.
        sigma_scale: Gaussian width relative to the tile side (``blend=gaussian``).
        output_downsample: must be 1 (outputs keep the input's pixels); the model's config reads it from here.
        write_workers: threads encoding and writing PNGs (0 writes on the main thread).

    Raises:
        UserInputError: an option outside its values, or one the patch writer does not have (naming the key).
    """
    if unknown:
        raise UserInputError(f"writer.{sorted(unknown)[0]} is not an option of writer=patches: drop it")
    blending = StoreOptions(blend, sigma_scale)  # checks writer.blend and writer.sigma_scale as the slide writer does
    if output_downsample != 1:
        raise UserInputError(
            f"writer.output_downsample must be 1 in patch mode (outputs keep the input's pixels), got "
            f"{output_downsample}: drop the override"
        )
    if not 0.0 <= opacity <= 1.0:
        raise UserInputError(f"writer.opacity must be in [0, 1], got {opacity}")
    if write_workers < 0:
        raise UserInputError(f"writer.write_workers must be >= 0, got {write_workers}")
    return PatchWriterOptions(bool(mask), overlay, opacity, blending, write_workers)


def patch_outputs(
    output_dir: str | Path, options: PatchWriterOptions, run_config: dict[str, Any] | None
) -> PatchOutputs:
    """The outputs of a writer with these (checked) options, in a folder proven writable.

    Raises:
        UserInputError: ``writer.output_dir`` is empty or not writable.
    """
    check_writable(output_dir)
    return PatchOutputs(Path(output_dir), options.mask, config_hash(run_config, extra=options.rendering))


def write_image_outputs(
    outputs: PatchOutputs,
    image: PatchImage,
    rgb: np.ndarray | None,
    mask: np.ndarray,
    labels: bool,
    opacity: float,
) -> None:
    """Render and write the heatmap (and mask) of one image, each atomically, the mask first (a run killed between
    the two leaves no heatmap, so the image does not look complete).

    Args:
        outputs: the run's outputs (paths, config hash).
        image: the input (its key, relative path and stamp go into the PNGs' text).
        rgb: (H, W, 3) uint8 input pixels to overlay the colour map on; None writes the colour map alone.
        mask: (H, W) uint8: probability 0-255, or class labels when ``labels``.
        labels: ``mask`` holds class labels.
        opacity: overlay opacity where the probability is 1.
    """
    paths = outputs.paths(image)
    paths["heatmap"].parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text(_HASH_KEY, outputs.hash)
    info.add_text(_SOURCE_KEY, image.rel)
    info.add_text(_STAMP_KEY, image.stamp)
    heatmap = colour_map(mask, labels) if rgb is None else render_heatmap(rgb, mask, labels=labels, opacity=opacity)
    if "mask" in paths:
        with atomic_path(paths["mask"]) as tmp:
            Image.fromarray(mask).save(tmp, format="PNG", pnginfo=info)
    with atomic_path(paths["heatmap"]) as tmp:
        Image.fromarray(heatmap).save(tmp, format="PNG", pnginfo=info)


def _written_by_wsiseg(path: Path) -> bool:
    """``path`` is a PNG a wsiseg patch run wrote (it carries the config hash text chunk)."""
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and _HASH_KEY in im.info
    except Exception:
        return False


def _foreign(path: Path) -> bool:
    """``path`` exists and is not a wsiseg output."""
    return os.path.lexists(path) and not _written_by_wsiseg(path)
