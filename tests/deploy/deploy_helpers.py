"""Helpers the ``tests/deploy`` modules share: the composed configs, the demo network, normalised inputs, the
``wsiseg-export`` entry point in-process and a mask predicted on a slide."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from wsiseg.config import config_dir
from wsiseg.deploy.command import main
from wsiseg.model import Unet, load_checkpoint
from wsiseg.predict import run_predict


def compose_cfg(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def demo_net(checkpoint: Path) -> Unet:
    return load_checkpoint(Unet(3, 1, base_width=8), checkpoint).eval()


def normalised(n: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    pixels = torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return (pixels.float() / 255 - 0.5) / 0.5


def run_main(argv: list[str], monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> None:
    """Call ``wsiseg.deploy.command.main`` (what the ``wsiseg-export`` console script runs) with these overrides,
    in-process."""
    monkeypatch.setattr(sys, "argv", ["wsiseg-export", *argv, f"hydra.run.dir={run_dir}"])
    main()


def predict_mask(slide: Path, out: Path, extra: list[str]) -> np.ndarray:
    cfg = compose_cfg(
        "predict",
        [
            f"data.slides={slide}",
            "trainer=cpu",
            "trainer.precision=32",
            *([] if any(o.startswith("model=") for o in extra) else ["model=demo"]),
            "data.patch_size=256",
            "data.num_workers=0",
            "writer.output_downsample=4",
            f"writer.output_dir={out}",
            *extra,
        ],
    )
    assert run_predict(cfg) == 0
    (mask,) = out.glob("*/mask.tif")
    return tifffile.imread(mask)
