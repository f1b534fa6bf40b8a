"""The pair job as resumable stages. Flows run each stage as a task; the library runs them in
order with :func:`run_pair`.

Run directory layout (``DIR``)::

    job.json                                 the job (inputs, landmark files, settings)
    ingest/target.zarr, ingest/source.zarr   OME-Zarr pyramids of the inputs       [ingest_*]
    preprocess.npz                           tissue masks + intensity statistics   [preprocess]
    coarse.json                              coarse affine and its diagnostics      [coarse]
    nonrigid/tiles.npz, nonrigid/levels.json finest-level tiles, coarser levels     [nonrigid]
    transform/affine.json, backward.zarr, inverse.zarr                              [stitch]
    warped.zarr                              source warped into the target frame    [warp]
    warped-source-landmarks.csv              source landmarks in the target frame   [evaluate]
    warped-target-landmarks.csv              target landmarks in the source frame   [evaluate]
    metrics.json                             diagnostics (+ rTRE when scored)       [evaluate]
    qc/*.png                                 overlays, checkerboard, confidence,    [qc]
                                             tissue masks, deformation, Jacobian
    .stages/<stage>.json                     completion markers with fingerprints
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsireg_flow.config import Config
from wsireg_flow.errors import InputError, RegistrationError, WsiregError
from wsireg_flow.geometry import corner_origin
from wsireg_flow.io.omezarr import atomic_directory, ingest
from wsireg_flow.io.slide import Slide, open_slide, probe_shape
from wsireg_flow.landmarks import image_diagonal, paired, read_landmarks, write_landmarks
from wsireg_flow.metrics import score_pair
from wsireg_flow.parallel import describe_scheduler
from wsireg_flow.progress import ProgressFn
from wsireg_flow.qc import html_report, metrics_rows, qc_figures
from wsireg_flow.register import (
    PREPARED_FORMAT,
    LevelReport,
    Prepared,
    coarse,
    finalize,
    nonrigid,
    preprocess,
    stitch_level,
)
from wsireg_flow.stages import (
    MARKER_DIR,
    check_not_over_inputs,
    check_replaceable,
    check_unlocked,
    check_writable_dir,
    drop_stale,
    empty_run_dir,
    file_fingerprint,
    fingerprint,
    holds_results,
    is_complete,
    other_results,
    read_json_object,
    remove_partials,
    resolved_path,
    run_dir_lock,
    run_stage,
    write_json,
)
from wsireg_flow.tilestore import open_tiles, report_from_dict, report_to_dict, save_tiles
from wsireg_flow.transform import Transform
from wsireg_flow.warp import warp_slide

LOG = logging.getLogger(__name__)

PAIR_STAGES = (
    "ingest_target",
    "ingest_source",
    "preprocess",
    "coarse",
    "nonrigid",
    "stitch",
    "warp",
    "evaluate",
    "qc",
)
# everything a run directory holds at its top level (lock and temporary names aside): what
# `--overwrite` may replace
RUN_ENTRIES = frozenset(
    {"job.json", MARKER_DIR, "ingest", "preprocess.npz", "coarse.json", "nonrigid",
     "stitch.json", "transform", "warped.zarr", "warped-source-landmarks.csv",
     "warped-target-landmarks.csv", "metrics.json", "qc"}
)  # fmt: skip


# -- the job -------------------------------------------------------------------------------------
@dataclass
class PairJob:
    """One pair registration: inputs, settings, run directory."""

    target: Path
    source: Path
    run_dir: Path
    cfg: Config
    target_landmarks: Path | None = None
    source_landmarks: Path | None = None
    diagonal: float | None = None
    _fps: dict[str, str] = field(default_factory=dict, repr=False)

    def describe(self) -> dict[str, Any]:
        """The job's inputs as JSON-ready text (what ``job.json`` records), with paths resolved
        (absolute, symlinks followed) as the stage fingerprints see them: the same job typed
        with relative paths, or from another directory, is the same job."""
        return {
            "target": resolved_path(self.target),
            "source": resolved_path(self.source),
            "target_landmarks": resolved_path(self.target_landmarks),
            "source_landmarks": resolved_path(self.source_landmarks),
            "diagonal": self.diagonal,
        }

    def inputs(self) -> list[Path | None]:
        """The job's input files (None for landmark files not given)."""
        return [self.target, self.source, self.target_landmarks, self.source_landmarks]

    def fingerprints(self) -> dict[str, str]:
        """Chained fingerprint of every stage (inputs + the settings each stage reads)."""
        if self._fps:
            return self._fps
        c = self.cfg
        io = c.io.model_dump(mode="json")
        f: dict[str, str] = {}
        f["ingest_target"] = fingerprint("ingest", file_fingerprint(self.target), io)
        f["ingest_source"] = fingerprint("ingest", file_fingerprint(self.source), io)
        f["preprocess"] = fingerprint(
            "preprocess",
            PREPARED_FORMAT,
            f["ingest_target"],
            f["ingest_source"],
            c.tissue.model_dump(mode="json"),
            c.rigid.max_side,
        )
        f["coarse"] = fingerprint("coarse", f["preprocess"], c.rigid.model_dump(mode="json"))
        # every nonrigid key reaches the tile stage: smooth_sigma too (tiles are judged by
        # their smoothed flow, and the coarser levels are stitched inside the stage)
        f["nonrigid"] = fingerprint("nonrigid", f["coarse"], c.nonrigid.model_dump(mode="json"))
        f["stitch"] = fingerprint("stitch", f["nonrigid"])
        f["warp"] = fingerprint("warp", f["stitch"], io)
        f["evaluate"] = fingerprint(
            "evaluate",
            f["stitch"],
            file_fingerprint(self.target_landmarks),
            file_fingerprint(self.source_landmarks),  # path, size and time: moved files too
            self.diagonal,
        )
        f["qc"] = fingerprint("qc", f["warp"], f["evaluate"])
        self._fps = f
        return f

    # convenience openers
    def slide(self, which: str) -> Slide:
        """Open the ingested pyramid of ``which`` (``"target"`` or ``"source"``)."""
        return open_slide(self.run_dir / "ingest" / f"{which}.zarr")


