"""Shared plumbing for the Hydra entry points: user errors become one line and exit status 2, an interrupt says how to
finish the run, ``--version`` names wsiseg, and log lines do not tear the progress bar."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wsiseg.errors import Terminated, UserInputError, exception_chain, first_line, full_disk

__all__ = [
    "user_errors",
    "find_user_error",
    "quiet_library_noise",
    "exit_if_overrides_bad",
    "exit_if_run_dir_unusable",
    "exit_if_version_asked",
    "before_hydra",
    "discard_unused_run_dir",
    "ProgressBarSafeHandler",
]

# Exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


class ProgressBarSafeHandler(logging.StreamHandler):
    """A console handler that prints through ``tqdm.write``: a log line lands above the progress bar instead of being
    glued onto it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def _route_console_logs_around_progress_bar() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        stream = getattr(handler, "stream", None)
        if hasattr(stream, "reconfigure"):
            # a file name that is not UTF-8 (kept by Python as lone surrogates) is logged as \xNN, not as a traceback
            stream.reconfigure(errors="backslashreplace")
        if type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr):
            safe = ProgressBarSafeHandler(handler.stream)
            safe.setLevel(handler.level)
            safe.setFormatter(handler.formatter)
            for log_filter in handler.filters:
                safe.addFilter(log_filter)
            root.removeHandler(handler)
            root.addHandler(safe)


