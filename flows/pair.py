"""``register_pair`` flow: one Prefect task per stage of the pair job.

Stages skip themselves when their completion marker matches the current fingerprint (see
:mod:`wsireg_flow.stages`), so re-running a finished job does no work and a changed setting
re-runs only the stages downstream of it. Tasks retry transient failures twice; user errors
(bad input or config) fail at once.
"""

from __future__ import annotations

import shutil
from typing import Any

from prefect import flow, get_run_logger, task

from flows.common import STAGE_TASK_OPTIONS, flow_progress
from wsireg_flow.parallel import dask_scheduler, describe_scheduler
from wsireg_flow.pipeline import (
    PAIR_STAGES,
    PairJob,
    check_inputs,
    check_run_dir,
    prepare_run_dir,
    run_pair_stage,
)
from wsireg_flow.progress import ProgressFn
from wsireg_flow.stages import run_dir_lock


@task(name="pair-stage", task_run_name="{name}", **STAGE_TASK_OPTIONS)
def pair_stage(job: PairJob, name: str, scheduler: Any, progress: ProgressFn) -> bool:
    """Run stage ``name`` of ``job`` unless complete; True when it ran."""
    ran = run_pair_stage(job, name, scheduler, progress)
    if ran and name == "nonrigid":
        get_run_logger().info("tiles ran on %s", describe_scheduler(scheduler))
    return ran


def run_stages(
    job: PairJob, scheduler: Any, progress: ProgressFn, stages: tuple[str, ...] = PAIR_STAGES
) -> dict[str, bool]:
    """Run ``stages`` of ``job`` as tasks, in order (inside a flow)."""
    return {name: pair_stage(job, name, scheduler, progress) for name in stages}


@flow(name="register-pair", validate_parameters=False, persist_result=False)
def register_pair(
    job: PairJob,
    overwrite: bool = False,
    echo: ProgressFn | None = None,
) -> dict[str, bool]:
    """Register a pair; returns {stage: ran}. The Dask cluster comes from ``job.cfg.dask``."""
    check_inputs(job)
    check_run_dir(job, overwrite)  # before the lock file is created in a folder it refuses
    created = not job.run_dir.exists()
    with run_dir_lock(job.run_dir):
        prepare_run_dir(job, overwrite)
        try:
            with dask_scheduler(job.cfg.dask) as scheduler:
                return run_stages(job, scheduler, flow_progress(echo))
        except BaseException:
            # nothing completed in a directory this run created: leave nothing behind
            if created and not any((job.run_dir / ".stages").glob("*.json")):
                shutil.rmtree(job.run_dir, ignore_errors=True)
            raise