def check_run_dir(job: PairJob, overwrite: bool = False) -> None:
    """Refuse (before any work) a run directory that cannot be written, that another run is
    writing now, or that holds another job (unless ``overwrite``)."""
    d = job.run_dir
    check_not_over_inputs(d, job.inputs())
    check_writable_dir(d)
    check_unlocked(d)
    if overwrite and holds_results(d):
        check_replaceable(d, "register run", RUN_ENTRIES)
    if not overwrite and holds_results(d) and not holds_this_job(job):
        raise _another_job(job)


def prepare_run_dir(job: PairJob, overwrite: bool = False) -> None:
    """Create the run directory, or check that an existing one holds the same job (call with
    :func:`~wsireg_flow.stages.run_dir_lock` held).

    An existing directory with a different job (other inputs) is refused unless ``overwrite``,
    which then empties it. The same job resumes: complete stages are skipped; the temporary
    outputs an interrupted run left are deleted, and so are the outputs of stages whose
    settings changed (until they run again the directory must not look complete).
    """
    d = job.run_dir
    check_not_over_inputs(d, job.inputs())
    if holds_results(d):
        if not overwrite and not holds_this_job(job):
            raise _another_job(job)
        if overwrite:
            check_replaceable(d, "register run", RUN_ENTRIES)
            empty_run_dir(d)
        else:
            remove_partials(d)
            drop_stale(d, job.fingerprints())
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "job.json", {**job.describe(), "config": job.cfg.model_dump(mode="json")})


