"""Shared fixtures: the real slides in ../shared/slides and generated synthetic slides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_SLIDES = Path(os.environ.get("WSISEG_SHARED_SLIDES", REPO.parent / "shared" / "slides"))

# Tests run on 2 CPU cores: keep torch from oversubscribing next to DataLoader workers, and next to the other test
# processes (pytest-xdist: ``make test`` runs one per core), whose threads share the same cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


def shared_slide(name: str) -> Path:
    """Path of a file in ../shared/slides; skips the test when the folder is absent."""
    path = SHARED_SLIDES / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2000 × 1500 synthetic pyramidal JPEG TIFF (size not a multiple of 16 or 256), seed 7."""
    from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide

    path = tmp_path_factory.mktemp("synthetic") / "synth.tif"
    return write_synthetic_slide(path, SyntheticSlide(2000, 1500, seed=7))


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    from wsiseg.config import asset_path

    return Path(asset_path("demo_unet.pt"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
