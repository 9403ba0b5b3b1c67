"""The ``wsiseg-export`` console entry point (:mod:`wsiseg.deploy.command`): installed, and bad input is one line."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.deploy.deploy_helpers import run_main

SCRIPT = Path(sys.executable).with_name("wsiseg-export")


def test_console_script_is_installed() -> None:
    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == "wsiseg-export"]
    assert entry.value == "wsiseg.deploy.command:main"
    assert SCRIPT.is_file(), "run `pip install --no-deps -e .` to create the wsiseg-export script"


def test_entry_point_reports_bad_input_as_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``wsiseg.deploy.command.main`` (what the console script calls), in-process to save an interpreter start."""
    argv = ["model.checkpoint=/nonexistent/UNet_17.pth", f"export.path={tmp_path / 'u.onnx'}"]
    with pytest.raises(SystemExit) as info:
        run_main(argv, monkeypatch, tmp_path / "hydra")
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "wsiseg-export: error: model.checkpoint '/nonexistent/UNet_17.pth' does not exist: "
        "pass the path of a .pth/.pt/.ckpt file"
    ]
    assert not (tmp_path / "u.onnx").exists()