def quiet_library_noise() -> None:
    """Silence messages that say nothing about the user's run (Lightning's advertising tip, a deprecation warning
    Lightning itself triggers in torch's pytree module) and keep log lines off the progress bar's line."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())
    _route_console_logs_around_progress_bar()


def exit_if_run_dir_unusable(command: str) -> None:
    """Hydra creates the run folder (``hydra.run.dir=...``; by default under ``outputs/`` in the working folder)
    before any wsiseg code runs, and a folder it cannot create ends in its traceback. Check first: one line and exit
    status 2 when the folder cannot be created, or when another run holds it (Hydra would rewrite that run's
    ``.hydra/config.yaml`` before wsiseg sees the lock). Nothing is created here."""
    import tempfile

    given = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    target = Path(given[-1]).expanduser() if given else Path.cwd() / "outputs"
    if "${" in str(target):
        target = Path(str(target).split("${", 1)[0] or ".")
    ancestor = target.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    key = "hydra.run.dir" if given else "the working folder"
    from wsiseg.run_lock import busy_message

    busy = busy_message(target.absolute()) if given else None
    if busy:  # refused before Hydra writes its .hydra/ files into the folder of the run that holds it
        print(f"{command}: error: {busy}", file=sys.stderr)
        sys.exit(2)
    try:
        if not ancestor.is_dir():
            raise NotADirectoryError(f"'{ancestor}' is a file")
        probe = Path(tempfile.mkdtemp(prefix=".wsiseg-probe-", dir=ancestor))
        try:  # Hydra writes its .hydra/ files (tens of KiB) before any wsiseg code: room for them is checked too
            (probe / "room").write_bytes(bytes(64 << 10))
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    except OSError as exc:
        print(
            f"{command}: error: {key} '{target}' cannot be created ({exc.strerror or exc}): choose a writable "
            "folder with hydra.run.dir=/path/to/run",
            file=sys.stderr,
        )
        sys.exit(2)


def _config_keys(cfg: object, prefix: str = "") -> list[str]:
    """Every key path of a composed config (``data.tissue.enabled``), for "did you mean"."""
    from omegaconf import OmegaConf

    keys: list[str] = []
    for key in cfg:  # type: ignore[attr-defined]
        path = f"{prefix}{key}"
        keys.append(path)
        try:
            value = cfg[key]  # type: ignore[index]
        except Exception:  # ??? or an interpolation only the app resolves
            continue
        if OmegaConf.is_dict(value):
            keys.extend(_config_keys(value, f"{path}."))
    return keys


def _did_you_mean(key: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


# Keys that take options nobody lists in the configs: Lightning's Trainer arguments (``+trainer.fast_dev_run=2``).
_OPEN_SECTIONS = ("trainer.",)


def override_error(config_name: str, overrides: list[str]) -> str | None:
    """Why Hydra would refuse ``overrides`` of ``conf/<config_name>.yaml`` (or why wsiseg does: a ``+key`` that adds an
    option no part reads), as one line with "did you mean" where a real key is close; None when they compose."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from wsiseg.config import config_dir

    group_names = {d.name for d in config_dir().iterdir() if d.is_dir()}
    groups = [  # model=demo, model/net=unet, a search path of the user's: the keys they bring
        o
        for o in overrides
        if o.split("=", 1)[0].lstrip("+~").split("/")[0] in group_names or o.startswith("hydra.searchpath=")
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        try:
            compose(config_name=config_name, overrides=overrides)
        except (HydraException, OmegaConfBaseException) as exc:
            text = str(exc).strip()
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            message = lines[0] if lines else type(exc).__name__
            found = re.match(r"Could not override '([^']+)'", message)
            if found:
                known = _config_keys(compose(config_name=config_name, overrides=groups))
                return f"unknown option '{found.group(1)}'{_did_you_mean(found.group(1), known)}"
            missing = re.search(r"Could not find '([^']+)'", message)
            if missing:
                options = []
                for line in lines[1:]:
                    if line.startswith("Config search path"):
                        break
                    if not line.startswith("Available options"):
                        options.append(line)
                return f"{message.split(':', 1)[-1].strip()}; available: {', '.join(options)}"
            if message.startswith("Ambiguous value"):
                return (
                    f"{message}: a list is written in brackets (data.slides='[a.svs,b.svs]'), a comma in a value quoted"
                )
            override = getattr(exc, "override", None)
            if override is not None:  # the parser's message alone does not say which override it could not read
                return (
                    f"cannot parse the override '{override}': {message}; quote a value holding spaces or brackets "
                    "(data.slides='\"/my slides/a.svs\"')"
                )
            return message
        added = [o[1:].split("=", 1)[0] for o in overrides if o.startswith("+") and not o.startswith("++")]
        added = [key for key in added if not key.startswith(_OPEN_SECTIONS)]
        if added:
            known = _config_keys(compose(config_name=config_name, overrides=groups))
            key = added[0]
            return f"unknown option '+{key}': no part of wsiseg reads it{_did_you_mean(key, known)}"
    return None


def exit_if_overrides_bad(command: str, config_name: str) -> None:
    """Compose the command line's overrides before Hydra does: an unknown key or group, a value Hydra cannot parse or
    an added ``+key`` no part reads is one line, exit status 2, and no run folder (Hydra would print several lines and
    exit 1, the status of a failed slide, after creating the folder). Sweeps (``--multirun``) are left to Hydra."""
    argv = sys.argv[1:]
    if any(a in ("-m", "--multirun") or a.startswith(("--help", "-h", "--hydra-help", "--info")) for a in argv):
        return
    overrides = [  # hydra.searchpath brings config groups of the user's own (a model/net of theirs): composed too
        a
        for a in argv
        if not a.startswith("-") and (not a.lstrip("+~").startswith("hydra.") or a.startswith("hydra.searchpath="))
    ]
    try:
        problem = override_error(config_name, overrides)
    except Exception as exc:  # composing needs what Hydra needs anyway: let Hydra report it
        logging.getLogger(__name__).debug("override pre-check skipped: %s", exc)
        return
    if problem:
        print(f"{command}: error: {problem}", file=sys.stderr)
        sys.exit(2)


def before_hydra(command: str, config_name: str) -> None:
    """What every Hydra command does before Hydra starts, each answered in one line: ``--version`` (exit 0), a run
    folder that cannot be created or is busy, and options no part of wsiseg reads (exit 2)."""
    exit_if_version_asked(command)
    exit_if_run_dir_unusable(command)
    exit_if_overrides_bad(command, config_name)


def exit_if_version_asked(command: str) -> None:
    """``<command> --version`` prints wsiseg's version and those of the libraries it runs on, then exits 0 (Hydra's
    own ``--version`` would print Hydra's)."""
    if "--version" not in sys.argv[1:]:
        return
    from importlib.metadata import PackageNotFoundError, version

    from wsiseg._version import __version__

    parts = [f"torch {_torch_version()}"]  # with its build tag (+cpu, +cu130): which wheel is installed
    for package in ("lightning", "hydra-core", "openslide-python"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package} missing")
    print(f"{command} (wsiseg) {__version__}; {', '.join(parts)}")
    sys.exit(0)


def _torch_version() -> str:
    """torch's ``__version__`` with its build tag, read from its ``version.py`` without importing torch (seconds);
    the package metadata's version (no build tag) when that file cannot be read."""
    import importlib.util
    import re
    from importlib.metadata import PackageNotFoundError, version

    try:
        spec = importlib.util.find_spec("torch")
        text = (Path(spec.origin).parent / "version.py").read_text() if spec and spec.origin else ""
    except (ImportError, OSError):
        text = ""
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    if found:
        return found.group(1)
    try:
        return version("torch")
    except PackageNotFoundError:
        return "missing"


def find_user_error(exc: BaseException) -> UserInputError | None:
    """The UserInputError behind ``exc`` (Hydra wraps constructor errors in InstantiationException), if any.

    Lightning's ``MisconfigurationException`` (a trainer option this machine cannot honour, e.g. more devices than it
    has) counts as one too: its first line is kept, prefixed with ``trainer:``.
    """
    from hydra.errors import InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    for seen in exception_chain(exc):
        if isinstance(seen, UserInputError):
            return seen
        if isinstance(seen, MisconfigurationException):
            return UserInputError(f"trainer: {first_line(seen)}")
        if isinstance(seen, InstantiationException):
            wrong = _wrong_target_arguments(seen)
            if wrong is not None:
                return wrong
    return None


def _wrong_target_arguments(exc: BaseException) -> UserInputError | None:
    """A ``_target_`` called with arguments it does not take (Hydra's InstantiationException over a TypeError): one
    line naming the config key, the target, its complaint and the arguments it accepts; None for other errors."""
    import inspect
    import re

    from hydra.utils import get_object

    text = str(exc)
    target = re.search(r"Error in call to target '([^']+)'", text)
    key = re.search(r"full_key: (\S+)", text)
    cause = next((e for e in exception_chain(exc) if isinstance(e, TypeError)), None)
    if target is None or cause is None or "argument" not in str(cause):
        return None
    where = key.group(1) if key else "the config"
    try:
        accepted = [
            name
            for name, parameter in inspect.signature(get_object(target.group(1))).parameters.items()
            if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) and name != "self"
        ]
        accepts = f"it accepts {', '.join(accepted) or 'no arguments'}"
    except (ValueError, TypeError, ImportError, AttributeError):
        accepts = "see its signature"
    return UserInputError(
        f"{where}._target_={target.group(1)}: {first_line(cause)}; {accepts}: set the options under {where} to "
        "those, or choose another _target_"
    )


