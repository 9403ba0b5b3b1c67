"""Checks that need a CUDA GPU (skipped on CPU-only machines such as CI); scripts/gpu_check.sh runs them.

Every GPU test runs under ``torch.cuda.set_sync_debug_mode("warn")`` (:func:`cuda_syncs`, also used by the GPU cases of
tests/data/readers/test_jpeg_decode.py): a synchronising CUDA operation fails the test, with the Python stack that made
it, unless the test itself needs it (:func:`syncs_allowed`: setting up inputs, reading results back to check them) or
names its source as a once-per-run wait (:meth:`CudaSyncs.allow`).
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import numpy as np
import openslide
import pytest
import tifffile
import torch

from tests.conftest import shared_slide
from tests.helpers import predict
from wsiseg.data.slide import rgba_to_rgb
from wsiseg.model import Unet
from wsiseg.module import SegmentationModule

pytestmark = pytest.mark.gpu

SYNC_WARNING = "called a synchronizing CUDA operation"  # what torch warns in sync debug mode "warn"
# Waits a whole run may make once, outside the per-batch path ("file:function" fragments of a frame on the stack).
ONCE_PER_RUN = {
    "module.py:_apply": "moving the weights between host and GPU (Lightning moves them back at teardown)",
    "torch/_inductor/": "compiling: Inductor times its candidate kernels on their first call",
    "jpeg/decode.py:colour_mismatch": "the nvJPEG colour check, once per colour kind and run",
}


class CudaSyncs:
    """The synchronising CUDA operations seen while a GPU test runs, each with the Python stack that made it.

    ``allow(where, why)``: a sync whose stack has a frame whose ``file:function`` contains ``where`` is expected.
    """

    def __init__(self) -> None:
        self.seen: list[traceback.StackSummary] = []
        self.allowed: dict[str, str] = {}

    def allow(self, where: str, why: str) -> None:
        self.allowed[where] = why

    def unexpected(self) -> list[traceback.StackSummary]:
        return [
            stack
            for stack in self.seen
            if not any(where in f"{frame.filename}:{frame.name}" for frame in stack for where in self.allowed)
        ]


@contextmanager
def syncs_allowed() -> Iterator[None]:
    """Synchronising CUDA operations the test itself makes (inputs copied in, results read back to check them): the
    sync debug mode is off inside."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.fixture(autouse=True)
