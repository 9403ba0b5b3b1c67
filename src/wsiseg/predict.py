"""``wsiseg-predict``: slides (or patch folders) in, stitched masks, heatmaps and reports out.

wsiseg-predict data.slides='[/data/a.svs,/data/b.tif]' model.checkpoint=/models/UNet_17.pth

A thin door onto :func:`wsiseg.pipeline.run`: Hydra composes the config, the pipeline runs it, errors become one line
and an exit status. Nothing heavy is imported before the run starts (``--help`` and ``--version`` stay fast).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from wsiseg.cli import before_hydra, user_errors
from wsiseg.config import config_dir

__all__ = ["main", "run_predict"]


def run_predict(cfg: DictConfig) -> int:
    """Run ``cfg`` (:func:`wsiseg.pipeline.run`); returns the exit status: 0 when every slide completed, 1 when any was
    skipped or failed (their reasons are in ``summary.json``)."""
    from wsiseg.pipeline import run

    result = run(cfg)
    result.log_where()
    return result.status


@hydra.main(config_path=str(config_dir()), config_name="predict", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    with user_errors("wsiseg-predict", run_dir=Path(HydraConfig.get().runtime.output_dir)):
        status = run_predict(cfg)
    if status:
        sys.exit(status)


def main() -> None:
    """Console entry point ``wsiseg-predict`` (``--help`` lists the required keys and examples)."""
    before_hydra("wsiseg-predict", "predict")
    _hydra_main()


if __name__ == "__main__":
    main()
