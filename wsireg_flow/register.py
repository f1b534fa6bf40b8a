"""Pair registration: coarse affine, then tile-wise non-rigid coarse to fine.

Inputs are two slides openable by path (normally the OME-Zarr pyramids written by ingest), so
that tile tasks can read their own pixels on any Dask worker. Everything held in memory here
is at working levels (longest side a few thousand pixels at most), never full resolution.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from wsireg_flow.config import Config
from wsireg_flow.errors import InputError
from wsireg_flow.field import (
    Box,
    StoredField,
    compose_residual,
    invert,
    jacobian_determinant,
    resize_field,
    stitch,
    tile_boxes,
)
from wsireg_flow.geometry import rescale_affine, to_level0_affine, translation
from wsireg_flow.io.slide import Slide
from wsireg_flow.nonrigid import PackedMask, TileJob, TileResult, register_tile, tile_weight
from wsireg_flow.parallel import map_tasks
from wsireg_flow.progress import ProgressFn
from wsireg_flow.pyramid import level_for_max_side
from wsireg_flow.rigid import RigidResult, coarse_alignment
from wsireg_flow.tissue import (
    IntensityStats,
    data_region,
    ink_mask,
    intensity_stats,
    normalized_intensity,
    optical_density,
    scanned_box,
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
    """Result of :func:`register_slides`: the transform, the coarse fit, per-level reports and
    stage timings (s)."""

    transform: Transform
    rigid: RigidResult
    levels: list[LevelReport]
    timings: dict[str, float]

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict of the coarse fit, the level reports and the timings (s)."""
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


# what a preprocess.npz holds; part of the stage's fingerprint, so that a run resumed from an
# older file (without the ink masks: its ink would be taken for none) prepares again
PREPARED_FORMAT = "masks, stats, ink"


@dataclass
class Prepared:
    """Preprocessing of a pair at the rigid level (tissue masks, intensity statistics)."""

    target_level: int
    source_level: int
    target_mask: np.ndarray  # (y, x) bool at the target rigid level
    source_mask: np.ndarray
    target_stats: IntensityStats
    source_stats: IntensityStats
    target_ink: np.ndarray | None = None  # (y, x) bool marker ink at the rigid level, or None
    source_ink: np.ndarray | None = None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write levels, masks and intensity statistics to one ``.npz`` (no pickles)."""
        inks = {
            f"{k}_ink": v for k, v in (("target", self.target_ink), ("source", self.source_ink))
        }
        np.savez_compressed(
            path,
            **{k: v for k, v in inks.items() if v is not None},
            levels=np.array([self.target_level, self.source_level]),
            target_mask=self.target_mask,
            source_mask=self.source_mask,
            stats=np.array(
                [
                    self.target_stats.low,
                    self.target_stats.high,
                    self.source_stats.low,
                    self.source_stats.high,
                ]
            ),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Prepared:
        """Read an ``.npz`` written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            lv, st = z["levels"], z["stats"]
            return cls(
                int(lv[0]),
                int(lv[1]),
                z["target_mask"].astype(bool),
                z["source_mask"].astype(bool),
                IntensityStats(float(st[0]), float(st[1])),
                IntensityStats(float(st[2]), float(st[3])),
                z["target_ink"].astype(bool) if "target_ink" in z.files else None,
                z["source_ink"].astype(bool) if "source_ink" in z.files else None,
            )


def _mask_and_stats(
    rgb: np.ndarray, cfg: Config, name: str, path: Any
) -> tuple[np.ndarray, IntensityStats, np.ndarray | None]:
    """Tissue mask without padding or ink (:func:`data_region`: near-black padding of a JPEG
    export is as dense as tissue), the intensity statistics of that tissue, and the marker
    ink (:func:`ink_mask`; None without any)."""
    mask = tissue_mask(rgb, cfg.tissue.min_area_fraction)
    ink = ink_mask(rgb)
    data = data_region(rgb, ink=ink)
    if data is not None:
        mask &= data
    if mask.mean() < cfg.tissue.min_tissue_fraction:
        raise InputError(f"no tissue found in the {name} image", path)
    return mask, intensity_stats(optical_density(rgb), mask), ink if ink.any() else None


