"""The inbox runner (``flows/inbox.py``, ``wsireg-flow serve``) on real ANHIR sections.

Flows run against a temporary Prefect server (the ``prefect_env`` fixture of ``conftest.py``);
Prefect and ``flows`` are imported inside the tests, after that fixture has set the hermetic
environment. Inputs and manifests are aged by an hour (``_age``) unless a test is about files
still being written.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from wsireg_flow.config import load_config
from wsireg_flow.errors import WsiregError
from wsireg_flow.manifest import load_manifest, manifest_config, resolve, unsettled
from wsireg_flow.pipeline import PAIR_STAGES, PairJob, prepare_run_dir, run_pair_stage

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "data" / "anhir-sample" / "lung-lesion_3" / "scale-5pc"
TARGET = CASE / "29-041-Izd2-w35-CD31-3-les3.jpg"
SOURCE = CASE / "29-041-Izd2-w35-Cc10-5-les3.jpg"
TARGET_LM = TARGET.with_suffix(".csv")
SOURCE_LM = SOURCE.with_suffix(".csv")

PAIR = (
    "kind: pair\n"
    f"target: case/{TARGET.name}\n"
    f"source: case/{SOURCE.name}\n"
    f"target_landmarks: case/{TARGET_LM.name}\n"
    f"source_landmarks: case/{SOURCE_LM.name}\n"
)

pytestmark = pytest.mark.usefixtures("prefect_env")


def _age(*paths: Path, seconds: float = 3600.0) -> None:
    """Set the modification time of ``paths`` (and of everything under a folder) to the past."""
    when = time.time() - seconds
    for p in paths:
        for q in [p, *p.rglob("*")] if p.is_dir() else [p]:
            os.utime(q, (when, when))


def _setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A data root holding the pair (aged), an empty inbox and the runs folder."""
    root = tmp_path / "data"
    (root / "case").mkdir(parents=True)
    for p in (TARGET, SOURCE, TARGET_LM, SOURCE_LM):
        shutil.copy2(p, root / "case" / p.name)
    _age(root)
    box = tmp_path / "inbox"
    box.mkdir()
    return root, box, tmp_path / "runs"


