"""A pair registered on a real Dask cluster gives the same result as the threaded scheduler.

A ``dask scheduler`` and two ``dask worker`` processes (one thread each) are started with the
venv's ``dask`` command line, bound to 127.0.0.1 only; the tile tasks of the non-rigid stage run
on them through ``cfg.dask.scheduler = "tcp://127.0.0.1:PORT"``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dask_processes import dask_cluster, executed_tile_tasks, free_port, logs_tail, n_tiles

from wsireg_flow.config import SCHEDULER_ENV, Config
from wsireg_flow.field import load_field
from wsireg_flow.landmarks import read_landmarks
from wsireg_flow.parallel import LocalClusterOnDemand, dask_scheduler, describe_scheduler
from wsireg_flow.pipeline import PAIR_STAGES, PairJob, run_pair

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "data" / "anhir-sample" / "lung-lesion_3" / "scale-5pc"
TARGET = CASE / "29-041-Izd2-w35-CD31-3-les3.jpg"
SOURCE = CASE / "29-041-Izd2-w35-Cc10-5-les3.jpg"
N_WORKERS = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A scheduler and two single-thread workers on 127.0.0.1; yields address and a client."""
    from distributed import Client

    work = tmp_path_factory.mktemp("dask-cluster")
    with dask_cluster(work, N_WORKERS) as (address, _), Client(address, timeout="60s") as client:
        try:
            client.wait_for_workers(N_WORKERS, timeout=60)
        except TimeoutError:
            raise AssertionError(f"Dask workers did not connect:\n{logs_tail(work)}") from None
        yield {"address": address, "client": client}


def _run(out: Path, scheduler: str) -> dict[str, bool]:
    cfg = Config()
    cfg.dask.scheduler = scheduler
    job = PairJob(
        TARGET,
        SOURCE,
        out,
        cfg,
        target_landmarks=TARGET.with_suffix(".csv"),
        source_landmarks=SOURCE.with_suffix(".csv"),
    )
    with dask_scheduler(job.cfg.dask) as sched:
        if scheduler.startswith("tcp://"):
            assert not isinstance(sched, str)  # a distributed.Client, not a local scheduler
            assert sched.scheduler.address == scheduler
        return run_pair(job, scheduler=sched)


@pytest.fixture(scope="module")
def threaded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pair registered with Dask's threaded scheduler (the reference result)."""
    out = tmp_path_factory.mktemp("threaded") / "run"
    assert all(_run(out, "threads").values())
    return out


def _assert_same_result(run: Path, reference: Path) -> None:
    a = load_field(run / "transform" / "backward.zarr").data
    b = load_field(reference / "transform" / "backward.zarr").data
    assert a.shape == b.shape
    assert np.abs(b).max() > 1.0  # a real (non-identity) field
    print(f"backward field: max |run - threads| = {np.abs(a - b).max():.2e} px")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    for name in ("warped-source-landmarks.csv", "warped-target-landmarks.csv"):
        pa, pb = read_landmarks(run / name), read_landmarks(reference / name)
        assert pa.shape == pb.shape == (80, 2), name
        np.testing.assert_allclose(pa, pb, rtol=0, atol=1e-4, err_msg=name)


def test_default_is_a_local_cluster_sized_to_the_machine(threaded: Path, tmp_path: Path) -> None:
    """The CLI with no scheduler setting runs tiles on a LocalCluster: one single-thread worker
    per core, the machine's memory divided among them; same result as the threaded scheduler."""
    import psutil

    env = {k: v for k, v in os.environ.items() if k != SCHEDULER_ENV}
    out = tmp_path / "default"
    args = [
        sys.executable, "-m", "wsireg_flow.cli", "register", str(TARGET), str(SOURCE),
        "--out", str(out),
        "--target-landmarks", str(TARGET.with_suffix(".csv")),
        "--source-landmarks", str(SOURCE.with_suffix(".csv")),
    ]  # fmt: skip
    with contextlib.ExitStack() as held:
        # another local cluster on the machine holds Dask's default HTTP port: the run used to
        # warn "Port 8787 is already in use. Perhaps you already have a cluster running?"
        with contextlib.suppress(OSError):
            held.enter_context(socket.create_server(("127.0.0.1", 8787)))
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr[-3000:]  # no cluster chatter, no warnings
    record = json.loads((out / "nonrigid" / "levels.json").read_text())["scheduler"]
    print(f"\n{record}")
    n = os.cpu_count() or 1
    assert record.startswith("LocalCluster tcp://127.0.0.1:"), record
    assert f": {n} workers x 1 thread, memory limit " in record, record
    limit_gb = float(record.rsplit("memory limit ", 1)[1].split(" GB")[0])
    assert limit_gb == pytest.approx(psutil.virtual_memory().total / n / 1e9, rel=0.02)
    _assert_same_result(out, threaded)

    # a second run of the finished job starts no cluster (and re-runs nothing)
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "nonrigid" / "levels.json").read_text())["scheduler"] == record


