"""``anhir`` flow: every pair of an ANHIR table as a task, then the submission and the scores.

With a distributed Dask cluster (the default local cluster or an address) whole pairs run in
parallel on the workers (tile work inside each pair uses the worker's threads); with
``threads``/``sync`` pairs run one after another and their tiles use that scheduler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from benchmarks_anhir.run import (
    PairOutcome,
    collect_outcomes,
    load_dataset,
    no_pairs_message,
    register_one,
    write_outputs,
)
from flows.common import flow_progress
from wsireg_flow.config import Config
from wsireg_flow.errors import WsiregError
from wsireg_flow.landmarks import Pair
from wsireg_flow.parallel import dask_scheduler, resolve_scheduler
from wsireg_flow.progress import ProgressFn
from wsireg_flow.stages import run_dir_lock


@task(
    name="anhir-pair", task_run_name="pair-{p.index}", cache_policy=NO_CACHE, persist_result=False
)
def anhir_pair(
    p: Pair, root: Path, out: Path, cfg: Config, scheduler: Any, progress: ProgressFn
) -> PairOutcome:
    return register_one(p, root, out, cfg, scheduler, progress)


@flow(name="anhir", validate_parameters=False, persist_result=False)
def anhir_benchmark(
    root: Path,
    table: Path,
    out: Path,
    cfg: Config,
    status: str | None = None,
    limit: int | None = None,
    echo: ProgressFn | None = None,
) -> dict[str, Any]:
    """Register and score an ANHIR-layout dataset; returns summary.json's content."""
    pairs = load_dataset(root, table, status, limit)
    if not pairs:
        raise WsiregError(no_pairs_message(status), table)
    progress = flow_progress(echo)
    outcomes: dict[str, PairOutcome] = {}
    # one anhir run per folder (each pair's folder has its own lock)
    with run_dir_lock(out), dask_scheduler(cfg.dask) as handle:
        scheduler = resolve_scheduler(handle)
        if isinstance(scheduler, str):
            for k, p in enumerate(pairs):
                outcomes[p.index] = anhir_pair(p, root, out, cfg, scheduler, progress)
                progress("ANHIR pairs", k + 1, len(pairs))
        else:
            futures = {
                scheduler.submit(register_one, p, root, out, cfg, "threads", pure=False): p
                for p in pairs
            }
            outcomes = collect_outcomes(futures, progress)
        return write_outputs(out, root, pairs, outcomes)
