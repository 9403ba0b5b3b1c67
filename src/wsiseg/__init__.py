"""wsiseg: fast U-Net segmentation of whole-slide images with Lightning and Hydra."""

from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.model import MilesialUNet, Unet, load_checkpoint
from wsiseg.module import SegmentationModule
from wsiseg.writers.slide_writer import SlideWriter

__version__ = "0.1.0"

__all__ = [
    "SegmentationModule",
    "SlideTileDataModule",
    "SlideWriter",
    "Unet",
    "MilesialUNet",
    "load_checkpoint",
    "__version__",
]
