"""``TileMosaic``: the store of a grid whose tiles do not overlap (``data.overlap=0``, the default) with one
probability channel. Each pixel comes from exactly one tile, so it stores the final uint8 value (``round(255·p)``)
instead of float32 sums and weights (:class:`~wsiseg.writers.store.BlendingAccumulator`): 8× less to keep, spill and
read back, and nothing to divide at the end."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsiseg.writers.store import BlendingAccumulator, probabilities_to_u8

__all__ = ["TileMosaic"]


class TileMosaic(BlendingAccumulator):
    """The store for tiles that do not overlap, one channel: keeps ``round(255·p)`` as uint8 (saturated to 0-255,
    :func:`probabilities_to_u8`), written once per pixel; ``weights`` are ignored. Same interface (and cache sizing)
    as :class:`BlendingAccumulator`; ``band_chunks`` yields uint8 values. Partial mosaics (DDP ranks) merge by
    maximum (each pixel was written by one rank; a tile predicted on two ranks gives the same value twice).

    Example::

        mosaic = TileMosaic(tmp / "m", (1000, 800))
        mosaic.add(0, 0, probs, window)  # probs (1, h, w) float in [0, 1]
    """

    def __init__(
        self,
        path: str | Path,
        size: tuple[int, int],
        chunk: int = 512,
        cache_bytes: int = 128 << 20,
        row_step: int | None = None,
        final_on_pass: bool = False,
    ) -> None:
        super().__init__(path, 1, size, chunk, cache_bytes, row_step, final_on_pass)

    @property
    def _planes(self) -> int:
        return 1

    _dtype = np.uint8
    _final_is_planes = True
    _weighted = False

    def _put(self, planes: np.ndarray, values: np.ndarray, weights: np.ndarray) -> None:
        probabilities_to_u8(values[0], out=planes[0], scratch=self._scratch(values.dtype, values.shape[1:]))

    def _merge(self, planes: np.ndarray, other: np.ndarray) -> None:
        np.maximum(planes, other, out=planes)

    def _final(self, planes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return planes, None

    def _final_u8(self, key: tuple[int, int], planes: np.ndarray) -> np.ndarray:
        return planes[0]
