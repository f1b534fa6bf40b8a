"""Shared Prefect plumbing: hermetic defaults, retry policy, progress into flow logs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import get_run_logger

from wsireg_flow.errors import WsiregError
from wsireg_flow.progress import ProgressFn


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry unless the failure is a user error (bad input or config): those never heal."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, WsiregError)


def flow_progress(echo: ProgressFn | None) -> ProgressFn:
    """A progress reporter that logs ``stage: done/total`` to the flow log and echoes it."""

    def report(stage: str, done: int, total: int) -> None:
        if echo is not None:
            echo(stage, done, total)
        if done == total or done == 0:
            try:
                get_run_logger().info("%s: %d/%d", stage, done, total)
            except Exception:  # outside a run context (e.g. tile callbacks on other threads)
                pass

    return report


StageCallable = Callable[[], bool]
