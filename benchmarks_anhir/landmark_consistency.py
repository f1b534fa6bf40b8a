"""Is the remaining landmark error in a finished ANHIR run registration error or annotation noise?

Two tests on every scored pair of a run written by ``wsireg-flow anhir`` (its
``registration-results.csv``, ``pairs/<i>/warped.zarr`` and warped source landmarks):

1. **Local image re-match.** Around each target landmark a (2R+1)^2 patch of the target's
   optical density is matched (normalised cross-correlation) against the warped source within
   +-S px. If the registration were locally off where a landmark sits, moving the warped source
   landmark by the found shift would bring it closer to the target landmark.
2. **Smooth residual.** Each landmark's residual (warped source - target, (x, y) px) is
   predicted from the residuals of the other landmarks of its pair (Gaussian kernel, sigma px).
   A registration error larger than a few pixels is spatially smooth, so it would be predicted;
   per-point annotation noise is not.

If neither lowers the median error, the images are aligned as well as their content shows and
what remains is disagreement between the landmarks themselves. Prints a table, writes JSON and
a PNG of the target / warped-source crops around the worst landmarks of the worst pair.

    python -m benchmarks_anhir.landmark_consistency runs/demo --dataset data/anhir-sample \\
        --out runs/demo/landmark-consistency.json
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks_anhir.run import finished_run_parser
from wsireg_flow.io.omezarr import open_ngff
from wsireg_flow.io.slide import open_slide
from wsireg_flow.landmarks import paired, read_landmarks
from wsireg_flow.qc import new_figure, write_figure
from wsireg_flow.tissue import optical_density

SIGMAS_PX = (30.0, 60.0, 100.0, 200.0)


def density(rgb: np.ndarray) -> np.ndarray:
    """Summed optical density of an RGB (y, x, c) image as float32 (y, x)."""
    od = optical_density(rgb)
    return (od.sum(axis=-1) if od.ndim == 3 else od).astype(np.float32)


def rematch_shifts(
    target: np.ndarray, warped: np.ndarray, points_xy: np.ndarray, radius: int, search: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shift (dx, dy) px that best aligns the warped-source patch to the target patch at each point.

    ``target`` and ``warped`` are (y, x) images in the same (target) frame; ``points_xy`` is
    (N, 2) as (x, y). Returns the (M, 2) shifts and the indices of the M points whose search
    window lies inside the image.
    """
    h, w = target.shape
    shifts, kept = [], []
    r, s = radius, search
    for k, (x, y) in enumerate(np.round(points_xy).astype(int)):
        if x - r - s < 0 or y - r - s < 0 or x + r + s >= w or y + r + s >= h:
            continue
        patch = target[y - r : y + r + 1, x - r : x + r + 1]
        window = warped[y - r - s : y + r + s + 1, x - r - s : x + r + s + 1]
        score = cv2.matchTemplate(window, patch, cv2.TM_CCOEFF_NORMED)
        _, _, _, (mx, my) = cv2.minMaxLoc(score)
        shifts.append((mx - s, my - s))
        kept.append(k)
    return np.asarray(shifts, float).reshape(-1, 2), np.asarray(kept, int)


def smooth_residual_prediction(points_xy: np.ndarray, residual: np.ndarray, sigma: float):
    """Leave-one-out Gaussian-kernel prediction of each (x, y) residual from the others."""
    d2 = ((points_xy[:, None, :] - points_xy[None, :, :]) ** 2).sum(-1)
    weights = np.exp(-d2 / (2 * sigma**2))
    np.fill_diagonal(weights, 0.0)
    return weights @ residual / np.maximum(weights.sum(1, keepdims=True), 1e-12)


def analyse_pair(
    dataset: Path, run: Path, row: dict[str, str], radius: int, search: int
) -> dict[str, Any]:
    """Median errors (px and rTRE) before and after each test for one pair."""
    target_pts, source_warped = paired(
        read_landmarks(dataset / row["Target landmarks"]),
        read_landmarks(run / row["Warped source landmarks"]),
    )
    diagonal = float(row["Image diagonal [pixels]"])
    residual = source_warped - target_pts
    error = np.linalg.norm(residual, axis=1)
    target_img = density(np.asarray(open_slide(dataset / row["Target image"]).levels[0][:, :, :]))
    warped_img = density(
        np.asarray(open_ngff(run / "pairs" / row[""] / "warped.zarr").levels[0][:, :, :])
    )
    shifts, kept = rematch_shifts(target_img, warped_img, target_pts, radius, search)
    rematched = np.linalg.norm(residual[kept] - shifts, axis=1)
    smooth = {
        f"{s:g}": float(
            np.median(
                np.linalg.norm(
                    residual - smooth_residual_prediction(target_pts, residual, s), axis=1
                )
            )
        )
        for s in SIGMAS_PX
    }
    return {
        "pair": row[""],
        "diagonal": diagonal,
        "median_error_px": float(np.median(error)),
        "median_rtre": float(np.median(error) / diagonal),
        "rematch_points": int(kept.size),
        "median_error_px_same_points": float(np.median(error[kept])),
        "median_error_px_after_rematch": float(np.median(rematched)),
        "median_rematch_shift_px": float(np.median(np.linalg.norm(shifts, axis=1))),
        "median_error_px_after_smooth_correction": smooth,
    }


