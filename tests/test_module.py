from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from wsiseg.errors import UserInputError
from wsiseg.hardware import cpu_precision
from wsiseg.model import ProbeNet, Unet, load_checkpoint
from wsiseg.module import SegmentationModule


def test_predict_step_normalises_on_device_and_reduces_channels() -> None:
    torch.manual_seed(0)
    net = Unet(3, 3, base_width=4).eval()
    module = SegmentationModule(net, checkpoint="random", output_dtype="float32")
    images = torch.randint(0, 256, (3, 3, 32, 48), dtype=torch.uint8)
    out = module.predict_step({"image": images, "slide_index": torch.tensor([0, 0, 1])})
    with torch.no_grad():
        expected = net((images.float() / 255 - 0.5) / 0.5).amax(dim=1, keepdim=True)
    torch.testing.assert_close(out["probs"], expected, atol=1e-5, rtol=0)
    assert out["slide_index"].tolist() == [0, 0, 1]
    assert "image" not in out


def test_output_downsample_pools_on_device() -> None:
    module = SegmentationModule(
        ProbeNet(gain=0.5, bias=0.5), output_downsample=4, output_dtype="float32", channels_last=False
    )
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    out = module.predict_step({"image": images})["probs"]
    expected = torch.nn.functional.avg_pool2d(images[:, :1].float() / 255, 4)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_softmax_channel_reduction_and_labels() -> None:
    class Fixed(nn.Module):
        stride = 1
        fixed_weights = True  # no parameters: nothing to load

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x[:, 0], 2 * x[:, 0], torch.zeros_like(x[:, 0])], dim=1)

    images = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    both = SegmentationModule(Fixed(), activation="softmax", reduction="none", output_dtype="float32")
    probs = both.predict_step({"image": images})["probs"]
    assert probs.shape == (1, 3, 4, 4)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 4, 4))
    one = SegmentationModule(
        Fixed(), activation="softmax", reduction="channel", channel_index=1, output_dtype="float32"
    )
    torch.testing.assert_close(one.predict_step({"image": images})["probs"][:, 0], probs[:, 1])


def test_chunking_matches_single_call() -> None:
    torch.manual_seed(1)
    net = Unet(3, 1, base_width=4).eval()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    whole = SegmentationModule(net, checkpoint="random", output_dtype="float32").predict_step({"image": images})
    split = SegmentationModule(net, checkpoint="random", output_dtype="float32", max_chunk=2).predict_step(
        {"image": images}
    )
    torch.testing.assert_close(whole["probs"], split["probs"], atol=1e-6, rtol=0)


def test_chunk_size_respects_32_bit_index_limit() -> None:
    module = SegmentationModule(Unet(3, 3), checkpoint="random")  # base width 64
    batch = torch.zeros(128, 3, 512, 512, dtype=torch.uint8)
    chunk = module.chunk_size(batch)
    assert chunk < 64, "a batch of 64 at 512^2 overflows 32-bit indexing in F.pad"
    assert chunk * 2 * 64 * 514 * 514 < 2**31