# what makes a run directory another job's: its two slides. Landmark files and settings may
# change: the stages that read them run again (their fingerprints record them).
_IDENTITY_KEYS = ("target", "source")


def holds_this_job(job: PairJob) -> bool:
    """Whether the run directory's ``job.json`` records this job's target and source (paths
    compared resolved: records written before paths were resolved hold them as typed)."""
    old = read_json_object(job.run_dir / "job.json")
    if old is None:
        return False
    new = job.describe()
    return all(
        isinstance(old.get(k), str) and resolved_path(old[k]) == new[k] for k in _IDENTITY_KEYS
    )


def _another_job(job: PairJob) -> WsiregError:
    """The refusal of a run directory holding other results, saying whose when it can."""
    old = read_json_object(job.run_dir / "job.json")
    whose = ""
    if old is not None and all(isinstance(old.get(k), str) for k in _IDENTITY_KEYS):
        whose = f" (target {old['target']}, source {old['source']})"
    return other_results(job.run_dir, whose)


# -- stage implementations (each returns its outputs, relative to the run directory) ---------
def stage_ingest(job: PairJob, which: str, progress: ProgressFn | None = None) -> list[str]:
    """Tile the ``which`` input into ``ingest/<which>.zarr``; returns the outputs written (paths
    relative to the run directory), as every ``stage_*`` does."""
    path = job.target if which == "target" else job.source
    out = job.run_dir / "ingest" / f"{which}.zarr"
    cfg = job.cfg
    with open_slide(path, cfg.io.pixel_size_um) as slide:
        ingest(
            slide,
            out,
            chunk=cfg.io.chunk,
            max_side=min(cfg.io.pyramid_max_side, cfg.io.registration_min_side),
            codec=cfg.io.codec,
            overwrite=True,
            progress=progress,
        )
    return [f"ingest/{which}.zarr"]


def stage_preprocess(job: PairJob) -> list[str]:
    """Tissue masks and intensity statistics of both slides (``preprocess.npz``)."""
    target, source = job.slide("target"), job.slide("source")
    check_physical_sizes(target, source, job.source)
    try:
        pre = preprocess(target, source, job.cfg)
    except InputError as exc:  # name the user's file, not the run's ingested copy
        which = job.target if exc.path == target.path else job.source
        raise InputError(str(exc).split(": ", 1)[-1], which) from None
    path = job.run_dir / "preprocess.npz"
    tmp = path.with_name(".preprocess.tmp.npz")
    pre.save(tmp)
    os.replace(tmp, path)
    return ["preprocess.npz"]


def check_physical_sizes(
    target: Slide, source: Slide, source_name: Path | str, max_ratio: float = 3.0
) -> None:
    """Refuse a pair whose physical extents (diagonal in um) differ by more than ``max_ratio``.

    Only possible when both pixel sizes are known; serial sections of one block differ little.
    """
    if not (target.pixel_size_um and source.pixel_size_um):
        return
    ext_t = target.pixel_size_um * float(np.hypot(*target.shapes[0][:2]))
    ext_s = source.pixel_size_um * float(np.hypot(*source.shapes[0][:2]))
    ratio = max(ext_t, ext_s) / min(ext_t, ext_s)
    if ratio > max_ratio:
        raise InputError(
            f"physical size differs from the target's by {ratio:.1f}x (pixel size "
            f"{source.pixel_size_um:g} vs {target.pixel_size_um:g} um, diagonal "
            f"{ext_s / 1000:.2f} vs {ext_t / 1000:.2f} mm): not sections of the same tissue, "
            "or a wrong pixel size",
            source_name,
        )


def stage_coarse(job: PairJob) -> list[str]:
    """Coarse affine at the rigid level (``coarse.json``); implausible fits are refused."""
    pre = Prepared.load(job.run_dir / "preprocess.npz")
    try:
        rigid, affine0 = coarse(job.slide("target"), job.slide("source"), pre, job.cfg)
    except RegistrationError as exc:
        raise RegistrationError(str(exc), job.source) from None
    write_json(job.run_dir / "coarse.json", {"affine": affine0, "rigid": rigid.to_dict()})
    return ["coarse.json"]


