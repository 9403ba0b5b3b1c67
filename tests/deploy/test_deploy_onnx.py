"""``wsiseg-export export.format=onnx`` (verified: :mod:`wsiseg.deploy.onnx`) and the ONNX network (``model/net=onnx``)
in the slide pipeline."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import shared_slide
from tests.deploy.deploy_helpers import compose_cfg, demo_net, normalised, predict_mask, run_main
from tests.helpers import run_command
from wsiseg.deploy.export import run_export
from wsiseg.deploy.onnx import verify_onnx
from wsiseg.deploy.verify import FP16_TOLERANCE, FP32_TOLERANCE, VerificationError
from wsiseg.errors import UserInputError
from wsiseg.model import Unet
from wsiseg.module import SegmentationModule
from wsiseg.runtimes.files import sidecar_path
from wsiseg.runtimes.onnxruntime import OnnxRuntimeNet


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The demo checkpoint exported through the command's entry point (opset 17, fp32, verified): (file, stdout)."""
    out = tmp_path_factory.mktemp("export")
    path = out / "demo.onnx"
    argv = ["model=demo", "export.format=onnx", f"export.path={path}", "export.opset=17", "export.fp16=false"]
    with pytest.MonkeyPatch.context() as monkeypatch:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            run_main(argv, monkeypatch, out / "hydra")
    return path, stdout.getvalue()


def test_entry_point_writes_checked_onnx_with_dynamic_axes_and_sidecar(
    demo_onnx: tuple[Path, str], demo_checkpoint: Path
) -> None:
    path, stdout = demo_onnx
    assert "max abs diff" in stdout and "verified" in stdout
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "probabilities"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]

    side = json.loads(sidecar_path(path).read_text())
    assert side["opset"] == 17 and side["fp16"] is False and side["format"] == "onnx"
    assert side["input"]["name"] == "input" and side["input"]["height_width_multiple_of"] == 16
    assert side["normalisation"] == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    assert side["output"]["channels"] == 1 and side["activation_applied"] is True
    assert side["checkpoint"]["sha256"] == hashlib.sha256(demo_checkpoint.read_bytes()).hexdigest()
    assert side["wsiseg_version"] == __import__("wsiseg").__version__
    ver = side["verification"]
    assert {(c["batch"], c["height"], c["width"]) for c in ver["cases"]} == {
        (1, 64, 64),
        (1, 96, 128),
        (3, 64, 64),
        (3, 96, 128),
    }
    assert 0 < ver["max_abs_diff"] <= FP32_TOLERANCE == ver["tolerance"]

    # A batch size and a spatial size the export never saw: the axes really are dynamic.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = normalised(2, 48, 80)
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = demo_net(demo_checkpoint)(x).numpy()
    assert got.shape == (2, 1, 48, 80)
    assert np.abs(got - expected).max() <= FP32_TOLERANCE


def test_fp16_onnx_keeps_float32_io_and_is_within_fp16_tolerance(tmp_path: Path) -> None:
    path = tmp_path / "demo16.onnx"
    side = run_export(compose_cfg("export", ["model=demo", "export.fp16=true", f"export.path={path}"]))
    diff = side["verification"]["max_abs_diff"]
    assert side["verification"]["tolerance"] == FP16_TOLERANCE
    assert 1e-5 < diff <= FP16_TOLERANCE, "fp16 arithmetic differs from fp32, but within the stated tolerance"
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def test_opset_above_20_uses_the_torch_export_exporter(tmp_path: Path) -> None:
    path = tmp_path / "demo21.onnx"
    side = run_export(
        compose_cfg(
            "export", ["model=demo", "export.opset=21", f"export.path={path}", "export.sizes=[[32,32],[48,64]]"]
        )
    )
    assert side["opset"] == 21 and side["verification"]["max_abs_diff"] <= FP32_TOLERANCE
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [21]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]


def test_verification_fails_on_a_different_network(demo_onnx: tuple[Path, str], demo_checkpoint: Path) -> None:
    other = demo_net(demo_checkpoint)
    with torch.no_grad():
        other.conv10.bias.add_(0.5)
    with pytest.raises(VerificationError, match="max abs diff .* exceeds export.tolerance"):
        verify_onnx(demo_onnx[0], other, sizes=[(32, 32)], batches=[1])


