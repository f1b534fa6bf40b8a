"""Prefect flows on real ANHIR sections (lung-lesion_3): resumable pair runs, errors, stacks,
and the inbox.

Every test here runs flows against a temporary Prefect server (the ``prefect_env`` fixture of
``conftest.py``). Prefect and ``flows`` are imported inside the tests, after that fixture has
set the hermetic environment.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsireg_flow.config import Config
from wsireg_flow.errors import WsiregError
from wsireg_flow.io.slide import open_slide
from wsireg_flow.pipeline import PAIR_STAGES, PairJob
from wsireg_flow.stack import PAIR_STAGES_FOR_STACK, StackJob

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "data" / "anhir-sample" / "lung-lesion_3" / "scale-5pc"
TARGET = CASE / "29-041-Izd2-w35-CD31-3-les3.jpg"
SOURCE = CASE / "29-041-Izd2-w35-Cc10-5-les3.jpg"
TARGET_LM = TARGET.with_suffix(".csv")
SOURCE_LM = SOURCE.with_suffix(".csv")

pytestmark = pytest.mark.usefixtures("prefect_env")


def _job(out: Path, cfg: Config | None = None, target: Path = TARGET) -> PairJob:
    return PairJob(target, SOURCE, out, cfg or Config(), TARGET_LM, SOURCE_LM)


def _finished(run_dir: Path) -> dict[str, float]:
    """Stage name -> 'finished' timestamp of its completion marker."""
    return {
        m.stem: json.loads(m.read_text())["finished"]
        for m in sorted((run_dir / ".stages").glob("*.json"))
    }


def _ran(result: dict[str, bool]) -> set[str]:
    return {name for name, ran in result.items() if ran}


def _rewritten(before: dict[str, float], after: dict[str, float]) -> set[str]:
    return {name for name in after if after[name] != before.get(name)}


# -- a. resumable pair runs ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_runs(prefect_env: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run directory taken through: first run, identical re-run, two setting changes."""
    from flows.pair import register_pair

    out = tmp_path_factory.mktemp("flow-pair") / "run"
    rec: dict[str, Any] = {"dir": out}

    echoed: list[tuple[str, int, int]] = []
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    prefect_logger = logging.getLogger("prefect")
    prefect_logger.addHandler(handler)
    # INFO must reach the handler whatever the root level is (an in-process CLI call earlier in
    # the session leaves the root logger at WARNING, which run loggers would inherit)
    level = prefect_logger.level
    prefect_logger.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        rec["first"] = register_pair(_job(out), echo=lambda *a: echoed.append(a))
    finally:
        prefect_logger.removeHandler(handler)
        prefect_logger.setLevel(level)
    rec["first_seconds"] = time.perf_counter() - t0
    rec["first_echo"] = echoed
    rec["first_logs"] = [r.getMessage() for r in records]
    rec["markers_first"] = _finished(out)

    t0 = time.perf_counter()
    rec["second"] = register_pair(_job(out))
    rec["second_seconds"] = time.perf_counter() - t0
    rec["markers_second"] = _finished(out)

    cfg = Config()
    cfg.nonrigid.smooth_sigma = 3.0
    rec["sigma"] = register_pair(_job(out, cfg))
    rec["markers_sigma"] = _finished(out)

    cfg = Config()
    cfg.nonrigid.smooth_sigma = 3.0  # as in the previous run: only the ratio changes
    cfg.rigid.ratio = 0.75
    rec["ratio"] = register_pair(_job(out, cfg))
    rec["markers_ratio"] = _finished(out)
    print(
        f"\nregister_pair flow: first run {rec['first_seconds']:.2f} s, "
        f"identical re-run {rec['second_seconds']:.2f} s"
    )
    return rec


def test_first_run_runs_every_stage(pair_runs: dict[str, Any]) -> None:
    assert list(pair_runs["first"]) == list(PAIR_STAGES)
    assert _ran(pair_runs["first"]) == set(PAIR_STAGES)
    assert set(pair_runs["markers_first"]) == set(PAIR_STAGES)
    metrics = json.loads((pair_runs["dir"] / "metrics.json").read_text())
    lm = metrics["landmarks"]
    assert lm["n_landmarks"] == 80
    # measured 0.0047 with smooth_sigma 5 (0.0036 with 2); initial 0.077
    assert lm["median_rtre"] < 0.01 < lm["initial_median_rtre"]


def test_flow_logs_carry_the_progress_counts(pair_runs: dict[str, Any]) -> None:
    """Every stage total the CLI shows (tiles per level, chunks written) is in the flow log."""
    echoed, logs = pair_runs["first_echo"], pair_runs["first_logs"]
    finals = {(stage, total) for stage, done, total in echoed if done == total}
    print(f"\nfinal counts: {sorted(finals)}")
    assert any(stage.startswith("non-rigid level") and n >= 4 for stage, n in finals)
    assert any(stage.startswith("warp") for stage, _ in finals)
    for stage, total in finals:
        assert f"{stage}: {total}/{total}" in logs, (stage, total)
    assert "tiles ran on dask threads scheduler" in logs


