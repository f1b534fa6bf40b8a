"""Synthetic whole-slide pairs with a known transform (ground truth at any size), out of core.

A tissue "density" image is built tile by tile from hashed value noise summed over octaves
(periods 2 px to 8192 px), so every pyramid level has structure to register, and thresholded
by its coarsest octaves into tissue islands on white background. The SOURCE slide is that
density coloured like H&E; the TARGET slide is the density resampled through a known backward
map B(x) = A (x + u(x)) (rotation, translation, smooth random displacement u) and coloured
like an IHC stain (DAB + haematoxylin), so target(x) = stain_change(source(B(x))).

Outputs (``DIR``)::

    target.ome.tif, source.ome.tif   tiled pyramidal OME-TIFF, JPEG tiles, SubIFD levels
    truth/                           the ground-truth Transform (affine.json, backward.zarr)
    target.csv, source.csv           ~200 ANHIR landmark pairs (source = B(target), exact)
    pairs.csv                        a one-pair ANHIR table (paths relative to DIR)

Arrays are (y, x[, c]); points (x, y) level-0 pixels.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import dask.array as da
import numpy as np

from wsireg_flow.errors import WsiregError
from wsireg_flow.field import StoredField
from wsireg_flow.geometry import corner_origin
from wsireg_flow.io.ometiff import export_ome_tiff
from wsireg_flow.io.omezarr import write_ngff_pyramid
from wsireg_flow.io.slide import Slide, open_slide
from wsireg_flow.landmarks import Pair, image_diagonal, write_landmarks, write_pair_table
from wsireg_flow.progress import ProgressFn
from wsireg_flow.stages import check_replaceable, check_unlocked, check_writable_dir
from wsireg_flow.transform import Transform
from wsireg_flow.warp import warp_slide

PERIODS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def _hash01(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random values in [0, 1) for integer lattice points (uint32 hash)."""
    with np.errstate(over="ignore"):
        h = (ix.astype(np.uint32) * np.uint32(0x8DA6B343)) ^ (
            iy.astype(np.uint32) * np.uint32(0xD8163841)
        )
        h ^= np.uint32((seed * 0x9E3779B1) & 0xFFFFFFFF)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x2C1B3C6D)
        h ^= h >> np.uint32(12)
        h *= np.uint32(0x297A2D39)
        h ^= h >> np.uint32(15)
    return (h >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)


def value_noise(y0: int, x0: int, h: int, w: int, period: int, seed: int) -> np.ndarray:
    """Bilinear value noise with lattice spacing ``period`` px on the box [y0:y0+h, x0:x0+w].

    Seamless across boxes: it is a function of absolute pixel coordinates only.
    """
    iy0, ix0 = y0 // period, x0 // period
    ny = (y0 + h) // period - iy0 + 2
    nx = (x0 + w) // period - ix0 + 2
    lattice = _hash01(np.arange(ix0, ix0 + nx)[None, :], np.arange(iy0, iy0 + ny)[:, None], seed)
    # exact separable bilinear interpolation (cv2.remap quantises positions to 1/32 px, which
    # shows as steps for long periods)
    fy = np.arange(y0, y0 + h, dtype=np.float64) / period - iy0
    fx = np.arange(x0, x0 + w, dtype=np.float64) / period - ix0
    iy, ix = np.floor(fy).astype(int), np.floor(fx).astype(int)
    wy = (fy - iy).astype(np.float32)[:, None]
    wx = (fx - ix).astype(np.float32)[None, :]
    rows = lattice[iy] * (1 - wy) + lattice[iy + 1] * wy  # (h, nx)
    return rows[:, ix] * (1 - wx) + rows[:, ix + 1] * wx


def density_tile(y0: int, x0: int, h: int, w: int, seed: int) -> np.ndarray:
    """Tissue density (h, w) uint8: 0 = background, 40..255 tissue with multi-scale texture."""
    tex = np.zeros((h, w), np.float32)
    total = 0.0
    for k, p in enumerate(PERIODS[:-2]):
        a = float(p) ** 0.35
        tex += a * value_noise(y0, x0, h, w, p, seed + 17 * k)
        total += a
    tex /= total  # a weighted mean of [0, 1) noises: fixed scaling keeps tiles seamless
    shape = 0.6 * value_noise(y0, x0, h, w, PERIODS[-1], seed + 991) + 0.4 * value_noise(
        y0, x0, h, w, PERIODS[-2], seed + 997
    )
    tissue = shape > 0.45
    d = np.where(tissue, 40 + 215 * np.clip((tex - 0.5) * 4.0 + 0.5, 0, 1), 0)
    return d.astype(np.uint8)


