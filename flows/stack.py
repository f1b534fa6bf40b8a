"""``register_stack`` flow: neighbour pairs, then one warp per section, then the report.

With ``threads``/``sync`` (or when fewer than two pairs are left to do) pairs run as pair-stage
Prefect tasks (retried on transient errors) and sections as warp tasks, one after another,
their tiles on that scheduler. With a distributed scheduler (the default local cluster or an
address) whole pairs and then whole warps run as Dask tasks on the workers, in parallel.
"""

from __future__ import annotations

import shutil
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import STAGE_TASK_OPTIONS, flow_progress
from flows.pair import pair_stage
from wsireg_flow.parallel import dask_scheduler, resolve_scheduler
from wsireg_flow.pipeline import PairJob, check_inputs, prepare_run_dir, run_pair
from wsireg_flow.progress import ProgressFn
from wsireg_flow.stack import (
    PAIR_STAGES_FOR_STACK,
    StackJob,
    check_stack_dir,
    pairs_left,
    prepare_stack_dir,
    stack_report,
    warp_section,
)
from wsireg_flow.stages import run_dir_lock


@task(name="stack-section", task_run_name="warp-{k}", **STAGE_TASK_OPTIONS)
def section_task(job: StackJob, k: int, progress: ProgressFn) -> bool:
    return warp_section(job, k, progress)


@task(name="stack-report", cache_policy=NO_CACHE, persist_result=False)
def stack_report_task(job: StackJob) -> tuple[bool, dict[str, Any]]:
    return stack_report(job)


def _gather(
    client: Any, futures: dict[Any, str], stage: str, progress: ProgressFn
) -> dict[str, Any]:
    """Wait for every future, then raise the first failure (finished work keeps its markers)."""
    from distributed import as_completed

    progress(stage, 0, len(futures))
    for done, _ in enumerate(as_completed(list(futures)), start=1):
        progress(stage, done, len(futures))
    failed = [f for f in futures if f.status != "finished"]
    if failed:
        raise failed[0].exception()
    return dict(zip(futures.values(), client.gather(list(futures)), strict=True))


def on_cluster(
    job: StackJob, jobs: list[PairJob], client: Any, progress: ProgressFn
) -> dict[str, bool]:
    """Run whole neighbour pairs, then whole section warps, as tasks on a distributed cluster.

    Each pair (ingest, coarse, non-rigid, stitch) and each warp runs on one worker with its
    own threads, so a stack's reading, registering and writing all spread over the cluster
    (the workers need the run directory on a shared file system, as tile tasks do).
    """
    ran: dict[str, bool] = {}
    pairs = {
        client.submit(
            run_pair, pj, scheduler="threads", stages=PAIR_STAGES_FOR_STACK, pure=False
        ): pj.run_dir.name
        for pj in jobs
    }
    for name, stages in _gather(client, pairs, "stack pairs", progress).items():
        ran.update({f"{name}/{stage}": r for stage, r in stages.items()})
    warps = {
        client.submit(warp_section, job, k, pure=False): f"section-{job.name(k)}"
        for k in range(len(job.sections))
    }
    ran.update(_gather(client, warps, "stack sections", progress))
    return ran


@flow(name="register-stack", validate_parameters=False, persist_result=False)
def register_stack(
    job: StackJob, overwrite: bool = False, echo: ProgressFn | None = None
) -> dict[str, Any]:
    """Register a stack of sections to its reference; returns stage counts and metrics."""
    job.validate()
    check_stack_dir(job, overwrite)  # before the lock file is created in a folder it refuses
    created = not job.run_dir.exists()
    with run_dir_lock(job.run_dir):
        prepare_stack_dir(job, overwrite)
        try:
            return _run_stack(job, flow_progress(echo))
        except BaseException:
            if created and not any(job.run_dir.rglob(".stages/*.json")):
                shutil.rmtree(job.run_dir, ignore_errors=True)
            raise


def _run_stack(job: StackJob, progress: ProgressFn) -> dict[str, Any]:
    ran: dict[str, bool] = {}
    with dask_scheduler(job.cfg.dask) as scheduler:
        jobs = job.pair_jobs()
        for pj in jobs:
            check_inputs(pj)
            prepare_run_dir(pj)
        # one pair left to do gains nothing from a worker of its own: its tiles use them all
        if isinstance(scheduler, str) or len(pairs_left(job)) < 2:
            for pj in jobs:
                for name in PAIR_STAGES_FOR_STACK:
                    ran[f"{pj.run_dir.name}/{name}"] = pair_stage(pj, name, scheduler, progress)
            for k in range(len(job.sections)):
                ran[f"section-{job.name(k)}"] = section_task(job, k, progress)
        else:
            ran.update(on_cluster(job, jobs, resolve_scheduler(scheduler), progress))
    ran["report"], metrics = stack_report_task(job)
    return {"ran": ran, "metrics": metrics}
