"""The console entry point ``wsiseg-export``: composes the ``export`` config with Hydra and hands it to
:func:`wsiseg.deploy.export.run_export`; nothing else.

    wsiseg-export model.checkpoint=/models/UNet_17.pth export.format=onnx export.path=unet.onnx export.opset=17
    wsiseg-export model=demo export.format=torchscript export.path=unet.pt
    wsiseg-export model=demo export.format=openvino export.path=unet.xml     # OpenVINO IR: unet.xml + unet.bin
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from wsiseg.cli import before_hydra, user_errors
from wsiseg.config import config_dir

__all__ = ["main"]


@hydra.main(config_path=str(config_dir()), config_name="export", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    with user_errors("wsiseg-export", run_dir=Path(HydraConfig.get().runtime.output_dir)):
        from wsiseg.deploy.export import run_export

        run_export(cfg)


def main() -> None:
    """Console entry point ``wsiseg-export``
    (:func:`wsiseg.cli.before_hydra` answers --version, an unusable run folder and unknown options)."""
    before_hydra("wsiseg-export", "export")
    _hydra_main()


if __name__ == "__main__":
    main()
