"""Operating the pipeline: interrupting and resuming runs, two runs on one directory, leftovers
of interrupted writes, changed settings, output paths that cannot be written.

The signal tests run the command line in its own process session, as a terminal does, and
send Ctrl-C or SIGTERM to the whole process group (as a terminal, `timeout` or `kill -- -PGID`
do) or SIGTERM to the command alone. The temporary Prefect server runs in a session of its own,
so the tests follow the command's descendants, not only its session.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from wsireg_flow.cli import main
from wsireg_flow.config import Config
from wsireg_flow.errors import WsiregError
from wsireg_flow.pipeline import PairJob, prepare_run_dir, run_pair
from wsireg_flow.stages import (
    LOCK_NAME,
    is_complete,
    is_partial,
    read_record,
    run_dir_lock,
    temp_sibling,
)
from wsireg_flow.watchdog import descendants, remember, signal_alive, start_time

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "data" / "anhir-sample" / "lung-lesion_3" / "scale-5pc"
TARGET = CASE / "29-041-Izd2-w35-CD31-3-les3.jpg"
SOURCE = CASE / "29-041-Izd2-w35-He-les3.jpg"


def _register_cmd(
    out: Path, target: Path = TARGET, source: Path = SOURCE, scheduler: str = "threads"
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "wsireg_flow.cli",
        "register",
        str(target),
        str(source),
        "--out",
        str(out),
        "--scheduler",
        scheduler,
        "--quiet",
    ]


def _alive_in_session(sid: int) -> list[str]:
    """Processes of session ``sid`` that are still running (zombies are dead already)."""
    ps = subprocess.run(
        ["ps", "-o", "stat=,args=", "-s", str(sid)], capture_output=True, text=True, check=False
    )
    return [line for line in ps.stdout.splitlines() if line.strip() and line.split()[0][0] != "Z"]


def _running(known: dict[int, int]) -> list[str]:
    """Command lines of the processes of ``known`` (pid -> start time) still running."""
    alive = []
    for pid, started in known.items():
        if start_time(pid) == started:
            ps = subprocess.run(
                ["ps", "-o", "stat=,args=", "-p", str(pid)], capture_output=True, text=True
            )
            if ps.stdout.strip() and ps.stdout.split()[0][0] != "Z":
                alive.append(ps.stdout.strip())
    return alive


def _interrupt(
    out: Path, how: str, scheduler: str = "threads", after: str = "ingest", wait: float = 1.0
) -> tuple[int, str, float, list[str]]:
    """Start ``register`` into ``out``, signal it ``wait`` s after ``out / after`` appears;
    returns the exit status, stderr, seconds from signal to exit, and what still ran in its
    session or of its descendants at the signal (killed afterwards, so that a failing test
    leaves nothing behind)."""
    log = out.parent / f"{out.name}-stderr.txt"
    with open(log, "w") as err_file:
        p = subprocess.Popen(
            _register_cmd(out, scheduler=scheduler),
            stdout=subprocess.DEVNULL,  # not a pipe: orphans holding it would hang the reader
            stderr=err_file,
            start_new_session=True,
            cwd=ROOT,
        )
    children: dict[int, int] = {}
    try:
        t0 = time.monotonic()
        while not (out / after).exists() and time.monotonic() - t0 < 120:
            time.sleep(0.1)
        assert (out / after).exists(), f"the run never wrote {after}"
        time.sleep(wait)
        children = remember({}, descendants(p.pid))
        sent = time.monotonic()
        if how == "ctrl-c":
            os.killpg(p.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
        elif how == "group-term":
            os.killpg(p.pid, signal.SIGTERM)  # `timeout`, `kill -- -PGID`: the whole group
        elif how == "group-kill":
            os.killpg(p.pid, signal.SIGKILL)  # `timeout -s KILL`, `kill -9 -- -PGID`
        elif how == "group-hup":
            os.killpg(p.pid, signal.SIGHUP)  # the terminal closed
        elif how == "service-term":  # systemd's default KillMode, Slurm: every process
            os.killpg(p.pid, signal.SIGTERM)
            signal_alive(children, signal.SIGTERM)
        elif how == "timeout":  # GNU timeout: the command, then its whole group
            os.kill(p.pid, signal.SIGTERM)
            os.killpg(p.pid, signal.SIGTERM)
        elif how == "term":
            os.kill(p.pid, signal.SIGTERM)  # a scheduler or `kill`: the command only
        else:
            os.kill(p.pid, signal.SIGKILL)  # `kill -9`, the out-of-memory killer: no handler
        p.wait(timeout=120)
        took = time.monotonic() - sent
        # SIGKILL: the watchdog notices within its poll interval, then terminates the children;
        # the Prefect server stops once it sees the command gone, then shuts down (about 1 s
        # idle; a full suite on 2 cores once took it past 5 s)
        settle = time.monotonic() + 15.0
        while True:
            time.sleep(0.5)
            alive = sorted(set(_alive_in_session(p.pid)) | set(_running(children)))
            if not alive or time.monotonic() > settle:
                return p.returncode, log.read_text(), took, alive
    finally:
        with contextlib.suppress(OSError):
            os.killpg(p.pid, signal.SIGKILL)
        signal_alive(children, signal.SIGKILL)


def test_ctrl_c_stops_at_once_and_the_same_command_resumes(tmp_path: Path) -> None:
    """Ctrl-C also kills the temporary Prefect server (same process group): the client used
    to retry it for about 70 s and end with a ConnectError, exit 1."""
    out = tmp_path / "run"
    code, err, took, alive = _interrupt(out, "ctrl-c")
    print(f"\nCtrl-C: exit {code} after {took:.1f} s: {err.strip()}")
    assert code == 130 and took < 10
    assert err.strip().splitlines() == [
        "wsireg-flow: interrupted (run the same command again to resume)"
    ]
    assert alive == []
    # the same job typed with relative paths, from the repository: resumed, not refused
    rel = _register_cmd(out, TARGET.relative_to(ROOT), SOURCE.relative_to(ROOT))
    r = subprocess.run(rel, capture_output=True, text=True, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert "ingest_target" not in summary["stages_run"] and "qc" in summary["stages_run"]
    assert not [p for p in out.rglob(".*") if is_partial(p.name)]


def test_ctrl_c_during_a_local_cluster_run_is_one_line(tmp_path: Path) -> None:
    """With the tiles on a local cluster, multiprocessing's resource tracker added a warning
    about 14 'leaked semaphore objects' (two more lines) under the one-line message."""
    code, err, took, alive = _interrupt(tmp_path / "run", "ctrl-c", "local", "coarse.json", 4.0)
    assert code == 130 and took < 15
    assert err.strip().splitlines() == [
        "wsireg-flow: interrupted (run the same command again to resume)"
    ]
    assert alive == []


def test_sigterm_stops_the_command_and_its_prefect_server(tmp_path: Path) -> None:
    """SIGTERM used to kill the command silently (exit 143) and leave the temporary Prefect
    server running as an orphan (about 230 MB, indefinitely)."""
    code, err, took, alive = _interrupt(tmp_path / "run", "term")
    print(f"\nSIGTERM: exit {code} after {took:.1f} s, still running: {alive}")
    assert code == 143 and took < 10
    assert "interrupted" in err
    assert alive == []


@pytest.mark.parametrize("how", ["group-term", "service-term", "timeout"])
def test_sigterm_to_the_process_group_stops_at_once(tmp_path: Path, how: str) -> None:
    """A SIGTERM to the whole group (`timeout`, `kill -- -PGID`) or to every process of the
    service (systemd, Slurm) used to stop the temporary Prefect server with the command;
    Prefect's flow-run handler then retried reporting the crash to it for about 70 s and the
    command ended with a ConnectError, exit 1. The server now runs in a session of its own and
    holds a SIGTERM back until the command has exited: the command exits 143 at once. GNU
    `timeout` signals the command and then its group: the line was printed twice."""
    out = tmp_path / "run"
    code, err, took, alive = _interrupt(out, how, after="coarse.json", wait=0.5)
    print(f"\n{how}: exit {code} after {took:.1f} s, still running: {alive}")
    assert code == 143 and took < 10
    assert err.strip().splitlines() == [
        "wsireg-flow: interrupted (run the same command again to resume)"
    ]
    assert alive == []
    r = subprocess.run(_register_cmd(out), capture_output=True, text=True, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr
    assert "coarse" not in json.loads(r.stdout.strip().splitlines()[-1])["stages_run"]


def test_a_worker_ended_by_a_stop_signal_is_restarted_without_a_notice() -> None:
    """A group SIGTERM during a local-cluster run printed Dask's "Restarting worker" twice
    under the one-line interrupt message (1 run in 3): the nanny saw its worker die before the
    command's own handler ran. On a real local cluster, a worker ended by SIGTERM restarts
    silently under the CLI's filter; one killed outright (a crash) is still reported."""
    import logging

    from distributed import Client, LocalCluster

    from wsireg_flow.cli import WorkerRestartNotices

    nanny = logging.getLogger("distributed.nanny")
    notices, said = WorkerRestartNotices(), []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    level = nanny.level
    nanny.setLevel(logging.INFO)
    nanny.addFilter(notices)
    nanny.addHandler(handler)
    try:
        with (
            LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                (pid,) = client.run(os.getpid).values()
                os.kill(pid, sig)
                t0 = time.monotonic()
                while time.monotonic() - t0 < 60:  # until the new worker has joined
                    time.sleep(0.2)
                    if [p for p in client.run(os.getpid).values() if p != pid]:
                        break
                else:
                    raise AssertionError("the worker was not restarted")
                if sig == signal.SIGTERM:
                    assert said == [], said
    finally:
        nanny.removeHandler(handler)
        nanny.removeFilter(notices)
        nanny.setLevel(level)
    assert [m for m in said if m.startswith("Restarting worker")] != [], said


def _record(level: int, message: str, name: str = "distributed.nanny") -> Any:
    import logging

    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_a_crash_after_a_stop_is_still_reported() -> None:
    """A death by a stop signal whose restart never came (a nanny closing) left a notice due,
    and the next crash's "Restarting worker" was hidden with it."""
    import logging

    from wsireg_flow.cli import WorkerRestartNotices

    notices = WorkerRestartNotices()
    shown = [
        notices.filter(_record(level, message))
        for level, message in (
            (logging.INFO, "Worker process 11 was killed by signal 15"),
            (logging.WARNING, "Restarting worker (status=Status.running)"),  # hidden
            (logging.INFO, "Worker process 12 was killed by signal 2"),  # no restart follows
            (logging.INFO, "Worker process 13 exited with status 1"),  # a crash
            (logging.WARNING, "Restarting worker (status=Status.running)"),  # shown
            (logging.INFO, "Worker process 14 was killed by signal 9"),  # SIGKILL: a crash
            (logging.WARNING, "Restarting worker (status=Status.running)"),  # shown
            (logging.WARNING, "Worker exceeded 95% memory budget"),  # anything else: shown
        )
    ]
    assert shown == [False, False, False, False, True, False, True, True]


def test_warnings_are_one_line_unless_debugging() -> None:
    import logging
    import sys

    from wsireg_flow.errors import OneLineFormatter

    try:
        raise ValueError("bad value\nsecond line")
    except ValueError:
        record = _record(logging.WARNING, "could not\nrestart", "distributed.nanny")
        record.exc_info = sys.exc_info()
    line = OneLineFormatter().format(record)
    assert line == (
        "wsireg-flow: warning: distributed.nanny: could not restart (ValueError: bad value)"
    )
    ours = _record(logging.WARNING, "a note", "wsireg_flow.pipeline")
    assert OneLineFormatter().format(ours) == "wsireg-flow: warning: a note"
    debug = OneLineFormatter(debug=True).format(record).splitlines()
    assert debug[:2] == ["wsireg-flow: warning: distributed.nanny: could not", "restart"]
    assert debug[2] == "Traceback (most recent call last):" and debug[-2] == "ValueError: bad value"


_SERVER_PROBE = """
import json, os
from prefect import flow
from prefect.client.orchestration import get_client
from flows.server import healthy, prefect_api
from wsireg_flow.watchdog import descendants, start_time

@flow
def one() -> int:
    return 1

with prefect_api() as url:
    kids = {pid: start_time(pid) for pid in descendants(os.getpid())}
    one()
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    during = {
        "healthy": healthy(url),
        "server_sessions": [os.getsid(pid) for pid in kids],
        "own_session": os.getsid(0),
        "env": os.environ.get("PREFECT_API_URL"),
        "runs": [r.state.type.value for r in runs],
        "children_after_flow": len(descendants(os.getpid())),
        # a server writing to the command's pipes kept `out=$(wsireg-flow ...)` waiting
        "shares_output": [
            os.readlink(f"/proc/{pid}/fd/{fd}") == os.readlink(f"/proc/self/fd/{fd}")
            for pid in kids
            for fd in (1, 2)
        ],
    }
left = [pid for pid, started in kids.items() if start_time(pid) == started]
print(json.dumps({"url": url, **during, "after_env": os.environ.get("PREFECT_API_URL"),
                  "after_healthy": healthy(url), "left": left}))
"""


@pytest.mark.parametrize("proxy", [None, "http://127.0.0.1:9"])
def test_the_temporary_prefect_server_runs_in_a_session_of_its_own(
    tmp_path: Path, proxy: str | None
) -> None:
    """Without PREFECT_API_URL, flows report to one temporary server, started in a new
    session (so a SIGTERM to the command's group spares it), and stopped afterwards. A proxy
    set for the outside world is not used for it (Prefect's client went through the proxy)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        env.pop(name, None)
        if proxy is not None and "http" in name:
            env[name] = proxy
    r = subprocess.run(
        [sys.executable, "-c", _SERVER_PROBE], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["healthy"] and got["env"] == got["url"]
    assert len(got["server_sessions"]) == 1  # ours; Prefect started none of its own
    assert got["children_after_flow"] == 1
    assert got["server_sessions"][0] != got["own_session"]
    assert got["runs"] == ["COMPLETED"]
    assert got["shares_output"] == [False, False]
    assert got["after_env"] is None and not got["after_healthy"] and got["left"] == []


@pytest.mark.parametrize("how", ["group-kill", "group-hup"])
def test_a_group_killed_outright_leaves_no_prefect_server_behind(tmp_path: Path, how: str) -> None:
    """SIGKILL or SIGHUP to the whole group kills the watchdog with the command; the server,
    in a session of its own, stops by itself once the command has gone (it ran on as an
    orphan answering its port)."""
    code, _, _, alive = _interrupt(tmp_path / "run", how, after="coarse.json", wait=0.5)
    assert code == (-signal.SIGKILL if how == "group-kill" else -signal.SIGHUP)
    assert alive == []


def test_a_prefect_server_that_cannot_start_is_named_in_one_line(tmp_path: Path) -> None:
    """Its database cannot be opened (a folder in its place): the reason, at once (it was
    "found no free port in 5 attempts" after 21 s, the cause hidden)."""
    home = tmp_path / "prefect"
    (home / "prefect.db").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(home)
    out = tmp_path / "run"
    r = subprocess.run(_register_cmd(out), capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(
        "wsireg-flow: error: RuntimeError: the temporary Prefect server did not start: "
    )
    assert "OperationalError) unable to open database file" in line
    assert not out.exists()


def test_the_temporary_server_is_reached_directly_whichever_no_proxy_is_set() -> None:
    """Lower-case no_proxy wins over NO_PROXY: setting only it to 127.0.0.1 dropped the
    user's NO_PROXY hosts for the run."""
    from flows.server import api_environment

    url = "http://127.0.0.1:5/api"
    got = api_environment(url, {"NO_PROXY": "intranet.example, .lab"})
    assert got == {
        "PREFECT_API_URL": url,
        "no_proxy": "intranet.example,.lab,127.0.0.1",
        "NO_PROXY": "intranet.example,.lab,127.0.0.1",
    }
    assert api_environment(url, {})["no_proxy"] == "127.0.0.1"


def test_sigkill_leaves_no_prefect_server_or_workers_behind(tmp_path: Path) -> None:
    """SIGKILL (kill -9, the out-of-memory killer) used to leave the temporary Prefect server
    running as an orphan: no handler runs in a process killed that way, so a watchdog process
    terminates the command's children once the command is gone."""
    code, _, _, alive = _interrupt(tmp_path / "run", "kill")
    print(f"\nSIGKILL: exit {code}, still running in the session: {alive}")
    assert code == -signal.SIGKILL
    assert alive == []


_PARENT = """
import subprocess, sys, time
from wsireg_flow.watchdog import start_watchdog, stop_watchdog
dog = start_watchdog()
child = subprocess.Popen(["sleep", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(child.pid, flush=True)
time.sleep(1.5)  # the watchdog has seen the child
if sys.argv[1] == "normal":
    stop_watchdog(dog)
"""


@pytest.mark.parametrize("end", ["normal", "forgot"])
def test_watchdog_acts_only_when_the_command_did_not_stop_it(end: str) -> None:
    """A command that ends normally stops its watchdog, which then leaves every process alone;
    a watchdog left running (its command gone without a word) terminates the children."""
    r = subprocess.run(
        [sys.executable, "-c", _PARENT, end], capture_output=True, text=True, check=True
    )
    child = int(r.stdout.split()[0])
    try:
        time.sleep(2.0)
        alive = subprocess.run(["ps", "-o", "stat=", "-p", str(child)], capture_output=True)
        running = alive.stdout.strip() not in (b"", b"Z")
        assert running == (end == "normal")
    finally:
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)


