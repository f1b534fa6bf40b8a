"""``register_stack`` flow: neighbour pairs as pair-stage tasks, then one warp task per section."""

from __future__ import annotations

import shutil
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import STAGE_TASK_OPTIONS, flow_progress
from flows.pair import pair_stage
from wsireg_flow.parallel import dask_scheduler
from wsireg_flow.pipeline import check_inputs, prepare_run_dir
from wsireg_flow.progress import ProgressFn
from wsireg_flow.stack import (
    PAIR_STAGES_FOR_STACK,
    StackJob,
    prepare_stack_dir,
    stack_report,
    warp_section,
)


@task(name="stack-section", task_run_name="warp-{k}", **STAGE_TASK_OPTIONS)
def section_task(job: StackJob, k: int, progress: ProgressFn) -> bool:
    return warp_section(job, k, progress)


@task(name="stack-report", cache_policy=NO_CACHE, persist_result=False)
def stack_report_task(job: StackJob) -> tuple[bool, dict[str, Any]]:
    return stack_report(job)


@flow(name="register-stack", validate_parameters=False, persist_result=False)
def register_stack(
    job: StackJob, overwrite: bool = False, echo: ProgressFn | None = None
) -> dict[str, Any]:
    """Register a stack of sections to its reference; returns stage counts and metrics."""
    job.validate()
    created = not job.run_dir.exists()
    prepare_stack_dir(job, overwrite)
    progress = flow_progress(echo)
    ran: dict[str, bool] = {}
    try:
        with dask_scheduler(job.cfg.dask) as scheduler:
            for k in range(len(job.sections)):
                if k == job.ref:
                    continue
                pj = job.pair_job(k)
                check_inputs(pj)
                prepare_run_dir(pj)
                for name in PAIR_STAGES_FOR_STACK:
                    ran[f"{pj.run_dir.name}/{name}"] = pair_stage(pj, name, scheduler, progress)
            for k in range(len(job.sections)):
                ran[f"section-{job.name(k)}"] = section_task(job, k, progress)
        ran["report"], metrics = stack_report_task(job)
    except BaseException:
        if created and not any(job.run_dir.rglob(".stages/*.json")):
            shutil.rmtree(job.run_dir, ignore_errors=True)
        raise
    return {"ran": ran, "metrics": metrics}
