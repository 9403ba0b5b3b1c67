"""Exceptions that reach the user as one line (no traceback unless ``HYDRA_FULL_ERROR=1``)."""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input the user can fix: a path, an option, a checkpoint. The message names it and says what to do."""


class SlideReadError(RuntimeError):
    """A slide could not be read mid-run (corrupt tile); fails that slide only."""


class NoProcessableSlideError(UserInputError):
    """Every slide of ``data.slides`` failed to open or plan; ``failed`` holds ``(path, reason)`` for each."""

    def __init__(self, message: str, failed: list[tuple[object, str]]) -> None:
        super().__init__(message)
        self.failed = failed
