"""Run one Dask task per item on the configured scheduler, with progress.

``scheduler`` is ``"threads"`` (Dask's threaded scheduler, the default: no serialisation),
``"sync"`` (single-threaded, for debugging), ``"local"`` (a ``distributed.LocalCluster`` sized to
the machine) or the address of a running scheduler (``tcp://host:8786``), which is how
dask-jobqueue, Kubernetes or any other Dask cluster is used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import dask

from wsireg_flow.config import DaskConfig
from wsireg_flow.progress import ProgressFn

T = TypeVar("T")
R = TypeVar("R")

LOCAL_SCHEDULERS = ("threads", "sync")


@contextmanager
def dask_scheduler(cfg: DaskConfig) -> Iterator[Any]:
    """Yield what :func:`map_tasks` takes: a local scheduler name or a ``distributed.Client``.

    ``local`` starts (and afterwards closes) a LocalCluster with ``n_workers`` processes (default:
    the machine's cores), one thread each and ``memory_limit`` per worker; OpenCV/BLAS threads
    inside workers are limited to 1 to avoid oversubscription.
    """
    if cfg.scheduler in LOCAL_SCHEDULERS:
        # Dask's threads already use the cores: OpenCV's own pool inside each task would
        # oversubscribe them, so it is limited to one thread for the duration.
        import cv2

        before = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            yield cfg.scheduler
        finally:
            cv2.setNumThreads(before)
        return
    from distributed import Client, LocalCluster

    if cfg.scheduler == "local":
        n = cfg.n_workers or os.cpu_count() or 1
        env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with (
            dask.config.set({"distributed.nanny.pre-spawn-environ": env}),
            LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                memory_limit=cfg.memory_limit,
                dashboard_address=None,
                host="127.0.0.1",
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    with Client(cfg.scheduler, timeout="30s") as client:
        yield client


def map_tasks(
    fn: Callable[..., R],
    items: Sequence[T],
    *args: Any,
    scheduler: Any = "threads",
    progress: ProgressFn | None = None,
    stage: str = "tasks",
) -> list[R]:
    """``[fn(item, *args) for item in items]`` as one Dask task per item, results in order."""
    if not items:
        return []
    if isinstance(scheduler, str):
        from wsireg_flow.progress import DaskProgress

        tasks = [
            dask.delayed(fn, pure=False)(item, *args, dask_key_name=f"tile-{k}")
            for k, item in enumerate(items)
        ]
        if progress is None:
            return list(dask.compute(*tasks, scheduler=scheduler))
        with DaskProgress(progress, stage, prefix="tile-"):
            return list(dask.compute(*tasks, scheduler=scheduler))
    from distributed import as_completed

    # args travel inside the tasks (not scattered): a lost worker's tasks can be re-run elsewhere
    futures = scheduler.map(fn, items, *[[a] * len(items) for a in args], pure=False)
    done = 0
    if progress:
        progress(stage, 0, len(futures))
    for _ in as_completed(futures):
        done += 1
        if progress:
            progress(stage, done, len(futures))
    return scheduler.gather(futures)
