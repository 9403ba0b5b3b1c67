"""model.runtime: the rule that picks torch or OpenVINO, and the OpenVINO runtime of a torch network on real slides."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from tests.conftest import shared_slide
from tests.helpers import predict
from wsiseg.errors import UserInputError
from wsiseg.hardware import cpu_precision
from wsiseg.model import Unet
from wsiseg.module import SegmentationModule
from wsiseg.runtimes.choice import choose_runtime
from wsiseg.runtimes.openvino import TorchOnOpenVino, openvino_available


@pytest.mark.parametrize(
    ("requested", "device", "precision", "tiles", "installed", "expected"),
    [
        ("auto", "cpu", "32-true", 500, True, "openvino"),
        ("auto", "cpu", "32-true", 127, True, "torch"),  # under runtime_min_tiles=128
        ("auto", "cpu", "32-true", None, True, "torch"),  # patch mode: unknown tile count
        ("auto", "cpu", "32-true", 500, False, "torch"),
        ("auto", "cpu", "bf16-mixed", 500, True, "torch"),  # AVX-512-BF16: torch's bf16 + compile path
        ("auto", "cuda", "16-mixed", 500, True, "torch"),
        ("torch", "cpu", "32-true", 500, True, "torch"),
        ("openvino", "cpu", "32-true", 1, True, "openvino"),
    ],
)
def test_choose_runtime_rule(
    requested: str, device: str, precision: str, tiles: int | None, installed: bool, expected: str
) -> None:
    runtime, why = choose_runtime(requested, device, precision, tiles, 128, installed)
    assert runtime == expected and why


@pytest.mark.parametrize(
    ("requested", "device", "installed", "message"),
    [
        ("openvino", "cuda", True, "model.runtime=openvino runs on the CPU; the trainer runs on cuda"),
        ("openvino", "cpu", False, "model.runtime=openvino needs OpenVINO"),
        ("tensorrt", "cpu", True, "model.runtime must be one of auto, torch, openvino, openvino_int8; got 'tensorrt'"),
    ],
)
def test_choose_runtime_refuses(requested: str, device: str, installed: bool, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        choose_runtime(requested, device, "32-true", 500, 128, installed)


def test_auto_on_this_cpu_picks_its_measured_fast_path() -> None:
    """On the CPU the test runs on: float32 CPUs (AVX2) get OpenVINO for a long run, bf16 CPUs torch."""
    module = SegmentationModule(Unet(3, 1, base_width=4), checkpoint="random")
    module.prepare("cpu", planned_tiles=1000, precision=cpu_precision())
    expected = "openvino" if cpu_precision() == "32-true" and openvino_available() else "torch"
    assert module.runtime_used == expected
    assert isinstance(module._runtime, TorchOnOpenVino) == (expected == "openvino")
    # the torch weights appear once in the state dict whichever runtime runs them
    assert all(key.startswith("net.") for key in module.state_dict())


def test_torch_on_openvino_equals_torch_fp32_and_pickles() -> None:
    pytest.importorskip("openvino", reason="OpenVINO is not installed")
    torch.manual_seed(0)
    net = Unet(3, 2, base_width=4).eval()
    wrapped = TorchOnOpenVino(net)
    x = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        reference = net(x)
    out = wrapped(x)
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert float((out - reference).abs().max()) < 1e-4
    clone = pickle.loads(pickle.dumps(wrapped))  # DDP spawn pickles the module: the compiled model is rebuilt
    assert clone._compiled is None
    assert float((clone(x[:1, :, :32, :32]) - wrapped(x[:1, :, :32, :32])).abs().max()) < 1e-6


def test_openvino_refused_for_an_onnx_file(tmp_path: Path) -> None:
    from wsiseg.runtimes.onnx_graph import export_onnx
    from wsiseg.runtimes.onnxruntime import OnnxRuntimeNet

    path = export_onnx(Unet(3, 1, base_width=4), tmp_path / "net.onnx")
    with pytest.raises(UserInputError, match="model.runtime=openvino is for torch networks"):
        SegmentationModule(OnnxRuntimeNet(path), runtime="openvino")


def _mask(out: Path) -> np.ndarray:
    return tifffile.imread(next(out.glob("*/mask.tif")))


def test_real_slide_mask_auto_runtime_equals_torch_fp32(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """wsiseg-predict on CMU-1-Small-Region with model.runtime=auto as a long run would choose it (threshold 0):
    the mask equals the torch FP32 mask within 1 grey level, and the log says which runtime ran."""
    slide = shared_slide("CMU-1-Small-Region.svs")
    common = ["model=demo", "data.patch_size=256", "writer.output_downsample=4"]
    assert predict(slide, tmp_path / "torch", [*common, "model.runtime=torch"]) == 0
    with caplog.at_level(logging.INFO, logger="wsiseg.module"):
        assert predict(slide, tmp_path / "auto", [*common, "model.runtime=auto", "model.runtime_min_tiles=0"]) == 0
    expected = "openvino" if openvino_available() else "torch"  # the tests run at trainer.precision=32
    assert f"model.runtime=auto: {expected}" in caplog.text
    assert ("an INT8 export (wsiseg-export export.format=openvino" in caplog.text) == (expected == "openvino")
    reference, auto = _mask(tmp_path / "torch"), _mask(tmp_path / "auto")
    assert reference.shape == auto.shape and int(reference.max()) - int(reference.min()) > 50
    diff = np.abs(reference.astype(np.int16) - auto.astype(np.int16))
    assert diff.max() <= 1, f"{(diff > 1).sum()} mask pixels differ by more than 1 grey level"