def preprocess(target: Slide, source: Slide, cfg: Config) -> Prepared:
    """Tissue masks and intensity statistics at the rigid working level of both slides.

    Raises
    ------
    InputError
        When either image shows no tissue.
    """
    kt = level_for_max_side(target.shapes, cfg.rigid.max_side)
    ks = matching_source_level(target, kt, source)
    tm, ts, t_ink = _mask_and_stats(_read_level(target, kt), cfg, "target", target.path)
    sm, ss, s_ink = _mask_and_stats(_read_level(source, ks), cfg, "source", source.path)
    return Prepared(kt, ks, tm, sm, ts, ss, t_ink, s_ink)


def _ink_or_empty(ink: np.ndarray | None, rgb: np.ndarray) -> np.ndarray:
    """``ink`` ((y, x) bool), or an all-False mask the shape of ``rgb`` when it is None."""
    return np.zeros(rgb.shape[:2], bool) if ink is None else ink


def _glass_outside(intensity: np.ndarray, data: np.ndarray | None) -> np.ndarray:
    """``intensity`` (y, x) with 0 (glass) where ``data`` is False: the rotation search's
    blurred layouts would otherwise see padding a JPEG export left near black as dense
    tissue, and ink strokes."""
    if data is not None:
        intensity[~data] = 0.0
    return intensity


def coarse(
    target: Slide, source: Slide, pre: Prepared, cfg: Config
) -> tuple[RigidResult, np.ndarray]:
    """Coarse alignment; returns the result and its level-0 target->source affine (3x3).

    Each image is cropped to its scanned box first (:func:`scanned_box`): the straight edges
    where a cut section meets white padding would otherwise pull both images into place at
    the identity. The crop offsets are composed back into the matrix (x, y level px). White
    or black padding with a straight outline left inside the box (a rotated region's corners)
    and marker ink are no data to the coarse score and ECC
    (:func:`wsireg_flow.tissue.data_region`).
    """
    t_rgb = _read_level(target, pre.target_level)
    s_rgb = _read_level(source, pre.source_level)
    (ty, tx), (sy, sx) = scanned_box(t_rgb), scanned_box(s_rgb)
    # the ink preprocessing found on the whole image (found again on the crop, a stroke's
    # share of the image would change)
    t_data = data_region(t_rgb[ty, tx], ink=_ink_or_empty(pre.target_ink, t_rgb)[ty, tx])
    s_data = data_region(s_rgb[sy, sx], ink=_ink_or_empty(pre.source_ink, s_rgb)[sy, sx])
    t_int = _glass_outside(normalized_intensity(t_rgb[ty, tx], pre.target_stats), t_data)
    s_int = _glass_outside(normalized_intensity(s_rgb[sy, sx], pre.source_stats), s_data)
    rigid = coarse_alignment(
        t_int, s_int, pre.target_mask[ty, tx], pre.source_mask[sy, sx], cfg.rigid, t_data, s_data
    )
    rigid.matrix = (
        translation(sx.start, sy.start) @ rigid.matrix @ translation(-tx.start, -ty.start)
    )
    dt0, ds0 = target.downsamples[pre.target_level], source.downsamples[pre.source_level]
    return rigid, to_level0_affine(rigid.matrix, dt0, ds0)


