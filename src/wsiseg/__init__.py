"""wsiseg: fast U-Net segmentation of whole-slide images with Lightning and Hydra.

The Python door is :class:`Segmenter`::

    import wsiseg

    seg = wsiseg.Segmenter("demo")                       # or Segmenter(checkpoint="UNet_17.pth", device="cuda")
    maps = seg.predict_tiles(pil_images)                 # (N, 1, H, W) float32 probabilities
    result = seg.predict_slides("slides/", "out/")       # one row per slide; result.mask(...), result.heatmap(...)
    wsiseg.render_run("out/", threshold=0.3, contours=["geojson"])   # post-process again, no network

Names are imported on first use: ``import wsiseg`` loads no deep-learning library.
"""

from __future__ import annotations

import importlib
from typing import Any

from wsiseg._version import __version__

# public name -> the module that defines it
_LAZY = {
    "Segmenter": "wsiseg.engine",
    "RunResult": "wsiseg.pipeline.result",
    "UserInputError": "wsiseg.errors",
    "SegmentationModule": "wsiseg.module",
    "SlideTileDataModule": "wsiseg.data.datamodule",
    "SlideWriter": "wsiseg.writers.slide_writer",
    "Unet": "wsiseg.model",
    "MilesialUNet": "wsiseg.model",
    "load_checkpoint": "wsiseg.model",
    "render_run": "wsiseg.rerender",
}

__all__ = [
    "MilesialUNet",
    "RunResult",
    "SegmentationModule",
    "Segmenter",
    "SlideTileDataModule",
    "SlideWriter",
    "Unet",
    "UserInputError",
    "__version__",
    "load_checkpoint",
    "render_run",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wsiseg' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
