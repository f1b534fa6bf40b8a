"""A real Dask cluster for tests: a ``dask scheduler`` and ``dask worker`` processes.

Started with the venv's ``dask`` command line, bound to 127.0.0.1, each process in its own
process group (so teardown, or a test killing a worker, reaches the nanny's child too).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DASK = Path(sys.executable).parent / "dask"
TILE_TASK = "register_tile"  # key prefix of the non-rigid tile tasks (client.map of the fn)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a process started here and its children (its own process group)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@contextlib.contextmanager
def dask_cluster(
    work: Path, n_workers: int = 2
) -> Iterator[tuple[str, dict[str, subprocess.Popen[bytes]]]]:
    """A scheduler and single-thread workers named w0, w1 ... on 127.0.0.1.

    Yields the scheduler address and the processes by name (``"scheduler"``, ``"w0"`` ...);
    each writes ``work/<name>.log``.
    """
    address = f"tcp://127.0.0.1:{free_port()}"
    threads = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env = {**os.environ, **threads}
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, args: list[str]) -> None:
        with open(work / f"{name}.log", "wb") as fh:
            procs[name] = subprocess.Popen(
                [str(DASK), *args],
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=work,
                env=env,
                start_new_session=True,
            )

    try:
        port = address.rsplit(":", 1)[1]
        start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"])
        for i in range(n_workers):
            name = f"w{i}"
            start(
                name,
                ["worker", address, "--nthreads", "1", "--nworkers", "1", "--memory-limit", "2GB",
                 "--no-dashboard", "--host", "127.0.0.1", "--name", name,
                 "--local-directory", str(work / name)],
            )  # fmt: skip
        yield address, procs
    finally:
        for name in sorted(procs, reverse=True):  # workers, then the scheduler
            stop(procs[name])


def logs_tail(work: Path, chars: int = 2000) -> str:
    """The end of every process log under ``work`` (for a failure message)."""
    return "\n".join(f"== {p.name}\n{p.read_text()[-chars:]}" for p in sorted(work.glob("*.log")))


def executed_tile_tasks(client: Any) -> dict[str, int]:
    """Worker address -> number of distinct tile tasks it executed (from its state log)."""

    def count(dask_worker: Any) -> int:
        return len(
            {
                e[0]
                for e in dask_worker.state.log
                if len(e) >= 3
                and e[1] == "executing"
                and e[2] == "memory"
                and str(e[0]).startswith(TILE_TASK)
            }
        )

    return client.run(count)


def n_tiles(run_dir: Path) -> int:
    """Tiles registered over every level of a pair run (from its level reports)."""
    levels = json.loads((run_dir / "nonrigid" / "levels.json").read_text())["levels"]
    final = json.loads((run_dir / "stitch.json").read_text())["level"]
    return sum(level["tiles"] for level in [*levels, final])
