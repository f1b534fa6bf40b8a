"""The ANHIR benchmark end to end (``wsireg-flow anhir``), checked against ../shared/ANHIR.md.

The 8 sample pairs are registered ONCE per module through the command line (the Prefect
``anhir`` flow, as users run it); the submission folder is then checked file by file and its
scores are recomputed here from the written CSVs with an independent implementation of the
protocol (``csv`` + ``numpy`` only, no ``wsireg_flow.metrics``).

A second, small dataset copy (3 pairs, one source image replaced by garbage) covers failed
pairs, ``--strict``, resuming, and evaluation pairs (no target landmarks).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "anhir-sample"
TABLE = DATA / "dataset.csv"
N_PAIRS = 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The ANHIR pair table columns, in order (../shared/ANHIR.md, "Dataset layout").
ANHIR_COLUMNS = [
    "",
    "Target image",
    "Source image",
    "Target landmarks",
    "Source landmarks",
    "status",
    "Image size [pixels]",
    "Image diagonal [pixels]",
    "Warped target landmarks",
    "Warped source landmarks",
    "Execution time [minutes]",
]
SUMMARY_KEYS = {
    "AMrTRE",
    "MMrTRE",
    "AArTRE",
    "AMxrTRE",
    "average_robustness",
    "pairs",
    "failed_pairs",
    "minutes_per_pair",
}

pytestmark = pytest.mark.usefixtures("prefect_env")


# -- helpers ------------------------------------------------------------------------------------
def _cli(argv: list[str]) -> dict[str, Any]:
    """Run ``wsireg-flow`` in-process; exit code, stdout, stderr and wall time."""
    from wsireg_flow.cli import main

    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return {
        "code": code,
        "stdout": out.getvalue(),
        "stderr": err.getvalue(),
        "seconds": time.perf_counter() - t0,
    }


def _anhir_argv(dataset: Path, pairs: Path, out: Path, *extra: str) -> list[str]:
    return [
        "anhir",
        "--dataset",
        str(dataset),
        "--pairs",
        str(pairs),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _write_table(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        w.writerows(rows)


def _points(path: Path) -> np.ndarray:
    """An ANHIR landmark CSV (columns found by name) as (N, 2) (x, y); empty cells -> NaN."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return np.array(
        [
            [
                float(r["X"]) if r["X"].strip() else math.nan,
                float(r["Y"]) if r["Y"].strip() else math.nan,
            ]
            for r in rows
        ],
        np.float64,
    ).reshape(-1, 2)


def _markers(run_dir: Path) -> dict[str, str]:
    """Stage completion markers of a pair run directory (file contents)."""
    return {m.name: m.read_text() for m in sorted((run_dir / ".stages").glob("*.json"))}


def _independent_scores(submission: Path, dataset: Path) -> dict[str, Any]:
    """The ANHIR protocol re-implemented from the written CSVs (csv + numpy only)."""
    _, rows = _read_table(submission / "registration-results.csv")
    per_pair: dict[str, dict[str, float]] = {}
    for r in rows:
        if not r["Target landmarks"].strip():
            continue  # evaluation pair: nothing to score against
        target = _points(dataset / r["Target landmarks"])
        source = _points(dataset / r["Source landmarks"])
        n = min(len(target), len(source))
        target, source = target[:n], source[:n]
        initial = np.sqrt(((source - target) ** 2).sum(axis=1))
        if r["Warped source landmarks"].strip():
            warped = np.full((n, 2), np.nan)
            w = _points(submission / r["Warped source landmarks"])[:n]
            warped[: len(w)] = w
            final = np.sqrt(((warped - target) ** 2).sum(axis=1))
            missing = ~np.isfinite(final)
            final = np.where(missing, initial, final)  # a NaN landmark counts as unregistered
            robust = (final < initial) & ~missing
        else:  # failed / missing pair: initial error, robustness 0
            final = initial
            robust = np.zeros(n, bool)
        diag = float(r["Image diagonal [pixels]"])
        per_pair[r[""]] = {
            "initial_median": float(np.median(initial / diag)),
            "median": float(np.median(final / diag)),
            "mean": float(np.mean(final / diag)),
            "max": float(np.max(final / diag)),
            "robustness": float(np.mean(robust)),
        }
    med = np.array([p["median"] for p in per_pair.values()])
    return {
        "pairs": per_pair,
        "AMrTRE": float(np.mean(med)),
        "MMrTRE": float(np.median(med)),
        "AArTRE": float(np.mean([p["mean"] for p in per_pair.values()])),
        "AMxrTRE": float(np.mean([p["max"] for p in per_pair.values()])),
        "average_robustness": float(np.mean([p["robustness"] for p in per_pair.values()])),
        "initial_AMrTRE": float(np.mean([p["initial_median"] for p in per_pair.values()])),
    }