def _affine(job: PairJob) -> tuple[np.ndarray, dict[str, Any]]:
    d = json.loads((job.run_dir / "coarse.json").read_text())
    return np.asarray(d["affine"], np.float64), d["rigid"]


def stage_nonrigid(
    job: PairJob, scheduler: Any = "threads", progress: ProgressFn | None = None
) -> list[str]:
    """Tile-wise non-rigid on every working level, one Dask task per tile (``nonrigid/``)."""
    pre = Prepared.load(job.run_dir / "preprocess.npz")
    affine0, _ = _affine(job)
    tiles, reports = nonrigid(
        job.slide("target"), job.slide("source"), pre, affine0, job.cfg, scheduler, progress
    )
    outputs = ["nonrigid/levels.json"]
    if tiles is not None:
        save_tiles(job.run_dir / "nonrigid" / "tiles.npz", tiles)
        outputs.append("nonrigid/tiles.npz")
    record = {
        "scheduler": describe_scheduler(scheduler),
        "levels": [report_to_dict(r) for r in reports],
    }
    write_json(job.run_dir / "nonrigid" / "levels.json", record)
    return outputs


def stage_stitch(job: PairJob) -> list[str]:
    """Stitch the finest level, invert the field and write ``transform/`` (both directions)."""
    affine0, rigid = _affine(job)
    tiles_path = job.run_dir / "nonrigid" / "tiles.npz"
    residual, downsample, report = None, None, None
    if tiles_path.is_file():
        with open_tiles(tiles_path) as tiles:  # read one tile at a time while blending
            residual, report = stitch_level(tiles, job.cfg)
            downsample = tiles.downsample
    meta = {"rigid_method": rigid["method"], "rigid_flipped": rigid["flipped"]}
    transform = finalize(
        affine0, residual, downsample, job.slide("target"), job.slide("source"), meta
    )
    with atomic_directory(job.run_dir / "transform", overwrite=True) as tmp:
        transform.save(tmp)
    write_json(
        job.run_dir / "stitch.json", {"level": None if report is None else report_to_dict(report)}
    )
    return ["transform", "stitch.json"]


def stage_warp(job: PairJob, progress: ProgressFn | None = None) -> list[str]:
    """Warp the full-resolution source into the target frame, chunk by chunk (``warped.zarr``)."""
    cfg = job.cfg
    target = job.slide("target")
    warp_slide(
        Transform.load(job.run_dir / "transform"),
        job.slide("source"),
        job.run_dir / "warped.zarr",
        target.pixel_size_um,
        chunk=cfg.io.chunk,
        max_side=cfg.io.pyramid_max_side,
        codec=cfg.io.codec,
        overwrite=True,
        progress=progress,
    )
    return ["warped.zarr"]


def level_reports(job: PairJob) -> list[LevelReport]:
    """Reports of every non-rigid level of a finished run, coarsest first."""
    levels = json.loads((job.run_dir / "nonrigid" / "levels.json").read_text())["levels"]
    final = json.loads((job.run_dir / "stitch.json").read_text())["level"]
    return [report_from_dict(d) for d in [*levels, *([final] if final else [])]]


