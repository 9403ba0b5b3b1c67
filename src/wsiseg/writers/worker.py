"""One background thread that runs submitted jobs in order, with a bounded queue, re-raising a job's error on the
submitting thread. The slide writer blends on one on GPUs, so the host blends while the device runs the next batch, and
finalises slides (pyramid, heatmap, contours) on another, so the next slide's tiles keep flowing meanwhile."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["OrderedWorker"]


class OrderedWorker:
    """Run ``job(*args)`` for each :meth:`submit` on one thread, in submission order.

    Args:
        job: what to run for each submitted item.
        max_pending: items that may wait (bounds the host memory they hold).
        name: the thread's name.
    """

    def __init__(self, job: Callable[..., None], max_pending: int = 4, name: str = "wsiseg-blend") -> None:
        self._job = job
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._job(*item)
                except BaseException as exc:  # re-raised on the submitting thread
                    self._error = exc

    def raise_error(self) -> None:
        """Re-raise the first error a job raised (once)."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, *args: Any) -> None:
        """Queue ``job(*args)``; raises an earlier job's error first. Blocks while ``max_pending`` items wait."""
        self.raise_error()
        self._queue.put(args)

    def close(self, timeout: float | None = None, error: BaseException | None = None) -> None:
        """Finish the queued jobs and stop the thread. With ``error`` (the run is failing) later jobs are skipped."""
        if error is not None and self._error is None:
            self._error = error
        self._queue.put(None)
        self._thread.join(timeout=timeout)
