"""``data.reader=jpeg`` (alias ``gpu_jpeg``): JPEG-tiled slide levels read as compressed tiles and decoded in batches
on the model's device (nvJPEG on CUDA, libjpeg-turbo on the CPU).

The modules, in the order a tile goes through them:

1. :mod:`.layout` — :func:`~.layout.inspect_jpeg_level` finds the TIFF page holding an OpenSlide level and returns its
   :class:`~.layout.JpegTileLayout` (tile size, per-tile file offsets and byte counts, JPEGTables, photometric), or
   raises :class:`~.layout.UnsupportedLevelError` saying why the level cannot be read that way (OpenSlide reads it);
2. :mod:`.markers` — :func:`~.markers.tile_stream` turns one stored tile into a standalone JPEG stream (the level's
   JPEGTables inserted, an Adobe APP14 marker making the decoder convert colours exactly as the TIFF photometric says);
3. :mod:`.dataset` — the DataLoader workers read the tile streams each patch needs and collate a batch as
   :class:`~.dataset.CompressedTiles` (tiles shared by several patches kept once); slides without JPEG tiles at the
   read level are read by OpenSlide in the same batches;
4. :mod:`.decode` — :func:`~.decode.decode_batch` decodes the batch's unique tiles on the model's device and assembles
   the ``(N, 3, P, P)`` uint8 patches there with one gather, without making the host wait for the device.

Frames: tile and patch geometry is in **read-level px** (pixels of the TIFF page = the OpenSlide level read).
"""
