"""The pair job as stages: ingest, register, warp, landmarks, QC. Flows call these.

Run directory layout (``DIR``)::

    ingest/target.zarr, ingest/source.zarr   OME-Zarr pyramids of the inputs
    transform/affine.json, backward.zarr, inverse.zarr
    warped.zarr                              source warped into the target frame (level 0 up)
    warped-source-landmarks.csv              source landmarks in the target frame (official)
    warped-target-landmarks.csv              target landmarks in the source frame
    metrics.json                             registration diagnostics (+ rTRE when scored)
    qc/*.png                                 overlays before / after, checkerboard, confidence
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsireg_flow.config import Config
from wsireg_flow.io.omezarr import atomic_directory, ingest
from wsireg_flow.io.slide import Slide, open_slide
from wsireg_flow.landmarks import image_diagonal, paired, read_landmarks, write_landmarks
from wsireg_flow.metrics import score_pair
from wsireg_flow.progress import ProgressFn
from wsireg_flow.pyramid import level_for_max_side
from wsireg_flow.qc import checkerboard, overlay, save_figure
from wsireg_flow.register import Registration, register_slides
from wsireg_flow.transform import Transform
from wsireg_flow.warp import warp_slide


def ingest_input(
    path: str | os.PathLike[str], out: Path, cfg: Config, progress: ProgressFn | None = None
) -> Path:
    """Ingest one input for registration (pyramid down to ``io.registration_min_side``)."""
    with open_slide(path, cfg.io.pixel_size_um) as slide:
        return ingest(
            slide,
            out,
            chunk=cfg.io.chunk,
            max_side=min(cfg.io.pyramid_max_side, cfg.io.registration_min_side),
            codec=cfg.io.codec,
            overwrite=True,
            progress=progress,
        )


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_default))
    os.replace(tmp, path)


def _default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def registration_metrics(reg: Registration) -> dict[str, Any]:
    """Diagnostics of a registration: rigid fit, per-level tiles and folding, timings."""
    out = reg.summary()
    out["folding_fraction"] = max((lv.folding_fraction for lv in reg.levels), default=0.0)
    return out


def landmark_outputs(
    transform: Transform,
    run_dir: Path,
    target_landmarks: str | os.PathLike[str] | None,
    source_landmarks: str | os.PathLike[str] | None,
    diagonal: float | None = None,
) -> dict[str, Any] | None:
    """Write warped landmark CSVs; return rTRE statistics when both files are given.

    ``diagonal`` defaults to the target image's level-0 diagonal (ANHIR rTRE normaliser).
    """
    tl = read_landmarks(target_landmarks) if target_landmarks else None
    sl = read_landmarks(source_landmarks) if source_landmarks else None
    if sl is not None:
        write_landmarks(run_dir / "warped-source-landmarks.csv", transform.source_to_target(sl))
    if tl is not None:
        write_landmarks(run_dir / "warped-target-landmarks.csv", transform.target_to_source(tl))
    if tl is None or sl is None:
        return None
    if diagonal is None:
        diagonal = image_diagonal(*transform.target_shape)
    t, s = paired(tl, sl)
    score = score_pair(t, s, transform.source_to_target(s), diagonal)
    target_space = np.linalg.norm(transform.target_to_source(t) - s, axis=1) / diagonal
    return {
        "diagonal": diagonal,
        **score.to_dict(),
        "target_to_source_median_rtre": float(np.median(target_space)),
    }


def _preview(slide: Slide, size: int) -> tuple[np.ndarray, float]:
    k = level_for_max_side(slide.shapes, size)
    h, w = slide.shapes[k][:2]
    img = slide.read_region(k, 0, 0, h, w)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return img[..., :3], slide.downsamples[k]


def qc_figures(
    target: Slide,
    source: Slide,
    warped: Slide,
    reg: Registration,
    qc_dir: Path,
    landmarks: tuple[np.ndarray, np.ndarray] | None = None,
    size: int = 1024,
) -> list[Path]:
    """Overlays before/after, checkerboard and tile confidence maps as PNGs."""
    t_img, dt = _preview(target, size)
    w_img, _ = _preview(warped, size)
    w_img = cv2.resize(w_img, (t_img.shape[1], t_img.shape[0]), interpolation=cv2.INTER_AREA)
    s_img, ds = _preview(source, int(size * max(source.shapes[0][:2]) / max(target.shapes[0][:2])))
    before = np.full_like(t_img, 255)
    hh, ww = min(before.shape[0], s_img.shape[0]), min(before.shape[1], s_img.shape[1])
    before[:hh, :ww] = s_img[:hh, :ww]
    arrows = None
    if landmarks is not None:
        t_pts, s_pts = landmarks
        warped_pts = reg.transform.source_to_target(s_pts)
        arrows = [(s_pts / ds, t_pts / dt), (warped_pts / dt, t_pts / dt)]
    paths = [
        save_figure(
            qc_dir / "overlay.png",
            [
                ("before (target red, source green)", overlay(t_img, before)),
                ("after", overlay(t_img, w_img)),
            ],
            "Registration overlay"
            + (" with landmarks: arrows end at the target" if arrows else ""),
            arrows,
        ),
        save_figure(
            qc_dir / "checkerboard.png", [("checkerboard after", checkerboard(t_img, w_img))]
        ),
    ]
    if reg.levels:
        panels = [
            (f"level {lv.target_level} tile confidence", np.nan_to_num(lv.confidence_map, nan=0.0))
            for lv in reg.levels
        ]
        paths.append(save_figure(qc_dir / "tile-confidence.png", panels))
    return paths


def run_pair(
    target_path: str | os.PathLike[str],
    source_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: Config,
    *,
    target_landmarks: str | os.PathLike[str] | None = None,
    source_landmarks: str | os.PathLike[str] | None = None,
    diagonal: float | None = None,
    scheduler: Any = "threads",
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Register ``source`` onto ``target`` and write the run directory (see module docstring).

    The directory is built under a temporary name and renamed when complete.
    Returns the content of ``metrics.json``.
    """
    for lm in (target_landmarks, source_landmarks):
        if lm is not None:
            read_landmarks(lm)  # fail early, before any work, on a bad landmark file
    with atomic_directory(Path(out_dir), overwrite) as tmp:
        tmp.mkdir(parents=True)
        t_zarr = ingest_input(target_path, tmp / "ingest" / "target.zarr", cfg, progress)
        s_zarr = ingest_input(source_path, tmp / "ingest" / "source.zarr", cfg, progress)
        target, source = open_slide(t_zarr), open_slide(s_zarr)
        reg = register_slides(target, source, cfg, scheduler=scheduler, progress=progress)
        reg.transform.save(tmp / "transform")
        warped_path = warp_slide(
            reg.transform,
            source,
            tmp / "warped.zarr",
            target.pixel_size_um,
            chunk=cfg.io.chunk,
            max_side=cfg.io.pyramid_max_side,
            codec=cfg.io.codec,
            progress=progress,
        )
        metrics = registration_metrics(reg)
        scores = landmark_outputs(reg.transform, tmp, target_landmarks, source_landmarks, diagonal)
        if scores is not None:
            metrics["landmarks"] = scores
        pts = None
        if target_landmarks and source_landmarks:
            pts = paired(read_landmarks(target_landmarks), read_landmarks(source_landmarks))
        qc_figures(target, source, open_slide(warped_path), reg, tmp / "qc", pts)
        metrics["inputs"] = {"target": str(target_path), "source": str(source_path)}
        write_json(tmp / "metrics.json", metrics)
    return metrics
