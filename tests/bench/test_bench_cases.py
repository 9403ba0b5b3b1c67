"""The naive loop of wsiseg-bench (:mod:`wsiseg.bench.cases`) on real and generated slides."""

from __future__ import annotations

from pathlib import Path


def test_naive_loop_halves_cover_the_same_tiles_across_slides(tmp_path: Path) -> None:
    """The bench times the naive loop in two halves (before and after the optimised run): the halves must be exactly
    the first N tiles, split anywhere, including across slides. ProbeNet returns each tile's red channel / 255."""
    import numpy as np
    import torch

    from tests.conftest import shared_slide
    from wsiseg.bench.cases import naive_loop
    from wsiseg.data.datamodule import SlideTileDataModule
    from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide
    from wsiseg.model import ProbeNet

    generated = write_synthetic_slide(tmp_path / "g.tif", SyntheticSlide(800, 600, seed=4))
    slides = [str(generated), str(shared_slide("CMU-1-Small-Region.svs"))]
    dm = SlideTileDataModule(slides, patch_size=256, batch_size=4, num_workers=0, reader="openslide")
    dm.setup("predict")
    first_slide_tiles = len(dm.slides[0].origins)
    total = first_slide_tiles + 3
    net, device = ProbeNet(gain=0.5, bias=0.5).eval(), torch.device("cpu")
    mean = std = torch.full((3, 1, 1), 0.5)

    def run(limit: int, skip: int = 0) -> list[np.ndarray]:
        return list(naive_loop(dm, net, device, mean, std, limit, skip))

    whole = run(total)
    assert len(whole) == total
    for split in (1, first_slide_tiles, first_slide_tiles + 1):
        halves = run(split) + run(total - split, skip=split)
        assert len(halves) == total
        for a, b in zip(whole, halves):
            np.testing.assert_array_equal(a, b)
    expected_last = dm.dataset[total - 1]["image"][0].float().numpy() / 255  # the 3rd tile of the second slide
    np.testing.assert_allclose(whole[-1][0], expected_last, atol=1e-6)
