"""``Segmenter``: wsiseg from Python — tiles, slides, patch folders, export and the benchmark, on one configured model.

The engine is a door onto the same parts as the commands: it composes the same Hydra configs (``conf/``) with the
same keys and checks, so an option has the same name, default and one-line error in both; slide and folder runs go
through :func:`wsiseg.pipeline.run`, the assembler ``wsiseg-predict`` calls. Errors are raised (``UserInputError``
with the command's one-line message), never turned into an exit.

Example::

    import wsiseg

    seg = wsiseg.Segmenter("demo", device="cpu")
    maps = seg.predict_tiles([Image.open("tile.png")])   # (1, 1, H, W) float32 probabilities
    result = seg.predict_slides("slides/", "out/run1")   # a folder, a glob, a path or a list of them
    result.rows[0]["status"], result.mask("CMU-1", level=2), result.heatmap("CMU-1")
    seg.export("unet.onnx")                              # verified ONNX + sidecar
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsiseg.errors import UserInputError

if TYPE_CHECKING:
    import numpy as np
    from omegaconf import DictConfig

    from wsiseg.pipeline.result import RunResult

__all__ = ["Segmenter", "as_override"]

log = logging.getLogger(__name__)

# a string the override grammar reads as the command line does, unquoted
_PLAIN = re.compile(r"[A-Za-z0-9_./+~@-][A-Za-z0-9_./+~@:-]*")
# Lightning's loggers of start-up information
_LIGHTNING_INFO = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
# device= → the trainer config group that runs there
_TRAINERS = {"auto": "auto", "cpu": "cpu", "cuda": "gpu", "gpu": "gpu"}


def as_override(key: str, value: Any) -> str:
    """``key=value`` in Hydra's override grammar, read as the same words on the command line would be: a plain word
    as typed (``32``, ``auto``, ``/data/a.svs``), any other string quoted (spaces, commas, brackets go through as they
    are), lists as ``[a,b]``, None as ``null``, booleans as ``true``/``false``."""

    def literal(item: Any) -> str:
        if item is None:
            return "null"
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, (int, float)):
            return repr(item)
        if isinstance(item, (list, tuple)):
            return "[" + ",".join(literal(v) for v in item) + "]"
        if isinstance(item, Mapping):
            return "{" + ",".join(f"{k}:{literal(v)}" for k, v in item.items()) + "}"
        text = str(item)
        if _PLAIN.fullmatch(text):  # as typed on a command line: ``32`` is the number, ``auto`` the string
            return text
        text = text.replace("\\", "\\\\").replace("'", "\\'")
        return f"'{text}'"

    return f"{key}={literal(value)}"


def _compose(config: str, overrides: list[str]) -> DictConfig:
    """``conf/<config>.yaml`` composed with ``overrides`` (as the command line would); Hydra's own errors (an unknown
    key or group, a bad value) become one UserInputError line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from wsiseg.config import config_dir
    from wsiseg.errors import first_line

    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name=config, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserInputError(first_line(exc)) from None


