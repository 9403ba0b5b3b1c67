"""data.reader=jpeg, the device side: patches decoded with torchvision's decode_jpeg (CPU here, nvJPEG on CUDA) and
assembled from tiles, checked against OpenSlide's reads of the same regions; a tile no decoder takes marks only its
patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import torch

from tests.conftest import shared_slide
from tests.data.readers.jpeg_helpers import CMU, MAX_LIMIT, MEAN_LIMIT, break_huffman_table, jpeg_datamodule
from tests.test_gpu import ONCE_PER_RUN, CudaSyncs, syncs_allowed
from tests.test_gpu import cuda_syncs as cuda_syncs  # the autouse fixture: GPU cases run in sync debug mode
from wsiseg.data.readers.jpeg.dataset import JpegTileDataset
from wsiseg.data.readers.jpeg.decode import decode_batch
from wsiseg.data.slide import read_rgb


@pytest.mark.parametrize(
    ("slide", "level", "patch", "overlap", "workers"),
    [
        (CMU, 0, 512, 64, 1),  # 240 px tiles: every patch straddles 9-16 of them; last row/column past the edge
        ("synthetic", 0, 256, 48, 0),  # 2000 x 1500, 4:2:0 JFIF tiles of 256
        ("synthetic", 1, 128, 32, 0),  # 500 x 375: edge tiles cut by the level's border
    ],
)
def test_patches_equal_openslide_reads(
    synthetic_slide: Path, slide: str, level: int, patch: int, overlap: int, workers: int
) -> None:
    path = synthetic_slide if slide == "synthetic" else shared_slide(slide)
    dm = jpeg_datamodule(path, level, patch, overlap, workers)
    loader = dm.predict_dataloader()
    assert isinstance(loader.dataset, JpegTileDataset)
    plan = dm.dataset.slides[0]
    layout = loader.dataset.layouts[0]
    diffs, straddling, past_edge, shared = [], 0, 0, 0
    with openslide.OpenSlide(str(path)) as handle:
        for batch in loader:
            tiles = batch["jpeg_tiles"]
            references = int((tiles.lookup >= 0).sum())
            shared += references - (len(tiles.offsets) - 1)  # tiles decoded once for several patches
            out = decode_batch(batch, "cpu")
            assert out["image"].dtype == torch.uint8 and out["image"].shape[1:] == (3, patch, patch)
            assert "jpeg_tiles" not in out and not any(out["error"])
            for n, (x, y) in enumerate(zip(out["x"].tolist(), out["y"].tolist())):
                straddling += len(layout.tiles_for_region(x, y, patch, patch)) >= 4
                past_edge += x + patch > layout.level_size[0] or y + patch > layout.level_size[1]
                expected = read_rgb(handle, x, y, plan.level, patch, patch)
                diffs.append(np.abs(out["image"][n].permute(1, 2, 0).numpy().astype(int) - expected))
    diff = np.stack(diffs)
    assert len(diff) == len(dm.dataset) == len(plan.origins)
    assert straddling > 0 and past_edge > 0 and shared > 0 and overlap > 0
    print(f"\n{path.name} level {level}: {len(diff)} patches, mean |diff| {diff.mean():.4f}, max {diff.max()}")
    assert diff.mean() <= MEAN_LIMIT and diff.max() <= MAX_LIMIT


def test_undecodable_tile_marks_only_its_patches(synthetic_slide: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad_huffman.tif"
    index = break_huffman_table(synthetic_slide, path)
    dm = jpeg_datamodule(path, 0, 256, 0)
    batches = [decode_batch(batch, "cpu") for batch in dm.predict_dataloader()]
    errors = [e for b in batches for e in b["error"]]
    bad = [i for i, e in enumerate(errors) if e]
    assert len(bad) == 1 and f"TIFF tile {index}" in errors[bad[0]] and str(path) in errors[bad[0]]
    assert "cannot be decoded" in errors[bad[0]]
    assert len(errors) == len(dm.dataset) == 48


# -- on a CUDA machine: nvJPEG ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("slide", "patch", "overlap"), [(CMU, 512, 64), ("synthetic", 256, 48)])
def test_nvjpeg_patches_equal_openslide_reads(
    synthetic_slide: Path, cuda_syncs: CudaSyncs, slide: str, patch: int, overlap: int
) -> None:
    """nvJPEG patches match OpenSlide's reads; decoding a batch never waits for the GPU (sync debug mode), but for
    the colour check on the first batch of each colour kind."""
    path = synthetic_slide if slide == "synthetic" else shared_slide(slide)
    dm = jpeg_datamodule(path, 0, patch, overlap)
    plan = dm.dataset.slides[0]
    diffs = []
    checks: dict[int, bool] = {}  # colour kinds checked against libjpeg, kept over the batches as the reader does
    cuda_syncs.allow("jpeg/decode.py:colour_mismatch", ONCE_PER_RUN["jpeg/decode.py:colour_mismatch"])
    with openslide.OpenSlide(str(path)) as handle:
        for batch in dm.predict_dataloader():
            out = decode_batch(batch, "cuda", checks)
            assert out["image"].is_cuda
            with syncs_allowed():  # the patches read back to compare
                host = out["image"].cpu()
            for n, (x, y) in enumerate(zip(out["x"].tolist(), out["y"].tolist())):
                expected = read_rgb(handle, x, y, plan.level, patch, patch)
                diffs.append(np.abs(host[n].permute(1, 2, 0).numpy().astype(int) - expected))
    diff = np.stack(diffs)
    print(f"\nnvJPEG {path.name}: mean |diff| {diff.mean():.4f}, max {diff.max()}, colour checks {checks}")
    assert diff.mean() <= MEAN_LIMIT


def test_decoder_errors_keep_the_reason_not_the_decoders_build_path() -> None:
    from wsiseg.data.readers.jpeg.decode import decoder_reason

    raised = RuntimeError(
        "Error while decoding JPEG images: Corrupt JPEG data Exception raised from decode_jpegs_cuda at "
        "/__w/vision/vision/pytorch/vision/torchvision/csrc/io/image/cuda/decode_jpegs_cuda.cpp:123\nframe #0: ..."
    )
    assert decoder_reason(raised) == "Error while decoding JPEG images: Corrupt JPEG data"
    assert decoder_reason(RuntimeError("Not a JPEG file (in /build/x/decode.cpp)")) == "Not a JPEG file"
