"""The registration result: a level-0 affine plus a non-rigid residual, both directions.

Backward map (target -> source, what resampling needs), on level-0 (x, y) coordinates::

    B(x) = A (x + r(x))

with A a 3x3 affine and r the backward residual field (target frame, level-0 pixels).
Forward map (source -> target)::

    F(p) = q + s(q),  q = A^-1 p

with s the inverse residual (x + s(x) + r(x + s(x)) = x), stored on the same target grid.
Points are mapped exactly by solving x + r(x) = q per point; images use the stored s.

On disk (``DIR/transform/``): ``affine.json`` (matrix, level-0 px, target->source, plus
metadata), ``backward.zarr`` and ``inverse.zarr`` (see :mod:`wsireg_flow.field`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsireg_flow.errors import InputError
from wsireg_flow.field import StoredField, invert_points, load_field, sample, save_field
from wsireg_flow.geometry import apply_affine


@dataclass
class Transform:
    """Affine + residual fields mapping between a target and a source slide (level-0 px)."""

    affine: np.ndarray  # 3x3 target -> source
    backward: StoredField | None  # residual r on the target grid
    inverse: StoredField | None  # residual s on the target grid
    target_shape: tuple[int, int]  # (H, W) level 0
    source_shape: tuple[int, int]
    meta: dict[str, Any] = field(default_factory=dict)

    # -- residual sampling ------------------------------------------------------------------
    @staticmethod
    def _residual_at(f: StoredField | None, points_xy: np.ndarray) -> np.ndarray:
        """Residual (dx, dy) in level-0 px at (N, 2) level-0 (x, y) points."""
        if f is None or len(points_xy) == 0:
            return np.zeros_like(points_xy, dtype=np.float64)
        gx = (points_xy[:, 0] - f.origin) / f.spacing
        gy = (points_xy[:, 1] - f.origin) / f.spacing
        v = sample(f.data, gy[None].astype(np.float32), gx[None].astype(np.float32))[:, 0, :]
        return np.stack([v[1], v[0]], axis=1).astype(np.float64)

    def residual_grid(self, f: StoredField | None, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Residual (2, h, w) as (dy, dx) level-0 px on the level-0 box [y0:y0+h, x0:x0+w]."""
        if f is None:
            return np.zeros((2, h, w), np.float32)
        gy = (np.arange(y0, y0 + h, dtype=np.float32) - f.origin) / f.spacing
        gx = (np.arange(x0, x0 + w, dtype=np.float32) - f.origin) / f.spacing
        yy, xx = np.meshgrid(gy, gx, indexing="ij")
        return sample(f.data, yy, xx)

    # -- points -------------------------------------------------------------------------------
    def target_to_source(self, points_xy: np.ndarray) -> np.ndarray:
        """Map (N, 2) target (x, y) points into the source frame: A (x + r(x))."""
        p = np.asarray(points_xy, np.float64).reshape(-1, 2)
        return apply_affine(self.affine, p + self._residual_at(self.backward, p))

    def source_to_target(self, points_xy: np.ndarray, exact: bool = True) -> np.ndarray:
        """Map (N, 2) source (x, y) points into the target frame: solve A (x + r(x)) = p.

        ``exact`` solves per point by fixed-point iteration on the backward field; otherwise the
        stored inverse field is used: q + s(q) with q = A^-1 p (what image warping uses).
        """
        p = np.asarray(points_xy, np.float64).reshape(-1, 2)
        q = apply_affine(np.linalg.inv(self.affine), p)
        if not exact:
            return q + self._residual_at(self.inverse, q)
        if self.backward is None or len(q) == 0:
            return q
        f = self.backward
        grid_q = np.stack([(q[:, 1] - f.origin) / f.spacing, (q[:, 0] - f.origin) / f.spacing], 1)
        x = invert_points(f.data / np.float32(f.spacing), grid_q)
        out = np.stack([x[:, 1] * f.spacing + f.origin, x[:, 0] * f.spacing + f.origin], 1)
        out[~np.all(np.isfinite(p), axis=1)] = np.nan
        return out.astype(np.float64)

    # -- images -----------------------------------------------------------------------------
    def backward_coords(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Source level-0 (x, y) maps, each (h, w) float32, for the target box (level 0)."""
        r = self.residual_grid(self.backward, y0, x0, h, w)
        ys = np.arange(y0, y0 + h, dtype=np.float32)[:, None]  # broadcast, no full grids
        xs = np.arange(x0, x0 + w, dtype=np.float32)[None, :]
        px, py = r[1] + xs, r[0] + ys
        a = self.affine.astype(np.float32)
        mx = px * a[0, 0]
        mx += py * a[0, 1]
        mx += a[0, 2]
        my = px * a[1, 0]
        my += py * a[1, 1]
        my += a[1, 2]
        return mx, my

    # -- storage -----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``affine.json`` and the stored fields (``backward.zarr``, ``inverse.zarr``)
        into ``directory`` (created if needed); returns it."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        info = {
            "convention": "3x3 affine on level-0 (x, y) pixel centres, TARGET -> SOURCE",
            "affine": self.affine.tolist(),
            "target_shape": list(self.target_shape),
            "source_shape": list(self.source_shape),
            "backward": "backward.zarr" if self.backward is not None else None,
            "inverse": "inverse.zarr" if self.inverse is not None else None,
            **self.meta,
        }
        if self.backward is not None:
            save_field(d / "backward.zarr", self.backward)
        if self.inverse is not None:
            save_field(d / "inverse.zarr", self.inverse)
        (d / "affine.json").write_text(json.dumps(info, indent=2, default=_json_default))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Transform:
        """Read a directory written by :meth:`save`; :class:`InputError` names the bad file."""
        d = Path(directory)
        try:
            info = json.loads((d / "affine.json").read_text())
            affine = np.asarray(info.pop("affine"), np.float64)
            ts = tuple(int(v) for v in info.pop("target_shape"))
            ss = tuple(int(v) for v in info.pop("source_shape"))
        except Exception as exc:  # missing file or key, not JSON, not numbers
            if (d / "transform" / "affine.json").is_file():  # the run directory was given
                raise InputError(f"is a run directory: give {d / 'transform'}", d) from exc
            raise InputError(f"not a transform directory ({type(exc).__name__}: {exc})", d) from exc
        if affine.shape != (3, 3) or len(ts) != 2 or len(ss) != 2:
            raise InputError(
                f"affine must be 3x3 and shapes (y, x), got {affine.shape}, {ts}, {ss}",
                d / "affine.json",
            )
        back = load_field(d / info["backward"]) if info.get("backward") else None
        inv = load_field(d / info["inverse"]) if info.get("inverse") else None
        for k in ("convention", "backward", "inverse"):
            info.pop(k, None)
        return cls(affine, back, inv, ts, ss, info)  # type: ignore[arg-type]


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass
class TransformChain:
    """Backward maps applied in sequence: reference -> ... -> section (serial sections).

    ``transforms[0]`` maps the reference frame into its neighbour, the next one that neighbour
    into the following section, and so on. An empty chain is the identity on ``target_shape``.
    """

    transforms: list[Transform]
    target_shape: tuple[int, int]

    def target_to_source(self, points_xy: np.ndarray) -> np.ndarray:
        """Map (N, 2) reference-frame (x, y) level-0 px into the last section's frame."""
        p = np.asarray(points_xy, np.float64).reshape(-1, 2)
        for t in self.transforms:
            p = t.target_to_source(p)
        return p

    def source_to_target(self, points_xy: np.ndarray, exact: bool = True) -> np.ndarray:
        """Map (N, 2) (x, y) level-0 px of the last section into the reference frame (each
        transform inverted in turn; ``exact`` as in :meth:`Transform.source_to_target`)."""
        p = np.asarray(points_xy, np.float64).reshape(-1, 2)
        for t in reversed(self.transforms):
            p = t.source_to_target(p, exact=exact)
        return p

    def backward_coords(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Section level-0 (x, y) maps, each (h, w) float32, for a reference-frame box."""
        if not self.transforms:
            ys, xs = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
            return xs, ys
        mx, my = self.transforms[0].backward_coords(y0, x0, h, w)
        if len(self.transforms) > 1:
            pts = np.stack([mx.ravel(), my.ravel()], axis=1).astype(np.float64)
            for t in self.transforms[1:]:
                pts = t.target_to_source(pts)
            mx = pts[:, 0].reshape(h, w).astype(np.float32)
            my = pts[:, 1].reshape(h, w).astype(np.float32)
        return mx, my


@dataclass
class InverseView:
    """A Transform seen the other way round: resamples TARGET-frame images into the SOURCE frame.

    ``backward_coords`` gives, for a source-frame box, the target (x, y) each pixel comes from:
    F(p) = q + s(q), q = A^-1 p, using the stored inverse residual.
    """

    transform: Transform

    @property
    def target_shape(self) -> tuple[int, int]:
        """(H, W) level-0 px of the frame this view resamples into (the source slide's)."""
        return self.transform.source_shape

    def backward_coords(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Target level-0 (x, y) maps, each (h, w) float32, for a source-frame box whose top-left
        pixel is (y0, x0)."""
        ys, xs = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float64)
        inv = np.linalg.inv(self.transform.affine)
        qx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
        qy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
        f = self.transform.inverse
        if f is None:
            return qx.astype(np.float32), qy.astype(np.float32)
        r = sample(f.data, (qy - f.origin) / f.spacing, (qx - f.origin) / f.spacing)
        return (qx + r[1]).astype(np.float32), (qy + r[0]).astype(np.float32)
