"""Shared plumbing for the Hydra entry points: user errors become one line and a non-zero exit status."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from wsiseg.errors import UserInputError

__all__ = ["user_errors", "find_user_error", "quiet_library_noise"]


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def quiet_library_noise() -> None:
    """Silence messages that say nothing about the user's run: Lightning's advertising tip and a deprecation
    warning Lightning itself triggers in torch's pytree module."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())


def find_user_error(exc: BaseException) -> UserInputError | None:
    """The UserInputError behind ``exc`` (Hydra wraps constructor errors in InstantiationException), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, UserInputError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def user_errors(command: str) -> Iterator[None]:
    """Print user errors as ``<command>: error: <message>`` and exit with status 2.

    ``HYDRA_FULL_ERROR=1`` or ``WSISEG_DEBUG=1`` re-raises with the full traceback instead.
    """
    quiet_library_noise()
    try:
        yield
    except KeyboardInterrupt:
        print(f"{command}: interrupted; completed slides are kept, re-run with resume=true to finish", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is None or os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("WSISEG_DEBUG") == "1":
            raise
        print(f"{command}: error: {user_error}", file=sys.stderr)
        sys.exit(2)
