"""Pair registration: coarse affine, then tile-wise non-rigid coarse to fine.

Inputs are two slides openable by path (normally the OME-Zarr pyramids written by ingest), so
that tile tasks can read their own pixels on any Dask worker. Everything held in memory here
is at working levels (longest side a few thousand pixels at most), never full resolution.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from wsireg_flow.config import Config
from wsireg_flow.errors import InputError
from wsireg_flow.field import (
    StoredField,
    compose_residual,
    invert,
    jacobian_determinant,
    resize_field,
    stitch,
    tile_boxes,
)
from wsireg_flow.geometry import rescale_affine, to_level0_affine
from wsireg_flow.io.slide import Slide
from wsireg_flow.nonrigid import TileJob, TileResult, register_tile
from wsireg_flow.parallel import map_tasks
from wsireg_flow.progress import ProgressFn
from wsireg_flow.pyramid import level_for_max_side
from wsireg_flow.rigid import RigidResult, coarse_alignment
from wsireg_flow.tissue import (
    IntensityStats,
    intensity_stats,
    normalized_intensity,
    optical_density,
    tissue_mask,
)
from wsireg_flow.transform import Transform


@dataclass
class LevelReport:
    """What happened at one non-rigid working level."""

    target_level: int
    source_level: int
    shape: tuple[int, int]
    tiles: int
    tiles_ok: int
    statuses: dict[str, int]
    mean_confidence: float
    folding_fraction: float
    seconds: float
    confidence_map: np.ndarray = field(repr=False)  # (ny, nx) tile grid confidence (NaN skipped)


@dataclass
class Registration:
    transform: Transform
    rigid: RigidResult
    levels: list[LevelReport]
    timings: dict[str, float]

    def summary(self) -> dict[str, Any]:
        return {
            "rigid": self.rigid.to_dict(),
            "levels": [
                {k: v for k, v in vars(lv).items() if k != "confidence_map"} for lv in self.levels
            ],
            "timings_s": self.timings,
        }


def working_levels(target: Slide, max_side: int, n_levels: int) -> list[int]:
    """Target pyramid levels to refine on, coarse to fine: the finest level with longest side
    at most ``max_side`` and up to ``n_levels - 1`` levels above it (fewer if the pyramid ends).
    """
    finest = level_for_max_side(target.shapes, max_side)
    coarsest = min(finest + n_levels - 1, len(target.shapes) - 1)
    return list(range(coarsest, finest - 1, -1))


def matching_source_level(target: Slide, kt: int, source: Slide) -> int:
    """Source level whose physical pixel size is closest to the target's level ``kt``.

    Without pixel sizes on both slides, the same downsample factor is matched.
    """
    want = target.downsamples[kt]
    if target.pixel_size_um and source.pixel_size_um:
        want *= target.pixel_size_um / source.pixel_size_um
    return int(np.argmin([abs(math.log(d / want)) for d in source.downsamples]))


def _read_level(slide: Slide, level: int) -> np.ndarray:
    h, w = slide.shapes[level][:2]
    return slide.read_region(level, 0, 0, h, w)


@dataclass
class _Prepared:
    stats: IntensityStats
    mask: np.ndarray  # tissue mask at the rigid level
    intensity: np.ndarray


def _prepare(rgb: np.ndarray, cfg: Config, name: str, path: Any) -> _Prepared:
    mask = tissue_mask(rgb, cfg.tissue.min_area_fraction)
    if mask.mean() < cfg.tissue.min_tissue_fraction:
        raise InputError(f"no tissue found in the {name} image", path)
    stats = intensity_stats(optical_density(rgb), mask)
    return _Prepared(stats, mask, normalized_intensity(rgb, stats))


def register_slides(
    target: Slide,
    source: Slide,
    cfg: Config,
    scheduler: Any = "threads",
    progress: ProgressFn | None = None,
) -> Registration:
    """Register ``source`` onto ``target``; returns the transform (target -> source backward).

    Parameters
    ----------
    target, source : Slide
        Opened by path (OME-Zarr recommended); levels are (y, x, c).
    cfg : Config
        Settings; ``cfg.rigid`` and ``cfg.nonrigid`` drive the two stages.
    scheduler : str or distributed.Client
        Where the tile tasks run (see :mod:`wsireg_flow.parallel`).
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    kt = level_for_max_side(target.shapes, cfg.rigid.max_side)
    ks = matching_source_level(target, kt, source)
    t_img, s_img = _read_level(target, kt), _read_level(source, ks)
    tp = _prepare(t_img, cfg, "target", target.path)
    sp = _prepare(s_img, cfg, "source", source.path)
    rigid = coarse_alignment(tp.intensity, sp.intensity, tp.mask, sp.mask, cfg.rigid)
    dt0, ds0 = target.downsamples[kt], source.downsamples[ks]
    affine0 = to_level0_affine(rigid.matrix, dt0, ds0)
    timings["coarse"] = time.perf_counter() - t0
    if progress:
        progress("coarse", 1, 1)

    residual: np.ndarray | None = None  # (2, H, W) in grid px of `prev_d`
    prev_d = None
    reports: list[LevelReport] = []
    for lt in working_levels(target, cfg.nonrigid.max_side, cfg.nonrigid.levels):
        t1 = time.perf_counter()
        ls = matching_source_level(target, lt, source)
        dt, ds = target.downsamples[lt], source.downsamples[ls]
        shape = tuple(target.shapes[lt][:2])
        r_k = (
            np.zeros((2, *shape), np.float32)
            if residual is None
            else resize_field(residual, shape, prev_d / dt)  # type: ignore[operator]
        )
        a_k = rescale_affine(affine0, dt, ds)
        mask_k = (
            cv2.resize(
                tp.mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST
            )
            > 0
        )
        boxes = tile_boxes(shape, cfg.nonrigid.tile, cfg.nonrigid.overlap)
        jobs = [
            _job(target, lt, source, ls, box, shape, r_k, a_k, mask_k, tp.stats, sp.stats)
            for box in boxes
        ]
        results: list[TileResult] = map_tasks(
            register_tile,
            jobs,
            cfg.nonrigid,
            scheduler=scheduler,
            progress=progress,
            stage=f"non-rigid level {lt} tiles",
        )
        sigma = cfg.nonrigid.smooth_sigma
        d, _ = stitch(
            [r.residual for r in results],
            [r.weight for r in results],
            boxes,
            shape,
            smooth_sigma=sigma,
            fill_sigma=cfg.nonrigid.tile / 4,
        )
        residual = compose_residual(r_k, d)
        prev_d = dt
        reports.append(_report(lt, ls, shape, results, residual, mask_k, time.perf_counter() - t1))
        timings[f"nonrigid_level_{lt}"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    backward = inverse = None
    if residual is not None and prev_d is not None:
        origin = 0.5 * prev_d - 0.5
        inv = invert(residual)
        backward = StoredField(
            residual * np.float32(prev_d), prev_d, origin, {"direction": "backward"}
        )
        inverse = StoredField(inv * np.float32(prev_d), prev_d, origin, {"direction": "inverse"})
    timings["invert"] = time.perf_counter() - t2
    transform = Transform(
        affine0,
        backward,
        inverse,
        tuple(target.shapes[0][:2]),
        tuple(source.shapes[0][:2]),  # type: ignore[arg-type]
        {"rigid_method": rigid.method, "rigid_flipped": rigid.flipped},
    )
    return Registration(transform, rigid, reports, timings)


def _job(
    target: Slide,
    lt: int,
    source: Slide,
    ls: int,
    box: tuple[int, int, int, int],
    shape: tuple[int, int],
    r_k: np.ndarray,
    a_k: np.ndarray,
    mask_k: np.ndarray,
    t_stats: IntensityStats,
    s_stats: IntensityStats,
) -> TileJob:
    y0, x0, y1, x1 = box
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    px = xs + r_k[1, y0:y1, x0:x1]
    py = ys + r_k[0, y0:y1, x0:x1]
    a = a_k.astype(np.float32)
    map_xy = np.stack(
        [a[0, 0] * px + a[0, 1] * py + a[0, 2], a[1, 0] * px + a[1, 1] * py + a[1, 2]]
    )
    return TileJob(
        str(target.path),
        lt,
        str(source.path),
        ls,
        box,
        shape,
        map_xy,
        mask_k[y0:y1, x0:x1].copy(),
        t_stats,
        s_stats,
    )


def _report(
    lt: int,
    ls: int,
    shape: tuple[int, int],
    results: list[TileResult],
    residual: np.ndarray,
    mask: np.ndarray,
    seconds: float,
) -> LevelReport:
    statuses: dict[str, int] = {}
    for r in results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    ys = sorted({r.box[0] for r in results})
    xs = sorted({r.box[1] for r in results})
    conf = np.full((len(ys), len(xs)), np.nan, np.float32)
    for r in results:
        if r.residual is not None:
            conf[ys.index(r.box[0]), xs.index(r.box[1])] = r.confidence
    ok = [r.confidence for r in results if r.residual is not None]
    jac = jacobian_determinant(residual)
    fold = float((jac[mask] <= 0).mean()) if mask.any() else 0.0
    return LevelReport(
        lt,
        ls,
        shape,
        len(results),
        len(ok),
        statuses,
        float(np.mean(ok)) if ok else 0.0,
        fold,
        seconds,
        conf,
    )
