from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from wsiseg.writers.tiff import downsample_2x, pyramid_sizes, write_pyramid_tiff


def test_pyramid_sizes() -> None:
    assert pyramid_sizes((1000, 300), 256) == [(1000, 300), (500, 150), (250, 75)]
    assert pyramid_sizes((256, 10), 256) == [(256, 10)]
    assert pyramid_sizes((257, 1), 256) == [(257, 1), (129, 1)]


def test_downsample_2x_mean_and_labels() -> None:
    band = np.array([[0, 2, 10], [4, 6, 11], [100, 100, 7]], np.uint8)
    np.testing.assert_array_equal(downsample_2x(band, labels=False), [[3, 11], [100, 7]])
    np.testing.assert_array_equal(downsample_2x(band, labels=True), [[0, 10], [100, 7]])


@pytest.mark.parametrize("shape", [(512, 1024), (7, 9), (1, 5), (6, 1)])
def test_downsample_2x_is_the_rounded_mean_of_each_2x2_block(shape: tuple[int, int]) -> None:
    band = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    padded = np.pad(band, ((0, shape[0] % 2), (0, shape[1] % 2)), mode="edge").astype(np.int64)
    blocks = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).sum(axis=(1, 3))
    np.testing.assert_array_equal(downsample_2x(band, labels=False), (blocks + 2) // 4)


@pytest.mark.parametrize(("compression", "band_rows"), [("zlib", 256), ("zstd", 256), ("zlib", 512)])
def test_written_pyramid_reads_back_exactly(tmp_path: Path, compression: str, band_rows: int) -> None:
    rng = np.random.default_rng(3)
    image = np.zeros((700, 900), np.uint8)
    image[100:400, 200:650] = rng.integers(0, 256, (300, 450), dtype=np.uint8)
    image[690:, 880:] = 255  # touches the odd last band and column
    bands = (image[y : y + band_rows] for y in range(0, 700, band_rows))
    path = tmp_path / f"m_{compression}.tif"
    preview = write_pyramid_tiff(
        path, bands, (900, 700), tmp_path / "scratch", mpp=2.0, tile=128, compression=compression, preview_side=200
    )
    with tifffile.TiffFile(path) as tif:
        levels = [page.asarray() for page in tif.pages]
    assert [lv.shape for lv in levels] == [(h, w) for w, h in pyramid_sizes((900, 700), 128)]
    np.testing.assert_array_equal(levels[0], image)
    for finer, coarser in zip(levels, levels[1:]):
        np.testing.assert_array_equal(coarser, downsample_2x(finer, labels=False))
    np.testing.assert_array_equal(preview, levels[2])  # 225 x 175: the smallest level with a side >= 200
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_count == len(levels)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(2.0, rel=1e-4)
        region = np.asarray(slide.read_region((0, 0), 0, (900, 700)))[..., 0]
    np.testing.assert_array_equal(region, image)
