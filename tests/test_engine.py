"""The Python engine (``wsiseg.Segmenter``): the replaced script's five operations (tiles, a slide, a patch folder, ONNX
export, the bench) on the demo model, the same outputs as the command, the command's errors as exceptions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.conftest import shared_slide
from tests.helpers import compose_predict, run_main
from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide

FP32 = {"model.output_dtype": "float32", "model.runtime": "torch", "model.compile": False}
SMALL = {"data.patch_size": 256, "writer.output_downsample": 4, "data.num_workers": 0}
# report fields that are measurements of one run, or the config as typed (its output folder differs)
TIMED = {"wall_time_s", "patches_per_s", "finished_at", "config", "contour_seconds"}


@pytest.fixture(scope="module")
def engine() -> object:
    import wsiseg

    return wsiseg.Segmenter("demo", device="cpu", precision="32", overrides={**SMALL, **FP32})


def test_import_loads_no_deep_learning_library() -> None:
    code = "import sys, wsiseg; print(sorted(m for m in ('torch', 'lightning', 'openslide') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_load_no_deep_learning_library(flag: str) -> None:
    code = (
        "import atexit, sys; atexit.register(lambda: print('LOADED', sorted(m for m in ('torch', 'lightning', "
        f"'openslide') if m in sys.modules))); sys.argv = ['wsiseg-predict', '{flag}']; "
        "from wsiseg.predict import main; main()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "LOADED []"


@pytest.mark.parametrize("flag", ["--help", "--version"])
@pytest.mark.parametrize("command", ["wsiseg-bench", "wsiseg-eval", "wsiseg-export", "wsiseg-render"])
def test_every_commands_help_and_version_load_no_deep_learning_library(command: str, flag: str) -> None:
    """Each console script's entry point (from the package metadata) answers --help and --version without torch or
    Lightning; --version is one line naming the command and wsiseg's version."""
    from wsiseg import __version__

    code = (
        "import atexit, sys; from importlib.metadata import entry_points; atexit.register(lambda: print('LOADED', "
        "sorted(m for m in ('torch', 'lightning', 'openslide') if m in sys.modules))); "
        f"sys.argv = ['{command}', '{flag}']; (script,) = entry_points(group='console_scripts', name='{command}'); "
        "script.load()()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "LOADED []"
    if flag == "--version":
        assert lines[0].startswith(f"{command} (wsiseg) {__version__}; torch ") and len(lines) == 2


def test_predict_tiles_equals_the_pipelines_maps(tmp_path: Path, engine: object) -> None:
    """PIL tiles read with OpenSlide through the engine give the maps the pipeline's predict step gave for the same
    tiles of the real slide (FP32, max |d| <= 1e-6)."""
    import openslide
    from lightning.pytorch import Trainer

    from wsiseg.config import build

    slide = shared_slide("CMU-1-Small-Region.svs")
    cfg = compose_predict(
        ["model=demo", "trainer.precision=32", f"data.slides={slide}", f"writer.output_dir={tmp_path}"]
        + [f"{k}={v}" for k, v in {**SMALL, **FP32}.items()]
    )
    datamodule = build(cfg.data)
    module = build(cfg.model)
    module.prepare("cpu", precision="32-true")
    outputs = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).predict(module, datamodule=datamodule)
    origins = datamodule.plan.slides[0].origins
    reference = np.concatenate([o["probs"].numpy() for o in outputs])[:6]
    handle = openslide.OpenSlide(str(slide))
    tiles = [handle.read_region((int(x), int(y)), 0, (256, 256)).convert("RGB") for x, y in origins[:6]]
    maps = engine.predict_tiles(tiles)
    assert maps.dtype == np.float32 and maps.shape == reference.shape == (6, 1, 64, 64)
    assert np.abs(maps - reference).max() <= 1e-6
    # the other input kinds give the same maps; a size off the stride is padded white and cropped back
    arrays = [np.asarray(t) for t in tiles]
    assert np.array_equal(engine.predict_tiles(np.stack(arrays)), maps)
    import torch

    assert np.array_equal(engine.predict_tiles(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)), maps)
    odd = engine.predict_tiles([arrays[0][:250, :200]])
    assert odd.shape == (1, 1, 63, 50)


