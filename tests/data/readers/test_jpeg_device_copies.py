"""Copies to the GPU on the data side, checked without a GPU: the data module's device hook and ``decode_batch`` run
for real, with ``torch.device("cuda")`` as their device, while a torch function mode (:class:`PretendCuda`) runs every
op on the CPU instead and records each host-to-device copy. Only nvJPEG itself is left out: at the decoder's boundary
the tiles are decoded by libjpeg-turbo and handed back as device tiles."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.data._utils.pin_memory import pin_memory

from tests.conftest import shared_slide
from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.data.readers.jpeg import decode as jpeg_decode
from wsiseg.data.readers.jpeg.dataset import collate_jpeg_tiles
from wsiseg.data.readers.jpeg.decode import decode_batch
from wsiseg.data.readers.jpeg.markers import COLOUR_RGB, COLOUR_YCBCR

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
_ON_DEVICE, _PINNED = "_pretend_on_cuda", "_pretend_pinned"  # marks set on CPU tensors standing in for those


@dataclass(frozen=True)
class Copy:
    """One host-to-device copy: the function that made it, whether its source was pinned, whether it was
    non-blocking."""

    function: str
    pinned: bool
    non_blocking: bool


def _on_device(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and getattr(value, _ON_DEVICE, False)


def _pinned(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and getattr(value, _PINNED, False)


def _host_index(index: Any) -> bool:
    """An index PyTorch copies to the device before indexing a CUDA tensor with it (a list, an array, a host tensor
    of more than one element); ints, slices and None are not copied."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(
        isinstance(part, (list, np.ndarray)) or (isinstance(part, torch.Tensor) and not _on_device(part) and part.dim())
        for part in parts
    )