def test_identical_rerun_runs_no_stage(pair_runs: dict[str, Any]) -> None:
    assert list(pair_runs["second"]) == list(PAIR_STAGES)
    assert sum(pair_runs["second"].values()) == 0
    assert pair_runs["markers_second"] == pair_runs["markers_first"]
    # measured 0.21 s against 6.3 s (the flow run itself is the remaining cost)
    assert pair_runs["second_seconds"] < pair_runs["first_seconds"] / 4


def test_smooth_sigma_reruns_nonrigid_and_downstream(pair_runs: dict[str, Any]) -> None:
    """smooth_sigma judges the tiles and stitches the coarser levels inside the non-rigid stage:
    re-using that stage's results would give another field than a fresh run."""
    expected = {"nonrigid", "stitch", "warp", "evaluate", "qc"}
    assert _ran(pair_runs["sigma"]) == expected
    assert _rewritten(pair_runs["markers_second"], pair_runs["markers_sigma"]) == expected


def test_rigid_ratio_reruns_coarse_and_downstream(pair_runs: dict[str, Any]) -> None:
    expected = {"coarse", "nonrigid", "stitch", "warp", "evaluate", "qc"}
    assert _ran(pair_runs["ratio"]) == expected
    assert _rewritten(pair_runs["markers_sigma"], pair_runs["markers_ratio"]) == expected
    job = json.loads((pair_runs["dir"] / "job.json").read_text())
    assert job["config"]["rigid"]["ratio"] == 0.75
    assert job["config"]["nonrigid"]["smooth_sigma"] == 3.0


def _cli(argv: list[str]) -> tuple[int, dict[str, Any], float]:
    from wsireg_flow.cli import main

    stdout = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    seconds = time.perf_counter() - t0
    return code, json.loads(stdout.getvalue().strip().splitlines()[-1]), seconds


