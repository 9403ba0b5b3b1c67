"""``wsiseg-predict``: slides (or patch folders) in, stitched masks, heatmaps and reports out.

wsiseg-predict data.slides='[/data/a.svs,/data/b.tif]' model.checkpoint=/models/UNet_17.pth
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from wsiseg.batch_size import resolve_batch_size
from wsiseg.cli import exit_if_version_asked, user_errors
from wsiseg.config import config_dir
from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.errors import UserInputError
from wsiseg.options import check_required, check_trainer_device
from wsiseg.writers.slide_writer import config_hash, read_complete_report

__all__ = ["main", "run_predict"]


def run_predict(cfg: DictConfig) -> int:
    """Instantiate datamodule, module, writer and trainer from ``cfg``, run ``trainer.predict``.

    Cheap checks come first (options, patch size vs the network's stride, output folder), then the model is built and
    the checkpoint loaded, then slides are opened and tiled.

    Returns:
        0 when every slide completed, 1 when any was skipped or failed (their reasons are in ``summary.json``).
    """
    check_required(cfg)
    check_trainer_device(cfg)
    stride = int(getattr(get_class(cfg.model.net._target_), "stride", 1))
    if cfg.data.get("patch_size") and cfg.data.patch_size % stride:
        raise UserInputError(
            f"data.patch_size={cfg.data.patch_size} is not a multiple of the network's stride {stride}: "
            f"use e.g. {max(stride, cfg.data.patch_size // stride * stride)}"
        )
    datamodule = instantiate(cfg.data)
    writer = instantiate(cfg.writer, provenance=run_provenance(cfg))
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
        try:
            trainer.predict(module, datamodule=datamodule, return_predictions=False)
        except SystemExit:
            if trainer.interrupted:  # Lightning turns Ctrl-C into sys.exit(1) after its callbacks' on_exception
                raise KeyboardInterrupt from None
            raise
    return 0 if all(row["status"] == "complete" for row in writer.results) else 1


def run_provenance(cfg: DictConfig) -> dict[str, Any]:
    """What produced a run's outputs, for ``report.json``: library versions and the weights file with its SHA-256
    (the ONNX file for ``model.backend=onnxruntime``; ``random`` for untrained weights)."""
    from importlib.metadata import version

    import lightning

    import wsiseg
    from wsiseg.export import sha256_file

    model = cfg.model
    weights = model.get("onnx_path") if model.get("backend") == "onnxruntime" else model.get("checkpoint")
    path = Path(str(weights)).expanduser() if weights else None
    return {
        "wsiseg_version": wsiseg.__version__,
        "torch_version": torch.__version__,
        "lightning_version": lightning.__version__,
        "openslide_version": version("openslide-python"),
        "weights": None if weights is None else str(path.absolute() if path and path.is_file() else weights),
        "weights_sha256": sha256_file(path) if path is not None and path.is_file() else None,
    }


def _has_no_tiles(datamodule: SlideTileDataModule) -> bool:
    datamodule.setup("predict")  # idempotent: Lightning's own call later reuses the plan
    return len(datamodule.dataset) == 0


@hydra.main(config_path=str(config_dir()), config_name="predict", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    with user_errors("wsiseg-predict", run_dir=Path(HydraConfig.get().runtime.output_dir)):
        status = run_predict(cfg)
    if status:
        sys.exit(status)


def main() -> None:
    """Console entry point ``wsiseg-predict`` (``--help`` lists the required keys and examples)."""
    exit_if_version_asked("wsiseg-predict")
    _hydra_main()


if __name__ == "__main__":
    main()
