"""The tile readers behind one interface: chosen once per plan, each handing predict_step pixels on the device."""

from __future__ import annotations

from pathlib import Path

import torch

from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.data.readers import JpegTileReader, OpenSlideReader, choose_reader, resolve_reader


def test_both_readers_give_the_same_pixels_and_keep_indices_on_the_host(synthetic_slide: Path) -> None:
    dm = SlideTileDataModule([str(synthetic_slide)], patch_size=256, num_workers=0, reader="openslide")
    slides = dm.plan_run().slides
    assert resolve_reader("openslide", 0) == "openslide" and resolve_reader("gpu_jpeg", 4) == "jpeg"
    openslide, jpeg = choose_reader("openslide", slides, 0), choose_reader("jpeg", slides, 0)
    assert isinstance(openslide, OpenSlideReader) and isinstance(jpeg, JpegTileReader)
    assert jpeg.layouts[0] is not None  # the generated slide is JPEG-tiled at level 0
    batches = {}
    for reader in (openslide, jpeg):
        batch = next(iter(reader.dataloader(dm.dataset, 4, 0, False, 2)))
        moved = reader.to_device(batch, torch.device("cpu"))
        assert moved["image"].dtype == torch.uint8 and moved["image"].shape == (4, 3, 256, 256)
        assert moved["tile_index"].device.type == "cpu" and "jpeg_tiles" not in moved
        batches[reader.name] = moved
    assert torch.equal(batches["openslide"]["tile_index"], batches["jpeg"]["tile_index"])
    diff = (batches["openslide"]["image"].int() - batches["jpeg"]["image"].int()).abs().float()
    assert diff.mean() <= 2.0  # two JPEG decoders (OpenSlide's libjpeg, libjpeg-turbo): within rounding
    assert dm.tile_reader is dm.tile_reader  # chosen once per plan
