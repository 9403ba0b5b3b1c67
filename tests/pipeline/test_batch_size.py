"""data.batch_size: the device default, capped at one network chunk, and auto in whole chunks."""

from __future__ import annotations

import torch


def test_default_batch_sizes() -> None:
    """data.batch_size=null: 2 on CPUs, 32 on GPUs or one network chunk when smaller (the 31M U-Net's chunk is 63
    tiles of 512 px, 15 of 1024 px); auto keeps whole chunks."""
    from wsiseg.hardware import default_batch_size
    from wsiseg.model import Unet
    from wsiseg.module import SegmentationModule
    from wsiseg.pipeline.batch_size import gpu_default_batch, network_chunk, resolve_batch_size, whole_chunks

    assert default_batch_size("cpu") == 2 and default_batch_size("cuda") == 32
    assert gpu_default_batch(63) == 32 and gpu_default_batch(15) == 15
    assert [whole_chunks(b, 63) for b in (512, 256, 63, 62, 1)] == [504, 252, 63, 62, 1]
    module = SegmentationModule(Unet(3, 3), checkpoint="random", compile=False)
    assert (network_chunk(module, 512), network_chunk(module, 1024)) == (63, 15)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_batch_size(None, module, 512, cuda, None) == 32
    assert resolve_batch_size(None, module, 1024, cuda, None) == 15
    assert resolve_batch_size(None, module, 512, cpu, None) == 2
    assert resolve_batch_size(48, module, 512, cuda, None) == 48
