"""Warp GeoJSON annotations (QuPath style) between the target and source frames.

Coordinates are (x, y) level-0 pixels of the slide they belong to, as QuPath exports them
(origin at the top-left corner of the top-left pixel: see :func:`geometry.corner_origin`).
Supported geometries: Point, MultiPoint, LineString, MultiLineString, Polygon (holes kept),
MultiPolygon and GeometryCollection; a FeatureCollection, a list of features (QuPath's
"export as array"), a single Feature or a bare geometry. Properties are kept untouched.
Rings stay closed; optional densification adds vertices along long edges first so that a
non-rigid warp bends them.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsireg_flow.errors import InputError
from wsireg_flow.geometry import PointMap, corner_origin
from wsireg_flow.stages import check_file_output, temp_sibling
from wsireg_flow.transform import Transform

Direction = Literal["source-to-target", "target-to-source"]


def _densify(ring: np.ndarray, step: float) -> np.ndarray:
    """Vertices added along edges longer than ``step`` px (in x, y; further values of the
    (N, D) positions are interpolated alike)."""
    if step <= 0 or len(ring) < 2:
        return ring
    out = [ring[0]]
    for a, b in itertools.pairwise(ring):
        n = int(np.ceil(np.linalg.norm(b[:2] - a[:2]) / step))
        for k in range(1, n):
            out.append(a + (b - a) * k / n)
        out.append(b)
    return np.array(out)


MAX_COORDINATE = 1e9  # px: beyond any slide, and within the float32 range of the fields


def _positions(coords: Any) -> np.ndarray:
    """(N, D) float array of GeoJSON positions ``[x, y(, z...)]``, D >= 2 and the same for
    all; refuses non-finite values (JSON has no NaN: the output would not parse)."""
    if len({len(c) for c in coords}) > 1:
        raise ValueError("the positions of one geometry must all have as many values")
    pts = np.asarray(coords, np.float64)
    if pts.ndim != 2 or pts.shape[1] < 2:
        raise ValueError(f"positions must be [x, y] or [x, y, z], got {coords!r:.80}")
    bad = ~np.isfinite(pts).all(axis=1)
    if bad.any():
        raise ValueError(f"position {pts[bad][0].tolist()} is not finite")
    far = (np.abs(pts[:, :2]) > MAX_COORDINATE).any(axis=1)
    if far.any():
        raise ValueError(f"position {pts[far][0].tolist()} is beyond {MAX_COORDINATE:g} px")
    return pts


def _map_coords(coords: Any, fn: PointMap, depth: int, step: float) -> Any:
    """Map a GeoJSON coordinate array of nesting ``depth`` (0 = one position). Only x and y
    are mapped; further values of a position (z, a measure) are kept as they are."""
    if depth == 0:
        pts = _positions([coords])
        pts[:, :2] = _finite(fn(pts[:, :2]))
        return pts[0].tolist()
    if depth == 1:
        if len(coords) == 0:  # an empty geometry (RFC 7946 allows it)
            return []
        pts = _positions(coords)
        closed = len(pts) > 2 and np.allclose(pts[0, :2], pts[-1, :2])
        pts = _densify(pts, step) if step > 0 else pts
        pts[:, :2] = _finite(fn(pts[:, :2]))
        if closed:
            pts[-1] = pts[0]
        return pts.tolist()
    return [_map_coords(c, fn, depth - 1, step) for c in coords]


def _finite(mapped: np.ndarray) -> np.ndarray:
    """``mapped`` (N, 2) when every value is finite (a position far beyond the float32 range
    of the fields maps to inf, which JSON cannot hold)."""
    if not np.isfinite(mapped).all():
        raise ValueError("a position maps beyond the range of numbers")
    return mapped


_DEPTH = {
    "Point": 0,
    "MultiPoint": 1,
    "LineString": 1,
    "MultiLineString": 2,
    "Polygon": 2,
    "MultiPolygon": 3,
}


def warp_geometry(geom: dict[str, Any], fn: PointMap, densify: float = 0.0) -> dict[str, Any]:
    """A copy of ``geom`` with every position mapped by ``fn`` ((N, 2) -> (N, 2))."""
    kind = geom.get("type")
    out = copy.deepcopy(geom)
    if kind == "GeometryCollection":
        out["geometries"] = [warp_geometry(g, fn, densify) for g in geom["geometries"]]
        return out
    if kind not in _DEPTH:
        raise ValueError(f"unsupported geometry type {kind!r}")
    step = densify if kind not in ("Point", "MultiPoint") else 0.0
    out["coordinates"] = _map_coords(geom["coordinates"], fn, _DEPTH[kind], step)
    return out


def warp_geojson(
    data: Any,
    transform: Transform,
    direction: Direction = "source-to-target",
    densify: float = 0.0,
) -> Any:
    """Warp every geometry of a GeoJSON object (same structure returned, properties kept)."""
    if direction == "source-to-target":
        fn = corner_origin(transform.source_to_target)
    elif direction == "target-to-source":
        fn = corner_origin(transform.target_to_source)
    else:
        raise ValueError(f"direction must be source-to-target or target-to-source, got {direction}")

    def feature(f: dict[str, Any]) -> dict[str, Any]:
        g = dict(f)
        if f.get("geometry") is not None:
            g["geometry"] = warp_geometry(f["geometry"], fn, densify)
        return g

    if isinstance(data, list):
        return [feature(f) for f in data]
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "FeatureCollection":
        return {**data, "features": [feature(f) for f in data["features"]]}
    if kind == "Feature":
        return feature(data)
    return warp_geometry(data, fn, densify)


def warp_geojson_file(
    transform_dir: str | os.PathLike[str],
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    direction: Direction = "source-to-target",
    densify: float = 0.0,
    overwrite: bool = False,
) -> Path:
    """Read, warp and write a GeoJSON file (written atomically; an existing ``out`` only with
    ``overwrite``, never over ``src`` or the transform)."""
    p = Path(src)
    if not p.is_file():
        raise InputError("file not found", p)
    o = check_file_output(out, overwrite, [p, transform_dir])
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid JSON ({exc})", p) from None
    transform = Transform.load(transform_dir)  # its own one-line error names the directory
    try:
        warped = warp_geojson(data, transform, direction, densify)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise InputError(f"not valid GeoJSON ({type(exc).__name__}: {exc})", p) from None
    tmp = temp_sibling(o)
    tmp.write_text(json.dumps(warped, allow_nan=False))
    os.replace(tmp, o)
    return o
