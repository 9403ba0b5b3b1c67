"""U-Net architectures and the checkpoint loader.

Two networks live here:

* :class:`Unet` — the replaced script's network (``Unet(3, 3)``): replicate-padded 3×3 convolutions with bias,
  BatchNorm, ReLU, four 2×2 max-pools (stride 16), transposed-convolution upsampling, and a **sigmoid inside
  ``forward``**. Its state_dict keys (``conv1.conv.0.weight`` … ``conv10.bias``) are kept exactly so the users'
  checkpoints load unchanged.
* :class:`MilesialUNet` — a milesial-style U-Net (zero padding, no conv bias, optional bilinear upsampling) that
  returns logits.

:func:`load_checkpoint` reads a plain state_dict, a whole pickled model, or a Lightning ``.ckpt``; it strips
``module.`` / ``model.`` / ``net.`` prefixes and fails with one message listing missing/unexpected keys and shape
mismatches.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from wsiseg.errors import UserInputError, first_line

log = logging.getLogger(__name__)

__all__ = [
    "Unet",
    "MilesialUNet",
    "load_checkpoint",
    "network_stride",
    "has_fixed_weights",
    "ProbeNet",
    "RANDOM_WEIGHTS",
]

# model.checkpoint=random: keep the network's initial (untrained) weights, on purpose and loudly (benchmarks only)
RANDOM_WEIGHTS = "random"


class DoubleConv(nn.Module):
    """(Conv3×3 → BatchNorm → ReLU) × 2; key layout ``conv.0`` / ``conv.1`` / ``conv.3`` / ``conv.4``."""

    def __init__(self, in_ch: int, out_ch: int, padding_mode: str = "replicate", bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, padding_mode=padding_mode, bias=bias),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, padding_mode=padding_mode, bias=bias),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Unet(nn.Module):
    """The replaced script's U-Net: replicate padding, sigmoid in ``forward`` (outputs are probabilities).

    Args:
        in_ch: input channels (3 for RGB).
        out_ch: output channels (3 in the users' checkpoints; reduced to one tumour probability downstream).
        base_width: channels of the first block; blocks use ``base_width × (1, 2, 4, 8, 16)``. 64 gives the users'
            31,043,651-parameter network for ``Unet(3, 3)``.

    Input height and width must be multiples of :attr:`stride` (16).

    Example::

        >>> net = Unet(3, 3, base_width=8)
        >>> net(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 3, 32, 32])
    """

    stride = 16

    def __init__(self, in_ch: int = 3, out_ch: int = 3, base_width: int = 64) -> None:
        super().__init__()
        check_widths(in_ch=in_ch, out_ch=out_ch, base_width=base_width)
        w = [base_width * m for m in (1, 2, 4, 8, 16)]
        self.conv1 = DoubleConv(in_ch, w[0])
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = DoubleConv(w[0], w[1])
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = DoubleConv(w[1], w[2])
        self.pool3 = nn.MaxPool2d(2)
        self.conv4 = DoubleConv(w[2], w[3])
        self.pool4 = nn.MaxPool2d(2)
        self.conv5 = DoubleConv(w[3], w[4])
        self.up6 = nn.ConvTranspose2d(w[4], w[3], 2, stride=2)
        self.conv6 = DoubleConv(w[4], w[3])
        self.up7 = nn.ConvTranspose2d(w[3], w[2], 2, stride=2)
        self.conv7 = DoubleConv(w[3], w[2])
        self.up8 = nn.ConvTranspose2d(w[2], w[1], 2, stride=2)
        self.conv8 = DoubleConv(w[2], w[1])
        self.up9 = nn.ConvTranspose2d(w[1], w[0], 2, stride=2)
        self.conv9 = DoubleConv(w[1], w[0])
        self.conv10 = nn.Conv2d(w[0], out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.conv1(x)
        c2 = self.conv2(self.pool1(c1))
        c3 = self.conv3(self.pool2(c2))
        c4 = self.conv4(self.pool3(c3))
        c5 = self.conv5(self.pool4(c4))
        c6 = self.conv6(torch.cat([self.up6(c5), c4], dim=1))
        c7 = self.conv7(torch.cat([self.up7(c6), c3], dim=1))
        c8 = self.conv8(torch.cat([self.up8(c7), c2], dim=1))
        c9 = self.conv9(torch.cat([self.up9(c8), c1], dim=1))
        return torch.sigmoid(self.conv10(c9))


class _MilesialDoubleConv(nn.Module):
    """milesial's ``DoubleConv``: zero padding, no conv bias; keys ``double_conv.{0,1,3,4}``."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None) -> None:
        super().__init__()
        mid_ch = mid_ch or out_ch
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_ch, mid_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class _Down(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), _MilesialDoubleConv(in_ch, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class _Up(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, bilinear: bool) -> None:
        super().__init__()
        if bilinear:
            self.up: nn.Module = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = _MilesialDoubleConv(in_ch, out_ch, in_ch // 2)
        else:
            self.up = nn.ConvTranspose2d(in_ch, in_ch // 2, 2, stride=2)
            self.conv = _MilesialDoubleConv(in_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class _OutConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class MilesialUNet(nn.Module):
    """Milesial-style U-Net: zero padding, bias-free convolutions, logits out (apply sigmoid/softmax downstream).

    Args:
        n_channels: input channels.
        n_classes: output channels (logits).
        bilinear: bilinear upsampling instead of transposed convolutions.
        base_width: channels of the first block (64 in the original).

    Input height and width must be multiples of :attr:`stride` (16).
    """

    stride = 16

    def __init__(self, n_channels: int = 3, n_classes: int = 2, bilinear: bool = False, base_width: int = 64) -> None:
        super().__init__()
        check_widths(n_channels=n_channels, n_classes=n_classes, base_width=base_width)
        self.n_channels, self.n_classes, self.bilinear = n_channels, n_classes, bilinear
        w = [base_width * m for m in (1, 2, 4, 8, 16)]
        factor = 2 if bilinear else 1
        self.inc = _MilesialDoubleConv(n_channels, w[0])
        self.down1 = _Down(w[0], w[1])
        self.down2 = _Down(w[1], w[2])
        self.down3 = _Down(w[2], w[3])
        self.down4 = _Down(w[3], w[4] // factor)
        self.up1 = _Up(w[4], w[3] // factor, bilinear)
        self.up2 = _Up(w[3], w[2] // factor, bilinear)
        self.up3 = _Up(w[2], w[1] // factor, bilinear)
        self.up4 = _Up(w[1], w[0], bilinear)
        self.outc = _OutConv(w[0], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)


class ProbeNet(nn.Module):
    """A fixed 1×1 convolution used to test geometry: output = ``gain · input + bias`` per channel.

    With the module's normalisation ``(x/255 - mean)/std`` and ``gain = std``, ``bias = mean`` it returns the input
    pixels / 255, so a stitched mask can be compared pixel-exactly with a direct OpenSlide read.

    Its weights are set by the constructor, so it declares ``fixed_weights = True``: ``SegmentationModule`` and
    ``wsiseg-export`` accept it without a checkpoint (``model.checkpoint=null``, as ``model=probe`` has).
    """

    stride = 1
    fixed_weights = True

    def __init__(self, channel: int = 0, gain: float = 1.0, bias: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, channel] = gain
            self.conv.bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def check_widths(**values: int) -> None:
    """Network shape arguments (channels, widths) are positive integers.

    Raises:
        UserInputError: ``model.net.<name> must be a positive integer``.
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"model.net.{name} must be a positive integer, got {value!r}")


def network_stride(net: nn.Module) -> int:
    """Spatial stride (input px per bottleneck px) the network needs its input size to be a multiple of."""
    return int(getattr(net, "stride", 1))


def has_fixed_weights(net: nn.Module | type[nn.Module]) -> bool:
    """Whether the network (or network class) sets its weights itself and so needs no checkpoint.

    A network opts in with the class attribute ``fixed_weights = True`` (``ProbeNet``); every other network needs
    ``model.checkpoint`` (or the explicit ``model.checkpoint=random``)."""
    return bool(getattr(net, "fixed_weights", False))


_PREFIXES = ("module.", "model.", "net.", "_orig_mod.")


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out


def read_state_dict(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a plain state_dict (prefixes stripped).

    Accepts ``torch.save(model.state_dict())``, a Lightning ``.ckpt`` (``{"state_dict": ...}``) and dicts holding
    ``"model_state_dict"`` / ``"model"``, all read with ``torch.load(weights_only=True)``, which runs no code. Files
    that need full unpickling (``torch.save(model)``, a whole pickled model, or any other pickled object) can run
    arbitrary code while loading, so they are read only with ``trust=True`` (``model.trust_checkpoint=true``), which
    is logged.

    Raises:
        UserInputError: the file is missing, is not a PyTorch checkpoint, needs unpickling without ``trust``, or a
            floating-point tensor holds NaN or infinite values (named in the message).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserInputError(
            f"model.checkpoint '{path}' is a folder: pass the .pth/.pt/.ckpt file inside it "
            f"(e.g. model.checkpoint={path / 'UNet_17.pth'})"
        )
    if not path.is_file():
        raise UserInputError(f"model.checkpoint '{path}' does not exist: pass the path of a .pth/.pt/.ckpt file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:
        if not trust:
            if not _is_pickle(path):
                raise UserInputError(
                    f"model.checkpoint '{path}' is not a readable PyTorch checkpoint: {first_line(safe_error)}"
                ) from None
            raise UserInputError(
                f"model.checkpoint '{path}' holds pickled objects that torch.load(weights_only=True) refuses (a whole "
                "pickled model, or code: unpickling can run it); re-save it with torch.save(model.state_dict(), ...), "
                "or pass model.trust_checkpoint=true if you trust the file"
            ) from None
        log.warning("model.trust_checkpoint=true: unpickling '%s' in full (it can run code)", path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise UserInputError(f"model.checkpoint '{path}' is not a readable PyTorch checkpoint: {exc}") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserInputError(f"model.checkpoint '{path}' holds no state_dict (found {type(obj).__name__})")
    for key, tensor in obj.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserInputError(
                f"model.checkpoint '{path}': tensor '{key}' holds {bad} NaN/infinite value(s) (a diverged or corrupt "
                "training run): its masks would be meaningless; use a checkpoint from before the divergence"
            )
    return _strip_prefixes(obj)


def _is_pickle(path: Path) -> bool:
    """A zip archive (``torch.save``'s format) or a legacy pickle, i.e. something ``torch.load`` reads."""
    import zipfile

    with open(path, "rb") as handle:
        head = handle.read(2)
    return zipfile.is_zipfile(path) or head[:1] == b"\x80"


def load_checkpoint(net: nn.Module, path: str | Path, trust: bool = False) -> nn.Module:
    """Load the checkpoint at ``path`` into ``net`` strictly and return ``net``; ``trust`` as in
    :func:`read_state_dict`.

    Raises:
        UserInputError: one line listing missing keys, unexpected keys and shape mismatches.
    """
    state_dict = read_state_dict(path, trust)
    own = net.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs expected {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:

        def head(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys [{head(missing)}]")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys [{head(unexpected)}]")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches [{head(mismatched)}]")
        raise UserInputError(
            f"model.checkpoint '{path}' does not match {type(net).__name__}: {'; '.join(parts)}; "
            "choose the matching model=... config or fix model.* widths/channels"
        )
    net.load_state_dict(state_dict, strict=True)
    return net
