"""Exceptions that reach the user as one line (no traceback unless ``HYDRA_FULL_ERROR=1``)."""

from __future__ import annotations

from collections.abc import Iterator


class UserInputError(ValueError):
    """Bad input the user can fix: a path, an option, a checkpoint. The message names it and says what to do."""


class SlideReadError(RuntimeError):
    """A slide could not be read mid-run (corrupt tile); fails that slide only."""


class NoProcessableSlideError(UserInputError):
    """Every slide of ``data.slides`` failed to open or plan; ``failed`` holds ``(path, reason)`` for each."""

    def __init__(self, message: str, failed: list[tuple[object, str]]) -> None:
        super().__init__(message)
        self.failed = failed


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions behind it (``__cause__``, else ``__context__``), outermost first: Hydra and Lightning
    wrap the error a user can act on."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
