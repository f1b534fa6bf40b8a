"""Stop a command's child processes when the command itself dies without cleaning up.

A command killed by SIGKILL (``kill -9``, the kernel's out-of-memory killer) runs no handler,
so the processes it started (the temporary Prefect server, Dask worker processes) would run on
as orphans. The command therefore starts a small watchdog process (``python -m
wsireg_flow.watchdog PID``, standard library only) which keeps a list of the command's
descendants; once the command is gone it terminates the ones still alive. On a normal exit the
command stops the watchdog first. Linux only (``/proc``); elsewhere nothing is watched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_SECONDS = 0.5
GRACE_SECONDS = 5.0


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name, or None if ``pid`` is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    return stat.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (tells a reused pid apart), or None."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def descendants(pid: int) -> list[int]:
    """Process ids of every descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        fields = _stat_fields(int(entry))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_alive(known: dict[int, int], signum: int) -> list[int]:
    """Send ``signum`` to the processes of ``known`` (pid -> start time) still alive as the
    same process; returns their pids."""
    alive = []
    for pid, started in known.items():
        if start_time(pid) == started:
            try:
                os.kill(pid, signum)
                alive.append(pid)
            except OSError:
                pass
    return alive


def watch(parent: int, poll: float = POLL_SECONDS, grace: float = GRACE_SECONDS) -> int:
    """Watch ``parent`` until it is gone, then terminate its last known descendants.

    Returns the number of processes that were still alive and got SIGTERM (survivors of
    ``grace`` seconds get SIGKILL). Must run in a child of ``parent``: a child whose parent
    dies is handed to another parent, which is how the end is noticed.
    """
    me = os.getpid()
    known: dict[int, int] = {}
    while os.getppid() == parent:
        snapshot = {}
        for pid in descendants(parent):
            started = start_time(pid)
            if pid != me and started is not None:
                snapshot[pid] = started
        known = snapshot
        time.sleep(poll)
    terminated = _signal_alive(known, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = {pid: known[pid] for pid in terminated}
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = {pid: s for pid, s in left.items() if start_time(pid) == s}
    _signal_alive(left, signal.SIGKILL)
    return len(terminated)


def start_watchdog() -> subprocess.Popen[bytes] | None:
    """Start the watchdog of this process (None where there is no ``/proc``).

    The caller stops it with :func:`stop_watchdog` when it ends normally.
    """
    if not os.path.isdir("/proc/self"):
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "wsireg_flow.watchdog", str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )


def stop_watchdog(process: subprocess.Popen[bytes] | None) -> None:
    """Stop a watchdog started by :func:`start_watchdog` (its watch ends without acting)."""
    if process is None:
        return
    process.kill()
    process.wait()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the command, which cleans up
    watch(int(sys.argv[1]))
