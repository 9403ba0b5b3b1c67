"""What a runtime is: the thing that runs a network on a normalised batch.

A runtime takes the normalised float batch (N, 3, H, W), on the device the module runs on, and returns the network's
raw output (N, C, H, W) as float32 on the same device (the head — activation, channel reduction, pooling — is the
module's, :mod:`wsiseg.head`). :class:`Runtime` is the interface; the classes are

- :class:`TorchRuntime`: the torch network itself (eager; ``torch.compile`` wraps the module's whole tile function);
- :class:`wsiseg.runtimes.openvino.TorchOnOpenVino`: a torch network exported and compiled by OpenVINO (FP32, or the
  INT8 IR :mod:`wsiseg.pipeline.int8` made);
- a file network (:class:`wsiseg.runtimes.files.FileNetwork`: onnxruntime or OpenVINO on an exported file), run
  through :class:`TorchRuntime` too, since it is an ``nn.Module`` whose ``forward`` calls its runtime.

:func:`wsiseg.runtimes.choice.runtime_for` picks one (the ``model.runtime`` rule lives there, once).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from wsiseg.runtimes.files import is_file_network

__all__ = ["Runtime", "TorchRuntime", "run_on_host"]


class Runtime:
    """Runs a network: normalised float (N, 3, H, W) → raw output (N, C, H, W), float, on the input's device.

    Attributes:
        name: what ``report.json`` and the logs call it (``torch``, ``openvino``, ``openvino_int8``, or a file
            network's providers, e.g. ``CPUExecutionProvider``).
        in_torch: it runs torch kernels on the device (a torch network): ``torch.compile`` may trace through it and a
            channels_last input helps its convolutions. Host runtimes take a plain NCHW array and are not compiled.
    """

    name: str = "runtime"
    in_torch: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TorchRuntime(Runtime):
    """An ``nn.Module`` called as it is: a torch network (:attr:`in_torch`) or a file network
    (:class:`~wsiseg.runtimes.files.FileNetwork`, whose ``forward`` crosses to its own runtime on the host).

    Args:
        net: the network, weights loaded, in eval mode.
        name: what the runtime is called (``torch``, or the file network's providers).
    """

    def __init__(self, net: nn.Module, name: str = "torch") -> None:
        self.net, self.name = net, name
        self.in_torch = not is_file_network(net)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def run_on_host(run: Callable[[np.ndarray], np.ndarray], x: torch.Tensor, dtype: type = np.float32) -> torch.Tensor:
    """The host round trip of every non-torch runtime: ``x`` to a contiguous ``dtype`` numpy array on the CPU,
    ``run`` on it, and its output back as float32 on ``x``'s device."""
    array = x.detach().to("cpu", torch.float32).contiguous().numpy().astype(dtype, copy=False)
    return torch.from_numpy(np.ascontiguousarray(run(array), dtype=np.float32)).to(x.device)