def crops_figure(
    dataset: Path, run: Path, row: dict[str, str], out: Path, n: int = 8, half: int = 30
) -> Path:
    """Target and warped-source crops (2*half px) around the n largest-error landmarks:
    green + target landmark, red x warped source landmark."""
    target_pts, source_warped = paired(
        read_landmarks(dataset / row["Target landmarks"]),
        read_landmarks(run / row["Warped source landmarks"]),
    )
    target_img = np.asarray(open_slide(dataset / row["Target image"]).levels[0][:, :, :])
    warped_img = np.asarray(open_ngff(run / "pairs" / row[""] / "warped.zarr").levels[0][:, :, :])
    error = np.linalg.norm(source_warped - target_pts, axis=1)
    worst = np.argsort(error)[::-1][:n]
    fig, axes = new_figure(n // 2, 4, figsize=(12, 3 * (n // 2)), squeeze=False)
    for k, j in enumerate(worst):
        x, y = np.round(target_pts[j]).astype(int)
        y0, x0 = max(y - half, 0), max(x - half, 0)
        for c, (name, img) in enumerate((("target", target_img), ("warped source", warped_img))):
            ax = axes[k // 2, (k % 2) * 2 + c]
            crop = img[y0 : y + half, x0 : x + half]
            ax.imshow(crop, extent=(x0 - 0.5, x0 + crop.shape[1] - 0.5, y0 + crop.shape[0] - 0.5,
                                    y0 - 0.5))  # fmt: skip
            ax.plot(*target_pts[j], "g+", ms=14, mew=2)
            ax.plot(*source_warped[j], "rx", ms=10, mew=2)
            ax.set_title(f"landmark {j + 1}, {name}: error {error[j]:.1f} px", fontsize=8)
            ax.axis("off")
    fig.suptitle(f"pair {row['']}: {row['Target image']} <- {row['Source image']}", fontsize=9)
    return write_figure(fig, out, dpi=70)


def main(argv: list[str] | None = None) -> int:
    ap = finished_run_parser(__doc__)
    ap.add_argument("--out", type=Path, default=None, help="JSON (default RUN/landmark-...)")
    ap.add_argument("--radius", type=int, default=20, help="patch half-size R, px")
    ap.add_argument("--search", type=int, default=8, help="search range S, px")
    args = ap.parse_args(argv)
    out = args.out or args.run / "landmark-consistency.json"
    with open(args.run / "registration-results.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["Warped source landmarks"]]
    results = [analyse_pair(args.dataset, args.run, r, args.radius, args.search) for r in rows]
    print(
        f"{'pair':>4} {'median px':>9} {'rTRE':>7} {'(same pts)':>10} {'re-matched':>10} "
        f"{'smooth-corrected':>16}"
    )
    for r in results:
        best = min(r["median_error_px_after_smooth_correction"].values())
        print(
            f"{r['pair']:>4} {r['median_error_px']:>9.2f} {r['median_rtre']:>7.4f} "
            f"{r['median_error_px_same_points']:>10.2f} "
            f"{r['median_error_px_after_rematch']:>10.2f} {best:>16.2f}"
        )
    worst = max(results, key=lambda r: r["median_rtre"])
    figure = crops_figure(
        args.dataset,
        args.run,
        next(r for r in rows if r[""] == worst["pair"]),
        out.with_suffix(".png"),
    )
    summary = {
        "radius_px": args.radius,
        "search_px": args.search,
        "pairs": results,
        "mean_median_error_px": float(np.mean([r["median_error_px"] for r in results])),
        "mean_median_error_px_same_points": float(
            np.mean([r["median_error_px_same_points"] for r in results])
        ),
        "mean_median_error_px_after_rematch": float(
            np.mean([r["median_error_px_after_rematch"] for r in results])
        ),
        "figure": str(figure),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"JSON: {out}  figure: {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
