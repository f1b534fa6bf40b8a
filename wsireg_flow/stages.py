"""Resumable stages: fingerprints of inputs and settings, and completion markers.

A stage is complete when ``RUN/.stages/<name>.json`` exists, records the same fingerprint as
the one computed now, and every output it lists exists. Outputs are written under temporary
names and renamed, and the marker is written last (atomically), so an interrupted stage never
looks complete. Fingerprints chain: a stage's fingerprint includes its upstream stages'
fingerprints, so a changed setting re-runs exactly the stages downstream of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsireg_flow import __version__

MARKER_DIR = ".stages"


def fingerprint(*parts: Any) -> str:
    """SHA-256 (hex, 16 chars) of the JSON form of ``parts`` (keys sorted)."""
    text = json.dumps([__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """Identity of an input file or directory: resolved path, size and modification time (ns).

    Content hashing a gigapixel slide would cost more than many stages; size + mtime change on
    every rewrite. Directories (OME-Zarr inputs) use their top-level metadata files.
    """
    if path is None:
        return None
    p = Path(path).resolve()
    if p.is_dir():
        items = sorted(p.glob(".z*")) + sorted(p.glob("zarr.json"))
        return {
            "path": str(p),
            "meta": [(i.name, i.stat().st_size, i.stat().st_mtime_ns) for i in items],
        }
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass(frozen=True)
class StageRecord:
    name: str
    fingerprint: str
    outputs: tuple[str, ...]
    seconds: float
    finished: float


def _marker(run_dir: Path, name: str) -> Path:
    return run_dir / MARKER_DIR / f"{name}.json"


def read_record(run_dir: Path, name: str) -> StageRecord | None:
    """The completion record of a stage, or None."""
    m = _marker(run_dir, name)
    if not m.is_file():
        return None
    try:
        d = json.loads(m.read_text())
        return StageRecord(
            d["name"], d["fingerprint"], tuple(d["outputs"]), d["seconds"], d["finished"]
        )
    except (ValueError, KeyError, TypeError):
        return None


def is_complete(run_dir: Path, name: str, fp: str) -> bool:
    """True when the stage finished with fingerprint ``fp`` and its outputs are all there."""
    rec = read_record(run_dir, name)
    return (
        rec is not None
        and rec.fingerprint == fp
        and all((run_dir / o).exists() for o in rec.outputs)
    )


def mark_complete(
    run_dir: Path, name: str, fp: str, outputs: Sequence[str], seconds: float
) -> None:
    """Write the completion marker atomically (last step of a stage)."""
    m = _marker(run_dir, name)
    m.parent.mkdir(parents=True, exist_ok=True)
    tmp = m.with_name(f".{m.name}.tmp")
    rec = {
        "name": name,
        "fingerprint": fp,
        "outputs": list(outputs),
        "seconds": round(seconds, 4),
        "finished": time.time(),
    }
    tmp.write_text(json.dumps(rec, indent=2))
    os.replace(tmp, m)


def invalidate(run_dir: Path, name: str) -> None:
    """Forget a stage's completion (its outputs are rewritten by the next run)."""
    _marker(run_dir, name).unlink(missing_ok=True)


def run_stage(run_dir: Path, name: str, fp: str, fn: Callable[[], Sequence[str]]) -> bool:
    """Run ``fn`` unless the stage is complete; returns True when it ran.

    ``fn`` writes its outputs (temporary names, renamed) and returns their paths relative to
    ``run_dir``; the marker is written after it returns.
    """
    if is_complete(run_dir, name, fp):
        return False
    invalidate(run_dir, name)
    t0 = time.perf_counter()
    outputs = fn()
    mark_complete(run_dir, name, fp, outputs, time.perf_counter() - t0)
    return True
