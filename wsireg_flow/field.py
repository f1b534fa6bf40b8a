"""Dense displacement fields: tiling, blending, composition, inversion, checks, storage.

Conventions
-----------
* A field is a float32 array of shape (2, H, W): component 0 is the y (row) displacement and
  component 1 the x (column) displacement, in pixels of the grid it lives on unless stated.
* Grid node (i, j) sits at level-0 coordinate (x, y) = (origin + j * spacing, origin + i *
  spacing); for a pyramid level with downsample d, spacing = d and origin = 0.5 d - 0.5.
* A backward residual r maps a target grid point x to x + r(x).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import zarr
from scipy import ndimage as ndi

from wsireg_flow.errors import InputError

Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), half-open, in grid pixels


def tile_boxes(shape: tuple[int, int], tile: int, overlap: int) -> list[Box]:
    """Overlapping tiles covering a (H, W) grid: stride ``tile - overlap``, last tile flush.

    Tiles are ``tile`` px square (smaller only when the grid is), as (y0, x0, y1, x1).
    """
    if overlap * 2 >= tile:
        raise ValueError("overlap must be less than half the tile size")

    def starts(n: int) -> list[int]:
        if n <= tile:
            return [0]
        step = tile - overlap
        s = list(range(0, n - tile, step))
        s.append(n - tile)
        return s

    h, w = shape
    return [(y0, x0, min(h, y0 + tile), min(w, x0 + tile)) for y0 in starts(h) for x0 in starts(w)]


def blend_window(box: Box, shape: tuple[int, int], overlap: int) -> np.ndarray:
    """(h, w) weights of one tile: linear ramps over the overlap, 1 at grid borders.

    For tiles from :func:`tile_boxes` the ramps of neighbours add up to one across overlaps
    only approximately (the last tile's overlap can be larger); :func:`stitch` divides by the
    summed weights, so the blend always sums to one.
    """
    y0, x0, y1, x1 = box

    def ramp(n: int, at_start: bool, at_end: bool) -> np.ndarray:
        r = np.ones(n, np.float32)
        if overlap > 0:
            k = np.arange(n, dtype=np.float32)
            up = (k + 0.5) / overlap
            down = (n - k - 0.5) / overlap
            if not at_start:
                r = np.minimum(r, up)
            if not at_end:
                r = np.minimum(r, down)
        return np.clip(r, 1e-3, 1.0)

    wy = ramp(y1 - y0, y0 == 0, y1 == shape[0])
    wx = ramp(x1 - x0, x0 == 0, x1 == shape[1])
    return np.outer(wy, wx)


def stitch(
    tiles: Iterable[tuple[np.ndarray | None, np.ndarray | None, Box]],
    shape: tuple[int, int],
    smooth_sigma: float = 0.0,
    fill_sigma: float = 0.0,
    prior: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend tile fields into one (2, H, W) field with weights that sum to one.

    Parameters
    ----------
    tiles : iterable of (field, weight, box)
        Each tile's (2, h, w) residual (dy, dx), its (h, w) per-pixel weight (blend window x
        confidence x tissue) and the Box where it sits on the grid; field or weight None: the
        tile is skipped, it contributes nothing. Used once, in order: a generator that reads
        each tile as it is blended keeps one tile in memory.
    smooth_sigma : float
        Gaussian sigma (grid px) of the regularisation: normalised convolution
        G*(w d) / (G*w + prior), so smoothing does not pull the field towards zero next to
        missing tiles (the weights are rebalanced), while far from any data the residual
        decays to zero (the coarse transform).
    fill_sigma : float
        Extra, wider normalised convolution used only where the blended weight is tiny.

    Returns
    -------
    field : (2, H, W) float32
    weight : (H, W) float32, the summed weight per pixel (0 where no tile contributed)
    """
    # float32 accumulators, in place, one component at a time: the float64 version needed 16
    # grid-sized float32 arrays at its peak (0.4 GB for a 2500² grid), this one about 8
    num = np.zeros((2, *shape), np.float32)
    den = np.zeros(shape, np.float32)
    for f, w, (y0, x0, y1, x1) in tiles:
        if f is None or w is None:
            continue
        num[:, y0:y1, x0:x1] += f * w
        den[y0:y1, x0:x1] += w
    den_s = _gauss(den, smooth_sigma) if smooth_sigma > 0 else den
    norm = den_s + np.float32(prior)
    np.maximum(norm, np.float32(1e-12), out=norm)
    if fill_sigma > 0:
        wide_norm = _gauss(den_s, fill_sigma)
        wide_norm += np.float32(prior)
        blend = den_s * np.float32(1 / 0.05)
        np.clip(blend, 0, 1, out=blend)
    del den_s
    for c in range(2):
        if smooth_sigma > 0:
            num[c] = _gauss(num[c], smooth_sigma)
        if fill_sigma > 0:
            wide = _gauss(num[c], fill_sigma)
            wide /= wide_norm
        num[c] /= norm
        if fill_sigma > 0:  # blend * near + (1 - blend) * wide
            num[c] -= wide
            num[c] *= blend
            num[c] += wide
    return num, den


def _gauss(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; wide kernels run on a grid reduced by ~sigma/4 and are upsampled back."""
    a = a.astype(np.float32, copy=False)
    factor = int(sigma // 4)
    if factor < 2 or min(a.shape) < 4 * factor:
        return cv2.GaussianBlur(a, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    h, w = a.shape
    small = cv2.resize(a, (-(-w // factor), -(-h // factor)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / factor, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def sample(field: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear samples of a (2, H, W) field at grid coordinates (ys, xs); edge-clamped.

    ``ys`` and ``xs`` have any common shape S; the result is (2, *S) float32. Up to 200k
    samples use exact bilinear weights (scipy); larger grids use ``cv2.remap`` (1/32 px weight
    quantisation, negligible on smooth fields, much faster).
    """
    shape = np.shape(ys)
    if np.size(ys) <= 200_000:
        coords = [np.asarray(ys, np.float64).ravel(), np.asarray(xs, np.float64).ravel()]
        return (
            np.stack(
                [ndi.map_coordinates(field[k], coords, order=1, mode="nearest") for k in range(2)]
            )
            .astype(np.float32)
            .reshape(2, *shape)
        )
    if field.shape[1] >= _CV_MAX or field.shape[2] >= _CV_MAX:
        raise ValueError(f"field grid {field.shape[1:]} exceeds OpenCV's remap limit")
    if len(shape) == 2 and max(shape) < _CV_MAX:  # a grid: one remap per component, no copies
        my2 = np.asarray(ys, np.float32)
        mx2 = np.asarray(xs, np.float32)
        return np.stack(
            [
                cv2.remap(
                    np.ascontiguousarray(field[k], dtype=np.float32),
                    mx2,
                    my2,
                    cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE,
                )
                for k in range(2)
            ]
        )
    mx = np.asarray(xs, np.float32).ravel()
    my = np.asarray(ys, np.float32).ravel()
    n = mx.size
    cols = 4096
    rows = -(-n // cols) if n else 0
    pad = rows * cols - n
    mx = np.pad(mx, (0, pad)).reshape(rows, cols) if n else mx.reshape(0, 1)
    my = np.pad(my, (0, pad)).reshape(rows, cols) if n else my.reshape(0, 1)
    out = np.empty((2, n), np.float32)
    for k in range(2):
        for r0 in range(0, rows, 4096):  # remap output rows must stay below 32767 too
            part = cv2.remap(
                np.ascontiguousarray(field[k], dtype=np.float32),
                mx[r0 : r0 + 4096],
                my[r0 : r0 + 4096],
                cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REPLICATE,
            )
            lo = r0 * cols
            out[k, lo : lo + part.size] = part.ravel()[: max(0, min(part.size, n - lo))]
    return out.reshape(2, *shape)


_CV_MAX = 32767


def row_bands(h: int, w: int, samples: int = 1_000_000) -> list[tuple[int, int]]:
    """Split ``h`` grid rows of width ``w`` into bands ``(y0, y1)`` of about ``samples`` grid
    pixels (a short last band is merged into the one before, so every band of a grid larger
    than 200k pixels stays above :func:`sample`'s 200k threshold and is sampled the same way).
    """
    rows = max(1, -(-samples // max(w, 1)))
    starts = list(range(0, h, rows))
    if len(starts) > 1 and (h - starts[-1]) * w < samples // 2:
        starts.pop()
    return [(y0, y1) for y0, y1 in zip(starts, [*starts[1:], h], strict=True)]


def compose_residual(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Residual of x -> x + inner(x) followed by the map of ``outer``: inner + outer(x + inner).

    Both (2, H, W) on the same grid, in grid pixels; computed in bands of rows.
    """
    h, w = inner.shape[1:]
    out = np.empty(inner.shape, np.float32)
    xx = np.arange(w, dtype=np.float32)[None, :]
    for y0, y1 in row_bands(h, w):
        yy = np.arange(y0, y1, dtype=np.float32)[:, None]
        band = inner[:, y0:y1]
        out[:, y0:y1] = band + sample(outer, yy + band[0], xx + band[1])
    return out


def invert(field: np.ndarray, iterations: int = 30, tol: float = 1e-3) -> np.ndarray:
    """Inverse residual s with (x + s(x)) + r(x + s(x)) = x, by fixed-point iteration.

    Converges when the field is a contraction (|grad r| < 1), true for smooth residuals. Each
    grid pixel's iteration depends only on its own value, so bands of rows are solved one at
    a time (temporaries of a band's size; a band stops when its largest update is < ``tol``).
    """
    h, w = field.shape[1:]
    inv = np.empty_like(field, dtype=np.float32)
    xx = np.arange(w, dtype=np.float32)[None, :]
    for y0, y1 in row_bands(h, w):
        yy = np.arange(y0, y1, dtype=np.float32)[:, None]
        band = -field[:, y0:y1].astype(np.float32)
        for _ in range(iterations):
            new = -sample(field, yy + band[0], xx + band[1])
            delta = float(np.abs(new - band).max())
            band = new
            if delta < tol:
                break
        inv[:, y0:y1] = band
    return inv


def invert_points(
    field: np.ndarray,
    points_yx: np.ndarray,
    iterations: int = 50,
    tolerance: float = 0.05,
    search: int = 4,
) -> np.ndarray:
    """Solve x + r(x) = p for (N, 2) grid points p given as (y, x); returns x as (y, x).

    Fixed-point iteration x <- x - a (x + r(x) - p), with a step a per point that starts at 1
    (plain x <- p - r(x)) and is halved whenever a step would not reduce that point's
    mismatch |x + r(x) - p|: the plain iteration diverges where the field stretches by more
    than 2x along a direction (gradient of r above 1), which regularised fields still do in a
    few places. Each point keeps its best iterate.

    A point still off by more than ``tolerance`` grid px (stuck beside a fold) is solved again
    from every start on a 1 px grid of +-``search`` px around it, keeping the best end: on the
    bundled ANHIR pairs one landmark went from 4.1 px off to a solution 2 px away.
    """
    p = np.asarray(points_yx, np.float32)
    x, err = _damped_inverse(field, p, p.copy(), iterations)
    stuck = np.flatnonzero(err > tolerance)
    if len(stuck):
        offsets = np.stack(
            np.meshgrid(*[np.arange(-search, search + 1, dtype=np.float32)] * 2, indexing="ij"),
            -1,
        ).reshape(-1, 2)
        starts = (x[stuck, None, :] + offsets[None]).reshape(-1, 2)
        targets = np.repeat(p[stuck], len(offsets), axis=0)
        ends, end_err = _damped_inverse(field, targets, starts, iterations)
        pick = end_err.reshape(len(stuck), -1).argmin(1)
        x2 = ends.reshape(len(stuck), len(offsets), 2)[np.arange(len(stuck)), pick]
        err2 = end_err.reshape(len(stuck), -1)[np.arange(len(stuck)), pick]
        better = err2 < err[stuck]
        x[stuck[better]] = x2[better]
    return x


def _mismatch(field: np.ndarray, at: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x + r(x) - p at (N, 2) (y, x) points, and its length."""
    d = at + sample(field, at[:, 0][None], at[:, 1][None])[:, 0, :].T - p
    return d, np.hypot(d[:, 0], d[:, 1])


def _damped_inverse(
    field: np.ndarray, p: np.ndarray, x: np.ndarray, iterations: int
) -> tuple[np.ndarray, np.ndarray]:
    """The damped fixed-point iteration of :func:`invert_points` from ``x``; (x, mismatch)."""
    step = np.ones(len(p), np.float32)
    d, err = _mismatch(field, x, p)
    for _ in range(iterations):
        trial = x - step[:, None] * d
        d_trial, err_trial = _mismatch(field, trial, p)
        better = err_trial < err
        x[better], d[better], err[better] = trial[better], d_trial[better], err_trial[better]
        step[~better] *= np.float32(0.5)
    return x, err


def resize_field(field: np.ndarray, shape: tuple[int, int], factor: float) -> np.ndarray:
    """Resample a (2, H, W) residual to a grid ``factor`` times finer (shape given), scaling
    the vectors by ``factor``. Pixel centres are aligned: fine u = (coarse u + 0.5) f - 0.5.
    """
    h, w = shape
    ys = (np.arange(h, dtype=np.float32) + 0.5) / factor - 0.5
    xs = (np.arange(w, dtype=np.float32) + 0.5) / factor - 0.5
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return sample(field, yy, xx) * np.float32(factor)


def jacobian_determinant(field: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """det(I + grad r) per grid pixel of a residual (2, H, W); <= 0 marks folding.

    ``scale`` converts the residual's values to grid pixels (r = field * scale), e.g.
    1 / spacing for a level-0 field. Computed in bands of rows with a one-row halo (the same
    result as whole, with temporaries of a band's size); returns (H, W) float32.
    """
    h, w = field.shape[1:]
    out = np.empty((h, w), np.float32)
    k = np.float32(scale)
    for y0, y1 in row_bands(h, w):
        a, b = max(y0 - 1, 0), min(y1 + 1, h)
        part = field[:, a:b] * k
        dy_dy, dy_dx = np.gradient(part[0])
        dx_dy, dx_dx = np.gradient(part[1])
        det = (1 + dy_dy) * (1 + dx_dx) - dy_dx * dx_dy
        out[y0:y1] = det[y0 - a : y0 - a + (y1 - y0)]
    return out


@dataclass
class StoredField:
    """A displacement field on a grid with level-0 spacing/origin, as saved on disk."""

    data: np.ndarray  # (2, H, W) float32, displacements in level-0 pixels
    spacing: float  # level-0 pixels per grid pixel
    origin: float  # level-0 coordinate of grid node 0 (same for x and y)
    meta: dict[str, object]


def save_field(path: str | os.PathLike[str], f: StoredField) -> None:
    """Write a field as a Zarr (format 2) array with spacing/origin/meta in its attributes."""
    arr = zarr.create_array(
        str(path),
        shape=f.data.shape,
        chunks=(2, 1024, 1024),
        dtype="float32",
        zarr_format=2,
        overwrite=True,
    )
    data = np.asarray(f.data, dtype=np.float32)  # no copy when already float32
    for y0 in range(0, data.shape[1], 1024):  # a chunk row at a time: bounded encode buffers
        arr[:, y0 : y0 + 1024] = data[:, y0 : y0 + 1024]
    arr.attrs.update(
        json.loads(
            json.dumps(
                {
                    "axes": ["component(dy,dx)", "y", "x"],
                    "units": "level-0 pixels",
                    "spacing": f.spacing,
                    "origin": f.origin,
                    **f.meta,
                }
            )
        )
    )


def load_field(path: str | os.PathLike[str]) -> StoredField:
    """Read a field written by :func:`save_field`."""
    p = Path(path)
    try:
        arr = zarr.open_array(str(p), mode="r")
        attrs = dict(arr.attrs)
        data = np.asarray(arr[...], dtype=np.float32)
        spacing, origin = float(attrs.pop("spacing")), float(attrs.pop("origin"))
    except Exception as exc:
        raise InputError(
            f"not a readable displacement field ({type(exc).__name__}: {exc})", p
        ) from exc
    if data.ndim != 3 or data.shape[0] != 2:
        raise InputError(f"displacement field must be (2, H, W), got {data.shape}", p)
    return StoredField(data, spacing, origin, attrs)
