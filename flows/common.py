"""Shared Prefect plumbing: hermetic defaults, retry policy, progress into flow logs."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE

from wsireg_flow.errors import WsiregError, output_error
from wsireg_flow.progress import ProgressFn


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry unless the failure is a user error (bad input or config) or an output that
    cannot be written (disk full, read-only, no permission): those never heal by retrying."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, WsiregError) and output_error(exc) is None


# Options of every stage-like task: retry transient failures twice, user errors never; no
# Prefect caching or result persistence (stages keep their own completion markers).
STAGE_TASK_OPTIONS: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": 1,
    "retry_condition_fn": transient_only,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}


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