class Segmenter:
    """A model configured once, run on tiles, slides, patch folders; exported and benchmarked.

    Args:
        model: a model config (``conf/model/``): ``unet_camelyon`` (the users' U-Net, the default), ``unet_milesial``,
            ``demo`` (built-in demo weights), ``onnx`` / ``openvino`` (an exported file: give ``model.net.path`` in
            ``overrides``), ``probe``.
        checkpoint: the weights file (``model.checkpoint``); None keeps the model config's (the demo's own weights;
            required for ``unet_camelyon``).
        device: ``auto`` (a GPU when one is visible, else the CPU), ``cpu`` or ``cuda``.
        precision: the trainer's precision (``16-mixed``, ``bf16-mixed``, ``32``); None: the device's default (as the
            commands: 16-mixed on GPUs, bf16-mixed on CPUs that run bfloat16, else 32).
        batch_size: tiles per batch (``data.batch_size``): None for the device's default, ``auto`` to probe GPU memory.
        num_workers: DataLoader workers (``data.num_workers``); None: the device's default.
        compile: ``model.compile`` (``auto``, True, False); None: the model config's (``auto``).
        runtime: ``model.runtime`` (``auto``, ``torch``, ``openvino``); None: the model config's (``auto``).
        overrides: any other option, by its config key: ``{"data.overlap": 64, "writer.output_downsample": 4}``.

    Raises:
        UserInputError: an unknown key or a bad value (the message is the command's one line), a checkpoint that does
            not load. Checked here, before any slide is read.
    """

    def __init__(
        self,
        model: str = "unet_camelyon",
        checkpoint: str | Path | None = None,
        *,
        device: str = "auto",
        precision: str | None = None,
        batch_size: int | str | None = None,
        num_workers: int | None = None,
        compile: bool | str | None = None,
        runtime: str | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        from wsiseg.cli import quiet_library_noise

        quiet_library_noise()
        for name in _LIGHTNING_INFO:  # "GPU available: ...", "Using bfloat16 AMP": the commands' log, not a notebook's
            logging.getLogger(name).setLevel(logging.WARNING)
        if device not in _TRAINERS:
            raise UserInputError(f"device must be one of {', '.join(_TRAINERS)}; got '{device}'")
        self.model_name, self.device = model, device
        options: dict[str, Any] = {}
        if compile is not None:
            options["model.compile"] = compile
        if runtime is not None:
            options["model.runtime"] = runtime
        if checkpoint is not None:
            options["model.checkpoint"] = str(Path(checkpoint).expanduser())
        if precision is not None:
            options["trainer.precision"] = precision
        if batch_size is not None:
            options["data.batch_size"] = batch_size
        if num_workers is not None:
            options["data.num_workers"] = num_workers
        options.update(overrides or {})
        self.options = options
        self._module: Any = None
        self._trainer: Any = None
        # checked now, as the commands check them before reading anything: the composed config and the module
        self.config("predict")
        self._network()

    # -- configs ---------------------------------------------------------------------------------------------------
    def _overrides(self, config: str, extra: Mapping[str, Any] | None = None) -> list[str]:
        """The override list of ``config`` for this engine plus ``extra``: config groups first (``model=``,
        ``trainer=``, and ``data=``/``writer=`` when given), then keys; the export config has only the model's."""
        options = {**self.options, **(extra or {})}
        groups = {"model": self.model_name}
        if config == "export":
            options = {k: v for k, v in options.items() if k.startswith(("model.", "export."))}
        else:
            groups["trainer"] = _TRAINERS[self.device]
            for group in ("data", "writer"):
                if group in options:
                    groups[group] = str(options.pop(group))
        return [f"{group}={name}" for group, name in groups.items()] + [as_override(k, v) for k, v in options.items()]

    def config(self, name: str = "predict", **extra: Any) -> DictConfig:
        """The composed config ``name`` (``predict``, ``export``, ``bench``) with this engine's options and ``extra``
        (config keys): what the command would run with."""
        return _compose(name, self._overrides(name, extra))

    # -- tiles -------------------------------------------------------------------------------------------------------
    def _network(self) -> tuple[Any, Any]:
        """The module and a trainer for its device and precision, built once (the checkpoint is loaded here)."""
        if self._module is None:
            from wsiseg.config import build, build_trainer

            cfg = self.config("predict")
            module = build(cfg.model)
            trainer = build_trainer(cfg.trainer, logger=False, enable_progress_bar=False)
            device = trainer.strategy.root_device
            module.prepare(device.type, precision=str(trainer.precision))
            self._module, self._trainer = module.to(device).eval(), trainer
        return self._module, self._trainer

    def predict_tiles(self, images: Any) -> np.ndarray:
        """Probability maps of ``images``, computed as the pipeline computes a tile's (normalisation, the network under
        the trainer's precision, activation, channel reduction, ``writer.output_downsample`` pooling).

        Args:
            images: a list of PIL images or (H, W, 3) uint8 arrays (sizes may differ), an (N, H, W, 3) uint8 array, or
                an (N, 3, H, W) uint8 tensor. Sizes that are not multiples of the network's stride are padded with
                white past the bottom/right edge, as patch mode pads, and the maps cropped back.

        Returns:
            float32 array (N, C', H/d, W/d) (``d``: ``writer.output_downsample``), in the order given; images of
            different sizes come back as a list of (1, C', h, w) arrays instead.
        """
        import numpy as np
        import torch

        tiles = _as_uint8_chw(images)
        module, trainer = self._network()
        stride, down = module.stride, module.output_downsample
        batch = self._batch_size(module, trainer, max(t.shape[-1] for t in tiles))
        outputs: list[np.ndarray | None] = [None] * len(tiles)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, tile in enumerate(tiles):
            by_size.setdefault(tuple(tile.shape[-2:]), []).append(i)
        device = trainer.strategy.root_device
        with torch.inference_mode(), trainer.precision_plugin.forward_context():
            for (h, w), indices in by_size.items():
                ph, pw = math.ceil(h / stride) * stride, math.ceil(w / stride) * stride
                for start in range(0, len(indices), batch):
                    part = indices[start : start + batch]
                    stack = torch.full((len(part), 3, ph, pw), 255, dtype=torch.uint8)
                    for row, i in enumerate(part):
                        stack[row, :, :h, :w] = tiles[i]
                    maps = module(stack.to(device)).float().cpu().numpy()
                    for row, i in enumerate(part):
                        outputs[i] = maps[row : row + 1, :, : -(-h // down), : -(-w // down)]
        if len(by_size) == 1:
            return np.concatenate(outputs)  # type: ignore[arg-type]
        return outputs  # type: ignore[return-value]

    def _batch_size(self, module: Any, trainer: Any, patch: int) -> int:
        from wsiseg.pipeline.batch_size import resolve_batch_size

        value = self.options.get("data.batch_size")
        return resolve_batch_size(value, module, patch, trainer.strategy.root_device, trainer)

    # -- runs ----------------------------------------------------------------------------------------------------------
    def predict_slides(
        self, slides: str | Path | Sequence[str | Path], out_dir: str | Path, *, resume: bool = False, **options: Any
    ) -> RunResult:
        """Run ``wsiseg-predict`` on ``slides`` (a slide, a folder of slides, a glob, or a list of them) into
        ``out_dir``: the same outputs (``<slide>/mask.tif``, ``heatmap.png``, ``report.json``, ``summary.csv``,
        ``index.html``), byte for byte, as the command with the same options.

        Args:
            slides: ``data.slides``.
            out_dir: the run folder (``writer.output_dir``).
            resume: keep slides whose outputs are complete for the same config (``resume=true``).
            options: more config keys for this run only, with dots as double underscores
                (``data__overlap=64``), or pass them to the constructor's ``overrides``.

        Returns:
            the run's :class:`~wsiseg.pipeline.result.RunResult`: one row per slide, ``status`` 0 when all completed.
        """
        listed = [str(s) for s in slides] if isinstance(slides, (list, tuple)) else [str(slides)]
        extra = {"data.slides": listed, "writer.output_dir": str(Path(out_dir).expanduser()), "resume": resume}
        return self._run(self.config("predict", **extra, **_dotted(options)))

    def predict_folder(self, in_dir: str | Path, out_dir: str | Path, *, resume: bool = False, **options: Any) -> Any:
        """Run patch-folder mode (``data=patches writer=patches``) on every image under ``in_dir``: a heatmap (and
        with ``writer__mask=True`` a mask) per image under ``out_dir``, mirrored, and ``report.json``."""
        extra = {
            "data": "patches",
            "writer": "patches",
            "data.input_dir": str(Path(in_dir).expanduser()),
            "writer.output_dir": str(Path(out_dir).expanduser()),
            "resume": resume,
        }
        return self._run(self.config("predict", **extra, **_dotted(options)))

    def _run(self, cfg: DictConfig) -> RunResult:
        from wsiseg.pipeline import run

        result = run(cfg)
        result.log_where()
        return result

    def export(self, path: str | Path, format: str = "onnx", quantize: str = "none", **options: Any) -> dict[str, Any]:
        """Export this model (``wsiseg-export``): ``format`` ``onnx`` | ``torchscript`` | ``openvino``, ``quantize``
        ``none`` | ``int8`` (needs ``export__calibration_slides=[...]``); verified against eager float32 PyTorch.
        Returns the sidecar (``<path>.json``) as a dict."""
        from wsiseg.deploy.export import run_export

        extra = {"export.path": str(Path(path).expanduser()), "export.format": format, "export.quantize": quantize}
        return run_export(self.config("export", **extra, **_dotted(options)))

    def bench(self, out_dir: str | Path, **options: Any) -> dict[str, Any]:
        """Run ``wsiseg-bench`` (naive loop vs the pipeline, read/model/host bounds, peers) into ``out_dir``; returns
        the report written to ``bench.json``. Options as config keys (``bench__max_tiles=128``)."""
        from wsiseg.bench.run import run_bench

        out_dir = Path(out_dir).expanduser()
        # the command's writer.output_dir is Hydra's run folder: here it is out_dir (each case writes below it)
        return run_bench(self.config("bench", **{"writer.output_dir": str(out_dir)}, **_dotted(options)), out_dir)


def _dotted(options: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword options with ``__`` for dots (``data__overlap``) as config keys (``data.overlap``)."""
    return {key.replace("__", "."): value for key, value in options.items()}


def _as_uint8_chw(images: Any) -> list[Any]:
    """``images`` as a list of (3, H, W) uint8 CPU tensors.

    Raises:
        UserInputError: not images of 8-bit RGB pixels.
    """
    import numpy as np
    import torch

    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise UserInputError(
                f"predict_tiles: a tensor must be (N, 3, H, W) uint8, got {tuple(images.shape)} {images.dtype}"
            )
        return list(images.cpu())
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        images = [images]
    tiles = []
    for n, image in enumerate(images):
        if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
            array = np.asarray(image.convert("RGB"))
        else:
            array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise UserInputError(
                f"predict_tiles: image {n} must be RGB uint8 (H, W, 3) or a PIL image, got {array.shape} {array.dtype}"
            )
        tiles.append(torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))))
    if not tiles:
        raise UserInputError("predict_tiles: no images given")
    return tiles
