"""Pieces into whole-image predictions for patch-folder mode: the patch writer's stitcher.

Plain code, no Lightning: the writer hands it host arrays batch by batch (the slide path's batch keys, ``slide_index``
for the image and ``tile_index`` for its piece) and takes each image back once its last piece arrived. Frames: every
coordinate is **image px** (patch mode never downsamples). A single-piece image is its prediction cropped from the
padding; the tiles of a larger image are blended in a :class:`~wsiseg.writers.store.BlendingAccumulator` held in
memory, with the slide writer's weights (:meth:`wsiseg.writers.stitcher.StoreOptions.window`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wsiseg.data.patch_images import PatchImage
from wsiseg.writers.stitcher import StoreOptions
from wsiseg.writers.store import BlendingAccumulator

__all__ = ["ImageState", "PatchStitcher", "probabilities_to_mask"]


@dataclass
class ImageState:
    """What has arrived of one image (image px, cropped to the image).

    Attributes:
        started: ``time.perf_counter()`` when its first piece arrived.
        probs: (C, H, W) float32, a single-piece image's prediction.
        store: a tiled image's blended tiles.
        rgb: (H, W, 3) uint8 input pixels (for the overlay), when kept.
        pieces: pieces arrived, errors included.
        error: the first error of the image (it then fails).
    """

    started: float
    probs: np.ndarray | None = None
    store: BlendingAccumulator | None = None
    rgb: np.ndarray | None = None
    pieces: int = 0
    error: str = ""

    def prediction(self) -> np.ndarray | None:
        """The image's (C, H, W) float32 prediction (a tiled image's weighted mean; consumes its store), None when no
        piece was added."""
        return self.store.read_all() if self.store is not None else self.probs


def probabilities_to_mask(probs: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(mask, labels)`` of a (C, H, W) prediction: with one channel the (H, W) uint8 ``round(255·p)`` (half to even)
    clipped to 0-255 and ``labels`` False; with several the index of the largest channel and ``labels`` True."""
    if probs.shape[0] > 1:
        return probs.argmax(axis=0).astype(np.uint8), True
    return np.clip(np.rint(probs[0] * 255.0), 0, 255).astype(np.uint8), False


class PatchStitcher:
    """Per-image states of a patch run, in memory.

    Args:
        images: the plan's images (a batch's ``slide_index`` indexes them, its ``tile_index`` their ``origins``).
        blending: tile weights for images larger than one patch (``writer.blend``, ``writer.sigma_scale``).

    Example::

        stitcher = PatchStitcher(plan.images, StoreOptions("gaussian"))
        for index in stitcher.add_batch(probs, pixels, slides, tiles, errors, finite):
            state = stitcher.take(index)
            mask, labels = probabilities_to_mask(state.prediction())
    """

    def __init__(self, images: Sequence[PatchImage], blending: StoreOptions) -> None:
        self.images, self.blending = images, blending
        self.states: dict[int, ImageState] = {}

    def add_batch(
        self,
        probs: np.ndarray,
        pixels: np.ndarray | None,
        slide_indices: Sequence[int],
        tile_indices: Sequence[int],
        errors: Sequence[str],
        finite: Sequence[bool],
    ) -> list[int]:
        """Add one batch: ``probs`` (N, C, h, w) and ``pixels`` (N, 3, h, w) uint8 of the pieces
        ``(slide_indices[i], tile_indices[i])``; ``pixels`` None gathers no input pixels (no overlay). A piece with an
        error, or whose map is not ``finite``, is not added and fails its image. Returns the images whose last piece
        arrived, in the order they completed."""
        complete = []
        for i, (index, piece_index) in enumerate(zip(slide_indices, tile_indices)):
            image = self.images[index]
            state = self.states.get(index)
            if state is None:
                state = self.states[index] = ImageState(started=time.perf_counter())
            state.pieces += 1
            if errors[i]:
                state.error = state.error or errors[i]
            elif not finite[i]:
                state.error = state.error or (
                    f"image '{image.path}': the network output NaN/infinite values for piece {piece_index}: check the "
                    "checkpoint, model.mean/std and trainer.precision (float16 can overflow)"
                )
            elif not state.error:
                try:
                    self._add_piece(image, state, piece_index, probs[i], None if pixels is None else pixels[i])
                except Exception as exc:
                    state.error = f"image '{image.path}': {exc}"
            if state.pieces == len(image.origins):
                complete.append(index)
        return complete

    def take(self, index: int) -> ImageState:
        """Image ``index``'s state, removed from the stitcher (it is written or failed next)."""
        return self.states.pop(index)

    def unfinished(self) -> list[int]:
        """Images some but not all of whose pieces arrived, in input order."""
        return sorted(self.states)

    def _add_piece(
        self, image: PatchImage, state: ImageState, piece_index: int, probs: np.ndarray, pixels: np.ndarray | None
    ) -> None:
        """Put one piece's prediction (C, h, w) and pixels (3, h, w) into the image's arrays, cropped to the image."""
        if probs.shape[-2:] != image.piece:
            raise RuntimeError(
                f"the model returned {probs.shape[-2]}x{probs.shape[-1]} px for a {image.piece[0]}x{image.piece[1]} "
                "piece: patch mode needs model.output_downsample=1"
            )
        width, height = image.size
        x, y = (int(v) for v in image.origins[piece_index])
        if not image.tiled:
            state.probs = np.ascontiguousarray(probs[:, :height, :width])
            if pixels is not None:
                state.rgb = np.ascontiguousarray(pixels[:, :height, :width].transpose(1, 2, 0))
            return
        if state.store is None:
            state.store = BlendingAccumulator(None, probs.shape[0], image.size, chunk=max(width, height))
            if pixels is not None:
                state.rgb = np.zeros((height, width, 3), np.uint8)
        state.store.add(x, y, probs, self.blending.window(image.piece[0]))
        if pixels is not None and state.rgb is not None:
            w, h = min(image.piece[1], width - x), min(image.piece[0], height - y)
            state.rgb[y : y + h, x : x + w] = pixels[:, :h, :w].transpose(1, 2, 0)
