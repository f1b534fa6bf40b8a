"""The benchmark scripts the README quotes run as written and record what they claim to.

These are not timed tests: they check that the commands work and that their JSON carries every
number the README reports (at a small size), never how fast anything is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from benchmarks_anhir.compare_palom import PalomTransform
from benchmarks_anhir.gigapixel import peak_per_stage
from wsireg_flow.landmarks import read_landmarks
from wsireg_flow.pipeline import PAIR_STAGES

ROOT = Path(__file__).resolve().parents[1]


def _run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
def test_gigapixel_benchmark_runs_and_records_time_memory_and_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "gigapixel.json"
    config = tmp_path / "zstd.yaml"
    config.write_text("io:\n  codec: zstd\n")
    proc = _run_module(
        "benchmarks_anhir.gigapixel",
        *("--sizes", "2000", "--workers", "1", "--data", str(tmp_path), "--out", str(out)),
        *("--config", str(config)),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["machine"]["cores"] >= 1
    assert doc["config"]["io"]["codec"] == "zstd"  # the run used the given config
    (r,) = doc["results"]
    assert (r["size"], r["workers"], r["scheduler"]) == (2000, 1, "threads")
    assert set(r["seconds_per_stage"]) == set(PAIR_STAGES)
    assert r["seconds_total"] >= sum(r["seconds_per_stage"].values()) * 0.9
    assert 0.05 < r["peak_rss_gb"] < 24.0
    per_stage = r["peak_rss_gb_per_stage"]
    assert set(per_stage) == set(PAIR_STAGES)
    assert 0.05 < min(per_stage.values()) and max(per_stage.values()) <= r["peak_rss_gb"]
    assert r["landmarks"] == 200
    # the ground truth is recovered, at full resolution here (at 3000², p90 was 2.90 px when
    # the tile gain check rejected correct flows on fine texture; 0.14 px since; 2000²: 0.09)
    assert r["tre_px_median"] < 0.2
    assert r["tre_px_p90"] < 0.5
    assert r["tre_px_median"] <= r["tre_px_p90"] <= r["tre_px_max"]
    # the printed table carries the same row
    assert f"{r['seconds_total']:>8}" in proc.stdout
    assert not any(p.name.startswith("run-") for p in tmp_path.iterdir())  # run dirs removed


def test_peak_per_stage_takes_the_samples_inside_each_stage() -> None:
    """Stage a ran over [10, 12] s and b over [12, 12.05] s (between two samples)."""
    samples = [(t, int(b * 1e9)) for t, b in [(9.9, 5.0), (10.5, 1.0), (11.9, 2.0), (12.3, 3.0)]]
    records = {"a": {"finished": 12.0, "seconds": 2.0}, "b": {"finished": 12.05, "seconds": 0.05}}
    assert peak_per_stage(samples, records) == {"a": 2.0, "b": 2.0}
    assert peak_per_stage([], records) == {}


@pytest.mark.slow
def test_prefect_overhead_benchmark_runs_the_pair_three_ways(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    proc = _run_module("benchmarks_anhir.prefect_overhead", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    for k in ("library_s", "flow_cold_s", "flow_warm_s"):
        assert doc[k] > 0
    assert doc["overhead_cold_s"] == pytest.approx(doc["flow_cold_s"] - doc["library_s"], abs=0.02)
    assert doc["overhead_warm_s"] == pytest.approx(doc["flow_warm_s"] - doc["library_s"], abs=0.02)
    assert doc["stages"] == len(PAIR_STAGES)


def test_resized_sources_benchmark_recovers_the_scale(tmp_path: Path) -> None:
    """One ANHIR pair (lung lesion 3, CD31 <- CC10) with its source 1.7x larger and no pixel
    size: the JSON records the coarse scale found and the rTRE the README quotes."""
    dataset = ROOT / "data" / "anhir-sample"
    lines = (dataset / "dataset.csv").read_text().splitlines()
    table = tmp_path / "one-pair.csv"
    table.write_text("\n".join([lines[0], lines[3]]) + "\n")  # header + pair 2
    out = tmp_path / "out"
    r = _run_module(
        "benchmarks_anhir.resized_sources",
        *("--dataset", str(dataset), "--pairs", str(table), "--out", str(out)),
        *("--factors", "1.7"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "resized-sources.json").read_text())
    (rec,) = summary["runs"]
    assert rec["pair"] == "2" and rec["factor"] == 1.7
    assert rec["coarse_scale"] == pytest.approx(1.7, abs=0.05)
    assert rec["initial_median_rtre"] > 0.3 and rec["median_rtre"] < 0.006  # measured 0.0041
    assert summary["x1.7"]["improved"] == 1
    src = ROOT / "data" / "anhir-sample" / "lung-lesion_3" / "scale-5pc"
    orig = read_landmarks(src / "29-041-Izd2-w35-Cc10-5-les3.csv")
    moved = read_landmarks(out / "pair-2" / "x1.7" / "inputs" / "source.csv")
    np.testing.assert_allclose(moved, orig * 1.7, atol=1e-6)  # corner-origin points scale as is


def test_field_regularity_measures_warped_squares_and_stretch() -> None:
    """A backward affine that halves (target -> source scale 0.5) maps a 2 px source square to
    a 4 px target square; a residual field that stretches one band 3x is outside [0.5, 2]
    exactly there."""
    from benchmarks_anhir.field_regularity import stretched_share, warped_square_sides
    from wsireg_flow.field import StoredField
    from wsireg_flow.transform import Transform

    affine = np.array([[0.5, 0.0, 10.0], [0.0, 0.5, -4.0], [0.0, 0.0, 1.0]])
    t = Transform(affine, None, None, (200, 200), (100, 100))
    sides = warped_square_sides(t, np.array([[20.0, 30.0], [55.5, 12.25]]))
    np.testing.assert_allclose(sides, [4.0, 4.0], atol=1e-9)
    assert stretched_share(t) == 0.0
    # residual dx = 2 x on columns 40-59 (d(x + r)/dx = 3 there), constant elsewhere
    data = np.zeros((2, 100, 100), np.float32)
    ramp = np.clip(np.arange(100) - 40, 0, 20).astype(np.float32) * 2
    data[1] = ramp[None, :]
    field = StoredField(data, 1.0, 0.0, {})
    share = stretched_share(Transform(np.eye(3), field, None, (100, 100), (100, 100)))
    assert share == pytest.approx(0.20, abs=0.02)


def test_field_regularity_refuses_a_folder_that_is_not_a_finished_run(tmp_path: Path) -> None:
    proc = _run_module(
        "benchmarks_anhir.field_regularity",
        *(str(tmp_path), "--dataset", "data/anhir-sample"),
        *("--pairs", "data/anhir-sample/dataset.csv"),
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"{tmp_path}: not a finished `wsireg-flow anhir` folder (no summary.json)"
    )


# -- compare_valis: no VALIS needed (CI has none) ------------------------------------------------
def test_compare_valis_refuses_in_one_line_without_a_valis_python(tmp_path: Path) -> None:
    """A missing interpreter, and one without valis-wsi (this venv), are refused before any
    work, with one line saying how to create the VALIS environment."""
    dataset = ROOT / "data" / "anhir-sample"
    for python in (tmp_path / "no-such" / "python", Path(sys.executable)):
        r = _run_module(
            "benchmarks_anhir.compare_valis",
            *("--dataset", str(dataset), "--pairs", str(dataset / "dataset.csv")),
            *("--out", str(tmp_path / "out"), "--valis-python", str(python)),
        )
        assert r.returncode == 1
        (line,) = r.stderr.strip().splitlines()
        assert str(python) in line and "python3 -m venv" in line and "pip install" in line
        assert "valis-wsi" in line
        assert not (tmp_path / "out").exists()  # refused before running anything


def _points_csv(path: Path, rows: list[tuple[float, float]]) -> Path:
    path.write_text(",X,Y\n" + "".join(f"{i},{x},{y}\n" for i, (x, y) in enumerate(rows, 1)))
    return path


def _tiny_dataset(root: Path) -> Path:
    """Two pairs of 4 target / 5 source landmarks (every initial error 5 px, diagonal 100 px)."""
    root.mkdir()
    target = [(10.0, 10.0), (20.0, 10.0), (30.0, 30.0), (40.0, 40.0)]
    _points_csv(root / "t.csv", target)
    _points_csv(root / "s.csv", [(x + 3, y + 4) for x, y in target] + [(1.0, 1.0)])
    head = (
        ",Target image,Source image,Target landmarks,Source landmarks,status,"
        "Image size [pixels],Image diagonal [pixels]\n"
    )
    rows = "".join(f'{i},t.jpg,s{i}.jpg,t.csv,s.csv,training,"(60, 80)",100.0\n' for i in "AB")
    (root / "pairs.csv").write_text(head + rows)
    return root / "pairs.csv"


def test_compare_valis_scores_driver_output_the_anhir_way(tmp_path: Path) -> None:
    """The driver's CSV (written by its own writer, NaN as an empty cell) scored with
    wsireg_flow.metrics: first min(N) rows, rTRE / target diagonal, NaN and a failed pair at the
    initial error, robustness strict."""
    from benchmarks_anhir.compare_valis import MethodResult, score_results, summarise
    from benchmarks_anhir.valis_driver import write_xy
    from wsireg_flow.landmarks import read_pair_table

    pairs = read_pair_table(_tiny_dataset(tmp_path / "d"))
    warped = tmp_path / "warped-source-nonrigid.csv"
    # TRE 0, 5 (= initial: not robust), NaN (unregistered), 10 (worse)
    write_xy(warped, np.array([[10, 10], [23, 14], [np.nan, np.nan], [46, 48]], dtype=float))
    assert warped.read_text().splitlines()[3] == "3,,"
    results = {"A": MethodResult(warped, 0.5), "B": MethodResult(None, None, "boom")}
    a, b = score_results(tmp_path / "d", pairs, results)
    assert (a.n_landmarks, a.n_unregistered, a.registered) == (4, 1, True)
    assert a.median_rtre == pytest.approx(0.05) and a.mean_rtre == pytest.approx(0.05)
    assert a.max_rtre == pytest.approx(0.10) and a.robustness == pytest.approx(0.25)
    assert (b.registered, b.median_rtre, b.robustness) == (False, pytest.approx(0.05), 0.0)
    summary = summarise(pairs, {"valis": [a, b]}, {"valis": results})
    agg = summary["aggregates"]["valis"]
    assert agg["AMrTRE"] == pytest.approx(0.05) and agg["AMxrTRE"] == pytest.approx(0.075)
    assert agg["average_robustness"] == pytest.approx(0.125) and agg["failed_pairs"] == 1
    assert agg["minutes_per_pair"] == pytest.approx(0.5)
    assert summary["pairs"][1]["valis"]["error"] == "boom"


FAKE_VALIS_PYTHON = """#!{python}
# Stands in for a VALIS environment's python: answers the version probe, and for the driver
# writes what the real driver would (a shift of (-3, -4): the source landmarks land exactly).
import json, sys
from dataclasses import replace
from pathlib import Path
if sys.argv[1] == "-c":
    print("1.2.0")
    raise SystemExit(0)
