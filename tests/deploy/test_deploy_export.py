"""``run_export`` and ``ExportOptions`` (:mod:`wsiseg.deploy.export`) whatever the format: the full-size network, a
failed verification that writes nothing, bad input as one clear line, a network with fixed weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.deploy.deploy_helpers import compose_cfg
from wsiseg.deploy.export import run_export
from wsiseg.deploy.verify import FP32_TOLERANCE, VerificationError
from wsiseg.errors import UserInputError
from wsiseg.model import Unet
from wsiseg.runtimes.files import sidecar_path


def test_default_size_unet_exports_in_both_formats(tmp_path: Path) -> None:
    """The users' Unet(3, 3) at base width 64 (random weights), one 64x64 size to stay fast."""
    torch.manual_seed(3)
    ckpt = tmp_path / "UNet_random.pth"
    torch.save(Unet(3, 3).state_dict(), ckpt)
    common = [f"model.checkpoint={ckpt}", "export.sizes=[[64,64]]", "export.batches=[1,2]"]
    onnx_side = run_export(compose_cfg("export", [*common, f"export.path={tmp_path / 'unet.onnx'}"]))
    ts_side = run_export(
        compose_cfg("export", [*common, "export.format=torchscript", f"export.path={tmp_path / 'unet.pt'}"])
    )
    for side in (onnx_side, ts_side):
        assert side["output"]["channels"] == 3
        assert side["architecture"]["base_width"] == 64
        assert len(side["verification"]["cases"]) == 2
        assert side["verification"]["max_abs_diff"] <= FP32_TOLERANCE
    assert (tmp_path / "unet.onnx").stat().st_size > 31_000_000 * 4 * 0.95  # all 31M float32 weights are in it


def test_failed_verification_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "demo16.onnx"
    cfg = compose_cfg("export", ["model=demo", "export.fp16=true", "export.tolerance=1e-7", f"export.path={path}"])
    with pytest.raises(VerificationError, match="export.tolerance=1e-07"):
        run_export(cfg)
    assert not path.exists() and not sidecar_path(path).exists()
    assert not list(tmp_path.iterdir()), "no temporary file is left behind"


def _unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through mode bits; /proc accepts no new files for anyone
        return Path("/proc")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.checkpoint=/nonexistent/UNet_17.pth"], r"model.checkpoint '/nonexistent/UNet_17.pth' does not exist"),
        (["model.checkpoint=${wsiseg.asset:demo_unet.pt}"], r"does not match Unet: .*shape mismatches"),
        (["model=demo", "export.opset=29"], r"export.opset=29 cannot be written: the installed onnx .* opsets 11-28"),
        (["model=demo", "export.opset=9"], r"export.opset=9 cannot be written"),
        (["model=demo", "export.format=tflite"], r"export.format must be one of onnx, torchscript, openvino"),
        (["model=demo", "export.format=openvino"], r"export.format=openvino writes an OpenVINO IR pair .* end in .xml"),
        (
            ["model=demo", "export.format=openvino", "export.fp16=true", "export.path=PLACE/u.xml"],
            r"export.fp16=true is for onnx and torchscript",
        ),
        (["model=demo", "export.sizes=[[64,60]]"], r"export.sizes entry \[64, 60\] .* multiples of .* stride 16"),
        (["model=demo", "export.path=null"], r"export.path is required"),
        (["model=demo", "export.path=/nonexistent/dir/u.onnx"], r"folder '/nonexistent/dir' does not exist"),
        (["model=demo", "export.path=UNWRITABLE/u.onnx"], r"folder '.*' is not writable"),
        (["export.path=x.onnx"], r"model.checkpoint is required"),
        (["model.checkpoint=null"], r"model.checkpoint is required"),
        (["model.checkpoint=random"], r"model.checkpoint=random: wsiseg-export refuses untrained weights"),
        (["model=onnx", "model.net.path=x.onnx"], r"model.net is an ONNX file: wsiseg-export exports a PyTorch"),
    ],
)
def test_bad_input_fails_with_one_clear_line(tmp_path: Path, overrides: list[str], message: str) -> None:
    overrides = [o.replace("UNWRITABLE", str(_unwritable_folder(tmp_path))) for o in overrides]
    overrides = [o.replace("PLACE", str(tmp_path)) for o in overrides]
    if not any(o.startswith("export.path") for o in overrides):
        overrides.append(f"export.path={tmp_path / 'u.onnx'}")
    with pytest.raises(UserInputError, match=message) as info:
        run_export(compose_cfg("export", overrides))
    assert "\n" not in str(info.value)


def test_probe_exports_without_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "probe.onnx"
    side = run_export(compose_cfg("export", ["model=probe", f"export.path={path}", "export.batches=[1]"]))
    assert side["checkpoint"] is None and side["output"]["channels"] == 1
    assert side["input"]["height_width_multiple_of"] == 1