def _drop(box: Path, name: str, text: str, age: bool = True) -> Path:
    p = box / name
    p.write_text(text)
    if age:
        _age(p)
    return p


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _hold_lock(lock: Path) -> subprocess.Popen[str]:
    """Another runner: a process holding the inbox lock until it is killed."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


# -- 1. one runner at a time; an interrupted job resumes ------------------------------------------
def test_inbox_lock_is_exclusive(tmp_path: Path) -> None:
    from flows.inbox import inbox_lock

    with inbox_lock(tmp_path) as first:
        with inbox_lock(tmp_path) as second:
            assert (first, second) == (True, False)
    with inbox_lock(tmp_path) as again:
        assert again


def test_busy_inbox_is_left_alone_and_a_killed_runners_job_resumes(tmp_path: Path) -> None:
    """A manifest left in processing/ by a killed runner used to stay there forever."""
    from flows.inbox import LOCK_NAME, process_inbox

    root, box, runs = _setup(tmp_path)
    # what a runner killed during the preprocess stage leaves: the manifest in processing/, a
    # run directory with both ingest stages complete
    (box / "processing").mkdir()
    manifest = _drop(box / "processing", "job.yaml", PAIR)
    m = load_manifest(manifest)
    job = PairJob(
        resolve(root, m.target),  # type: ignore[arg-type]
        resolve(root, m.source),  # type: ignore[arg-type]
        runs / "job",
        manifest_config(m, load_config(None), manifest),
        resolve(root, m.target_landmarks),
        resolve(root, m.source_landmarks),
    )
    prepare_run_dir(job)
    assert run_pair_stage(job, "ingest_target") and run_pair_stage(job, "ingest_source")
    before = _names(runs / "job" / ".stages")

    holder = _hold_lock(box / LOCK_NAME)  # a live runner
    try:
        code, summary, err = _serve_once(box, root, "--runs", str(runs))
        assert (code, summary) == (0, {"done": [], "failed": [], "waiting": []})
        # said on stderr, not only in Prefect's log: nothing else would tell an empty inbox
        assert err.strip() == (
            f"wsireg-flow: warning: inbox {box} is busy: another runner holds {box / LOCK_NAME}"
        )
        assert _names(box / "processing") == ["job.yaml"]
        assert _names(runs / "job" / ".stages") == before
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock
        holder.wait()

    summary = process_inbox(str(box), data_root=str(root), runs=str(runs))

    assert summary == {"done": ["job.yaml"], "failed": [], "waiting": []}
    assert _names(box / "processing") == []
    assert (box / "done" / "job.yaml").is_file()
    result = json.loads((box / "done" / "job.result.json").read_text())
    assert result["stages_run"] == list(PAIR_STAGES[2:])  # the ingest stages were kept
    assert result["landmarks"]["median_rtre"] < result["landmarks"]["initial_median_rtre"]


@pytest.mark.parametrize("how", ["kill", "service-term"])
def test_serve_once_killed_mid_job_resumes_on_the_next_run(tmp_path: Path, how: str) -> None:
    """``kill -9`` of ``serve --once`` during a job, or a SIGTERM to all its processes (a
    systemd timer's service stopped, its temporary Prefect server included): the job stays in
    processing/, not in failed/, and the next run finishes it."""
    from prefect.settings import get_current_settings

    from flows.inbox import process_inbox
    from wsireg_flow.watchdog import descendants, remember, signal_alive

    root, box, runs = _setup(tmp_path)
    _drop(box, "job.yaml", PAIR)
    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url)}
    if how == "service-term":  # the command starts its own temporary server
        del env["PREFECT_API_URL"]
    cmd = [sys.executable, "-m", "wsireg_flow.cli", "serve", "--once", "--inbox", str(box)]
    cmd += ["--data-root", str(root), "--runs", str(runs)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        marker = runs / "job" / ".stages" / "ingest_source.json"
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists() and proc.poll() is None, "the job did not get under way"
        if how == "service-term":
            children = remember({}, descendants(proc.pid))
            os.killpg(proc.pid, signal.SIGTERM)
            signal_alive(children, signal.SIGTERM)
            assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _names(box / "failed") == []
    assert _names(box / "processing") == ["job.yaml"]
    kept = {p.stem for p in (runs / "job" / ".stages").glob("*.json")}

    summary = process_inbox(str(box), data_root=str(root), runs=str(runs))

    assert summary == {"done": ["job.yaml"], "failed": [], "waiting": []}
    assert _names(box / "processing") == []
    result = json.loads((box / "done" / "job.result.json").read_text())
    assert result["stages_run"] == [s for s in PAIR_STAGES if s not in kept]
    assert {"ingest_target", "ingest_source"} <= kept


def test_a_stranded_manifest_dropped_again_runs_once(tmp_path: Path) -> None:
    """The copy dropped since the interruption wins; the stranded one is not run as well."""
    from flows.inbox import process_inbox

    root, box, runs = _setup(tmp_path)
    (box / "processing").mkdir()
    _drop(box / "processing", "job.yaml", PAIR.replace(f"case/{SOURCE.name}", "case/gone.jpg"))
    _drop(box, "job.yaml", PAIR.replace(f"case/{TARGET.name}", "case/missing.jpg"))

    summary = process_inbox(str(box), data_root=str(root), runs=str(runs))

    assert summary == {"done": [], "failed": ["job.yaml"], "waiting": []}
    assert _names(box / "processing") == []
    assert "missing.jpg" in (box / "failed" / "job.reason.txt").read_text()


# -- 2. files still being written wait ------------------------------------------------------------
def test_unsettled_names_the_young_files(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "sections" / "s2.zarr" / "0").mkdir(parents=True)
    (root / "sections" / "s1.jpg").write_bytes(b"x")
    chunk = root / "sections" / "s2.zarr" / "0" / "0.0"
    chunk.write_bytes(b"x")
    _age(root)
    manifest = tmp_path / "job.yaml"
    manifest.write_text("kind: stack\nfolder: sections\n")
    now = time.time()

    assert unsettled(manifest, root, 30.0, now) == [manifest]
    assert unsettled(manifest, root, 0.0, now) == []
    _age(manifest)
    assert unsettled(manifest, root, 30.0, now) == []
    os.utime(chunk, (now - 5, now - 5))  # a chunk deep in a section is still being written
    assert unsettled(manifest, root, 30.0, now) == [root / "sections"]
    assert unsettled(manifest, root, 5.0, now) == []


def test_files_still_being_copied_wait_for_a_later_run(tmp_path: Path) -> None:
    """A slide still being copied failed as truncated; a half-written manifest as not found."""
    from flows.inbox import process_inbox

    root, box, runs = _setup(tmp_path)
    source = root / "case" / SOURCE.name
    os.utime(source)  # being copied: modified just now
    (root / "sections").mkdir()
    for name in ("s1.jpg", "s2.jpg"):
        shutil.copy2(SOURCE, root / "sections" / name)
    os.utime(root / "sections" / "s2.jpg")
    _drop(box, "copying.yaml", PAIR)
    _drop(box, "half.yaml", "kind: pair\ntarget: [case/29-041", age=False)  # not yet parseable
    _drop(box, "stack.yaml", "kind: stack\nfolder: sections\n")
    gone = PAIR.replace(f"case/{SOURCE.name}", f"case/{TARGET.name}")  # not the young source
    _drop(box, "gone.yaml", gone.replace(f"target: case/{TARGET.name}", "target: case/never.jpg"))

    summary = process_inbox(str(box), data_root=str(root), runs=str(runs), settle=30.0)

    assert summary == {
        "done": [],
        "failed": ["gone.yaml"],  # a missing input once the manifest has settled
        "waiting": ["copying.yaml", "half.yaml", "stack.yaml"],
    }
    waiting = ["copying.yaml", "half.yaml", "stack.yaml"]
    assert _names(box) == sorted([".inbox.lock", "done", "failed", "processing", *waiting])
    assert "never.jpg: file not found" in (box / "failed" / "gone.reason.txt").read_text()
    assert not runs.exists() or _names(runs) == []

    _age(source, box / "half.yaml")  # the copy finished; the manifest was left half-written
    summary = process_inbox(str(box), data_root=str(root), runs=str(runs), settle=30.0)

    assert summary == {"done": ["copying.yaml"], "failed": ["half.yaml"], "waiting": ["stack.yaml"]}
    assert (
        (box / "failed" / "half.reason.txt")
        .read_text()
        .startswith("InputError: half.yaml: not a readable YAML manifest")
    )
    result = json.loads((box / "done" / "copying.result.json").read_text())
    assert result["stages_run"] == list(PAIR_STAGES)
    assert (box / "stack.yaml").is_file()


# -- 3. a manifest dropped again with another job replaces the earlier run ------------------------
def test_a_changed_manifest_replaces_its_earlier_run(tmp_path: Path) -> None:
    """It used to fail: "run directory exists and holds other results (use --overwrite ...)"."""
    from flows.inbox import process_inbox

    root, box, runs = _setup(tmp_path)
    swapped = (
        "kind: pair\n"
        f"target: case/{SOURCE.name}\n"
        f"source: case/{TARGET.name}\n"
        f"target_landmarks: case/{SOURCE_LM.name}\n"
        f"source_landmarks: case/{TARGET_LM.name}\n"
    )

    records: list[logging.LogRecord] = []

    def run() -> dict[str, list[str]]:
        """Process the inbox; the warnings it logs go to ``records``."""
        records.clear()
        handler = logging.Handler(logging.WARNING)
        handler.emit = records.append  # type: ignore[method-assign]
        logging.getLogger("prefect").addHandler(handler)
        try:
            return process_inbox(str(box), data_root=str(root), runs=str(runs))
        finally:
            logging.getLogger("prefect").removeHandler(handler)

    def result(name: str) -> dict[str, Any]:
        return json.loads((box / "done" / f"{name}.result.json").read_text())

    def replacing() -> list[str]:
        return [r.getMessage() for r in records if "replacing" in r.getMessage()]

    _drop(box, "job.yaml", PAIR)
    assert run()["done"] == ["job.yaml"]
    assert result("job")["replaced"] is False

    first_job = (runs / "job" / "job.json").read_text()
    _drop(box, "job.yaml", PAIR.replace(f"case/{TARGET.name}", "case/typo.jpg"))
    assert run()["failed"] == ["job.yaml"]  # another job that cannot run: the run is kept
    assert (runs / "job" / "job.json").read_text() == first_job
    assert replacing() == []

    _drop(box, "job.yml", swapped)  # corrected: the other way round, and as .yml
    summary = run()

    assert summary == {"done": ["job.yml"], "failed": [], "waiting": []}
    assert _names(box / "done") == ["job.result.json", "job.yml"]  # one record per run
    assert result("job")["replaced"] is True
    assert result("job")["stages_run"] == list(PAIR_STAGES)
    assert json.loads((runs / "job" / "job.json").read_text())["target"] == str(
        root / "case" / SOURCE.name
    )
    assert len(replacing()) == 1 and replacing()[0].startswith("job job.yml: "), replacing()

    _drop(box, "job.yaml", swapped)  # the same job again: nothing to do
    assert run()["done"] == ["job.yaml"]
    assert result("job")["replaced"] is False
    assert result("job")["stages_run"] == []
    assert replacing() == []


# -- 4. success after a failure removes the failure files -----------------------------------------
def test_success_after_a_failure_removes_the_failure_files(tmp_path: Path) -> None:
    """failed/NAME.yaml, .reason.txt and .traceback.txt used to stay next to done/NAME.yaml."""
    from flows.inbox import process_inbox

    root, box, runs = _setup(tmp_path)
    # an upper-case suffix (as Windows tools write it) is a manifest; hidden files and other
    # names are not (a "*.y*ml" pattern took notes.y.html and missed JOB.YAML)
    _drop(box, "job.YAML", PAIR.replace(f"case/{TARGET.name}", "case/typo.jpg"))
    _drop(box, ".job.yaml", PAIR)
    _drop(box, "notes.y.html", "<p>not a manifest</p>")
    summary = process_inbox(str(box), data_root=str(root), runs=str(runs))
    assert summary["failed"] == ["job.YAML"]
    assert _names(box / "failed") == ["job.YAML", "job.reason.txt", "job.traceback.txt"]

    _drop(box, "job.yml", PAIR)  # corrected (under the other extension)
    summary = process_inbox(str(box), data_root=str(root), runs=str(runs))

    assert summary == {"done": ["job.yml"], "failed": [], "waiting": []}
    assert _names(box / "failed") == []
    assert _names(box / "done") == ["job.result.json", "job.yml"]
    assert {".job.yaml", "notes.y.html"} <= set(_names(box))


def test_a_users_folder_in_the_runs_folder_is_left_as_it_was(tmp_path: Path) -> None:
    """A job whose run folder was a user's folder failed (right), but left ``.wsireg.lock``
    in it: the lock was taken before the folder was checked."""
    from flows.inbox import process_inbox

    root, box, runs = _setup(tmp_path)
    for name, manifest in (("pair", PAIR), ("stack", "kind: stack\nfolder: case\n")):
        mine = runs / name
        mine.mkdir(parents=True)
        (mine / "notes.txt").write_text("important\n")
        _drop(box, f"{name}.yaml", manifest)
        summary = process_inbox(str(box), data_root=str(root), runs=str(runs))
        assert summary["failed"] == [f"{name}.yaml"], summary
        reason = (box / "failed" / f"{name}.reason.txt").read_text()
        assert f"{mine}: holds notes.txt, which no " in reason, reason
        assert _names(mine) == ["notes.txt"]


def test_a_stack_is_not_written_into_its_folder_of_sections(tmp_path: Path) -> None:
    """With the runs folder inside a stack's folder of sections, the run was written there;
    the next stack of that folder took the run for a section and failed."""
    from flows.inbox import process_inbox

    root, box, _ = _setup(tmp_path)
    runs = root / "case" / "runs"
    _drop(box, "stack.yaml", "kind: stack\nfolder: case\n")
    summary = process_inbox(str(box), data_root=str(root), runs=str(runs))
    assert summary["failed"] == ["stack.yaml"], summary
    reason = (box / "failed" / "stack.reason.txt").read_text()
    assert f"{runs / 'stack'}: is inside the input {root / 'case'}" in reason, reason
    assert not (runs / "stack").exists()


# -- 5. `serve --once` exit status ----------------------------------------------------------------
def _serve_once(box: Path, root: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    from wsireg_flow.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["serve", "--once", "--inbox", str(box), "--data-root", str(root), *extra]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([*argv, "--quiet"])
    lines = stdout.getvalue().strip().splitlines()
    return code, json.loads(lines[-1]) if lines else {}, stderr.getvalue()


def test_serve_once_exits_1_when_a_manifest_failed(tmp_path: Path) -> None:
    """It exited 0 whatever happened: cron could not alert."""
    root, box, _ = _setup(tmp_path)
    _drop(box, "bad.yaml", PAIR.replace(f"case/{TARGET.name}", "case/typo.jpg"))
    _drop(box, "young.yaml", PAIR.replace(f"case/{TARGET.name}", "case/later.jpg"), age=False)

    code, summary, err = _serve_once(box, root)
    assert code == 1
    assert summary == {"done": [], "failed": ["bad.yaml"], "waiting": ["young.yaml"]}
    reason = (box / "failed" / "bad.reason.txt").read_text().strip().split(": ", 1)[1]
    assert err.strip().splitlines() == [
        f"wsireg-flow: error: job bad.yaml: failed: {reason}",
        f"wsireg-flow: 1 manifest(s) failed: see {box / 'failed'}",
    ]

    code, summary, _ = _serve_once(box, root)  # only a manifest waiting: not a failure
    assert (code, summary) == (0, {"done": [], "failed": [], "waiting": ["young.yaml"]})

    code, summary, _ = _serve_once(box, root, "--settle", "0")  # taken at once: fails
    assert (code, summary) == (1, {"done": [], "failed": ["young.yaml"], "waiting": []})

    code, summary, err = _serve_once(box, root, "--settle", "-1")
    assert (code, summary) == (2, {})
    assert err.strip() == "wsireg-flow: error: --settle: must be a number of seconds >= 0, got -1"


# -- 6. a bad --cron is refused before serving ----------------------------------------------------
def test_serve_checks_its_data_root_and_runs_folder_before_the_inbox(tmp_path: Path) -> None:
    """A mistyped --data-root failed every waiting manifest ("file not found" each), and a
    --runs that is a file failed them with a bare "[Errno 20] Not a directory"."""
    root, box, _ = _setup(tmp_path)
    _drop(box, "job.yaml", PAIR)
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    typo = tmp_path / "typo"
    for extra, path, problem in (
        (["--data-root", str(typo)], typo, "--data-root folder not found"),
        (["--data-root", str(afile)], afile, "is a file, not a folder"),
        (["--runs", str(afile)], afile, "exists and is not a directory"),
        (["--runs", str(afile / "runs")], afile / "runs", "not a directory"),
    ):
        code, summary, err = _serve_once(box, root, *extra)
        assert (code, summary) == (2, {}), err
        (line,) = err.strip().splitlines()
        assert line.startswith(f"wsireg-flow: error: {path}: ") and problem in line, line
        assert _names(box) == ["job.yaml"]  # the inbox untouched


def test_check_cron_uses_prefects_rules() -> None:
    from flows.inbox import check_cron

    for good in ("*/10 * * * *", "0 3 * * 1-5", "@hourly"):
        check_cron(good)
    for bad in ("bogus", "61 * * * *", "H * * * *", ""):
        with pytest.raises(WsiregError, match=r"^--cron: invalid cron string"):
            check_cron(bad)


def test_serve_with_a_file_as_inbox_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "inbox folder not found" of a file that was there."""
    from wsireg_flow.cli import main

    afile = tmp_path / "inbox.yaml"
    afile.write_text("kind: pair\n")
    assert main(["serve", "--inbox", str(afile), "--once"]) == 2
    assert capsys.readouterr().err == f"wsireg-flow: error: {afile}: is a file, not a folder\n"


def test_serve_with_a_bad_cron_is_refused_with_one_line(tmp_path: Path) -> None:
    """It printed "serving inbox ... on schedule 'bogus'", then died on a ValidationError."""
    (tmp_path / "inbox").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"  # a server is named (none needs to run)
    cmd = [sys.executable, "-m", "wsireg_flow.cli", "serve", "--inbox", str(tmp_path / "inbox")]
    res = subprocess.run(
        [*cmd, "--cron", "bogus"], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        'wsireg-flow: error: --cron: invalid cron string: "bogus" (cron syntax has five fields: '
        'minute hour day-of-month month day-of-week, e.g. "*/10 * * * *")'
    ]
    assert res.stdout == ""
    assert _names(tmp_path / "inbox") == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("kind: pair\ntarget: a.jpg\nsource: b.jpg\nlandmarks: [a.csv, b.csv]\n", "'landmarks'"),
        ("kind: pair\ntarget: a.jpg\nsource: b.jpg\nreference: 1\n", "'reference'"),
        ("kind: stack\nfolder: case\ntarget_landmarks: a.csv\n", "'target_landmarks'"),
        ("kind: stack\nfolder: case\nsections: [a.jpg, b.jpg]\n", "not both"),
        # a key given twice: YAML kept the last one without a word (the other slide ran)
        ("kind: pair\ntarget: a.jpg\nsource: b.jpg\ntarget: c.jpg\n", "'target' is given twice"),
    ],
)
def test_keys_of_the_other_manifest_kind_are_refused(
    tmp_path: Path, text: str, problem: str
) -> None:
    """A pair manifest with stack keys (or the reverse) went to done/ with those keys ignored:
    `landmarks` on a pair gave no scoring, without a word."""
    from wsireg_flow.errors import InputError
    from wsireg_flow.manifest import load_manifest

    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as exc:
        load_manifest(path)
    assert problem in str(exc.value) and "\n" not in str(exc.value)
    assert str(exc.value).startswith(str(path))


