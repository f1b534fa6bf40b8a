"""Compare wsireg-flow with palom: ANHIR accuracy and gigapixel speed / memory / accuracy.

palom (https://github.com/labsyspharm/palom; measured with palom 2026.4.1 from PyPI) is not a
dependency of this project: it runs in its own venv, through ``benchmarks_anhir/palom_driver.py``
executed by ``--palom-python``. The driver follows palom's README recipe for a pair of OME-TIFFs
(coarse affine from ORB features on a ~2000 px thumbnail, then phase-correlation shifts per
block of the full-resolution reference, ``constrain_shifts``) and writes palom's affine, its
block shifts and block affine matrices with the block geometry as JSON. This script maps the
landmarks through that transform here and scores them with :mod:`wsireg_flow.metrics`.

Create palom's venv once::

    python3 -m venv /tmp/palom-venv && /tmp/palom-venv/bin/pip install palom

Run::

    .venv/bin/python -m benchmarks_anhir.compare_palom --palom-python /tmp/palom-venv/bin/python \\
        --dataset data/anhir-sample --pairs data/anhir-sample/dataset.csv \\
        --sizes 10000 20000 40000 --out runs/compare-palom

Parts (each can be skipped with ``--skip-anhir`` / ``--skip-gigapixel``):

0. A synthetic check of the landmark mapping: an ANHIR image warped by a known affine, palom
   registers it back, the mapped landmarks must land within a pixel or two of the truth.
1. ANHIR (``--dataset``/``--pairs``): every JPEG is converted losslessly to a tiled OME-TIFF
   (``wsireg_flow.io.ometiff.export_ome_tiff``, deflate, 512 px tiles, the same as
   ``wsireg-flow export IMAGE.jpg --out IMAGE.ome.tif --compression deflate``), palom
   registers SOURCE (moving) onto TARGET (reference), the SOURCE landmarks are mapped into the
   TARGET frame through palom's piecewise transform and scored the official ANHIR way
   (:func:`~wsireg_flow.metrics.score_pair`, rTRE = TRE / target diagonal, first min(N) rows; a
   failed pair counts as unregistered). wsireg-flow registers the same pairs (default config,
   threaded scheduler) and is scored by the same code. palom's block is one tile of the
   reference file (512 px) unless ``--anhir-palom-blocks`` lists other sizes (0 = the tile).
2. Gigapixel (``--sizes``): the synthetic pairs of ``benchmarks_anhir.gigapixel`` (cached under
   ``--data``). palom runs end to end as a user would (register + write the registered moving
   slide as a zlib pyramidal OME-TIFF), timed wall clock, its memory the peak RSS of its
   process tree (``gigapixel.PeakRSS`` on this process and its children, sampled every 0.1 s,
   less this idle harness's own RSS, which is recorded). wsireg-flow runs its whole pipeline
   (ingest, coarse, non-rigid, full-resolution warp written as OME-Zarr) through
   ``python -m benchmarks_anhir.gigapixel`` in a fresh process right after, with the same
   ``PeakRSS`` (threaded scheduler, ``--workers`` threads). Both are scored by TRE of the
   source landmarks mapped into the target frame against the ground truth, in level-0 pixels.
   The 1-minute load average before each row is recorded: the machine may be shared.

Coordinates: points are ``(x, y)`` pixels (x = column, y = row) with pixel centres at integer
coordinates, as OpenCV and scikit-image (which palom uses) place them; arrays are ``(y, x)``.
Prints tables and writes ``OUT/compare-palom.json``.
"""

from __future__ import annotations

import os

# palom (and wsireg-flow's gigapixel run, which sets its own) get the environment the user
# had, not the thread limits that importing gigapixel sets in this process
_USER_ENV = dict(os.environ)

from benchmarks_anhir import gigapixel  # noqa: E402
from benchmarks_anhir.external import external_version  # noqa: E402

