"""Resumable stages: fingerprints of inputs and settings, and completion markers.

A stage is complete when ``RUN/.stages/<name>.json`` exists, records the same fingerprint as
the one computed now, and every output it lists exists. Outputs are written under temporary
names and renamed, and the marker is written last (atomically), so an interrupted stage never
looks complete. Fingerprints chain: a stage's fingerprint includes its upstream stages'
fingerprints, so a changed setting re-runs exactly the stages downstream of it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsireg_flow import __version__
from wsireg_flow.errors import WsiregError

MARKER_DIR = ".stages"
LOCK_NAME = ".wsireg.lock"


@contextmanager
def exclusive_lock(lock_file: Path) -> Iterator[bool]:
    """Try to hold an exclusive lock on ``lock_file`` (created when missing, never removed)
    for the block; yields whether this process holds it.

    The lock is ``flock``: the system releases it when the holder ends, however it ends (even
    SIGKILL), so a stale lock never blocks anyone. The holder writes its process id into the
    file, for people. Without ``fcntl`` (Windows) every caller holds it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold the exclusive lock of a run directory (created if missing) while the block runs:
    :func:`exclusive_lock` on ``RUN/.wsireg.lock``.

    Raises
    ------
    WsiregError
        When another process holds the lock (a run writing to this directory now).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(run_dir / LOCK_NAME) as held:
        if not held:
            raise WsiregError(
                "another wsireg-flow run is writing to this run directory (wait for it to "
                "finish, or choose another --out)",
                run_dir,
            )
        yield


def check_unlocked(run_dir: Path) -> None:
    """Raise the error of :func:`run_dir_lock` when a run holds ``run_dir`` now (no lock is
    kept; nothing is created)."""
    if (run_dir / LOCK_NAME).is_file():
        with run_dir_lock(run_dir):
            pass


def check_writable_dir(path: Path) -> None:
    """Refuse, before any work, an output directory that is a file or cannot be created.

    Raises
    ------
    WsiregError
        When ``path`` exists and is not a directory, or its nearest existing ancestor (itself
        when it exists) is not a writable directory.
    """
    if path.exists() and not path.is_dir():
        raise WsiregError("exists and is not a directory", path)
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():  # e.g. a share that is not mounted
        raise WsiregError(
            f"cannot create a directory under {existing}: a broken symbolic link "
            f"(to {os.readlink(existing)})",
            path,
        )
    if not existing.is_dir():
        raise WsiregError(f"cannot create a directory under {existing}: not a directory", path)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WsiregError(f"cannot write here: {existing} is not writable", path)


def check_not_over_inputs(
    out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None]
) -> None:
    """Refuse an output that is one of ``inputs`` or a directory holding one (writing it, and
    replacing or emptying it with ``--overwrite``, would destroy the input), or a path inside
    an input directory (an OME-Zarr pyramid, a run's transform folder: it would be altered);
    symlinks followed.

    Raises
    ------
    WsiregError
        Naming the output and the input it would destroy.
    """
    o = Path(out).resolve()
    for p in inputs:
        if p is None:
            continue
        q = Path(p).resolve()
        if q == o or o in q.parents:
            raise WsiregError(f"is or holds the input {p}: choose another output", out)
        if q in o.parents and q.is_dir():
            raise WsiregError(f"is inside the input {p}: choose another output", out)


