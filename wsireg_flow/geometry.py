"""Affine matrices and coordinate conventions between pyramid levels.

Conventions
-----------
* Points are (x, y) in pixels, x = column, y = row, origin at the centre of the top-left pixel.
* An affine is a 3x3 matrix acting on homogeneous column vectors (x, y, 1). Registration
  affines map TARGET coordinates to SOURCE coordinates (backward map).
* A level with downsample ``d`` (level-0 pixels per level pixel, box-averaged) has its pixel
  ``u`` centred at level-0 coordinate ``(u + 0.5) * d - 0.5``.
* Landmark CSVs (ANHIR, ImageJ) and GeoJSON annotations (QuPath) put the origin at the
  top-left corner of the top-left pixel instead: :func:`corner_origin` adapts a point map.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PointMap = Callable[[np.ndarray], np.ndarray]
"""A map of (N, 2) (x, y) point arrays."""


def corner_origin(point_map: PointMap) -> PointMap:
    """``point_map`` (pixel-centre origin, as every transform here) for points whose origin is
    the top-left corner of the top-left pixel (landmark CSVs, GeoJSON): shifted by half a
    pixel on the way in and back on the way out. Without the shift a map with linear part L
    moves corner-origin points by (L - I) (0.5, 0.5): a whole pixel in x for a mirror."""

    def mapped(points: np.ndarray) -> np.ndarray:
        return point_map(np.asarray(points, dtype=np.float64) - 0.5) + 0.5

    return mapped


def level_to_level0(d: float) -> np.ndarray:
    """3x3 affine from level coordinates (downsample ``d``) to level-0 coordinates."""
    o = 0.5 * d - 0.5
    return np.array([[d, 0.0, o], [0.0, d, o], [0.0, 0.0, 1.0]])


def rescale_affine(matrix0: np.ndarray, d_target: float, d_source: float) -> np.ndarray:
    """Express a level-0 target->source affine between levels with downsamples d_t, d_s."""
    return np.linalg.inv(level_to_level0(d_source)) @ matrix0 @ level_to_level0(d_target)


def to_level0_affine(matrix_k: np.ndarray, d_target: float, d_source: float) -> np.ndarray:
    """Inverse of :func:`rescale_affine`: a level affine expressed in level-0 coordinates."""
    return level_to_level0(d_source) @ matrix_k @ np.linalg.inv(level_to_level0(d_target))


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (N, 2) (x, y) points by a 3x3 (or 2x3) affine."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ matrix[:2, :2].T + matrix[:2, 2]


def translation(dx: float, dy: float) -> np.ndarray:
    """3x3 affine adding (dx, dy) to (x, y) points."""
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def as3x3(matrix: np.ndarray) -> np.ndarray:
    """A 2x3 affine (OpenCV style) as 3x3."""
    m = np.eye(3)
    m[:2] = np.asarray(matrix, dtype=np.float64)[:2]
    return m


def rotation_about(
    angle_deg: float,
    center_t: tuple[float, float],
    center_s: tuple[float, float],
    scale: float = 1.0,
    flip_width: float | None = None,
) -> np.ndarray:
    """Target->source affine on (x, y) points: rotate by ``angle_deg`` (and scale) about the
    target centre ``center_t`` (x, y) onto the source centre ``center_s`` (x, y).

    With ``flip_width`` the source is additionally mirrored in x (x -> flip_width - 1 - x): the
    rotation then lands on the mirrored source centre, which the mirror sends back to
    ``center_s``, so the target centre still maps onto the source centre.
    """
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a) * scale, np.sin(a) * scale
    lin = np.array([[c, -s], [s, c]])
    onto = np.asarray(center_s, dtype=np.float64)
    if flip_width is not None:
        onto = np.array([flip_width - 1.0 - onto[0], onto[1]])
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = onto - lin @ np.asarray(center_t)
    if flip_width is not None:
        m = flip_x(flip_width) @ m
    return m


def flip_x(width: float) -> np.ndarray:
    """3x3 affine mirroring x in an image ``width`` pixels wide (its own inverse)."""
    return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def nearest_similarity(matrix: np.ndarray, center: tuple[float, float]) -> np.ndarray:
    """The similarity (rotation, uniform scale, translation, mirror kept) closest to an affine.

    The linear part is the least-squares projection onto rotation-scale matrices (onto
    mirrored ones when the determinant is negative); the translation keeps the image of the
    (x, y) point ``center`` (pick the image centre so the change is smallest where it matters).
    """
    m = np.asarray(matrix, dtype=np.float64)
    (p, q), (r, s) = m[0, :2], m[1, :2]
    if p * s - q * r >= 0:
        a, b = (p + s) / 2, (r - q) / 2
        lin = np.array([[a, -b], [b, a]])
    else:
        a, b = (p - s) / 2, (q + r) / 2
        lin = np.array([[a, b], [b, -a]])
    c = np.asarray(center, dtype=np.float64)
    out = np.eye(3)
    out[:2, :2] = lin
    out[:2, 2] = m[:2, :2] @ c + m[:2, 2] - lin @ c
    return out


def decompose(matrix: np.ndarray) -> dict[str, float]:
    """Scale, rotation (deg), shear and reflection of an affine's linear part.

    ``scale`` is sqrt(|det|); ``anisotropy`` the ratio of singular values; ``shear`` the
    off-diagonal of the upper-triangular factor of a QR decomposition, relative to scale.
    """
    lin = np.asarray(matrix, dtype=np.float64)[:2, :2]
    det = float(np.linalg.det(lin))
    sv = np.linalg.svd(lin, compute_uv=False)
    q, r = np.linalg.qr(lin)
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1
    q, r = q * signs, (r.T * signs).T
    return {
        "scale": float(np.sqrt(abs(det))),
        "rotation_deg": float(np.rad2deg(np.arctan2(q[1, 0], q[0, 0]))),
        "shear": float(r[0, 1] / max(abs(r[1, 1]), 1e-12)),
        "anisotropy": float(sv[0] / max(sv[1], 1e-12)),
        "reflection": float(det < 0),
    }
