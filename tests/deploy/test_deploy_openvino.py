"""``export.format=openvino`` (:mod:`wsiseg.deploy.openvino`): the IR pair verified as OpenVINO runs it, and its mask
in the pipeline."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared_slide
from tests.deploy.deploy_helpers import predict_mask, run_main
from wsiseg.deploy.verify import FP32_TOLERANCE
from wsiseg.runtimes.files import sidecar_path


def test_openvino_ir_export_is_verified_and_its_mask_equals_torch(tmp_path: Path, demo_checkpoint: Path) -> None:
    """export.format=openvino: the verified ONNX graph written as an IR pair (float32 weights), verified again as
    OpenVINO runs it; model=openvino reads the .xml and its sidecar, and its mask on a real slide equals eager torch
    FP32's within 1 grey level."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed")
    import openvino as ov

    path = tmp_path / "demo.xml"
    with pytest.MonkeyPatch.context() as monkeypatch:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            run_main(["model=demo", "export.format=openvino", f"export.path={path}"], monkeypatch, tmp_path / "hydra")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.bin", "demo.xml", "demo.xml.json", "hydra"]
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["format"] == "openvino" and sidecar["weights_file"] == "demo.bin" and sidecar["opset"] == 17
    assert sidecar["verification"]["runtime"].startswith("OpenVINO") and "verified with OpenVINO" in stdout.getvalue()
    assert sidecar["verification"]["max_abs_diff"] <= FP32_TOLERANCE
    model = ov.Core().read_model(str(path))
    weights = [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant" and op.get_output_size()]
    assert {str(op.get_output_element_type(0)) for op in weights if op.shape and len(op.shape) == 4} == {
        "<Type: 'float32'>"
    }
    slide = shared_slide("CMU-1-Small-Region.svs")
    torch_mask = predict_mask(slide, tmp_path / "torch", ["model.runtime=torch"])
    ov_mask = predict_mask(slide, tmp_path / "ov", ["model=openvino", f"model.net.path={path}"])
    assert torch_mask.shape == ov_mask.shape and int(torch_mask.max()) - int(torch_mask.min()) > 50
    diff = np.abs(torch_mask.astype(np.int16) - ov_mask.astype(np.int16))
    assert diff.max() <= 1, f"{(diff > 1).sum()} mask pixels differ by more than 1 grey level"
