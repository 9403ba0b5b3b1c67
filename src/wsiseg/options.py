"""Checks on a composed command config that must fail before anything is built, read or written.

Each check raises :class:`~wsiseg.errors.UserInputError` with one line that names the option and what to pass instead;
the entry points turn it into ``<command>: error: ...`` and exit status 2.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from wsiseg.errors import UserInputError

__all__ = ["REQUIRED_HINTS", "check_required", "check_trainer_device"]

# What to pass for each required (``???``) key the configs declare.
REQUIRED_HINTS: dict[str, str] = {
    "data.slides": "data.slides=/path/to/slide.svs (a path, a quoted glob such as 'data.slides=/data/*.svs', "
    "or a list 'data.slides=[a.svs,b.tif]')",
    "data.input_dir": "data.input_dir=/path/to/patches",
    "model.checkpoint": "model.checkpoint=/path/to/weights.pth (model=demo runs the built-in demo network; "
    "model.checkpoint=random runs untrained weights, for benchmarks only)",
    "model.net.path": "model.net.path=/path/to/unet.onnx (written by wsiseg-export; with model=onnx)",
    "export.path": "export.path=unet.onnx",
}


def check_required(cfg: DictConfig) -> None:
    """Every ``???`` key of ``cfg`` (outside ``hydra``) has a value.

    Raises:
        UserInputError: ``<key> is required: pass <key>=...`` for each missing key, on one line.
    """
    missing = sorted(key for key in OmegaConf.missing_keys(cfg) if not key.startswith("hydra."))
    if not missing:
        return
    hints = [REQUIRED_HINTS.get(key, f"{key}=...") for key in missing]
    if len(missing) == 1:
        raise UserInputError(f"{missing[0]} is required: pass {hints[0]}")
    raise UserInputError(f"required options missing: {', '.join(missing)}; pass {' and '.join(hints)}")


def check_trainer_device(cfg: DictConfig) -> None:
    """A GPU trainer (``trainer=gpu``/``ddp``, ``trainer.accelerator=gpu|cuda``) has a CUDA device to run on.

    Raises:
        UserInputError: no CUDA device is visible; says which trainer configs run on the CPU instead.
    """
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto")).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserInputError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible to PyTorch "
            "(torch.cuda.is_available() is False): use trainer=cpu, trainer=auto or trainer=ddp_cpu"
        )