PeakRSS, ensure_pair = gigapixel.PeakRSS, gigapixel.ensure_pair

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from wsireg_flow.config import Config  # noqa: E402
from wsireg_flow.io.ometiff import export_ome_tiff  # noqa: E402
from wsireg_flow.landmarks import (  # noqa: E402
    read_landmarks,
    read_pair_table,
    resolve_path,
    write_landmarks,
)
from wsireg_flow.metrics import PairScore, aggregate, score_pair, tre  # noqa: E402
from wsireg_flow.pipeline import PairJob, run_pair  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "benchmarks_anhir" / "palom_driver.py"
VENV_HINT = (
    "create it with: python3 -m venv /tmp/palom-venv && /tmp/palom-venv/bin/pip install palom, "
    "then pass --palom-python /tmp/palom-venv/bin/python"
)


# --------------------------------------------------------------------------------------------
# palom's transform, evaluated on points
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PalomTransform:
    """palom's piecewise-affine transform between MOVING (ANHIR source) and REF (target).

    Attributes
    ----------
    affine
        ``(3, 3)`` coarse affine, MOVING -> REF, on homogeneous ``(x, y, 1)`` level-0 pixels.
    block_matrices
        ``(B, 3, 3)``, one MOVING -> REF affine per block of the REF grid, row-major over the
        grid; block ``b`` is ``T(shift_b) @ affine`` and governs the REF pixels inside it.
    edges_y, edges_x
        Block boundaries in REF level-0 rows / columns, length ``rows + 1`` / ``cols + 1``,
        starting at 0: block ``(i, j)`` holds the pixels with ``edges_y[i] <= row <
        edges_y[i + 1]`` and ``edges_x[j] <= col < edges_x[j + 1]``.
    """

    affine: np.ndarray
    block_matrices: np.ndarray
    edges_y: np.ndarray
    edges_x: np.ndarray

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> PalomTransform:
        """Build from the JSON record written by ``palom_driver.py``."""
        t = cls(
            np.asarray(rec["affine_matrix"], dtype=np.float64),
            np.asarray(rec["block_affine_matrices"], dtype=np.float64).reshape(-1, 3, 3),
            np.asarray(rec["block_edges_y"], dtype=np.int64),
            np.asarray(rec["block_edges_x"], dtype=np.int64),
        )
        if len(t.block_matrices) != t.grid_shape[0] * t.grid_shape[1]:
            raise ValueError(
                f"{len(t.block_matrices)} block matrices for a {t.grid_shape} block grid"
            )
        return t

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the block grid."""
        return len(self.edges_y) - 1, len(self.edges_x) - 1

    def block_of(self, points: np.ndarray) -> np.ndarray:
        """Flat index of the REF block holding each ``(x, y)`` REF point, shape ``(N,)``.

        A point belongs to the pixel whose centre is nearest (``floor(v + 0.5)``); points off
        the image count in the nearest edge block (palom's block transform extended).
        """
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        rows, cols = self.grid_shape
        px = np.floor(pts + 0.5)
        j = np.clip(np.searchsorted(self.edges_x, px[:, 0], side="right") - 1, 0, cols - 1)
        i = np.clip(np.searchsorted(self.edges_y, px[:, 1], side="right") - 1, 0, rows - 1)
        return i * cols + j

    def target_to_source(self, points: np.ndarray) -> np.ndarray:
        """REF (target) points ``(N, 2)`` ``(x, y)`` -> MOVING (source) points: exact, it is
        what palom's warp does (``M_b^-1 q`` with ``b`` the block holding ``q``)."""
        q = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        inv = np.linalg.inv(self.block_matrices[self.block_of(q)])  # (N, 3, 3)
        qh = np.concatenate([q, np.ones((len(q), 1))], axis=1)
        return np.einsum("nij,nj->ni", inv, qh)[:, :2]

    def source_to_target(self, points: np.ndarray) -> np.ndarray:
        """MOVING (source) points ``(N, 2)`` ``(x, y)`` -> REF (target) points.

        Where palom's warped slide shows the source point ``p``: ``q = M_b p`` for the block
        ``b`` that holds ``q``. Blocks whose image of ``p`` lands inside themselves are
        consistent; of several, the one nearest the coarse affine's ``A p``. When none is (``p``
        fell in a gap between two blocks' pieces), the block whose ``q`` is nearest to its own
        rectangle. NaN rows stay NaN.
        """
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        out = np.full_like(p, np.nan)
        ok = np.isfinite(p).all(axis=1)
        if not ok.any():
            return out
        ph = np.concatenate([p[ok], np.ones((int(ok.sum()), 1))], axis=1)  # (N, 3)
        cand = np.einsum("bij,nj->nbi", self.block_matrices, ph)[:, :, :2]  # (N, B, 2)
        n, nb = cand.shape[:2]
        own = self.block_of(cand.reshape(-1, 2)).reshape(n, nb)
        consistent = own == np.arange(nb)[None, :]
        coarse = (ph @ self.affine.T)[:, :2]
        to_coarse = np.linalg.norm(cand - coarse[:, None, :], axis=2)
        # distance of each candidate from its block's rectangle (0 inside), in px
        cols = self.grid_shape[1]
        bi, bj = np.divmod(np.arange(nb), cols)
        lo = np.stack([self.edges_x[bj] - 0.5, self.edges_y[bi] - 0.5], axis=1)
        hi = np.stack([self.edges_x[bj + 1] - 0.5, self.edges_y[bi + 1] - 0.5], axis=1)
        gap = np.linalg.norm(
            np.maximum(lo[None] - cand, 0) + np.maximum(cand - hi[None], 0), axis=2
        )
        score = np.where(consistent, to_coarse, np.inf)
        none = ~consistent.any(axis=1)
        pick = np.argmin(score, axis=1)
        pick[none] = np.argmin(gap[none] + 1e-9 * to_coarse[none], axis=1)
        out[ok] = cand[np.arange(n), pick]
        return out


# --------------------------------------------------------------------------------------------
# running palom
# --------------------------------------------------------------------------------------------


def check_palom_python(palom_python: Path | None) -> str:
    """Return palom's version as the given interpreter reports it.

    Raises
    ------
    SystemExit
        With one line saying how to create palom's venv, when ``palom_python`` is not given,
        does not exist or cannot import palom.
    """
    return external_version(
        palom_python,
        [str(DRIVER), "--check"],
        script="compare_palom",
        missing="cannot import palom",
        hint=VENV_HINT,
        env=_USER_ENV,
    )


def run_palom(
    palom_python: Path,
    ref: Path,
    moving: Path,
    record: Path,
    *,
    out_tif: Path | None = None,
    block: int | None = None,
    coarse: str = "readme",
) -> tuple[dict[str, Any] | None, float, str]:
    """Run the palom driver on one pair in a subprocess.

    Returns
    -------
    tuple
        ``(record or None when palom failed, wall seconds of the subprocess, last stderr line)``.
    """
    cmd = [str(palom_python), str(DRIVER), str(ref), str(moving), "--json", str(record)]
    if out_tif is not None:
        cmd += ["--out-tif", str(out_tif)]
    if block:
        cmd += ["--block", str(block)]
    if coarse != "readme":
        cmd += ["--coarse", coarse]
    record.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_USER_ENV, check=False)
    seconds = time.perf_counter() - t0
    err = (proc.stderr.strip().splitlines() or [""])[-1]
    if proc.returncode != 0 or not record.is_file():
        return None, seconds, err
    return json.loads(record.read_text()), seconds, err


