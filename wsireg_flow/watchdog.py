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


def _process_table() -> dict[int, list[str]]:
    """``/proc/PID/stat`` fields (after the command name) of every process, by pid (empty
    where there is no /proc)."""
    try:
        pids = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return {}
    table = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            table[pid] = fields
    return table


def descendants(pid: int) -> list[int]:
    """Process ids of every descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for child, fields in _process_table().items():
        children.setdefault(int(fields[1]), []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def signal_alive(known: dict[int, int], signum: int) -> list[int]:
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


def remember(known: dict[int, int], scanned: list[int]) -> dict[int, int]:
    """Add the processes of one scan to ``known`` (pid -> start time) and drop those that ended.

    A scan never replaces what was known: if the command dies while /proc is being scanned,
    its children are handed to another parent mid-scan and the scan finds none of them. With
    the last scan taken as the whole truth, the watchdog would terminate nothing.
    """
    merged = {pid: started for pid, started in known.items() if start_time(pid) == started}
    for pid in scanned:
        started = start_time(pid)
        if started is not None:
            merged[pid] = started
    return merged


def orphans_of_group(group: int, since: int, reaper: int, exclude: int) -> list[int]:
    """Processes of process group ``group`` that started at or after ``since`` (clock ticks
    since boot) and whose parent is now ``reaper``: what a dead group leader left behind,
    including children it started after the watchdog's last scan."""
    return [
        pid
        for pid, fields in _process_table().items()
        if pid != exclude
        and int(fields[2]) == group
        and int(fields[1]) == reaper
        and int(fields[19]) >= since
    ]


def watch(parent: int, poll: float = POLL_SECONDS, grace: float = GRACE_SECONDS) -> int:
    """Watch ``parent`` until it is gone, then terminate its descendants still alive.

    Those are the descendants seen by any scan while ``parent`` lived, plus, when ``parent``
    led its process group (a shell job, a scheduler's task), the group's processes started
    after it that were left to the same new parent as this watchdog. Returns the number of
    processes that got SIGTERM (survivors of ``grace`` seconds get SIGKILL). Must run in a
    child of ``parent``: a child whose parent dies is handed to another parent, which is how
    the end is noticed.
    """
    me = os.getpid()
    since = start_time(parent)
    try:
        group = os.getpgid(parent)
    except OSError:
        group = -1
    known: dict[int, int] = {}
    while os.getppid() == parent:
        try:
            known = remember(known, [pid for pid in descendants(parent) if pid != me])
        except Exception:  # a scan that fails must not end the watch
            pass
        time.sleep(poll)
    if group == parent and since is not None:
        known = remember(known, orphans_of_group(group, since, os.getppid(), me))
    terminated = signal_alive(known, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = {pid: known[pid] for pid in terminated}
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = {pid: s for pid, s in left.items() if start_time(pid) == s}
    signal_alive(left, signal.SIGKILL)
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
