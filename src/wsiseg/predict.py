"""``wsiseg-predict``: slides (or patch folders) in, stitched masks, heatmaps and reports out.

wsiseg-predict data.slides='[/data/a.svs,/data/b.tif]' model.checkpoint=/models/UNet_17.pth
"""

from __future__ import annotations

import sys

import hydra
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from wsiseg.batch_size import resolve_batch_size
from wsiseg.cli import user_errors
from wsiseg.config import config_dir
from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.errors import UserInputError
from wsiseg.writers.slide_writer import config_hash, read_complete_report

__all__ = ["main", "run_predict"]


def run_predict(cfg: DictConfig) -> int:
    """Instantiate datamodule, module, writer and trainer from ``cfg``, run ``trainer.predict``.

    Cheap checks come first (options, patch size vs the network's stride, output folder), then the model is built and
    the checkpoint loaded, then slides are opened and tiled.

    Returns:
        0 when every slide completed, 1 when any was skipped or failed (their reasons are in ``summary.json``).
    """
    stride = int(getattr(get_class(cfg.model.net._target_), "stride", 1))
    if cfg.data.get("patch_size") and cfg.data.patch_size % stride:
        raise UserInputError(
            f"data.patch_size={cfg.data.patch_size} is not a multiple of the network's stride {stride}: "
            f"use e.g. {max(stride, cfg.data.patch_size // stride * stride)}"
        )
    datamodule = instantiate(cfg.data)
    writer = instantiate(cfg.writer)
    writer.run_config = OmegaConf.to_container(cfg, resolve=True)
    if cfg.get("resume") and isinstance(datamodule, SlideTileDataModule):
        expected = config_hash(writer.run_config)
        datamodule.is_complete = lambda name: read_complete_report(writer.output_dir / name, expected) is not None
    module = instantiate(cfg.model)
    trainer = instantiate(cfg.trainer, callbacks=[writer])
    datamodule.batch_size = resolve_batch_size(
        datamodule.batch_size, module, datamodule.patch_size, trainer.strategy.root_device, trainer
    )
    if isinstance(datamodule, SlideTileDataModule) and _has_no_tiles(datamodule):
        # No tissue anywhere, or everything resumed: Lightning would run no hooks, so write the outputs directly.
        if trainer.global_rank == 0:
            writer.write_without_tiles(datamodule)
    else:
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return 0 if all(row["status"] == "complete" for row in writer.results) else 1


def _has_no_tiles(datamodule: SlideTileDataModule) -> bool:
    datamodule.setup("predict")  # idempotent: Lightning's own call later reuses the plan
    return len(datamodule.dataset) == 0


@hydra.main(config_path=str(config_dir()), config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("wsiseg-predict"):
        status = run_predict(cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
