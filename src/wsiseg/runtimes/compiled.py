"""The module's tile function run eagerly or compiled by ``torch.compile``: the compile options per device, the
reshaping that keeps one compiled graph for a whole run, and the fall-back to eager when compilation fails."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["TileFunction", "compile_options", "x_format"]

log = logging.getLogger(__name__)

TileFn = Callable[[torch.Tensor], torch.Tensor]


def x_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of an NCHW tensor (channels_last or contiguous)."""
    return (
        torch.channels_last
        if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1
        else (torch.contiguous_format)
    )


def compile_options(device_type: str) -> dict[str, Any]:
    """Inductor config for inference on ``device_type``; applied with ``torch._inductor.config.patch`` around every
    call of the compiled function (tracing and compilation happen inside the first call).

    On CPU, ``freezing`` turns the parameters into constants, folds BatchNorm into the convolutions and runs them as
    pre-packed oneDNN convolutions with the ReLU fused. It has to be set while Dynamo traces: passed only as
    ``torch.compile(options=...)`` the weights stay graph inputs and nothing is folded (see docs/performance.md). It
    applies only under ``torch.no_grad``/``inference_mode`` (``trainer.predict``). CUDA keeps Inductor's defaults."""
    return {"freezing": True} if device_type == "cpu" else {}


class TileFunction:
    """Runs a tile function (uint8 tiles (N, 3, H, W) → maps) eagerly, or through its compiled graph.

    A compiled graph is specialised to its batch size, its input's memory layout and the kind of tensor it saw; each
    call is shaped as the first one was (:meth:`as_compiled`), so a run compiles once. A compiled call that fails
    (a missing toolchain shows only then) warns and runs eagerly from then on; out-of-memory errors pass through.

    Args:
        eager: the tile function.
        compiled: its compiled form (None: eager only); :meth:`compile` makes one.
        inductor_config: Inductor config patched around each compiled call (:func:`compile_options`).
    """

    def __init__(
        self, eager: TileFn, compiled: TileFn | None = None, inductor_config: dict[str, Any] | None = None
    ) -> None:
        self.eager, self._compiled = eager, compiled
        self.inductor_config = dict(inductor_config or {})
        self._graph_batch: int | None = None  # batch size the compiled graph was built for
        self._graph_layout = torch.contiguous_format  # memory layout of its input

    @classmethod
    def compile(cls, eager: TileFn, device_type: str) -> TileFunction:
        """``eager`` wrapped in ``torch.compile`` for ``device_type`` (eager, with a warning, when torch.compile is
        unavailable)."""
        log.info("compiling the network with torch.compile (takes a while on first use)")
        try:
            compiled = torch.compile(eager, dynamic=False)
        except Exception as exc:  # a missing compiler must not stop inference
            log.warning("torch.compile unavailable (%s); running eager", exc)
            return cls(eager)
        return cls(eager, compiled, compile_options(device_type))

    @property
    def compiled(self) -> bool:
        """Whether calls go through the compiled graph."""
        return self._compiled is not None

    def forget_graph_batch(self) -> None:
        """The next call sets the batch size the graph is called with (after a smaller chunk was needed)."""
        self._graph_batch = None

    def as_compiled(self, chunk: torch.Tensor) -> torch.Tensor:
        """``chunk`` shaped as the compiled graph was first called with, so it is not recompiled (seconds). Short
        chunks (the last batch of a run) are zero-padded to the first batch size, every chunk takes the first one's
        layout (NCHW from OpenSlide reads, channels_last from the JPEG-tile reader) and, under inference_mode, is an
        inference tensor."""
        count = chunk.shape[0]
        if self._graph_batch is None:
            self._graph_batch, self._graph_layout = count, x_format(chunk)
        layout = self._graph_layout
        if count < self._graph_batch or not chunk.is_contiguous(memory_format=layout):
            padded = torch.zeros(
                (self._graph_batch, *chunk.shape[1:]), dtype=chunk.dtype, device=chunk.device
            ).contiguous(memory_format=layout)
            padded[:count] = chunk
            return padded  # a new tensor: an inference tensor under inference_mode
        if torch.is_inference_mode_enabled() and not chunk.is_inference():
            return chunk.clone(memory_format=layout)
        return chunk

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        """The maps of ``chunk``'s tiles (as many as ``chunk`` holds)."""
        if self._compiled is None:
            return self.eager(chunk)
        count = chunk.shape[0]
        shaped = self.as_compiled(chunk)
        try:
            if self.inductor_config:
                import torch._inductor.config as inductor_config

                with inductor_config.patch(self.inductor_config):
                    return self._compiled(shaped)[:count]
            return self._compiled(shaped)[:count]
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            # torch.compile compiles on the first call; a toolchain problem must not stop inference.
            log.warning("torch.compile failed (%s: %s); running eager", type(exc).__name__, str(exc)[:200])
            self._compiled = None
            return self.eager(shaped)[:count]
