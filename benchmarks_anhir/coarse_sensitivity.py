"""How much do the scores of a finished ANHIR run move when the coarse affine moves a little?

The non-rigid stage refines the coarse affine; ideally its result does not depend on where,
within a pixel or so, the coarse step left the images. This diagnostic measures it: for each
pair of a finished ``wsireg-flow anhir`` run it copies the pair's folder, moves the coarse
affine (``coarse.json``, level-0 (x, y) target -> source) by ``shift`` target pixels in each of
four directions (+x, +y, -x, -y: the source is sampled ``shift`` px further along that axis),
re-runs the non-rigid, stitch and evaluate stages on the copy (Dask's threaded scheduler, the
run's own settings) and records the pair's median rTRE. The spread of those medians is the part
of a score that is noise from the starting point: differences between two settings or two
versions smaller than it say nothing. The run itself is not modified.

    python -m benchmarks_anhir.coarse_sensitivity runs/demo --dataset data/anhir-sample \\
        --shift 0.5 --out runs/coarse-sensitivity.json

Writes the JSON and a PNG next to it (per pair: the run's median and the moved ones).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks_anhir.run import finished_run_parser, pair_job
from wsireg_flow.config import Config
from wsireg_flow.geometry import translation
from wsireg_flow.landmarks import Pair, read_pair_table
from wsireg_flow.pipeline import run_pair
from wsireg_flow.qc import new_figure, write_figure
from wsireg_flow.stages import MARKER_DIR, write_json

RERUN = ("nonrigid", "stitch", "evaluate")
DIRECTIONS = ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))  # (x, y) unit steps


def moved_affine(affine: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """The target -> source affine with its target point moved by (dx, dy) px first: every
    target pixel samples the source where the original samples at (x + dx, y + dy)."""
    return np.asarray(affine, np.float64) @ translation(dx, dy)


def rerun_moved(
    p: Pair, run: Path, dataset: Path, cfg: Config, dx: float, dy: float, work: Path
) -> float:
    """Median rTRE of pair ``p`` of ``run`` re-run from its coarse affine moved by (dx, dy).

    The pair's folder is copied under ``work`` (without the warped image and figures, which
    these stages do not read) and re-run there."""
    job = pair_job(p, dataset, work / f"moved{dx:+g}{dy:+g}", cfg)
    copy = job.run_dir
    shutil.copytree(
        run / "pairs" / p.index, copy, ignore=shutil.ignore_patterns("warped.zarr", "qc")
    )
    coarse = json.loads((copy / "coarse.json").read_text())
    coarse["affine"] = moved_affine(np.asarray(coarse["affine"]), dx, dy).tolist()
    write_json(copy / "coarse.json", coarse)
    for name in (*RERUN, "warp", "qc"):
        (copy / MARKER_DIR / f"{name}.json").unlink(missing_ok=True)
    ran = run_pair(job, stages=RERUN)
    assert all(ran.values()), ran
    metrics = json.loads((copy / "metrics.json").read_text())
    shutil.rmtree(copy)
    return float(metrics["landmarks"]["median_rtre"])


def sensitivity(run: Path, dataset: Path, shift: float) -> list[dict[str, Any]]:
    """Per pair of ``run``: its median rTRE and the medians after moving the coarse affine
    ``shift`` px in each of :data:`DIRECTIONS`."""
    pairs = read_pair_table(run / "registration-results.csv")
    results = []
    with tempfile.TemporaryDirectory(prefix="coarse-sensitivity-") as tmp:
        for p in pairs:
            pair_dir = run / "pairs" / p.index
            scores = json.loads((pair_dir / "metrics.json").read_text()).get("landmarks")
            if scores is None:  # a pair without landmarks or that failed: nothing to compare
                continue
            cfg = Config.model_validate(json.loads((pair_dir / "job.json").read_text())["config"])
            base = scores["median_rtre"]
            moved = [
                rerun_moved(p, run, dataset, cfg, shift * ux, shift * uy, Path(tmp))
                for ux, uy in DIRECTIONS
            ]
            results.append(
                {
                    "pair": p.index,
                    "median_rtre": base,
                    "moved_median_rtre": moved,
                    "spread": float(max([base, *moved]) - min([base, *moved])),
                }
            )
            print(
                f"pair {p.index}: median rTRE {base:.5f}, moved {shift:g} px: "
                + " ".join(f"{m:.5f}" for m in moved),
                flush=True,
            )
    return results


def figure(results: list[dict[str, Any]], shift: float, out: Path) -> Path:
    """Per pair: the run's median rTRE (black) and the moved ones (grey)."""
    fig, ax = new_figure(figsize=(7, 4))
    for k, r in enumerate(results):
        ax.scatter([k] * len(r["moved_median_rtre"]), r["moved_median_rtre"], c="0.6", s=18)
        ax.scatter([k], [r["median_rtre"]], c="k", s=30, marker="_")
    ax.set_xticks(range(len(results)), [r["pair"] for r in results])
    ax.set_xlabel("pair")
    ax.set_ylabel("median rTRE")
    ax.set_title(f"coarse affine moved {shift:g} px (grey) against the run (black)")
    return write_figure(fig, out)


def main(argv: list[str] | None = None) -> int:
    ap = finished_run_parser(__doc__)
    ap.add_argument("--shift", type=float, default=0.5, help="move of the coarse affine, px")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default RUN/coarse-...)")
    args = ap.parse_args(argv)
    out = args.out or args.run / "coarse-sensitivity.json"
    results = sensitivity(args.run, args.dataset, args.shift)
    am = [float(np.mean([r["moved_median_rtre"][k] for r in results])) for k in range(4)]
    summary = {
        "shift_px": args.shift,
        "directions_xy": DIRECTIONS,
        "pairs": results,
        "AMrTRE": float(np.mean([r["median_rtre"] for r in results])),
        "moved_AMrTRE": am,
        "mean_pair_spread": float(np.mean([r["spread"] for r in results])),
        "figure": str(figure(results, args.shift, out.with_suffix(".png"))),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(
        f"AMrTRE {summary['AMrTRE']:.5f}; moved: "
        + " ".join(f"{a:.5f}" for a in am)
        + f"; mean per-pair spread {summary['mean_pair_spread']:.5f}"
    )
    print(f"JSON: {out}  figure: {summary['figure']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
