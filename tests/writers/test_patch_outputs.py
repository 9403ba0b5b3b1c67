"""Patch-folder outputs on their own: options, PNG writing, completeness for resume, files that are not ours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from wsiseg.data.patch_images import PatchImage, plan_pieces
from wsiseg.errors import UserInputError
from wsiseg.writers.heatmap import colour_map, render_heatmap
from wsiseg.writers.patch_outputs import patch_outputs, patch_writer_options, write_image_outputs
from wsiseg.writers.stitcher import StoreOptions


def image_of(key: str, size: tuple[int, int] = (40, 30), stamp: str = "10:20") -> PatchImage:
    origins, piece = plan_pieces(size, 64, 0, 16)
    return PatchImage(Path(f"/in/{key}.png"), f"{key}.png", key, size, origins, piece, 0.0, stamp)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threshold": 0.5}, "writer.threshold is not an option of writer=patches: drop it"),
        ({"blend": "cubic"}, "writer.blend must be one of none, linear, gaussian; got 'cubic'"),
        ({"sigma_scale": 0}, "writer.sigma_scale must be > 0 (Gaussian width / tile side), got 0"),
        ({"output_downsample": 2}, "writer.output_downsample must be 1 in patch mode"),
        ({"opacity": 1.5}, "writer.opacity must be in [0, 1], got 1.5"),
        ({"write_workers": -1}, "writer.write_workers must be >= 0, got -1"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, Any], message: str) -> None:
    with pytest.raises(UserInputError) as info:
        patch_writer_options(**options)
    assert str(info.value).startswith(message)


def test_options_blend_as_the_slide_writer_and_hash_what_changes_pixels(tmp_path: Path) -> None:
    options = patch_writer_options(mask=True, blend="linear", sigma_scale=0.25, write_workers=3)
    assert options.blending == StoreOptions("linear", 0.25)
    assert options.rendering == {"overlay": True, "opacity": 0.6, "blend": "linear", "sigma_scale": 0.25}
    same = patch_outputs(tmp_path / "a", patch_writer_options(blend="linear", sigma_scale=0.25), None)
    assert patch_outputs(tmp_path / "b", options, None).hash == same.hash  # mask and threads change no pixel
    assert patch_outputs(tmp_path / "c", patch_writer_options(opacity=0.5), None).hash != same.hash


def test_written_outputs_are_complete_until_the_input_or_the_config_changes(tmp_path: Path) -> None:
    options = patch_writer_options(mask=True)
    outputs = patch_outputs(tmp_path, options, {"model": {"net": "probe"}})
    image = image_of("sub/x")
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    mask = rng.integers(0, 255, (30, 40), dtype=np.uint8)
    assert not outputs.is_complete(image)
    write_image_outputs(outputs, image, rgb, mask, False, 0.6)
    with Image.open(tmp_path / "sub/x_heatmap.png") as im:
        assert im.info["wsiseg:config"] == outputs.hash and im.info["wsiseg:source"] == "sub/x.png"
        np.testing.assert_array_equal(np.asarray(im), render_heatmap(rgb, mask, labels=False, opacity=0.6))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sub/x_mask.png")), mask)
    assert outputs.is_complete(image)
    assert not outputs.is_complete(image_of("sub/x", stamp="10:21"))  # the input changed
    other = patch_outputs(tmp_path, options, {"model": {"net": "other"}})
    assert not other.is_complete(image)
    assert not list(tmp_path.rglob(".*.tmp"))

    write_image_outputs(outputs, image_of("y"), None, mask, False, 0.6)  # no overlay: the colour map alone
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "y_heatmap.png")), colour_map(mask, False))


def test_a_users_files_are_foreign_and_ours_are_not_inputs(tmp_path: Path) -> None:
    outputs = patch_outputs(tmp_path, patch_writer_options(mask=False), None)
    ours, theirs, absent = image_of("ours"), image_of("theirs"), image_of("absent")
    write_image_outputs(outputs, ours, None, np.zeros((30, 40), np.uint8), False, 0.6)
    Image.new("L", (40, 30)).save(tmp_path / "theirs_heatmap.png")
    assert outputs.foreign([ours, theirs, absent]) == [tmp_path / "theirs_heatmap.png"]
    assert outputs.written([ours, theirs, absent]) == {
        (tmp_path / "ours_heatmap.png").resolve(),
        (tmp_path / "absent_heatmap.png").resolve(),
    }