# -- the full sample, once ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full(prefect_env: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("anhir-full") / "submission"
    res = _cli(_anhir_argv(DATA, TABLE, out))
    print(f"\n[anhir] 8 pairs via the CLI: {res['seconds']:.1f} s, exit {res['code']}")
    return {**res, "out": out}


def test_full_run_exits_zero_and_prints_the_summary(full: dict[str, Any]) -> None:
    assert full["code"] == 0, full["stderr"]
    assert full["stderr"] == ""  # no quality warning either: all 8 pairs registered well
    assert json.loads((full["out"] / "summary.json").read_text())["warnings"] == {}
    assert "MEVIS" in full["stdout"]
    assert "wsireg-flow (this run)" in full["stdout"]
    assert f"figures: {full['out'] / 'figures'}" in full["stdout"]  # named as it exists


def test_rerun_of_a_finished_benchmark_rescores_without_prefect(
    full: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pair complete: the CLI rescores with the library alone (starting Prefect's
    temporary server for nothing took 12-15 s) and writes the same scores."""
    import flows.anhir

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the anhir flow was started")

    def scores() -> list[dict[str, str]]:  # minutes: resumed pairs report their stages' time
        return [{k: v for k, v in r.items() if k != "minutes"} for r in _read_table(pairs)[1]]

    out: Path = full["out"]
    pairs = out / "scores" / "pairs.csv"
    before = scores()
    monkeypatch.setattr(flows.anhir, "anhir_benchmark", refuse)
    res = _cli(_anhir_argv(DATA, TABLE, out))
    assert res["code"] == 0, res["stderr"]
    assert scores() == before
    assert "wsireg-flow (this run)" in res["stdout"]


def test_registration_results_table_is_a_complete_submission(full: dict[str, Any]) -> None:
    out: Path = full["out"]
    header, rows = _read_table(out / "registration-results.csv")
    assert header == ANHIR_COLUMNS
    assert len(rows) == N_PAIRS
    _, given = _read_table(TABLE)
    assert [r[""] for r in rows] == [r[""] for r in given]
    for r, g in zip(rows, given, strict=True):
        # input columns are passed through verbatim
        for col in ANHIR_COLUMNS[:8]:
            assert r[col] == g[col], (r[""], col)
        for col in ("Warped source landmarks", "Warped target landmarks"):
            rel = r[col]
            assert rel, (r[""], col)
            assert not Path(rel).is_absolute(), rel
            assert (out / rel).is_file(), (r[""], rel)
        minutes = float(r["Execution time [minutes]"])
        assert 0 < minutes < 10
        # one warped landmark per source (resp. target) landmark
        assert len(_points(out / r["Warped source landmarks"])) == len(
            _points(DATA / r["Source landmarks"])
        )
        assert len(_points(out / r["Warped target landmarks"])) == len(
            _points(DATA / r["Target landmarks"])
        )
        assert np.isfinite(_points(out / r["Warped source landmarks"])).all()


def test_computer_performances_describe_the_machine(full: dict[str, Any]) -> None:
    perf = json.loads((full["out"] / "computer-performances.json").read_text())
    assert perf["cores_logical"] >= 1
    assert perf["cores_physical"] is None or perf["cores_physical"] >= 1
    assert perf["memory_GB"] > 0.5
    assert 0 < perf["benchmark_seconds"] < 60


def test_scores_figures_and_summary_are_written(full: dict[str, Any]) -> None:
    out: Path = full["out"]
    _, pairs = _read_table(out / "scores" / "pairs.csv")
    assert sorted(p["index"] for p in pairs) == [str(i) for i in range(N_PAIRS)]
    _, aggs = _read_table(out / "scores" / "aggregates.csv")
    groups = {(a["group"], a["name"]) for a in aggs}
    assert ("overall", "all") in groups and ("status", "training") in groups
    assert {n for g, n in groups if g == "tissue"} == {"rat-kidney_", "lesions_", "lung-lesion_3"}
    md = (out / "scores" / "summary.md").read_text()
    for method in ("MEVIS", "UPENN", "AGH", "CKVST", "elastix"):
        assert method in md
    assert (out / "figures" / "rtre-boxplot.png").read_bytes()[:8] == PNG_MAGIC
    for i in range(N_PAIRS):
        png = out / "figures" / "overlays" / f"{i}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, png
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["pairs"] == N_PAIRS
    assert summary["failed_pairs"] == 0
    assert 0 < summary["minutes_per_pair"] < 10
    assert json.loads((out / "failures.json").read_text()) == {}


def test_summary_agrees_with_an_independent_computation(full: dict[str, Any]) -> None:
    out: Path = full["out"]
    mine = _independent_scores(out, DATA)
    summary = json.loads((out / "summary.json").read_text())
    assert len(mine["pairs"]) == summary["pairs"] == N_PAIRS
    for key in ("AMrTRE", "MMrTRE", "AArTRE", "AMxrTRE", "average_robustness", "initial_AMrTRE"):
        assert summary[key] == pytest.approx(mine[key], abs=1e-9, rel=0), key
    # per pair too (pairs.csv holds 6 significant digits)
    _, rows = _read_table(out / "scores" / "pairs.csv")
    for r in rows:
        p = mine["pairs"][r["index"]]
        assert float(r["median_rtre"]) == pytest.approx(p["median"], rel=1e-5)
        assert float(r["max_rtre"]) == pytest.approx(p["max"], rel=1e-5)
        assert float(r["robustness"]) == pytest.approx(p["robustness"], rel=1e-5)
    # the sample's unregistered level stated in ANHIR.md (about 0.049)
    assert mine["initial_AMrTRE"] == pytest.approx(0.049, abs=0.003)
    # registration improves every pair
    for index, p in mine["pairs"].items():
        assert p["median"] < p["initial_median"], index
    print(
        "\n[anhir] AMrTRE {AMrTRE:.5f}  MMrTRE {MMrTRE:.5f}  AArTRE {AArTRE:.5f}  "
        "AMxrTRE {AMxrTRE:.5f}  robustness {average_robustness:.3f}  "
        "(initial AMrTRE {initial_AMrTRE:.5f})".format(**mine)
    )
    print(
        "[anhir] per-pair median rTRE: "
        + ", ".join(f"{i}: {p['median']:.5f}" for i, p in mine["pairs"].items())
    )
    print(f"[anhir] minutes per pair: {summary['minutes_per_pair']:.4f}")


def test_landmark_cycles_on_the_sample_run(full: dict[str, Any], tmp_path: Path) -> None:
    """The cycle analysis runs on a real submission: the 6 lung-lesion_3 pairs form cycles, the
    per-image offsets explain far more than chance, and the second annotator of He corrects the
    first one against the offset the registrations found (annotation error, slope < 0)."""
    from benchmarks_anhir.landmark_cycles import main

    out = tmp_path / "cycles.json"
    jb = ROOT / "data" / "anhir-sample-annotations" / "lung-lesion_3" / "user-JB_scale-50pc"
    argv = [str(full["out"]), "--dataset", str(DATA), "--out", str(out)]
    assert main([*argv, "--second", str(jb), "--second-scale", "0.1"]) == 0
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    (s,) = result["sets"]  # rat-kidney_ and lesions_ have one pair each: no cycle
    assert s["set"] == "lung-lesion_3/scale-5pc" and len(s["pairs"]) == 6
    assert s["chance_fraction"] == 0.5
    assert s["explained_fraction"] > 0.7
    for p in s["pairs"]:
        assert p["median_residual_px"] < p["median_error_px"]
    # the offsets alone (zero per-pair residual) still score above the 0.0030
    assert s["mean_median_offset_only_rtre"] > 0.0035
    he = next(c for c in s["second_annotator"] if "He" in c["image"])
    assert he["slope_x"] < -0.2 and he["slope_y"] < -0.2
    print(
        f"\n[cycles] explained {s['explained_fraction']:.2f}; offsets "
        + ", ".join(f"{Path(k).stem}: {v:.2f} px" for k, v in s["median_offset_px"].items())
        + f"; He second annotator slope x {he['slope_x']:.2f} y {he['slope_y']:.2f}"
    )


def test_landmark_consistency_on_the_sample_run(full: dict[str, Any], tmp_path: Path) -> None:
    """The re-matching diagnostic runs on a real submission and supports what the README says:
    re-matching the warped source around each landmark does not lower the error, and the
    neighbours' residuals predict little of a landmark's residual (a smooth registration error
    would be predicted)."""
    from benchmarks_anhir.landmark_consistency import main

    out = tmp_path / "consistency.json"
    assert main([str(full["out"]), "--dataset", str(DATA), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p["pair"] for p in result["pairs"]) == [str(i) for i in range(8)]
    assert (
        result["mean_median_error_px_after_rematch"]
        > result["mean_median_error_px_same_points"] - 0.3
    )
    best = []
    for p in result["pairs"]:
        assert abs(p["median_rtre"] * p["diagonal"] - p["median_error_px"]) < 1e-6
        best.append(min(p["median_error_px_after_smooth_correction"].values()))
        assert best[-1] > p["median_error_px"] - 1.5
    assert np.mean(best) > result["mean_median_error_px"] - 0.5
    print(
        f"\n[consistency] mean median error {result['mean_median_error_px']:.2f} px, same points "
        f"{result['mean_median_error_px_same_points']:.2f}, re-matched "
        f"{result['mean_median_error_px_after_rematch']:.2f}"
    )


# -- a failed pair, --strict, resuming ------------------------------------------------------------
BROKEN_INDEX = "1"  # lesions_: its source image is replaced by garbage


@pytest.fixture(scope="module")
def broken(prefect_env: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A dataset copy with one unreadable source image, run three times on its first 3 pairs."""
    base = tmp_path_factory.mktemp("anhir-broken")
    dataset = base / "dataset"
    shutil.copytree(DATA, dataset)
    _, rows = _read_table(dataset / "dataset.csv")
    bad = dataset / next(r for r in rows if r[""] == BROKEN_INDEX)["Source image"]
    bad.write_bytes(b"this is not an image\x00\x01\x02" * 100)
    out = base / "submission"
    argv = _anhir_argv(dataset, dataset / "dataset.csv", out, "--limit", "3")
    first = _cli(argv)
    markers = {i: _markers(out / "pairs" / i) for i in ("0", "2")}
    snapshot = {
        name: (out / name).read_text()
        for name in ("summary.json", "failures.json", "scores/pairs.csv")
    }
    second = _cli(argv)
    markers_second = {i: _markers(out / "pairs" / i) for i in ("0", "2")}
    strict = _cli([*argv, "--strict"])
    print(
        f"\n[anhir] 3 pairs (1 broken): first {first['seconds']:.1f} s, "
        f"re-run {second['seconds']:.1f} s, --strict re-run {strict['seconds']:.1f} s"
    )
    return {
        "dataset": dataset,
        "out": out,
        "bad": bad,
        "first": first,
        "second": second,
        "strict": strict,
        "markers": markers,
        "markers_second": markers_second,
        "snapshot": snapshot,
    }


def test_a_failed_pair_does_not_stop_the_run(broken: dict[str, Any]) -> None:
    first = broken["first"]
    assert first["code"] == 0
    err = first["stderr"].strip().splitlines()
    assert len(err) == 1 and "1 pair(s) failed" in err[0] and "failures.json" in err[0]
    assert broken["strict"]["code"] != 0
    assert "1 pair(s) failed" in broken["strict"]["stderr"]


def test_failures_json_names_the_pair_and_the_problem(broken: dict[str, Any]) -> None:
    failures = json.loads((broken["out"] / "failures.json").read_text())
    assert list(failures) == [BROKEN_INDEX]
    reason = failures[BROKEN_INDEX]
    assert broken["bad"].name in reason
    assert "not a supported image" in reason
    summary = json.loads((broken["out"] / "summary.json").read_text())
    assert summary["failed_pairs"] == 1
    assert summary["pairs"] == 3


def test_failed_pair_is_scored_as_unregistered(broken: dict[str, Any]) -> None:
    out, dataset = broken["out"], broken["dataset"]
    _, table = _read_table(out / "registration-results.csv")
    assert [r[""] for r in table] == ["0", "1", "2"]
    by_index = {r[""]: r for r in table}
    assert by_index[BROKEN_INDEX]["Warped source landmarks"] == ""
    assert by_index[BROKEN_INDEX]["Warped target landmarks"] == ""
    for i in ("0", "2"):
        rel = by_index[i]["Warped source landmarks"]
        assert rel and (out / rel).is_file()
        assert np.isfinite(_points(out / rel)).all()
    _, scores = _read_table(out / "scores" / "pairs.csv")
    row = {r["index"]: r for r in scores}[BROKEN_INDEX]
    assert float(row["robustness"]) == 0.0
    for stat in ("median", "mean", "max"):
        assert row[f"{stat}_rtre"] == row[f"initial_{stat}_rtre"]
    assert row["registered"] == "False"
    assert row["failure"]
    # and the summary still agrees with the independent protocol, failed pair included
    mine = _independent_scores(out, dataset)
    summary = json.loads((out / "summary.json").read_text())
    assert mine["pairs"][BROKEN_INDEX]["robustness"] == 0.0
    assert mine["pairs"][BROKEN_INDEX]["median"] == mine["pairs"][BROKEN_INDEX]["initial_median"]
    for key in ("AMrTRE", "MMrTRE", "AArTRE", "AMxrTRE", "average_robustness"):
        assert summary[key] == pytest.approx(mine[key], abs=1e-9, rel=0), key


def test_rerun_skips_pairs_already_done(broken: dict[str, Any]) -> None:
    first, second = broken["first"], broken["second"]
    assert second["code"] == 0
    assert second["seconds"] < first["seconds"] / 3, (second["seconds"], first["seconds"])
    assert broken["markers_second"] == broken["markers"]
    assert all(len(m) == 9 for m in broken["markers"].values())  # every pair stage finished
    # the resumed run writes the same results
    for name, text in broken["snapshot"].items():
        if name == "summary.json":
            old, new = json.loads(text), json.loads((broken["out"] / name).read_text())
            for key in ("AMrTRE", "MMrTRE", "average_robustness", "failed_pairs"):
                assert new[key] == old[key]
        elif name == "failures.json":
            assert (broken["out"] / name).read_text() == text


def test_pair_without_diagonal_or_target_image_is_unscorable_not_fatal(tmp_path: Path) -> None:
    """Without the diagonal column the diagonal comes from the target image; when that image is
    missing the pair is recorded as unscorable and the others are scored (this once aborted the
    whole report, exit 2)."""
    from benchmarks_anhir.run import score_submission

    header, rows = _read_table(TABLE)
    header = [h for h in header if h != "Image diagonal [pixels]"]
    rows = [{k: v for k, v in r.items() if k in header} for r in rows[:3]]
    rows[1]["Target image"] = "p/missing.jpg"
    _write_table(tmp_path / "registration-results.csv", header, rows)
    unscorable: dict[str, str] = {}
    scored = score_submission(tmp_path, DATA, unscorable)
    assert [r["index"] for r in scored] == ["0", "2"]
    assert list(unscorable) == ["1"]
    assert unscorable["1"].endswith("p/missing.jpg: file not found")
    # the diagonal read from the image equals the table's (1405.1 for rat-kidney_)
    assert scored[0]["diagonal"] == pytest.approx(1405.1)


def test_unreadable_warped_files_count_as_unregistered_and_nan_references_as_unscorable(
    tmp_path: Path,
) -> None:
    """A missing, header-only or non-finite warped file, or a NaN in the reference landmarks,
    once aborted the whole scoring. A bad warped file now scores its pair as unregistered
    (initial error, R = 0); a NaN reference leaves the pair unscorable, with the reason."""
    from benchmarks_anhir.run import score_submission

    header, rows = _read_table(TABLE)
    rows = rows[:4]
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "header.csv").write_text(",X,Y\n")
    (tmp_path / "w" / "inf.csv").write_text(",X,Y\n1,inf,2.0\n")
    for r, warped in zip(rows[:3], ("w/missing.csv", "w/header.csv", "w/inf.csv"), strict=True):
        r["Warped source landmarks"] = warped
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    nan_file = data / rows[3]["Source landmarks"]  # He: no other of these pairs uses it
    lines = nan_file.read_text().splitlines()
    lines[2] = "2,,"
    nan_file.write_text("\n".join(lines) + "\n")
    _write_table(tmp_path / "registration-results.csv", header, rows)
    unscorable: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    scored = score_submission(tmp_path, data, unscorable, unreadable)
    assert [r["index"] for r in scored] == ["0", "1", "2"]
    for r in scored:
        assert r["median_rtre"] == r["initial_median_rtre"] and r["robustness"] == 0.0
    assert sorted(unreadable) == ["0", "1", "2"]
    assert list(unscorable) == ["3"] and "holds NaN" in unscorable["3"]