def discard_unused_run_dir(run_dir: Path) -> None:
    """Remove ``run_dir`` when it holds nothing but what Hydra put there on start-up (``.hydra/`` and the job's
    ``.log``): a run refused before it wrote anything leaves no folder behind. Parent folders left empty by that (the
    default ``outputs/<date>/<time>`` layout) go too, up to the current directory."""
    if not run_dir.is_dir():
        return
    entries = list(run_dir.iterdir())
    # Another run's lock file (wsiseg.run_lock) is not Hydra's start-up litter: that folder is in use and stays.
    if any(not (e.name == ".hydra" or (e.is_file() and e.suffix == ".log")) for e in entries):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd = Path.cwd().resolve()
    parent = run_dir.resolve().parent
    while parent != cwd and cwd in parent.parents and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def _close_file_logs_in(folder: Path) -> None:
    """Close and detach the root logger's file handlers that write under ``folder`` (Hydra's ``<job>.log``), so the
    folder can go and a caller that goes on in this process (the Python API, tests) logs nowhere missing."""
    root, where = logging.getLogger(), folder.resolve()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and where in Path(handler.baseFilename).resolve().parents:
            root.removeHandler(handler)
            handler.close()


def _dead_worker(exc: BaseException) -> str | None:
    """PyTorch's message when a DataLoader worker process died (killed by a signal, e.g. the kernel's OOM killer)."""
    for seen in exception_chain(exc):
        if isinstance(seen, RuntimeError) and "DataLoader worker" in first_line(seen):
            return first_line(seen).rstrip(". ")
    return None


@contextmanager
def user_errors(command: str, run_dir: Path | None = None) -> Iterator[None]:
    """Print user errors as ``<command>: error: <message>`` and exit with status 2; on Ctrl-C (exit 130) or SIGTERM
    (exit 143, handled like Ctrl-C: Lightning's graceful shutdown, finished slides kept) say how to finish the run.
    ``run_dir`` (Hydra's run folder) is removed after a user error when nothing was written into it.

    ``HYDRA_FULL_ERROR=1`` or ``WSISEG_DEBUG=1`` re-raises with the full traceback instead.
    """
    quiet_library_noise()
    terminated: list[int] = []

    def stop(signum: int, frame: object) -> None:
        # SIGTERM (docker stop, Kubernetes, systemd, SLURM time limits) stops the run as cleanly as Ctrl-C
        terminated.append(signum)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    except KeyboardInterrupt:
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        print(
            f"{command}: {how}; completed slides are kept, re-run the same command with resume=true to finish",
            file=sys.stderr,
        )
        sys.exit(128 + signal.SIGTERM if terminated else INTERRUPTED)
    except Exception as exc:
        user_error = find_user_error(exc)
        debug = os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("WSISEG_DEBUG") == "1"
        worker = _dead_worker(exc)
        full = full_disk(exc)
        if full is not None and not debug:
            where = f" ('{full.filename}')" if full.filename else ""
            print(
                f"{command}: error: no space left on the device of the output{where}: free space or choose another "
                "writer.output_dir; completed slides are kept, re-run with resume=true to finish",
                file=sys.stderr,
            )
            sys.exit(1)
        if worker and not debug:
            print(
                f"{command}: error: {worker}: usually the machine ran out of memory (fewer data.num_workers or a "
                "smaller data.batch_size need less); completed slides are kept, re-run with resume=true to finish",
                file=sys.stderr,
            )
            sys.exit(1)
        if user_error is None or debug:
            raise
        if run_dir is not None:
            _close_file_logs_in(run_dir)  # Hydra's log file goes with its folder: nothing may write to it after
            discard_unused_run_dir(run_dir)
        print(f"{command}: error: {user_error}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
