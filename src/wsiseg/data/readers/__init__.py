"""Tile readers: how the planned tiles are read by the DataLoader workers and turned into pixels on the device.

The reader is chosen once per plan from ``data.reader`` (:func:`choose_reader`, in :mod:`.choice`):
:class:`OpenSlideReader` (workers read RGB tiles with OpenSlide) or :class:`JpegTileReader` (workers read the slide's
compressed JPEG tiles and the device decodes them, :mod:`wsiseg.data.readers.jpeg`). Either way ``predict_step`` sees
only ``batch["image"]``, (N, 3, H, W) uint8 RGB on its device.
"""

from wsiseg.data.readers.choice import (
    READERS,
    JpegTileReader,
    OpenSlideReader,
    TileReader,
    choose_reader,
    resolve_reader,
)

__all__ = ["READERS", "TileReader", "OpenSlideReader", "JpegTileReader", "choose_reader", "resolve_reader"]