def stage_evaluate(job: PairJob) -> list[str]:
    """Warp landmarks both ways and write ``metrics.json`` (rTRE when both files are given)."""
    transform = Transform.load(job.run_dir / "transform")
    _, rigid = _affine(job)
    reports = level_reports(job)
    metrics: dict[str, Any] = {
        "inputs": job.describe(),
        "rigid": rigid,
        "levels": [
            {k: v for k, v in report_to_dict(r).items() if k != "confidence_map"} for r in reports
        ],
        "folding_fraction": max((r.folding_fraction for r in reports), default=0.0),
        "stage_seconds": _stage_seconds(job.run_dir),
    }
    outputs = ["metrics.json"]
    for name in ("warped-source-landmarks.csv", "warped-target-landmarks.csv"):
        (job.run_dir / name).unlink(missing_ok=True)
    scores = landmark_outputs(
        transform, job.run_dir, job.target_landmarks, job.source_landmarks, job.diagonal
    )
    if job.source_landmarks:
        outputs.append("warped-source-landmarks.csv")
    if job.target_landmarks:
        outputs.append("warped-target-landmarks.csv")
    if scores is not None:
        metrics["landmarks"] = scores
    write_json(job.run_dir / "metrics.json", metrics)
    return outputs


def _stage_seconds(run_dir: Path) -> dict[str, float]:
    out = {}
    for m in sorted((run_dir / ".stages").glob("*.json")):
        try:
            out[m.stem] = json.loads(m.read_text())["seconds"]
        except (ValueError, KeyError):
            continue
    return out


def stage_qc(job: PairJob) -> list[str]:
    """QC figures (``qc/*.png``) and the self-contained ``qc/report.html``."""
    transform = Transform.load(job.run_dir / "transform")
    pts = None
    if job.target_landmarks and job.source_landmarks:
        pts = paired(read_landmarks(job.target_landmarks), read_landmarks(job.source_landmarks))
    pre = Prepared.load(job.run_dir / "preprocess.npz")
    paths = qc_figures(
        job.slide("target"),
        job.slide("source"),
        open_slide(job.run_dir / "warped.zarr"),
        transform,
        level_reports(job),
        job.run_dir / "qc",
        pts,
        masks=(pre.target_mask, pre.source_mask),
    )
    metrics = json.loads((job.run_dir / "metrics.json").read_text())
    report = html_report(
        job.run_dir / "qc" / "report.html",
        f"wsireg-flow: {job.source.name} onto {job.target.name}",
        [("Registration", metrics_rows(metrics), paths)],
    )
    return [str(p.relative_to(job.run_dir)) for p in [*paths, report]]


def landmark_outputs(
    transform: Transform,
    run_dir: Path,
    target_landmarks: str | os.PathLike[str] | None,
    source_landmarks: str | os.PathLike[str] | None,
    diagonal: float | None = None,
) -> dict[str, Any] | None:
    """Write warped landmark CSVs; return rTRE statistics when both files are given.

    Files of different lengths are paired row by row over the shorter one (ANHIR convention),
    with a logged warning; the statistics record both counts.

    ``diagonal`` defaults to the target image's level-0 diagonal (ANHIR rTRE normaliser).
    """
    tl = read_landmarks(target_landmarks) if target_landmarks else None
    sl = read_landmarks(source_landmarks) if source_landmarks else None
    # landmark files put the origin at a pixel's corner, transforms at its centre
    to_target = corner_origin(transform.source_to_target)
    to_source = corner_origin(transform.target_to_source)
    if sl is not None:
        write_landmarks(run_dir / "warped-source-landmarks.csv", to_target(sl))
    if tl is not None:
        write_landmarks(run_dir / "warped-target-landmarks.csv", to_source(tl))
    if tl is None or sl is None:
        return None
    if diagonal is None:
        diagonal = image_diagonal(*transform.target_shape)
    if len(tl) != len(sl):
        LOG.warning(
            "%s has %d landmarks, %s has %d: rows 1-%d of each are paired (ANHIR convention)",
            target_landmarks,
            len(tl),
            source_landmarks,
            len(sl),
            min(len(tl), len(sl)),
        )
    t, s = paired(tl, sl)
    score = score_pair(t, s, to_target(s), diagonal)
    target_space = np.linalg.norm(to_source(t) - s, axis=1) / diagonal
    return {
        "diagonal": diagonal,
        "n_target_landmarks": len(tl),
        "n_source_landmarks": len(sl),
        **score.to_dict(),
        "target_to_source_median_rtre": float(np.median(target_space)),
    }


