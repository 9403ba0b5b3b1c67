"""Random weights are an explicit, loud choice: ``model.checkpoint`` is required unless it says ``random``, the
network sets its own weights (``ProbeNet``) or the ONNX file holds them."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from wsiseg.config import config_dir
from wsiseg.errors import UserInputError
from wsiseg.model import ProbeNet, Unet, has_fixed_weights
from wsiseg.module import FIXED_WEIGHTS, RANDOM_WEIGHTS, SegmentationModule

PREDICT = Path(sys.executable).with_name("wsiseg-predict")


def compose_model(overrides: list[str]) -> SegmentationModule:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="predict", overrides=overrides)
    return instantiate(cfg.model)


@pytest.mark.parametrize("checkpoint", [None, ""])
def test_no_checkpoint_is_refused_with_one_line_naming_the_option(checkpoint: str | None) -> None:
    with pytest.raises(UserInputError) as info:
        SegmentationModule(Unet(3, 1, base_width=4), checkpoint=checkpoint)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("model.checkpoint is required")
    assert "model.checkpoint=/path/to/" in message and "model.checkpoint=random" in message


def test_config_checkpoint_null_is_refused_through_hydra() -> None:
    """``model.checkpoint=null`` on the command line reaches the same refusal (wrapped by Hydra's instantiate)."""
    with pytest.raises(Exception) as info:  # noqa: B017 - Hydra wraps the UserInputError
        compose_model(["model=unet_camelyon", "model.net.base_width=4", "model.checkpoint=null"])
    from wsiseg.cli import find_user_error

    error = find_user_error(info.value)
    assert error is not None and str(error).startswith("model.checkpoint is required")


def test_random_keeps_initial_weights_warns_and_is_recorded(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    net = Unet(3, 1, base_width=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="wsiseg.module"):
        module = SegmentationModule(net, checkpoint="random", output_dtype="float32")
    assert module.weights == RANDOM_WEIGHTS == "random"
    assert all(torch.equal(before[k], v) for k, v in module.net.state_dict().items())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "meaningless" in warnings[0].getMessage()
    assert "model.checkpoint=random" in warnings[0].getMessage()
    probs = module.predict_step({"image": torch.zeros(1, 3, 32, 32, dtype=torch.uint8)})["probs"]
    assert probs.shape == (1, 1, 32, 32)


def test_random_through_hydra_config(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="wsiseg.module"):
        module = compose_model(["model=unet_camelyon", "model.net.base_width=4", "model.checkpoint=random"])
    assert module.weights == "random"
    assert any("meaningless" in r.getMessage() for r in caplog.records)


def test_probe_needs_no_checkpoint(caplog: pytest.LogCaptureFixture) -> None:
    assert has_fixed_weights(ProbeNet) and ProbeNet.fixed_weights is True
    assert not has_fixed_weights(Unet(3, 1, base_width=4))
    with caplog.at_level(logging.WARNING, logger="wsiseg.module"):
        module = compose_model(["model=probe"])  # conf/model/probe.yaml has checkpoint: null
    assert module.weights == FIXED_WEIGHTS == "fixed"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    probs = module.predict_step({"image": images})["probs"].float()
    torch.testing.assert_close(probs, images[:, :1].float() / 255, atol=1e-3, rtol=0)


def test_checkpoint_path_is_recorded_absolute(demo_checkpoint: Path) -> None:
    module = SegmentationModule(Unet(3, 1, base_width=8), checkpoint=str(demo_checkpoint))
    assert module.weights == str(demo_checkpoint.absolute())


class _Payload:
    """Unpickling this object creates ``marker``: stands for code a crafted checkpoint runs when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_unless_trusted(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    from wsiseg.model import Unet, load_checkpoint

    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pth"
    torch.save({"state_dict": Unet(3, 3, base_width=4).state_dict(), "extra": _Payload(marker)}, crafted)
    with pytest.raises(UserInputError) as info:
        load_checkpoint(Unet(3, 3, base_width=4), crafted)
    message = str(info.value)
    assert "weights_only=True" in message and "model.trust_checkpoint=true" in message and "\n" not in message
    assert not marker.exists(), "loading without trust ran the checkpoint's code"
    with pytest.raises(UserInputError, match="model.trust_checkpoint=true"):  # the same through the module
        SegmentationModule(Unet(3, 3, base_width=4), checkpoint=str(crafted))
    assert not marker.exists()

    whole = tmp_path / "whole.pth"
    net = Unet(3, 3, base_width=4)
    torch.save(net, whole)  # a whole pickled model: readable only when trusted, and then logged
    with pytest.raises(UserInputError, match="re-save it with torch.save"):
        load_checkpoint(Unet(3, 3, base_width=4), whole)
    with caplog.at_level("WARNING", logger="wsiseg.model"):
        module = SegmentationModule(Unet(3, 3, base_width=4), checkpoint=str(whole), trust_checkpoint=True)
    assert any("trust_checkpoint=true" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(module.net.conv1.conv[0].weight, net.conv1.conv[0].weight)


def test_a_checkpoint_folder_is_named_as_a_folder(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    with pytest.raises(UserInputError, match=r"model.checkpoint '.*weights' is a folder: pass the .pth/.pt/.ckpt file"):
        SegmentationModule(Unet(3, 3, base_width=4), checkpoint=str(tmp_path / "weights"))
