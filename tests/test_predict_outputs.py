"""End-to-end outputs: the users' checkpoint through model.checkpoint, the demo model's Dice through the real console
script, and the files themselves (mask.tif pyramid + tags, heatmap.png, report.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import torch
from PIL import Image

from tests.helpers import predict
from wsiseg.data.slide import rgba_to_rgb
from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide
from wsiseg.data.tissue import read_thumbnail
from wsiseg.model import Unet
from wsiseg.writers.tiff import pyramid_sizes


def test_users_full_size_checkpoint_matches_network_output(tmp_path: Path) -> None:
    """A state_dict with the replaced script's keys (136, 31,043,651 parameters) loads through model.checkpoint and
    the fp32 mask equals the network's own output on each tile (RGB/255, mean=std=0.5, max over channels) ±1 level."""
    torch.manual_seed(17)
    net = Unet(3, 3).eval()
    with torch.no_grad():  # give BatchNorm non-trivial statistics so outputs vary across the tile
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        net.conv10.weight.mul_(40.0)  # spread the sigmoid's input so probabilities span most of 0..1
    state = net.state_dict()
    assert len(state) == 136 and sum(p.numel() for p in net.parameters()) == 31_043_651
    checkpoint = tmp_path / "UNet_17.pth"
    torch.save(state, checkpoint)
    slide_path = write_synthetic_slide(tmp_path / "exact.tif", SyntheticSlide(512, 256, seed=3, tissue_scale=0.4))

    status = predict(
        slide_path,
        tmp_path / "out",
        [
            "model=unet_camelyon",
            f"model.checkpoint={checkpoint}",
            "model.output_dtype=float32",
            "data.patch_size=256",
            "data.overlap=0",
            "data.tissue.enabled=false",
            "data.batch_size=2",
        ],
    )
    assert status == 0
    mask = tifffile.imread(tmp_path / "out" / "exact" / "mask.tif", key=0)

    with openslide.OpenSlide(str(slide_path)) as slide:
        rgb = rgba_to_rgb(np.asarray(slide.read_region((0, 0), 0, (512, 256))))
    expected = np.zeros((256, 512), np.float64)
    with torch.no_grad():
        for x0 in (0, 256):
            tile = torch.from_numpy(rgb[:, x0 : x0 + 256].copy()).permute(2, 0, 1)[None].float()
            probs = net((tile / 255.0 - 0.5) / 0.5)
            expected[:, x0 : x0 + 256] = probs.max(dim=1).values[0].double().numpy() * 255.0
    assert expected.std() > 1.0, "the reference must vary for the comparison to mean something"
    diff = np.abs(mask.astype(np.float64) - np.rint(expected))
    assert diff.max() <= 1.0, f"max difference {diff.max()} grey levels"