# -- evaluation pairs ---------------------------------------------------------------------------
def test_evaluation_pair_is_registered_but_not_scored(
    broken: dict[str, Any], tmp_path: Path
) -> None:
    """Pair 0 (training, resumed from the broken run) + pair 3 as an evaluation pair."""
    dataset: Path = broken["dataset"]
    header, rows = _read_table(dataset / "dataset.csv")
    train = next(r for r in rows if r[""] == "0")
    evaluation = dict(next(r for r in rows if r[""] == "3"))
    evaluation["status"] = "evaluation"
    evaluation["Target landmarks"] = ""
    table = dataset / "dataset-evaluation.csv"
    _write_table(table, header, [train, evaluation])
    out = tmp_path / "submission"
    shutil.copytree(broken["out"] / "pairs" / "0", out / "pairs" / "0")  # resumes: no work
    res = _cli(_anhir_argv(dataset, table, out))
    assert res["code"] == 0, res["stderr"]
    assert _markers(out / "pairs" / "0") == broken["markers"]["0"]

    _, written = _read_table(out / "registration-results.csv")
    by_index = {r[""]: r for r in written}
    assert set(by_index) == {"0", "3"}
    ev = by_index["3"]
    assert ev["status"] == "evaluation"
    assert ev["Target landmarks"] == ""
    assert ev["Warped target landmarks"] == ""
    assert float(ev["Execution time [minutes]"]) > 0
    warped = _points(out / ev["Warped source landmarks"])
    assert len(warped) == len(_points(dataset / ev["Source landmarks"]))
    assert np.isfinite(warped).all()
    # the source landmarks really were mapped into the target frame: close to the withheld
    # target landmarks (one target landmark lies 6 px from the image border, so a warped point
    # may fall just outside the image)
    source = _points(dataset / ev["Source landmarks"])
    withheld = _points(dataset / next(r for r in rows if r[""] == "3")["Target landmarks"])
    moved = np.median(np.linalg.norm(warped - withheld, axis=1))
    before = np.median(np.linalg.norm(source - withheld, axis=1))
    assert moved < 0.2 * before

    _, scores = _read_table(out / "scores" / "pairs.csv")
    assert [r["index"] for r in scores] == ["0"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 1
    assert summary["failed_pairs"] == 0
    _, aggs = _read_table(out / "scores" / "aggregates.csv")
    assert ("status", "evaluation") not in {(a["group"], a["name"]) for a in aggs}


def test_pairs_whose_worker_is_lost_are_recorded_as_failed() -> None:
    """On a cluster, a pair whose task dies with its worker (or fails outside the pair code)
    is a failed pair with a reason; the other pairs' outcomes are kept."""
    import os

    import dask
    from distributed import Client, LocalCluster, wait

    from benchmarks_anhir.run import PairOutcome, collect_outcomes
    from wsireg_flow.landmarks import Pair

    pairs = {k: Pair(k, "t.jpg", "s.jpg", "t.csv", "s.csv") for k in ("0", "1", "2")}
    seen: list[tuple[int, int]] = []
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        LocalCluster(
            n_workers=1, threads_per_worker=1, dashboard_address=None, host="127.0.0.1"
        ) as cluster,
        Client(cluster) as client,
    ):
        # the worker process dies with this task; only then are the others submitted (to the
        # restarted worker), so that they cannot be lost with it
        lost = client.submit(os._exit, 3, pure=False)
        wait(lost)
        submitted = {
            lost: pairs["1"],
            client.submit(PairOutcome, "0", True, 0.5, pure=False): pairs["0"],
            client.submit(int, "not a number", pure=False): pairs["2"],
        }
        outcomes = collect_outcomes(submitted, lambda s, d, t: seen.append((d, t)))
    assert outcomes["0"] == PairOutcome("0", True, 0.5)
    assert not outcomes["1"].ok and outcomes["1"].reason.startswith("KilledWorker")
    assert not outcomes["2"].ok and outcomes["2"].reason.startswith("ValueError: invalid literal")
    assert sorted(seen) == [(1, 3), (2, 3), (3, 3)]