# --------------------------------------------------------------------------------------------
# 0. synthetic check of the mapping direction
# --------------------------------------------------------------------------------------------


def synthetic_check(palom_python: Path, image: Path, landmarks: Path, work: Path) -> dict[str, Any]:
    """Warp ``image`` by a known affine, let palom register it back, map the landmarks.

    The TARGET is ``image`` with its landmarks ``t``; the SOURCE is ``cv2.warpAffine(image, M)``
    (so ``source(M t) = target(t)``) with landmarks ``M t``. palom's source -> target mapping
    of ``M t`` must give back ``t`` (and its target -> source mapping of ``t`` gives ``M t``).
    With the direction inverted the error would be about twice the transform's displacement.
    """
    work.mkdir(parents=True, exist_ok=True)
    img = cv2.imread(str(image), cv2.IMREAD_COLOR)
    if img is None:
        raise SystemExit(f"{image}: cannot read the image")
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 4.0, 1.03)  # (x, y) pixels, centres at integers
    m[:, 2] += (23.4, -15.7)
    source = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=(255, 255, 255))
    t = read_landmarks(landmarks)
    s = t @ m[:, :2].T + m[:, 2]
    paths = {}
    for name, pixels in (("target", img), ("source", source)):
        png = work / f"{name}.png"
        cv2.imwrite(str(png), pixels)
        paths[name] = export_ome_tiff(
            png, work / f"{name}.ome.tif", compression="deflate", overwrite=True
        )
    rec, seconds, err = run_palom(
        palom_python, paths["target"], paths["source"], work / "palom.json"
    )
    if rec is None:
        return {"ok": False, "error": err}
    tf = PalomTransform.from_record(rec)
    fwd = tre(tf.source_to_target(s), t)
    back = tre(tf.target_to_source(t), s)
    wrong = tre(tf.target_to_source(s), t)  # the inverted direction, for contrast
    disp = tre(s, t)
    return {
        "ok": bool(np.median(fwd) < 1.5),
        "known_matrix_source_from_target": m.tolist(),
        "landmarks": len(t),
        "displacement_px_median": round(float(np.median(disp)), 3),
        "source_to_target_tre_px_median": round(float(np.median(fwd)), 3),
        "source_to_target_tre_px_max": round(float(fwd.max()), 3),
        "target_to_source_tre_px_median": round(float(np.median(back)), 3),
        "inverted_direction_tre_px_median": round(float(np.median(wrong)), 3),
        "palom_seconds": round(seconds, 2),
    }