class OomAbove(nn.Module):
    """Raises the CUDA out-of-memory error for batches larger than ``limit`` (the error a real GPU raises)."""

    stride = 1
    fixed_weights = True  # the ProbeNet inside sets its own weights

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.calls = limit, []
        self.conv = ProbeNet(gain=0.5, bias=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.conv(x)


def test_out_of_memory_halves_the_chunk_and_retries() -> None:
    net = OomAbove(limit=3)
    module = SegmentationModule(net, output_dtype="float32", channels_last=False)
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    out = module.predict_step({"image": images})["probs"]
    torch.testing.assert_close(out, images[:, :1].float() / 255, atol=1e-6, rtol=0)
    assert net.calls[:3] == [8, 4, 2], net.calls
    assert module._oom_chunk == 2
    # the next batch starts at the size that fitted
    net.calls.clear()
    module.predict_step({"image": images})
    assert set(net.calls) == {2}


def test_out_of_memory_at_one_tile_gives_advice() -> None:
    module = SegmentationModule(OomAbove(limit=0), channels_last=False)
    with pytest.raises(UserInputError, match="out of GPU memory with a single tile"):
        module.predict_step({"image": torch.zeros(2, 3, 8, 8, dtype=torch.uint8)})


def test_bad_options_fail_with_the_option_name() -> None:
    with pytest.raises(UserInputError, match="model.activation"):
        SegmentationModule(ProbeNet(), activation="relu")
    with pytest.raises(UserInputError, match="model.reduction"):
        SegmentationModule(ProbeNet(), reduction="mean")
    with pytest.raises(UserInputError, match="data.patch_size"):
        SegmentationModule(Unet(3, 1, base_width=4), checkpoint="random")(torch.zeros(1, 3, 24, 24, dtype=torch.uint8))


# What each CPU runs by default (wsiseg.hardware.cpu_precision) and the tolerances against the FP32 eager network:
# bf16's where oneDNN runs bfloat16 (measured max |dp| 0.058, mean 0.0005, 0.03 % of mask pixels flipped — the same as
# eager bf16 autocast on these tiles), FP32 reassociation error elsewhere.
_CPU_PRECISIONS = [
    pytest.param(
        "bf16-mixed",
        {"max": 0.1, "mean": 0.002, "flipped": 0.001},
        marks=pytest.mark.skipif(
            cpu_precision() != "bf16-mixed",
            reason="this CPU has no native bfloat16 (no AVX-512/AMX/Arm BF16): oneDNN would emulate it, and "
            "wsiseg runs FP32 here",
        ),
        id="bf16",
    ),
    pytest.param("32-true", {"max": 1e-4, "mean": 1e-5, "flipped": 1e-4}, id="fp32"),
]


@pytest.mark.parametrize(("precision", "tolerance"), _CPU_PRECISIONS)
def test_compiled_cpu_graph_matches_fp32_and_compiles_once(
    demo_checkpoint, precision: str, tolerance: dict[str, float]
) -> None:
    """CPU path with compile (freezing, fused normalisation) under a real Trainer at ``precision`` vs the FP32 eager
    network on tiles of a real slide; 5 tiles at batch 2, so the short last batch must reuse the compiled graph.

    Freezing must really take effect at either precision: the generated code calls pre-packed oneDNN convolutions with
    the ReLU fused (``mkldnn._convolution_pointwise``) and no BatchNorm is left (folded into the weights)."""
    import openslide
    import torch._inductor.config as inductor_config
    from lightning.pytorch import Trainer
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code
    from torch.utils.data import DataLoader

    from tests.conftest import shared_slide

    with openslide.OpenSlide(str(shared_slide("CMU-1-Small-Region.svs"))) as slide:
        origins = [(0, 0), (512, 256), (1024, 512), (1536, 768), (1792, 1280)]
        rgb = [np.asarray(slide.read_region(xy, 0, (256, 256)).convert("RGB")) for xy in origins]
    tiles = [torch.from_numpy(a.copy()).permute(2, 0, 1) for a in rgb]
    images = torch.stack(tiles)
    net = Unet(3, 1, base_width=8)
    module = SegmentationModule(net, checkpoint=str(demo_checkpoint), compile=True, output_dtype="float32")
    loader = DataLoader([{"image": t} for t in images], batch_size=2)
    counters.clear()
    trainer = Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False)
    with inductor_config.patch(fx_graph_cache=False):  # a cache hit would skip the code generation we inspect
        batches, codes = run_and_get_code(trainer.predict, module, loader)
    assert module.compiled
    assert counters["stats"]["unique_graphs"] == 1, "the short last batch recompiled the network"
    code = "\n".join(codes)
    assert "mkldnn._convolution_pointwise" in code, "freezing did not turn the convolutions into packed oneDNN ones"
    assert "batch_norm" not in code, "freezing did not fold BatchNorm into the convolutions"
    compiled = torch.cat([b["probs"] for b in batches])

    reference = Unet(3, 1, base_width=8)
    load_checkpoint(reference, str(demo_checkpoint))
    with torch.no_grad():
        expected = reference.eval()((images.float() / 255 - 0.5) / 0.5)
    assert compiled.shape == expected.shape == (5, 1, 256, 256)
    assert float(expected.std()) > 0.05, "the tiles must give varied probabilities for the comparison to mean much"
    diff = (compiled - expected).abs()
    assert float(diff.max()) <= tolerance["max"], f"max |dp| {float(diff.max()):.6f}"
    assert float(diff.mean()) <= tolerance["mean"], f"mean |dp| {float(diff.mean()):.7f}"
    flipped = ((compiled >= 0.5) != (expected >= 0.5)).float().mean()
    assert float(flipped) <= tolerance["flipped"]