PYRAMID = "OME-Zarr pyramid"


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path`` (a run's ``job.json``, ``stack.json``...), or None when the
    file is missing, unreadable, not JSON or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def first_names(names: Sequence[str], n: int = 3) -> str:
    """``names`` joined for a message, at most ``n`` of them ("a, b, c and 4 more")."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def other_results(run_dir: Path, whose: str = "") -> WsiregError:
    """The refusal of a run directory that holds another job's results (``whose``: which job,
    when known, as " (...)")."""
    return WsiregError(
        f"run directory exists and holds other results{whose} (use --overwrite to replace it)",
        run_dir,
    )


def _foreign_entries(path: Path, entries: frozenset[str] | None) -> list[str]:
    """Entries of the folder ``path`` that are not among ``entries`` (None: an OME-Zarr
    pyramid wsireg-flow wrote), its lock file and temporary names aside."""
    names = sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME and not is_partial(p.name))
    if entries is None:
        try:
            ours = "wsireg_flow" in json.loads((path / ".zattrs").read_text())
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:  # another tool's pyramid (or none): nothing in it is ours
            return names
        return [n for n in names if n not in (".zattrs", ".zgroup") and not n.isdigit()]
    return [n for n in names if n not in entries]


def check_replaceable(
    path: str | os.PathLike[str], kind: str = PYRAMID, entries: frozenset[str] | None = None
) -> None:
    """Refuse to let ``--overwrite`` (or a replaced inbox job) empty or replace the folder
    ``path`` unless it holds only what wsireg-flow writes in a ``kind`` folder: the top-level
    ``entries`` its writer declares (the default: an OME-Zarr pyramid whose ``.zattrs`` say
    wsireg-flow wrote it). A missing or empty folder is fine; a symbolic link is refused
    (replacing it would replace the link, not the folder). Whether a run is writing to it is
    :func:`check_unlocked`'s to say.

    Raises
    ------
    WsiregError
        Naming the folder and a few of the entries wsireg-flow did not write.
    """
    p = Path(path)
    if p.is_symlink():
        raise WsiregError("is a symbolic link: give the folder it points to", p)
    if not p.exists():
        return
    if not p.is_dir():
        raise WsiregError("exists and is not a directory", p)
    foreign = _foreign_entries(p, entries)
    if foreign:
        raise WsiregError(
            f"holds {first_names(foreign)}, which no {kind} of wsireg-flow holds: only what "
            "wsireg-flow wrote is replaced; choose another output or empty it yourself",
            p,
        )


def check_file_output(
    out: str | os.PathLike[str],
    overwrite: bool,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> Path:
    """Refuse, before any work, a single-file output that is or holds an input, that is a
    directory, or that exists (unless ``overwrite``); create its missing parent directories.
    Returns the output as a Path."""
    o = Path(out)
    check_not_over_inputs(o, inputs)
    if o.is_dir():
        raise WsiregError("exists and is a directory: choose a file name", o)
    if o.exists() and not overwrite:
        raise WsiregError("output exists (use --overwrite to replace it)", o)
    check_writable_dir(o.parent)
    o.parent.mkdir(parents=True, exist_ok=True)
    return o


def holds_results(run_dir: Path) -> bool:
    """Whether ``run_dir`` exists and holds anything besides its lock file."""
    return run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir())


def empty_run_dir(run_dir: Path) -> None:
    """Remove everything in ``run_dir`` except its lock file (held by the caller)."""
    for p in run_dir.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def temp_sibling(path: Path, kind: str = "partial") -> Path:
    """A unique hidden temporary name next to ``path`` (``.NAME.XXXXXXXX.partial``), where an
    output is written before its rename. Long names are shortened to 200 bytes so the
    temporary name stays within the 255-byte limit of file systems (``path`` itself fits)."""
    stem = path.name.encode()[:200].decode(errors="ignore")
    return path.with_name(f".{stem}.{uuid.uuid4().hex[:8]}.{kind}")


def is_partial(name: str) -> bool:
    """Whether a file or directory name is a temporary output (hidden, ``.partial`` or
    ``.tmp``): what a write interrupted before its rename leaves behind."""
    return name.startswith(".") and (".partial" in name or ".tmp" in name)


def remove_partials(run_dir: Path) -> list[Path]:
    """Delete the temporary outputs that interrupted runs left anywhere under ``run_dir``
    (call with the run's lock held, so no live writer owns them); returns what was removed."""
    found = [p for p in run_dir.rglob(".*") if is_partial(p.name)]
    removed = []
    for p in sorted(found, key=lambda q: len(q.parts)):
        if not p.exists():  # inside a partial directory removed above
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def drop_stale(run_dir: Path, fingerprints: Mapping[str, str]) -> list[str]:
    """Remove the outputs and markers of stages whose recorded fingerprint differs from
    ``fingerprints`` (settings or inputs changed): until they run again the directory must not
    look complete with results of the old settings. Returns the stages dropped."""
    dropped = []
    for name, fp in fingerprints.items():
        rec = read_record(run_dir, name)
        if rec is None or rec.fingerprint == fp:
            continue
        for out in rec.outputs:
            p = run_dir / out
            if run_dir.resolve() not in p.resolve().parents:  # only what lies inside the run
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        invalidate(run_dir, name)
        dropped.append(name)
    return dropped


def fingerprint(*parts: Any) -> str:
    """SHA-256 (hex, 16 chars) of the JSON form of ``parts`` (keys sorted)."""
    text = json.dumps([__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolved_path(path: str | os.PathLike[str] | None) -> str | None:
    """``path`` absolute with symlinks followed, as text (None stays None): how job records
    and fingerprints name an input, whatever directory the command ran from."""
    return None if path is None else str(Path(path).resolve())


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
    try:
        outputs = fn()
    finally:
        release_freed_memory()
    mark_complete(run_dir, name, fp, outputs, time.perf_counter() - t0)
    return True


def _libc(name: str) -> Callable[..., int] | None:
    """A function of the process's own C library (no library search), or None without it."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError, TypeError):
        return None


def release_freed_memory() -> bool:
    """Give memory the process has freed back to the system (glibc ``malloc_trim``).

    glibc keeps freed blocks of up to 32 MB in its heap, so without this the resident size
    after a stage stays near that stage's peak, and the next stage's peak adds on top: at
    10000² the QC stage peaked at 1.0 GB, against 0.8 GB with a trim after every stage. Returns
    whether anything could be trimmed (False where the C library is not glibc).
    """
    trim = _libc("malloc_trim")
    return bool(trim(0)) if trim is not None else False


_M_ARENA_MAX = -8  # glibc <malloc.h>


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Let glibc's malloc keep at most ``arenas`` heaps for all the threads of this process.

    glibc gives threads that allocate at the same time heaps of their own (up to 8 per core),
    and ``malloc_trim`` (:func:`release_freed_memory`) cannot return the free top of those
    per-thread heaps. After the tile and warp stages had run in Dask's worker threads, 0.1-0.25
    GB stayed resident that way, under every later stage's peak. Measured on the 10000² and
    20000² benchmark pairs (2 worker threads): peak RSS 0.69-0.71 GB -> 0.55-0.58 GB, in the
    same time (one arena cost 7 % more time at 20000²).

    A process-wide setting, made by the application at start (the command line calls it before
    anything runs): it applies to threads that have not allocated yet. Returns whether it was
    set (False where the C library is not glibc).
    """
    mallopt = _libc("mallopt")
    return bool(mallopt(_M_ARENA_MAX, arenas)) if mallopt is not None else False


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    tmp.write_text(json.dumps(data, indent=2, default=json_default))
    os.replace(tmp, path)


def json_default(o: Any) -> Any:
    """``json.dumps`` default: numpy scalars and arrays as Python numbers and lists, anything
    else as its string."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
