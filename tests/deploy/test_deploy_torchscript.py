"""``export.format=torchscript`` (:mod:`wsiseg.deploy.torchscript`): frozen, and equal to eager PyTorch in float32 and
float16."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.deploy.deploy_helpers import compose_cfg, demo_net, normalised
from wsiseg.deploy.export import run_export
from wsiseg.deploy.verify import FP16_TOLERANCE, FP32_TOLERANCE


def test_demo_torchscript_is_frozen_and_matches_eager(tmp_path: Path, demo_checkpoint: Path) -> None:
    path = tmp_path / "demo.pt"
    side = run_export(compose_cfg("export", ["model=demo", "export.format=torchscript", f"export.path={path}"]))
    assert side["format"] == "torchscript" and side["verification"]["max_abs_diff"] <= FP32_TOLERANCE
    assert len(side["verification"]["cases"]) == 4
    scripted = torch.jit.load(str(path))
    assert not list(scripted.parameters()), "freeze turns the weights into constants"
    x = normalised(2, 48, 80)
    with torch.no_grad():
        diff = (scripted(x) - demo_net(demo_checkpoint)(x)).abs().max().item()
    assert diff <= FP32_TOLERANCE


def test_fp16_torchscript_within_fp16_tolerance(tmp_path: Path) -> None:
    path = tmp_path / "demo16.pt"
    side = run_export(
        compose_cfg(
            "export",
            [
                "model=demo",
                "export.format=torchscript",
                "export.fp16=true",
                f"export.path={path}",
                "export.sizes=[[64,64],[32,48]]",
                "export.batches=[1,2]",
            ],
        )
    )
    assert 1e-5 < side["verification"]["max_abs_diff"] <= FP16_TOLERANCE
