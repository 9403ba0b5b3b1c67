"""Helpers shared by tests: run the predict pipeline in-process through Hydra, compare masks."""

from __future__ import annotations

import io
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from wsiseg.config import config_dir

FAST = ["trainer=cpu", "trainer.precision=32", "trainer.enable_progress_bar=false", "data.num_workers=0"]


def compose_predict(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="predict", overrides=overrides)


def predict(slides: list[Path] | Path, out_dir: Path, overrides: list[str]) -> int:
    """Run ``wsiseg.predict.run_predict`` with ``overrides`` (after the fast CPU defaults); returns its status."""
    from wsiseg.predict import run_predict

    slides = [slides] if isinstance(slides, Path) else slides
    listed = ",".join(str(s) for s in slides)
    cfg = compose_predict([*FAST, f"data.slides=[{listed}]", f"writer.output_dir={out_dir}", *overrides])
    return run_predict(cfg)


def block_mean(image: np.ndarray, factor: int, pad_value: float = 255.0) -> np.ndarray:
    """Mean over ``factor × factor`` blocks of an (H, W) array, padding the bottom/right with ``pad_value``."""
    if factor == 1:
        return image.astype(np.float64)
    h, w = image.shape
    hp, wp = math.ceil(h / factor) * factor, math.ceil(w / factor) * factor
    padded = np.full((hp, wp), pad_value, np.float64)
    padded[:h, :w] = image
    return padded.reshape(hp // factor, factor, wp // factor, factor).mean(axis=(1, 3))


def assert_matches_rounded(actual: np.ndarray, expected: np.ndarray) -> None:
    """``actual`` (uint8) equals ``rint(expected)`` exactly, except where ``expected`` lies within 0.01 of a .5 tie,
    where either neighbour is accepted (float summation order decides those)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    frac = expected - np.floor(expected)
    tie = np.abs(frac - 0.5) < 0.01
    exact = actual.astype(np.int64) == np.rint(expected).astype(np.int64)
    near = (actual >= np.floor(expected)) & (actual <= np.ceil(expected))
    bad = ~np.where(tie, near, exact)
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} pixels differ; first at {np.argwhere(bad)[0].tolist()}: "
        f"{actual[bad][:5].tolist()} vs {expected[bad][:5].tolist()}"
    )


def console_script(command: str) -> Callable[[], None]:
    """The function the console script ``command`` runs (its entry point in the installed package's metadata, e.g.
    ``wsiseg-predict`` → ``wsiseg.predict:main``)."""
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name=command)
    return script.load()


@contextmanager
def logging_restored(fresh: bool = False) -> Iterator[None]:
    """Undo what a command did to the root logger (Hydra configures a file in its run folder and the streams of the
    moment). ``fresh``: the root logger starts as in a new interpreter (no handler, level WARNING), so a command's
    ``logging.basicConfig`` takes effect and its log lines go to the streams it finds."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    if fresh:
        root.handlers[:] = []
        root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def run_main(
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str = "wsiseg-predict",
) -> tuple[int, str]:
    """What the console script ``command`` runs (its entry point in the installed package's metadata, e.g.
    ``wsiseg-predict`` → ``wsiseg.predict:main``) with ``argv``, in this process (an interpreter start costs ~10 s on
    2 cores): (exit status, stderr). Hydra's logging set-up is undone after."""
    main = console_script(command)
    monkeypatch.setattr(sys, "argv", [command, *argv])
    capsys.readouterr()
    try:
        with logging_restored():
            main()
    except SystemExit as exc:
        return int(exc.code or 0), capsys.readouterr().err
    return 0, capsys.readouterr().err  # the run went ahead


def run_command(argv: list[str], command: str = "wsiseg-predict") -> tuple[int, str, str]:
    """Like :func:`run_main`, without pytest's function-scoped fixtures (so a module-scoped fixture can call it):
    (exit status, stdout, stderr) of the console script ``command`` run with ``argv`` in this process. The root
    logger starts as in a new interpreter and is restored after, as are ``sys.argv``, the environment and torch's
    thread count (what a child process could not have changed here)."""
    import torch

    main = console_script(command)
    stdout, stderr = io.StringIO(), io.StringIO()
    argv_before, environ, threads = sys.argv, dict(os.environ), torch.get_num_threads()
    sys.argv = [command, *argv]
    try:
        with logging_restored(fresh=True), redirect_stdout(stdout), redirect_stderr(stderr):
            main()
    except SystemExit as exc:
        return int(exc.code or 0), stdout.getvalue(), stderr.getvalue()
    finally:
        sys.argv = argv_before
        if dict(os.environ) != environ:
            os.environ.clear()
            os.environ.update(environ)
        torch.set_num_threads(threads)
    return 0, stdout.getvalue(), stderr.getvalue()  # the run went ahead
