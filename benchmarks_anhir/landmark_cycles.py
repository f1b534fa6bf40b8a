"""Split the landmark error of a set of sections into per-image offsets and per-pair error.

When a tissue set has three or more images and every pair of them is registered (ANHIR pairs
all images of a set), the errors of the pairs are linked. Write the error of pair j <- k at
landmark i, in the target frame j, as

    e_jk(i) = L_jk^-1 n_k(i) - n_j(i) + r_jk(i),

where n_k(i) is an offset of landmark i that belongs to image k alone (where the annotator put it
in that image, or a deformation of that image no registration follows), L_jk is the linear part
of the pair's affine (target (x, y) -> source (x, y)) and r_jk(i) is what is left: error of that
registration alone. Least squares over all pairs of the set (with the offsets summing to zero,
the one freedom the data cannot fix) gives the offsets and the residuals. If the pairs'
errors were independent registration errors, the offsets would explain only (K - 1) / P of the
squared error (K images, P pairs), by chance.

A second annotator of the same images tells the two readings of an offset apart: if an image's
offset is the first annotator's placement error, the second annotator's correction
(second - first) points against it (regression slope near -1); if it is a deformation the
registrations missed, the second annotator, who saw the same tissue, does not correct it
(slope near 0).

    python -m benchmarks_anhir.landmark_cycles runs/demo --dataset data/anhir-sample \\
        --second data/anhir-sample-annotations/lung-lesion_3/user-JB_scale-50pc \\
        --second-scale 0.1
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks_anhir.run import finished_run_parser
from wsireg_flow.landmarks import Pair, paired, read_landmarks, read_pair_table
from wsireg_flow.qc import new_figure, write_figure


def solve_image_offsets(
    pairs: list[tuple[int, int]], errors: np.ndarray, linear: np.ndarray, n_images: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image landmark offsets and per-pair residuals, by least squares.

    Parameters
    ----------
    pairs
        P pairs ``(j, k)``: image k registered onto image j (indices into ``n_images``).
    errors
        (P, N, 2) errors ``warped source - target`` of the N landmarks of each pair, as (x, y)
        px in the target frame of that pair.
    linear
        (P, 2, 2) linear part of each pair's affine, target (x, y) -> source (x, y).
    n_images
        K, the number of images of the set.

    Returns
    -------
    offsets
        (K, N, 2) offset of each landmark in each image, (x, y) px in that image's frame,
        summing to zero over the images.
    residuals
        (P, N, 2) the part of each pair's error the offsets do not explain, (x, y) px.
    """
    p_count, n_points, _ = errors.shape
    system = np.zeros((2 * p_count + 2, 2 * n_images))
    for p, (j, k) in enumerate(pairs):
        system[2 * p : 2 * p + 2, 2 * k : 2 * k + 2] = np.linalg.inv(linear[p])
        system[2 * p : 2 * p + 2, 2 * j : 2 * j + 2] -= np.eye(2)
    system[-2:] = np.tile(np.eye(2), n_images)  # gauge: offsets sum to zero
    rhs = np.zeros((2 * p_count + 2, n_points))
    rhs[:-2] = errors.transpose(0, 2, 1).reshape(2 * p_count, n_points)
    solution, *_ = np.linalg.lstsq(system, rhs, rcond=None)
    offsets = solution.reshape(n_images, 2, n_points).transpose(0, 2, 1)
    predicted = (system[:-2] @ solution).reshape(p_count, 2, n_points).transpose(0, 2, 1)
    return offsets, errors - predicted


def correction_slope(offset: np.ndarray, correction: np.ndarray) -> dict[str, float]:
    """Regression (through 0) of a second annotator's correction on an image's offsets.

    ``offset`` and ``correction`` are (M, 2) (x, y) px. Returns the slope and the correlation
    per axis: slope -1 means the second annotator undoes the offset entirely.
    """
    out: dict[str, float] = {}
    for c, axis in enumerate("xy"):
        x, y = offset[:, c], correction[:, c]
        out[f"slope_{axis}"] = float((x * y).sum() / max(float((x * x).sum()), 1e-12))
        out[f"corr_{axis}"] = float(np.corrcoef(x, y)[0, 1])
    return out


