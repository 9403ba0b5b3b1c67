"""``wsiseg-synth``'s bad arguments are one line naming the option, exit status 2, no traceback and no file."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsiseg.data.synthetic import main


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--width", "0"], "--width must be at least 64 px, got 0"),
        (["--height", "-5"], "--height must be at least 64 px, got -5"),
        (["--tissue-blobs", "0"], "--tissue-blobs must be at least 1"),
        (["--tissue-scale", "0"], "--tissue-scale must be in (0, 1]"),
    ],
)
def test_bad_arguments_are_one_line(
    args: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "s.tif"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and err[0].startswith(f"wsiseg-synth: error: {expected}"), err
    assert not (tmp_path / "s.tif").exists()


def test_a_folder_or_a_file_in_the_way_as_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a_file").write_text("x")
    for path, expected in ((tmp_path, "is a folder"), (tmp_path / "a_file" / "s.tif", "cannot write")):
        with pytest.raises(SystemExit) as stopped:
            main([str(path), "--width", "128", "--height", "128"])
        assert stopped.value.code == 2 and expected in capsys.readouterr().err


def test_the_folder_is_made(tmp_path: Path) -> None:
    main([str(tmp_path / "new" / "deeper" / "s.tif"), "--width", "128", "--height", "128"])
    assert (tmp_path / "new" / "deeper" / "s.tif").is_file()
