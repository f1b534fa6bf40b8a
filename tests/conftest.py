"""Shared test fixtures.

Prefect reads its settings once, when ``prefect`` is first imported (``prefect.context`` builds
the global settings context from the environment, and creates ``PREFECT_HOME`` if missing).
So the hermetic environment is set in :func:`pytest_configure`, before any test module is
collected (and so before anything can import Prefect): a temporary ``PREFECT_HOME``, no
telemetry, no task-run recorder. That costs nothing; no server starts unless a test asks for
the :func:`prefect_env` fixture, which runs flows against a temporary local server and database
(``prefect_test_harness``). The environment is restored in :func:`pytest_unconfigure`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pytest

PREFECT_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # tests run tiles on Dask's threaded scheduler (tests that need a LocalCluster or a real
    # cluster say so): dozens of runs, some in parallel subprocesses, would each start one
    "WSIREG_FLOW_SCHEDULER": "threads",
}

_saved_env: dict[str, str | None] = {}
_home: str | None = None


def _set_env(values: dict[str, str]) -> None:
    for key, value in values.items():
        _saved_env.setdefault(key, os.environ.get(key))
        os.environ[key] = value


def pytest_configure(config: pytest.Config) -> None:
    """Hermetic Prefect environment for the whole session (set before collection)."""
    global _home
    _home = tempfile.mkdtemp(prefix="wsireg-prefect-home-")
    _set_env({**PREFECT_ENV, "PREFECT_HOME": _home})
    if "prefect" in sys.modules:  # imported by a plugin before this ran: re-read the env
        import prefect.context

        prefect.context.refresh_global_settings_context()


def pytest_unconfigure(config: pytest.Config) -> None:
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env.clear()
    if _home is not None:
        shutil.rmtree(_home, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run flows against a temporary Prefect server and database (started once per session).

    Requested by tests that run flows; others never start a server.
    """
    home = tmp_path_factory.mktemp("prefect-home")
    _set_env({**PREFECT_ENV, "PREFECT_HOME": str(home)})

    import prefect.context
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # pick up the environment even if Prefect was imported earlier in this process
    prefect.context.refresh_global_settings_context()
    assert prefect.context.get_settings_context().settings.home == home
    with (
        prefect_test_harness(server_startup_timeout=120),
        # sync flows otherwise wait for the heartbeat thread (~1 s per flow run)
        temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        yield
