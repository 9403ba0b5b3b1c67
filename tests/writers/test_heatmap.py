import cv2
import numpy as np

from wsiseg.writers.heatmap import LABEL_COLOURS, render_heatmap


def test_probability_overlay_is_the_alpha_blend_of_the_jet_colour() -> None:
    rng = np.random.default_rng(5)
    thumbnail = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    mask[:, 15:] = 255
    heatmap = render_heatmap(thumbnail, mask, opacity=0.6)
    assert heatmap.shape == thumbnail.shape and heatmap.dtype == np.uint8
    np.testing.assert_array_equal(heatmap[:, :30], thumbnail[:, :30])  # probability 0: the thumbnail as it is
    jet_max = cv2.applyColorMap(np.full((1, 1), 255, np.uint8), cv2.COLORMAP_JET)[0, 0, ::-1].astype(float)
    expected = 0.4 * thumbnail[:, 30:].astype(float) + 0.6 * jet_max
    assert np.abs(heatmap[:, 30:] - expected).max() <= 1.0  # rounding


def test_label_overlay_colours_only_foreground_labels() -> None:
    thumbnail = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 2
    heatmap = render_heatmap(thumbnail, mask, labels=True, opacity=0.5)
    np.testing.assert_array_equal(heatmap[4:], thumbnail[4:])
    expected = 0.5 * 100 + 0.5 * LABEL_COLOURS[2].astype(float)
    assert np.abs(heatmap[:4] - expected).max() <= 1.0


def test_png_bytes_round_trip_rgb(tmp_path) -> None:
    from PIL import Image

    from wsiseg.writers.heatmap import png_bytes

    rgb = np.random.default_rng(2).integers(0, 256, (31, 47, 3), dtype=np.uint8)
    path = tmp_path / "h.png"
    path.write_bytes(png_bytes(rgb))
    with Image.open(path) as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), rgb)