@pytest.mark.parametrize(
    ("device", "tiles", "compiled"), [("cpu", 499, False), ("cpu", 500, True), ("cpu", None, False)]
)
def test_compile_auto_on_cpu_only_for_long_runs(device: str, tiles: int | None, compiled: bool) -> None:
    module = SegmentationModule(ProbeNet(), compile="auto", compile_min_tiles=500, runtime="torch")
    module.prepare(device, planned_tiles=tiles)
    assert module.compiled is compiled


def test_compiled_graph_is_reused_across_batch_layouts_and_sizes() -> None:
    """The JPEG-tile reader hands channels_last batches, OpenSlide reads NCHW ones, the last batch of a run is short:
    none of these may recompile the network (a recompile costs seconds), and the outputs stay the eager ones."""
    from torch._dynamo.utils import counters

    module = SegmentationModule(ProbeNet(gain=0.5, bias=0.5), compile=True, output_dtype="float32")
    module.prepare("cpu")
    eager = SegmentationModule(ProbeNet(gain=0.5, bias=0.5), compile=False, output_dtype="float32")
    with torch.inference_mode():
        images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    batches = [
        images[:2].contiguous(memory_format=torch.channels_last),  # the first call fixes the graph's layout
        images[1:].contiguous(),  # NCHW
        images[2:].contiguous(),  # short, NCHW
        images[:1].contiguous(memory_format=torch.channels_last),  # short, channels_last
    ]
    torch._dynamo.reset()
    counters.clear()
    with torch.inference_mode():
        for batch in batches:
            np.testing.assert_allclose(module(batch).numpy(), eager(batch).numpy(), atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1, "a batch layout or size recompiled the network"


@pytest.mark.parametrize("tta", ["flips", "dihedral"])
def test_tta_with_a_flip_equivariant_network_gives_the_plain_output_exactly(tta: str) -> None:
    """The probe (red / 255, per pixel) commutes with flips and transposes: every pass equals the plain map, and their
    average is the plain map bit for bit."""
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    plain = SegmentationModule(ProbeNet(), output_dtype="float32").predict_step({"image": images})["probs"]
    augmented = SegmentationModule(ProbeNet(), output_dtype="float32", tta=tta).predict_step({"image": images})
    assert torch.equal(augmented["probs"], plain)


@pytest.mark.parametrize(("tta", "transforms"), [("flips", 4), ("dihedral", 8)])
def test_tta_averages_the_transformed_back_predictions_of_an_asymmetric_network(tta: str, transforms: int) -> None:
    """A random U-Net with softmax over 3 channels and the max reduction: the TTA map is the channel max of the mean of
    the 4 (8) passes' probabilities, each computed here with the plain module on the flipped (transposed) tiles and
    turned back; the reduction comes after the average (the max of the mean, not the mean of the maxes)."""
    torch.manual_seed(0)
    net = Unet(3, 3, base_width=4).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    common = {"checkpoint": "random", "activation": "softmax", "output_dtype": "float32", "channels_last": False}
    plain = SegmentationModule(net, reduction="none", **common)
    expected = []
    for swap in (False, True)[: transforms // 4]:
        for dims in ((), (3,), (2,), (2, 3)):
            x = torch.flip(images, dims) if dims else images
            y = plain.predict_step({"image": x.transpose(2, 3) if swap else x})["probs"]
            y = y.transpose(2, 3) if swap else y
            expected.append(torch.flip(y, dims) if dims else y)
    mean = torch.stack(expected).mean(0).amax(dim=1, keepdim=True)
    got = SegmentationModule(net, reduction="max", tta=tta, **common).predict_step({"image": images})["probs"]
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # the network is not flip-equivariant
    torch.testing.assert_close(got, mean, rtol=0, atol=1e-6)


def test_tta_options_are_checked() -> None:
    with pytest.raises(UserInputError, match="model.tta must be one of none, flips, dihedral; got 'rot90'"):
        SegmentationModule(ProbeNet(), tta="rot90")
    module = SegmentationModule(ProbeNet(), tta="dihedral")
    with pytest.raises(UserInputError, match="dihedral transposes tiles, which needs square ones; got 32x48"):
        module(torch.zeros((1, 3, 32, 48), dtype=torch.uint8))
