"""Exceptions that reach the user as one line (no traceback unless ``HYDRA_FULL_ERROR=1``)."""

from __future__ import annotations

import errno
from collections.abc import Iterator


class UserInputError(ValueError):
    """Bad input the user can fix: a path, an option, a checkpoint. The message names it and says what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, Kubernetes, systemd, SLURM time limits), raised where Ctrl-C raises
    KeyboardInterrupt, so the run stops as gracefully and its records can say which it was."""


def interruption(exc: BaseException) -> str:
    """How a run was stopped, for its records: ``SIGTERM``, ``Ctrl-C`` or the exception's type."""
    if isinstance(exc, Terminated):
        return "SIGTERM"
    return "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__


class SlideReadError(RuntimeError):
    """A slide could not be read mid-run (corrupt tile); fails that slide only."""


class NoProcessableSlideError(UserInputError):
    """Every slide of ``data.slides`` failed to open or plan; ``failed`` holds ``(path, reason)`` for each."""

    def __init__(self, message: str, failed: list[tuple[object, str]]) -> None:
        super().__init__(message)
        self.failed = failed


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions behind it (``__cause__``, else ``__context__``), outermost first: Hydra and Lightning
    wrap the error a user can act on. Each exception comes once: a chain that loops (an exception re-raised inside
    the handler of one that wraps it) ends where it would repeat."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def full_disk(exc: BaseException) -> OSError | None:
    """The "no space left" (or disk quota) error behind ``exc``, if any: a run that fills its disk stops with one
    line that says so, not a traceback."""
    for seen in exception_chain(exc):
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return seen
    return None
