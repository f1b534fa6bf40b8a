"""Prefect's temporary local server, started by the command and bound to it.

Without ``PREFECT_API_URL``, Prefect starts a temporary server as a child process in the
command's process group. A SIGTERM sent to the whole group (``timeout``, ``kill -- -PGID``) or
to every process of a service (systemd's default ``KillMode``, Slurm's ``scancel``) then stops
the server together with the command, and Prefect's flow-run SIGTERM handler spends about 70 s
retrying to report the crash to it before the command exits 1. The server started here runs
in a session of its own and defers a SIGTERM until the command that started it has exited:
the crash is reported at once, the command's own handler stops its child processes and exits
143, and the server follows. The command stops it with SIGINT when the block ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import FrameType

import uvicorn
from prefect.context import refresh_global_settings_context
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    get_current_settings,
)

# uvicorn's exit status when the server did not start (its port taken by another process)
PORT_IN_USE = 3
APP_FACTORY = "prefect.server.api.server:create_app"


class ParentBoundServer(uvicorn.Server):
    """A uvicorn server that holds a SIGTERM back while its parent process is alive.

    SIGINT stops it as usual; a SIGTERM received while the parent runs takes effect within
    0.1 s of the parent's exit (checked on each of uvicorn's ticks).
    """

    def __init__(self, config: uvicorn.Config, parent: int) -> None:
        super().__init__(config)
        self.parent = parent
        self.term_deferred = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and os.getppid() == self.parent:
            self.term_deferred = True
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.term_deferred and os.getppid() != self.parent:
            self.should_exit = True
        return await super().on_tick(counter)


def serve_api(port: int) -> int:
    """Serve Prefect's API (no UI) on 127.0.0.1:``port`` until stopped; the exit status
    (:data:`PORT_IN_USE` when it could not start)."""
    config = uvicorn.Config(
        APP_FACTORY, factory=True, host="127.0.0.1", port=port, log_level="error", lifespan="on"
    )
    server = ParentBoundServer(config, os.getppid())
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it stopped on: the command's stop
        pass
    return 0 if server.started else PORT_IN_USE


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of asking."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(port: int) -> subprocess.Popen[bytes]:
    """Start Prefect's API server (no UI) on 127.0.0.1:``port`` in a new session, as a child
    bound to this process (:class:`ParentBoundServer`)."""
    env = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "flows.server", str(port)]
    return subprocess.Popen(command, env=env, start_new_session=True)


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
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_healthy(process: subprocess.Popen[bytes], api_url: str, timeout: float) -> bool:
    """Wait up to ``timeout`` s for the server to answer; False when it exited with
    :data:`PORT_IN_USE`.

    Raises
    ------
    RuntimeError
        When the server exits otherwise or does not answer in time.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = process.poll()
        if status == PORT_IN_USE:
            return False
        if status is not None:
            raise RuntimeError(f"the temporary Prefect server exited with status {status}")
        if healthy(api_url):
            return True
        time.sleep(0.1)
    stop_server(process)
    raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:g} s")


@contextmanager
def prefect_api() -> Iterator[str]:
    """Run the block against ``PREFECT_API_URL`` or, when it is not set, against a temporary
    local server in a session of its own (stopped when the block ends).

    Yields
    ------
    str
        The API URL the block's flow runs report to.
    """
    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    timeout = float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    for _attempt in range(5):
        port = free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        process = start_server(port)
        if wait_healthy(process, api_url, timeout):
            break
    else:
        raise RuntimeError("the temporary Prefect server found no free port in 5 attempts")
    try:
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
    updates = {"PREFECT_API_URL": api_url}
    for name in ("no_proxy", "NO_PROXY"):
        hosts = [h for h in env.get(name, "").split(",") if h.strip()]
        updates[name] = ",".join([*hosts, "127.0.0.1"])
    return updates


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
