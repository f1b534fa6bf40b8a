"""Errors the command line reports as one line (no traceback unless ``--debug``), and the
one-line form of its warnings."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# errors of writing that no retry heals: disk full, quota, read-only file system, permission
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class WsiregError(Exception):
    """A user-facing error: bad input, bad configuration, or a failed step.

    The message is one line and names the file (when there is one) and the problem.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        text = message if path is None else f"{path}: {message}"
        super().__init__(text)


class InputError(WsiregError):
    """An input file is missing, empty, truncated, unreadable or malformed."""


class ConfigError(WsiregError):
    """A configuration file or value is invalid."""


class RegistrationError(WsiregError):
    """A registration step failed or produced an implausible result."""


class OutputError(WsiregError):
    """An output cannot be written: disk full, quota exceeded, read-only, no permission."""


def output_error(exc: BaseException) -> OutputError | None:
    """The :class:`OutputError` behind ``exc`` (itself, its cause or its context: an
    ``OSError`` with an errno of :data:`OUTPUT_ERRNOS`), naming the file it was writing; else
    None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OutputError):
            return e
        if isinstance(e, OSError) and e.errno in OUTPUT_ERRNOS:
            return OutputError(f"cannot write ({e.strerror})", e.filename)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class OneLineFormatter(logging.Formatter):
    """``wsireg-flow: warning: MESSAGE``, as the command line's errors are written. A record
    of another library's logger keeps that logger's name (``wsireg-flow: warning: NAME:
    MESSAGE``) unless ``names`` is False (for a handler that filters its records itself).

    One line: a message's line breaks become spaces, and a logged exception adds its type and
    first line; with ``debug`` the message keeps its lines and the traceback follows.
    """

    def __init__(self, names: bool = True, debug: bool = False) -> None:
        super().__init__()
        self.names = names
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        ours = record.name.split(".")[0] in ("wsireg_flow", "flows", "benchmarks_anhir")
        where = f"{record.name}: " if self.names and not ours else ""
        text = record.getMessage()
        if self.debug:
            if record.exc_info:
                text += "\n" + self.formatException(record.exc_info)
        else:
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                first = (str(exc).strip().splitlines() or [""])[0]
                text += f" ({type(exc).__name__}: {first})"
            text = " ".join(text.split("\n"))
        return f"wsireg-flow: {record.levelname.lower()}: {where}{text}"


@contextmanager
def captured_warnings(name: str) -> Iterator[list[str]]:
    """Collect, instead of printing, the warnings of logger ``name`` (and its children) while
    the block runs; yields the list their messages are appended to."""
    logger = logging.getLogger(name)
    records: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = _Collect(level=logging.WARNING)
    propagate, level = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        logger.setLevel(level)