def test_cli_second_identical_run_is_under_a_quarter_of_the_first(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [
        "register",
        str(TARGET),
        str(SOURCE),
        "--out",
        str(out),
        "--target-landmarks",
        str(TARGET_LM),
        "--source-landmarks",
        str(SOURCE_LM),
        "--quiet",
    ]
    code1, summary1, first = _cli(argv)
    markers = _finished(out)
    code2, summary2, second = _cli(argv)
    print(f"\nCLI register: first run {first:.2f} s, identical second run {second:.3f} s")
    assert (code1, code2) == (0, 0)
    assert summary1["stages_run"] == list(PAIR_STAGES)
    assert summary2["stages_run"] == []
    assert _finished(out) == markers
    assert summary2["median_rtre"] == summary1["median_rtre"]
    assert second < first / 4


# -- b. failures leave nothing behind -------------------------------------------------------------
def test_missing_target_raises_and_leaves_no_run_directory(tmp_path: Path) -> None:
    from flows.pair import register_pair

    out = tmp_path / "run"
    with pytest.raises(WsiregError, match="file not found"):
        register_pair(_job(out, target=tmp_path / "missing.jpg"))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unreadable_target_fails_in_its_stage_and_leaves_no_run_directory(tmp_path: Path) -> None:
    from flows.pair import register_pair

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg" * 100)
    out = tmp_path / "run"
    t0 = time.perf_counter()
    with pytest.raises(WsiregError, match=r"broken\.jpg: not a supported image"):
        register_pair(_job(out, target=broken))
    # a user error is not retried (the task retries twice, 1 s apart, on transient errors only)
    assert time.perf_counter() - t0 < 2.0
    assert not out.exists()


# -- c. stacks ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack_runs(prefect_env: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from flows.stack import register_stack

    sections = sorted(CASE.glob("*.jpg"), key=lambda p: p.name)
    landmarks = [p.with_suffix(".csv") for p in sections]
    out = tmp_path_factory.mktemp("flow-stack") / "stack"

    def job() -> StackJob:
        return StackJob(sections, out, Config(), reference=2, landmarks=landmarks)

    first = register_stack(job())
    second = register_stack(job())
    return {"job": job(), "first": first, "second": second}


def test_stack_sections_are_ordered_by_name_with_the_middle_reference(
    stack_runs: dict[str, Any],
) -> None:
    job: StackJob = stack_runs["job"]
    assert [p.name.split("-")[4] for p in job.sections] == ["CD31", "Cc10", "He", "proSPC"]
    assert job.ref == 2
    assert stack_runs["first"]["metrics"]["reference"] == 2


def test_stack_first_run_runs_everything_second_nothing(stack_runs: dict[str, Any]) -> None:
    first, second = stack_runs["first"]["ran"], stack_runs["second"]["ran"]
    # three neighbour pairs (0->1, 1->2, 3->2), one warp per section (4), the report
    assert len(first) == 3 * len(PAIR_STAGES_FOR_STACK) + 4 + 1
    assert all(first.values())
    assert set(second) == set(first)
    assert sum(second.values()) == 0
    assert stack_runs["second"]["metrics"] == stack_runs["first"]["metrics"]


def test_cli_rerun_of_a_finished_stack_does_nothing_before_prefect(
    stack_runs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished stack is recognised before any orchestration (it took 10 s to start Prefect
    for nothing): the CLI never calls the flow, and nothing is rewritten."""
    import flows.stack
    from wsireg_flow.cli import main

    job: StackJob = stack_runs["job"]
    metrics = job.run_dir / "metrics.json"
    before = metrics.stat().st_mtime_ns

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the stack flow was started")

    monkeypatch.setattr(flows.stack, "register_stack", refuse)
    argv = ["stack", *map(str, job.sections), "--out", str(job.run_dir), "--reference", "2"]
    argv += ["--landmarks", *map(str, job.landmarks or []), "--quiet"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    summary = json.loads(stdout.getvalue())
    assert summary["stages_run"] == 0
    assert summary["sections"] == stack_runs["first"]["metrics"]["sections"]
    assert metrics.stat().st_mtime_ns == before


def test_other_landmark_files_rerun_a_finished_stack_without_registering_again(
    stack_runs: dict[str, Any], tmp_path: Path
) -> None:
    """A stack given its landmark files under another path was refused as another job (every
    pair would have been registered again); without landmarks, the warped landmark files of
    the earlier run stayed beside the sections."""
    import shutil

    from flows.stack import register_stack

    job: StackJob = stack_runs["job"]
    run = tmp_path / "stack"
    shutil.copytree(job.run_dir, run)
    moved = []
    for lm in job.landmarks or []:
        moved.append(tmp_path / lm.name)
        shutil.copy(lm, moved[-1])
    again = register_stack(StackJob(job.sections, run, Config(), reference=2, landmarks=moved))
    ran = {k for k, v in again["ran"].items() if v}
    # no pair registered again: each pair re-scored, each section redone, the report rewritten
    assert ran == {
        *(f"{p}/evaluate" for p in ("00-onto-01", "01-onto-02", "03-onto-02")),
        *(k for k in again["ran"] if k.startswith("section-")),
        "report",
    }
    assert again["metrics"]["sections"] == stack_runs["first"]["metrics"]["sections"]
    assert len(list((run / "sections").glob("*-landmarks.csv"))) == 4
    bare = register_stack(StackJob(job.sections, run, Config(), reference=2, landmarks=None))
    assert not list((run / "sections").glob("*-landmarks.csv"))
    assert all("median_rtre" not in s for s in bare["metrics"]["sections"])


def test_stack_landmarks_move_toward_the_reference(stack_runs: dict[str, Any]) -> None:
    sections = stack_runs["first"]["metrics"]["sections"]
    assert len(sections) == 4
    for s in sections:
        print(
            f"\n{s['section']}: median rTRE to reference {s['initial_median_rtre']:.4f} -> "
            f"{s['median_rtre']:.4f}"
        )
        if s["is_reference"]:
            assert s["median_rtre"] == pytest.approx(0.0, abs=1e-9)
            continue
        assert s["median_rtre"] < s["initial_median_rtre"], s["section"]
        assert s["median_rtre"] < 0.02, s["section"]
    assert [s["is_reference"] for s in sections] == [False, False, True, False]
    # every section names its warped image and the pairs composed to reach the reference
    run_dir = stack_runs["job"].run_dir
    assert [len(s["chain"]) for s in sections] == [2, 1, 0, 1]
    for s in sections:
        assert (run_dir / s["warped"] / ".zattrs").is_file(), s["warped"]
        for c in s["chain"]:
            assert (run_dir / "pairs" / c["pair"]).is_dir()
            assert 0 < c["tiles_ok"] <= c["tiles"] and 0.2 <= c["mean_confidence"] <= 1.0, c


def test_stack_sections_share_the_reference_frame(stack_runs: dict[str, Any]) -> None:
    job: StackJob = stack_runs["job"]
    with open_slide(job.sections[job.ref]) as ref:
        ref_shape = tuple(int(v) for v in ref.shapes[0][:2])
    warped = sorted((job.run_dir / "sections").glob("*.zarr"))
    assert len(warped) == 4
    for path in warped:
        slide = open_slide(path)
        assert tuple(int(v) for v in slide.shapes[0][:2]) == ref_shape, path.name
        img = slide.read_region(0, 0, 0, *ref_shape)
        assert img.shape[:2] == ref_shape
        assert np.ptp(img) > 50, path.name  # holds tissue, not a blank canvas
    png = job.run_dir / "qc" / "stack.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stack_fingerprints_see_rewritten_reference_and_landmark_files(tmp_path: Path) -> None:
    """The reference section (no chain) and landmark files were fingerprinted by path only: a
    rewritten reference kept its old warped copy, edited landmarks their old metrics."""
    from wsireg_flow.stack import report_fingerprint

    sections = [tmp_path / f"s{i}.tif" for i in range(3)]
    landmarks = [tmp_path / f"s{i}.csv" for i in range(3)]
    for p in sections + landmarks:
        p.write_bytes(b"a")

    def fingerprints() -> tuple[list[str], str]:
        job = StackJob(sections, tmp_path / "run", Config(), None, landmarks)
        return [job.section_fingerprint(k) for k in range(3)], report_fingerprint(job)

    before, report = fingerprints()
    ref = StackJob(sections, tmp_path / "run", Config(), None, landmarks).ref
    sections[ref].write_bytes(b"rewritten")
    after, report2 = fingerprints()
    assert all(a != b for a, b in zip(before, after, strict=True))  # every chain starts there
    assert report2 != report
    landmarks[0].write_bytes(b"edited")
    edited, report3 = fingerprints()
    assert [a != b for a, b in zip(after, edited, strict=True)] == [True, False, False]
    assert report3 != report2


# -- d. the inbox ---------------------------------------------------------------------------------
def test_process_inbox_files_good_and_bad_manifests(tmp_path: Path) -> None:
    from flows.inbox import process_inbox

    root = tmp_path / "data"
    (root / "case").mkdir(parents=True)
    for p in (TARGET, SOURCE, TARGET_LM, SOURCE_LM):
        shutil.copy2(p, root / "case" / p.name)
    box = tmp_path / "inbox"
    box.mkdir()
    pair = (
        "kind: pair\n"
        f"target: case/{TARGET.name}\n"
        f"source: case/{SOURCE.name}\n"
        f"target_landmarks: case/{TARGET_LM.name}\n"
        f"source_landmarks: case/{SOURCE_LM.name}\n"
    )
    (box / "good.yaml").write_text(pair + "config:\n  nonrigid: {smooth_sigma: 3.0}\n")
    (box / "escape.yaml").write_text(pair.replace(f"target: case/{TARGET.name}", "target: ../x"))
    (box / "unknown.yaml").write_text(pair + "colour: red\n")
    runs = tmp_path / "runs"

    summary = process_inbox(str(box), data_root=str(root), runs=str(runs), settle=0)

    assert summary == {
        "done": ["good.yaml"],
        "failed": ["escape.yaml", "unknown.yaml"],
        "waiting": [],
    }
    assert list((box / "processing").iterdir()) == []
    assert sorted(p.name for p in box.glob("*.yaml")) == []

    done = box / "done"
    assert (done / "good.yaml").is_file()
    result = json.loads((done / "good.result.json").read_text())
    assert result["kind"] == "pair"
    assert Path(result["out"]) == runs / "good"
    assert result["stages_run"] == list(PAIR_STAGES)
    assert result["landmarks"]["median_rtre"] < result["landmarks"]["initial_median_rtre"]
    job = json.loads((runs / "good" / "job.json").read_text())
    assert job["config"]["nonrigid"]["smooth_sigma"] == 3.0
    assert Path(job["target"]) == root / "case" / TARGET.name

    failed = box / "failed"
    for name, words in (("escape", ["../x"]), ("unknown", ["colour"])):
        assert (failed / f"{name}.yaml").is_file()
        reason = (failed / f"{name}.reason.txt").read_text()
        assert reason.endswith("\n") and reason.count("\n") == 1, reason
        for word in words:
            assert word in reason, reason
        assert reason.startswith("InputError: "), reason
        assert not (runs / name).exists()


def test_serve_without_a_prefect_server_is_refused_with_one_line(tmp_path: Path) -> None:
    """Prefect cannot schedule runs on the temporary server it starts without PREFECT_API_URL:
    ``serve`` used to wait there forever, running nothing."""
    import os
    import subprocess
    import sys

    (tmp_path / "inbox").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile naming a server either
    cmd = [sys.executable, "-m", "wsireg_flow.cli", "serve", "--inbox", str(tmp_path / "inbox")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "wsireg-flow: error: PREFECT_API_URL: not set: serving on a schedule needs a Prefect "
        "server (prefect server start --host 127.0.0.1, then "
        "PREFECT_API_URL=http://127.0.0.1:4200/api), or run `wsireg-flow serve --once` from cron"
    ]
    assert res.stdout == ""
    assert sorted(p.name for p in (tmp_path / "inbox").iterdir()) == []