_LATE_CHILD = """
import os, subprocess, time
from wsireg_flow.watchdog import start_watchdog
dog = start_watchdog()
time.sleep(1.5)  # the watchdog is scanning
child = subprocess.Popen(["sleep", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(child.pid, flush=True)
os._exit(0)  # dies at once: no scan can have seen the child
"""


def test_watchdog_terminates_a_child_started_after_its_last_scan() -> None:
    """A command that leads its process group and dies right after starting a child: the
    watchdog finds the child among the group's orphans (scans alone would miss it)."""
    r = subprocess.run(
        [sys.executable, "-c", _LATE_CHILD],
        capture_output=True,
        text=True,
        check=True,
        start_new_session=True,
    )
    child = int(r.stdout.split()[0])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = subprocess.run(["ps", "-o", "stat=", "-p", str(child)], capture_output=True)
            if state.stdout.strip() in (b"", b"Z"):
                break
            time.sleep(0.2)
        assert state.stdout.strip() in (b"", b"Z"), "the late child still runs"
    finally:
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)


def test_watchdog_keeps_what_it_knew_when_a_scan_finds_no_children() -> None:
    """The race behind an orphaned Prefect server: the command died during a /proc scan, its
    children were already handed to another parent, and that empty scan replaced everything
    the watchdog knew. A scan now only adds; ended processes (or reused pids) are dropped."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        known = remember({}, [child.pid])
        assert known == {child.pid: start_time(child.pid)}
        assert remember(known, []) == known  # the empty scan of a dying command
        gone = {**known, 999_999_999: 12345, child.pid + 10**9: 1}
        assert remember(gone, []) == known  # ended (or never seen) processes are dropped
        stale = {child.pid: known[child.pid] - 1}  # same pid, another start: a reused pid
        assert remember(stale, []) == {}
    finally:
        child.kill()
        child.wait()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> PairJob:
    job = PairJob(TARGET, SOURCE, tmp_path_factory.mktemp("ops") / "run", Config())
    run_pair(job)
    return job


def test_a_second_run_into_a_busy_run_directory_is_refused(finished: PairJob) -> None:
    """Two runs into one directory used to both do the full work, or (with --overwrite)
    destroy each other's outputs and leave a directory that could not be resumed."""
    with run_dir_lock(finished.run_dir):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            argv = _register_cmd(finished.run_dir)[3:]
            assert main([*argv, "--overwrite"]) == 2
        with pytest.raises(WsiregError, match="another wsireg-flow run is writing"):
            run_pair(finished)
    assert stderr.getvalue().count("\n") == 1
    assert "another wsireg-flow run is writing to this run directory" in stderr.getvalue()
    with run_dir_lock(finished.run_dir):  # released: free again
        pass
    assert (finished.run_dir / LOCK_NAME).is_file()