def test_local_cluster_starts_only_when_tiles_need_it(threaded: Path) -> None:
    cfg = Config()
    cfg.dask.scheduler = "local"
    job = PairJob(TARGET, SOURCE, threaded, cfg, target_landmarks=TARGET.with_suffix(".csv"),
                  source_landmarks=SOURCE.with_suffix(".csv"))  # fmt: skip
    with dask_scheduler(cfg.dask) as handle:
        assert isinstance(handle, LocalClusterOnDemand) and not handle.started
        assert not any(run_pair(job, scheduler=handle).values())  # all complete: nothing ran
        assert not handle.started
        assert describe_scheduler(handle).endswith("not started")


def test_cluster_gives_the_threaded_result(
    cluster: dict[str, Any], threaded: Path, tmp_path: Path
) -> None:
    client = cluster["client"]
    assert len(client.scheduler_info()["workers"]) == N_WORKERS
    assert all(
        w["host"] == "127.0.0.1" and w["nthreads"] == 1
        for w in client.scheduler_info()["workers"].values()
    )
    before = executed_tile_tasks(client)
    assert sum(before.values()) == 0

    on_cluster = tmp_path / "cluster"
    t0 = time.perf_counter()
    assert all(_run(on_cluster, cluster["address"]).values())
    print(f"\npair on the cluster {time.perf_counter() - t0:.2f} s")

    # every tile task of the cluster run executed on the workers, and both workers took part
    executed = executed_tile_tasks(client)
    tiles = n_tiles(on_cluster)
    print(f"\ntile tasks per worker: {executed} ({tiles} tiles)")
    assert tiles >= 4
    assert sum(executed.values()) == tiles
    assert len(executed) == N_WORKERS and min(executed.values()) >= 1

    _assert_same_result(on_cluster, threaded)
    record = json.loads((on_cluster / "nonrigid" / "levels.json").read_text())["scheduler"]
    assert record.startswith(f"dask cluster {cluster['address']}: {N_WORKERS} workers x 1 thread")
    stages = json.loads((on_cluster / "metrics.json").read_text())["stage_seconds"]
    assert set(stages) >= set(PAIR_STAGES[:-2])


def test_unreachable_scheduler_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from wsireg_flow import parallel
    from wsireg_flow.errors import WsiregError

    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT_S", 2)
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = Config()
    cfg.dask.scheduler = address
    t0 = time.perf_counter()
    with pytest.raises(WsiregError) as exc, dask_scheduler(cfg.dask):
        pass
    assert str(exc.value).startswith(f"{address}: no Dask scheduler answered within 2 s")
    assert "\n" not in str(exc.value)
    assert time.perf_counter() - t0 < 20


