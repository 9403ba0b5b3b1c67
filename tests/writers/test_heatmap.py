import cv2
import numpy as np

from wsiseg.writers.heatmap import LABEL_COLOURS, render_heatmap


def test_probability_overlay_is_the_alpha_blend_of_the_viridis_colour_hidden_under_a_tenth() -> None:
    """Probability 1: 60 % viridis' top colour over the thumbnail; 0.5: the opacity scaled from 0 at 0.1 to 0.6 at 1;
    under 0.1 (background inside predicted tiles): the thumbnail as it is."""
    rng = np.random.default_rng(5)
    thumbnail = rng.integers(0, 256, (40, 80, 3), dtype=np.uint8)
    mask = np.zeros((20, 40), np.uint8)
    mask[:, 10:20] = 25  # 0.098: hidden
    mask[:, 20:30] = 128
    mask[:, 30:] = 255
    heatmap = render_heatmap(thumbnail, mask, opacity=0.6)
    assert heatmap.shape == thumbnail.shape and heatmap.dtype == np.uint8
    np.testing.assert_array_equal(heatmap[:, :40], thumbnail[:, :40])  # probability 0 and < 0.1: the thumbnail
    for value, columns in ((255, slice(60, 80)), (128, slice(40, 60))):
        colour = cv2.applyColorMap(np.full((1, 1), value, np.uint8), cv2.COLORMAP_VIRIDIS)[0, 0, ::-1].astype(float)
        alpha = 0.6 * (value - 25.5) / (255 - 25.5)
        expected = (1 - alpha) * thumbnail[:, columns].astype(float) + alpha * colour
        assert np.abs(heatmap[:, columns] - expected).max() <= 1.0  # rounding


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
