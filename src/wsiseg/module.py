"""``SegmentationModule``: the U-Net wrapped for ``trainer.predict`` (inference only)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from wsiseg.cpu_runtime import RUNTIMES, Int8Options, TorchOnOpenVino, choose_runtime
from wsiseg.errors import UserInputError
from wsiseg.malloc import keep_freed_memory
from wsiseg.model import RANDOM_WEIGHTS, has_fixed_weights, holds_weights, load_checkpoint, network_stride
from wsiseg.openvino_net import openvino_available

__all__ = [
    "SegmentationModule",
    "ACTIVATIONS",
    "REDUCTIONS",
    "apply_activation",
    "RANDOM_WEIGHTS",
    "FIXED_WEIGHTS",
    "step_outputs",
]

log = logging.getLogger(__name__)

ACTIVATIONS = ("none", "sigmoid", "softmax")
REDUCTIONS = ("max", "channel", "none")
# model.tta -> the transforms applied to a tile: (dims flipped, then H and W swapped)
TTA_TRANSFORMS: dict[str, tuple[tuple[tuple[int, ...], bool], ...]] = {
    "none": (((), False),),
    "flips": (((), False), ((3,), False), ((2,), False), ((2, 3), False)),
    "dihedral": tuple((dims, swap) for swap in (False, True) for dims in ((), (3,), (2,), (2, 3))),
}
FIXED_WEIGHTS = "fixed"  # SegmentationModule.weights of a network that sets its own weights (ProbeNet)
_NO_CHECKPOINT = (
    "model.checkpoint is required: pass model.checkpoint=/path/to/weights.pth, or model.checkpoint=random to run "
    "untrained weights (benchmarks only)"
)

# F.pad / cat kernels index activations with 32-bit math in eager mode; a batch whose largest activation reaches
# 2**31 elements fails with "input tensor must fit into 32-bit index math".
_INT32_ELEMENTS = 2**31 - 1


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


def output_channels(net: nn.Module) -> int:
    """The channels ``net`` outputs, counted on one stride-sized zero tile (float32, on the net's device)."""
    stride = network_stride(net)
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    with torch.no_grad():
        return int(net.eval()(torch.zeros(1, 3, stride, stride, device=device)).shape[1])


def check_head(channels: int, activation: str | None, reduction: str, channel_index: int, where: str = "") -> None:
    """The network head makes sense for a network with ``channels`` output channels: ``reduction=channel`` keeps a
    channel it has, and ``softmax`` is over 2 or more channels (over one channel it is 1 everywhere: every pixel,
    tissue or not, would be tumour). Checked before any slide is read, not after inference; ``where`` names the network
    in the message (e.g. an ONNX file).

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


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    """``none`` | ``sigmoid`` | ``softmax`` (over channels) of a network's raw output: how the module turns it into
    probabilities, and how export verification and the INT8 checks do too."""
    if activation == "sigmoid":
        return torch.sigmoid(y)
    if activation == "softmax":
        return torch.softmax(y, dim=1)
    return y


def step_outputs(batch: dict[str, Any], probs: torch.Tensor, finite: torch.Tensor | None = None) -> dict[str, Any]:
    """What ``predict_step`` hands the writers: ``batch``'s keys but ``image``, with ``probs`` (N, C', h, w) and
    ``finite`` ((N,) bool on ``probs``' device: False for a tile whose map holds a NaN or an infinity; the writer reads
    it with the maps and fails that tile's slide). ``finite`` None: computed here, on the device."""
    out = {k: v for k, v in batch.items() if k != "image"}
    out["probs"] = probs
    out["finite"] = torch.isfinite(probs).flatten(1).all(dim=1) if finite is None else finite
    return out


class SegmentationModule(pl.LightningModule):
    """Runs a segmentation network on uint8 tiles and returns per-tile probability maps.

    ``predict_step`` takes ``batch["image"]`` as (N, 3, H, W) uint8 RGB, converts and normalises on the device
    (``(x/255 - mean) / std``), optionally converts to channels_last, runs the network under the Trainer's precision,
    applies ``activation``, reduces the channels with ``reduction``, average-pools by ``output_downsample`` on the
    device and returns float16 (or float32) maps of shape (N, C', H/d, W/d).

    Weights are never random by accident. ``checkpoint`` is a file loaded strictly into ``net``; ``"random"`` keeps
    ``net``'s initial weights and logs a warning that the masks are meaningless (benchmarks); None or empty is refused
    with a UserInputError, except for a network that declares ``fixed_weights = True`` (``ProbeNet``) and for an
    ONNX network (:class:`wsiseg.onnx_net.OnnxRuntimeNet`, ``model/net=onnx``), whose file holds the weights, so
    ``checkpoint`` is not used. :attr:`weights` records which: the absolute checkpoint or ONNX path, ``"random"`` or
    ``"fixed"``.

    For an ONNX network the ``<file>.json`` sidecar written by ``wsiseg-export`` is the source of truth
    (:func:`wsiseg.onnx_net.onnx_settings`): ``mean``/``std``/``activation`` left None take the sidecar's values,
    values equal to the sidecar's are accepted and different ones are refused; the file's real output channel count
    must match the sidecar's, and ``reduction="channel"`` needs ``channel_index`` below it. Without a sidecar a
    warning says mean/std/activation come from the config unchecked, and they must be given.

    Args:
        net: the network (``wsiseg.model.Unet`` for the users' checkpoints).
        checkpoint: weights to load into ``net``: a file path, or ``"random"`` for the initial weights (see above).
        trust_checkpoint: allow a checkpoint that needs full unpickling (a whole pickled model), which can run code
            while loading; off, only ``torch.load(weights_only=True)`` reads it (:func:`wsiseg.model.read_state_dict`).
        tta: test-time augmentation: ``none``, ``flips`` (identity, horizontal, vertical, both: 4 network passes a
            tile) or ``dihedral`` (the 8 flips and transposes of a square tile); the probabilities of the passes,
            each transformed back, are averaged after the activation and before the channel reduction.
        mpp: the microns per pixel the network was trained at (None: unknown). The data module reads slides at it
            when ``data.mpp`` is not given (``data.model_mpp`` is bound to it in the configs).
        stain_reference: the stain the network was trained on (the training set's Macenko stain matrix and maximum
            concentrations, or Reinhard lαβ mean and std): the data module normalises slides to it with ``data.stain``
            (``data.stain_reference`` is bound to it in the configs; :mod:`wsiseg.data.stain`).
        mean: per-channel mean on the /255 scale (0.5 for the users' network). None: an ONNX network's sidecar's,
            else 0.5.
        std: per-channel std on the /255 scale (0.5 for the users' network). None: as for ``mean``.
        activation: ``none`` when the network already outputs probabilities (sigmoid inside ``forward``),
            ``sigmoid`` or ``softmax`` for logits. None: an ONNX network's sidecar's, else
            ``none``.
        reduction: ``max`` — one tumour probability = max over channels; ``channel`` — keep ``channel_index``;
            ``none`` — keep all channels (the writer stores class labels = argmax).
        channel_index: channel kept by ``reduction=channel``.
        output_downsample: average-pool factor applied on the device (``writer.output_downsample``).
        channels_last: use the channels_last memory format (faster convolutions on GPU and with oneDNN on CPU).
        compile: wrap normalisation + network in ``torch.compile``. ``auto``: always on CUDA; on CPU when the run has
            at least ``compile_min_tiles`` tiles (compiling costs seconds up front, which short runs do not win back;
            figures in docs/performance.md). Falls back to eager with a warning if compilation fails.
        compile_min_tiles: tiles a CPU run needs for ``compile=auto`` to compile.
        runtime: what runs a torch network on the CPU: ``torch``, ``openvino`` (exported and compiled by OpenVINO in
            float32 when the module is prepared; no ``torch.compile`` then), or ``auto`` — the rule of
            :func:`wsiseg.cpu_runtime.choose_runtime` (OpenVINO on float32 CPUs for runs of ``runtime_min_tiles``
            tiles or more, torch elsewhere). Networks that hold their own weights (ONNX files) keep their runtime.
        runtime_min_tiles: tiles a float32-CPU run needs for ``runtime=auto`` to pick OpenVINO.
            ``runtime=openvino_int8``: INT8 by OpenVINO, quantised by NNCF on the run's own tiles before the first
            batch by the pipeline (:mod:`wsiseg.int8_runtime`), with ``int8`` (:class:`~wsiseg.cpu_runtime.
            Int8Options`) as its settings.
        int8: ``model.int8``: calibration and check settings of ``runtime=openvino_int8``.
        max_chunk: largest number of tiles run through the network at once (None → derived from the 32-bit index
            limit of the largest activation); bigger batches are split.
        output_dtype: dtype of the maps sent back to the host (float16 halves the transfer; float32 is exact).

    Example::

        >>> from wsiseg.model import Unet
        >>> module = SegmentationModule(Unet(3, 3, base_width=8), checkpoint="random")
        >>> out = module.predict_step({"image": torch.zeros(2, 3, 64, 64, dtype=torch.uint8)}, 0)
        >>> out["probs"].shape
        torch.Size([2, 1, 64, 64])
    """

    def __init__(
        self,
        net: nn.Module,
        checkpoint: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        activation: str | None = None,
        reduction: str = "max",
        channel_index: int = 0,
        output_downsample: int = 1,
        channels_last: bool = True,
        compile: bool | Literal["auto"] = "auto",
        compile_min_tiles: int = 500,
        runtime: str = "auto",
        runtime_min_tiles: int = 128,
        max_chunk: int | None = None,
        output_dtype: str = "float16",
        trust_checkpoint: bool = False,
        mpp: float | None = None,
        tta: str = "none",
        stain_reference: dict[str, Any] | None = None,
        int8: Int8Options | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if tta not in TTA_TRANSFORMS:
            raise UserInputError(f"model.tta must be one of {', '.join(TTA_TRANSFORMS)}; got '{tta}'")
        self.tta = tta
        if mpp is not None and not mpp > 0:
            raise UserInputError(f"model.mpp must be a positive number of microns per pixel or null, got {mpp}")
        self.mpp = mpp
        self.stain_reference = stain_reference  # checked by the data module, which uses it
        self.int8 = int8 if isinstance(int8, Int8Options) else Int8Options(**dict(int8 or {}))
        self._given_runtime: str | None = None  # set by use_runtime (model.runtime=openvino_int8)
        if output_dtype not in ("float16", "float32"):
            raise UserInputError(f"model.output_dtype must be float16 or float32, got '{output_dtype}'")
        self.output_dtype = getattr(torch, output_dtype)
        if activation is not None and activation not in ACTIVATIONS:
            raise UserInputError(f"model.activation must be one of {', '.join(ACTIVATIONS)}; got '{activation}'")
        if reduction not in REDUCTIONS:
            raise UserInputError(f"model.reduction must be one of {', '.join(REDUCTIONS)}; got '{reduction}'")
        if output_downsample < 1:
            raise UserInputError(f"writer.output_downsample must be >= 1, got {output_downsample}")
        if channel_index < 0:
            raise UserInputError(f"model.channel_index must be >= 0, got {channel_index}")
        if max_chunk is not None and max_chunk < 1:
            raise UserInputError(f"model.max_chunk must be >= 1 or null (derived), got {max_chunk}")
        if compile_min_tiles < 0:
            raise UserInputError(f"model.compile_min_tiles must be >= 0, got {compile_min_tiles}")
        if runtime_min_tiles < 0:
            raise UserInputError(f"model.runtime_min_tiles must be >= 0, got {runtime_min_tiles}")
        if runtime not in RUNTIMES:
            raise UserInputError(f"model.runtime must be one of {', '.join(RUNTIMES)}; got '{runtime}'")
        if holds_weights(net):  # an ONNX file: its weights and settings are the export's
            from wsiseg.onnx_net import onnx_settings

            if runtime in ("openvino", "openvino_int8"):
                raise UserInputError(
                    f"model.runtime={runtime} is for torch networks; an ONNX file runs in OpenVINO with "
                    "model=openvino model.net.path=... (INT8: wsiseg-export export.quantize=int8)"
                )

            onnx = onnx_settings(
                net, mean=mean, std=std, activation=activation, reduction=reduction, channel_index=channel_index
            )
            mean, std, activation = onnx.mean, onnx.std, onnx.activation
            if activation == "softmax":  # onnx_settings checked channel_index against the file
                check_head(net.output_channels(), activation, reduction, channel_index, f" '{net.path}'")
            self.weights = str(net.path)
            checkpoint, channels_last, compile = None, False, False
            runtime = "torch"  # the file's own runtime
        else:
            self.weights = self._load_weights(net, checkpoint, bool(trust_checkpoint))
            if reduction == "channel" or activation == "softmax":
                check_head(output_channels(net), activation, reduction, channel_index)
        self.net = net.eval()
        self.checkpoint = checkpoint
        mean = (0.5, 0.5, 0.5) if mean is None else mean
        std = (0.5, 0.5, 0.5) if std is None else std
        activation = "none" if activation is None else activation
        for key, values in (("model.mean", mean), ("model.std", std)):
            if len(values) != 3 or (key == "model.std" and min(values) <= 0):
                raise UserInputError(
                    f"{key} must be 3 numbers (R, G, B on the /255 scale{', each > 0' if key == 'model.std' else ''}), "
                    f"got {list(values)}"
                )
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.activation, self.reduction, self.channel_index = activation, reduction, channel_index
        self.output_downsample = output_downsample
        self.channels_last, self.compile_network = channels_last, compile
        self.compile_min_tiles = compile_min_tiles
        self.runtime, self.runtime_min_tiles = runtime, runtime_min_tiles
        self.runtime_used = "torch"  # what prepare() chose
        self._set_openvino(None)  # the net on OpenVINO when prepare() chose it
        self.max_chunk = max_chunk
        self._oom_chunk: int | None = None  # chunk size that last fit after an out-of-memory retry
        self._graph_batch: int | None = None  # batch size the compiled graph was built for
        self._graph_layout = torch.contiguous_format  # memory layout of its input
        self.compiled = False
        self._inductor_config: dict[str, Any] = {}  # inductor config patched around compiled calls
        self._set_forward(self.infer_tiles)

    @staticmethod
    def _load_weights(net: nn.Module, checkpoint: str | None, trust: bool = False) -> str:
        """Load ``checkpoint`` into ``net`` (or keep its weights, see the class docstring); returns :attr:`weights`."""
        if checkpoint in (None, ""):
            if has_fixed_weights(net):
                return FIXED_WEIGHTS
            raise UserInputError(_NO_CHECKPOINT)
        if checkpoint == RANDOM_WEIGHTS:
            if has_fixed_weights(net):
                return FIXED_WEIGHTS
            log.warning(
                "model.checkpoint=random: %s runs with untrained random weights, so the masks are meaningless "
                "(benchmarks only)",
                type(net).__name__,
            )
            return RANDOM_WEIGHTS
        load_checkpoint(net, checkpoint, trust)
        return str(Path(checkpoint).expanduser().absolute())

    def _set_openvino(self, net: TorchOnOpenVino | None) -> None:
        # Not a registered submodule: it wraps self.net, whose weights must appear once in state_dict() and .to().
        object.__setattr__(self, "_openvino", net)

    def _set_forward(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        # Bypass nn.Module.__setattr__ so the (possibly compiled) alias is not registered as a second submodule.
        object.__setattr__(self, "_forward", fn)

    @property
    def stride(self) -> int:
        """Input sizes must be multiples of this (16 for the U-Nets)."""
        return network_stride(self.net)

    def setup(self, stage: str) -> None:
        # Runs before the model moves to its device: the strategy says where it is going. The entry point has already
        # prepared the module with the run's tile count (prepare is idempotent); otherwise compile=auto has none.
        self.prepare(self.trainer.strategy.root_device.type, precision=str(self.trainer.precision))

    def prepare(self, device_type: str, planned_tiles: int | None = None, precision: str = "32-true") -> None:
        """Choose the runtime (see ``runtime``), apply channels_last and ``torch.compile`` (see ``compile``) for
        ``device_type``; ``planned_tiles`` is the run's tile count, which ``runtime=auto`` and ``compile=auto`` weigh
        on CPU; ``precision`` the trainer's (Lightning's spelling).

        What is compiled is :meth:`infer_tiles` — normalisation, network, activation, channel reduction and pooling —
        so the uint8 → float conversion and the layout change fuse into the network's first kernels.
        Idempotent: a second call for the same device type keeps the compiled graph (no recompilation)."""
        if getattr(self, "_prepared_for", None) == device_type:
            return
        self._prepared_for = device_type
        if self.tta != "none":
            log.info("model.tta=%s: %d network passes a tile", self.tta, len(TTA_TRANSFORMS[self.tta]))
        if device_type == "cpu":
            keep_freed_memory()  # activations are re-allocated every call: keep them out of fresh mmap pages
        self._set_forward(self.infer_tiles)
        self.runtime_used, why = choose_runtime(
            self.runtime, device_type, precision, planned_tiles, self.runtime_min_tiles, openvino_available()
        )
        if holds_weights(self.net):  # an ONNX file runs in its own runtime
            self.runtime_used = ", ".join(self.net.active_providers)
        elif self.runtime != "torch":
            log.info("model.runtime=%s: %s (%s)", self.runtime, self.runtime_used, why)
            if self.runtime == "auto" and self.runtime_used == "openvino":
                log.info(
                    "faster still on this CPU: an INT8 export (wsiseg-export export.format=openvino "
                    "export.quantize=int8 export.calibration_slides=[...], then model=openvino model.net.path=...; "
                    "README, Deploy) ran 1.3-1.7x the FP32 pipeline on a 2-core AVX2 CPU"
                )
        self.compiled = False
        if self._given_runtime is not None:  # use_runtime: already set up (INT8 calibrated on the run's tiles)
            self.runtime_used = self._given_runtime
            return
        if self.runtime_used == "openvino_int8":
            raise UserInputError(
                "model.runtime=openvino_int8 calibrates on the run's own tiles: run the module through wsiseg-predict "
                "or wsiseg.predict (wsiseg.pipeline.assemble), or use model.runtime=openvino"
            )
        if self.runtime_used == "openvino":
            self._set_openvino(TorchOnOpenVino(self.net))
            self.channels_last = False  # OpenVINO takes a plain NCHW array
            return
        self._set_openvino(None)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        compile_network = self.compile_network
        if compile_network == "auto":
            long_cpu_run = device_type == "cpu" and (planned_tiles or 0) >= self.compile_min_tiles
            compile_network = device_type == "cuda" or long_cpu_run
            if device_type == "cpu":
                log.info(
                    "model.compile=auto on CPU: %s (%s tiles; threshold model.compile_min_tiles=%d)",
                    "compiling" if long_cpu_run else "eager",
                    planned_tiles if planned_tiles is not None else "unknown",
                    self.compile_min_tiles,
                )
        self.compiled = False
        if compile_network:
            log.info("compiling the network with torch.compile (takes a while on first use)")
            try:
                compiled = torch.compile(self.infer_tiles, dynamic=False)
            except Exception as exc:  # a missing compiler must not stop inference
                log.warning("torch.compile unavailable (%s); running eager", exc)
            else:
                self._set_forward(compiled)
                self.compiled = True
                self._inductor_config = compile_options(device_type)

    def use_runtime(self, net: nn.Module, name: str) -> None:
        """Run the network through ``net`` (an OpenVINO network of :attr:`net`, e.g. the INT8 one
        :func:`wsiseg.int8_runtime.prepare_int8` made) from now on; ``name`` is what :attr:`runtime_used` reports.
        :meth:`prepare` keeps it."""
        self._set_openvino(net)
        self._given_runtime = self.runtime_used = name
        self.channels_last, self.compiled = False, False
        self._set_forward(self.infer_tiles)

    def chunk_size(self, batch: torch.Tensor) -> int:
        """Tiles per network call so the largest activation (first block, full resolution) stays under 2**31."""
        if self.max_chunk:
            return self.max_chunk
        n, _, h, w = batch.shape
        # The last decoder block pads a concat of 2 x base_width channels at full resolution (+1 px each side).
        first = next((m.out_channels for m in self.net.modules() if isinstance(m, nn.Conv2d)), 64)
        per_tile = 2 * first * (h + 2) * (w + 2)
        return max(1, min(n, _INT32_ELEMENTS // max(per_tile, 1)))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) → float32 ``(x/255 - mean)/std``, on whatever device ``images`` is."""
        x = images.float().div_(255.0)
        return (x - self.mean) / self.std

    def infer_tiles(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 tiles (N, 3, H, W) → float32 maps (N, C', H/d, W/d): normalisation, network, activation, channel
        reduction, average pooling by ``output_downsample``. This is the function ``torch.compile`` compiles."""
        x = self.normalise(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        net = self.net if self._openvino is None else self._openvino
        passes = []
        for dims, swap in TTA_TRANSFORMS[self.tta]:  # each pass's probabilities transformed back onto the tile
            t = torch.flip(x, dims) if dims else x
            y = apply_activation(net(t.transpose(2, 3) if swap else t).float(), self.activation)
            y = y.transpose(2, 3) if swap else y
            passes.append(torch.flip(y, dims) if dims else y)
        while len(passes) > 1:  # a pairwise sum: equal passes average to themselves exactly (2, 4, 8 terms)
            passes = [passes[i] + passes[i + 1] for i in range(0, len(passes), 2)]
        y = passes[0] if self.tta == "none" else passes[0] * (1.0 / len(TTA_TRANSFORMS[self.tta]))
        if self.reduction == "max":
            y = y.amax(dim=1, keepdim=True)
        elif self.reduction == "channel":
            y = y[:, self.channel_index : self.channel_index + 1]
        if self.output_downsample > 1:
            y = F.avg_pool2d(y, self.output_downsample)
        return y

    def _call_network(self, images: torch.Tensor) -> torch.Tensor:
        try:
            if self.compiled and self._inductor_config:
                import torch._inductor.config as inductor_config

                with inductor_config.patch(self._inductor_config):
                    return self._forward(images)
            return self._forward(images)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            if not self.compiled:
                raise
            # torch.compile compiles on the first call; a toolchain problem must not stop inference.
            log.warning("torch.compile failed (%s: %s); running eager", type(exc).__name__, str(exc)[:200])
            self._set_forward(self.infer_tiles)
            self.compiled = False
            return self.infer_tiles(images)

    def _as_compiled(self, chunk: torch.Tensor) -> torch.Tensor:
        """``chunk`` shaped as the compiled graph was first called with, so it is not recompiled (seconds): a compiled
        graph is specialised to its batch size, its input's memory layout and the kind of tensor it saw. Short chunks
        (the last batch of a run) are zero-padded to the first batch size, every chunk takes the first one's layout
        (NCHW from OpenSlide reads, channels_last from the JPEG-tile reader) and, under inference_mode, is an
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

    def run_network(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`infer_tiles` on a uint8 batch, in chunks (:meth:`chunk_size`).

        On CUDA out-of-memory the chunk is halved and retried, down to one tile; then a UserInputError says what to
        change.
        """
        step = min(self.chunk_size(images), self._oom_chunk or images.shape[0])
        outputs: list[torch.Tensor] = []
        start = 0
        while start < images.shape[0]:
            try:
                chunk = images[start : start + step]
                count = chunk.shape[0]
                if self.compiled:
                    chunk = self._as_compiled(chunk)
                outputs.append(self._call_network(chunk)[:count])
                start += step
            except torch.OutOfMemoryError:
                if step == 1:
                    raise UserInputError(
                        "out of GPU memory with a single tile: lower data.patch_size, use trainer.precision=16-mixed, "
                        "or free the GPU"
                    ) from None
                step = max(1, step // 2)
                self._oom_chunk = step
                self._graph_batch = None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log.warning("CUDA out of memory: retrying with %d tiles per network call", step)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 tiles → (N, C', H/d, W/d) float32 probabilities on the same device."""
        h, w = images.shape[-2:]
        if self.tta == "dihedral" and h != w:
            raise UserInputError(
                f"model.tta=dihedral transposes tiles, which needs square ones; got {h}x{w}: use model.tta=flips"
            )
        if h % self.stride or w % self.stride:
            raise UserInputError(
                f"tile size {h}x{w} is not a multiple of the network's stride {self.stride}: set data.patch_size "
                f"to a multiple of {self.stride}"
            )
        return self.run_network(images)

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0, dataloader_idx: int = 0) -> dict[str, Any]:
        """``batch["image"]``: (N, 3, H, W) uint8 on this device (the data module decodes compressed tiles); the other
        keys are passed through with ``probs`` and ``finite`` added (``finite``: (N,) bool on the device, False for a
        tile whose map holds a NaN or an infinity)."""
        images, errors = batch["image"], batch.get("error")
        if errors is not None and len(errors) and all(errors):
            # every tile of the batch is unreadable (its slide or image fails): one tile gives the maps' shape, the
            # rest is not computed (a corrupt image of hundreds of pieces would otherwise run them all)
            shape = self(images[:1]).shape[1:]
            return step_outputs(batch, images.new_zeros((images.shape[0], *shape), dtype=self.output_dtype))
        return step_outputs(batch, self(images).to(self.output_dtype))
