"""ANHIR reproduction: register every pair of a pair table, write the submission, score it.

Output folder (``DIR``)::

    registration-results.csv      the pair table, output columns filled (paths relative to DIR)
    computer-performances.json    machine description + a fixed CPU benchmark time
    pairs/<index>/                one pair run directory each (warped landmark CSVs inside)
    scores/pairs.csv              per pair: initial/final median, mean, max rTRE, robustness, min
    scores/aggregates.csv, scores/summary.md   overall, per tissue, per status + published table
    summary.json                  AMrTRE, MMrTRE, AArTRE, AMxrTRE, average_robustness, ...
    figures/rtre-boxplot.png      rTRE per pair before/after
    figures/overlays/<index>.png  one overlay per pair

Scores are computed from the CSVs written to the submission (the protocol of ANHIR.md), not from
in-memory state. A failed pair is recorded with its initial error and robustness 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsireg_flow.config import Config
from wsireg_flow.errors import InputError, WsiregError
from wsireg_flow.landmarks import (
    Pair,
    image_diagonal,
    paired,
    read_landmarks,
    read_pair_table,
    resolve_path,
    write_pair_table,
)
from wsireg_flow.metrics import PairScore, aggregate, score_pair
from wsireg_flow.pipeline import PAIR_STAGES, PairJob, holds_this_job, job_is_complete, run_pair
from wsireg_flow.progress import ProgressFn
from wsireg_flow.qc import new_figure, run_warnings, write_figure
from wsireg_flow.stages import check_unlocked, holds_results, read_record, run_dir_lock

# Published results on the 251 hidden evaluation pairs (ANHIR challenge paper re-evaluation).
PUBLISHED = [
    ("MEVIS", 0.00287, 0.00179, 0.988, 0.145),
    ("UPENN", 0.00286, 0.00190, 0.990, 1.45),
    ("AGH", 0.00359, 0.00191, 0.982, 6.86),
    ("CKVST", 0.00269, 0.00226, 0.988, 7.13),
    ("elastix (baseline)", 0.068, None, 0.77, None),
    ("ANTs (baseline)", 0.069, None, 0.81, None),
    ("NiftyReg (baseline)", 0.083, None, 0.75, None),
]


@dataclass
class PairOutcome:
    """What happened to one pair (paths relative to the submission folder)."""

    index: str
    ok: bool
    minutes: float | None  # wall clock; None when unknown (a lost worker)
    warped_source: str = ""
    warped_target: str = ""
    reason: str = ""


def select_pairs(pairs: Sequence[Pair], status: str | None, limit: int | None) -> list[Pair]:
    """Pairs with the given status (all when None), at most ``limit`` of them, in table order."""
    out = [p for p in pairs if status is None or p.status == status]
    return out[:limit] if limit is not None else out


def pair_job(p: Pair, root: Path, out: Path, cfg: Config) -> PairJob:
    """The job of pair ``p`` of the dataset at ``root``, in ``OUT/pairs/INDEX``."""
    return PairJob(
        resolve_path(root, p.target_image),
        resolve_path(root, p.source_image),
        out / "pairs" / p.index,
        cfg,
        target_landmarks=resolve_path(root, p.target_landmarks) if p.target_landmarks else None,
        source_landmarks=resolve_path(root, p.source_landmarks),
        diagonal=p.image_diagonal,
    )


def register_one(
    p: Pair,
    root: Path,
    out: Path,
    cfg: Config,
    scheduler: Any = "threads",
    progress: ProgressFn | None = None,
) -> PairOutcome:
    """Register one pair (resuming a finished one); never raises for a bad pair."""
    t0 = time.perf_counter()
    try:
        job = pair_job(p, root, out, cfg)
        ran = run_pair(job, scheduler=scheduler, progress=progress)
    except Exception as exc:  # a failed pair is recorded, the run goes on
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return PairOutcome(p.index, False, (time.perf_counter() - t0) / 60, reason=reason)
    minutes = (time.perf_counter() - t0) / 60
    if not all(ran.values()):  # resumed: the stages' recorded times, this run's and earlier
        minutes = _recorded_minutes(job.run_dir)
    rel = Path("pairs") / p.index
    return PairOutcome(
        p.index,
        True,
        minutes,
        warped_source=str(rel / "warped-source-landmarks.csv"),
        warped_target=str(rel / "warped-target-landmarks.csv") if job.target_landmarks else "",
    )


def collect_outcomes(
    submitted: dict[Any, Pair], progress: ProgressFn | None = None
) -> dict[str, PairOutcome]:
    """Outcomes of pairs submitted to a Dask cluster, as they finish: {pair index: outcome}.

    ``submitted`` maps each future (of :func:`register_one`) to its pair. A future that fails
    although :func:`register_one` never raises (its worker was lost for good, e.g. killed
    again and again for exceeding its memory limit) records that pair as failed with the
    reason; the other pairs still count.
    """
    from distributed import as_completed

    outcomes: dict[str, PairOutcome] = {}
    for k, fut in enumerate(as_completed(list(submitted))):
        p = submitted[fut]
        try:
            outcomes[p.index] = fut.result()
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
            outcomes[p.index] = PairOutcome(p.index, False, None, reason=reason)
        if progress:
            progress("ANHIR pairs", k + 1, len(submitted))
    return outcomes


def _recorded_minutes(run_dir: Path) -> float:
    """Minutes the pair's stages took, summed from their completion records (whichever run
    completed each)."""
    records = [read_record(run_dir, name) for name in PAIR_STAGES]
    return sum(r.seconds for r in records if r is not None) / 60


def computer_performances() -> dict[str, Any]:
    """Machine description and a small fixed CPU benchmark (seconds), as ANHIR asks."""
    import psutil

    rng = np.random.default_rng(0)
    a = rng.random((600, 600))
    t0 = time.perf_counter()
    for _ in range(5):
        a = np.linalg.inv(a @ a.T + np.eye(600))
    bench = time.perf_counter() - t0
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_GB": round(psutil.virtual_memory().total / 1e9, 2),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "benchmark": "5 x inv(A A^T + I), A 600x600 float64",
        "benchmark_seconds": round(bench, 4),
    }


# -- scoring from the written files ------------------------------------------------------------
def score_submission(
    submission: Path,
    root: Path,
    unscorable: dict[str, str] | None = None,
    unreadable: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Score every pair of ``submission/registration-results.csv`` that has target landmarks.

    A pair without a warped-source file (failed), or whose warped file cannot be read (missing,
    no rows, non-finite values), counts as unregistered: initial error, R = 0; ``unreadable``
    (index -> reason) records the second case when a dict is given. A pair whose reference
    landmarks cannot be read or hold NaN, or whose diagonal is neither in the table nor
    readable from its target image, cannot be scored at all: it is left out and its reason
    recorded in ``unscorable`` (index -> reason) when a dict is given.
    """
    rows = []
    for p in read_pair_table(submission / "registration-results.csv"):
        if not p.target_landmarks:
            continue
        try:
            target = read_landmarks(resolve_path(root, p.target_landmarks))
            source = read_landmarks(resolve_path(root, p.source_landmarks))
            t, s = paired(target, source)
            for pts, name in ((t, p.target_landmarks), (s, p.source_landmarks)):
                if not np.isfinite(pts).all():
                    raise InputError("holds NaN: no error can be measured against it", name)
            diag = p.image_diagonal or _diagonal_from_image(root, p)
        except InputError as exc:
            if unscorable is None:
                raise
            unscorable[p.index] = str(exc)
            continue
        warped = None
        if p.warped_source_landmarks:
            try:
                warped = read_landmarks(resolve_path(submission, p.warped_source_landmarks))
            except InputError as exc:  # scored as unregistered, like a failed pair
                warped = None
                if unreadable is not None:
                    unreadable[p.index] = str(exc)
        sc = score_pair(t, s, warped, diag)
        rows.append(
            {
                "index": p.index,
                "tissue": tissue_of(p),
                "status": p.status,
                "diagonal": diag,
                "minutes": p.execution_time_minutes,
                **sc.to_dict(),
            }
        )
    return rows


