"""Warnings of a local cluster's worker processes, written as the command line writes its own.

A worker process has no handler on its root logger, so a library warning raised there (for
example the landmark-count note of a pair that ``anhir`` runs on a worker) reached stderr
through Python's last-resort handler: the bare message, without the ``wsireg-flow: warning:``
prefix the same warning gets in the main process.
"""

from __future__ import annotations

import logging
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from wsireg_flow.errors import OneLineFormatter


class OneLineWarnings(WorkerPlugin):
    """A worker plugin that gives the worker process's root logger one stderr handler with
    :class:`~wsireg_flow.errors.OneLineFormatter` at WARNING (once per process)."""

    name = "wsireg-flow-warnings"

    def setup(self, worker: Any) -> None:
        root = logging.getLogger()
        if any(isinstance(h.formatter, OneLineFormatter) for h in root.handlers):
            return
        handler = logging.StreamHandler()  # sys.stderr, which the nanny passes on
        handler.setFormatter(OneLineFormatter())
        handler.setLevel(logging.WARNING)
        root.addHandler(handler)
