"""Microns per pixel declared by the user for slides whose metadata lacks it or is wrong (``data.slide_mpp``): one
number for every slide, or a CSV of ``slide,mpp`` rows.

A CSV row's ``slide`` matches a slide by its path (as given or resolved), its file name (``a.svs``) or its output
folder name (``a``). Values are level-0 µm per px.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from wsiseg.errors import UserInputError

__all__ = ["declared_mpps"]


def _positive(value: object, where: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0:
        raise UserInputError(f"{where}: '{value}' is not a positive number of microns per pixel")
    return number


def declared_mpps(option: float | int | str | None) -> Callable[[Path, str], float | None]:
    """``data.slide_mpp`` as a lookup ``(slide path, output name) -> level-0 µm/px or None`` (None: use the slide's
    metadata).

    Raises:
        UserInputError: a non-positive number, a CSV that is missing, lacks the ``slide``/``mpp`` columns, or holds a
            value that is not a positive number (naming the row).
    """
    if option is None or option == "":
        return lambda path, name: None
    if isinstance(option, (int, float)) and not isinstance(option, bool):
        every = _positive(option, "data.slide_mpp")
        return lambda path, name: every
    text = str(option)
    try:
        return declared_mpps(float(text))
    except ValueError:
        pass
    table = Path(text).expanduser()
    if not table.is_file():
        raise UserInputError(
            f"data.slide_mpp '{text}' is neither a number nor an existing CSV file (columns slide,mpp)"
        )
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"slide", "mpp"} <= set(rows[0]):
        raise UserInputError(f"data.slide_mpp '{table}': expected a CSV with a header row 'slide,mpp'")
    by_key: dict[str, float] = {}
    for number, row in enumerate(rows, start=2):
        by_key[str(row["slide"]).strip()] = _positive(row["mpp"], f"data.slide_mpp '{table}' line {number}")

    def lookup(path: Path, name: str) -> float | None:
        for key in (str(path), str(path.resolve()), path.name, name):
            if key in by_key:
                return by_key[key]
        return None

    return lookup
