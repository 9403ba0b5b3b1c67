"""Checks of the ``data.*`` options both data modules take (slides and patch folders), written once so both modes
refuse the same bad value with the same one-line message."""

from __future__ import annotations

from wsiseg.data.grid import check_patch_size
from wsiseg.errors import UserInputError

__all__ = ["check_data_options", "check_stride"]


def check_data_options(patch_size: object, overlap: int, num_workers: int | None, prefetch_factor: int) -> None:
    """The options every data module shares, in this order.

    Args:
        patch_size: tile side, px (:func:`wsiseg.data.grid.check_patch_size`).
        overlap: px shared by neighbouring tiles, ``0 <= overlap < patch_size``.
        num_workers: DataLoader worker processes, ``>= 0`` (None: a default chosen later).
        prefetch_factor: batches read ahead per worker, ``>= 1``.

    Raises:
        UserInputError: naming the first ``data.*`` key outside its range.
    """
    check_patch_size(patch_size)
    if not 0 <= overlap < patch_size:  # type: ignore[operator]
        raise UserInputError(f"data.overlap must satisfy 0 <= overlap < patch_size ({patch_size}), got {overlap}")
    if num_workers is not None and num_workers < 0:
        raise UserInputError(f"data.num_workers must be >= 0 (0 reads in the main process), got {num_workers}")
    if prefetch_factor < 1:
        raise UserInputError(
            f"data.prefetch_factor must be >= 1 (batches read ahead per worker), got {prefetch_factor}"
        )


def check_stride(patch_size: int, stride: int) -> None:
    """``data.patch_size`` (px) is a multiple of the network's ``stride`` (px), so a tile needs no padding.

    Raises:
        UserInputError: naming ``data.patch_size`` and the nearest size that fits.
    """
    if patch_size % stride:
        raise UserInputError(
            f"data.patch_size={patch_size} is not a multiple of the network's stride {stride}: "
            f"use e.g. {max(stride, patch_size // stride * stride)}"
        )
