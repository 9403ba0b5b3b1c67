"""``model.runtime=openvino_int8``: calibrated on the run's tiles with real NNCF and OpenVINO, cached, checked, and
FP32 under the floor."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.helpers import FAST, predict, run_main
from wsiseg.head import dice
from wsiseg.pipeline.int8 import Int8Options, spread_indices

pytest.importorskip("nncf")


def test_spread_indices_take_every_slide_in_turn() -> None:
    counts = [5, 0, 3, 100]
    picked = spread_indices(counts, 9, seed=1)
    assert len(set(picked)) == 9 and picked == spread_indices(counts, 9, seed=1)
    slides = np.searchsorted(np.cumsum(counts), picked, side="right")
    assert sorted(set(slides.tolist())) == [0, 2, 3]  # every slide with tiles, the empty one never
    assert np.bincount(slides, minlength=4).tolist() == [3, 0, 3, 3]
    assert sorted(spread_indices([2, 1], 10, seed=0)) == [0, 1, 2]  # fewer when there are fewer
    assert spread_indices(counts, 9, seed=2) != picked


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"calibration_tiles": 0}, "calibration_tiles"),
        ({"check_tiles": -1}, "check_tiles"),
        ({"dice_floor": 2}, "dice_floor"),
    ],
)
def test_bad_int8_options_name_the_key(options: dict, key: str) -> None:
    from wsiseg.errors import UserInputError

    with pytest.raises(UserInputError, match=f"model.int8.{key}"):
        Int8Options(**options)


def _report(run: Path) -> dict:
    return json.loads((run / "synth" / "report.json").read_text())


def test_int8_runs_caches_and_falls_back_to_fp32_under_the_floor(
    tmp_path: Path, synthetic_slide: Path, demo_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    common = [
        f"model.checkpoint={demo_checkpoint}",
        "model=demo",
        "data.patch_size=128",
        "writer.output_downsample=4",
        "model.int8.calibration_tiles=16",
        "model.int8.check_tiles=16",
        f"model.int8.cache_dir={tmp_path / 'cache'}",
    ]
    int8 = [*common, "model.runtime=openvino_int8"]
    assert predict(synthetic_slide, tmp_path / "first", int8) == 0
    first = _report(tmp_path / "first")["provenance"]["int8"]
    assert first["runtime"] == "openvino_int8" and first["calibrated"] is True
    assert first["calibration_tiles"] == 16 and first["check_tiles"] == 16
    assert 0.99 <= first["dice"] < 1.0, first  # close to FP32, not bit-identical (it is INT8)
    ir = Path(first["ir"])
    assert ir.parent == tmp_path / "cache" and ir.is_file() and ir.with_suffix(".bin").is_file()
    made = ir.stat().st_mtime_ns

    # the whole mask against OpenVINO FP32's: the quality target (Dice >= 0.99 at the threshold)
    assert predict(synthetic_slide, tmp_path / "fp32", [*common, "model.runtime=openvino"]) == 0
    masks = [tifffile.imread(tmp_path / run / "synth" / "mask.tif", level=0) >= 128 for run in ("first", "fp32")]
    assert dice(masks[0], masks[1]) >= 0.99, dice(masks[0], masks[1])
    assert _report(tmp_path / "first")["config_hash"] != _report(tmp_path / "fp32")["config_hash"]

    # the same cache, a floor its Dice on the same check tiles cannot reach: no calibration, FP32
    with caplog.at_level(logging.WARNING, logger="wsiseg.pipeline.int8"):
        assert predict(synthetic_slide, tmp_path / "floor", [*int8, "model.int8.dice_floor=1.0"]) == 0
    floor = _report(tmp_path / "floor")["provenance"]["int8"]
    assert floor["calibrated"] is False and ir.stat().st_mtime_ns == made
    assert floor["dice"] == first["dice"] and floor["runtime"] == "openvino"
    assert any("under model.int8.dice_floor=1.0" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    fp32_mask = tifffile.imread(tmp_path / "fp32" / "synth" / "mask.tif", level=0)
    assert np.array_equal(tifffile.imread(tmp_path / "floor" / "synth" / "mask.tif", level=0), fp32_mask)


def test_int8_refusals_are_one_line(
    tmp_path: Path, synthetic_slide: Path, demo_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    argv = [
        *FAST,
        f"data.slides={synthetic_slide}",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"model.checkpoint={demo_checkpoint}",
        "model=demo",
        "data.patch_size=256",
        "model.runtime=openvino_int8",
    ]
    status, err = run_main([*argv, "model.int8.calibration_tiles=5000"], monkeypatch, capsys)
    assert status == 2 and "model.runtime=openvino_int8 needs 5032 tissue tiles" in err and "Traceback" not in err
    status, err = run_main([*argv, "model.int8.check_tiles=0"], monkeypatch, capsys)
    assert status == 2 and "model.int8.check_tiles must be >= 1" in err
