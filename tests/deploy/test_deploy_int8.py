"""wsiseg-export export.quantize=int8: calibrated on real tissue, checked against FP32, refused under the floor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from tests.conftest import shared_slide
from tests.helpers import run_command
from wsiseg.deploy.calibration import sample_tissue_tiles
from wsiseg.deploy.export import ExportOptions
from wsiseg.deploy.int8_openvino import nncf_available
from wsiseg.errors import UserInputError
from wsiseg.head import dice
from wsiseg.module import SegmentationModule
from wsiseg.runtimes.files import sidecar_path

pytest.importorskip("openvino", reason="the INT8 check runs both models by OpenVINO")


def export(tmp_path: Path, *overrides: str) -> tuple[int, str, str]:
    """``wsiseg-export model=demo ...`` in this process: (exit status, stdout, stderr)."""
    return run_command(["model=demo", *overrides, f"hydra.run.dir={tmp_path / 'hydra'}"], command="wsiseg-export")


def flat_slide(path: Path) -> Path:
    """A tiled TIFF of one saturated colour: 'tissue' to the detector, a useless calibration set (every activation
    of a constant image is one value, so the ranges it gives clip real tissue)."""
    pixels = np.empty((1024, 1024, 3), np.uint8)
    pixels[:] = (200, 90, 190)
    tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", compression="zlib")
    return path


needs_nncf = pytest.mark.skipif(not nncf_available(), reason="NNCF is not installed (pip install 'wsiseg[int8]')")
# export.format -> the INT8 file's name; the NNCF case needs NNCF (in the dev extra, so CI runs it)
FORMATS = [
    pytest.param("onnx", "demo-int8.onnx", id="onnxruntime-qdq"),
    pytest.param("openvino", "demo-int8.xml", id="nncf", marks=needs_nncf),
]


@pytest.fixture(scope="module", params=[pytest.param(p.values, id=p.id, marks=p.marks) for p in FORMATS])
def int8_export(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, synthetic_slide: Path
) -> tuple[Path, dict, str]:
    """The demo network quantised on tissue of CMU-1-Small-Region and a generated slide, by each quantiser:
    (file, sidecar, stdout)."""
    fmt, name = request.param
    out = tmp_path_factory.mktemp("int8")
    path = out / name
    slides = f"[{shared_slide('CMU-1-Small-Region.svs')},{synthetic_slide}]"
    status, stdout, stderr = export(
        out,
        f"export.format={fmt}",
        f"export.path={path}",
        "export.quantize=int8",
        f"export.calibration_slides={slides}",
        "export.calibration_tiles=24",
        "export.holdout_tiles=24",
    )
    assert status == 0, stderr[-3000:]
    return path, json.loads(sidecar_path(path).read_text()), stdout


def test_int8_meets_the_dice_floor_on_held_out_tissue(int8_export: tuple[Path, dict, str]) -> None:
    path, sidecar, stdout = int8_export
    q = sidecar["quantization"]
    assert q["dice_vs_fp32"] >= 0.99 and not q["forced"] and q["dice_floor"] == 0.99
    assert 0 < q["mean_abs_diff"] < 0.02 and q["max_abs_diff"] <= 1.0
    calibration = {(t["slide"], t["x"], t["y"]) for t in q["calibration"]["tiles"]}
    held_out = {(t["slide"], t["x"], t["y"]) for t in q["held_out"]["tiles"]}
    assert len(calibration) == len(held_out) == 24 and not calibration & held_out  # disjoint tiles
    assert len({slide for slide, _, _ in calibration | held_out}) == 2  # pooled over both slides
    assert set(q["dice_vs_fp32_per_slide"]) <= {slide for slide, _, _ in held_out}
    assert "int8 vs fp32 on held-out tissue tiles: Dice" in stdout
    if path.suffix == ".onnx":  # the file is quantised: QDQ nodes around INT8 weights
        import onnx

        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "onnxruntime" in q["scheme"]
    else:  # an IR pair whose convolutions take FakeQuantize'd inputs, INT8 weights in the .bin
        import openvino as ov

        model = ov.Core().read_model(str(path))
        ops = [op.get_type_name() for op in model.get_ordered_ops()]
        assert ops.count("FakeQuantize") >= ops.count("Convolution") > 0 and "NNCF" in q["scheme"]
        constants = {
            str(op.get_output_element_type(0)) for op in model.get_ordered_ops() if op.get_type_name() == "Constant"
        }
        assert "<Type: 'int8_t'>" in constants
        assert path.with_suffix(".bin").is_file() and sidecar["weights_file"] == path.with_suffix(".bin").name
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [path.name, f"{path.name}.json", "hydra"] + ([path.with_suffix(".bin").name] if path.suffix == ".xml" else [])
    )  # no scratch left behind


def test_int8_file_runs_in_the_pipeline_close_to_fp32(
    int8_export: tuple[Path, dict, str], demo_checkpoint: Path
) -> None:
    """model=openvino on the INT8 file: the same module interface; its masks agree with eager FP32 PyTorch."""
    from wsiseg.model import Unet
    from wsiseg.runtimes.openvino import OpenVinoNet

    int8 = SegmentationModule(OpenVinoNet(int8_export[0]))
    fp32 = SegmentationModule(Unet(3, 1, base_width=8), checkpoint=str(demo_checkpoint), compile=False)
    (tiles,) = sample_tissue_tiles([str(shared_slide("CMU-1-Small-Region.svs"))], 256, (8,), 5, None, None)
    with torch.inference_mode():
        a, b = int8(tiles.images), fp32(tiles.images)
    assert dice(a >= 0.5, b >= 0.5) >= 0.98


@pytest.mark.parametrize(("fmt", "name"), FORMATS)
def test_int8_under_the_floor_is_refused_and_not_written(tmp_path: Path, fmt: str, name: str) -> None:
    """A deliberately bad calibration set (one flat colour) checked on real tissue: one line, exit 2, no file (nor
    half an IR pair); forced, it is written and the sidecar says so."""
    bad = flat_slide(tmp_path / "flat.tif")
    path = tmp_path / f"bad-{name}"
    common = [
        f"export.format={fmt}",
        f"export.path={path}",
        "export.quantize=int8",
        f"export.calibration_slides=[{bad}]",
        f"export.holdout_slides=[{shared_slide('CMU-1-Small-Region.svs')}]",
        "export.calibration_tiles=4",
        "export.holdout_tiles=12",
    ]
    status, _, stderr = export(tmp_path, *common)
    assert status == 2, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("wsiseg-export: error: the INT8 model's Dice vs FP32 is ")
    assert "under export.dice_floor=0.99" in line and "export.force=true" in line and "Traceback" not in stderr
    assert not path.exists() and not sidecar_path(path).exists() and not path.with_suffix(".bin").exists()
    # nothing half-written left behind, nor the refused run's folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.tif"]
    if fmt != "onnx":
        return  # export.force does not depend on the quantiser: checked once, on the quicker one
    status, stdout, stderr = export(tmp_path, *common, "export.force=true")
    assert status == 0, stderr[-3000:]
    side = json.loads(sidecar_path(path).read_text())["quantization"]
    assert side["forced"] and side["dice_vs_fp32"] < 0.99 and "written anyway" in stdout + stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantize": "int4"}, "export.quantize must be one of none, int8; got 'int4'"),
        ({"quantize": "int8"}, "export.quantize=int8 needs tissue to calibrate on"),
        ({"quantize": "int8", "format": "torchscript", "calibration_slides": ["a.svs"]}, "export.format=openvino"),
        ({"quantize": "int8", "fp16": True, "calibration_slides": ["a.svs"]}, "export.fp16=false"),
        ({"quantize": "int8", "calibration_slides": ["a.svs"], "dice_floor": 1.5}, "export.dice_floor must be in"),
    ],
)
def test_quantize_options_are_checked(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        ExportOptions(path=str(tmp_path / "m.onnx"), **options)


def test_nncf_missing_is_one_line_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NNCF, export.format=openvino export.quantize=int8 is refused when the options are read (not after the
    export and the tile sampling), saying how to install it or which quantiser needs nothing more."""
    monkeypatch.setitem(sys.modules, "nncf", None)  # as if not installed: the import fails
    with pytest.raises(UserInputError, match=r"needs NNCF: pip install 'wsiseg\[int8\]' \(or export.format=onnx"):
        ExportOptions(format="openvino", path=str(tmp_path / "m.xml"), quantize="int8", calibration_slides=["a.svs"])


def test_too_few_tissue_tiles_is_one_line() -> None:
    with pytest.raises(UserInputError, match=r"hold \d+ tissue tiles of 256 px, 1000 are needed"):
        sample_tissue_tiles([str(shared_slide("CMU-1-Small-Region.svs"))], 256, (500, 500), 0, None, None)
