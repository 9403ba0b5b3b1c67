"""The configs travel inside the wheel: an installed (non-editable) wsiseg composes its configs from any directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_carries_configs_and_runs_from_another_directory(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        # no build isolation and no index: the build backend (hatchling, a dev dependency) is already installed, so the
        # suite downloads nothing
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("wsiseg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "wsiseg/conf/predict.yaml",
        "wsiseg/conf/model/unet_camelyon.yaml",
        "wsiseg/conf/trainer/ddp.yaml",
        "wsiseg/assets/demo_unet.pt",
        "wsiseg/predict.py",
    ):
        assert expected in names, expected

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import wsiseg.config as c; from hydra import compose, initialize_config_dir;"
        "initialize_config_dir(config_dir=str(c.config_dir()), version_base='1.3');"
        "cfg = compose(config_name='predict', overrides=['model=demo', 'data.slides=x.svs']);"
        "print(c.config_dir()); print(cfg.model.checkpoint); print(cfg.model.net.base_width)"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config_dir, checkpoint, width = result.stdout.split()
    assert Path(config_dir) == site / "wsiseg" / "conf"
    assert Path(checkpoint) == site / "wsiseg" / "assets" / "demo_unet.pt" and Path(checkpoint).is_file()
    assert width == "8"
