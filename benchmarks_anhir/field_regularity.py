"""How regular are the displacement fields of finished ANHIR runs?

For each run directory (``wsireg-flow anhir --out RUN``) and each of its pairs:

- the share of the backward field's grid whose Jacobian determinant (of the map target ->
  source, on the stored grid) lies outside [0.5, 2]: local stretch or squeeze by more than 2x;
- the largest side, in target pixels, of a 2 x 2 px square around each source landmark once
  mapped into the target frame (what a warped annotation of that size becomes).

Prints one row per run (means over pairs, and the largest square over all pairs) beside the
run's ANHIR aggregates, and writes JSON:

    python -m benchmarks_anhir.field_regularity RUN [RUN ...] --dataset data/anhir-sample \\
        --pairs data/anhir-sample/dataset.csv --out runs/field-regularity.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from wsireg_flow.field import jacobian_determinant
from wsireg_flow.geometry import corner_origin
from wsireg_flow.landmarks import read_landmarks, read_pair_table, resolve_path
from wsireg_flow.transform import Transform


def stretched_share(transform: Transform, low: float = 0.5, high: float = 2.0) -> float:
    """Share of the backward field's grid whose Jacobian determinant is outside [low, high]
    (0 for an affine-only transform)."""
    f = transform.backward
    if f is None:
        return 0.0
    jac = jacobian_determinant(f.data / np.float32(f.spacing))
    return float(((jac < low) | (jac > high)).mean())


def warped_square_sides(transform: Transform, points: np.ndarray, half: float = 1.0) -> np.ndarray:
    """Largest side (target px) of each square of side ``2 * half`` source px centred on the
    (N, 2) (x, y) source ``points``, once mapped into the target frame; shape (N,)."""
    offsets = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    corners = (points[:, None, :] + offsets[None]).reshape(-1, 2)
    mapped = corner_origin(transform.source_to_target)(corners).reshape(len(points), 4, 2)
    sides = np.linalg.norm(mapped - np.roll(mapped, -1, axis=1), axis=2)
    return sides.max(axis=1)


def measure_run(run: Path, dataset: Path, table: Path) -> dict[str, Any]:
    """Field regularity of every pair of ``table`` in a finished ANHIR run, and the run's
    aggregates."""
    summary = json.loads((run / "summary.json").read_text())
    pairs = []
    for pair in read_pair_table(table):
        pair_dir = run / "pairs" / str(pair.index)
        transform = Transform.load(pair_dir / "transform")
        source = read_landmarks(resolve_path(dataset, pair.source_landmarks))
        sides = warped_square_sides(transform, source)
        pairs.append(
            {
                "pair": pair.index,
                "jacobian_outside_0.5_2": stretched_share(transform),
                "largest_warped_square_px": float(sides.max()),
                "median_warped_square_px": float(np.median(sides)),
            }
        )
    return {
        "run": str(run),
        "AMrTRE": summary["AMrTRE"],
        "AMxrTRE": summary["AMxrTRE"],
        "average_robustness": summary["average_robustness"],
        "mean_jacobian_outside_0.5_2": float(np.mean([p["jacobian_outside_0.5_2"] for p in pairs])),
        "largest_warped_square_px": max(p["largest_warped_square_px"] for p in pairs),
        "pairs": pairs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="finished `wsireg-flow anhir` folders")
    ap.add_argument("--dataset", type=Path, required=True, help="root of the landmark paths")
    ap.add_argument("--pairs", type=Path, required=True, help="the pair table the runs used")
    ap.add_argument("--out", type=Path, help="JSON file to write")
    args = ap.parse_args(argv)
    for run in args.runs:
        if not (run / "summary.json").is_file():
            raise SystemExit(f"{run}: not a finished `wsireg-flow anhir` folder (no summary.json)")
    records = [measure_run(run, args.dataset, args.pairs) for run in args.runs]
    print("run | AMrTRE | AMxrTRE | robustness | Jacobian outside [0.5, 2] | largest 2 px square")
    for r in records:
        print(
            f"{r['run']} | {r['AMrTRE']:.5f} | {r['AMxrTRE']:.4f} | {r['average_robustness']:.3f}"
            f" | {100 * r['mean_jacobian_outside_0.5_2']:.2f} % | "
            f"{r['largest_warped_square_px']:.1f} px"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": records}, indent=2))
        print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