def cuda_syncs(request: pytest.FixtureRequest) -> Iterator[CudaSyncs]:
    """A GPU test runs under ``torch.cuda.set_sync_debug_mode("warn")``; every synchronising CUDA operation it makes
    (any thread) outside :func:`syncs_allowed` and not from an allowed source fails it, listing where each came from.
    Does nothing for tests without the ``gpu`` marker or without CUDA."""
    syncs = CudaSyncs()
    if request.node.get_closest_marker("gpu") is None or not torch.cuda.is_available():
        yield syncs
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")
        show = warnings.showwarning

        def record(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            if SYNC_WARNING in str(message):
                syncs.seen.append(traceback.extract_stack()[:-1])
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode(0)
    unexpected = syncs.unexpected()
    if unexpected:
        where = "\n\n".join("".join(traceback.format_list(stack[-8:])) for stack in unexpected[:5])
        pytest.fail(f"{len(unexpected)} synchronising CUDA operation(s) (sync debug mode 'warn'); the first:\n{where}")


def users_network(seed: int = 17, gain: float = 10.0) -> Unet:
    torch.manual_seed(seed)
    net = Unet(3, 3).eval()
    with torch.no_grad():
        net.conv10.weight.mul_(gain)  # probabilities spread over 0..1
    return net


def real_tiles(count: int, size: int) -> torch.Tensor:
    with openslide.OpenSlide(str(shared_slide("CMU-1-Small-Region.svs"))) as slide:
        tiles = [
            rgba_to_rgb(np.asarray(slide.read_region((x, y), 0, (size, size))))
            for y in range(0, 2967 - size, size)
            for x in range(0, 2220 - size, size)
        ][:count]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def test_fp16_compiled_channels_last_matches_fp32_reference(cuda_syncs: CudaSyncs) -> None:
    """The users' 31M network: 16-mixed + channels_last + torch.compile vs FP32 eager, same CUDA device.
    Tolerance: Dice of the 0.5-thresholded masks ≥ 0.99, max |Δp| ≤ 0.005, mean |Δp| ≤ 0.001 (measured on an H200:
    max 0.00031, mean 0.00012, Dice 0.99994; random weights give probabilities near 0.52 with std ~0.004)."""
    device = torch.device("cuda")
    net = users_network()
    with syncs_allowed():  # inputs and weights copied in
        tiles = real_tiles(8, 512).to(device)
        reference = Unet(3, 3).to(device).eval()
        reference.load_state_dict(net.state_dict())
        module = SegmentationModule(net, checkpoint="random", compile=True, output_dtype="float32").to(device)
    module.prepare("cuda")
    assert module.compiled
    cuda_syncs.allow("torch/_inductor/", ONCE_PER_RUN["torch/_inductor/"])
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        mixed = module(tiles)
        module(tiles)  # a steady-state call: compiled, nothing left to tune
    with torch.inference_mode():
        fp32 = reference((tiles.float() / 255 - 0.5) / 0.5).amax(dim=1, keepdim=True)
    with syncs_allowed():  # the results read back
        diff = (mixed - fp32).abs()
        a, b = mixed >= 0.5, fp32 >= 0.5
        dice = (2 * (a & b).sum() / (a.sum() + b.sum())).item()
        print(
            f"fp16 compiled vs fp32: max |dp| {diff.max().item():.5f}, mean |dp| {diff.mean().item():.6f}, "
            f"Dice {dice:.5f}, reference std {fp32.std().item():.3f}"
        )
        assert dice >= 0.99 and diff.max() <= 0.005 and diff.mean() <= 0.001


def test_real_cuda_out_of_memory_halves_the_chunk() -> None:
    """Fill the GPU so that 48 tiles of 512 px cannot fit, then predict: the module halves until it fits."""
    device = torch.device("cuda")
    # Recovering from out-of-memory frees the allocator's cached blocks, which waits for the device: the retries run
    # with syncs allowed; the run after them, with a chunk that fits, is checked.
    with syncs_allowed():
        module = SegmentationModule(
            users_network(), checkpoint="random", compile=False, max_chunk=48, output_dtype="float32"
        ).to(device)
        tiles = real_tiles(48, 512).to(device)
        torch.cuda.empty_cache()  # blocks cached by earlier tests are free to PyTorch but not counted by the driver
        free, _ = torch.cuda.mem_get_info(device)
        ballast = torch.empty(max(0, free - (2 << 30)), dtype=torch.uint8, device=device)  # leave ~2 GiB
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                out = module(tiles)
        finally:
            del ballast
            torch.cuda.empty_cache()
    print(f"chunk after out-of-memory retries: {module._oom_chunk}")
    assert module._oom_chunk is not None and module._oom_chunk < 48
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        module._oom_chunk, module.max_chunk = None, 8
        again = module(tiles)
    with syncs_allowed():
        torch.testing.assert_close(out, again, atol=2e-3, rtol=0)


def test_gpu_predict_matches_cpu_fp32(tmp_path: Path, cuda_syncs: CudaSyncs) -> None:
    """wsiseg-predict on the GPU trainer (16-mixed, compile=auto → compiled; data.reader=auto → nvJPEG for this
    JPEG-tiled slide) vs the CPU FP32 mask of the same slide: mean |Δ| < 0.5 grey level and 99.9 % of pixels within 2.
    The GPU run makes no synchronising CUDA operation but the once-per-run ones (:data:`ONCE_PER_RUN`)."""
    for where, why in ONCE_PER_RUN.items():
        cuda_syncs.allow(where, why)
    slide = shared_slide("CMU-1-Small-Region.svs")
    common = ["model=demo", "data.patch_size=512", "data.overlap=64", "writer.output_downsample=2"]
    assert predict(slide, tmp_path / "gpu", [*common, "trainer=gpu", "trainer.precision=16-mixed"]) == 0
    assert predict(slide, tmp_path / "cpu", common) == 0
    gpu = tifffile.imread(tmp_path / "gpu" / "CMU-1-Small-Region" / "mask.tif", key=0).astype(int)
    cpu = tifffile.imread(tmp_path / "cpu" / "CMU-1-Small-Region" / "mask.tif", key=0).astype(int)
    diff = np.abs(gpu - cpu)
    print(f"GPU 16-mixed vs CPU fp32 mask: mean |d| {diff.mean():.4f}, max {diff.max()}, >2: {(diff > 2).mean():.5%}")
    assert diff.mean() < 0.5 and (diff <= 2).mean() >= 0.999


def test_batch_size_auto_probes_gpu_memory(cuda_syncs: CudaSyncs) -> None:
    """``auto`` probes the memory (waiting for each try, by design: once, before prediction) and keeps whole network
    chunks; the default (null) is 32 tiles of 512 px on a GPU, one chunk of 15 at 1024 px."""
    from lightning.pytorch import Trainer

    from wsiseg.pipeline.batch_size import network_chunk, resolve_batch_size

    cuda_syncs.allow("batch_size.py:probe_max_batch", "the batch-size probe waits for each try, once per run")
    cuda_syncs.allow("module.py:_apply", ONCE_PER_RUN["module.py:_apply"])
    trainer = Trainer(accelerator="gpu", devices=1, precision="16-mixed", logger=False)
    module = SegmentationModule(users_network(), checkpoint="random", compile=False)
    found = resolve_batch_size("auto", module, 512, torch.device("cuda"), trainer)
    chunk = network_chunk(module, 512)
    print(f"batch_size=auto -> {found} tiles of 512 px (chunks of {chunk})")
    assert found >= 8 and (found < chunk or found % chunk == 0)
    assert resolve_batch_size(None, module, 512, torch.device("cuda"), trainer) == 32
    assert resolve_batch_size(None, module, 1024, torch.device("cuda"), trainer) == min(32, network_chunk(module, 1024))