# -- colour -----------------------------------------------------------------------------------
_HE = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]], np.float32)  # haematoxylin, eosin
_IHC = np.array([[0.65, 0.70, 0.29], [0.27, 0.57, 0.78]], np.float32)  # haematoxylin, DAB
# empty glass is not pure white on a scan (summed OD 0.03-0.1 on the bundled slides)
_GLASS = np.array([0.02, 0.02, 0.025], np.float32)
# bumped when the images or landmarks a seed gives change, so cached pairs are made again
# (3: landmark files with the corner origin of ANHIR / ImageJ)
GENERATOR_VERSION = 3
# everything a synthetic pair's folder holds (`.work` while it is written): what `--overwrite`
# may replace
SYNTH_ENTRIES = frozenset(
    {"synth.json", ".work", "target.ome.tif", "source.ome.tif", "truth", "target.csv",
     "source.csv", "pairs.csv"}
)  # fmt: skip


def colorize(density: np.ndarray, stain: str) -> np.ndarray:
    """(y, x, 1|none) uint8 density -> (y, x, 3) uint8 brightfield RGB (Beer-Lambert).

    Density 0 is glass: light grey (summed OD about 0.07), like a real scan.
    """
    d = density[..., 0] if density.ndim == 3 else density
    d = d.astype(np.float32) / 255.0
    if stain == "he":
        od = np.stack([d * 0.9, np.sqrt(d) * 0.5], -1) @ _HE
    else:
        od = np.stack([d * 0.45, np.clip(d - 0.35, 0, None) * 1.6], -1) @ _IHC
    return np.clip(255.0 * np.power(10.0, -(od + _GLASS)), 0, 255).astype(np.uint8)