def offset_only_rtre(explained: np.ndarray, diagonals: list[float]) -> np.ndarray:
    """Median rTRE per pair of the error part the per-image offsets explain.

    ``explained`` is (P, N, 2): each pair's error minus its residual, (x, y) px in the target
    frame; ``diagonals`` the P target diagonals [px]. This is what each pair would score if its
    own residual were zero, i.e. if that pair's registration removed everything that is not
    shared with the other pairs of the same images.
    """
    rtre = np.linalg.norm(explained, axis=2) / np.asarray(diagonals, float)[:, None]
    return np.median(rtre, axis=1)


def _affine_linear(run: Path, pair: Pair) -> np.ndarray:
    info = json.loads((run / "pairs" / pair.index / "transform" / "affine.json").read_text())
    return np.asarray(info["affine"], float)[:2, :2]


def analyse_set(
    dataset: Path, run: Path, pairs: list[Pair], second: Path | None, second_scale: float
) -> dict[str, Any] | None:
    """Offsets, residuals and (optionally) the second-annotator check for one tissue set.

    Returns None when the set has no cycle (fewer pairs than images) or lacks landmarks.
    """
    images = sorted({p.target_image for p in pairs} | {p.source_image for p in pairs})
    if len(pairs) < len(images) or any(not p.warped_source_landmarks for p in pairs):
        return None
    first = {}
    for p in pairs:
        first[p.target_image] = read_landmarks(dataset / p.target_landmarks)
        first[p.source_image] = read_landmarks(dataset / p.source_landmarks)
    n_points = min(len(v) for v in first.values())
    errors = np.stack(
        [
            np.subtract(
                *paired(read_landmarks(run / p.warped_source_landmarks), first[p.target_image])
            )[:n_points]
            for p in pairs
        ]
    )
    index = [(images.index(p.target_image), images.index(p.source_image)) for p in pairs]
    linear = np.stack([_affine_linear(run, p) for p in pairs])
    offsets, residuals = solve_image_offsets(index, errors, linear, len(images))
    offset_only = offset_only_rtre(errors - residuals, [p.image_diagonal for p in pairs])
    energy = float((errors**2).sum())
    result: dict[str, Any] = {
        "images": images,
        "n_landmarks": n_points,
        "explained_fraction": 1.0 - float((residuals**2).sum()) / max(energy, 1e-12),
        "chance_fraction": (len(images) - 1) / len(pairs),
        "median_offset_px": {
            im: float(np.median(np.linalg.norm(offsets[k], axis=1))) for k, im in enumerate(images)
        },
        "pairs": [
            {
                "pair": p.index,
                "target": p.target_image,
                "source": p.source_image,
                "median_error_px": float(np.median(np.linalg.norm(errors[q], axis=1))),
                "median_residual_px": float(np.median(np.linalg.norm(residuals[q], axis=1))),
                "median_offset_only_rtre": float(offset_only[q]),
            }
            for q, p in enumerate(pairs)
        ],
        "mean_median_offset_only_rtre": float(np.mean(offset_only)),
        "second_annotator": [],
    }
    for k, im in enumerate(images):
        other = second / Path(im).with_suffix(".csv").name if second else None
        if other is None or not other.is_file():
            continue
        corr = read_landmarks(other)[:n_points] * second_scale - first[im][:n_points]
        same_point = np.linalg.norm(corr, axis=1) < 20.0  # farther: a different point was clicked
        result["second_annotator"].append(
            {
                "image": im,
                "file": str(other),
                "points": int(same_point.sum()),
                "median_disagreement_px": float(np.median(np.linalg.norm(corr, axis=1))),
                **correction_slope(offsets[k][same_point], corr[same_point]),
                "_offset": offsets[k][same_point].tolist(),
                "_correction": corr[same_point].tolist(),
            }
        )
    return result


