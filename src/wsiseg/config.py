"""Where the Hydra configs live, and the resolvers they use.

From a checkout (``pip install -e .``) the configs are the top-level ``conf/`` folder; an installed wheel carries the
same files as ``wsiseg/conf``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch
from omegaconf import OmegaConf

__all__ = ["config_dir", "asset_path", "register_resolvers"]


def config_dir() -> Path:
    """Absolute path of the folder holding ``predict.yaml`` and the config groups."""
    packaged = Path(str(resources.files("wsiseg"))) / "conf"
    if (packaged / "predict.yaml").is_file():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "predict.yaml").is_file():
        return checkout
    raise FileNotFoundError(f"wsiseg configs not found in {packaged} or {checkout}: reinstall wsiseg")


def asset_path(name: str) -> str:
    """Absolute path of a file shipped in ``wsiseg/assets`` (the demo checkpoint)."""
    return str(Path(str(resources.files("wsiseg"))) / "assets" / name)


def _default_precision() -> str:
    # Lightning would turn 16-mixed into bf16-mixed on CPU with a warning; say what each device really runs.
    return "16-mixed" if torch.cuda.is_available() else "bf16-mixed"


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def register_resolvers() -> None:
    """Register ``${wsiseg.asset:name}``, ``${wsiseg.precision:}`` and ``${wsiseg.workers:}`` (idempotent)."""
    if not OmegaConf.has_resolver("wsiseg.asset"):
        OmegaConf.register_new_resolver("wsiseg.asset", asset_path)
    if not OmegaConf.has_resolver("wsiseg.precision"):
        OmegaConf.register_new_resolver("wsiseg.precision", _default_precision)
    if not OmegaConf.has_resolver("wsiseg.workers"):
        OmegaConf.register_new_resolver("wsiseg.workers", _default_workers)


register_resolvers()
