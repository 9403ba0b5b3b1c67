"""Shared plumbing for the Hydra entry points: user errors become one line and a non-zero exit status."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from wsiseg.errors import UserInputError

__all__ = ["user_errors", "find_user_error"]


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
