"""Randomized option fuzz over every key of the predict config (both modes): each bad value — a wrong type, a value out
of range, an empty value — is refused before any work with one line naming the key, exit status 2, and no run folder
left behind. The seed is printed; set WSISEG_FUZZ_SEED to draw other values."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.helpers import run_main
from wsiseg.config import config_dir
from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide

SEED = int(os.environ.get("WSISEG_FUZZ_SEED", "20261201"))
BASE = ["model=demo", "trainer=cpu", "data.num_workers=0", "trainer.enable_progress_bar=false"]

# Values out of range (or of the right type but refused) for keys whose type alone does not make them wrong.
OUT_OF_RANGE: dict[str, list[Any]] = {
    "data.patch_size": [0, -256, 200],
    "data.overlap": [-1, 512, 600],
    "data.batch_size": [0, -2, "many"],
    "data.num_workers": [-1],
    "data.level": [-1, 99],
    "data.mpp": [0, -0.5],
    "data.mpp_tolerance": [1.0, -0.1],
    "data.slide_mpp": [0, -0.25, "/nonexistent/mpps.csv"],
    "data.model_mpp": [0, -1.0],
    "model.mpp": [0, -0.5],
    "model.tta": ["rot90", ""],
    "data.read_threads": [0, -3],
    "data.reader": ["nvjpeg", ""],
    "data.on_error": ["ignore", ""],
    "data.tissue.thumbnail_max_side": [0, -5],
    "data.tissue.min_saturation": [300, -1],
    "data.tissue.min_fraction": [2, 1.0, -0.5],
    "data.prefetch_factor": [0, -1],
    "writer.blend": ["cubic", ""],
    "writer.sigma_scale": [0, -1.0],
    "writer.threshold": [0, 1.5, -0.2],
    "writer.chunk": [0, 500, -512],
    "writer.cache_mb": [0, -1],
    "writer.tiff_tile": [100, 0, -256],
    "writer.compression": ["jpeg", ""],  # lzw, deflate, zlib, zstd are valid
    "writer.heatmap_max_side": [0, -1],
    "writer.contours": ["shapefile", "[geojson,kml]"],
    "writer.min_area_um2": [-1.0],
    "writer.blend_thread": ["sometimes"],
    "writer.output_downsample": [0, 3, -2],
    "model.activation": ["relu", ""],
    "model.reduction": ["mean", ""],
    "model.channel_index": [5, -1],
    "model.output_dtype": ["bfloat16", ""],
    "model.compile": ["maybe"],
    "model.compile_min_tiles": [-1],
    "model.max_chunk": [0, -4],
    "model.mean": ["[0.5,0.5]", "[]"],
    "model.std": ["[0.5,0.5,0]", "[1,1]"],
    "model.net.base_width": [0, -8],
    "model.net.in_ch": [1, 0],
    "model.net.out_ch": [0],
    "model.checkpoint": ["", "/nonexistent/weights.pth"],
    "data.slides": ["", "[]", "/nonexistent/slide.svs"],
    "resume": ["maybe", 2],
    "trainer.accelerator": ["tpu9"],
    "trainer.precision": ["8-mixed", "fp32"],
    "trainer.devices": [0, "many"],
}
PATCH_OUT_OF_RANGE: dict[str, list[Any]] = {
    "data.patch_size": [0, 200],
    "data.overlap": [-1, 512],
    "data.pad_multiple": [0, -16],
    "data.pad": ["mirror", ""],
    "data.batch_size": [0],
    "data.num_workers": [-1],
    "data.input_dir": ["", "/nonexistent/patches"],
    "writer.opacity": [1.5, -0.1],
    "writer.blend": ["cubic"],
    "writer.write_workers": [-1],
    "writer.output_downsample": [2],
}
# Keys any string fits (paths and names): only wrong types are drawn for them.
FREE_FORM = {"writer.output_dir", "data.extensions"}
# Keys whose null is documented (the ONNX sidecar's value, else the default): not drawn as empty.
NULLABLE = {"model.mean", "model.std", "model.activation", "model.checkpoint"}
# Keys left to their own tests: the trainer's many Lightning options other than the ones listed above.
SKIPPED_PREFIXES = ("trainer.", "hydra.")


def wrong_types(default: Any) -> list[Any]:
    """Values of another type than ``default``'s (the config's own value for the key)."""
    if isinstance(default, bool):
        return ["maybe", 3]
    if isinstance(default, int):
        return ["foo", 2.5, "[1,2]"]
    if isinstance(default, float):
        return ["foo", "[0.1]"]
    if isinstance(default, list):
        return ["7"] if default and not isinstance(default[0], str) else []
    return []


def leaves(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in cfg:
        path = f"{prefix}{key}"
        if key.startswith("_") or path.startswith(SKIPPED_PREFIXES):
            continue
        try:
            value = cfg[key]
        except Exception:  # ??? or an interpolation only the app resolves
            continue
        if OmegaConf.is_dict(value):
            out.update(leaves(value, f"{path}."))
        else:
            out[path] = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
    return out


def draw_cases(mode_overrides: list[str], ranges: dict[str, list[Any]], rng: random.Random) -> list[tuple[str, Any]]:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="predict", overrides=[*BASE, *mode_overrides])
    keys = leaves(cfg)
    cases = []
    for key in sorted(set(keys) | set(ranges)):
        candidates = ([] if key in FREE_FORM else list(ranges.get(key, []))) + wrong_types(keys.get(key))
        if key in keys and keys[key] is not None and key not in FREE_FORM | NULLABLE and key not in ranges:
            candidates.append(None)  # an empty value for a key that has one by default
        if candidates:
            cases.append((key, rng.choice(candidates)))
    return cases


def as_override(key: str, value: Any) -> str:
    if value is None:
        return f"{key}=null"
    if value == "":
        return f"{key}=''"
    return f"{key}={value}"


@pytest.fixture(scope="module")
def fuzz_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    slide = write_synthetic_slide(root / "slide.tif", SyntheticSlide(1024, 768, seed=4))
    patches = root / "patches"
    patches.mkdir()
    from PIL import Image

    Image.new("RGB", (256, 256), (200, 120, 180)).save(patches / "p.png")
    return slide, patches


@pytest.mark.parametrize("mode", ["slides", "patches"])
def test_every_bad_option_is_one_line_exit_2_and_no_run_folder(
    mode: str,
    fuzz_inputs: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    slide, patches = fuzz_inputs
    rng = random.Random(f"{SEED}-{mode}")
    if mode == "slides":
        mode_overrides, ranges = [f"data.slides={slide}"], OUT_OF_RANGE
    else:
        mode_overrides, ranges = ["data=patches", f"data.input_dir={patches}", "writer=patches"], PATCH_OUT_OF_RANGE
    cases = draw_cases(mode_overrides, ranges, rng)
    print(f"\nseed {SEED} ({mode}): {len(cases)} cases")
    assert len(cases) >= (40 if mode == "slides" else 15)
    failures = []
    for n, (key, value) in enumerate(cases):
        run_dir = tmp_path / f"run{n}"
        override = as_override(key, value)
        argv = [*BASE, *mode_overrides, f"writer.output_dir={run_dir}", f"hydra.run.dir={run_dir}", override]
        if key == "data.slides" or key == "data.input_dir":  # the drawn value replaces the mode's own
            argv = [a for a in argv if not a.startswith(f"{key}=")] + [override]
        status, err = run_main(argv, monkeypatch, capsys)
        lines = err.strip().splitlines()
        ok = status == 2 and len(lines) == 1 and lines[0].startswith("wsiseg-predict: error: ")
        named = key.split(".")[-1] in lines[0] if lines else False
        if key.startswith("model.net.") and lines:  # a network shape the checkpoint was not trained with
            named = named or "does not match" in lines[0]
        if not (ok and named and not run_dir.exists()):
            failures.append(f"{override}: exit {status}, folder left {run_dir.exists()}, stderr {err.strip()[-300:]!r}")
    assert not failures, f"seed {SEED}: {len(failures)} of {len(cases)} bad options not refused cleanly:\n" + "\n".join(
        failures
    )


class Hung(BaseException):
    """A case ran past its time limit (not an Exception: the entry points' handlers must not catch it)."""


def run_with_time_limit(
    argv: list[str], command: str, seconds: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int | None, str]:
    """``run_main`` for ``command``; (None, "") when it ran past ``seconds``: a hang fails, not the suite."""

    def stop(signum: int, frame: object) -> None:
        raise Hung

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        return run_main(argv, monkeypatch, capsys, command=command)
    except Hung:
        return None, ""
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def draw_section_cases(config: str, section: str, rng: random.Random) -> list[tuple[str, Any]]:
    """A wrongly typed value for every key of ``section`` in ``config`` (empty for keys that have a value)."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name=config, overrides=["model=demo"] if config != "eval" else [])
    keys = {k: v for k, v in leaves(cfg[section], f"{section}.").items()}
    cases = []
    for key in sorted(keys):
        candidates = wrong_types(keys[key])
        if keys[key] not in (None, "???", []) and not isinstance(keys[key], bool):
            candidates.append(None)
        if candidates:
            cases.append((key, rng.choice(candidates)))
    return cases


# The red team's hangs (export and bench spun at 100 % CPU on these) and more of each kind.
EXPORT_CASES = [
    "export.format=tflite",
    "export.path={tmp}",  # a folder
    "export.path={tmp}/missing/x.onnx",
    "export.path=/proc/x.onnx",
    "export.opset=5",
    "export.opset=999",
    "export.quantize=int4",
    "export.quantize=int8",  # no calibration slides
    "export.format=openvino export.path={tmp}/x.onnx",
    "export.batches=[0]",
    "export.sizes=[[60,64]]",
    "export.tolerance=-1",
    "export.dice_floor=2",
    "export.calibration_tiles=0",
]
BENCH_CASES = [
    "bench.max_tiles=0",
    "bench.naive_tiles=-1",
    "bench.generated_size=0",
    "bench.model_batches=0",
    "data=patches data.input_dir=/nonexistent writer=patches",  # was a RuntimeError traceback
]
EVAL_CASES = ["eval.predictions=/nonexistent", "eval.level=-1", "eval.threshold=2"]


@pytest.mark.parametrize(
    ("command", "config", "section", "curated"),
    [
        ("wsiseg-export", "export", "export", EXPORT_CASES),
        ("wsiseg-bench", "bench", "bench", BENCH_CASES),
        ("wsiseg-eval", "eval", "eval", EVAL_CASES),
    ],
)
def test_other_commands_refuse_bad_options_in_one_line_without_hanging(
    command: str,
    config: str,
    section: str,
    curated: list[str],
    fuzz_inputs: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    slide, _ = fuzz_inputs
    rng = random.Random(f"{SEED}-{command}")
    base = {
        "wsiseg-export": ["model=demo", f"export.path={tmp_path}/ok.onnx"],
        "wsiseg-bench": ["model=demo", "trainer=cpu", f"bench.slide={slide}"],
        "wsiseg-eval": [f"eval.predictions={tmp_path}", f"eval.annotations={tmp_path}"],
    }[command]
    cases = [c.format(tmp=tmp_path).split() for c in curated]
    cases += [[as_override(key, value)] for key, value in draw_section_cases(config, section, rng)]
    print(f"\nseed {SEED} ({command}): {len(cases)} cases")
    failures = []
    for n, overrides in enumerate(cases):
        run_dir = tmp_path / f"run{n}"
        keys = {o.split("=", 1)[0] for o in overrides}
        argv = [a for a in base if a.split("=", 1)[0] not in keys] + overrides + [f"hydra.run.dir={run_dir}"]
        status, err = run_with_time_limit(argv, command, 60, monkeypatch, capsys)
        lines = err.strip().splitlines()
        ok = status == 2 and len(lines) == 1 and lines[0].startswith(f"{command}: error: ")
        if not ok or run_dir.exists():
            what = "hung (60 s)" if status is None else f"exit {status}"
            failures.append(
                f"{' '.join(overrides)}: {what}, folder left {run_dir.exists()}, stderr {err.strip()[-300:]!r}"
            )
    assert not failures, f"seed {SEED}: {len(failures)} of {len(cases)} bad options not refused cleanly:\n" + "\n".join(
        failures
    )
