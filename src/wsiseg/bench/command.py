"""The console entry point ``wsiseg-bench``: composes the ``bench`` config with Hydra and hands it to
:mod:`wsiseg.bench.run` (a slide, or with ``data=patches`` a folder of patches); nothing else."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from wsiseg.cli import before_hydra, user_errors
from wsiseg.config import config_dir
from wsiseg.options import check_option_types

__all__ = ["main"]


@hydra.main(config_path=str(config_dir()), config_name="bench", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    with user_errors("wsiseg-bench", run_dir=Path(HydraConfig.get().runtime.output_dir)):
        check_option_types(cfg, ("bench", "data", "model", "model.net", "trainer"))
        from wsiseg.bench.run import run_bench, run_patch_bench  # here: --help loads no deep-learning library

        out_dir = Path(HydraConfig.get().runtime.output_dir)
        if str(cfg.data.get("_target_", "")).endswith("PatchFolderDataModule"):
            run_patch_bench(cfg, out_dir)
        else:
            run_bench(cfg, out_dir)


def main() -> None:
    """Console entry point ``wsiseg-bench``
    (:func:`wsiseg.cli.before_hydra` answers --version, an unusable run folder and unknown options)."""
    before_hydra("wsiseg-bench", "bench")
    _hydra_main()


if __name__ == "__main__":
    main()
