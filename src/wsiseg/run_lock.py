"""One run per output folder: an exclusive lock on ``<output dir>/.wsiseg.lock`` held for the run's lifetime.

Two runs writing one folder would delete each other's spilled stores and overwrite each other's outputs; the second
one is refused with one line naming the process that holds the folder.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wsiseg.errors import UserInputError

__all__ = ["LOCK_NAME", "busy_message", "run_folder_lock", "is_secondary_rank"]

LOCK_NAME = ".wsiseg.lock"


def is_secondary_rank() -> bool:
    """True in a DDP process other than global rank 0 (launched by Lightning, torchrun or SLURM): rank 0 holds the
    lock for the whole run."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        value = os.environ.get(key)
        if value not in (None, "", "0"):
            return True
    return False


def busy_message(folder: Path) -> str | None:
    """The refusal :func:`run_folder_lock` would give ``folder`` now (another process holds its lock), else None.
    Nothing is created: a run folder that does not exist yet is free."""
    path = folder / LOCK_NAME
    if not path.is_file():
        return None
    try:
        with open(path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _in_use(folder, handle.read().strip() or "unknown")
    except OSError:
        return None
    return None


def _in_use(folder: Path, holder: str) -> str:
    return (
        f"writer.output_dir '{folder}' is in use by another wsiseg run (PID {holder}): wait for it to finish or "
        "choose another hydra.run.dir"
    )


@contextmanager
def run_folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs (a no-op on secondary DDP ranks); the lock file is removed after.

    Raises:
        UserInputError: another process holds the folder (the message names its PID and what to do).
    """
    if is_secondary_rank():
        yield
        return
    from wsiseg.writers.run_record import check_writable  # the writers' stack: not for a command's --help

    check_writable(folder)  # creates it, or says in one line why it cannot be written
    path = folder / LOCK_NAME
    handle = open(path, "a+")  # noqa: SIM115 - held open for the run's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UserInputError(_in_use(folder, holder)) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()