def test_onnxruntime_net_pickles_and_creates_its_session_lazily(demo_onnx: tuple[Path, str]) -> None:
    net = OnnxRuntimeNet(demo_onnx[0], stride=16)
    assert net._session is None
    x = normalised(1, 32, 32)
    first = net(x)
    assert net._session is not None and net.active_providers[-1] == "CPUExecutionProvider"
    for clone in (pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
        assert clone._session is None
        assert torch.equal(clone(x), first)
    assert first.dtype == torch.float32 and first.device == x.device
    with pytest.raises(UserInputError, match="model.net.path '.*missing.onnx' does not exist"):
        OnnxRuntimeNet(demo_onnx[0].with_name("missing.onnx"))


def test_segmentation_module_onnx_net_matches_torch(demo_onnx: tuple[Path, str], demo_checkpoint: Path) -> None:
    images = torch.randint(0, 256, (3, 3, 64, 96), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    outputs = {}
    nets = {"torch": lambda: Unet(3, 1, base_width=8), "onnxruntime": lambda: OnnxRuntimeNet(demo_onnx[0])}
    for backend, net in nets.items():
        module = SegmentationModule(net(), checkpoint=str(demo_checkpoint))
        with torch.no_grad():
            outputs[backend] = module(images)
    assert isinstance(module.net, OnnxRuntimeNet) and module.stride == 16  # the sidecar's stride
    assert module.weights == str(demo_onnx[0].absolute()) and module.checkpoint is None  # the file's weights
    assert (outputs["torch"] - outputs["onnxruntime"]).abs().max() <= FP32_TOLERANCE


def test_real_slide_mask_onnxruntime_equals_torch(tmp_path: Path, demo_onnx: tuple[Path, str]) -> None:
    slide = shared_slide("CMU-1-Small-Region.svs")
    torch_mask = predict_mask(slide, tmp_path / "torch", [])
    ort_mask = predict_mask(slide, tmp_path / "ort", ["model=onnx", f"model.net.path={demo_onnx[0]}"])
    assert torch_mask.shape == ort_mask.shape and torch_mask.dtype == np.uint8
    assert int(torch_mask.max()) - int(torch_mask.min()) > 50, (
        "the mask has structure, so the comparison means something"
    )
    diff = np.abs(torch_mask.astype(np.int16) - ort_mask.astype(np.int16))
    assert diff.max() <= 1, f"{(diff > 1).sum()} mask pixels differ by more than 1 grey level"


def test_openvino_net_matches_torch_and_onnxruntime(demo_onnx: tuple[Path, str], demo_checkpoint: Path) -> None:
    """The same exported file compiled by OpenVINO (FP32): outputs equal eager PyTorch FP32 within the export
    tolerance, it pickles without its compiled model, and bad options are one line."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed")
    from wsiseg.runtimes.openvino import OpenVinoNet

    images = torch.randint(0, 256, (3, 3, 64, 96), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    torch_module = SegmentationModule(Unet(3, 1, base_width=8), checkpoint=str(demo_checkpoint))
    ov_module = SegmentationModule(OpenVinoNet(demo_onnx[0]))
    with torch.no_grad():
        reference, outputs = torch_module(images), ov_module(images)
        again = ov_module(images[:1, :, :32, :48])  # another batch and size: dynamic shapes
    assert (reference.float() - outputs.float()).abs().max() <= FP32_TOLERANCE
    assert again.shape == (1, 1, 32, 48) and ov_module.stride == 16
    clone = pickle.loads(pickle.dumps(ov_module.net))
    assert clone._compiled is None and torch.equal(
        clone(torch.zeros(1, 3, 32, 32)), ov_module.net(torch.zeros(1, 3, 32, 32))
    )
    with pytest.raises(UserInputError, match="model.net.precision must be one of f32, bf16, f16; got 'int4'"):
        OpenVinoNet(demo_onnx[0], precision="int4")


def test_real_slide_mask_openvino_equals_torch(tmp_path: Path, demo_onnx: tuple[Path, str]) -> None:
    pytest.importorskip("openvino", reason="OpenVINO is not installed")
    slide = shared_slide("CMU-1-Small-Region.svs")
    torch_mask = predict_mask(slide, tmp_path / "torch", [])
    ov_mask = predict_mask(slide, tmp_path / "ov", ["model=openvino", f"model.net.path={demo_onnx[0]}"])
    assert torch_mask.shape == ov_mask.shape and int(torch_mask.max()) - int(torch_mask.min()) > 50
    diff = np.abs(torch_mask.astype(np.int16) - ov_mask.astype(np.int16))
    assert diff.max() <= 1, f"{(diff > 1).sum()} mask pixels differ by more than 1 grey level"


# -- the sidecar read back by model/net=onnx -----------------------------------------------------------------------
def onnx_module(onnx_path: Path, **kwargs: object) -> SegmentationModule:
    """``SegmentationModule`` running the ONNX file (no checkpoint: the file holds the weights)."""
    return SegmentationModule(OnnxRuntimeNet(onnx_path), **kwargs)


def copied_export(demo_onnx: tuple[Path, str], folder: Path) -> tuple[Path, dict]:
    """A copy of the demo export (file and sidecar) in ``folder`` to edit; returns (onnx path, sidecar dict)."""
    path = folder / "copy.onnx"
    path.write_bytes(demo_onnx[0].read_bytes())
    side = json.loads(sidecar_path(demo_onnx[0]).read_text())
    sidecar_path(path).write_text(json.dumps(side))
    return path, side


@pytest.fixture(scope="module")
def zero_one_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo network exported with mean 0 / std 1 (not the model configs' 0.5 / 0.5), one verification size."""
    path = tmp_path_factory.mktemp("export01") / "demo01.onnx"
    overrides = ["model=demo", "model.mean=[0.0,0.0,0.0]", "model.std=[1.0,1.0,1.0]", f"export.path={path}"]
    run_export(compose_cfg("export", [*overrides, "export.sizes=[[64,64]]", "export.batches=[1]"]))
    return path


def test_sidecar_claiming_other_channels_than_the_file_is_refused(demo_onnx: tuple[Path, str], tmp_path: Path) -> None:
    path, side = copied_export(demo_onnx, tmp_path)
    side["output"]["channels"] = 3  # the demo network has one output channel
    sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(UserInputError, match=r"outputs 1 channel\(s\) but .*copy\.onnx\.json says 3") as info:
        onnx_module(path)
    assert "\n" not in str(info.value)


def test_sidecar_with_a_hand_edited_stride_is_refused_before_any_slide(
    demo_onnx: tuple[Path, str], tmp_path: Path
) -> None:
    """Red-team item 20: a sidecar claiming inputs may be multiples of 2 let a 130 px patch through, and onnxruntime
    failed mid-run with a traceback. The file is run once on a tile of the claimed side when the module is built."""
    path, side = copied_export(demo_onnx, tmp_path)
    side["input"]["height_width_multiple_of"] = 2  # the demo U-Net needs multiples of 16
    sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(UserInputError, match=r"does not run on a 2x2 tile although .*copy\.onnx\.json says") as info:
        onnx_module(path)
    assert "\n" not in str(info.value)


def test_channel_index_beyond_the_sidecar_channels_is_refused(demo_onnx: tuple[Path, str]) -> None:
    with pytest.raises(UserInputError, match=r"model.channel_index=1 but .*demo\.onnx' outputs 1 channel") as info:
        onnx_module(demo_onnx[0], reduction="channel", channel_index=1)
    message = str(info.value)
    assert "\n" not in message and str(sidecar_path(demo_onnx[0])) in message
    # the same through the config group: the sidecar's channel count, not model.net.out_ch=3, decides
    cfg = compose_cfg(
        "predict", ["model=onnx", f"model.net.path={demo_onnx[0]}", "model.reduction=channel", "model.channel_index=2"]
    )
    with pytest.raises(Exception, match=r"model.channel_index=2 but"):  # Hydra wraps the UserInputError
        instantiate(cfg.model)


def test_config_normalisation_differing_from_the_sidecar_is_refused(zero_one_onnx: Path) -> None:
    with pytest.raises(UserInputError) as info:
        onnx_module(zero_one_onnx, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"model.mean=[0.5, 0.5, 0.5] but {sidecar_path(zero_one_onnx)} says [0.0, 0.0, 0.0]")
    with pytest.raises(UserInputError, match=r"model.activation=sigmoid but .*demo01\.onnx\.json says none"):
        onnx_module(zero_one_onnx, activation="sigmoid")
    # unet_camelyon's 0.5 / 0.5 meets a 0 / 1 export: refused, not silently run with the wrong normalisation
    cfg = compose_cfg(
        "predict", ["model=unet_camelyon", "model/net=onnx", "model.checkpoint=null", f"model.net.path={zero_one_onnx}"]
    )
    with pytest.raises(Exception, match=r"model.mean=\[0.5, 0.5, 0.5\] but .*demo01\.onnx\.json"):
        instantiate(cfg.model)


def test_sidecar_normalisation_is_used_and_matches_torch(zero_one_onnx: Path, demo_checkpoint: Path) -> None:
    """``model=onnx`` repeats nothing: mean/std/activation come from the sidecar, and the outputs on uint8 tiles equal
    the torch module's with the same normalisation."""
    cfg = compose_cfg("predict", ["model=onnx", f"model.net.path={zero_one_onnx}", "model.output_dtype=float32"])
    assert cfg.model.mean is None and cfg.model.checkpoint is None
    module = instantiate(cfg.model)
    assert module.mean.flatten().tolist() == [0.0, 0.0, 0.0] and module.std.flatten().tolist() == [1.0, 1.0, 1.0]
    assert module.activation == "none" and module.stride == 16
    assert module.weights == str(zero_one_onnx) and isinstance(module.net, OnnxRuntimeNet)
    reference = SegmentationModule(
        Unet(3, 1, base_width=8),
        checkpoint=str(demo_checkpoint),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        output_dtype="float32",
    )
    images = torch.randint(0, 256, (2, 3, 64, 96), generator=torch.Generator().manual_seed(11), dtype=torch.uint8)
    with torch.no_grad():
        got = module.predict_step({"image": images})["probs"]
        expected = reference.predict_step({"image": images})["probs"]
        half = SegmentationModule(Unet(3, 1, base_width=8), checkpoint=str(demo_checkpoint), output_dtype="float32")
        other = half.predict_step({"image": images})["probs"]
    assert (got - expected).abs().max() <= 1e-4
    assert (other - expected).abs().max() > 1e-2, "the normalisation matters, so using the sidecar's is what matched"


def test_missing_sidecar_warns_and_needs_explicit_normalisation(
    demo_onnx: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, _ = copied_export(demo_onnx, tmp_path)
    sidecar_path(path).unlink()
    with pytest.raises(UserInputError, match=r"has no sidecar copy\.onnx\.json to take model.mean, model.std, mod"):
        onnx_module(path)
    with caplog.at_level("WARNING", logger="wsiseg.runtimes.files"):
        module = onnx_module(path, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), activation="none")
    assert any(
        "unchecked" in r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and r.name == "wsiseg.runtimes.files"
    )
    assert module.stride == 16  # from the configured net without a sidecar
    with pytest.raises(UserInputError, match=r"model.channel_index=1 but .*copy\.onnx' outputs 1 channel"):
        onnx_module(path, mean=(0.5,) * 3, std=(0.5,) * 3, activation="none", reduction="channel", channel_index=1)


def test_cli_predict_with_model_onnx_needs_no_checkpoint(demo_onnx: tuple[Path, str], tmp_path: Path) -> None:
    """The README's deploy line, as a user types it: ``model=onnx model.net.path=...`` and no model.checkpoint."""
    slide = shared_slide("CMU-1-Small-Region.svs")
    status, _, stderr = run_command(
        [
            "model=onnx",
            f"model.net.path={demo_onnx[0]}",
            f"data.slides={slide}",
            "data.patch_size=256",
            "data.num_workers=0",
            "trainer=cpu",
            "trainer.precision=32",
            "trainer.enable_progress_bar=false",
            "writer.output_downsample=4",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert status == 0, stderr[-3000:]
    (report,) = tmp_path.glob("*/report.json")
    assert json.loads(report.read_text())["status"] == "complete"


def test_onnx_patch_size_is_checked_against_the_files_stride_not_the_configs_net(tmp_path: Path) -> None:
    """model=onnx derives from unet_camelyon (stride 16), but a probe exported to ONNX has stride 1 in its sidecar:
    a 100 px patch is valid for it, and the entry point must not refuse it with the configured net's stride."""
    from tests.conftest import shared_slide
    from tests.helpers import predict
    from tests.test_configs import probe_onnx

    onnx_file = probe_onnx(tmp_path)
    slide = shared_slide("CMU-1-Small-Region.svs")
    overrides = ["model=onnx", f"model.net.path={onnx_file}", "data.patch_size=100", "data.tissue.enabled=false"]
    assert predict(slide, tmp_path / "out", [*overrides, "data.level=0", "writer.output_downsample=4"]) == 0
