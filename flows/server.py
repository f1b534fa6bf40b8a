"""Prefect's temporary local server, started by the command and bound to it.

Without ``PREFECT_API_URL``, Prefect starts a temporary server as a child process in the
command's process group. A SIGTERM sent to the whole group (``timeout``, ``kill -- -PGID``) or
to every process of a service (systemd's default ``KillMode``, Slurm's ``scancel``) then stops
the server together with the command, and Prefect's flow-run SIGTERM handler spends about 70 s
retrying to report the crash to it before the command exits 1. The server started here runs
in a session of its own, lives exactly as long as the command (it stops once the command has
gone, however it ended: SIGKILL, SIGHUP...) and holds a SIGTERM back until then: the crash is
reported at once, the command's own handler stops its child processes and exits 143, and the
server follows. The command stops it with SIGINT when the block ends. It listens on a socket
the command bound (no race for the port) and writes its output to a temporary file (not to
the command's stdout / stderr): a failed start is reported with the error it gave.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import FrameType
from typing import IO

import uvicorn
from prefect.context import refresh_global_settings_context
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    get_current_settings,
)

APP_FACTORY = "prefect.server.api.server:create_app"
LOG_TAIL_BYTES = 16384


class ParentBoundServer(uvicorn.Server):
    """A uvicorn server that lives as long as its parent process and no longer.

    It stops once the parent has gone, however the parent ended (checked on each of
    uvicorn's 0.1 s ticks; Prefect's shutdown then takes about 1 s), and on SIGINT. A SIGTERM
    that arrives while the parent runs (a signal to every process of a service) is held back
    until then, so the parent can still report to it.
    """

    def __init__(self, config: uvicorn.Config, parent: int) -> None:
        super().__init__(config)
        self.parent = parent

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and os.getppid() == self.parent:
            return  # taken care of by on_tick once the parent has gone
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if os.getppid() != self.parent:
            self.should_exit = True
        return await super().on_tick(counter)


def serve_api(fd: int) -> int:
    """Serve Prefect's API (no UI) on the listening socket ``fd`` until stopped (see
    :class:`ParentBoundServer`); the exit status (1 when it could not start)."""
    config = uvicorn.Config(APP_FACTORY, factory=True, log_level="error", lifespan="on")
    server = ParentBoundServer(config, os.getppid())
    try:
        server.run(sockets=[socket.socket(fileno=fd)])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it stopped on: the command's stop
        pass
    return 0 if server.started else 1


def listening_socket() -> socket.socket:
    """A TCP socket listening on a free port of 127.0.0.1 (bound here and handed to the
    server process, so no other process can take the port in between)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def start_server(sock: socket.socket, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start Prefect's API server (no UI) on the listening ``sock`` in a new session, as a
    child bound to this process (:class:`ParentBoundServer`); its output goes to ``log``
    (not to the command's stdout / stderr, which a pipe reader waits on)."""
    env = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", None)  # its errors go to the log
    return subprocess.Popen(
        [sys.executable, "-m", "flows.server", str(sock.fileno())],  # same number there
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        pass_fds=(sock.fileno(),),
        start_new_session=True,
    )


# 127.0.0.1 directly, whatever http_proxy says
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def healthy(api_url: str) -> bool:
    """True when the server at ``api_url`` answers its health check."""
    try:
        with DIRECT.open(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def drain_prefect_workers(timeout: float = 10.0) -> None:
    """Wait up to ``timeout`` s each for the run logs and events Prefect still queues to
    reach the server (they would be lost, with an error on stderr, once it is stopped)."""
    APILogWorker.drain_all(timeout=timeout)
    EventsWorker.drain_all(timeout=timeout)


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """Stop the server with SIGINT (SIGKILL after 5 s) and reap it."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def last_error(log: IO[bytes]) -> str:
    """The most telling line of a failed server's output: its last exception line (e.g.
    ``sqlite3.OperationalError: unable to open database file``), else its last line."""
    log.seek(0, os.SEEK_END)
    log.seek(max(0, log.tell() - LOG_TAIL_BYTES))
    lines = [ln.strip() for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception): ", ln)]
    return (errors or lines or ["no output"])[-1]


def wait_healthy(
    process: subprocess.Popen[bytes], api_url: str, timeout: float, log: IO[bytes]
) -> None:
    """Wait up to ``timeout`` s for the server to answer its health check.

    Raises
    ------
    RuntimeError
        When the server exits first (naming its error) or does not answer in time.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the temporary Prefect server did not start: {last_error(log)}")
        if healthy(api_url):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:g} s")


@contextmanager
def prefect_api() -> Iterator[str]:
    """Run the block against ``PREFECT_API_URL`` or, when it is not set, against a temporary
    local server in a session of its own (stopped when the block ends).

    Yields
    ------
    str
        The API URL the block's flow runs report to.

    Raises
    ------
    RuntimeError
        When the temporary server does not start (with the reason it gave).
    """
    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    timeout = float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    with tempfile.TemporaryFile() as log:
        with listening_socket() as sock:  # the server's now: a dead server refuses connections
            api_url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
            process = start_server(sock, log)
        try:
            wait_healthy(process, api_url, timeout, log)
            with environment(api_environment(api_url, os.environ)):
                try:
                    yield api_url
                finally:
                    drain_prefect_workers()
        finally:
            stop_server(process)


def api_environment(api_url: str, env: Mapping[str, str]) -> dict[str, str]:
    """The variables that send Prefect's clients to ``api_url`` on 127.0.0.1 directly: the
    API URL, and 127.0.0.1 added to ``no_proxy`` / ``NO_PROXY`` (a proxy set for the outside
    world answered the local API with 403 Forbidden)."""
    hosts: list[str] = []
    for name in ("no_proxy", "NO_PROXY"):  # either spelling may be the one set: keep both
        for host in env.get(name, "").split(","):
            if host.strip() and host.strip() not in hosts:
                hosts.append(host.strip())
    direct = ",".join([*hosts, "127.0.0.1"])
    return {"PREFECT_API_URL": api_url, "no_proxy": direct, "NO_PROXY": direct}


@contextmanager
def environment(updates: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block (restored after it), seen by Prefect's
    settings in every thread and by the child processes started meanwhile."""
    before = {name: os.environ.get(name) for name in updates}
    os.environ.update(updates)
    refresh_global_settings_context()
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        refresh_global_settings_context()


if __name__ == "__main__":
    sys.exit(serve_api(int(sys.argv[1])))
