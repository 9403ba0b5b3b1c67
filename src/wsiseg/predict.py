"""``wsiseg-predict``: slides (or patch folders) in, stitched masks, heatmaps and reports out.

    wsiseg-predict data.slides='[/data/a.svs,/data/b.tif]' model.checkpoint=/models/UNet_17.pth
"""

from __future__ import annotations

import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from wsiseg.batch_size import resolve_batch_size
from wsiseg.cli import user_errors
from wsiseg.config import config_dir
from wsiseg.errors import UserInputError

__all__ = ["main", "run_predict"]


def run_predict(cfg: DictConfig) -> int:
    """Instantiate datamodule, module, writer and trainer from ``cfg``, run ``trainer.predict``.

    Returns:
        0 when every slide completed, 1 when any was skipped or failed (their reasons are in ``summary.json``).
    """
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model)
    if datamodule.patch_size % module.stride:
        raise UserInputError(
            f"data.patch_size={datamodule.patch_size} is not a multiple of the network's stride {module.stride}: "
            f"use e.g. {max(module.stride, datamodule.patch_size // module.stride * module.stride)}"
        )
    writer = instantiate(cfg.writer)
    writer.run_config = OmegaConf.to_container(cfg, resolve=True)
    trainer = instantiate(cfg.trainer, callbacks=[writer])
    datamodule.batch_size = resolve_batch_size(
        datamodule.batch_size, module, datamodule.patch_size, trainer.strategy.root_device, trainer
    )
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return 0 if all(row["status"] == "complete" for row in writer.results) else 1


@hydra.main(config_path=str(config_dir()), config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("wsiseg-predict"):
        status = run_predict(cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