def test_a_pair_resumed_part_way_reports_all_its_stages_time(tmp_path: Path) -> None:
    """A pair interrupted after its coarse stage and resumed reported the minutes of the
    resumed part only (0.027 against 0.061 for the whole pair)."""
    from benchmarks_anhir.run import pair_job, register_one
    from wsireg_flow.config import Config
    from wsireg_flow.landmarks import read_pair_table
    from wsireg_flow.pipeline import PAIR_STAGES, run_pair
    from wsireg_flow.stages import read_record

    pair = read_pair_table(TABLE)[2]
    job = pair_job(pair, DATA, tmp_path, Config())
    first = PAIR_STAGES[: PAIR_STAGES.index("coarse") + 1]
    run_pair(job, stages=first)  # the part an interrupted run finished
    outcome = register_one(pair, DATA, tmp_path, Config())
    seconds = {name: read_record(job.run_dir, name).seconds for name in PAIR_STAGES}  # type: ignore[union-attr]
    print(f"\nstage seconds {seconds}, reported {outcome.minutes * 60:.2f} s")
    assert outcome.ok
    # every stage's recorded time, the interrupted run's included (this run alone: ~2.6 s)
    assert outcome.minutes * 60 == pytest.approx(sum(seconds.values()), rel=1e-6)


