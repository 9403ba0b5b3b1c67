"""``SegmentationModule``: the U-Net wrapped for ``trainer.predict`` (inference only)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn

from wsiseg.errors import UserInputError
from wsiseg.head import (
    ACTIVATIONS,
    REDUCTIONS,
    apply_activation,
    check_head,
    normalise,
    pool,
    probe_output_channels,
    reduce_channels,
)
from wsiseg.malloc import keep_freed_memory
from wsiseg.model import RANDOM_WEIGHTS, has_fixed_weights, load_checkpoint, network_stride
from wsiseg.runtimes.base import Runtime, TorchRuntime
from wsiseg.runtimes.choice import RUNTIMES, Int8Options, runtime_for
from wsiseg.runtimes.compiled import TileFunction
from wsiseg.runtimes.files import is_file_network

__all__ = ["SegmentationModule", "RANDOM_WEIGHTS", "FIXED_WEIGHTS", "TTA_TRANSFORMS", "step_outputs"]

log = logging.getLogger(__name__)

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


def output_channels(net: nn.Module) -> int:
    """The channels ``net`` outputs, counted on one stride-sized zero tile (float32, on the net's device)."""
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    return probe_output_channels(net.eval(), network_stride(net), device)


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
    ONNX network (:mod:`wsiseg.runtimes.files`, ``model/net=onnx|openvino``), whose file holds the weights, so
    ``checkpoint`` is not used. :attr:`weights` records which: the absolute checkpoint or ONNX path, ``"random"`` or
    ``"fixed"``.

    For an ONNX network the ``<file>.json`` sidecar written by ``wsiseg-export`` is the source of truth
    (:func:`wsiseg.runtimes.files.onnx_settings`): ``mean``/``std``/``activation`` left None take the sidecar's values,
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
        runtime: what runs a torch network on the CPU (:func:`wsiseg.runtimes.choice.runtime_for` decides, when the
            module is prepared): ``torch``; ``openvino`` (exported and compiled by OpenVINO in float32; no
            ``torch.compile`` then); ``openvino_int8`` (INT8 by OpenVINO, quantised by NNCF on the run's own tiles
            before the first batch by the pipeline, :mod:`wsiseg.pipeline.int8`); or ``auto`` — OpenVINO on float32
            CPUs for runs of ``runtime_min_tiles`` tiles or more, torch elsewhere. An exported file
            (``model/net=onnx|openvino``) runs in its own runtime.
        runtime_min_tiles: tiles a float32-CPU run needs for ``runtime=auto`` to pick OpenVINO.
        int8: ``model.int8`` (:class:`~wsiseg.runtimes.choice.Int8Options`): calibration and check settings of
            ``runtime=openvino_int8``.
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
        if is_file_network(net):  # an exported file: its weights and settings are the export's
            from wsiseg.runtimes.files import onnx_settings

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
        self._runtime: Runtime = TorchRuntime(self.net)  # what runs the network (prepare() chooses)
        self.max_chunk = max_chunk
        self._oom_chunk: int | None = None  # chunk size that last fit after an out-of-memory retry
        self._tiles = TileFunction(self.infer_tiles)  # eager until prepare() compiles it

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

    @property
    def compiled(self) -> bool:
        """Whether the tile function runs compiled by ``torch.compile``."""
        return self._tiles.compiled

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
        self._tiles = TileFunction(self.infer_tiles)
        if self._given_runtime is not None:  # use_runtime: already set up (INT8 calibrated on the run's tiles)
            self.runtime_used = self._given_runtime
            return
        self._runtime, why = runtime_for(
            self.net, self.runtime, device_type, precision, planned_tiles, self.runtime_min_tiles
        )
        self.runtime_used = self._runtime.name
        if self.runtime != "torch" and not is_file_network(self.net):
            log.info("model.runtime=%s: %s (%s)", self.runtime, self.runtime_used, why)
            if self.runtime == "auto" and self.runtime_used == "openvino":
                log.info(
                    "faster still on this CPU: an INT8 export (wsiseg-export export.format=openvino "
                    "export.quantize=int8 export.calibration_slides=[...], then model=openvino model.net.path=...; "
                    "README, Deploy) ran 1.3-1.7x the FP32 pipeline on a 2-core AVX2 CPU"
                )
        if not self._runtime.in_torch:  # a host runtime takes a plain NCHW array and is not compiled
            self.channels_last = False
            return
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
        if compile_network:
            self._tiles = TileFunction.compile(self.infer_tiles, device_type)

    def use_runtime(self, runtime: Runtime) -> None:
        """Run the network through ``runtime`` (e.g. the INT8 OpenVINO one :func:`wsiseg.pipeline.int8.prepare_int8`
        made of :attr:`net`) from now on; :attr:`runtime_used` reports its name and :meth:`prepare` keeps it."""
        self._runtime = runtime
        self._given_runtime = self.runtime_used = runtime.name
        self.channels_last = False
        self._tiles = TileFunction(self.infer_tiles)

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
        """uint8 (N, 3, H, W) → float32 ``(x/255 - mean)/std`` (:func:`wsiseg.head.normalise`), on ``images``'
        device."""
        return normalise(images, self.mean, self.std)

    def infer_tiles(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 tiles (N, 3, H, W) → float32 maps (N, C', H/d, W/d): normalisation, network, activation, channel
        reduction, average pooling by ``output_downsample``. This is the function ``torch.compile`` compiles."""
        x = self.normalise(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        net = self._runtime
        passes = []
        for dims, swap in TTA_TRANSFORMS[self.tta]:  # each pass's probabilities transformed back onto the tile
            t = torch.flip(x, dims) if dims else x
            y = apply_activation(net(t.transpose(2, 3) if swap else t).float(), self.activation)
            y = y.transpose(2, 3) if swap else y
            passes.append(torch.flip(y, dims) if dims else y)
        while len(passes) > 1:  # a pairwise sum: equal passes average to themselves exactly (2, 4, 8 terms)
            passes = [passes[i] + passes[i + 1] for i in range(0, len(passes), 2)]
        y = passes[0] if self.tta == "none" else passes[0] * (1.0 / len(TTA_TRANSFORMS[self.tta]))
        return pool(reduce_channels(y, self.reduction, self.channel_index), self.output_downsample)

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
                outputs.append(self._tiles(images[start : start + step]))
                start += step
            except torch.OutOfMemoryError:
                if step == 1:
                    raise UserInputError(
                        "out of GPU memory with a single tile: lower data.patch_size, use trainer.precision=16-mixed, "
                        "or free the GPU"
                    ) from None
                step = max(1, step // 2)
                self._oom_chunk = step
                self._tiles.forget_graph_batch()
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