def test_resume_deletes_what_interrupted_writes_left(finished: PairJob) -> None:
    """Temporary outputs of killed runs used to stay for good (a partial warped pyramid grows
    with the slide), even after a successful resume."""
    d = finished.run_dir
    left = [
        temp_sibling(d / "warped.zarr"),
        temp_sibling(d / "ingest" / "source.zarr"),
        d / "nonrigid" / ".tiles.npz.3f2a91.tmp",
        d / ".warped.zarr.partial-7b0a4235",  # the names older versions wrote
    ]
    for p in left[:2]:
        (p / "0").mkdir(parents=True)
        (p / "0" / "chunk").write_bytes(b"x" * 100)
    for p in left[2:]:
        p.write_bytes(b"x")
    with run_dir_lock(d):
        prepare_run_dir(finished)
    assert not any(p.exists() for p in left)
    assert all(is_complete(d, name, fp) for name, fp in finished.fingerprints().items())


def test_changed_settings_drop_the_stale_results_before_running(finished: PairJob) -> None:
    """A re-run with a new setting killed mid-way left the old metrics, warped image and
    report next to a job.json with the new settings: the directory looked complete."""
    cfg = Config()
    cfg.nonrigid.smooth_sigma = cfg.nonrigid.smooth_sigma + 2.0
    changed = PairJob(finished.target, finished.source, finished.run_dir, cfg)
    with run_dir_lock(changed.run_dir):
        prepare_run_dir(changed)
    d = changed.run_dir
    for name in ("ingest_target", "ingest_source", "preprocess", "coarse"):
        assert is_complete(d, name, changed.fingerprints()[name]), name
    for name in ("nonrigid", "stitch", "warp", "evaluate", "qc"):
        assert read_record(d, name) is None, name
    assert not (d / "warped.zarr").exists() and not (d / "metrics.json").exists()
    assert not (d / "qc").exists() or not any((d / "qc").iterdir())  # report and figures gone
    assert (d / "coarse.json").exists() and (d / "ingest" / "target.zarr").exists()


