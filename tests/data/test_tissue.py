import numpy as np
import openslide

from wsiseg.data.synthetic import SyntheticSlide
from wsiseg.data.tissue import read_thumbnail, tile_tissue_fractions, tissue_mask


def test_tissue_mask_finds_the_generated_tissue(synthetic_slide) -> None:
    spec = SyntheticSlide(2000, 1500, seed=7)  # the fixture's slide
    with openslide.OpenSlide(str(synthetic_slide)) as slide:
        thumbnail = read_thumbnail(slide, 500)
    assert max(thumbnail.rgb.shape[:2]) == 500
    mask = tissue_mask(thumbnail.rgb)
    tissue_field, _ = spec.fields()
    truth = spec.sample(tissue_field, 0, 0, mask.shape[1], mask.shape[0], thumbnail.downsample[0]) > 0.5
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.95, dice


def test_blank_thumbnail_has_no_tissue() -> None:
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(240, 3, (200, 300, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass).any()


def test_tile_tissue_fractions_by_hand() -> None:
    mask = np.zeros((10, 10), bool)
    mask[0:5, 0:5] = True  # top-left quarter, mask px = 8 level-0 px
    origins = np.array([[0, 0], [40, 0], [20, 20], [60, 60]])
    fractions = tile_tissue_fractions(mask, (8.0, 8.0), origins, patch_size=20, level_downsample=2.0)
    # tiles are 40 level-0 px = 5 mask px: the first covers the quarter exactly
    np.testing.assert_allclose(fractions, [1.0, 0.0, 0.0, 0.0])
    fractions = tile_tissue_fractions(mask, (8.0, 8.0), np.array([[10, 10]]), patch_size=20, level_downsample=2.0)
    np.testing.assert_allclose(fractions, [9 / 36])  # mask px 2.5..7.5 -> 2..8 covers 6x6, tissue 3x3
