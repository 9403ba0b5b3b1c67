"""Checks on a composed command config that must fail before anything is built, read or written.

Each check raises :class:`~wsiseg.errors.UserInputError` with one line that names the option and what to pass instead;
the entry points turn it into ``<command>: error: ...`` and exit status 2.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from wsiseg.errors import UserInputError

__all__ = ["REQUIRED_HINTS", "check_required", "check_trainer_device", "check_option_types", "check_bool"]

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
    if accelerator not in ("gpu", "cuda"):
        return
    import torch  # here: the other option checks (--help, wsiseg-eval) need no deep-learning library

    if not torch.cuda.is_available():
        raise UserInputError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible to PyTorch "
            "(torch.cuda.is_available() is False): use trainer=cpu, trainer=auto or trainer=ddp_cpu"
        )


_HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


def check_bool(cfg: DictConfig, key: str) -> None:
    """A top-level switch such as ``resume`` is true or false, not any truthy value.

    Raises:
        UserInputError: ``<key> must be true or false, got ...``.
    """
    value = OmegaConf.select(cfg, key, default=False)
    if not isinstance(value, bool):
        raise UserInputError(f"{key} must be true or false, got {value!r}")


def check_option_types(cfg: DictConfig, sections: Sequence[str]) -> None:
    """Every key of each ``_target_`` section in ``sections`` has a value of the type its target's signature declares
    (``int``, ``float``, ``bool``, ``str``, paths, lists, ``Literal`` choices, None where Optional, nested dataclasses
    such as ``data.tissue``), checked before anything is built. Parameters typed with other classes (objects the entry
    point passes) and targets whose hints cannot be resolved are left to the target's own checks.

    Raises:
        UserInputError: ``<section>.<key> must be <type>, got <value>`` for the first key that does not fit.
    """
    for section in sections:
        node = OmegaConf.select(cfg, section, default=None)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        hints = _signature_hints(str(node._target_))
        for key in node:
            if key in _HYDRA_KEYS or key not in hints:
                continue
            try:
                value = node[key]
                value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            except Exception:  # an interpolation only the running app resolves (e.g. ${hydra:...}), or ???
                continue
            if isinstance(value, dict) and "_target_" in value:
                continue  # a nested part (model.net): checked as its own section
            _check_value(f"{section}.{key}", value, hints[key])


def _signature_hints(target: str) -> dict[str, Any]:
    """Parameter hints of ``target`` (a class's ``__init__`` or a function), plus those of the function a class
    forwards its ``**options`` to (its ``options_signature`` attribute, e.g. the slide writer's)."""
    try:
        obj = get_object(target)
        function = obj.__init__ if inspect.isclass(obj) else obj
        hints = typing.get_type_hints(function)
        forwarded = getattr(obj, "options_signature", None)
        return {**typing.get_type_hints(forwarded), **hints} if forwarded else hints
    except Exception:  # an unresolvable hint: the target checks its own arguments
        return {}


def _check_value(key: str, value: Any, hint: Any) -> None:
    if not _fits(value, hint):
        raise UserInputError(f"{key} must be {_describe(hint)}, got {value!r}")
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        fields = typing.get_type_hints(hint)
        for name, item in value.items():
            if name not in fields:
                raise UserInputError(f"{key}.{name} is not an option: choose from {', '.join(fields)}")
            _check_value(f"{key}.{name}", item, fields[name])
    for member in _union_members(hint):
        if dataclasses.is_dataclass(member) and isinstance(value, Mapping):
            _check_value(key, value, member)
            return


def _union_members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return ()


def _fits(value: Any, hint: Any) -> bool:
    """Whether a config value (plain Python after ``to_container``) fits ``hint``; unknown hints fit anything."""
    if hint is Any or hint is object:
        return True
    members = _union_members(hint)
    if members:
        return any(_fits(value, member) for member in members)
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Path):
        return isinstance(value, str)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, Mapping)
    container = origin or hint
    if inspect.isclass(container) and issubclass(container, Mapping):
        return isinstance(value, Mapping)
    if inspect.isclass(container) and issubclass(container, Sequence) and not issubclass(container, str):
        items = typing.get_args(hint)
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        item_hint = items[0] if items and (len(items) == 1 or items[-1] is Ellipsis) else Any
        return all(_fits(item, item_hint) for item in value)
    return True  # another class (an object the entry point passes), a Callable...


_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers")}
_NAMES |= {str: ("a string", "strings"), Path: ("a path", "paths")}


def _describe(hint: Any, plural: bool = False) -> str:
    members = _union_members(hint)
    if members:
        choices = [a for m in members if typing.get_origin(m) is typing.Literal for a in typing.get_args(m)]
        named = [
            _describe(m, plural) for m in members if m is not type(None) and typing.get_origin(m) is not typing.Literal
        ]
        if choices:
            named.append(", ".join(str(c) for c in dict.fromkeys(choices)))
        return " or ".join(dict.fromkeys(named)) + (" (or null)" if type(None) in members else "")
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(hint))
    if hint in _NAMES:
        return _NAMES[hint][plural]
    if dataclasses.is_dataclass(hint):
        return "a mapping of options"
    container = typing.get_origin(hint) or hint
    if inspect.isclass(container) and issubclass(container, Sequence):
        items = typing.get_args(hint)
        return f"a list of {_describe(items[0], plural=True)}" if items else "a list"
    return getattr(hint, "__name__", str(hint))
