"""Progress reporting for long stages, without global state.

A reporter is any callable ``report(stage: str, done: int, total: int)``. The CLI passes one that
prints to stderr; flows pass one that logs; library functions accept ``progress=None``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from dask.callbacks import Callback

ProgressFn = Callable[[str, int, int], None]


class StderrProgress:
    """Print ``stage: done/total`` lines to a stream at most every ``interval`` seconds."""

    def __init__(self, stream: TextIO | None = None, interval: float = 1.0) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self._last: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last.get(stage, 0.0) < self.interval:
            return
        self._last[stage] = now
        pct = 100.0 * done / total if total else 100.0
        print(f"  {stage}: {done}/{total} ({pct:.0f}%)", file=self.stream, flush=True)


class DaskProgress(Callback):
    """A dask local-scheduler callback that reports finished tasks of one compute call.

    Counts only tasks whose key name contains ``prefix`` (e.g. the store tasks), so the total
    is the number of output chunks rather than every internal task.
    """

    def __init__(self, report: ProgressFn, stage: str, prefix: str = "") -> None:
        super().__init__()
        self.report, self.stage, self.prefix = report, stage, prefix
        self.done = 0
        self.total = 0

    def _counts(self, key: Any) -> bool:
        name = key[0] if isinstance(key, tuple) else key
        return self.prefix in str(name)

    def _start_state(self, dsk: Any, state: Any) -> None:
        self.total = sum(1 for k in dsk if self._counts(k))
        self.report(self.stage, 0, self.total)

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if self._counts(key):
            self.done += 1
            self.report(self.stage, self.done, self.total)