def test_demo_model_dice_through_console_script(tmp_path: Path) -> None:
    """The shipped demo checkpoint on a freshly generated slide (seed unseen in training), via `wsiseg-predict`."""
    spec = SyntheticSlide(3072, 2304, seed=4242)
    slide_path = write_synthetic_slide(tmp_path / "fresh.tif", spec)
    run_dir = tmp_path / "run"
    script = Path(sys.executable).parent / "wsiseg-predict"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [
            str(script),
            "model=demo",
            f"data.slides={slide_path}",
            "data.patch_size=256",
            "data.overlap=32",
            "data.num_workers=2",
            "writer.output_downsample=4",
            "trainer=cpu",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mask = tifffile.imread(run_dir / "fresh" / "mask.tif", key=0)
    truth = spec.ground_truth(4, (mask.shape[1], mask.shape[0]))
    predicted = mask >= 128
    dice = 2 * np.logical_and(predicted, truth).sum() / (predicted.sum() + truth.sum())
    print(f"demo Dice {dice:.4f}")
    assert truth.sum() > 1000
    assert dice >= 0.90
    report = json.loads((run_dir / "fresh" / "report.json").read_text())
    assert report["status"] == "complete"
    assert report["tumour_area_mm2"] == pytest.approx(predicted.sum() * (0.5 * 4 * 1e-3) ** 2)
    assert (run_dir / ".hydra" / "config.yaml").exists()


def test_mask_tif_heatmap_and_report(synthetic_slide: Path, tmp_path: Path, demo_checkpoint: Path) -> None:
    status = predict(
        synthetic_slide,
        tmp_path,
        ["model=demo", "data.patch_size=128", "writer.output_downsample=2", "writer.tiff_tile=128", "writer.chunk=256"],
    )
    assert status == 0
    out = tmp_path / "synth"
    report = json.loads((out / "report.json").read_text())

    with openslide.OpenSlide(str(out / "mask.tif")) as mask_slide:
        expected_sizes = pyramid_sizes((1000, 750), 128)
        assert [tuple(d) for d in mask_slide.level_dimensions] == expected_sizes
        assert len(expected_sizes) == report["mask_levels"] == 4
        assert float(mask_slide.properties["openslide.mpp-x"]) == pytest.approx(0.5 * 2, rel=1e-4)
        assert float(mask_slide.properties["openslide.mpp-y"]) == pytest.approx(0.5 * 2, rel=1e-4)
    with tifffile.TiffFile(out / "mask.tif") as tif:
        assert len(tif.pages) == 4
        level0 = tif.pages[0].asarray()
        assert level0.shape == (750, 1000) and level0.dtype == np.uint8
        assert tif.pages[0].is_tiled
        # aspect ratio of the slide (2000 x 1500)
        assert level0.shape[1] / level0.shape[0] == pytest.approx(2000 / 1500)
        level1 = tif.pages[1].asarray()
        np.testing.assert_allclose(level1.astype(float), level0.reshape(375, 2, 500, 2).mean(axis=(1, 3)), atol=1)

    with openslide.OpenSlide(str(synthetic_slide)) as slide:
        thumbnail = read_thumbnail(slide, 2048)
    heatmap = np.asarray(Image.open(out / "heatmap.png"))
    assert heatmap.shape == thumbnail.rgb.shape
    assert np.abs(heatmap.astype(int) - thumbnail.rgb).max() > 50, "the overlay must show on the thumbnail"

    for key in (
        "level0_size",
        "level",
        "mpp_read_level",
        "tiles_total",
        "tiles_tissue",
        "tiles_processed",
        "tissue_fraction",
        "tumour_area_mm2",
        "wall_time_s",
        "patches_per_s",
        "config",
    ):
        assert key in report, key
    assert report["level0_size"] == [2000, 1500]
    assert report["config"]["data"]["patch_size"] == 128
    assert not any(p.name.startswith(".") for p in out.iterdir()), "temporary files left behind"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["status"] for row in summary["slides"]] == ["complete"]


class DominantColour(torch.nn.Module):
    """Three classes = the dominant RGB channel (a fixed 1x1 convolution), for checking the label path."""

    stride = 1
    fixed_weights = True  # set in __init__: no checkpoint to load

    def __init__(self, **_: object) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1) * 20.0)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_multi_class_model_writes_class_labels(tmp_path: Path, synthetic_slide: Path) -> None:
    """model.reduction=none keeps every class: mask.tif holds argmax labels, not probabilities."""
    status = predict(
        synthetic_slide,
        tmp_path / "out",
        [
            "model=probe",
            "model.net._target_=tests.test_predict_outputs.DominantColour",
            "model.activation=softmax",
            "model.reduction=none",
            "model.output_dtype=float32",
            "data.patch_size=256",
            "data.overlap=64",
            "data.tissue.enabled=false",
        ],
    )
    assert status == 0
    mask = tifffile.imread(tmp_path / "out" / "synth" / "mask.tif", key=0)
    with openslide.OpenSlide(str(synthetic_slide)) as slide:
        rgb = rgba_to_rgb(np.asarray(slide.read_region((0, 0), 0, slide.dimensions))).astype(int)
    expected = rgb.argmax(axis=2)
    unique = (np.sort(rgb, axis=2)[..., 2] - np.sort(rgb, axis=2)[..., 1]) >= 2  # no near-tie between channels
    assert {0, 2} <= set(np.unique(mask)) <= {0, 1, 2}  # pink stroma -> red, nuclei and bluish glass -> blue
    np.testing.assert_array_equal(mask[unique], expected[unique])
    heatmap = np.asarray(Image.open(tmp_path / "out" / "synth" / "heatmap.png"))
    assert heatmap.ndim == 3


