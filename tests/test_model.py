from pathlib import Path

import pytest
import torch

from wsiseg.errors import UserInputError
from wsiseg.model import MilesialUNet, Unet, load_checkpoint, read_state_dict


def users_state_dict_keys() -> list[str]:
    """The replaced script's 136 key names, written out from its architecture description."""
    keys = []
    for block in range(1, 10):
        for conv in (0, 3):
            keys += [f"conv{block}.conv.{conv}.weight", f"conv{block}.conv.{conv}.bias"]
            bn = conv + 1
            keys += [f"conv{block}.conv.{bn}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
            keys.append(f"conv{block}.conv.{bn}.num_batches_tracked")
    for up in range(6, 10):
        keys += [f"up{up}.weight", f"up{up}.bias"]
    keys += ["conv10.weight", "conv10.bias"]
    return keys


def test_unet_matches_users_checkpoint_layout() -> None:
    net = Unet(3, 3)
    state = net.state_dict()
    assert len(state) == 136
    assert sorted(state) == sorted(users_state_dict_keys())
    assert sum(p.numel() for p in net.parameters()) == 31_043_651
    assert tuple(state["up6.weight"].shape) == (1024, 512, 2, 2)
    assert tuple(state["conv10.weight"].shape) == (3, 64, 1, 1)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs and all(m.padding_mode == "replicate" and m.bias is not None for m in convs)


def test_unet_outputs_probabilities_via_sigmoid_in_forward() -> None:
    torch.manual_seed(0)
    net = Unet(3, 3, base_width=4).eval()
    x = torch.randn(2, 3, 32, 48)
    y = net(x)
    assert y.shape == (2, 3, 32, 48)
    assert float(y.min()) > 0 and float(y.max()) < 1
    captured = {}
    net.conv10.register_forward_hook(lambda module, args, out: captured.update(logits=out))
    y = net(x)
    torch.testing.assert_close(y, torch.sigmoid(captured["logits"]))


def test_milesial_unet_shapes() -> None:
    for bilinear in (False, True):
        net = MilesialUNet(3, 2, bilinear=bilinear, base_width=4).eval()
        assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 32, 32)
    assert "inc.double_conv.0.weight" in MilesialUNet(3, 2).state_dict()


@pytest.fixture
def small_net() -> Unet:
    torch.manual_seed(1)
    return Unet(3, 3, base_width=4)


@pytest.mark.parametrize("form", ["state_dict", "pickled", "lightning", "module_prefix", "model_prefix"])
def test_load_checkpoint_forms(tmp_path: Path, small_net: Unet, form: str) -> None:
    path = tmp_path / "ckpt.pth"
    sd = small_net.state_dict()
    obj = {
        "state_dict": sd,
        "pickled": small_net,
        "lightning": {"epoch": 3, "state_dict": {f"model.{k}": v for k, v in sd.items()}},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
        "model_prefix": {f"model.{k}": v for k, v in sd.items()},
    }[form]
    torch.save(obj, path)
    fresh = Unet(3, 3, base_width=4)
    load_checkpoint(fresh, path, trust=form == "pickled")  # a whole pickled model needs full unpickling
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, sd[key])


def test_load_checkpoint_mismatch_lists_keys_and_shapes(tmp_path: Path, small_net: Unet) -> None:
    path = tmp_path / "other.pth"
    sd = small_net.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["conv10.bias"]
    torch.save(sd, path)
    with pytest.raises(UserInputError) as info:
        load_checkpoint(Unet(3, 3, base_width=8), path)
    message = str(info.value)
    assert "\n" not in message
    assert "1 missing keys [conv10.bias]" in message
    assert "1 unexpected keys [extra.weight]" in message
    assert "conv1.conv.0.weight (4, 3, 3, 3) vs expected (8, 3, 3, 3)" in message
    assert str(path) in message


def test_read_state_dict_errors(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(UserInputError, match="not a readable PyTorch checkpoint"):
        read_state_dict(junk)