args = dict(zip(sys.argv[2::2], sys.argv[3::2]))
work = Path(args["--work"])
rows = Path(args["--source-landmarks"]).read_text().splitlines()[1:]
pts = [tuple(float(v) for v in r.split(",")[1:]) for r in rows]
(work / "warped-source-nonrigid.csv").write_text(
    ",X,Y\\n" + "".join(f"{{i}},{{x - 3}},{{y - 4}}\\n" for i, (x, y) in enumerate(pts, 1))
)
report = {{"seconds": {{"register": 30.0}}, "errors": {{}}}}
if "--micro" in sys.argv:
    report["errors"]["registration"] = "RuntimeError: micro failed"
(work / "driver.json").write_text(json.dumps(report))
raise SystemExit(2 if "--micro" in sys.argv else 0)
"""


def test_compare_valis_runs_the_driver_and_reads_a_finished_wsireg_run(tmp_path: Path) -> None:
    """End to end with a stand-in VALIS python: the shift check, then the driver's CSVs and
    timings scored beside a finished wsireg-flow run, the table printed and the JSON written."""
    from benchmarks_anhir.compare_valis import main
    from wsireg_flow.landmarks import read_pair_table, write_pair_table

    table = _tiny_dataset(tmp_path / "d")
    fake = tmp_path / "valis-python"
    fake.write_text(FAKE_VALIS_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    run = tmp_path / "wsireg-run"  # wsireg-flow: pair A off by 1 px in x, pair B failed
    run.mkdir()
    _points_csv(run / "A.csv", [(11.0, 10.0), (21.0, 10.0), (31.0, 30.0), (41.0, 40.0)])
    done = [replace(p, execution_time_minutes=0.1) for p in read_pair_table(table)]
    done[0] = replace(done[0], warped_source_landmarks="A.csv")
    write_pair_table(run / "registration-results.csv", done)
    out = tmp_path / "out"
    argv = ["--dataset", str(tmp_path / "d"), "--pairs", str(table), "--out", str(out)]
    cv2.imwrite(str(tmp_path / "d" / "t.jpg"), np.full((60, 80, 3), 200, np.uint8))
    argv += ["--valis-python", str(fake), "--micro", "--wsireg-run", str(run), "--shift", "3", "4"]
    assert main(argv) == 0
    doc = json.loads((out / "compare-valis.json").read_text())
    check = doc["shift_check"]  # the synthetic pair: the stand-in maps the (3, 4) shift back
    assert check["valis"] == {"median_tre_px": 0.0, "max_tre_px": 0.0}
    assert check["reversed_mapping_tre_px"] == pytest.approx(10.0)
    assert check["valis-micro"] == {"error": "RuntimeError: micro failed"}
    shifted = read_landmarks(out / "shift-check" / "inputs" / "source.csv")
    np.testing.assert_allclose(shifted, read_landmarks(tmp_path / "d" / "t.csv") + np.array([3, 4]))
    assert doc["methods"] == ["valis-rigid", "valis", "valis-micro", "wsireg-flow"]
    assert doc["valis_version"] == "1.2.0"
    aggs = doc["aggregates"]
    assert aggs["valis"]["AMrTRE"] == 0.0 and aggs["valis"]["average_robustness"] == 1.0
    assert aggs["valis"]["minutes_per_pair"] == pytest.approx(0.5)
    for failed in ("valis-rigid", "valis-micro"):  # no CSV written: unregistered, initial error
        assert aggs[failed]["failed_pairs"] == 2 and aggs[failed]["AMrTRE"] == pytest.approx(0.05)
    assert doc["pairs"][0]["valis-micro"]["error"] == "RuntimeError: micro failed"
    assert aggs["wsireg-flow"]["AMrTRE"] == pytest.approx((0.01 + 0.05) / 2)
    assert aggs["wsireg-flow"]["failed_pairs"] == 1


def _palom_grid(shifts_yx: list[tuple[float, float]]) -> PalomTransform:
    """A 2x2 palom block grid (rows 0-99 / 100-199, columns 0-149 / 150-299) over a 90 degree
    rotation plus translation, ``A (x, y) = (250 - y, x - 20)``, with one shift per block."""
    affine = np.array([[0.0, -1.0, 250.0], [1.0, 0.0, -20.0], [0.0, 0.0, 1.0]])
    mxs = []
    for dy, dx in shifts_yx:
        shift = np.eye(3)
        shift[:2, 2] = dx, dy  # palom.align.block_affine_matrices: T(x, y) @ A
        mxs.append(shift @ affine)
    return PalomTransform(affine, np.array(mxs), np.array([0, 100, 200]), np.array([0, 150, 300]))


def test_palom_block_transform_maps_landmarks_through_the_right_block() -> None:
    tf = _palom_grid([(0.0, 0.0), (2.0, -1.0), (0.5, 3.0), (-1.0, -1.0)])
    source = np.array([[30.0, 50.0], [150.0, 60.0], [45.0, 190.0], [np.nan, np.nan]])
    # A p = (200, 10) in block (0, 1); (190, 130) in (1, 1); (60, 25) in (0, 0)
    warped = tf.source_to_target(source)
    np.testing.assert_allclose(warped[:3], [[199.0, 12.0], [189.0, 129.0], [60.0, 25.0]])
    assert np.isnan(warped[3]).all()  # a missing landmark stays missing (scored unregistered)
    # target -> source is what palom's warp samples: the exact inverse on these points
    np.testing.assert_allclose(tf.target_to_source(warped[:3]), source[:3], atol=1e-9)
    # the other direction is not the same map: using it would be the classic direction bug
    assert np.abs(tf.target_to_source(source[:3]) - warped[:3]).max() > 100


def test_palom_block_transform_resolves_gaps_and_overlaps_between_blocks() -> None:
    # blocks (0, 0) and (0, 1) pulled apart by 3 px each: A p at x = 148 has no consistent block
    gap = _palom_grid([(0.0, 3.0), (0.0, -3.0), (0.0, 0.0), (0.0, 0.0)])
    p = np.array([[50.0, 102.0]])  # A p = (148, 30)
    # block (0, 0) sends it to x = 151 (1.5 px past its edge at 149.5); block (0, 1) to 145
    # (4.5 px before its edge): the nearer piece wins
    np.testing.assert_allclose(gap.source_to_target(p), [[151.0, 30.0]])
    # pushed together instead, both pieces show it: the one nearer the coarse affine wins
    overlap = _palom_grid([(0.0, -1.0), (0.0, 4.0), (0.0, 0.0), (0.0, 0.0)])
    np.testing.assert_allclose(overlap.source_to_target(p), [[147.0, 30.0]])


def test_palom_transform_refuses_a_record_whose_matrices_do_not_fill_the_grid() -> None:
    rec = {
        "affine_matrix": np.eye(3).tolist(),
        "block_affine_matrices": [np.eye(3).tolist()] * 3,
        "block_edges_y": [0, 10, 20],
        "block_edges_x": [0, 10, 20],
    }
    with pytest.raises(ValueError, match="3 block matrices for a"):
        PalomTransform.from_record(rec)


@pytest.mark.skipif(importlib.util.find_spec("palom") is not None, reason="palom is installed")
@pytest.mark.parametrize("python", ["missing", "no-palom"])
def test_compare_palom_refuses_in_one_line_without_a_palom_python(
    tmp_path: Path, python: str
) -> None:
    exe = str(tmp_path / "nowhere" / "python") if python == "missing" else sys.executable
    r = _run_module(
        "benchmarks_anhir.compare_palom", "--palom-python", exe, "--out", str(tmp_path / "o")
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr[-2000:]
    reason = "does not exist" if python == "missing" else "cannot import palom"
    assert reason in lines[0]
    assert "python3 -m venv" in lines[0] and "pip install palom" in lines[0]
    assert not (tmp_path / "o").exists()  # refused before doing anything


def test_moved_affine_samples_the_source_further_along_the_move() -> None:
    from benchmarks_anhir.coarse_sensitivity import moved_affine

    a = np.array([[0.9, -0.2, 5.0], [0.1, 1.1, -3.0], [0.0, 0.0, 1.0]])
    x = np.array([40.0, 70.0, 1.0])
    np.testing.assert_allclose(moved_affine(a, 0.5, -2.0) @ x, a @ (x + np.array([0.5, -2.0, 0.0])))


def test_coarse_sensitivity_reruns_a_finished_pair_from_its_moved_affine(tmp_path: Path) -> None:
    """Moved by 0 px, the re-run reproduces the run's median rTRE exactly (so the spread the
    diagnostic reports comes from the move alone); moved by 3 px, the scores move."""
    from benchmarks_anhir.coarse_sensitivity import main
    from benchmarks_anhir.run import run_benchmark
    from wsireg_flow.config import Config

    dataset = ROOT / "data" / "anhir-sample"
    run = tmp_path / "run"
    run_benchmark(dataset, dataset / "dataset.csv", run, Config(), limit=1)
    coarse = (run / "pairs" / "0" / "coarse.json").read_text()
    base = json.loads((run / "pairs" / "0" / "metrics.json").read_text())["landmarks"]
    for shift in (0.0, 3.0):
        out = tmp_path / f"sensitivity-{shift:g}.json"
        assert (
            main([str(run), "--dataset", str(dataset), "--shift", str(shift), "--out", str(out)])
            == 0
        )
        doc = json.loads(out.read_text())
        (pair,) = doc["pairs"]
        assert pair["median_rtre"] == base["median_rtre"] and len(pair["moved_median_rtre"]) == 4
        if shift == 0:
            assert pair["moved_median_rtre"] == [base["median_rtre"]] * 4
            assert pair["spread"] == 0.0
        else:
            assert pair["spread"] > 0.0
        assert Path(doc["figure"]).read_bytes().startswith(b"\x89PNG")
    after = json.loads((run / "pairs" / "0" / "metrics.json").read_text())["landmarks"]
    assert after == base  # the run itself is not re-run or moved
    assert (run / "pairs" / "0" / "coarse.json").read_text() == coarse