def test_a_failed_job_keeps_its_warnings(tmp_path: Path, monkeypatch: Any) -> None:
    """The library's warnings were collected for the job's result and read only after the job
    returned: a job that warned and then failed lost them (neither logged nor filed). They are
    now logged with the job's name before its failure."""
    import flows.inbox as inbox
    from flows.inbox import process_inbox, warnings_to
    from wsireg_flow.errors import InputError

    def warn_then_fail(job, out, replace):
        logging.getLogger("wsireg_flow.landmarks").warning("a landmark file is short")
        raise InputError("no tissue found in the source image", job.source)

    monkeypatch.setattr(inbox, "_run_job", warn_then_fail)
    root, box, runs = _setup(tmp_path)
    _drop(box, "job.yaml", PAIR)
    stderr = io.StringIO()
    with warnings_to(stderr):
        summary = process_inbox(str(box), data_root=str(root), runs=str(runs))
    assert summary == {"done": [], "failed": ["job.yaml"], "waiting": []}
    assert "wsireg-flow: warning: job job.yaml: a landmark file is short" in (
        stderr.getvalue().splitlines()
    )
    reason = (box / "failed" / "job.reason.txt").read_text()
    assert reason.startswith("InputError: ") and "no tissue found" in reason


def test_a_job_worth_a_look_is_done_with_its_warnings(tmp_path: Path) -> None:
    """`register` warned of a source at 0.3x the target's resolution; the same job dropped in
    the inbox went to done/ without a word. Its result now lists the warnings, and the flow
    logs them (`serve --once` prints them on stderr)."""
    import cv2

    from flows.inbox import process_inbox, warnings_to
    from wsireg_flow.landmarks import read_landmarks, write_landmarks

    root, box, runs = _setup(tmp_path)
    small = cv2.resize(cv2.imread(str(SOURCE)), None, fx=0.3, fy=0.3, interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(root / "case" / "small.png"), small)
    # a landmark file shorter than the other: the library's warning was printed on its own,
    # not listed in the result (the library's warnings now belong to the job)
    write_landmarks(root / "case" / "short.csv", read_landmarks(SOURCE_LM)[:70] * 0.3)
    _age(root)
    text = (
        f"kind: pair\ntarget: case/{TARGET.name}\nsource: case/small.png\n"
        f"target_landmarks: case/{TARGET_LM.name}\nsource_landmarks: case/short.csv\n"
    )
    _drop(box, "job.yaml", text)
    stderr = io.StringIO()
    with warnings_to(stderr):  # as `serve --once` runs it
        summary = process_inbox(str(box), data_root=str(root), runs=str(runs))
    assert summary == {"done": ["job.yaml"], "failed": [], "waiting": []}
    result = json.loads((box / "done" / "job.result.json").read_text())
    assert result["warnings"][0] == (
        f"{root / 'case' / TARGET_LM.name} has 80 landmarks, {root / 'case' / 'short.csv'} has "
        "70: rows 1-70 of each are paired (ANHIR convention)"
    )
    assert result["warnings"][1].startswith("the tissue areas imply a scale of 0.29,")
    assert stderr.getvalue().splitlines() == [
        f"wsireg-flow: warning: job job.yaml: {w}" for w in result["warnings"]
    ]