def test_a_slide_through_the_engine_equals_the_command(
    tmp_path: Path, engine: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    slide = shared_slide("CMU-1-Small-Region.svs")
    result = engine.predict_slides(slide, tmp_path / "api")
    assert result.status == 0 and [row["status"] for row in result.rows] == ["complete"]
    overrides = [f"{k}={v}" for k, v in {**SMALL, **FP32}.items()]
    status, err = run_main(
        [
            "model=demo",
            "trainer=cpu",
            "trainer.precision=32",
            f"data.slides={slide}",
            f"hydra.run.dir={tmp_path / 'cli'}",
        ]
        + overrides,
        monkeypatch,
        capsys,
    )
    assert status == 0, err[-2000:]
    api, cli = result.folder("CMU-1-Small-Region"), tmp_path / "cli" / "CMU-1-Small-Region"
    pages = len(tifffile.TiffFile(cli / "mask.tif").pages)
    assert pages == len(tifffile.TiffFile(api / "mask.tif").pages) > 1
    for level in range(pages):
        assert np.array_equal(
            tifffile.imread(api / "mask.tif", key=level), tifffile.imread(cli / "mask.tif", key=level)
        )
    assert (api / "heatmap.png").read_bytes() == (cli / "heatmap.png").read_bytes()
    api_report, cli_report = (json.loads((d / "report.json").read_text()) for d in (api, cli))
    assert {k: v for k, v in api_report.items() if k not in TIMED} == {
        k: v for k, v in cli_report.items() if k not in TIMED
    }
    assert result.mask("CMU-1-Small-Region", 1).shape == tifffile.imread(cli / "mask.tif", key=1).shape
    assert result.heatmap("CMU-1-Small-Region").size == Image.open(cli / "heatmap.png").size
    assert result.summary_csv.is_file() and result.index_html.is_file()


def test_a_bad_option_raises_the_commands_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import wsiseg

    slide = shared_slide("CMU-1-Small-Region.svs")
    with pytest.raises(wsiseg.UserInputError) as raised:
        wsiseg.Segmenter("demo", device="cpu").predict_slides(slide, tmp_path / "api", data__overlap=-16)
    status, err = run_main(
        ["model=demo", "trainer=cpu", f"data.slides={slide}", "data.overlap=-16", f"hydra.run.dir={tmp_path / 'cli'}"],
        monkeypatch,
        capsys,
    )
    assert status == 2 and err.strip() == f"wsiseg-predict: error: {raised.value}"
    with pytest.raises(wsiseg.UserInputError, match="model.activation must be one of"):
        wsiseg.Segmenter("demo", overrides={"model.activation": "relu"})
    with pytest.raises(wsiseg.UserInputError, match="data.fooo"):
        wsiseg.Segmenter("demo", overrides={"data.fooo": 1})
    with pytest.raises(wsiseg.UserInputError, match="device must be one of"):
        wsiseg.Segmenter("demo", device="tpu")


def test_a_folder_of_slides(tmp_path: Path, engine: object) -> None:
    """``data.slides`` as a folder: every file OpenSlide can open under it (sub-folders too), sorted; other files and
    hidden ones are not slides."""
    folder = tmp_path / "slides"
    (folder / "sub").mkdir(parents=True)
    write_synthetic_slide(folder / "b.tif", SyntheticSlide(512, 384, seed=1))
    write_synthetic_slide(folder / "sub" / "a.tif", SyntheticSlide(512, 384, seed=2))
    (folder / "notes.txt").write_text("not a slide")
    write_synthetic_slide(folder / ".hidden.tif", SyntheticSlide(256, 256, seed=3))
    result = engine.predict_slides(folder, tmp_path / "out")
    assert [Path(row["slide"]).name for row in result.rows] == ["b.tif", "a.tif"]
    assert all(row["status"] == "complete" for row in result.rows)


def test_patch_folder_export_and_bench(tmp_path: Path, engine: object) -> None:
    patches = tmp_path / "patches"
    patches.mkdir()
    rgb = np.asarray(Image.open(shared_slide("openslide-python__boxes.png")).convert("RGB"))
    Image.fromarray(rgb[:256, :256]).save(patches / "p1.png")
    Image.fromarray(np.ascontiguousarray(rgb[:200, :250])).save(patches / "p2.png")
    result = engine.predict_folder(patches, tmp_path / "heatmaps", writer__output_downsample=1)
    assert result.status == 0 and len(result.rows) == 2
    assert (tmp_path / "heatmaps" / "p1_heatmap.png").is_file() and (tmp_path / "heatmaps" / "p2_heatmap.png").is_file()

    sidecar = engine.export(tmp_path / "demo.onnx")
    assert (tmp_path / "demo.onnx").is_file() and sidecar["format"] == "onnx"

    report = engine.bench(
        tmp_path / "bench",
        bench__generated_size=1024,
        bench__max_tiles=8,
        bench__naive_tiles=2,
        bench__model_batches=2,
        bench__peers=False,
        data__batch_size=4,
    )
    assert set(report["cases"]) >= {"naive", "optimised", "read_bound", "model_bound", "host_bound"}
    assert report["summary"]["speedup_optimised_vs_naive"] > 0


def test_public_names_stay_what_they_are_after_every_module_is_imported() -> None:
    """A submodule named like a public name would replace it on the package once imported (``import wsiseg.x`` sets
    ``wsiseg.x``): after importing every wsiseg module, each lazy public name is still the class or function."""
    import importlib
    import inspect
    import pkgutil

    import wsiseg

    for info in pkgutil.walk_packages(wsiseg.__path__, "wsiseg."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name in wsiseg.__all__:
        value = getattr(wsiseg, name)
        assert not inspect.ismodule(value), f"wsiseg.{name} is the module {value.__name__}, not the public name"