def test_out_that_is_a_file_is_refused_with_one_line(tmp_path: Path) -> None:
    """--out naming an existing file gave NotADirectoryError (exit 1) after Prefect started."""
    f = tmp_path / "notes.txt"
    f.write_text("keep me\n")
    for out, problem in ((f, "exists and is not a directory"), (f / "run", "not a directory")):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            assert main([*_register_cmd(out)[3:]]) == 2
        assert stderr.getvalue().count("\n") == 1 and problem in stderr.getvalue()
    assert f.read_text() == "keep me\n"


def test_temporary_names_of_long_outputs_stay_within_255_bytes(tmp_path: Path) -> None:
    """Sections with 242-character names registered, then the stack failed at its end with
    'File name too long' for the temporary name of a warped section."""
    for name in ("s" * 242 + ".zarr", "é" * 120 + ".zarr"):
        tmp = temp_sibling(tmp_path / name)
        assert len(tmp.name.encode()) <= 255 and is_partial(tmp.name)
        tmp.mkdir()  # the file system accepts it
    assert temp_sibling(tmp_path / "a.zarr") != temp_sibling(tmp_path / "a.zarr")


def test_a_full_disk_is_reported_as_such_not_as_a_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ingesting onto a full disk said '<input slide>: cannot read pixel data (OSError:
    [Errno 28] ...)', exit 2: it blamed the input. Later stages gave a bare OSError (exit 1)
    after two pointless retries."""
    import wsireg_flow.io.omezarr as omezarr
    from flows.common import transient_only

    out = tmp_path / "out.zarr"

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "0" / "c" / "0"))

    monkeypatch.setattr(omezarr, "write_ngff_pyramid", full)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(["ingest", str(TARGET), "--out", str(out), "--quiet"]) == 2
    line = stderr.getvalue().strip()
    assert (
        line
        == f"wsireg-flow: error: {out / '0' / 'c' / '0'}: cannot write (No space left on device)"
    )
    assert str(TARGET) not in line

    # a write that fails on a full disk raises ENOSPC without a file name: --out is named
    def full_write(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(omezarr, "write_ngff_pyramid", full_write)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(["ingest", str(TARGET), "--out", str(out), "--quiet"]) == 2
    assert stderr.getvalue().strip() == (
        f"wsireg-flow: error: {out}: cannot write (No space left on device)"
    )

    class State:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def result(self, raise_on_failure: bool = True) -> BaseException:
            return self.exc

    assert not transient_only(None, None, State(OSError(errno.ENOSPC, "No space left")))
    assert not transient_only(None, None, State(PermissionError(errno.EACCES, "Permission")))
    assert transient_only(None, None, State(ConnectionResetError(errno.ECONNRESET, "reset")))


_FRAGMENTED_HEAP = """
import numpy as np, psutil
from wsireg_flow.stages import release_freed_memory, run_stage
from pathlib import Path
import sys

