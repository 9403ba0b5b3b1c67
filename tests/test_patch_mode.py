"""Patch-folder mode (issue 3): PatchFolderDataModule + PatchWriter on patches cut from real slides with OpenSlide.

Pixel checks use a probe model whose output is the red channel / 255 (so a mask must equal the input's red channel),
and the demo U-Net, whose patch-mode masks must match the slide pipeline's on the same pixels.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from tests.conftest import shared_slide
from tests.helpers import run_command
from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.data.grid import TileGrid
from wsiseg.data.patches import (
    PatchBatchDataset,
    PatchFolderDataModule,
    PatchPlan,
    list_images,
    plan_batches,
    plan_pieces,
)
from wsiseg.data.slide import SlideLevel, read_rgb
from wsiseg.errors import UserInputError
from wsiseg.model import ProbeNet, Unet
from wsiseg.module import SegmentationModule
from wsiseg.writers.heatmap import render_heatmap
from wsiseg.writers.patch_writer import PatchWriter
from wsiseg.writers.slide_writer import SlideWriter

CMU = "CMU-1-Small-Region.svs"  # 2220 x 2967, one level


# -- helpers -------------------------------------------------------------------------------------------------------
def probe_module() -> SegmentationModule:
    """Output = R / 255: ``(x/255 - 0) / 1`` through ProbeNet(gain=1, bias=0) on the red channel."""
    return SegmentationModule(
        ProbeNet(channel=0, gain=1.0, bias=0.0),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        activation="none",
        reduction="max",
        channels_last=False,
    )


def demo_module(checkpoint: Path) -> SegmentationModule:
    return SegmentationModule(Unet(3, 1, base_width=8), checkpoint=str(checkpoint))


def trainer(callback: pl.Callback) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=32,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[callback],
    )


def run_patches(
    input_dir: Path,
    output_dir: Path,
    module: SegmentationModule,
    data: dict[str, Any] | None = None,
    resume: bool = False,
    **writer: Any,
) -> PatchWriter:
    """Patch mode through a real Trainer, wired as the entry point wires it (the writer's outputs decide what
    ``resume`` keeps and which files are this run's own; the plan goes to the writer); returns the writer."""
    data = {"patch_size": 256, "batch_size": 4, "num_workers": 0, **(data or {})}
    writer = {"write_workers": 0, **writer}
    outputs = PatchWriter.outputs_for(output_dir, **writer)
    datamodule = PatchFolderDataModule(
        input_dir, **data, keep_complete=outputs.is_complete if resume else None, outputs_of=outputs.written
    )
    patch_writer = PatchWriter(output_dir, plan=datamodule.plan_run(module.stride), **writer)
    trainer(patch_writer).predict(module, datamodule=datamodule, return_predictions=False)
    return patch_writer


def rgb_of(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im)


def cut(slide: openslide.OpenSlide, x: int, y: int, w: int, h: int) -> np.ndarray:
    """(h, w, 3) RGB read at level-0 (x, y); past the slide's edge white (like the slide pipeline)."""
    level = SlideLevel(0, 1.0, tuple(slide.dimensions), None)
    return read_rgb(slide, x, y, level, w, h)


def outcome(writer: PatchWriter) -> dict[str, str]:
    return {row["image"]: row["outcome"] for row in writer.results}


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real patches cut from CMU-1-Small-Region.svs with OpenSlide, in sub-folders, plus odd sizes and broken files."""
    slide = openslide.OpenSlide(str(shared_slide(CMU)))
    root = tmp_path_factory.mktemp("patches")
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(cut(slide, 768, 1024, 256, 256)).save(root / "a" / "p0.png")
    Image.fromarray(cut(slide, 1024, 1024, 256, 256)).save(root / "a" / "deep" / "p1.png")
    Image.fromarray(cut(slide, 1280, 1280, 256, 256)).save(root / "b" / "p2.jpg", quality=90)
    Image.fromarray(cut(slide, 512, 1536, 256, 256)).save(root / "b" / "p3.tif")
    Image.fromarray(cut(slide, 300, 700, 300, 200)).save(root / "odd_300x200.png")  # wider than a patch: 2 tiles
    Image.fromarray(cut(slide, 900, 900, 600, 500)).save(root / "big_600x500.png")  # 3 x 3 tiles with overlap 32
    Image.fromarray(cut(slide, 1500, 400, 100, 70)).save(root / "small_100x70.png")  # one piece padded to 112 x 80
    # RGBA read across the slide's bottom-right corner: the part past the edge is transparent.
    Image.fromarray(np.asarray(slide.read_region((2100, 2850), 0, (256, 256)))).save(root / "b" / "corner_rgba.png")
    shutil.copy(shared_slide("openslide-python__boxes.png"), root / "boxes_palette.png")  # a real palette PNG
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    whole = (root / "a" / "p0.png").read_bytes()
    (root / "truncated.png").write_bytes(whole[: len(whole) // 2])  # header fine, pixels cut off
    red16 = cut(slide, 0, 0, 64, 48)[..., 0].astype(np.uint16) * 257
    Image.fromarray(red16).save(root / "sixteen_bit.png")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"ignored")
    return root


GOOD = [
    "a/deep/p1.png",
    "a/p0.png",
    "b/corner_rgba.png",
    "b/p2.jpg",
    "b/p3.tif",
    "big_600x500.png",
    "boxes_palette.png",
    "odd_300x200.png",
    "small_100x70.png",
]
BAD = ["broken.png", "sixteen_bit.png", "truncated.png"]


def expected_rgb(path: Path) -> np.ndarray:
    """The input as the pipeline must see it: RGB, transparent pixels white."""
    with Image.open(path) as im:
        if im.mode == "RGBA":
            rgba = np.asarray(im)
            assert set(np.unique(rgba[..., 3])) == {0, 255}
            return np.where(rgba[..., 3:] == 0, 255, rgba[..., :3]).astype(np.uint8)
        return np.asarray(im.convert("RGB"))


# -- pure planning -------------------------------------------------------------------------------------------------
def test_pieces_and_batches_group_by_shape_deterministically(patch_dir: Path) -> None:
    origins, piece = plan_pieces((100, 70), 256, 0, 16)
    assert origins.tolist() == [[0, 0]] and piece == (80, 112)  # (h, w) padded up to multiples of 16
    origins, piece = plan_pieces((256, 256), 256, 0, 16)
    assert origins.tolist() == [[0, 0]] and piece == (256, 256)
    origins, piece = plan_pieces((300, 200), 256, 0, 16)
    assert origins.tolist() == TileGrid((300, 200), 256, 0).origins().tolist() and piece == (256, 256)

    paths = list_images(patch_dir)
    rel = [p.relative_to(patch_dir).as_posix() for p in paths]
    assert rel == sorted(GOOD + BAD)  # recursive, sorted, hidden files and other extensions left out

    dm = PatchFolderDataModule(patch_dir, patch_size=256, overlap=32, pad_multiple=16, batch_size=3)
    images = dm.plan_run(stride=1).images  # pad_multiple, not the network's stride, sets the padding
    assert dm.plan_run() is dm.plan  # planned once
    assert [image.rel for image in images] == sorted(GOOD + ["truncated.png"])  # header readable
    assert sorted(p.name for p, _ in dm.plan.failed) == ["broken.png", "sixteen_bit.png"]
    assert next(image.piece for image in images if image.rel == "small_100x70.png") == (80, 112)
    plan = dm.batch_plan()
    assert plan == dm.batch_plan()
    pieces = [pair for batch in plan for pair in batch]
    expected = [(i, k) for i, image in enumerate(images) for k in range(len(image.origins))]
    assert sorted(pieces) == expected  # every piece exactly once
    assert dm.plan.tiles == len(expected)
    for batch in plan:
        assert 1 <= len(batch) <= 3
        assert len({images[i].piece for i, _ in batch}) == 1
    full = [len(b) for b in plan if images[b[0][0]].piece == (256, 256)]
    assert full[:-1] == [3] * (len(full) - 1)  # patch-size pieces (patches and tiles of larger images) share batches

    assert plan_batches(images, [], 4) == []

    batch = PatchBatchDataset(images, plan)[0]  # the slide path's batch keys: the image, then its piece
    assert set(batch) == {"image", "slide_index", "tile_index", "x", "y", "error"}
    assert list(zip(batch["slide_index"].tolist(), batch["tile_index"].tolist())) == plan[0]
    origins = [images[i].origins[k].tolist() for i, k in plan[0]]
    assert [[x, y] for x, y in zip(batch["x"].tolist(), batch["y"].tolist())] == origins


# -- probe: pixel-exact outputs ------------------------------------------------------------------------------------
def test_probe_outputs_equal_input_red_channel(patch_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    writer = run_patches(
        patch_dir,
        out,
        probe_module(),
        data={"overlap": 32, "pad_multiple": 16, "num_workers": 2},
        mask=True,
        blend="gaussian",
        write_workers=2,
    )
    assert outcome(writer) == {**{name: "done" for name in GOOD}, **{name: "failed" for name in BAD}}
    for name in GOOD:
        key = name.rsplit(".", 1)[0]
        rgb = expected_rgb(patch_dir / name)
        mask = png(out / f"{key}_mask.png")
        heatmap = png(out / f"{key}_heatmap.png")
        assert mask.dtype == np.uint8 and mask.shape == rgb.shape[:2], name  # never resized
        np.testing.assert_array_equal(mask, rgb[..., 0], err_msg=name)
        np.testing.assert_array_equal(heatmap, render_heatmap(rgb, rgb[..., 0]), err_msg=name)
    assert (png(out / "b/corner_rgba_mask.png") == 255).mean() > 0.3  # transparent part composited over white

    rows = {row["image"]: row for row in writer.results}
    for name in BAD:
        assert name in rows[name]["reason"] and rows[name]["status"] == "failed"
        assert not list(out.glob(name.rsplit(".", 1)[0] + "_*"))
    assert "pixel mode 'I;16'" in rows["sixteen_bit.png"]["reason"]
    assert "convert it to 8-bit RGB" in rows["sixteen_bit.png"]["reason"]
    assert "truncated" in rows["truncated.png"]["reason"]
    assert rows["big_600x500.png"]["tiles"] == 9 and rows["odd_300x200.png"]["tiles"] == 2

    report = json.loads((out / "report.json").read_text())
    assert (report["images"], report["done"], report["skipped"], report["failed"]) == (12, 9, 0, 3)
    assert report["wall_time_s"] > 0
    assert report["images_per_s"] == pytest.approx(9 / report["wall_time_s"], rel=0.02)
    assert [row["image"] for row in report["results"]] == sorted(GOOD + BAD)


def test_colour_map_without_overlay_and_replicate_padding(patch_dir: Path, tmp_path: Path) -> None:
    from wsiseg.writers.heatmap import colour_map

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(patch_dir / "small_100x70.png", src / "small.png")
    writer = run_patches(
        src, tmp_path / "out", probe_module(), data={"pad_multiple": 16, "pad": "replicate"}, overlay=False
    )
    assert outcome(writer) == {"small.png": "done"}
    red = expected_rgb(src / "small.png")[..., 0]
    heatmap = png(tmp_path / "out" / "small_heatmap.png")
    np.testing.assert_array_equal(heatmap, colour_map(red, labels=False))
    assert not (tmp_path / "out" / "small_mask.png").exists()  # masks only on request


def test_a_failed_write_fails_its_image_alone(patch_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the writer threads (``write_workers=2``) a write that fails fails its image, with the reason, and the other
    images are written."""
    from wsiseg.writers import patch_writer as patch_writer_module

    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    shutil.copy(patch_dir / "a" / "p0.png", src / "sub" / "p0.png")
    shutil.copy(patch_dir / "small_100x70.png", src / "small.png")
    real = patch_writer_module.write_image_outputs

    def full_disk_for_p0(outputs: Any, image: Any, *args: Any) -> None:
        if image.rel == "sub/p0.png":
            raise OSError(28, "No space left on device")
        real(outputs, image, *args)

    monkeypatch.setattr(patch_writer_module, "write_image_outputs", full_disk_for_p0)
    out = tmp_path / "out"
    writer = run_patches(src, out, probe_module(), data={"pad_multiple": 16}, write_workers=2)
    assert outcome(writer) == {"small.png": "done", "sub/p0.png": "failed"}
    row = next(row for row in writer.results if row["image"] == "sub/p0.png")
    reason = f"image '{src / 'sub' / 'p0.png'}': writing outputs failed: [Errno 28] No space left on device"
    assert row["reason"] == reason
    assert row["tiles"] == 0 and row["status"] == "failed" and row["heatmap"] is None
    assert (out / "small_heatmap.png").is_file() and not (out / "sub").exists()
    assert (writer.report["done"], writer.report["failed"], writer.report["pieces"]) == (1, 1, 1)


# -- re-runs -------------------------------------------------------------------------------------------------------
def test_resume_keeps_complete_outputs_else_recomputes(patch_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    shutil.copytree(patch_dir, src)
    out = tmp_path / "out"
    config = {"model": {"net": "probe"}, "writer": {"mask": True, "output_dir": str(out)}}

    def run(resume: bool = True, **options: Any) -> PatchWriter:
        return run_patches(
            src,
            out,
            probe_module(),
            data={"pad_multiple": 16},
            resume=resume,
            **{"mask": True, "run_config": config, **options},
        )

    first = run()
    assert sum(v == "done" for v in outcome(first).values()) == len(GOOD)
    inodes = {p: p.stat().st_ino for p in out.rglob("*.png")}

    (out / "a" / "p0_heatmap.png").unlink()  # incomplete: redone
    (out / "b" / "p3_mask.png").write_bytes(b"")  # unreadable: redone
    os.utime(src / "odd_300x200.png")  # input newer than its outputs: redone
    second = run()
    redone = {"a/p0.png", "b/p3.tif", "odd_300x200.png"}
    assert outcome(second) == {
        **{name: "done" if name in redone else "skipped" for name in GOOD},
        **{name: "failed" for name in BAD},
    }
    assert all(row["status"] == "complete" for row in second.results if row["outcome"] == "skipped")
    assert (out / "a/deep/p1_heatmap.png").stat().st_ino == inodes[out / "a/deep/p1_heatmap.png"]  # untouched
    assert (out / "odd_300x200_mask.png").stat().st_ino != inodes[out / "odd_300x200_mask.png"]
    report = json.loads((out / "report.json").read_text())
    assert (report["done"], report["skipped"], report["failed"]) == (3, len(GOOD) - 3, 3)

    # Asking for fewer outputs or writing elsewhere from the same settings keeps them complete.
    fewer = {"model": {"net": "probe"}, "writer": {"mask": False, "output_dir": "elsewhere"}}
    third = run(mask=False, run_config=fewer)
    assert sum(v == "skipped" for v in outcome(third).values()) == len(GOOD)

    fourth = run(resume=False)  # the one rule of both modes: without resume=true everything is recomputed
    assert sum(v == "done" for v in outcome(fourth).values()) == len(GOOD)
    assert (out / "a/deep/p1_heatmap.png").stat().st_ino != inodes[out / "a/deep/p1_heatmap.png"]

    fifth = run(opacity=0.3)  # rendering changed
    assert sum(v == "done" for v in outcome(fifth).values()) == len(GOOD)
    sixth = run(opacity=0.3, run_config={**config, "model": {"net": "another"}})  # model changed
    assert sum(v == "done" for v in outcome(sixth).values()) == len(GOOD)


def test_same_stem_inputs_get_distinct_outputs(patch_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(patch_dir / "a" / "p0.png", src / "x.png")
    shutil.copy(patch_dir / "b" / "p2.jpg", src / "x.jpg")
    shutil.copy(patch_dir / "small_100x70.png", src / "y.png")
    out = tmp_path / "out"
    writer = run_patches(src, out, probe_module(), mask=True)
    assert outcome(writer) == {"x.jpg": "done", "x.png": "done", "y.png": "done"}
    for name in ("x.jpg", "x.png"):  # the extension is kept when two inputs share a stem
        np.testing.assert_array_equal(png(out / f"{name}_mask.png"), expected_rgb(src / name)[..., 0])
    assert (out / "y_mask.png").is_file()


def test_outputs_inside_input_dir_are_not_inputs(patch_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a/p0.png", "small_100x70.png"):
        shutil.copy(patch_dir / name, src / Path(name).name)
    first = run_patches(src, src, probe_module(), data={"pad_multiple": 16}, mask=True)
    second = run_patches(src, src, probe_module(), data={"pad_multiple": 16}, resume=True, mask=True)
    assert outcome(first) == {"p0.png": "done", "small_100x70.png": "done"}
    assert outcome(second) == {"p0.png": "skipped", "small_100x70.png": "skipped"}
    assert second.report["ignored_outputs"] == 4
    assert not list(src.glob("*_heatmap_heatmap.png"))


# -- demo model: batching and the slide pipeline -------------------------------------------------------------------
def test_batched_equals_one_at_a_time(patch_dir: Path, tmp_path: Path, demo_checkpoint: Path) -> None:
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    names = ["a/p0.png", "b/p2.jpg", "odd_300x200.png", "small_100x70.png", "broken.png"]
    for name in names:
        shutil.copy(patch_dir / name, src / ("a/" if "/" in name else "") / Path(name).name)
    batched = run_patches(
        src, tmp_path / "batched", demo_module(demo_checkpoint), data={"batch_size": 8, "num_workers": 2}, mask=True
    )
    single = run_patches(src, tmp_path / "single", demo_module(demo_checkpoint), data={"batch_size": 1}, mask=True)
    assert outcome(batched) == outcome(single)
    assert outcome(single)["broken.png"] == "failed"
    written = sorted(p.relative_to(tmp_path / "single") for p in (tmp_path / "single").rglob("*.png"))
    assert len(written) == 8
    assert written == sorted(p.relative_to(tmp_path / "batched") for p in (tmp_path / "batched").rglob("*.png"))
    for rel in written:
        a, b = png(tmp_path / "batched" / rel), png(tmp_path / "single" / rel)
        np.testing.assert_array_equal(a, b, err_msg=str(rel))
    mask = png(tmp_path / "single" / "a" / "p0_mask.png")
    assert mask.std() > 10  # the demo model's output varies over real tissue: the comparison is not vacuous


@pytest.fixture(scope="module")
def region_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 480 x 400 px region of CMU-1-Small-Region.svs as a tiled TIFF that OpenSlide opens (generic-tiff)."""
    slide = openslide.OpenSlide(str(shared_slide(CMU)))
    path = tmp_path_factory.mktemp("region") / "region.tif"
    tifffile.imwrite(path, cut(slide, 1000, 1200, 480, 400), tile=(256, 256), photometric="rgb", compression="zlib")
    return path


def slide_mask(slide: Path, out: Path, module: SegmentationModule, overlap: int, blend: str) -> np.ndarray:
    """mask.tif (level 0) of the slide pipeline: tissue detection off, patch 256, output_downsample 1."""
    dm = SlideTileDataModule(
        [str(slide)],
        patch_size=256,
        overlap=overlap,
        tissue={"enabled": False},
        batch_size=4,
        num_workers=0,
        reader="openslide",
        level=0,
    )
    writer = SlideWriter(out, plan=dm.plan_run(), blend=blend)
    trainer(writer).predict(module, datamodule=dm, return_predictions=False)
    assert [row["status"] for row in writer.results] == ["complete"]
    return tifffile.imread(out / slide.name.split(".")[0] / "mask.tif")


def test_demo_matches_slide_pipeline(region_slide: Path, tmp_path: Path, demo_checkpoint: Path) -> None:
    reference = slide_mask(region_slide, tmp_path / "slide", demo_module(demo_checkpoint), 0, "none")
    assert reference.shape == (400, 480) and reference.std() > 10

    # Patches cut with OpenSlide at the slide grid's tile origins (edge tiles white past the edge, as the slide reads).
    slide = openslide.OpenSlide(str(region_slide))
    src = tmp_path / "tiles"
    src.mkdir()
    origins = TileGrid((480, 400), 256, 0).origins()
    for x, y in origins:
        Image.fromarray(cut(slide, int(x), int(y), 256, 256)).save(src / f"x{x:04d}_y{y:04d}.png")
    Image.fromarray(cut(slide, 0, 0, 480, 400)).save(src / "whole.png")  # the region as one image: tiled like a slide
    writer = run_patches(src, tmp_path / "patches", demo_module(demo_checkpoint), mask=True, blend="none")
    assert all(row["outcome"] == "done" for row in writer.results) and len(writer.results) == len(origins) + 1
    for x, y in origins:
        mask = png(tmp_path / "patches" / f"x{x:04d}_y{y:04d}_mask.png").astype(int)
        h, w = min(256, 400 - y), min(256, 480 - x)
        diff = np.abs(mask[:h, :w] - reference[y : y + h, x : x + w].astype(int))
        assert diff.max() <= 1, (x, y, diff.max())
    whole = png(tmp_path / "patches" / "whole_mask.png").astype(int)
    assert np.abs(whole - reference.astype(int)).max() <= 1
    # The heatmap is the mask colour-mapped over the input: identical wherever the masks agree.
    rgb = cut(slide, 0, 0, 480, 400)
    heatmap = png(tmp_path / "patches" / "whole_heatmap.png")
    same = whole == reference
    assert same.mean() > 0.9
    np.testing.assert_array_equal(heatmap[same], render_heatmap(rgb, reference)[same])


def test_demo_tiled_image_blends_like_slide_pipeline(region_slide: Path, tmp_path: Path, demo_checkpoint: Path) -> None:
    reference = slide_mask(region_slide, tmp_path / "slide", demo_module(demo_checkpoint), 64, "gaussian")
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(cut(openslide.OpenSlide(str(region_slide)), 0, 0, 480, 400)).save(src / "whole.png")
    writer = run_patches(
        src, tmp_path / "patches", demo_module(demo_checkpoint), data={"overlap": 64}, mask=True, blend="gaussian"
    )
    assert writer.results[0]["tiles"] == len(TileGrid((480, 400), 256, 64).origins()) > 4
    whole = png(tmp_path / "patches" / "whole_mask.png").astype(int)
    assert np.abs(whole - reference.astype(int)).max() <= 1


# -- errors --------------------------------------------------------------------------------------------------------
def test_user_errors_name_the_option(patch_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="data.input_dir .* does not exist"):
        PatchFolderDataModule(tmp_path / "missing").plan_run()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="holds no images ending in .png"):
        PatchFolderDataModule(tmp_path / "empty").plan_run()
    with pytest.raises(UserInputError, match="data.patch_size=200 is not a multiple of the network's stride 16"):
        PatchFolderDataModule(patch_dir, patch_size=200).plan_run(16)
    with pytest.raises(UserInputError, match="data.pad_multiple must be a positive integer"):
        PatchFolderDataModule(patch_dir, pad_multiple=0)
    with pytest.raises(UserInputError, match="writer.output_downsample must be 1"):
        PatchWriter.outputs_for(tmp_path / "out", output_downsample=2)
    with pytest.raises(UserInputError, match="writer.opacity must be in"):
        PatchWriter(tmp_path / "out", plan=PatchPlan(patch_dir), opacity=2)

    # Modes that do not pair are refused from the config, before any model is built or image read.
    from hydra import compose, initialize_config_dir

    from wsiseg.config import config_dir
    from wsiseg.predict import run_predict

    common = [f"data.input_dir={patch_dir}", "model=probe", "trainer=cpu", f"writer.output_dir={tmp_path / 'o'}"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        slide_writer = compose(config_name="predict", overrides=["data=patches", *common])
        patch_writer = compose(config_name="predict", overrides=["writer=patches", "data.slides=x.svs", *common[1:]])
    with pytest.raises(UserInputError, match="add writer=patches"):
        run_predict(slide_writer)
    with pytest.raises(UserInputError, match="add data=patches"):
        run_predict(patch_writer)
    assert not (tmp_path / "o" / "report.json").exists()


def test_cli_exit_status_and_report(patch_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    shutil.copy(patch_dir / "a" / "p0.png", src / "sub" / "p0.png")
    shutil.copy(patch_dir / "small_100x70.png", src / "small.png")
    shutil.copy(patch_dir / "broken.png", src / "broken.png")
    out = tmp_path / "out"
    argv = [
        "data=patches",
        f"data.input_dir={src}",
        "writer=patches",
        f"writer.output_dir={out}",
        "model=demo",
        "trainer=cpu",
        "trainer.precision=32",
        "trainer.enable_progress_bar=false",
        "data.patch_size=256",
        "data.num_workers=1",
        "writer.mask=true",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    status, stdout, stderr = run_command(argv)
    assert status == 1, stderr[-2000:]  # broken.png failed
    logs = stdout + stderr
    assert "broken.png" in logs and "2 done, 0 skipped (outputs complete), 1 failed" in logs
    assert (out / "sub" / "p0_heatmap.png").is_file() and (out / "small_mask.png").is_file()
    assert png(out / "small_mask.png").shape == (70, 100)
    report = json.loads((out / "report.json").read_text())
    assert (report["images"], report["done"], report["failed"]) == (3, 2, 1)
    assert report["config"]["data"]["input_dir"] == str(src)

    # The same options with resume=true, through run_predict, once the broken file is gone: all kept, exit 0.
    from hydra import compose, initialize_config_dir

    from wsiseg.config import config_dir
    from wsiseg.predict import run_predict

    (src / "broken.png").unlink()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        overrides = [arg for arg in argv if not arg.startswith("hydra.")]
        cfg = compose(config_name="predict", overrides=[*overrides, "resume=true"])
    assert run_predict(cfg) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["images"], report["done"], report["skipped"], report["failed"]) == (2, 0, 2, 0)


def test_a_killed_runs_temporary_files_are_removed(patch_dir: Path, tmp_path: Path) -> None:
    """kill -9 mid-write leaves ``.<name>.<pid>.tmp`` (atomic_path's temporary name): the next run removes exactly
    those, not other hidden files."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(patch_dir / "small_100x70.png", src / "small.png")
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    leftover = out / "sub" / ".small_heatmap.png.4242.tmp"
    leftover.write_bytes(b"half a PNG")
    kept = out / ".notes.tmp"  # not of atomic_path's pattern
    kept.write_text("mine")
    writer = run_patches(src, out, probe_module())
    assert outcome(writer) == {"small.png": "done"}
    assert not leftover.exists() and kept.exists()


def _patch_run(input_dir: Path, output_dir: Path, *overrides: str) -> int:
    from tests.helpers import compose_predict
    from wsiseg.predict import run_predict

    cfg = compose_predict(
        [
            "model=demo",
            "trainer=cpu",
            "trainer.enable_progress_bar=false",
            "data=patches",
            "writer=patches",
            f"data.input_dir={input_dir}",
            f"writer.output_dir={output_dir}",
            "data.patch_size=256",
            "data.num_workers=0",
            "writer.write_workers=0",
            *overrides,
        ]
    )
    return run_predict(cfg)


def test_a_users_file_is_never_overwritten_nor_dropped_from_the_inputs(patch_dir: Path, tmp_path: Path) -> None:
    """Outputs written into the input folder: a user's ``case1_mask.png`` (ground truth) and ``case2_heatmap.png`` were
    overwritten and silently left out of the inputs. Now the run is refused before anything is written, and a user's
    file named like an output this run does not write stays an input."""
    from wsiseg.errors import UserInputError

    src = tmp_path / "in"
    src.mkdir()
    for name in ("case1.png", "case2.png"):
        shutil.copy(patch_dir / "a" / "p0.png", src / name)
    Image.new("L", (256, 256), 255).save(src / "case1_mask.png")  # the user's ground truth
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(UserInputError, match=r"holds '.*case1_mask.png' \(1 such file\(s\)\), which this run would"):
        _patch_run(src, src, "writer.mask=true")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    # without masks nothing of the user's is in the way: the ground truth is an input like the others
    assert _patch_run(src, src) == 0
    assert (src / "case1_mask.png").read_bytes() == before["case1_mask.png"]
    assert {p.name for p in src.glob("*_heatmap.png")} == {
        "case1_heatmap.png",
        "case2_heatmap.png",
        "case1_mask_heatmap.png",
    }
    (src / "case2_heatmap.png").unlink()
    Image.new("RGB", (16, 16)).save(src / "case2_heatmap.png")  # a user's picture of that name
    with pytest.raises(UserInputError, match="case2_heatmap.png"):
        _patch_run(src, src)


def test_resume_redoes_an_input_changed_with_its_mtime_set_back(patch_dir: Path, tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    shutil.copy(patch_dir / "a" / "p0.png", src / "x.png")
    assert _patch_run(src, out) == 0
    heatmap = (out / "x_heatmap.png").read_bytes()
    stat = (src / "x.png").stat()
    Image.new("RGB", (256, 256), (120, 40, 160)).save(src / "x.png")  # new pixels, another file size ...
    os.utime(src / "x.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the old modification time
    assert _patch_run(src, out, "resume=true") == 0
    assert (out / "x_heatmap.png").read_bytes() != heatmap
    report = json.loads((out / "report.json").read_text())
    assert report["done"] == 1 and report["skipped"] == 0


def test_a_corrupt_large_image_is_decoded_once_and_fails_alone(
    patch_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3000x2000 image whose data is cut short plans as 96 pieces; it once was decoded again for every batch of its
    pieces (and the network ran on each white piece). Now it is decoded once, fails with the decoder's reason, and
    the other images complete."""
    from wsiseg.data import patches as patches_module

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(patch_dir / "a" / "p0.png", src / "good.png")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (2000, 3000, 3), dtype=np.uint8)).save(src / "big.png")
    data = (src / "big.png").read_bytes()
    (src / "big.png").write_bytes(data[: len(data) // 3])  # the header is whole, the pixels are not
    decodes: list[str] = []
    real = patches_module.load_rgb

    def counted(path: Path) -> np.ndarray:
        decodes.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(patches_module, "load_rgb", counted)
    out = tmp_path / "out"
    assert _patch_run(src, out, "data.batch_size=4") == 1
    assert decodes.count("big.png") == 1
    results = {Path(r["image"]).name: r for r in json.loads((out / "report.json").read_text())["results"]}
    assert results["good.png"]["status"] == "complete"
    assert results["big.png"]["status"] == "failed" and "cannot be decoded" in results["big.png"]["reason"]
    assert not (out / "big_heatmap.png").exists()
