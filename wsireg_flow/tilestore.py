"""Storage of the non-rigid stage's state: tile results and level reports, without pickles.

A level's tiles go to one ``.npz`` (residuals and weights as arrays, the rest as JSON bytes);
a :class:`~wsireg_flow.register.LevelReport` goes to a JSON-ready dict (its confidence map as
nested lists, NaN as null).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from wsireg_flow.nonrigid import TileResult
from wsireg_flow.register import LevelReport, LevelTiles
from wsireg_flow.stages import json_default, temp_sibling


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write arrays to a compressed ``.npz`` atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    os.replace(tmp, path)


def report_to_dict(r: LevelReport) -> dict[str, Any]:
    """A level report as a JSON-ready dict (NaN confidences of tiles without tissue as null)."""
    d = {k: v for k, v in vars(r).items() if k != "confidence_map"}
    d["confidence_map"] = np.where(np.isnan(r.confidence_map), None, r.confidence_map).tolist()
    return d


def report_from_dict(d: dict[str, Any]) -> LevelReport:
    """The level report stored by :func:`report_to_dict`."""
    d = dict(d)
    conf = np.array(
        [[np.nan if v is None else v for v in row] for row in d.pop("confidence_map")], np.float32
    )
    d["shape"] = tuple(d["shape"])
    return LevelReport(**d, confidence_map=conf)


def save_tiles(path: Path, t: LevelTiles) -> None:
    """Write one level's tile results (residuals, weights, statuses) to an ``.npz`` (no pickles)."""
    arrays: dict[str, np.ndarray] = {"prior": t.prior, "mask": t.mask}
    meta = {
        "target_level": t.target_level,
        "source_level": t.source_level,
        "shape": t.shape,
        "downsample": t.downsample,
        "seconds": t.seconds,
        "tiles": [],
    }
    for i, r in enumerate(t.results):
        if r.residual is not None and r.weight is not None:
            arrays[f"residual_{i}"], arrays[f"weight_{i}"] = r.residual, r.weight
        meta["tiles"].append(
            {
                "box": r.box,
                "confidence": r.confidence,
                "tissue": r.tissue,
                "ncc_before": r.ncc_before,
                "ncc_after": r.ncc_after,
                "status": r.status,
            }
        )
    arrays["meta"] = np.frombuffer(json.dumps(meta, default=json_default).encode(), np.uint8)
    _save_npz(path, **arrays)


def load_tiles(path: Path) -> LevelTiles:
    """Read the tile results written by :func:`save_tiles`, every tile's arrays included."""
    with np.load(path, allow_pickle=False) as z:
        return _level_tiles(z, with_arrays=True)


@contextmanager
def open_tiles(path: Path) -> Iterator[LevelTiles]:
    """The tile results written by :func:`save_tiles`, each tile's arrays read when used.

    The results hold no arrays; ``LevelTiles.tile_arrays(i)`` reads tile ``i``'s residual and
    weight from the open file (decompressed each time it is called). The stitch blends the
    tiles one by one this way instead of holding them all (0.2 GB at a 2500² working grid).
    """
    with np.load(path, allow_pickle=False) as z:
        yield _level_tiles(z, with_arrays=False)


def _tile_arrays(z: Any, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    if f"residual_{i}" not in z:
        return None, None
    return z[f"residual_{i}"], z[f"weight_{i}"]


def _level_tiles(z: Any, with_arrays: bool) -> LevelTiles:
    """The LevelTiles of an open ``.npz`` (``np.lib.npyio.NpzFile``)."""
    meta = json.loads(bytes(z["meta"]).decode())
    results = []
    for i, m in enumerate(meta["tiles"]):
        residual, weight = _tile_arrays(z, i) if with_arrays else (None, None)
        results.append(
            TileResult(
                tuple(m["box"]),
                residual,
                weight,
                m["confidence"],
                m["tissue"],  # type: ignore[arg-type]
                m["ncc_before"],
                m["ncc_after"],
                m["status"],
            )
        )
    return LevelTiles(
        meta["target_level"],
        meta["source_level"],
        tuple(meta["shape"]),  # type: ignore[arg-type]
        meta["downsample"],
        z["prior"],
        z["mask"],
        results,
        meta["seconds"],
        read_arrays=None if with_arrays else lambda i: _tile_arrays(z, i),
    )