def figure(sets: list[dict[str, Any]], out: Path) -> Path:
    """Per-image median offsets (bars) and second-annotator corrections against the offsets."""
    checks = [c for s in sets for c in s["second_annotator"]]
    fig, axes = new_figure(1, 1 + len(checks), figsize=(4.5 * (1 + len(checks)), 4))
    axes = np.atleast_1d(axes)
    names = [Path(im).stem for s in sets for im in s["images"]]
    values = [v for s in sets for v in s["median_offset_px"].values()]
    axes[0].barh(names, values, color="tab:blue")
    axes[0].set_xlabel("median per-image landmark offset [px]")
    for ax, c in zip(axes[1:], checks, strict=True):
        off, cor = np.asarray(c["_offset"]), np.asarray(c["_correction"])
        for i, (axis, colour) in enumerate((("x", "tab:red"), ("y", "tab:green"))):
            ax.scatter(off[:, i], cor[:, i], s=8, color=colour, label=f"{axis}: slope "
                       f"{c[f'slope_{axis}']:.2f}, r {c[f'corr_{axis}']:.2f}")  # fmt: skip
        lim = float(np.abs(np.r_[off.ravel(), cor.ravel()]).max())
        ax.plot([-lim, lim], [lim, -lim], "k--", lw=0.8, label="slope -1 (annotation error)")
        ax.set_xlabel("offset from the registrations [px]")
        ax.set_ylabel("second - first annotator [px]")
        ax.set_title(Path(c["image"]).stem, fontsize=9)
        ax.legend(fontsize=7)
    return write_figure(fig, out)


def main(argv: list[str] | None = None) -> int:
    ap = finished_run_parser(__doc__)
    ap.add_argument("--second", type=Path, default=None, help="folder of a second annotator's "
                    "CSVs, named like the images")  # fmt: skip
    ap.add_argument("--second-scale", type=float, default=1.0, help="factor to the dataset scale")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON (default RUN/landmark-cycles.json)"
    )
    args = ap.parse_args(argv)
    out = args.out or args.run / "landmark-cycles.json"
    by_set: dict[str, list[Pair]] = defaultdict(list)
    for p in read_pair_table(args.run / "registration-results.csv"):
        by_set[str(Path(p.target_image).parent)].append(p)
    sets = []
    for name, pairs in sorted(by_set.items()):
        s = analyse_set(args.dataset, args.run, pairs, args.second, args.second_scale)
        if s is None:
            print(f"{name}: {len(pairs)} pair(s), no cycle - skipped")
            continue
        sets.append({"set": name, **s})
        print(f"{name}: offsets explain {s['explained_fraction']:.0%} of the squared error "
              f"(chance {s['chance_fraction']:.0%})")  # fmt: skip
        for im, v in s["median_offset_px"].items():
            print(f"  offset {Path(im).stem:>40}: median {v:5.2f} px")
        for q in s["pairs"]:
            print(f"  pair {q['pair']:>3}: error {q['median_error_px']:5.2f} px, "
                  f"left after offsets {q['median_residual_px']:5.2f} px, "
                  f"offsets alone {q['median_offset_only_rtre']:.5f} rTRE")  # fmt: skip
        print(f"  mean of the pairs' median rTRE with offsets alone (zero residual): "
              f"{s['mean_median_offset_only_rtre']:.5f}")  # fmt: skip
        for c in s["second_annotator"]:
            print(f"  second annotator on {Path(c['image']).stem}: {c['points']} points, "
                  f"slope x {c['slope_x']:.2f} y {c['slope_y']:.2f}, "
                  f"r x {c['corr_x']:.2f} y {c['corr_y']:.2f}")  # fmt: skip
    if not sets:
        print("no tissue set with a cycle of registered pairs")
        return 1
    png = figure(sets, out.with_suffix(".png"))
    for s in sets:
        for c in s["second_annotator"]:
            c.pop("_offset"), c.pop("_correction")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"sets": sets, "figure": str(png)}, indent=2))
    print(f"JSON: {out}  figure: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
