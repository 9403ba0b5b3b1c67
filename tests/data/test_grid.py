import numpy as np
import pytest

from wsiseg.data.grid import TileGrid, blend_window, level0_location, output_size, tile_origins


@pytest.mark.parametrize("length", range(1, 70))
@pytest.mark.parametrize(("patch", "overlap"), [(16, 0), (16, 4), (16, 15), (7, 3), (32, 16)])
def test_tile_origins_cover_every_pixel_once_started(length: int, patch: int, overlap: int) -> None:
    origins = tile_origins(length, patch, overlap)
    assert origins[0] == 0
    assert all(b - a == patch - overlap for a, b in zip(origins, origins[1:]))
    covered = np.zeros(length, int)
    for o in origins:
        covered[o : o + patch] += 1
    assert covered.min() >= 1, "a pixel at the edge was dropped"
    # the last tile is needed: without it the edge is not covered
    if len(origins) > 1:
        assert origins[-2] + patch < length
    assert origins[-1] < length


def test_tile_origins_examples() -> None:
    assert tile_origins(1000, 512, 64) == [0, 448, 896]
    assert tile_origins(960, 512, 64) == [0, 448]
    assert tile_origins(1024, 512, 0) == [0, 512]
    assert tile_origins(1025, 512, 0) == [0, 512, 1024]
    assert tile_origins(100, 512, 0) == [0]


@pytest.mark.parametrize(("patch", "overlap"), [(16, 16), (16, -1), (0, 0)])
def test_tile_origins_rejects_bad_arguments(patch: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        tile_origins(100, patch, overlap)


def test_tile_grid_origins_raster_order_and_output_size() -> None:
    grid = TileGrid((1000, 600), 256, 32, 4)
    origins = grid.origins()
    assert origins[:5].tolist() == [[0, 0], [224, 0], [448, 0], [672, 0], [896, 0]]
    assert len(origins) == len(grid.columns) * len(grid.rows) == 5 * 3
    assert grid.output_size == (250, 150)
    assert grid.output_patch_size == 64
    assert output_size((1001, 599), 4) == (251, 150)


def test_tile_grid_requires_downsample_alignment() -> None:
    with pytest.raises(ValueError, match="multiples of output_downsample"):
        TileGrid((1000, 600), 256, 30, 4)


def test_level0_location_integer_downsample_is_exact() -> None:
    assert level0_location(123, 45, 4.0) == (492, 180)
    assert level0_location(10, 10, 2.0005) == (20, 20)


@pytest.mark.parametrize("mode", ["none", "linear", "gaussian"])
def test_blend_window_positive_symmetric_peaked(mode: str) -> None:
    w = blend_window(64, mode)
    assert w.shape == (64, 64) and w.dtype == np.float32
    assert (w > 0).all()
    np.testing.assert_array_equal(w, w.T)
    np.testing.assert_array_equal(w, w[::-1, ::-1])
    assert w.max() == pytest.approx(1.0)
    if mode == "none":
        assert (w == 1).all()
    else:
        assert w[0, 0] < w[32, 32]


def test_blend_window_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="none, linear, gaussian"):
        blend_window(8, "cosine")
