"""The network head, defined once: normalisation, activation, channel reduction, pooling, the channel probe, Dice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsiseg.errors import UserInputError
from wsiseg.head import (
    apply_activation,
    check_head,
    dice,
    normalise,
    pool,
    probe_output_channels,
    reduce_channels,
)
from wsiseg.model import Unet


def test_normalise_uint8_and_float_pixels_alike_without_touching_the_input() -> None:
    pixels = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = (pixels.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, 3, 1, 1)
    from_u8 = normalise(pixels, mean, std)
    assert from_u8.dtype == torch.float32
    torch.testing.assert_close(from_u8.double(), expected, rtol=0, atol=1e-6)
    floats = pixels.float()
    kept = floats.clone()
    tensors = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalise(floats, *tensors), from_u8, rtol=0, atol=0)
    assert torch.equal(floats, kept), "a float input is not divided in place"


def test_activation_reduction_and_pooling() -> None:
    y = torch.tensor([[[[0.0, 2.0]], [[1.0, -1.0]]]])  # (1, 2, 1, 2)
    torch.testing.assert_close(apply_activation(y, "none"), y)
    torch.testing.assert_close(apply_activation(y, "sigmoid"), torch.sigmoid(y))
    soft = apply_activation(y, "softmax")
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(1, 1, 2))
    assert reduce_channels(y, "max").tolist() == [[[[1.0, 2.0]]]]
    assert reduce_channels(y, "channel", 1).tolist() == [[[[1.0, -1.0]]]]
    assert reduce_channels(y, "none") is y
    maps = torch.arange(16.0).view(1, 1, 4, 4)
    assert pool(maps, 2).tolist() == [[[[2.5, 4.5], [10.5, 12.5]]]]
    assert pool(maps, 1) is maps


def test_check_head_refuses_a_missing_channel_and_softmax_over_one() -> None:
    check_head(3, "softmax", "channel", 2)
    with pytest.raises(UserInputError, match=r"model.channel_index=3 but the network 'x.onnx' outputs 3 channel"):
        check_head(3, None, "channel", 3, " 'x.onnx'")
    with pytest.raises(UserInputError, match="model.activation=softmax but the network outputs 1 channel"):
        check_head(1, "softmax", "max", 0)


def test_probe_counts_a_networks_output_channels() -> None:
    assert probe_output_channels(Unet(3, 4, base_width=4).eval(), 16) == 4


def test_dice_of_numpy_and_torch_masks() -> None:
    a = np.array([True, True, False, False])
    b = np.array([True, False, True, False])
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(torch.from_numpy(a), torch.from_numpy(a)) == 1.0
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