def test_a_pair_worth_a_look_is_named_in_the_report_and_on_stderr(tmp_path: Path) -> None:
    """`anhir` printed no quality warning (register and stack did): a pair left at its coarse
    alignment showed only in the figures and the per-pair scores. Here pair 0's source is
    resized by 0.3 with no pixel size stated, beyond the scale range the coarse step searches.
    The pair runs on a worker of the default local cluster, whose warnings (pair 0's landmark
    files differ in length) came out as bare messages; they are one line each, as the CLI's."""
    import subprocess
    import sys

    import cv2

    from wsireg_flow.config import SCHEDULER_ENV
    from wsireg_flow.landmarks import read_landmarks, write_landmarks

    dataset = tmp_path / "dataset"
    shutil.copytree(DATA, dataset)
    _, rows = _read_table(dataset / "dataset.csv")
    first = next(r for r in rows if r[""] == "0")
    source, source_lm = dataset / first["Source image"], dataset / first["Source landmarks"]
    image = cv2.imread(str(source))
    cv2.imwrite(str(source), cv2.resize(image, None, fx=0.3, fy=0.3, interpolation=cv2.INTER_AREA))
    write_landmarks(source_lm, (read_landmarks(source_lm) + 0.5) * 0.3 - 0.5)
    out = tmp_path / "submission"
    argv = _anhir_argv(dataset, dataset / "dataset.csv", out, "--limit", "1")
    env = {k: v for k, v in os.environ.items() if k != SCHEDULER_ENV}

    cmd = [sys.executable, "-m", "wsireg_flow.cli", *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)

    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    found = summary["warnings"]["0"]
    scale = float(found[0].removeprefix("the tissue areas imply a scale of ").split(",")[0])
    assert scale == pytest.approx(0.3, abs=0.03), found
    assert "no tile on tissue registered at any level" in found[1]
    report = (out / "scores" / "summary.md").read_text()
    assert f"- pair 0: {found[0]} (`pairs/0/qc/`)" in report
    lines = res.stderr.splitlines()
    assert lines[0].startswith("wsireg-flow: warning: "), lines[0]  # from the worker process
    assert "has 71 landmarks" in lines[0] and "rows 1-69 of each are paired" in lines[0]
    assert lines[1:] == [f"wsireg-flow: warning: {out / 'pairs' / '0'}: {w}" for w in found]
