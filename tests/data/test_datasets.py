from __future__ import annotations

import os

import torch

from tests.conftest import shared_slide
from wsiseg.data.datamodule import SlideTileDataModule


def test_threaded_batch_reads_equal_one_at_a_time_reads() -> None:
    """Real OpenSlide on CMU-1-Small-Region.svs: the DataLoader's batched fetch on 4 read threads returns exactly the
    tiles (and their metadata) that single-threaded reads return, in order, edge tiles included."""
    slide = str(shared_slide("CMU-1-Small-Region.svs"))
    threaded = SlideTileDataModule(
        slide, patch_size=256, overlap=32, batch_size=8, num_workers=0, read_threads=4, reader="openslide"
    )
    threaded.setup("predict")
    single = SlideTileDataModule(
        slide, patch_size=256, overlap=32, batch_size=8, num_workers=0, read_threads=1, reader="openslide"
    )
    single.setup("predict")
    batches = list(threaded.predict_dataloader())
    assert threaded.dataset._pool is not None, "the batched fetch did not go through the read threads"
    assert single.dataset._pool is None
    images = torch.cat([b["image"] for b in batches])
    assert images.shape[0] == len(single.dataset) > 8
    for i in range(len(single.dataset)):
        item = single.dataset[i]
        assert torch.equal(images[i], item["image"]), f"tile {i} differs"
    tile_index = torch.cat([b["tile_index"] for b in batches])
    assert tile_index.tolist() == [single.dataset[i]["tile_index"] for i in range(len(single.dataset))]


def test_read_threads_default_follows_the_workers() -> None:
    slide = str(shared_slide("CMU-1-Small-Region.svs"))
    in_process = SlideTileDataModule(slide, num_workers=0, reader="openslide")
    in_process.setup("predict")
    assert in_process.dataset.read_threads == max(1, min(8, os.cpu_count() or 1))
    with_workers = SlideTileDataModule(slide, num_workers=2, reader="openslide")
    with_workers.setup("predict")
    assert with_workers.dataset.read_threads == 1
