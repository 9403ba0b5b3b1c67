"""The one assembler of a prediction run (:func:`run`) and what it gives back (:class:`RunResult`).

``run`` is imported on first use: ``RunResult`` alone loads no deep-learning library.
"""

from __future__ import annotations

from typing import Any

from wsiseg.pipeline.result import RunResult

__all__ = ["RunResult", "run"]


def __getattr__(name: str) -> Any:
    if name == "run":
        from wsiseg.pipeline.assemble import run

        return run
    raise AttributeError(f"module 'wsiseg.pipeline' has no attribute '{name}'")
