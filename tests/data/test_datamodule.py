from __future__ import annotations

import pytest
import torch

from tests.conftest import shared_slide
from wsiseg.data.datamodule import SlideTileDataModule


def test_only_pixels_go_to_the_device() -> None:
    """Tile indices and errors stay on the host (the writer reads them without synchronising with the device);
    the 'meta' device stands in for a GPU."""
    dm = SlideTileDataModule(
        str(shared_slide("CMU-1-Small-Region.svs")), patch_size=256, batch_size=4, num_workers=0, reader="openslide"
    )
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["image"].device.type == "meta" and moved["image"].shape == batch["image"].shape
    for key in ("slide_index", "tile_index", "x", "y"):
        assert moved[key].device.type == "cpu" and torch.equal(moved[key], batch[key])
    assert moved["error"] == batch["error"]
    assert batch["image"].device.type == "cpu", "the loader's batch itself is left as it was"


def test_no_processable_slide_gives_the_real_reason() -> None:
    """data.level=1 on a one-level slide is not 'could not be opened': the one line says which level is missing."""
    import pytest

    from wsiseg.errors import UserInputError

    slide = shared_slide("CMU-1-Small-Region.svs")  # one level
    dm = SlideTileDataModule(str(slide), level=1, patch_size=256, num_workers=0)
    with pytest.raises(UserInputError) as info:
        dm.setup("predict")
    assert str(info.value) == f"data.level=1 does not exist in slide '{slide}' (1 levels: 0..0)"
    missing = slide.with_name("missing-slide.svs")
    dm = SlideTileDataModule([str(missing), str(slide)], level=1, patch_size=256, num_workers=0)
    with pytest.raises(UserInputError) as info:
        dm.setup("predict")
    message = str(info.value)
    assert message.startswith("none of the 2 slides in data.slides can be processed; the first: slide '")
    assert "does not exist" in message and "could be opened" not in message


# -- GPU defaults, as pure functions of the device kind -------------------------------------------------------------


def test_auto_reader_is_jpeg_on_cuda() -> None:
    """data.reader=auto: JPEG tiles on CUDA (nvJPEG, with or without workers) and on CPU runs without workers;
    OpenSlide for CPU runs with workers."""
    from wsiseg.data.readers import resolve_reader

    assert resolve_reader("auto", 15, "cuda") == resolve_reader("auto", 0, "cuda") == "jpeg"
    assert resolve_reader("auto", 0, "cpu") == "jpeg"
    assert resolve_reader("auto", 1, "cpu") == "openslide"


def test_auto_reader_chooses_jpeg_tiles_when_cuda_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA visible (pretended: the choice is all that runs), auto picks the JPEG-tile reader for a JPEG-tiled
    slide even with workers, and OpenSlide for a slide without JPEG tiles."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    chosen = {}
    for name in ("CMU-1-Small-Region.svs", "openslide-python__boxes.tiff"):
        dm = SlideTileDataModule(str(shared_slide(name)), patch_size=256, num_workers=4, reader="auto")
        dm.setup("predict")
        chosen[name] = dm.tile_reader.name
    assert chosen == {"CMU-1-Small-Region.svs": "jpeg", "openslide-python__boxes.tiff": "openslide"}


@pytest.mark.parametrize(
    ("device_type", "cores", "workers"),
    [("cuda", 16, 15), ("cuda", 64, 63), ("cuda", 1, 1), ("cpu", 2, 0), ("cpu", 16, 4), ("cpu", 64, 8)],
)
def test_default_workers(device_type: str, cores: int, workers: int) -> None:
    """data.num_workers=null: every core but one on GPU runs (no cap), a quarter of the cores up to 8 on CPU."""
    from wsiseg.hardware import default_workers

    assert default_workers(device_type, cores) == workers
