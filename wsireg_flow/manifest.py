"""Job manifests for the inbox: one YAML file per job (a pair or a stack) plus its config.

Example (paths relative to the data root, which they cannot leave)::

    kind: pair
    target: slides/case1_HE.svs
    source: slides/case1_CD31.svs
    target_landmarks: slides/case1_HE.csv      # optional
    source_landmarks: slides/case1_CD31.csv    # optional
    config:                                    # optional overrides of configs/default.yaml
      nonrigid: {tile: 768}

    kind: stack
    sections: [s1.svs, s2.svs, s3.svs]         # or  folder: slides/case2
    reference: 1                               # optional, default middle
"""

from __future__ import annotations

import difflib
import os
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from wsireg_flow.config import Config, config_from_dict, load_yaml
from wsireg_flow.errors import ConfigError, InputError, WsiregError
from wsireg_flow.landmarks import resolve_path


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["pair", "stack"]
    target: str | None = None
    source: str | None = None
    target_landmarks: str | None = None
    source_landmarks: str | None = None
    sections: list[str] | None = None
    folder: str | None = None
    reference: int | None = None
    landmarks: list[str] | None = None
    config: dict[str, Any] | None = None


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest (YAML safe loader; unknown keys refused)."""
    p = Path(path)
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"not a readable YAML manifest ({first})", p) from None
    if not isinstance(data, dict):
        raise InputError("a manifest must be a mapping", p)
    try:
        m = Manifest.model_validate(data)
    except ValidationError as exc:
        parts = [_explain(e) for e in exc.errors()]
        if data.get("kind") == "pair":
            missing = [k for k in ("target", "source") if not data.get(k)]
            if missing:
                parts.append(f"a pair manifest needs {' and '.join(map(repr, missing))}")
        raise InputError(f"invalid manifest: {'; '.join(parts)}", p) from None
    if m.kind == "pair" and (not m.target or not m.source):
        raise InputError("a pair manifest needs 'target' and 'source'", p)
    if m.kind == "stack" and not (m.sections or m.folder):
        raise InputError("a stack manifest needs 'sections' or 'folder'", p)
    if m.kind == "stack" and m.sections and m.folder:
        raise InputError("a stack manifest takes 'sections' or 'folder', not both", p)
    foreign = sorted(k for k in _KIND_KEYS[m.kind] if data.get(k) is not None)
    if foreign:
        raise InputError(
            f"{', '.join(map(repr, foreign))} belong(s) to the other manifest kind, not to a "
            f"{m.kind} manifest (it would be ignored)",
            p,
        )
    return m


_KIND_KEYS = {
    "pair": ("sections", "folder", "reference", "landmarks"),
    "stack": ("target", "source", "target_landmarks", "source_landmarks"),
}
"""Keys of the other kind of manifest, refused rather than silently ignored."""


def _explain(error: Any) -> str:
    """One pydantic error as "'key': message", suggesting the closest known key for a typo."""
    loc = ".".join(map(str, error["loc"]))
    text = f"{loc!r}: {error['msg']}"
    if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
        close = difflib.get_close_matches(str(error["loc"][0]), Manifest.model_fields, n=1)
        if close:
            text += f" (did you mean {close[0]!r}?)"
    return text


def manifest_config(m: Manifest, base: Config, path: Path) -> Config:
    """The base config with the manifest's overrides applied (validated)."""
    if not m.config:
        return base
    merged = _deep_merge(base.model_dump(mode="json"), m.config)
    try:
        return config_from_dict(merged, path)
    except ConfigError:
        raise


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def resolve(root: Path, rel: str | None) -> Path | None:
    """A manifest path under ``root`` (refused when it escapes it)."""
    return None if rel is None else resolve_path(root, rel)


def manifest_inputs(m: Manifest, root: Path) -> list[Path]:
    """Every input a manifest names: slides, landmark files, stack sections or folder.

    Parameters
    ----------
    m
        A validated manifest.
    root
        The data root its paths are relative to.

    Returns
    -------
    list of pathlib.Path
        The paths under ``root``, in the manifest's order (a folder stands for its contents).

    Raises
    ------
    InputError
        When a path escapes ``root``.
    """
    named = [m.target, m.source, m.target_landmarks, m.source_landmarks, m.folder]
    named += [*(m.sections or []), *(m.landmarks or [])]
    return [resolve_path(root, rel) for rel in named if rel is not None]


def last_modified(path: Path) -> float | None:
    """The latest modification time of ``path`` and, for a folder, of everything under it.

    Parameters
    ----------
    path
        A file or folder (an OME-Zarr store, a folder of sections).

    Returns
    -------
    float or None
        Seconds since the epoch; None when ``path`` does not exist.
    """
    try:
        latest = path.stat().st_mtime
    except (FileNotFoundError, NotADirectoryError):
        return None
    if path.is_dir():
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    latest = max(latest, os.stat(os.path.join(folder, name)).st_mtime)
                except (FileNotFoundError, NotADirectoryError):
                    pass  # removed while we looked, or a dangling link
    return latest


def unsettled(manifest: Path, root: Path, settle: float, now: float | None = None) -> list[Path]:
    """What keeps a manifest from being taken: files modified less than ``settle`` s ago.

    A manifest is taken when it and every input it names have not changed for ``settle``
    seconds (a slide or a manifest still being copied would fail as truncated or incomplete).
    A manifest that cannot be read, or that names a missing input or one outside the data root,
    is taken once the manifest itself has settled: running it reports the problem.

    Parameters
    ----------
    manifest
        The manifest file.
    root
        The data root its paths are relative to.
    settle
        Seconds without modification (0: take everything at once).
    now
        The current time (default: the clock).

    Returns
    -------
    list of pathlib.Path
        The manifest alone while it is too young; else its inputs that are too young; empty
        when the manifest may be taken.
    """
    if settle <= 0:
        return []
    now = time.time() if now is None else now

    def young(p: Path) -> bool:
        t = last_modified(p)
        return t is not None and now - t < settle

    if young(manifest):
        return [manifest]
    try:
        inputs = manifest_inputs(load_manifest(manifest), root)
    except WsiregError:
        return []
    return [p for p in inputs if young(p)]
