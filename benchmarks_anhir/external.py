"""Checks for another tool's Python environment (VALIS, palom) before a comparison starts.

The compared tools live in their own venvs, so a comparison first asks that venv's interpreter
for the tool's version. Anything wrong is refused in one line that says how to set it up.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


def external_version(
    python: Path | None,
    probe: Sequence[str],
    *,
    script: str,
    missing: str,
    hint: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> str:
    """Run ``python *probe`` and return the last line it prints (the tool's version).

    Parameters
    ----------
    python
        The other environment's interpreter; ``None`` when the user gave none.
    probe
        Arguments after the interpreter, e.g. ``["-c", "print(...)"]``; must exit 0 and print
        the version last when the tool is usable.
    script
        Name of the calling benchmark, the prefix of every message.
    missing
        What is wrong when the probe fails, e.g. ``"cannot import palom"``.
    hint
        How to create the environment; ends every message.
    env
        Environment of the probe (default: this process's).
    timeout
        Seconds the probe may take.

    Raises
    ------
    SystemExit
        With one line ``"{script}: {python} <problem>; {hint}"`` when ``python`` is not given,
        does not exist, cannot be run, or its probe fails.
    """
    if python is None:
        raise SystemExit(f"{script}: no interpreter given; {hint}")
    if not Path(python).is_file():
        raise SystemExit(f"{script}: {python} does not exist; {hint}")
    try:
        proc = subprocess.run(
            [str(python), *probe],
            capture_output=True,
            text=True,
            env=None if env is None else dict(env),
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SystemExit(f"{script}: cannot run {python} ({type(exc).__name__}); {hint}") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{script}: {python} {missing}; {hint}")
    return lines[-1]
