"""Errors the command line reports as one line (no traceback unless ``--debug``)."""

from __future__ import annotations

from pathlib import Path


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