def _is_cuda(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cuda"


class PretendCuda(TorchFunctionMode):
    """Runs the code under it on the CPU while that code targets ``torch.device("cuda")``.

    Tensors made for CUDA (a ``device="cuda"`` argument, ``.to("cuda")``, ``.cuda()``) are CPU tensors marked as device
    tensors: their ``.device`` reads ``cuda``, and so does that of every tensor computed from them. ``pin_memory()``
    returns a CPU copy marked pinned. Recorded: every host-to-device copy (``copies``: ``to``/``cuda`` of a host tensor,
    ``as_tensor``/``tensor``/``asarray`` onto CUDA, ``copy_`` or ``__setitem__`` of host values into a device tensor,
    and indexing a device tensor with a host index, which PyTorch copies to the device first), every ``torch.stack`` /
    ``torch.cat`` (``stacks``: inputs, on the device or not), every write of a device tensor into part of another
    (``writes``: a per-tile copy) and every ``pin_memory()`` (``pins``). An op mixing device tensors with host tensors
    of more than one element fails, as it would on a GPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[Copy] = []
        self.stacks: list[tuple[int, bool]] = []
        self.writes: list[str] = []
        self.pins = 0

    def adopt(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mark ``tensor`` as on the device (what a device-side producer such as nvJPEG returns)."""
        setattr(tensor, _ON_DEVICE, True)
        return tensor

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        if func == torch.Tensor.device.__get__:
            return CUDA if _on_device(args[0]) else func(*args)
        if func == torch.Tensor.is_cuda.__get__:
            return _on_device(args[0])
        if func is torch.Tensor.is_pinned:
            return _pinned(args[0])
        if func is torch.Tensor.pin_memory:
            assert not _on_device(args[0]), "pin_memory() of a CUDA tensor"
            self.pins += 1
            pinned = args[0].clone()
            setattr(pinned, _PINNED, True)
            return pinned
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return self._to(func, args, kwargs)
        if func in (torch.as_tensor, torch.tensor, torch.asarray) and _is_cuda(kwargs.get("device")):
            kwargs["device"] = CPU
            self.copies.append(Copy(name, _pinned(args[0]), False))
            return self.adopt(torch.as_tensor(func(*args, **kwargs)).clone())
        if func in (torch.stack, torch.cat):
            inputs = list(args[0] if args else kwargs["tensors"])
            self.stacks.append((len(inputs), all(_on_device(t) for t in inputs)))
        self._check_writes(func, name, args, kwargs)
        to_cuda = _is_cuda(kwargs.get("device"))
        if to_cuda:
            kwargs["device"] = CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [_on_device(t) for t in tensors]
        if any(on_device) and func not in (torch.Tensor.__setitem__, torch.Tensor.__getitem__, torch.Tensor.copy_):
            mixed = [t.shape for t, dev in zip(tensors, on_device) if not dev and t.dim()]
            assert not mixed, f"{name} mixes CUDA tensors with host tensors of shapes {mixed}"
        result = func(*args, **kwargs)
        if to_cuda or any(on_device):
            for out in tree_flatten(result)[0]:
                if isinstance(out, torch.Tensor):
                    self.adopt(out)
        return result

    def _to(self, func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        tensor, rest = args[0], args[1:]
        if func is torch.Tensor.cpu:
            device, dtype, non_blocking = CPU, None, False
        elif func is torch.Tensor.cuda:
            device, dtype, non_blocking = CUDA, None, bool(kwargs.get("non_blocking", rest[1] if len(rest) > 1 else 0))
        else:
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*rest, **kwargs)
        if device is None:  # a dtype or layout change: stays where it is
            out = torch.Tensor.to(tensor, dtype=dtype) if dtype is not None else tensor
            return self.adopt(out) if _on_device(tensor) else out
        out = torch.Tensor.to(tensor, CPU, dtype=dtype, copy=True)  # a new tensor, as a copy across devices makes
        if _is_cuda(device):
            if not _on_device(tensor):
                self.copies.append(Copy(func.__name__, _pinned(tensor), non_blocking))
            return self.adopt(out)
        return out

    def _check_writes(self, func: Any, name: str, args: tuple, kwargs: dict) -> None:
        if func is torch.Tensor.copy_ and _on_device(args[0]):
            source = args[1] if len(args) > 1 else kwargs["src"]
            if _on_device(source):
                self.writes.append(name)
            else:
                non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
                self.copies.append(Copy(name, _pinned(source), non_blocking))
        if func in (torch.Tensor.__setitem__, torch.Tensor.__getitem__) and _on_device(args[0]):
            if _host_index(args[1]):
                self.copies.append(Copy(f"{name} index", False, False))
            if func is torch.Tensor.__setitem__ and isinstance(args[2], torch.Tensor):
                if _on_device(args[2]):
                    self.writes.append(name)
                elif args[2].dim():
                    self.copies.append(Copy(name, _pinned(args[2]), False))


@pytest.fixture
def pretend_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[PretendCuda]:
    """A :class:`PretendCuda` whose nvJPEG is libjpeg-turbo: ``decode_jpeg`` for CUDA decodes on the CPU and returns the
    tiles as device tiles (the decoder's boundary; everything after it runs as on a GPU)."""
    mode = PretendCuda()
    real = jpeg_decode._decode

    def nvjpeg_at_its_boundary(streams: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        if device.type != "cuda":
            return real(streams, device)
        return [mode.adopt(image) for image in real(streams, CPU)]

    monkeypatch.setattr(jpeg_decode, "_decode", nvjpeg_at_its_boundary)
    yield mode


def assert_no_blocking_copy(mode: PretendCuda, expected: int) -> None:
    assert mode.copies, "no host-to-device copy recorded: the recorder saw nothing"
    blocking = [copy for copy in mode.copies if not (copy.pinned and copy.non_blocking)]
    assert not blocking, f"copies to CUDA that block the host (pageable source or non_blocking=False): {blocking}"
    assert len(mode.copies) == expected, mode.copies
    assert not mode.writes, f"per-tile copies into a device tensor: {mode.writes}"


def jpeg_module(slides: list[Path], patch: int, overlap: int, batch: int) -> SlideTileDataModule:
    dm = SlideTileDataModule(
        [str(s) for s in slides],
        level=0,
        patch_size=patch,
        overlap=overlap,
        tissue={"enabled": False, "thumbnail_max_side": 256},
        batch_size=batch,
        num_workers=0,
        reader="jpeg",
    )
    dm.setup("predict")
    return dm


def tiles_decoded(batch: dict[str, Any]) -> int:
    return len(batch["jpeg_tiles"].offsets) - 1


def test_jpeg_batch_crosses_in_one_non_blocking_copy_and_one_stack(
    synthetic_slide: Path, pretend_cuda: PretendCuda
) -> None:
    """A batch of JPEG tiles through the data module's device hook: the patch geometry and tile lookup cross in one
    pinned non-blocking copy; the decoded tiles are stacked with one call (not copied one by one)."""
    dm = jpeg_module([synthetic_slide], patch=256, overlap=48, batch=8)
    batch = next(iter(dm.predict_dataloader()))
    with pretend_cuda as mode:
        moved = dm.transfer_batch_to_device(batch, CUDA, 0)
        assert moved["image"].device.type == "cuda"
    assert_no_blocking_copy(mode, expected=1)
    device_stacks = [(count, on_device) for count, on_device in mode.stacks if on_device]
    assert device_stacks == [(tiles_decoded(batch) + 1, True)], mode.stacks  # the tiles and the white tile
    assert mode.pins == 1
    reference = decode_batch(batch, "cpu")["image"]
    assert torch.equal(moved["image"], reference)
    for key in ("x", "y", "slide_index", "tile_index"):
        assert not _on_device(moved[key])


def test_tiles_decoded_on_the_host_cross_in_one_copy(synthetic_slide: Path, pretend_cuda: PretendCuda) -> None:
    """A colour kind nvJPEG gets wrong is decoded by libjpeg-turbo on the host: those tiles are stacked there and
    cross in one pinned non-blocking copy, next to the geometry's."""
    dm = jpeg_module([synthetic_slide], patch=256, overlap=48, batch=8)
    batch = next(iter(dm.predict_dataloader()))
    with pretend_cuda as mode:
        out = decode_batch(batch, CUDA, {COLOUR_RGB: False, COLOUR_YCBCR: False})
    assert_no_blocking_copy(mode, expected=2)
    assert [on_device for _, on_device in mode.stacks] == [False, True]  # the host tiles, then all tiles
    assert torch.equal(out["image"], decode_batch(batch, "cpu")["image"])


def mixed_batch(dm: SlideTileDataModule) -> dict[str, Any]:
    """A batch holding the last JPEG-tiled patches of the first slide and the first patches of the second, which
    OpenSlide reads (as the JPEG reader's DataLoader collates them)."""
    dataset = dm.predict_dataloader().dataset
    boundary = dm.slides[0].tiles_tissue
    return collate_jpeg_tiles(dataset.__getitems__(list(range(boundary - 5, boundary + 3))))


@pytest.mark.parametrize("pinned_by_loader", [False, True])
def test_mixed_batch_copies_are_pinned_and_non_blocking(pretend_cuda: PretendCuda, pinned_by_loader: bool) -> None:
    """A batch mixing JPEG tiles (CMU) with pixels OpenSlide read (a deflate TIFF): the pixels (pinned by the
    DataLoader's pin thread, or by the hook when ``data.pin_memory=false``), the geometry and the row order each
    cross in one pinned non-blocking copy; every patch lands in its row."""
    dm = jpeg_module([shared_slide("CMU-1-Small-Region.svs"), shared_slide("openslide-python__boxes.tiff")], 128, 32, 8)
    batch = mixed_batch(dm)
    assert batch["image_rows"] and batch["jpeg_rows"]
    with pretend_cuda as mode:
        if pinned_by_loader:
            batch = pin_memory(batch)  # what the DataLoader's pin thread hands over
            mode.pins = 0
        moved = dm.transfer_batch_to_device(batch, CUDA, 0)
        assert moved["image"].device.type == "cuda"
    assert_no_blocking_copy(mode, expected=3)
    assert mode.pins == (2 if pinned_by_loader else 3)  # decode_batch's index arrays, and the pixels unless pinned
    reference = decode_batch(batch, "cpu")["image"]
    assert torch.equal(moved["image"], reference)
    assert torch.equal(moved["image"][batch["image_rows"]], batch["image"])


def test_openslide_batch_is_pinned_once_and_copied_without_blocking(pretend_cuda: PretendCuda) -> None:
    dm = SlideTileDataModule(
        str(shared_slide("CMU-1-Small-Region.svs")), patch_size=256, batch_size=4, num_workers=0, reader="openslide"
    )
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    with pretend_cuda as mode:
        moved = dm.transfer_batch_to_device(batch, CUDA, 0)
    assert_no_blocking_copy(mode, expected=1)
    assert mode.pins == 1 and _on_device(moved["image"]) and torch.equal(moved["image"], batch["image"])
    assert not _pinned(batch["image"]), "the loader's batch itself is left as it was"


def test_the_recorder_sees_blocking_copies(pretend_cuda: PretendCuda) -> None:
    """The recorder itself: the copies the old decoder made (a synchronous ``as_tensor``, a pageable ``.to``, a list
    index into a device tensor, one write per tile) are all caught."""
    with pretend_cuda as mode:
        geometry = torch.as_tensor(np.zeros((4, 8), np.int64), device=CUDA)
        pixels = torch.zeros(2, 3, 4, 4, dtype=torch.uint8).to(CUDA, non_blocking=True)
        full = torch.empty((4, 3, 4, 4), dtype=torch.uint8, device=CUDA)
        full[[0, 2]] = pixels
        full[1] = pixels[0]
        with pytest.raises(AssertionError, match="mixes CUDA tensors with host tensors"):
            geometry + torch.ones(4, 8, dtype=torch.int64)
    assert [(c.function, c.pinned, c.non_blocking) for c in mode.copies] == [
        ("as_tensor", False, False),
        ("to", False, True),
        ("__setitem__ index", False, False),
    ]
    assert mode.writes == ["__setitem__", "__setitem__"]
