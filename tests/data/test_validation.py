"""The data options both modes share are refused by one check, with the same message in slide and patch mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from wsiseg.data.datamodule import SlideTileDataModule
from wsiseg.data.patches import PatchFolderDataModule
from wsiseg.data.validation import check_data_options, check_stride
from wsiseg.errors import UserInputError

GOOD = {"patch_size": 256, "overlap": 0, "num_workers": 0, "prefetch_factor": 2}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"patch_size": 0}, "data.patch_size must be a positive integer, got 0"),
        ({"patch_size": 9000}, "data.patch_size=9000 is larger than 8192 px"),
        ({"overlap": 256}, "data.overlap must satisfy 0 <= overlap < patch_size (256), got 256"),
        ({"overlap": -1}, "data.overlap must satisfy 0 <= overlap < patch_size (256), got -1"),
        ({"num_workers": -1}, "data.num_workers must be >= 0 (0 reads in the main process), got -1"),
        ({"prefetch_factor": 0}, "data.prefetch_factor must be >= 1 (batches read ahead per worker), got 0"),
    ],
)
def test_both_data_modules_refuse_a_shared_option_alike(bad: dict[str, Any], message: str, tmp_path: Path) -> None:
    options = {**GOOD, **bad}
    messages = []
    for build in (
        lambda: check_data_options(**options),
        lambda: SlideTileDataModule(str(tmp_path / "x.svs"), **options),
        lambda: PatchFolderDataModule(tmp_path, **options),
    ):
        with pytest.raises(UserInputError) as info:
            build()
        messages.append(str(info.value))
    assert messages[0].startswith(message)
    assert messages == [messages[0]] * 3


def test_null_workers_are_left_to_the_default() -> None:
    check_data_options(256, 32, None, 1)


def test_stride_check_names_the_option_and_a_size_that_fits(tmp_path: Path) -> None:
    check_stride(256, 16)
    with pytest.raises(UserInputError) as info:
        check_stride(200, 16)
    assert str(info.value) == "data.patch_size=200 is not a multiple of the network's stride 16: use e.g. 192"
    with pytest.raises(UserInputError, match="use e.g. 32$"):
        check_stride(20, 32)
    (tmp_path / "p.png").write_bytes(b"")
    with pytest.raises(UserInputError) as info:
        PatchFolderDataModule(tmp_path, patch_size=200).plan_run(16)
    assert str(info.value) == "data.patch_size=200 is not a multiple of the network's stride 16: use e.g. 192"