# -- viewers: ASAP's and Bio-Formats' own readers, contours a viewer can hold, the run at a glance ------------------
def test_real_slide_outputs_for_the_viewers(tmp_path: Path) -> None:
    """CMU-1-Small-Region with the defaults and contours: the mask passes ASAP's acceptance rules and OpenSlide and
    tifffile read every level; the contours are valid and simplified within 0.5 % of the unsimplified polygons'
    area; summary.csv and index.html describe the run. With writer.layout=ome: one series whose levels are the
    pyramid, and the OME pixel size is the slide's mpp × the output downsample."""
    from xml.etree import ElementTree

    import shapely
    from shapely.geometry import shape

    from tests.conftest import shared_slide
    from tests.writers.test_tiff import asap_refusals

    slide = shared_slide("CMU-1-Small-Region.svs")
    common = [
        "model=demo",
        "data.patch_size=256",
        "writer.output_downsample=2",
        "writer.contours=[geojson,asap_xml]",
        "writer.min_area_um2=0",  # every region and hole: the polygons against the mask's pixels
    ]
    assert predict(slide, tmp_path / "plain", [*common, "writer.simplify_um=0"]) == 0
    assert predict(slide, tmp_path / "run", common) == 0
    out = tmp_path / "run" / "CMU-1-Small-Region"
    report = json.loads((out / "report.json").read_text())
    assert asap_refusals(out / "mask.tif") == []
    sizes = pyramid_sizes(tuple(report["output_size"]), 256)
    with tifffile.TiffFile(out / "mask.tif") as tif:
        assert [lv.shape for lv in tif.series[0].levels] == [(h, w) for w, h in sizes]
    with openslide.OpenSlide(str(out / "mask.tif")) as mask:
        assert mask.level_dimensions == tuple(sizes)
        assert float(mask.properties["openslide.mpp-x"]) == pytest.approx(report["output_mpp"], rel=1e-4)

    plain = json.loads((tmp_path / "plain" / "CMU-1-Small-Region" / "report.json").read_text())
    geoms = [shape(f["geometry"]) for f in json.loads((out / "tumour.geojson").read_text())["features"]]
    plain_geoms = [
        shape(f["geometry"])
        for f in json.loads((tmp_path / "plain" / "CMU-1-Small-Region" / "tumour.geojson").read_text())["features"]
    ]
    assert geoms and all(g.is_valid for g in geoms)
    area, plain_area = sum(g.area for g in geoms), sum(g.area for g in plain_geoms)
    assert abs(area - plain_area) / plain_area < 0.005
    mask_area = report["tumour_pixels"] * (report["level_downsample"] * 2) ** 2
    assert abs(plain_area - mask_area) / mask_area < 0.01  # the traced pixel edges
    assert report["contour_vertices"] < 0.6 * plain["contour_vertices"]
    assert report["contour_file_bytes"]["tumour.xml"] < plain["contour_file_bytes"]["tumour.xml"]
    print(
        f"contours: {plain['contour_vertices']} -> {report['contour_vertices']} vertices, tumour.xml "
        f"{plain['contour_file_bytes']['tumour.xml']} -> {report['contour_file_bytes']['tumour.xml']} bytes, "
        f"area vs mask {plain_area / mask_area:.4f} -> {area / mask_area:.4f}"
    )
    assert shapely.get_num_coordinates(shapely.GeometryCollection(geoms)) == report["contour_vertices"]

    csv_text = (tmp_path / "run" / "summary.csv").read_text().splitlines()
    assert csv_text[0].startswith("slide,status,slide_score,tissue_mm2")
    assert "CMU-1-Small-Region.svs,complete" in csv_text[1]
    assert "data:image/jpeg;base64," in (tmp_path / "run" / "index.html").read_text()

    assert predict(slide, tmp_path / "ome", [*common, "writer.layout=ome"]) == 0
    with tifffile.TiffFile(tmp_path / "ome" / "CMU-1-Small-Region" / "mask.tif") as tif:
        assert tif.is_ome and len(tif.series) == 1
        assert [lv.shape for lv in tif.series[0].levels] == [(h, w) for w, h in sizes]
        pixels = next(e for e in ElementTree.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels"))
    assert float(pixels.get("PhysicalSizeX")) == pytest.approx(report["mpp_read_level"] * 2, rel=1e-6)
