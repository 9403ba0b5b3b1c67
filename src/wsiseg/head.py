"""The network head, defined once: how uint8 tiles become the network's input, and how its raw output becomes the
maps the writers stitch.

``normalise`` → network → ``apply_activation`` → (test-time augmentation average) → ``reduce_channels`` → ``pool``.
The module (:class:`wsiseg.module.SegmentationModule`), export verification, both INT8 quantisers and the bench's
FP32 agreement all use these functions; only the bench's naive loop keeps its own copy, on purpose (it imitates the
replaced script). Also here: the head's sanity check against the network's channels, the zero-tile probe that counts
them, and the Dice every INT8 check compares masks with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from wsiseg.errors import UserInputError

__all__ = [
    "ACTIVATIONS",
    "REDUCTIONS",
    "apply_activation",
    "check_head",
    "dice",
    "normalise",
    "pool",
    "probe_output_channels",
    "reduce_channels",
]

ACTIVATIONS = ("none", "sigmoid", "softmax")
REDUCTIONS = ("max", "channel", "none")


def normalise(
    images: torch.Tensor, mean: torch.Tensor | Sequence[float], std: torch.Tensor | Sequence[float]
) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) (or float pixels 0-255, not modified) → float32 ``(x/255 - mean) / std`` on ``images``'
    device; ``mean`` and ``std`` are per channel on the /255 scale (a (1, 3, 1, 1) float32 tensor, or 3 numbers)."""
    if not isinstance(mean, torch.Tensor):
        mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    if not isinstance(std, torch.Tensor):
        std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    x = images.float()
    x = x.div_(255.0) if x is not images else x / 255.0  # in place only on the copy .float() made of uint8 input
    return (x - mean.to(x.device)) / std.to(x.device)


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    """``none`` | ``sigmoid`` | ``softmax`` (over channels) of a network's raw output (N, C, H, W)."""
    if activation == "sigmoid":
        return torch.sigmoid(y)
    if activation == "softmax":
        return torch.softmax(y, dim=1)
    return y


def reduce_channels(y: torch.Tensor, reduction: str, channel_index: int = 0) -> torch.Tensor:
    """Probabilities (N, C, H, W) → (N, C', H, W): ``max`` — one map, the max over channels; ``channel`` — channel
    ``channel_index`` alone; ``none`` — every channel (the writer stores class labels = argmax)."""
    if reduction == "max":
        return y.amax(dim=1, keepdim=True)
    if reduction == "channel":
        return y[:, channel_index : channel_index + 1]
    return y


def pool(y: torch.Tensor, output_downsample: int) -> torch.Tensor:
    """Average-pool maps (N, C, H, W) by ``output_downsample`` (tile px → output px), on their device."""
    return F.avg_pool2d(y, output_downsample) if output_downsample > 1 else y


def check_head(channels: int, activation: str | None, reduction: str, channel_index: int, where: str = "") -> None:
    """The head makes sense for a network with ``channels`` output channels: ``reduction=channel`` keeps a channel it
    has, and ``softmax`` is over 2 or more channels (over one channel it is 1 everywhere: every pixel, tissue or not,
    would be tumour). Checked before any slide is read; ``where`` names the network in the message (e.g. a file).

    Raises:
        UserInputError: naming ``model.channel_index`` or ``model.activation`` and the network's channel count.
    """
    if reduction == "channel" and not 0 <= channel_index < channels:
        raise UserInputError(
            f"model.channel_index={channel_index} but the network{where} outputs {channels} channel(s): use "
            f"model.channel_index between 0 and {channels - 1}, or model.reduction=max"
        )
    if activation == "softmax" and channels < 2:
        raise UserInputError(
            f"model.activation=softmax but the network{where} outputs {channels} channel: softmax over one channel is "
            "1 everywhere (every pixel tumour); use model.activation=sigmoid for a 1-channel logit network, or none"
        )


def probe_output_channels(
    run: Callable[[torch.Tensor], torch.Tensor], stride: int, device: torch.device | str = "cpu"
) -> int:
    """The channels ``run`` (a network, or a file runtime) outputs for one ``stride``×``stride`` zero tile (float32 on
    ``device``), without gradients."""
    with torch.no_grad():
        return int(run(torch.zeros(1, 3, stride, stride, device=device)).shape[1])


def dice(a: Any, b: Any) -> float:
    """Dice of two boolean masks, numpy or torch (1.0 when both are empty)."""
    union = int(a.sum() + b.sum())
    return 1.0 if union == 0 else float(2 * (a & b).sum() / union)