@dataclass
class LevelTiles:
    """Tile results of one working level, before stitching (what the stitch stage consumes)."""

    target_level: int
    source_level: int
    shape: tuple[int, int]
    downsample: float
    prior: np.ndarray  # (2, H, W) residual carried down from the coarser level (grid px)
    mask: np.ndarray  # (H, W) target tissue
    results: list[TileResult]
    seconds: float
    # reads tile i's (residual, weight) when the results do not hold them (tiles kept on disk,
    # read one at a time while they are blended: see tilestore.open_tiles)
    read_arrays: Callable[[int], tuple[np.ndarray | None, np.ndarray | None]] | None = None

    def tile_arrays(self, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Tile ``i``'s (2, h, w) residual and (h, w) weight; (None, None) unless accepted."""
        if self.read_arrays is not None:
            return self.read_arrays(i)
        return self.results[i].residual, self.results[i].weight


def register_level(
    target: Slide,
    source: Slide,
    pre: Prepared,
    affine0: np.ndarray,
    lt: int,
    prior: np.ndarray | None,
    prior_d: float | None,
    cfg: Config,
    scheduler: Any = "threads",
    progress: ProgressFn | None = None,
) -> LevelTiles:
    """Register every tile of target level ``lt`` given the residual of the coarser level."""
    t1 = time.perf_counter()
    ls = matching_source_level(target, lt, source)
    dt, ds = target.downsamples[lt], source.downsamples[ls]
    shape = (int(target.shapes[lt][0]), int(target.shapes[lt][1]))
    r_k = (
        np.zeros((2, *shape), np.float32)
        if prior is None or prior_d is None
        else resize_field(prior, shape, prior_d / dt)
    )
    a_k = rescale_affine(affine0, dt, ds)
    mask_k = (
        cv2.resize(
            pre.target_mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST
        )
        > 0
    )
    boxes = tile_boxes(shape, cfg.nonrigid.tile, cfg.nonrigid.overlap)
    has_prior = prior is not None and prior_d is not None
    inks = (
        PackedMask.of(pre.target_ink, target.downsamples[pre.target_level] / dt),
        PackedMask.of(pre.source_ink, source.downsamples[pre.source_level] / ds),
    )
    jobs = [
        _job(
            target,
            lt,
            source,
            ls,
            box,
            shape,
            prior if has_prior else None,
            prior_d / dt if has_prior else 1.0,
            a_k,
            mask_k,
            pre.target_stats,
            pre.source_stats,
            inks,
        )
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
    return LevelTiles(lt, ls, shape, dt, r_k, mask_k, results, time.perf_counter() - t1)


KEEP_COARSE = ("no gain", "too large", "folding", "low confidence")
"""Tile statuses whose area keeps the transform of the level above (a zero residual)."""


def tile_fields(
    tiles: LevelTiles, cfg: Config
) -> Iterator[tuple[np.ndarray | None, np.ndarray | None, Box]]:
    """The (field, weight, box) each tile contributes to the stitch, one tile at a time.

    Accepted tiles give their residual and weight. A rejected tile on tissue (implausible or
    low-confidence result) gives a zero residual, weighted like a tile at the acceptance
    threshold (blend window x tissue x ``min_confidence``), so that its area keeps the transform
    of the level above instead of taking its neighbours' residual; tiles without tissue or
    outside the source give nothing: the stitch continues the field from their neighbours over
    up to about one tile and keeps the transform of the level above beyond that.
    """
    for i, r in enumerate(tiles.results):
        if r.status == "ok":
            residual, weight = tiles.tile_arrays(i)
            yield residual, weight, r.box
        elif r.status in KEEP_COARSE:
            y0, x0, y1, x1 = r.box
            weight = tile_weight(
                r.box,
                tiles.shape,
                cfg.nonrigid.overlap,
                tiles.mask[y0:y1, x0:x1],
                cfg.nonrigid.min_confidence,
            )
            yield np.zeros((2, y1 - y0, x1 - x0), np.float32), weight, r.box
        else:
            yield None, None, r.box


def stitch_level(tiles: LevelTiles, cfg: Config) -> tuple[np.ndarray, LevelReport]:
    """Blend a level's tile residuals, regularise, and compose with the carried-down prior."""
    t0 = time.perf_counter()
    d, _ = stitch(
        tile_fields(tiles, cfg),
        tiles.shape,
        smooth_sigma=cfg.nonrigid.smooth_sigma,
        fill_sigma=cfg.nonrigid.tile / 4,
    )
    residual = compose_residual(tiles.prior, d)
    seconds = tiles.seconds + time.perf_counter() - t0
    report = _report(
        tiles.target_level,
        tiles.source_level,
        tiles.shape,
        tiles.results,
        residual,
        tiles.mask,
        seconds,
    )
    return residual, report


def nonrigid(
    target: Slide,
    source: Slide,
    pre: Prepared,
    affine0: np.ndarray,
    cfg: Config,
    scheduler: Any = "threads",
    progress: ProgressFn | None = None,
) -> tuple[LevelTiles | None, list[LevelReport]]:
    """Coarse-to-fine tile registration; every level but the finest is stitched here.

    Returns the finest level's unstitched tiles (None when there are no working levels) and the
    reports of the levels already stitched.
    """
    levels = working_levels(target, cfg.nonrigid.max_side, cfg.nonrigid.levels)
    prior, prior_d, reports = None, None, []
    tiles = None
    for i, lt in enumerate(levels):
        tiles = register_level(
            target, source, pre, affine0, lt, prior, prior_d, cfg, scheduler, progress
        )
        if i < len(levels) - 1:
            prior, report = stitch_level(tiles, cfg)
            prior_d = tiles.downsample
            reports.append(report)
    return tiles, reports


def finalize(
    affine0: np.ndarray,
    residual: np.ndarray | None,
    downsample: float | None,
    target: Slide,
    source: Slide,
    meta: dict[str, Any],
) -> Transform:
    """Build the Transform: residual to level-0 units, inverse by fixed-point iteration; its
    metadata also records both slides' pixel sizes (um, None when unknown)."""
    backward = inverse = None
    if residual is not None and downsample is not None:
        origin = 0.5 * downsample - 0.5
        scale = np.float32(downsample)
        inv = invert(residual)
        inv *= scale  # in place: a fresh array
        backward = StoredField(residual * scale, downsample, origin, {"direction": "backward"})
        inverse = StoredField(inv, downsample, origin, {"direction": "inverse"})
    return Transform(
        affine0,
        backward,
        inverse,
        (int(target.shapes[0][0]), int(target.shapes[0][1])),
        (int(source.shapes[0][0]), int(source.shapes[0][1])),
        {
            **meta,
            "target_pixel_size_um": target.pixel_size_um,
            "source_pixel_size_um": source.pixel_size_um,
        },
    )


def register_slides(
    target: Slide,
    source: Slide,
    cfg: Config,
    scheduler: Any = "threads",
    progress: ProgressFn | None = None,
) -> Registration:
    """Register ``source`` onto ``target``; returns the transform (target -> source backward).

    The composition of :func:`preprocess`, :func:`coarse`, :func:`nonrigid`,
    :func:`stitch_level` and :func:`finalize` (the flows run them as separate stages).

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
    pre = preprocess(target, source, cfg)
    rigid, affine0 = coarse(target, source, pre, cfg)
    timings["coarse"] = time.perf_counter() - t0
    if progress:
        progress("coarse", 1, 1)
    t1 = time.perf_counter()
    tiles, reports = nonrigid(target, source, pre, affine0, cfg, scheduler, progress)
    residual = None
    if tiles is not None:
        residual, report = stitch_level(tiles, cfg)
        reports.append(report)
    timings["nonrigid"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    meta = {"rigid_method": rigid.method, "rigid_flipped": rigid.flipped}
    transform = finalize(
        affine0, residual, tiles.downsample if tiles else None, target, source, meta
    )
    timings["invert"] = time.perf_counter() - t2
    return Registration(transform, rigid, reports, timings)


def _job(
    target: Slide,
    lt: int,
    source: Slide,
    ls: int,
    box: tuple[int, int, int, int],
    shape: tuple[int, int],
    prior: np.ndarray | None,
    factor: float,
    a_k: np.ndarray,
    mask_k: np.ndarray,
    t_stats: IntensityStats,
    s_stats: IntensityStats,
    inks: tuple[PackedMask | None, PackedMask | None] = (None, None),
) -> TileJob:
    """The task of one tile; ``prior`` is the coarser level's whole residual (or None), of
    which the job carries only the crop that bilinear sampling over ``box`` touches;
    ``inks``: the target's and the source's marker ink."""
    y0, x0, y1, x1 = box
    crop, origin = None, (0, 0)
    if prior is not None:
        hc, wc = prior.shape[1:]
        # coarse coordinates of the tile's pixel centres: (u + 0.5) / factor - 0.5
        cy0 = max(int(np.floor((y0 + 0.5) / factor - 0.5)) - 1, 0)
        cx0 = max(int(np.floor((x0 + 0.5) / factor - 0.5)) - 1, 0)
        cy1 = min(int(np.ceil((y1 - 0.5) / factor - 0.5)) + 2, hc)
        cx1 = min(int(np.ceil((x1 - 0.5) / factor - 0.5)) + 2, wc)
        crop, origin = np.ascontiguousarray(prior[:, cy0:cy1, cx0:cx1]), (cy0, cx0)
    return TileJob(
        str(target.path),
        lt,
        str(source.path),
        ls,
        box,
        shape,
        np.asarray(a_k, np.float64),
        np.packbits(mask_k[y0:y1, x0:x1]),
        t_stats,
        s_stats,
        crop,
        origin,
        float(factor),
        *inks,
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
        if r.status == "ok":
            conf[ys.index(r.box[0]), xs.index(r.box[1])] = r.confidence
    ok = [r.confidence for r in results if r.status == "ok"]
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
