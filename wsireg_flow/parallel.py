"""Run one Dask task per item on the configured scheduler, with progress.

``scheduler`` is ``"local"`` (the default: a ``distributed.LocalCluster`` sized to the machine,
started when the first tile task needs it), ``"threads"`` (Dask's threaded scheduler: no
process start-up or serialisation), ``"sync"`` (single-threaded, for debugging) or the address
of a running scheduler (``tcp://host:8786``), which is how dask-jobqueue, Kubernetes or any
other Dask cluster is used.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import dask

from wsireg_flow.config import DaskConfig
from wsireg_flow.errors import WsiregError
from wsireg_flow.progress import ProgressFn

T = TypeVar("T")
R = TypeVar("R")

LOCAL_SCHEDULERS = ("threads", "sync")
CONNECT_TIMEOUT_S = 30


class LocalClusterOnDemand:
    """A ``distributed.LocalCluster`` (and its Client) started on first use, not before.

    A run whose stages are all complete, or that only re-runs stages without tile work, never
    pays the cluster's start-up. Workers are processes with one thread each (``n_workers``,
    default: the machine's cores) and ``memory_limit`` each (``"auto"``: the machine's memory
    divided among the workers), on 127.0.0.1 without a dashboard.
    """

    def __init__(self, n_workers: int | None = None, memory_limit: str = "auto") -> None:
        self.n_workers = n_workers or os.cpu_count() or 1
        self.memory_limit = memory_limit
        self._cluster: Any = None
        self._client: Any = None

    @property
    def started(self) -> bool:
        return self._client is not None

    def client(self) -> Any:
        """The Client, starting the cluster on the first call."""
        if self._client is None:
            from distributed import Client, LocalCluster

            env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
                self._cluster = LocalCluster(
                    n_workers=self.n_workers,
                    threads_per_worker=1,
                    memory_limit=self.memory_limit,
                    dashboard_address=None,
                    host="127.0.0.1",
                    # the scheduler serves HTTP (health, metrics) even without a dashboard,
                    # on 8787 by default: a second run on the machine warned on stderr that the
                    # port was taken; any free port on 127.0.0.1 instead
                    scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                )
            self._client = Client(self._cluster)
            from wsireg_flow.worker_logging import OneLineWarnings

            self._client.register_plugin(OneLineWarnings())
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._cluster.close()
        self._client = self._cluster = None

    def __repr__(self) -> str:
        return f"LocalCluster({self.n_workers} workers, memory limit {self.memory_limit} each)"


def resolve_scheduler(scheduler: Any) -> Any:
    """A scheduler name or Client as Dask takes it; starts an on-demand cluster if needed."""
    if isinstance(scheduler, LocalClusterOnDemand):
        return scheduler.client()
    return scheduler


def describe_scheduler(scheduler: Any) -> str:
    """One line naming where tasks run, for run records and logs.

    A started cluster is described from its scheduler: workers, threads and each worker's
    memory limit in GB (e.g. ``"LocalCluster tcp://127.0.0.1:40123: 2 workers x 1 thread,
    memory limit 12.35 GB each"``).
    """
    if isinstance(scheduler, str):
        return f"dask {scheduler} scheduler"
    kind = "dask cluster"
    if isinstance(scheduler, LocalClusterOnDemand):
        if not scheduler.started:
            return f"{scheduler!r}, not started"
        kind, scheduler = "LocalCluster", scheduler.client()
    info = scheduler.scheduler_info()
    workers = list(info.get("workers", {}).values())
    threads = sorted({w.get("nthreads", 0) for w in workers})
    limits = sorted({round((w.get("memory_limit") or 0) / 1e9, 2) for w in workers})
    return (
        f"{kind} {info.get('address', '?')}: {len(workers)} workers x "
        f"{'/'.join(map(str, threads))} thread, memory limit "
        f"{'/'.join(map(str, limits))} GB each"
    )


@contextlib.contextmanager
def dask_scheduler(cfg: DaskConfig) -> Iterator[Any]:
    """Yield what :func:`map_tasks` takes: a scheduler name, a handle or a ``distributed.Client``.

    ``local`` (the default) yields a :class:`LocalClusterOnDemand`, closed on exit if it was
    started; ``threads``/``sync`` yield the name, with OpenCV's own thread pool limited to one
    thread (Dask's threads already use the cores); an address yields a Client of that cluster.
    """
    if cfg.scheduler in LOCAL_SCHEDULERS:
        import cv2

        before = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            yield cfg.scheduler
        finally:
            cv2.setNumThreads(before)
        return
    if cfg.scheduler == "local":
        handle = LocalClusterOnDemand(cfg.n_workers, cfg.memory_limit)
        try:
            yield handle
        finally:
            handle.close()
        return
    from distributed import Client

    check_dask_greeting(cfg.scheduler)
    try:
        client = Client(cfg.scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
    except OSError as exc:  # refused, unreachable or timed out
        raise WsiregError(
            f"no Dask scheduler answered within {CONNECT_TIMEOUT_S} s ({type(exc).__name__})",
            cfg.scheduler,
        ) from exc
    with client:
        yield client


GREETING_TIMEOUT_S = 10
MAX_GREETING_BYTES = 1 << 20


def check_dask_greeting(address: str, timeout: float = GREETING_TIMEOUT_S) -> None:
    """Refuse a ``tcp://`` address whose server does not greet like a Dask scheduler.

    A Dask server writes its handshake as soon as a connection opens: an 8-byte little-endian
    message size (tens of bytes), then the message. ``distributed.Client`` waits for ever on a
    server that says nothing (an HTTP server) and reads a text reply as a size of exabytes
    (MemoryError): this probe tells both apart from a scheduler within ``timeout`` seconds.
    Other schemes (``tls://``, ``ws://``...) are left to ``Client``.

    Raises
    ------
    WsiregError
        Naming the address: nobody answered, or what answered is not a Dask scheduler.
    """
    scheme, sep, rest = address.rpartition("://")
    if sep and scheme != "tcp":
        return
    host, _, port = rest.rpartition(":")
    try:
        conn = socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S)
    except (OSError, ValueError) as exc:  # refused, unreachable, timed out, bad host or port
        raise WsiregError(
            f"no Dask scheduler answered within {CONNECT_TIMEOUT_S} s ({type(exc).__name__})",
            address,
        ) from exc
    head = b""
    with conn:
        conn.settimeout(timeout)
        with contextlib.suppress(OSError):  # silence (timeout) or a reset: no greeting
            while len(head) < 8 and (chunk := conn.recv(8 - len(head))):
                head += chunk
    if len(head) < 8:
        raise WsiregError(
            f"answers but is not a Dask scheduler (no Dask greeting within {timeout:g} s)", address
        )
    if int.from_bytes(head, "little") > MAX_GREETING_BYTES:
        raise WsiregError(f"answers but is not a Dask scheduler (it sent {head!r})", address)


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
    scheduler = resolve_scheduler(scheduler)
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

    # args travel inside the tasks (not scattered): a lost worker's tasks can be re-run elsewhere.
    # Tile jobs carry their own crop of the coarser residual, so one level's graph is tens of MB
    # (bounded by the working level, not the slide): expected here, not worth a warning.
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "512MB"}):
        futures = scheduler.map(fn, items, *[[a] * len(items) for a in args], pure=False)
    done = 0
    if progress:
        progress(stage, 0, len(futures))
    for _ in as_completed(futures):
        done += 1
        if progress:
            progress(stage, done, len(futures))
    return scheduler.gather(futures)