# -- running ----------------------------------------------------------------------------------
def stage_function(
    job: PairJob, name: str, scheduler: Any = "threads", progress: ProgressFn | None = None
) -> Callable[[], list[str]]:
    """The zero-argument callable that performs stage ``name`` of ``job``."""
    table: dict[str, Callable[[], list[str]]] = {
        "ingest_target": lambda: stage_ingest(job, "target", progress),
        "ingest_source": lambda: stage_ingest(job, "source", progress),
        "preprocess": lambda: stage_preprocess(job),
        "coarse": lambda: stage_coarse(job),
        "nonrigid": lambda: stage_nonrigid(job, scheduler, progress),
        "stitch": lambda: stage_stitch(job),
        "warp": lambda: stage_warp(job, progress),
        "evaluate": lambda: stage_evaluate(job),
        "qc": lambda: stage_qc(job),
    }
    return table[name]


def run_pair_stage(
    job: PairJob, name: str, scheduler: Any = "threads", progress: ProgressFn | None = None
) -> bool:
    """Run one stage unless complete with the current fingerprint; True when it ran."""
    fp = job.fingerprints()[name]
    return run_stage(job.run_dir, name, fp, stage_function(job, name, scheduler, progress))


def check_inputs(job: PairJob) -> None:
    """Fail early, before any work, on missing inputs or bad landmark files.

    Landmarks must be finite and lie on their image (within one pixel of its border): a NaN
    row or a point off the image in an input file is a mistake to report, not a landmark.
    """
    shapes = {}
    for p in (job.target, job.source):
        if not Path(p).exists():
            raise WsiregError("file not found", p)
        shapes[p] = probe_shape(p)  # a bad image fails here, before any work
    pairs = ((job.target_landmarks, job.target), (job.source_landmarks, job.source))
    for lm, image in pairs:
        if lm is not None:
            validate_landmarks(read_landmarks(lm), shapes[image], lm)


def validate_landmarks(points: np.ndarray, shape: tuple[int, int], path: Path | str) -> None:
    """Refuse NaN rows and (x, y) points more than one pixel outside a (H, W) image."""
    bad = np.flatnonzero(~np.isfinite(points).all(axis=1))
    if bad.size:
        raise InputError(f"landmark row {bad[0] + 1} has no coordinates (NaN)", path)
    h, w = shape
    out = np.flatnonzero(
        (points[:, 0] < -1) | (points[:, 0] > w) | (points[:, 1] < -1) | (points[:, 1] > h)
    )
    if out.size:
        x, y = points[out[0]]
        raise InputError(
            f"landmark row {out[0] + 1} at (x={x:g}, y={y:g}) lies outside the {w}x{h} image",
            path,
        )


def job_is_complete(job: PairJob, stages: Sequence[str] = PAIR_STAGES) -> bool:
    """True when the run directory holds this job with every stage complete and current.

    Lets callers answer a re-run of a finished job without starting any orchestration.
    """
    if not holds_this_job(job):
        return False
    try:
        fps = job.fingerprints()
    except (OSError, ValueError):
        return False
    return all(is_complete(job.run_dir, name, fps[name]) for name in stages)


def run_pair(
    job: PairJob,
    *,
    scheduler: Any = "threads",
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    stages: Sequence[str] = PAIR_STAGES,
) -> dict[str, bool]:
    """Run ``stages`` (default: every stage) of ``job`` in order, without Prefect; returns
    {stage: ran}."""
    check_inputs(job)
    check_run_dir(job, overwrite)  # before the lock file is created in a folder it refuses
    with run_dir_lock(job.run_dir):
        prepare_run_dir(job, overwrite)
        return {name: run_pair_stage(job, name, scheduler, progress) for name in stages}
