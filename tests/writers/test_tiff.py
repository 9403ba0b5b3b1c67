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


# -- what the viewers' own readers accept ---------------------------------------------------------------------------
def asap_refusals(path: Path) -> list[str]:
    """Why ASAP's native reader (``TIFFImage::initializeType`` in ASAP's multiresolutionimageinterface) would refuse
    ``path``: it reads tiled TIFFs with compression none, LZW, JPEG, DEFLATE (32946) or 33005, minisblack / RGB /
    YCbCr, uint 8/16/32 or float32 samples, and takes the successive directories as levels, each strictly narrower
    than the one before."""
    refusals = []
    with tifffile.TiffFile(path) as tif:
        pages = list(tif.pages)
        for index, page in enumerate(pages):
            if not page.is_tiled:
                refusals.append(f"directory {index} is not tiled")
            if int(page.compression) not in (1, 5, 7, 32946, 33005):
                refusals.append(f"directory {index} has compression {int(page.compression)}")
            if int(page.photometric) not in (1, 2, 6):
                refusals.append(f"directory {index} has photometric {int(page.photometric)}")
            fmt, bits = int(page.sampleformat), int(page.bitspersample)
            if not ((fmt == 1 and bits in (8, 16, 32)) or (fmt == 3 and bits == 32)):
                refusals.append(f"directory {index} has sample format {fmt} with {bits} bits")
        widths = [page.imagewidth for page in pages]
        if any(b >= a for a, b in zip(widths, widths[1:])):
            refusals.append(f"levels do not shrink strictly: widths {widths}")
    return refusals


def _written(tmp_path: Path, image: np.ndarray, **options: object) -> Path:
    path = tmp_path / f"m_{'_'.join(map(str, options.values()))}.tif"
    write_pyramid_tiff(
        path, [image], (image.shape[1], image.shape[0]), tmp_path / "scratch", mpp=2.0, tile=128, **options
    )
    return path


@pytest.mark.parametrize("compression", ["lzw", "deflate"])
def test_asap_openslide_and_tifffile_read_the_generic_pyramid(tmp_path: Path, compression: str) -> None:
    image = np.random.default_rng(4).integers(0, 256, (700, 900), dtype=np.uint8)
    path = _written(tmp_path, image, compression=compression)
    assert asap_refusals(path) == []
    sizes = pyramid_sizes((900, 700), 128)
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(h, w) for w, h in sizes]
        np.testing.assert_array_equal(levels[0].asarray(), image)
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_dimensions == tuple(sizes)
        for level, (w, h) in enumerate(sizes):  # every level reads, as OpenSlide sees it
            region = np.asarray(slide.read_region((0, 0), level, (w, h)))[..., 0]
            assert region.shape == (h, w)
        np.testing.assert_array_equal(np.asarray(slide.read_region((0, 0), 0, (900, 700)))[..., 0], image)


@pytest.mark.parametrize(("compression", "code"), [("zlib", 8), ("zstd", 50000)])
def test_the_check_refuses_what_asap_refuses(tmp_path: Path, compression: str, code: int) -> None:
    path = _written(tmp_path, np.full((300, 300), 7, np.uint8), compression=compression)
    assert f"directory 0 has compression {code}" in asap_refusals(path)


def test_ome_layout_is_one_series_with_subifd_levels_and_the_pixel_size(tmp_path: Path) -> None:
    from xml.etree import ElementTree

    image = np.random.default_rng(5).integers(0, 256, (700, 900), dtype=np.uint8)
    path = _written(tmp_path, image, layout="ome")
    sizes = pyramid_sizes((900, 700), 128)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and len(tif.pages) == 1  # one top-level directory: the levels are its SubIFDs
        assert len(tif.series) == 1
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(h, w) for w, h in sizes]
        np.testing.assert_array_equal(levels[0].asarray(), image)
        for finer, coarser in zip(levels, levels[1:]):
            np.testing.assert_array_equal(coarser.asarray(), downsample_2x(finer.asarray(), labels=False))
        pixels = next(e for e in ElementTree.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels"))
    assert float(pixels.get("PhysicalSizeX")) == float(pixels.get("PhysicalSizeY")) == 2.0
    assert pixels.get("PhysicalSizeXUnit") == "µm"
    with openslide.OpenSlide(str(path)) as slide:  # OpenSlide still reads level 0
        np.testing.assert_array_equal(np.asarray(slide.read_region((0, 0), 0, (900, 700)))[..., 0], image)
