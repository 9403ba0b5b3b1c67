"""The one path-safety rule of a run: every output name is a plain folder name, and nothing outside the run folder is
ever written or removed.

A slide's output folder is ``<run folder>/<name>`` where ``name`` comes from the slide's file name, which the user does
not choose with us in mind: ``...svs`` has the stem ``..``, ``..svs`` the stem ``.``, ``summary.json.svs`` the name of a
run file. :func:`safe_output_name` turns any file stem into a name that is a new, plain child of the run folder, and
:func:`inside` is checked before every removal (resolving symbolic links), so a bug elsewhere cannot reach out of it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

__all__ = [
    "MAX_NAME_BYTES",
    "RESERVED_NAMES",
    "UnsafePathError",
    "display_name",
    "inside",
    "remove_inside",
    "safe_output_name",
]

# Files and folders the run writes (or Hydra writes) directly in the run folder: no slide may take their names.
RESERVED_NAMES = frozenset(
    {"summary.json", "summary.csv", "index.html", "report.json", "bench.json", "eval.json", "multirun.yaml"}
)
# Room under the usual 255-byte file-name limit for a "-N" de-duplication suffix and the writers' temporary names.
MAX_NAME_BYTES = 200

_SEPARATORS = re.compile(r"[/\\\x00-\x1f]")


class UnsafePathError(RuntimeError):
    """A path a run was about to write or remove lies outside the folder it belongs to (a bug: nothing was touched)."""


def display_name(text: str) -> str:
    """``text`` printable and UTF-8-encodable: bytes that were not UTF-8 in a file name (Python keeps them as lone
    surrogates) become ``\\xNN`` escapes, so logs, JSON and HTML can carry the name."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def safe_output_name(stem: str) -> str:
    """A folder name for the outputs of a file whose name without extension is ``stem``: never empty, ``.``, ``..``,
    hidden (leading dots are dropped, so it cannot collide with the run's own dot-folders), a run file's name
    (:data:`RESERVED_NAMES`, or a ``.log`` file: ``-slide`` is appended), nor holding a path separator or a control
    character (replaced with ``_``); bytes that were not UTF-8 are written as ``\\xNN`` (:func:`display_name`) with the
    backslash replaced; at most :data:`MAX_NAME_BYTES` bytes of UTF-8. A plain name comes back unchanged.
    """
    name = _SEPARATORS.sub("_", display_name(stem)).strip()
    name = name.lstrip(".").strip()
    if not name:
        name = "slide"
    if name.lower() in RESERVED_NAMES or name.lower().endswith(".log"):
        name = f"{name}-slide"
    encoded = name.encode("utf-8")
    if len(encoded) > MAX_NAME_BYTES:
        name = encoded[:MAX_NAME_BYTES].decode("utf-8", "ignore")
    return name


def inside(root: Path, path: Path) -> Path:
    """``path`` resolved (symbolic links followed), after checking it lies strictly inside ``root`` (also resolved).

    Raises:
        UnsafePathError: ``path`` is ``root`` itself or lies outside it.
    """
    resolved_root, resolved = Path(root).resolve(), Path(path).resolve()
    if resolved_root not in resolved.parents:
        raise UnsafePathError(f"refusing to touch '{path}': it is not inside '{root}'")
    return resolved


def remove_inside(root: Path, path: Path) -> None:
    """Remove the file, link or folder ``path`` if it exists, after checking it lies inside ``root``. A symbolic link is
    removed itself (what it points to is never followed); a folder is removed with what it holds.

    Raises:
        UnsafePathError: ``path`` (or the folder holding a link) lies outside ``root``.
    """
    path = Path(path)
    if path.is_symlink():
        folder, resolved_root = path.parent.resolve(), Path(root).resolve()
        if folder != resolved_root:
            inside(root, folder)
        path.unlink(missing_ok=True)
        return
    if not os.path.lexists(path):
        return
    inside(root, path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