# --------------------------------------------------------------------------------------------
# 1. ANHIR
# --------------------------------------------------------------------------------------------


def to_ome_tiff(image: Path, out: Path) -> Path:
    """A lossless tiled OME-TIFF copy of ``image`` (deflate, 512 px tiles), made once."""
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        export_ome_tiff(image, out, compression="deflate")
    return out


def _pair_row(score: PairScore, seconds: float | None) -> dict[str, Any]:
    return {
        "median_rtre": score.median_rtre,
        "max_rtre": score.max_rtre,
        "mean_rtre": score.mean_rtre,
        "robustness": score.robustness,
        "initial_median_rtre": score.initial_median_rtre,
        "registered": score.registered,
        "seconds": None if seconds is None else round(seconds, 2),
    }


def variant_name(coarse: str, block: int) -> str:
    """``palom`` for the README recipe on the file's tiles, else e.g. ``palom-search-b128``."""
    return "-".join(
        ["palom"] + ([coarse] if coarse != "readme" else []) + ([f"b{block}"] if block else [])
    )


def anhir(
    palom_python: Path,
    dataset: Path,
    table: Path,
    work: Path,
    blocks: list[int],
    coarses: list[str],
) -> dict[str, Any]:
    """Score palom (one run per coarse step and block size, 0 = the file's tile) and
    wsireg-flow on every pair of ``table``; returns per-pair rows and ANHIR aggregates per
    method."""
    pairs = read_pair_table(table)
    methods: dict[str, dict[str, Any]] = {}
    tif_dir = work / "ome-tiff"
    for coarse, block in [(c, b) for c in coarses for b in blocks]:
        name = variant_name(coarse, block)
        rows, scores = [], []
        for pair in pairs:
            target = resolve_path(dataset, pair.target_image)
            source = resolve_path(dataset, pair.source_image)
            t_lm = read_landmarks(resolve_path(dataset, pair.target_landmarks))
            s_lm = read_landmarks(resolve_path(dataset, pair.source_landmarks))
            diag = pair.image_diagonal or float(np.hypot(*cv2.imread(str(target)).shape[:2]))
            ref = to_ome_tiff(
                target, tif_dir / f"{target.parent.parent.name}-{target.stem}.ome.tif"
            )
            mov = to_ome_tiff(
                source, tif_dir / f"{source.parent.parent.name}-{source.stem}.ome.tif"
            )
            d = work / name / f"pair-{pair.index}"
            d.mkdir(parents=True, exist_ok=True)
            rec, seconds, err = run_palom(
                palom_python,
                ref,
                mov,
                d / "palom.json",
                out_tif=d / "warped-source.ome.tif",
                block=block or None,
                coarse=coarse,
            )
            warped = None
            if rec is not None:
                tf = PalomTransform.from_record(rec)
                warped = tf.source_to_target(s_lm)
                write_landmarks(d / "warped-source-landmarks.csv", warped)
            score = score_pair(t_lm, s_lm, warped, diag)
            scores.append(score)
            row = {"pair": pair.index, **_pair_row(score, seconds)}
            if rec is not None:
                row["palom_seconds"] = rec["seconds"]
                row["grid_shape"] = rec["grid_shape"]
                row["constrain_error"] = rec["constrain_error"]
            else:
                row["error"] = err
            rows.append(row)
        methods[name] = {"pairs": rows, "aggregate": aggregate(scores)}

    rows, scores = [], []
    for pair in pairs:
        job = PairJob(
            resolve_path(dataset, pair.target_image),
            resolve_path(dataset, pair.source_image),
            work / "wsireg-flow" / f"pair-{pair.index}",
            Config(),
            resolve_path(dataset, pair.target_landmarks),
            resolve_path(dataset, pair.source_landmarks),
            pair.image_diagonal,
        )
        shutil.rmtree(job.run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        warped = None
        try:
            run_pair(job, scheduler="threads")
            warped = read_landmarks(job.run_dir / "warped-source-landmarks.csv")
        except Exception as exc:  # a failed pair counts as unregistered, never dropped
            print(f"wsireg-flow pair {pair.index} failed: {exc}", flush=True)
        seconds = time.perf_counter() - t0
        t_lm = read_landmarks(job.target_landmarks)
        s_lm = read_landmarks(job.source_landmarks)
        diag = pair.image_diagonal or float(np.hypot(*cv2.imread(str(job.target)).shape[:2]))
        score = score_pair(t_lm, s_lm, warped, diag)
        scores.append(score)
        rows.append({"pair": pair.index, **_pair_row(score, seconds)})
    methods["wsireg-flow"] = {"pairs": rows, "aggregate": aggregate(scores)}
    return methods


def print_anhir(methods: dict[str, dict[str, Any]]) -> None:
    names = list(methods)
    print("\nANHIR sample, per pair: median rTRE / max rTRE / robustness / seconds")
    print(f"{'pair':>4}  " + "  ".join(f"{n:>34}" for n in names))
    for k in range(len(methods[names[0]]["pairs"])):
        cells = []
        for n in names:
            r = methods[n]["pairs"][k]
            cells.append(
                f"{r['median_rtre']:.5f} / {r['max_rtre']:.5f} / {r['robustness']:.3f} / "
                f"{r['seconds'] if r['seconds'] is not None else '-':>5}"
            )
        print(
            f"{methods[names[0]]['pairs'][k]['pair']:>4}  " + "  ".join(f"{c:>34}" for c in cells)
        )
    print(
        f"\n{'method':<18} {'AMrTRE':>8} {'MMrTRE':>8} {'AArTRE':>8} {'AMxrTRE':>8} "
        f"{'avg rob':>8} {'s/pair':>7} {'failed':>6}"
    )
    first = methods[names[0]]["aggregate"]
    print(
        f"{'before':<18} {first['initial_AMrTRE']:>8.5f} {first['initial_MMrTRE']:>8.5f} "
        f"{first['initial_AArTRE']:>8.5f} {first['initial_AMxrTRE']:>8.5f} {'-':>8} {'-':>7}"
    )
    for n in names:
        a = methods[n]["aggregate"]
        secs = np.mean([r["seconds"] for r in methods[n]["pairs"]])
        print(
            f"{n:<18} {a['AMrTRE']:>8.5f} {a['MMrTRE']:>8.5f} {a['AArTRE']:>8.5f} "
            f"{a['AMxrTRE']:>8.5f} {a['average_robustness']:>8.3f} {secs:>7.2f} "
            f"{a['failed_pairs']:>6}"
        )


# --------------------------------------------------------------------------------------------
# 2. gigapixel
# --------------------------------------------------------------------------------------------


def _warm(paths: list[Path]) -> None:
    """Read files once so that neither tool pays a cold page cache alone."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def palom_gigapixel(palom_python: Path, pair_dir: Path, size: int, work: Path) -> dict[str, Any]:
    """palom end to end on one synthetic pair: register + write the registered slide.

    ``peak_rss_gb`` is the peak of this process tree (``gigapixel.PeakRSS``) less this
    process's own RSS just before (``harness_rss_gb``; it idles while palom runs), i.e. palom's
    process tree; ``tree_peak_rss_gb`` keeps the raw peak.
    """
    d = work / f"palom-{size}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    harness = psutil.Process().memory_info().rss
    load = os.getloadavg()
    with PeakRSS() as rss:
        rec, seconds, err = run_palom(
            palom_python,
            pair_dir / "target.ome.tif",
            pair_dir / "source.ome.tif",
            d / "palom.json",
            out_tif=d / "registered-source.ome.tif",
        )
    if rec is None:
        raise SystemExit(f"palom failed on {pair_dir}: {err}")
    tf = PalomTransform.from_record(rec)
    t = read_landmarks(pair_dir / "target.csv")
    s = read_landmarks(pair_dir / "source.csv")
    err_px = tre(tf.source_to_target(s), t)
    affine_only = tre(s @ tf.affine[:2, :2].T + tf.affine[:2, 2], t)
    result = {
        "tool": "palom",
        "size": size,
        "seconds_total": round(seconds, 2),
        "seconds_per_step": rec["seconds"],
        "peak_rss_gb": round((rss.peak - harness) / 1e9, 3),
        "tree_peak_rss_gb": round(rss.peak / 1e9, 3),
        "harness_rss_gb": round(harness / 1e9, 3),
        "megapixels_per_second": round(size * size / 1e6 / seconds, 2),
        "tre_px_median": round(float(np.median(err_px)), 4),
        "tre_px_p90": round(float(np.percentile(err_px, 90)), 4),
        "tre_px_max": round(float(err_px.max()), 4),
        "affine_only_tre_px_median": round(float(np.median(affine_only)), 4),
        "landmarks": len(err_px),
        "grid_shape": rec["grid_shape"],
        "constrain_error": rec["constrain_error"],
        "output_gb": round((d / "registered-source.ome.tif").stat().st_size / 1e9, 3),
        "load_before": [round(v, 2) for v in load],
    }
    shutil.rmtree(d, ignore_errors=True)
    return result


def wsireg_flow_gigapixel(
    size: int, workers: int, data: Path, seed: int, config: Path | None
) -> dict[str, Any]:
    """wsireg-flow on the same pair through ``benchmarks_anhir.gigapixel`` in a fresh process
    (threaded scheduler), so that its peak RSS and time owe nothing to this harness."""
    out = data.resolve() / f"wsireg-flow-{size}.json"
    cmd = [sys.executable, "-m", "benchmarks_anhir.gigapixel", "--sizes", str(size)]
    cmd += ["--workers", str(workers), "--scheduler", "threads", "--seed", str(seed)]
    cmd += ["--data", str(data.resolve()), "--out", str(out)]
    if config is not None:
        cmd += ["--config", str(config.resolve())]
    load = os.getloadavg()
    proc = subprocess.run(cmd, cwd=ROOT, env=_USER_ENV, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"wsireg-flow failed on size {size}: {proc.stderr.strip()[-500:]}")
    (row,) = json.loads(out.read_text())["results"]
    return {"tool": "wsireg-flow", **row, "load_before": [round(v, 2) for v in load]}


def gigapixel(
    palom_python: Path,
    sizes: list[int],
    data: Path,
    workers: int,
    seed: int,
    config: Path | None,
) -> list[dict[str, Any]]:
    """One palom row and one wsireg-flow row per size, measured back to back."""
    rows = []
    print(
        f"\n{'tool':<12} {'size':>6} {'total s':>8} {'peak GB':>8} {'MP/s':>7} "
        f"{'TRE med':>8} {'TRE p90':>8} {'TRE max':>8}  load",
        flush=True,
    )
    for size in sizes:
        pair = ensure_pair(data, size, seed)
        _warm([pair / "target.ome.tif", pair / "source.ome.tif"])
        p = palom_gigapixel(palom_python, pair, size, data)
        w = wsireg_flow_gigapixel(size, workers, data, seed, config)
        for r in (p, w):
            rows.append(r)
            print(
                f"{r['tool']:<12} {size:>6} {r['seconds_total']:>8} {r['peak_rss_gb']:>8} "
                f"{r['megapixels_per_second']:>7} {r['tre_px_median']:>8} "
                f"{r['tre_px_p90']:>8} {r['tre_px_max']:>8}  {r['load_before']}",
                flush=True,
            )
    return rows


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--palom-python", type=Path, help="Python of a venv with palom installed.")
    ap.add_argument("--dataset", type=Path, default=Path("data/anhir-sample"))
    ap.add_argument("--pairs", type=Path, default=Path("data/anhir-sample/dataset.csv"))
    ap.add_argument(
        "--anhir-palom-blocks",
        type=int,
        nargs="+",
        default=[0],
        help="palom block sizes (px) for ANHIR; 0 = the OME-TIFF tile (default).",
    )
    ap.add_argument(
        "--anhir-palom-coarse",
        nargs="+",
        choices=["readme", "search"],
        default=["readme"],
        help="palom coarse step(s) for ANHIR: the README's (default) and/or palom-align-he's.",
    )
    ap.add_argument("--sizes", type=int, nargs="*", default=[10000, 20000])
    ap.add_argument("--workers", type=int, default=2, help="wsireg-flow workers (threads).")
    ap.add_argument("--data", type=Path, default=Path("runs/bench"), help="Synthetic pairs cache.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", type=Path, help="wsireg-flow YAML config for the gigapixel part.")
    ap.add_argument("--out", type=Path, default=Path("runs/compare-palom"))
    ap.add_argument("--skip-anhir", action="store_true")
    ap.add_argument("--skip-gigapixel", action="store_true")
    args = ap.parse_args(argv)
    version = check_palom_python(args.palom_python)
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / "compare-palom.json"
    doc: dict[str, Any] = {
        "palom_version": version,
        "machine": {
            "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "platform": platform.platform(),
        },
        "load_at_start": [round(v, 2) for v in os.getloadavg()],
    }

    def save() -> None:
        out_json.write_text(json.dumps(doc, indent=2))

    first = read_pair_table(args.pairs)[0]
    doc["synthetic_check"] = check = synthetic_check(
        args.palom_python,
        resolve_path(args.dataset, first.target_image),
        resolve_path(args.dataset, first.target_landmarks),
        args.out / "synthetic-check",
    )
    print(
        f"synthetic check (known affine, {check.get('landmarks')} landmarks): {check}", flush=True
    )
    save()
    if not check["ok"]:
        print("the synthetic check failed: palom's mapping is not trusted", file=sys.stderr)
        return 1
    if not args.skip_anhir:
        t0 = time.perf_counter()
        doc["anhir"] = anhir(
            args.palom_python,
            args.dataset,
            args.pairs,
            args.out / "anhir",
            args.anhir_palom_blocks,
            args.anhir_palom_coarse,
        )
        doc["anhir_load_after"] = [round(v, 2) for v in os.getloadavg()]
        doc["anhir_seconds"] = round(time.perf_counter() - t0, 1)
        print_anhir(doc["anhir"])
        save()
    if not args.skip_gigapixel and args.sizes:
        doc["gigapixel_workers"] = args.workers
        doc["gigapixel"] = gigapixel(
            args.palom_python, args.sizes, args.data, args.workers, args.seed, args.config
        )
        save()
    doc["load_at_end"] = [round(v, 2) for v in os.getloadavg()]
    save()
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
