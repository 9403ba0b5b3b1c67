"""Hydra plumbing: where the configs live, building their nodes, and the resolvers they use (the machine facts the
resolvers read are :mod:`wsiseg.hardware`'s).

From a checkout (``pip install -e .``) the configs are the top-level ``conf/`` folder; an installed wheel carries the
same files as ``wsiseg/conf``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from wsiseg.hardware import cpu_precision, default_precision, default_workers, spare_cores

__all__ = [
    "config_dir",
    "asset_path",
    "build",
    "build_trainer",
    "register_resolvers",
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


def register_resolvers() -> None:
    """Register ``${wsiseg.asset:name}``, ``${wsiseg.precision:}``, ``${wsiseg.cpu_precision:}``,
    ``${wsiseg.workers:}`` and ``${wsiseg.write_workers:}`` (idempotent)."""
    if not OmegaConf.has_resolver("wsiseg.asset"):
        OmegaConf.register_new_resolver("wsiseg.asset", asset_path)
    if not OmegaConf.has_resolver("wsiseg.precision"):
        OmegaConf.register_new_resolver("wsiseg.precision", default_precision)
    if not OmegaConf.has_resolver("wsiseg.cpu_precision"):
        OmegaConf.register_new_resolver("wsiseg.cpu_precision", cpu_precision)
    if not OmegaConf.has_resolver("wsiseg.workers"):
        OmegaConf.register_new_resolver("wsiseg.workers", default_workers)
    if not OmegaConf.has_resolver("wsiseg.write_workers"):
        OmegaConf.register_new_resolver("wsiseg.write_workers", spare_cores)


register_resolvers()