@pytest.mark.parametrize(
    "reply", [b"", b"HTTP/1.0 400 Bad Request\r\n\r\n"], ids=["silent", "http"]
)
def test_a_server_that_is_not_a_dask_scheduler_is_a_one_line_error(reply: bytes) -> None:
    """An HTTP server at the address made Client wait for ever; another reply was read as a
    message size of exabytes (MemoryError, exit 1)."""
    import socket
    import threading

    from wsireg_flow import parallel
    from wsireg_flow.errors import WsiregError

    server = socket.create_server(("127.0.0.1", 0))
    address = f"tcp://127.0.0.1:{server.getsockname()[1]}"

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(reply)
            time.sleep(3)

    threading.Thread(target=serve, daemon=True).start()
    t0 = time.perf_counter()
    with server, pytest.raises(WsiregError) as exc:
        parallel.check_dask_greeting(address, timeout=1.0)
    assert str(exc.value).startswith(f"{address}: answers but is not a Dask scheduler")
    assert "\n" not in str(exc.value)
    assert time.perf_counter() - t0 < 10


def test_a_dask_scheduler_passes_the_greeting_check(cluster: dict[str, Any]) -> None:
    from wsireg_flow.parallel import check_dask_greeting

    check_dask_greeting(cluster["address"], timeout=5.0)  # raises when it is not one


def _stack(out: Path, scheduler: str) -> dict[str, Any]:
    from flows.stack import register_stack
    from wsireg_flow.stack import StackJob

    sections = sorted(CASE.glob("*.jpg"))[:3]  # CD31, Cc10, He: reference Cc10
    cfg = Config()
    cfg.dask.scheduler = scheduler
    return register_stack(
        StackJob(sections, out, cfg, landmarks=[p.with_suffix(".csv") for p in sections])
    )


def test_stack_runs_whole_pairs_and_warps_on_the_cluster(
    prefect_env: None, cluster: dict[str, Any], tmp_path: Path
) -> None:
    """On a cluster each neighbour pair, then each section warp, is one task on a worker (so
    reading, registering and writing spread over the cluster); the result is the threaded one."""
    from distributed import get_task_stream

    reference = _stack(tmp_path / "threads", "threads")
    with get_task_stream(cluster["client"]) as stream:
        result = _stack(tmp_path / "cluster", cluster["address"])
    keys = [t["key"] if isinstance(t["key"], str) else t["key"][0] for t in stream.data]
    names = sorted(k.split("-")[0] for k in keys)
    print(f"\nstack tasks on the cluster: {names}")
    assert names == ["run_pair"] * 2 + ["warp_section"] * 3
    assert {t["worker"] for t in stream.data} == set(cluster["client"].scheduler_info()["workers"])
    assert set(result["ran"]) == set(reference["ran"]) and all(result["ran"].values())
    for a, b in zip(result["metrics"]["sections"], reference["metrics"]["sections"], strict=True):
        assert a["section"] == b["section"]
        if not a["is_reference"]:
            assert a["median_rtre"] == pytest.approx(b["median_rtre"], abs=1e-6)
            assert a["median_rtre"] < 0.5 * a["initial_median_rtre"]


def test_stack_pair_failing_on_a_worker_is_one_line_and_keeps_finished_work(
    prefect_env: None, cluster: dict[str, Any], tmp_path: Path
) -> None:
    """A blank section passes the up-front checks (it is a readable image) and fails in its
    pair's preprocess stage on a worker: the error comes back as the same one line, and the
    other pair's finished stages keep their markers for a re-run."""
    import contextlib
    import io

    import cv2

    from wsireg_flow.cli import main
    from wsireg_flow.stack import PAIR_STAGES_FOR_STACK

    blank = tmp_path / "b-blank.png"
    cv2.imwrite(str(blank), np.full((660, 892, 3), 255, np.uint8))
    sections = [CASE / "29-041-Izd2-w35-CD31-3-les3.jpg", CASE / "29-041-Izd2-w35-Cc10-5-les3.jpg"]
    out = tmp_path / "stack"
    argv = ["stack", str(sections[0]), str(sections[1]), str(blank), "--reference", "1"]
    argv += ["--out", str(out), "--scheduler", cluster["address"], "--quiet"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    assert code == 2
    assert err.getvalue().strip().splitlines() == [
        f"wsireg-flow: error: {blank}: no tissue found in the source image"
    ]
    done = sorted(p.stem for p in (out / "pairs" / "00-onto-01" / ".stages").glob("*.json"))
    assert done == sorted(PAIR_STAGES_FOR_STACK)
    assert not (out / "metrics.json").exists()