def _diagonal_from_image(root: Path, p: Pair) -> float:
    from wsireg_flow.io.slide import open_slide

    with open_slide(resolve_path(root, p.target_image)) as s:
        h, w = s.shapes[0][:2]
    return image_diagonal(int(h), int(w))


def tissue_of(p: Pair) -> str:
    """The tissue set of a pair: the first folder of its target image path."""
    return Path(p.target_image).parts[0] if Path(p.target_image).parts else ""


def _as_score(r: dict[str, Any]) -> PairScore:
    fields = PairScore.__dataclass_fields__
    return PairScore(**{k: r[k] for k in fields})


def aggregates(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Leaderboard aggregates overall, per tissue and per status."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {("overall", "all"): list(rows)}
    for r in rows:
        groups.setdefault(("status", r["status"]), []).append(r)
    for r in sorted(rows, key=lambda r: r["tissue"]):
        groups.setdefault(("tissue", r["tissue"]), []).append(r)
    out = []
    for (kind, name), rs in groups.items():
        if rs:
            minutes = [r["minutes"] for r in rs if r["minutes"] is not None]
            out.append(
                {
                    "group": kind,
                    "name": name,
                    **aggregate([_as_score(r) for r in rs]),
                    "minutes_per_pair": float(np.mean(minutes)) if minutes else None,
                }
            )
    return out


# -- writing ---------------------------------------------------------------------------------
def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _fmt(v: Any, digits: int = 5) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def summary_markdown(summary: dict[str, Any], aggs: Sequence[dict[str, Any]]) -> str:
    lines = [
        "# ANHIR reproduction",
        "",
        f"{summary['pairs']} scored pairs, {summary['failed_pairs']} failed, "
        f"{_fmt(summary['minutes_per_pair'], 3)} min/pair.",
        "",
        "## Aggregates",
        "",
        "| group | name | pairs | AMrTRE | MMrTRE | AArTRE | AMxrTRE | robustness "
        "| initial AMrTRE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in aggs:
        lines.append(
            f"| {a['group']} | {a['name']} | {a['pairs']} | {_fmt(a['AMrTRE'])} "
            f"| {_fmt(a['MMrTRE'])} "
            f"| {_fmt(a['AArTRE'])} | {_fmt(a['AMxrTRE'])} | {_fmt(a['average_robustness'], 3)} "
            f"| {_fmt(a['initial_AMrTRE'])} |"
        )
    if summary.get("warnings"):
        lines += ["", "## Pairs to look at", ""]
        lines += [
            f"- pair {i}: {w} (`pairs/{i}/qc/`)"
            for i, found in summary["warnings"].items()
            for w in found
        ]
    lines += [
        "",
        "## Beside the published ANHIR results",
        "",
        "Published numbers are on the 251 hidden evaluation pairs at medium scale; ours are on "
        "the pairs scored here, so the comparison is indicative only.",
        "",
        "| method | AMrTRE | MMrTRE | avg robustness | min/pair |",
        "|---|---|---|---|---|",
        f"| **wsireg-flow (this run)** | {_fmt(summary['AMrTRE'])} | {_fmt(summary['MMrTRE'])} "
        f"| {_fmt(summary['average_robustness'], 3)} | {_fmt(summary['minutes_per_pair'], 3)} |",
    ]
    for name, am, mm, rob, mins in PUBLISHED:
        lines.append(f"| {name} | {_fmt(am)} | {_fmt(mm)} | {_fmt(rob, 3)} | {_fmt(mins, 3)} |")
    return "\n".join(lines) + "\n"


def boxplot(path: Path, submission: Path, root: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Per-pair box plots of rTRE before (grey) and after (blue) registration."""
    pairs = {p.index: p for p in read_pair_table(submission / "registration-results.csv")}
    before, after, labels = [], [], []
    for r in rows:
        p = pairs[r["index"]]
        t, s = paired(
            read_landmarks(resolve_path(root, p.target_landmarks)),
            read_landmarks(resolve_path(root, p.source_landmarks)),
        )
        before.append(np.linalg.norm(s - t, axis=1) / r["diagonal"])
        if p.warped_source_landmarks:
            w = read_landmarks(resolve_path(submission, p.warped_source_landmarks))[: len(t)]
            after.append(np.linalg.norm(w - t[: len(w)], axis=1) / r["diagonal"])
        else:
            after.append(before[-1])
        labels.append(r["index"])
    fig, ax = new_figure(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
    pos = np.arange(len(rows))
    b1 = ax.boxplot(before, positions=pos - 0.18, widths=0.3, patch_artist=True, showfliers=False)
    b2 = ax.boxplot(after, positions=pos + 0.18, widths=0.3, patch_artist=True, showfliers=False)
    for patch in b1["boxes"]:
        patch.set_facecolor("0.8")
    for patch in b2["boxes"]:
        patch.set_facecolor("tab:blue")
    ax.set_yscale("log")
    ax.set_xticks(pos, labels)
    ax.set_xlabel("pair")
    ax.set_ylabel("rTRE (TRE / target diagonal)")
    ax.legend([b1["boxes"][0], b2["boxes"][0]], ["before", "after"])
    ax.set_title("ANHIR rTRE per pair")
    write_figure(fig, path, dpi=90)


def pair_warnings(out: Path, outcomes: dict[str, PairOutcome]) -> dict[str, list[str]]:
    """{pair index: its quality warnings} (:func:`wsireg_flow.qc.run_warnings`) for the
    registered pairs that have any: pairs a person should look at before trusting the score."""
    found = {}
    for i, o in outcomes.items():
        run_dir = out / "pairs" / i
        if o.ok and (run_dir / "metrics.json").is_file():
            warnings = run_warnings(run_dir)
            if warnings:
                found[i] = warnings
    return found


def write_outputs(
    out: Path, root: Path, pairs: Sequence[Pair], outcomes: dict[str, PairOutcome]
) -> dict[str, Any]:
    """Write the submission folder and the scores; returns the summary."""
    rows_out = []
    outcomes = {
        p.index: outcomes.get(p.index) or PairOutcome(p.index, False, None, reason="not run")
        for p in pairs
    }  # a pair is never dropped: without an outcome it counts as unregistered
    for p in pairs:
        o = outcomes[p.index]
        rows_out.append(
            replace(
                p,
                warped_source_landmarks=o.warped_source if o.ok else "",
                warped_target_landmarks=o.warped_target if o.ok else "",
                execution_time_minutes=None if o.minutes is None else round(o.minutes, 5),
            )
        )
    write_pair_table(out / "registration-results.csv", rows_out)
    (out / "computer-performances.json").write_text(json.dumps(computer_performances(), indent=2))
    failures = {i: o.reason for i, o in outcomes.items() if not o.ok}
    (out / "failures.json").write_text(json.dumps(failures, indent=2))
    unscorable: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    rows = score_submission(out, root, unscorable, unreadable)
    for r in rows:
        r["failure"] = failures.get(r["index"], unreadable.get(r["index"], ""))
    _write_csv(out / "scores" / "pairs.csv", rows)
    summary: dict[str, Any] = {
        "pairs": 0,
        "failed_pairs": len(failures),
        "registered_pairs": sum(o.ok for o in outcomes.values()),
    }
    minutes = [o.minutes for o in outcomes.values() if o.minutes is not None]
    summary["minutes_per_pair"] = float(np.mean(minutes)) if minutes else None
    aggs: list[dict[str, Any]] = []
    if rows:
        aggs = aggregates(rows)
        overall = aggs[0]
        summary.update(
            {
                k: overall[k]
                for k in (
                    "AMrTRE",
                    "MMrTRE",
                    "AArTRE",
                    "AMxrTRE",
                    "average_robustness",
                    "initial_AMrTRE",
                    "initial_MMrTRE",
                    "initial_AArTRE",
                    "initial_AMxrTRE",
                )
            }
        )
        summary["pairs"] = overall["pairs"]
        summary["failed_pairs"] = len(failures)
        _write_csv(out / "scores" / "aggregates.csv", aggs)
        boxplot(out / "figures" / "rtre-boxplot.png", out, root, rows)
    else:
        for k in ("AMrTRE", "MMrTRE", "AArTRE", "AMxrTRE", "average_robustness"):
            summary[k] = None
    summary["failures"] = failures
    summary["unscorable"] = unscorable
    summary["warnings"] = pair_warnings(out, outcomes)
    (out / "scores").mkdir(parents=True, exist_ok=True)
    (out / "scores" / "summary.md").write_text(
        summary_markdown(summary, aggs) if rows else "# no scored pairs\n"
    )
    for i, o in outcomes.items():
        qc = out / "pairs" / i / "qc" / "overlay.png"
        if o.ok and qc.is_file():
            dst = out / "figures" / "overlays" / f"{i}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(qc, dst)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def finished_run_parser(doc: str | None) -> argparse.ArgumentParser:
    """Argument parser of a diagnostic that reads a finished ``wsireg-flow anhir`` output folder:
    the positional ``run`` and ``--dataset`` (the dataset root it scored); the description is
    the first paragraph of ``doc``."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    ap.add_argument("run", type=Path, help="output folder of `wsireg-flow anhir`")
    ap.add_argument("--dataset", type=Path, required=True, help="the dataset root it scored")
    return ap


def load_dataset(root: Path, table: Path, status: str | None, limit: int | None) -> list[Pair]:
    """Read and filter the pair table; the dataset root must exist."""
    if not root.is_dir():
        raise InputError("dataset root is not a folder", root)
    return select_pairs(read_pair_table(table), status, limit)


def no_pairs_message(status: str | None) -> str:
    """The refusal of a pair table (after ``--status``) with nothing to register."""
    return "no pairs selected" + (f" (none has status {status!r})" if status else "")


def check_benchmark_dir(
    root: Path, table: Path, out: Path, cfg: Config, status: str | None, limit: int | None
) -> None:
    """Refuse, before any work, a selection without pairs, an output folder that holds a
    register or stack run, or a pair folder (``pairs/INDEX``) that holds another pair's results
    (another dataset or table): the benchmark would fail those pairs, or mix its outputs with
    another run's."""
    for marker, kind in (("job.json", "register"), ("stack.json", "stack")):
        if (out / marker).is_file():
            raise WsiregError(f"holds a {kind} run, not an ANHIR run: choose another --out", out)
    check_unlocked(out)  # another anhir run writing there would fail the pairs it holds
    pairs = load_dataset(root, table, status, limit)
    if not pairs:  # before Prefect starts
        raise WsiregError(no_pairs_message(status), table)
    for p in pairs:
        try:
            job = pair_job(p, root, out, cfg)
        except WsiregError:  # a bad path in this row: recorded as the pair's failure later
            continue
        if holds_results(job.run_dir) and not holds_this_job(job):
            raise WsiregError(
                "holds another pair's results (another dataset or pair table): choose "
                "another --out",
                job.run_dir,
            )


def benchmark_is_complete(
    root: Path, table: Path, out: Path, cfg: Config, status: str | None, limit: int | None
) -> bool:
    """True when every selected pair already has a complete, current run under ``out``: a
    re-run only rescores (no orchestration needed). False on any problem with the table."""
    try:
        pairs = load_dataset(root, table, status, limit)
        return bool(pairs) and all(job_is_complete(pair_job(p, root, out, cfg)) for p in pairs)
    except (WsiregError, OSError, ValueError):
        return False


def run_benchmark(
    root: Path,
    table: Path,
    out: Path,
    cfg: Config,
    *,
    status: str | None = None,
    limit: int | None = None,
    scheduler: Any = "threads",
    register: Callable[[Pair], PairOutcome] | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Register the selected pairs (resuming finished ones) and write everything.

    ``register`` replaces the per-pair call (the flow passes one that runs pairs as tasks).
    """
    pairs = load_dataset(root, table, status, limit)
    if not pairs:
        raise WsiregError(no_pairs_message(status), table)
    outcomes: dict[str, PairOutcome] = {}
    with run_dir_lock(out):  # one anhir run per folder (each pair's folder has its own lock)
        for k, p in enumerate(pairs):
            outcomes[p.index] = (
                register(p) if register else register_one(p, root, out, cfg, scheduler)
            )
            if progress:
                progress("ANHIR pairs", k + 1, len(pairs))
        return write_outputs(out, root, pairs, outcomes)
