"""Every file in conf/ composes, and every config-group option instantiates (a YAML typo fails here, not at 3 a.m.)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from wsiseg.config import config_dir
from wsiseg.deploy.export import run_export
from wsiseg.model import MilesialUNet

CONF = config_dir()
GROUP_FILES = sorted(p for p in CONF.glob("*/*.yaml"))
NET_FILES = sorted(CONF.glob("model/net/*.yaml"))  # the network, a group of its own inside model
ROOT_FILES = sorted(CONF.glob("*.yaml"))


def probe_onnx(folder: Path) -> Path:
    """``model=probe`` exported by ``wsiseg-export`` (a 1x1 convolution: quick), with its sidecar."""
    path = folder / "probe.onnx"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="export", overrides=["model=probe", f"export.path={path}", "export.batches=[1]"])
    run_export(cfg)
    return path


def group_overrides(group: str, option: str, tmp_path: Path, slide: Path, demo: Path) -> list[str]:
    """Values the option leaves required (``???``) or needs to build on a CPU-only machine."""
    extra: list[str] = [f"data.slides={slide}", f"writer.output_dir={tmp_path}"]
    if group == "model":
        if option == "unet_milesial":
            path = tmp_path / "milesial.pth"
            torch.save(MilesialUNet(3, 2, base_width=4).state_dict(), path)
            extra += ["model.net.base_width=4", f"model.checkpoint={path}"]
        elif option == "unet_camelyon":
            extra += ["model.net.base_width=8", "model.net.out_ch=1", f"model.checkpoint={demo}"]
        elif option in ("onnx", "openvino"):
            extra += [f"model.net.path={probe_onnx(tmp_path)}"]
    if group == "trainer" and not torch.cuda.is_available():
        extra += ["trainer.accelerator=cpu"]  # GPU configs are built for CPU here; their other values stay
        if option in ("gpu", "ddp"):
            extra += ["trainer.precision=bf16-mixed"]
        if option == "ddp":
            extra += ["trainer.devices=2"]
    return extra


def test_config_tree_is_not_empty() -> None:
    groups = {p.parent.name for p in GROUP_FILES}
    assert {"model", "data", "trainer", "writer"} <= groups
    assert (CONF / "predict.yaml") in ROOT_FILES


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_group_option_composes_and_instantiates(
    path: Path, tmp_path: Path, synthetic_slide: Path, demo_checkpoint: Path
) -> None:
    group, option = path.parent.name, path.stem
    if option.startswith("_"):
        pytest.skip("partial config")
    overrides = [f"{group}={option}"] + group_overrides(group, option, tmp_path, synthetic_slide, demo_checkpoint)
    if group == "data" and option != "slides":
        overrides = [f"{group}={option}"] + [o for o in overrides[1:] if not o.startswith("data.slides")]
        if option == "patches":
            overrides += [f"data.input_dir={tmp_path}", "writer=patches"]
    if group == "writer" and option == "patches":
        overrides += ["data=patches", f"data.input_dir={tmp_path}"]
        overrides = [o for o in overrides if not o.startswith("data.slides")]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="predict", overrides=overrides)
    node = cfg[group]
    assert "_target_" in node, f"{path} has no _target_"
    assert not OmegaConf.missing_keys(node), f"{path}: required values left: {OmegaConf.missing_keys(node)}"
    if group == "writer" and option == "slide":  # the run's plan is built at run time and handed over as an object
        from wsiseg.data.plan import RunPlan

        obj = instantiate(node, _partial_=True)(plan=RunPlan())
    elif group == "writer" and option == "patches":
        from wsiseg.data.patches import PatchPlan

        obj = instantiate(node, _partial_=True)(plan=PatchPlan(tmp_path))
    else:
        obj = instantiate(node)
    assert obj is not None


@pytest.mark.parametrize("path", NET_FILES, ids=lambda p: p.stem)
def test_every_network_option_builds_inside_the_users_model(path: Path, tmp_path: Path) -> None:
    """``model/net=<option>`` swaps only the network: the model around it (normalisation, reduction...) stays."""
    option = path.stem
    overrides = ["model=unet_camelyon", f"model/net={option}", "data.slides=x.svs", "model.checkpoint=random"]
    if option in ("onnx", "openvino"):
        overrides += [f"model.net.path={probe_onnx(tmp_path)}", "model.mean=null", "model.std=null"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="predict", overrides=overrides)
    assert cfg.model.reduction == "max" and cfg.model._target_.endswith("SegmentationModule")
    module = instantiate(cfg.model)
    assert type(module.net).__module__ + "." + type(module.net).__name__ == cfg.model.net._target_
    assert len(NET_FILES) >= 5


@pytest.mark.parametrize("path", ROOT_FILES, ids=lambda p: p.stem)
def test_root_config_composes(path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=path.stem)
    assert len(cfg) > 0