class _ColourView:
    """A pyramid level presented colourised (read-only, lazy)."""

    def __init__(self, base: Any, stain: str) -> None:
        self._base, self._stain = base, stain
        self.shape = (base.shape[0], base.shape[1], 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        ys, xs, cs = key
        return colorize(np.asarray(self._base[ys, xs, :]), self._stain)[:, :, cs]


def colour_slide(density: Slide, stain: str) -> Slide:
    """Lazy RGB view of a density slide, coloured like ``stain`` level by level."""
    return Slide(
        density.path,
        [_ColourView(lv, stain) for lv in density.levels],
        density.pixel_size_um,
        "synthetic",
        stain,
    )


# -- ground truth ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TruthParams:
    rotation_deg: float = 3.0
    translation: tuple[float, float] = (180.0, -120.0)  # (x, y) level-0 px
    displacement_px: float = 30.0  # max |u| at level 0
    correlation_px: float = 4000.0  # length scale of u
    spacing: int = 16  # grid spacing of the stored field (level-0 px)


def truth_transform(size: tuple[int, int], seed: int, params: TruthParams) -> Transform:
    """Backward map target -> source: A (x + u(x)) with a smooth random u (level-0 px)."""
    h, w = size
    s = params.spacing
    gh, gw = -(-h // s), -(-w // s)
    rng = np.random.default_rng(seed)
    coarse = max(2, round(max(h, w) / params.correlation_px) + 2)
    raw = rng.normal(size=(2, coarse, coarse)).astype(np.float32)
    u = np.stack([cv2.resize(c, (gw, gh), interpolation=cv2.INTER_CUBIC) for c in raw])
    u *= np.float32(params.displacement_px / max(float(np.abs(u).max()), 1e-6))
    a = np.deg2rad(params.rotation_deg)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    affine = np.eye(3)
    affine[:2, :2] = rot
    affine[:2, 2] = np.array([cx, cy]) - rot @ np.array([cx, cy]) + np.array(params.translation)
    origin = 0.0  # grid node (i, j) at level-0 (j*s, i*s)
    backward = StoredField(u, float(s), origin, {"direction": "backward", "truth": True})
    return Transform(affine, backward, None, (h, w), (h, w), {"synthetic_truth": True})


def _tissue_points(density: Slide, n: int, seed: int, margin: int) -> np.ndarray:
    """``n`` random (x, y) level-0 points on tissue, away from the border."""
    k = len(density.levels) - 1
    lh, lw = density.shapes[k][:2]
    low = density.read_region(k, 0, 0, lh, lw)[..., 0]
    ds = density.downsamples[k]
    ys, xs = np.nonzero(low > 60)
    h0, w0 = density.shapes[0][:2]
    px, py = (xs + 0.5) * ds - 0.5, (ys + 0.5) * ds - 0.5
    keep = (px > margin) & (px < w0 - margin) & (py > margin) & (py < h0 - margin)
    rng = np.random.default_rng(seed)
    idx = rng.choice(np.flatnonzero(keep), size=min(n, int(keep.sum())), replace=False)
    jitter = rng.uniform(-ds / 2, ds / 2, size=(len(idx), 2))
    return np.stack([px[idx], py[idx]], 1) + jitter


def synthesize_pair(
    out: str | os.PathLike[str],
    size: tuple[int, int],
    seed: int = 0,
    params: TruthParams | None = None,
    n_landmarks: int = 200,
    pixel_size_um: float = 0.5,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Write a synthetic target/source pair with its ground truth (see module docstring)."""
    params = params or TruthParams()
    h, w = size
    # landmarks keep clear of the border by the largest displacement the truth can make
    margin = int(params.displacement_px * 2 + max(abs(v) for v in params.translation)) + 64
    min_side = 2 * margin + 128
    if min(h, w) < min_side:
        raise WsiregError(
            f"size {h}x{w} leaves no room for landmarks: each side must be at least {min_side} px"
        )
    d = Path(out)
    check_writable_dir(d)
    if d.exists() and any(d.iterdir()):
        if not overwrite:
            raise WsiregError("output exists (use --overwrite to replace it)", d)
        check_unlocked(d)
        check_replaceable(d, "synthetic pair", SYNTH_ENTRIES)
        shutil.rmtree(d)
    work = d / ".work"
    work.mkdir(parents=True, exist_ok=True)
    template = da.zeros((h, w, 1), chunks=(1024, 1024, 1), dtype=np.uint8)

    def block(_: np.ndarray, block_info: dict[Any, Any] | None = None) -> np.ndarray:
        assert block_info is not None
        (y0, y1), (x0, x1), _c = block_info[None]["array-location"]
        return density_tile(y0, x0, y1 - y0, x1 - x0, seed)[:, :, None]

    density_path = write_ngff_pyramid(
        template.map_blocks(block, dtype=np.uint8),
        work / "source-density.zarr",
        pixel_size_um,
        name="source density",
        progress=progress,
    )
    source_density = open_slide(density_path)
    truth = truth_transform(size, seed, params)
    target_density_path = warp_slide(
        truth, source_density, work / "target-density.zarr", pixel_size_um, progress=progress
    )
    target_density = open_slide(target_density_path)
    export_ome_tiff(
        density_path,
        d / "source.ome.tif",
        progress=progress,
        slide=colour_slide(source_density, "he"),
    )
    export_ome_tiff(
        target_density_path,
        d / "target.ome.tif",
        progress=progress,
        slide=colour_slide(target_density, "ihc"),
    )
    truth.save(d / "truth")
    # landmark files put the origin at a pixel's corner (the points are drawn at centres)
    t_pts = _tissue_points(target_density, n_landmarks, seed, margin) + 0.5
    s_pts = corner_origin(truth.target_to_source)(t_pts)
    write_landmarks(d / "target.csv", t_pts)
    write_landmarks(d / "source.csv", s_pts)
    write_pair_table(
        d / "pairs.csv",
        [
            Pair(
                "0",
                "target.ome.tif",
                "source.ome.tif",
                "target.csv",
                "source.csv",
                "training",
                (h, w),
                image_diagonal(h, w),
            )
        ],
    )
    shutil.rmtree(work)
    info = {
        "size": [h, w],
        "seed": seed,
        "generator": GENERATOR_VERSION,
        "pixel_size_um": pixel_size_um,
        "params": {**params.__dict__, "translation": list(params.translation)},
        "landmarks": len(t_pts),
    }
    (d / "synth.json").write_text(json.dumps(info, indent=2))
    return info
