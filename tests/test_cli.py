"""The console entry point as a new user meets it: one line and exit status 2 for every mistake, no folder left behind,
``--help``/``--version`` that speak of wsiseg, honest per-slide figures and provenance in the report."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import predict, run_main
from wsiseg.data.synthetic import SyntheticSlide, write_synthetic_slide

SCRIPT = Path(sys.executable).parent / "wsiseg-predict"
QUICK = ["data.patch_size=256", "writer.output_downsample=4", "trainer=cpu", "data.num_workers=0"]


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_slide(tmp_path_factory.mktemp("cli") / "small.tif", SyntheticSlide(1024, 768, seed=11))


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``wsiseg-predict ARGS`` in ``cwd`` with Hydra's default run folder (``outputs/<date>/<time>`` under ``cwd``)."""
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


USER_ERRORS = {
    "missing checkpoint": (["data.slides={slide}"], "wsiseg-predict: error: model.checkpoint is required: pass"),
    "missing slides": (["model=demo"], "wsiseg-predict: error: data.slides is required: pass data.slides="),
    "both missing": ([], "wsiseg-predict: error: required options missing: data.slides, model.checkpoint;"),
    "null checkpoint": (
        ["data.slides={slide}", "model.checkpoint=null"],
        "wsiseg-predict: error: model.checkpoint is required: pass model.checkpoint=/path/to/weights.pth, or "
        "model.checkpoint=random",
    ),
    "unknown blend": (
        ["model=demo", "data.slides={slide}", "writer.blend=cubic"],
        "wsiseg-predict: error: writer.blend must be one of none, linear, gaussian; got 'cubic'",
    ),
    "unknown compression": (
        ["model=demo", "data.slides={slide}", "writer.compression=jpeg"],
        "wsiseg-predict: error: writer.compression must be one of lzw, deflate, zlib, zstd",
    ),
    "tiff tile": (
        ["model=demo", "data.slides={slide}", "writer.tiff_tile=100"],
        "wsiseg-predict: error: writer.tiff_tile must be a positive multiple of 16",
    ),
    "run folder that cannot be created": (
        ["model=demo", "data.slides={slide}", "hydra.run.dir=/proc/wsiseg-no/run"],
        "wsiseg-predict: error: hydra.run.dir '/proc/wsiseg-no/run' cannot be created",
    ),
    "a _target_ given arguments it does not take": (
        ["model.checkpoint=random", "data.slides={slide}", "model.net._target_=torch.nn.Conv2d"],
        "wsiseg-predict: error: model.net._target_=torch.nn.modules.conv.Conv2d: Conv2d.__init__() got an unexpected "
        "keyword argument 'in_ch'; it accepts in_channels, out_channels, kernel_size",
    ),
    "gpu trainer without a gpu": (
        ["model=demo", "data.slides={slide}", "trainer=gpu"],
        "wsiseg-predict: error: trainer.accelerator=gpu but no CUDA GPU is visible",
    ),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_are_one_line_exit_2_and_leave_no_run_folder(
    tmp_path: Path, small_slide: Path, case: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The console script's entry point, in this process (the console script itself: the next test)."""
    overrides, expected = USER_ERRORS[case]
    if case == "gpu trainer without a gpu" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: trainer=gpu is valid here")
    monkeypatch.chdir(tmp_path)  # Hydra's default run folder (outputs/<date>/<time>) goes under the working folder
    status, stderr = run_main([*QUICK, *(o.format(slide=small_slide) for o in overrides)], monkeypatch, capsys)
    assert status == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("wsiseg-predict: error: ") and expected in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], "a refused run left a folder behind"


def test_console_script_user_error_is_one_line_and_leaves_no_run_folder(tmp_path: Path, small_slide: Path) -> None:
    """The installed ``wsiseg-predict`` in a new process, the way a user meets it."""
    result = run_cli(tmp_path, *QUICK, f"data.slides={small_slide}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stderr.strip().splitlines() == [
        "wsiseg-predict: error: model.checkpoint is required: pass model.checkpoint=/path/to/weights.pth "
        "(model=demo runs the built-in demo network; model.checkpoint=random runs untrained weights, for benchmarks "
        "only)"
    ]
    assert list(tmp_path.iterdir()) == [], "a refused run left a folder behind"


@pytest.mark.parametrize("command", ["wsiseg-eval", "wsiseg-export", "wsiseg-bench"])
def test_the_other_commands_refuse_a_run_folder_they_cannot_create(
    tmp_path: Path, command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each command's console-script entry point (the function its script calls, from the package metadata),
    in-process."""
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name=command)
    main = script.load()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [command, "hydra.run.dir=/proc/wsiseg-no/run"])
    with pytest.raises(SystemExit) as done:
        main()
    stderr = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines() == [
        f"{command}: error: hydra.run.dir '/proc/wsiseg-no/run' cannot be created (No such file or directory): "
        "choose a writable folder with hydra.run.dir=/path/to/run"
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_refused_run_keeps_an_existing_run_folder(tmp_path: Path, small_slide: Path) -> None:
    run_dir = tmp_path / "night1"
    (run_dir / "other").mkdir(parents=True)
    result = run_cli(
        tmp_path, "model=demo", f"data.slides={small_slide}", "writer.blend=cubic", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 2
    assert (run_dir / "other").is_dir(), "a folder with earlier contents must survive a refused run"


def test_help_names_required_keys_and_version_names_wsiseg(tmp_path: Path) -> None:
    helped = run_cli(tmp_path, "--help")
    assert helped.returncode == 0
    assert "data.slides=PATH" in helped.stdout and "model.checkpoint=PATH" in helped.stdout
    assert "wsiseg-predict model=demo data.slides=slide.svs" in helped.stdout
    assert "model: " in helped.stdout and "unet_camelyon" in helped.stdout  # the config groups are listed
    version = run_cli(tmp_path, "--version")
    assert version.returncode == 0
    import wsiseg

    assert version.stdout.startswith(f"wsiseg-predict (wsiseg) {wsiseg.__version__}; torch {torch.__version__}")
    assert "Hydra" not in version.stdout


def test_slides_sharing_a_batch_are_each_timed_with_it(tmp_path: Path) -> None:
    """Both slides' tiles arrive in one batch: each slide's time includes reading and computing that batch (the second
    slide used to be timed from the first one's write only, ~0.0 s)."""
    first = write_synthetic_slide(tmp_path / "first.tif", SyntheticSlide(768, 512, seed=3))
    second = write_synthetic_slide(tmp_path / "second.tif", SyntheticSlide(768, 512, seed=4))
    out = tmp_path / "out"
    overrides = ["model=demo", "data.patch_size=256", "data.tissue.enabled=false", "data.batch_size=64"]
    assert predict([first, second], out, overrides) == 0
    reports = [json.loads((out / name / "report.json").read_text()) for name in ("first", "second")]
    assert [r["tiles_processed"] for r in reports] == [6, 6]
    # The shared batch runs before either slide is written, so the second slide (written after the first) takes
    # at least as long as the first.
    assert reports[1]["wall_time_s"] >= reports[0]["wall_time_s"] > 0


def test_report_records_the_batch_size_used_and_provenance(tmp_path: Path, small_slide: Path, demo_checkpoint) -> None:
    out = tmp_path / "out"
    assert predict(small_slide, out, ["model=demo", "data.patch_size=256", "data.batch_size=auto"]) == 0
    report = json.loads((out / "small" / "report.json").read_text())
    assert report["config"]["data"]["batch_size"] == "auto"
    assert report["batch_size"] == 2  # what auto resolves to on a CPU
    provenance = report["provenance"]
    assert provenance["weights"] == str(demo_checkpoint)
    assert provenance["weights_sha256"] == hashlib.sha256(demo_checkpoint.read_bytes()).hexdigest()
    import lightning

    import wsiseg

    assert provenance["wsiseg_version"] == wsiseg.__version__
    assert provenance["torch_version"] == torch.__version__
    assert provenance["lightning_version"] == lightning.__version__


def test_log_lines_print_above_the_progress_bar() -> None:
    """A log line while the bar is drawn lands on a line of its own, then the bar is redrawn (a plain StreamHandler
    glued the line onto the bar)."""
    import io
    import logging

    from tqdm import tqdm

    from wsiseg.cli import ProgressBarSafeHandler

    stream = io.StringIO()
    bar = tqdm(total=10, file=stream, desc="Predicting", ascii=True, mininterval=0)
    bar.update(3)
    handler = ProgressBarSafeHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.emit(logging.LogRecord("wsiseg", logging.INFO, __file__, 1, "slide 1/2 a: done", None, None))
    bar.close()
    line = next(part for part in stream.getvalue().split("\n") if "slide 1/2 a: done" in part)
    assert line.split("\r")[-1] == "slide 1/2 a: done", repr(line)


def test_only_hydras_start_up_files_make_a_run_folder_unused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused run removes a folder holding just Hydra's .hydra/ and log; one that also holds another run's lock
    file is in use by that run and stays (the lock file is gone once its own run ends)."""
    from wsiseg.cli import discard_unused_run_dir
    from wsiseg.run_lock import LOCK_NAME

    unused = tmp_path / "outputs" / "2026-12-01" / "12-00-00"
    (unused / ".hydra").mkdir(parents=True)
    (unused / "predict.log").write_text("")
    busy = tmp_path / "busy"
    (busy / ".hydra").mkdir(parents=True)
    (busy / LOCK_NAME).write_text("1234")
    monkeypatch.chdir(tmp_path)  # parents are removed up to the current directory
    discard_unused_run_dir(unused)
    discard_unused_run_dir(busy)
    assert not (tmp_path / "outputs").exists(), "the empty date/time parents go with the unused folder"
    assert (busy / LOCK_NAME).exists()


@pytest.mark.parametrize(
    ("command", "override", "expected"),
    [
        ("wsiseg-predict", "data.foo=1", "unknown option 'data.foo'"),
        ("wsiseg-predict", "data.patch_sise=256", "unknown option 'data.patch_sise'; did you mean data.patch_size?"),
        (
            "wsiseg-predict",
            "+resumee=true",
            "unknown option '+resumee': no part of wsiseg reads it; did you mean resume?",
        ),
        ("wsiseg-predict", "+data.foo=1", "unknown option '+data.foo'"),
        ("wsiseg-predict", "model=nonexistent", "Could not find 'model/nonexistent'; available: demo, "),
        ("wsiseg-predict", "data.slides=a,b", "Ambiguous value for argument 'data.slides=a,b'"),
        ("wsiseg-predict", "data.slides=[a", "cannot parse the override 'data.slides=[a': no viable alternative"),
        (
            "wsiseg-predict",
            "data.slides=/my slides/a.svs",
            "cannot parse the override 'slides/a.svs'",
        ),  # split by the shell
        ("wsiseg-eval", "eval.foo=1", "unknown option 'eval.foo'"),
        ("wsiseg-bench", "bench.foo=1", "unknown option 'bench.foo'"),
        ("wsiseg-export", "+export.foo=1", "unknown option '+export.foo': no part of wsiseg reads it"),
    ],
)
def test_hydra_refusals_are_one_line_exit_2_and_no_run_folder(
    command: str,
    override: str,
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Hydra's own errors (an unknown key or group, an unparsable value) used to print 3-13 lines and exit 1, the status
    of a failed slide, after making the run folder; a typo added with ``+`` was accepted silently."""
    from tests.helpers import run_main

    run_dir = tmp_path / "run"
    status, err = run_main([*override.split(" "), f"hydra.run.dir={run_dir}"], monkeypatch, capsys, command=command)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"{command}: error: {expected}"), lines[0]
    assert not run_dir.exists()


def test_lightning_options_can_be_added_to_the_trainer(tmp_path: Path) -> None:
    from wsiseg.cli import override_error

    assert override_error("predict", ["model=demo", "+trainer.limit_predict_batches=2"]) is None


def test_a_network_of_the_users_own_through_hydra_searchpath(tmp_path: Path, small_slide: Path) -> None:
    """README "Your own architecture": a module on PYTHONPATH, a two-line model/net YAML in a folder of the user's,
    ``hydra.searchpath`` pointing at it: the run completes; a misspelt option of that network is one line."""
    (tmp_path / "mynet.py").write_text(
        "import torch\n\n\nclass TinySeg(torch.nn.Module):\n    stride = 1\n\n"
        "    def __init__(self, channels: int = 8) -> None:\n        super().__init__()\n"
        "        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3, padding=1), torch.nn.ReLU(),\n"
        "                                        torch.nn.Conv2d(channels, 1, 1))\n\n"
        "    def forward(self, x):\n        return self.body(x)\n"
    )
    (tmp_path / "mynets" / "model" / "net").mkdir(parents=True)
    (tmp_path / "mynets" / "model" / "net" / "tinyseg.yaml").write_text("_target_: mynet.TinySeg\nchannels: 4\n")
    args = [
        str(SCRIPT),
        f"hydra.searchpath=[file://{tmp_path / 'mynets'}]",
        "model=unet_milesial",
        "model/net=tinyseg",
        "model.checkpoint=random",
        "model.activation=sigmoid",
        "model.channel_index=0",
        f"data.slides={small_slide}",
        *QUICK,
    ]
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([*args, f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "small" / "report.json").read_text())["status"] == "complete"
    typo = subprocess.run(
        [*args, "model.net.chanels=2", f"hydra.run.dir={tmp_path / 'typo'}"], capture_output=True, text=True, env=env
    )
    assert typo.returncode == 2 and typo.stderr.strip().splitlines() == [
        "wsiseg-predict: error: unknown option 'model.net.chanels'; did you mean model.net.channels?"
    ], typo.stderr
    assert not (tmp_path / "typo").exists()
