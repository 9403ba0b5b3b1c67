"""TileFunction: one compiled graph for a whole run (short and differently laid-out batches reshaped to the first
call's), and eager inference when the compiled call fails."""

from __future__ import annotations

import logging

import pytest
import torch

from wsiseg.runtimes.compiled import TileFunction, compile_options, x_format


def _first_channel(x: torch.Tensor) -> torch.Tensor:
    return x[:, :1].float() * 2.0


def test_short_and_channels_last_batches_reuse_the_first_batch_shape() -> None:
    calls: list[tuple[int, torch.memory_format]] = []

    def graph(x: torch.Tensor) -> torch.Tensor:  # stands in for the compiled graph: records what it is called with
        calls.append((x.shape[0], x_format(x)))
        return _first_channel(x)

    tiles = TileFunction(_first_channel, compiled=graph)
    images = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)
    full = tiles(images)
    short = tiles(images[:3])
    last = tiles(images[:5].contiguous(memory_format=torch.channels_last))
    assert calls == [(8, torch.contiguous_format)] * 3, "every call is padded to the first batch size and layout"
    assert tiles.compiled
    torch.testing.assert_close(short, full[:3])
    torch.testing.assert_close(last, full[:5])
    tiles.forget_graph_batch()
    tiles(images[:2])
    assert calls[-1] == (2, torch.contiguous_format), "after forget_graph_batch the next call sets the batch size"


def test_a_failing_compiled_call_falls_back_to_eager_for_good(caplog: pytest.LogCaptureFixture) -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no C++ compiler")

    tiles = TileFunction(_first_channel, compiled=broken)
    images = torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8)
    with caplog.at_level(logging.WARNING, logger="wsiseg.runtimes.compiled"):
        out = tiles(images[:3])
    assert "torch.compile failed (RuntimeError: no C++ compiler); running eager" in caplog.text
    assert not tiles.compiled
    torch.testing.assert_close(out, _first_channel(images[:3]))


def test_out_of_memory_is_not_mistaken_for_a_compile_failure() -> None:
    def oom(x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    tiles = TileFunction(_first_channel, compiled=oom)
    with pytest.raises(torch.OutOfMemoryError):
        tiles(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    assert tiles.compiled


def test_compile_options_freeze_on_cpu_only() -> None:
    assert compile_options("cpu") == {"freezing": True}
    assert compile_options("cuda") == {}
