"""Where the Hydra configs live, and the resolvers they use.

From a checkout (``pip install -e .``) the configs are the top-level ``conf/`` folder; an installed wheel carries the
same files as ``wsiseg/conf``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

__all__ = [
    "config_dir",
    "asset_path",
    "build",
    "build_trainer",
    "cpu_precision",
    "default_workers",
    "register_resolvers",
    "usable_cores",
]


def config_dir() -> Path:
    """Absolute path of the folder holding ``predict.yaml`` and the config groups."""
    packaged = Path(str(resources.files("wsiseg"))) / "conf"
    if (packaged / "predict.yaml").is_file():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "predict.yaml").is_file():
        return checkout
    raise FileNotFoundError(f"wsiseg configs not found in {packaged} or {checkout}: reinstall wsiseg")


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)``, with a UserInputError raised by the target re-raised as itself
    (Hydra wraps constructor errors in ``InstantiationException``), so a bad option stays one line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from wsiseg.errors import UserInputError, exception_chain

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = next((e for e in exception_chain(exc) if isinstance(e, UserInputError)), None)
        if cause is None:
            raise
    # Raised outside the handler: inside it, Python would set ``exc`` as ``cause``'s context while ``cause`` already
    # sits in ``exc``'s chain, a loop that a walk of the chain never leaves.
    raise cause from None


def build_trainer(node: Any, **kwargs: Any) -> Any:
    """The Lightning ``Trainer`` of ``node`` (``cfg.trainer``); an option Lightning refuses while building it (an
    unknown accelerator, precision or device count) becomes one UserInputError line, ``trainer: <Lightning's reason>``.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from wsiseg.errors import UserInputError, first_line

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, (ValueError, TypeError, MisconfigurationException)):
            raise UserInputError(f"trainer: {first_line(cause)}") from None
        raise


def asset_path(name: str) -> str:
    """Absolute path of a file shipped in ``wsiseg/assets`` (the demo checkpoint)."""
    return str(Path(str(resources.files("wsiseg"))) / "assets" / name)


def cpu_precision() -> str:
    """The Lightning precision CPU runs use: ``bf16-mixed`` where oneDNN runs bfloat16 (AVX-512 or Arm BF16 CPUs),
    else ``32-true`` (elsewhere bfloat16 convolutions fall back to slow reference kernels). Spelled as Lightning
    reports ``trainer.precision``, so the config, the report and the trainer agree."""
    import torch

    try:
        bf16 = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    return "bf16-mixed" if bf16 else "32-true"


def _default_precision() -> str:
    # Lightning would turn 16-mixed into bf16-mixed on CPU with a warning; say what each device really runs.
    import torch

    return "16-mixed" if torch.cuda.is_available() else cpu_precision()


def default_workers(device_type: str | None = None, cores: int | None = None) -> int:
    """DataLoader workers when ``data.num_workers`` is not given, for a run on ``device_type`` (``cuda``, ``cpu``;
    None: CUDA when a device is visible) on a machine of ``cores`` cores (None: this one's).

    GPU runs: every core but one, without a cap (the main process feeds the GPU; reading and decoding tiles is what
    holds a GPU run back, so every other core reads). CPU-only runs: a quarter of the cores, at most 8 (the network's
    threads use the cores).
    """
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    cores = cores or os.cpu_count() or 2
    if device_type != "cpu":
        return max(1, cores - 1)
    # On CPU the network's threads use every core: a reader process only competes with them (on 2 cores one worker was
    # slower than reading in the main process). Workers pay off from 4 cores up.
    return min(8, cores // 4)


def usable_cores(limit: int = 8) -> int:
    """This machine's cores, 1 to ``limit``: threads for work the main process spreads over every core (reading a
    batch's tiles, decoding JPEG tiles, encoding TIFF tiles)."""
    return max(1, min(limit, os.cpu_count() or 1))


def _spare_cores() -> int:
    """Cores but one, 1 to 8: patch-writer threads (PNG encoding + heatmap rendering, which overlaps the network on
    any machine)."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def register_resolvers() -> None:
    """Register ``${wsiseg.asset:name}``, ``${wsiseg.precision:}``, ``${wsiseg.cpu_precision:}``,
    ``${wsiseg.workers:}`` and ``${wsiseg.write_workers:}`` (idempotent)."""
    if not OmegaConf.has_resolver("wsiseg.asset"):
        OmegaConf.register_new_resolver("wsiseg.asset", asset_path)
    if not OmegaConf.has_resolver("wsiseg.precision"):
        OmegaConf.register_new_resolver("wsiseg.precision", _default_precision)
    if not OmegaConf.has_resolver("wsiseg.cpu_precision"):
        OmegaConf.register_new_resolver("wsiseg.cpu_precision", cpu_precision)
    if not OmegaConf.has_resolver("wsiseg.workers"):
        OmegaConf.register_new_resolver("wsiseg.workers", default_workers)
    if not OmegaConf.has_resolver("wsiseg.write_workers"):
        OmegaConf.register_new_resolver("wsiseg.write_workers", _spare_cores)


register_resolvers()