def stage():
    a = np.ones(3_000_000)
    del a  # a freed 24 MB mmap raises glibc's mmap threshold: 20 MB blocks now use the heap
    blocks = [np.ones(2_500_000) for _ in range(40)]
    global kept
    kept = blocks[-1]  # holds the top of the heap, so only a trim returns the rest
    return []

p = psutil.Process()
before = p.memory_info().rss
run_stage(Path(sys.argv[1]), "s", "fp", stage)
print((p.memory_info().rss - before) / 1e9)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_a_stage_gives_its_freed_memory_back(tmp_path: Path) -> None:
    """After a stage that freed 0.8 GB of heap blocks, the resident size is back near where it
    started (it stayed 0.8 GB higher before stages trimmed)."""
    r = subprocess.run(
        [sys.executable, "-c", _FRAGMENTED_HEAP, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(r.stdout) < 0.1, r.stdout


_THREAD_HEAPS = """
import ctypes, sys, threading
import numpy as np
from wsireg_flow.stages import limit_malloc_arenas, release_freed_memory

if sys.argv[1] == "limit":
    assert limit_malloc_arenas()
big = np.ones(30_000_000, np.uint8)
del big  # raises glibc's mmap threshold, as numpy work does: 1 MB blocks now use heaps
start = threading.Barrier(4)

def work():
    start.wait()  # all four allocate at once: glibc gives contending threads heaps of their own
    for _ in range(5):
        blocks = [np.ones(1_000_000, np.uint8) for _ in range(40)]
        del blocks

threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
release_freed_memory()
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1e3
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
stream = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, stream)
libc.fclose(stream)
print(rss, open(sys.argv[2]).read().count("<heap nr="))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc arenas")
def test_limited_malloc_arenas_let_worker_threads_memory_go_back(tmp_path: Path) -> None:
    """Four threads allocate and free 40 MB each: glibc gives contending threads heaps of their
    own, whose free top a trim cannot return (120-170 MB stayed resident when measured), unless
    the process keeps at most two heaps for all its threads (16-25 MB, up to 79 MB seen on a
    loaded machine). The heap count is what the limit sets (glibc's malloc_info); the memory
    is the effect. Without contention (seen once with 4 processes on 2 cores) glibc made no
    extra heaps: the pair is then measured again."""

    def measure(mode: str) -> tuple[float, int]:
        info = tmp_path / f"{mode}.xml"
        r = subprocess.run(
            [sys.executable, "-c", _THREAD_HEAPS, mode, str(info)],
            capture_output=True,
            text=True,
            check=True,
        )
        rss, heaps = r.stdout.split()
        return float(rss), int(heaps)

    for _ in range(3):  # on a loaded machine the threads may not contend: measure again
        (free, free_heaps), (limited, limited_heaps) = measure("free"), measure("limit")
        if free_heaps > 2:
            break
    else:  # glibc gave the threads no heaps of their own: there is nothing to limit here
        pytest.skip(f"the unlimited threads used {free_heaps} heaps in 3 runs (no contention)")
    print(
        f"\nafter the threads freed their blocks: {free_heaps} heaps, {free:.0f} MB resident; "
        f"limited: {limited_heaps} heaps, {limited:.0f} MB"
    )
    assert limited_heaps <= 2
    assert limited < free, (free, limited)
