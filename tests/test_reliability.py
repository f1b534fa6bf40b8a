"""Reliability and safety: bad inputs, faults, untouched inputs, failed-registration reports,
untrusted inputs.

Most checks run the ``wsireg-flow`` command line as users do: one child process per case, all
started at once by the module fixture :func:`batch` (each child mostly waits on interpreter and
Prefect start-up, so running them together keeps the module short). The children use a
temporary ``PREFECT_HOME``, no telemetry, and the temporary Prefect server of the
``prefect_env`` fixture (``PREFECT_API_URL``), so no child starts a server of its own. Meanwhile
two pairs for the failed-registration checks run through the library in this process, and a
thread SIGKILLs one more child mid-run (resumed later by its test).

Library behaviour this module pins down (measured when it was written):

* a failing stage leaves the run directory with the markers of the stages that finished before
  it (so a re-run resumes), never a marker of the failing stage or a ``metrics.json``;
* NaN rows and out-of-image points in input landmark files are refused before any work;
* pair-table image paths that leave the dataset root are recorded as failed pairs (the path is
  never opened); so is a pair whose landmark path leaves it (recorded, not scored).

The bugs and gaps this battery found (wrong file named, NaN landmarks, physical size mismatch,
infinite config values) are fixed; their tests now pass as ordinary tests.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import tokenize
from pathlib import Path
from typing import Any

import cv2
import imagecodecs
import numpy as np
import pytest
import tifffile
import zarr
from dask_processes import dask_cluster, executed_tile_tasks, n_tiles

from wsireg_flow.config import DaskConfig, RigidConfig
from wsireg_flow.errors import InputError, RegistrationError
from wsireg_flow.field import load_field
from wsireg_flow.geometry import apply_affine
from wsireg_flow.io.slide import open_slide
from wsireg_flow.landmarks import read_landmarks
from wsireg_flow.pipeline import PAIR_STAGES
from wsireg_flow.tilestore import load_tiles
from wsireg_flow.transform import Transform

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
CASE = DATA / "anhir-sample" / "lung-lesion_3" / "scale-5pc"
TARGET = CASE / "29-041-Izd2-w35-CD31-3-les3.jpg"
SOURCE = CASE / "29-041-Izd2-w35-He-les3.jpg"
TARGET_LM = TARGET.with_suffix(".csv")
SOURCE_LM = SOURCE.with_suffix(".csv")
CMU = DATA / "wsi" / "CMU-1-Small-Region.svs"
CASE001_HE = DATA / "extra-unlabeled" / "flagship_case001" / "Case001_HE.jpg"
KIDNEY_HE = DATA / "anhir-sample" / "rat-kidney_" / "scale-5pc" / "Rat-Kidney_HE.jpg"
ERR = "wsireg-flow: error: "
N_LANDMARKS = 80
NAN_ROWS = list(range(3, N_LANDMARKS, 10))  # 8 source landmarks blanked (NaN)
OUTSIDE_ROWS = list(range(5, N_LANDMARKS, 10))  # 8 source landmarks moved far outside
OUTSIDE_XY = (1.0e6, -5.0e5)
FIRST_STAGES = ["ingest_target", "ingest_source", "preprocess", "coarse"]
LATER_STAGES = ["nonrigid", "stitch", "warp", "evaluate", "qc"]
TEMP_NAME = re.compile(r"\.tmp$|\.partial$|\.partial-|\.old-")


# -- helpers -------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hash_files(paths: list[Path]) -> dict[str, str]:
    return {str(p): _sha256(p) for p in paths}


def _regular_files(*roots: Path) -> list[Path]:
    """Every regular file under ``roots`` (FIFOs and directories left out)."""
    out = []
    for root in roots:
        items = [root] if root.is_file() else sorted(root.rglob("*"))
        out += [p for p in items if stat.S_ISREG(p.lstat().st_mode)]
    return out


def _markers(run_dir: Path) -> dict[str, float]:
    """Stage -> 'finished' time of its completion marker."""
    return {
        m.stem: json.loads(m.read_text())["finished"]
        for m in sorted((run_dir / ".stages").glob("*.json"))
    }


def _one_line(stderr: str) -> str:
    """The single line of ``stderr`` (asserts there is exactly one)."""
    assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    return stderr[:-1]


def _fifo_has_no_reader(fifo: Path) -> bool:
    """True when no process holds ``fifo`` open for reading (opening it would block)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        return exc.errno == errno.ENXIO
    os.close(fd)
    return False


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "wsireg_flow.cli", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # own process group: a SIGKILL reaches everything it started
    )


def _register(target: Path, source: Path, out: Path, *extra: object, lm: bool = True) -> list:
    landmarks = ["--target-landmarks", TARGET_LM, "--source-landmarks", SOURCE_LM] if lm else []
    return ["register", target, source, "--out", out, *landmarks, "--quiet", *extra]


def _reference_args(w: dict[str, Path], out: Path, *extra: object) -> list:
    """The reference pair: CD31 <- H&E with its landmarks."""
    return [
        *_register(TARGET, SOURCE, out, *extra, lm=False),
        "--target-landmarks",
        TARGET_LM,
        "--source-landmarks",
        SOURCE_LM,
    ]


def _write_landmarks_variant(path: Path, rows: list[int], cell: str) -> None:
    """SOURCE_LM with the X,Y cells of ``rows`` (0-based) replaced by ``cell``."""
    lines = SOURCE_LM.read_text().splitlines()
    for k in rows:
        index = lines[k + 1].split(",")[0]
        lines[k + 1] = f"{index},{cell}"
    path.write_text("\n".join(lines) + "\n")


def _png(path: Path, rgb: np.ndarray) -> Path:
    path.write_bytes(imagecodecs.png_encode(np.ascontiguousarray(rgb)))
    return path


def _half_blank_source(path: Path) -> Path:
    """Case001 H&E, left part warped by a known smooth deformation (<= 6 px), right part blank.

    Tiles over the blank part have target tissue but nothing to match: they must be rejected.
    """
    img = imagecodecs.imread(CASE001_HE)
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx = 6.0 * np.sin(2 * np.pi * yy / 400)
    dy = 6.0 * np.cos(2 * np.pi * xx / 400)
    src = cv2.remap(img, xx + dx, yy + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    src[:, w // 2 :] = 255
    return _png(path, src)


# -- the command-line batch ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_env(prefect_env: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of the CLI children: temporary PREFECT_HOME, no telemetry, shared server."""
    import prefect.settings

    url = prefect.settings.PREFECT_API_URL.value()
    assert url and url.startswith("http://127.0.0.1"), url
    return {
        **os.environ,
        "PREFECT_HOME": str(tmp_path_factory.mktemp("cli-prefect-home")),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": url,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every input file of the batch (bad images, landmark files, configs, tables, datasets)."""
    w: dict[str, Path] = {}
    inputs = tmp_path_factory.mktemp("inputs")
    runs = tmp_path_factory.mktemp("runs")
    w["inputs"], w["runs"] = inputs, runs

    # bad images
    w["missing"] = inputs / "nothere.svs"
    w["empty"] = inputs / "empty.svs"
    w["empty"].write_bytes(b"")
    w["truncated"] = inputs / "truncated.svs"
    w["truncated"].write_bytes(CMU.read_bytes()[:1_000_000])
    w["text"] = inputs / "notes.svs"
    w["text"].write_text("Aperio Image Library? No: a text file named .svs\n" * 20)
    w["blank"] = _png(inputs / "blank.png", np.full((600, 800, 3), 255, np.uint8))
    # the same tissue at 0.25 and 8 micrometres per pixel (a 32x physical size mismatch)
    for name, img, um in (
        ("fine", TARGET, 0.25),
        ("coarse", SOURCE, 8.0),
    ):
        w[f"phys_{name}"] = inputs / f"{name}-{um}um.tif"
        tifffile.imwrite(
            w[f"phys_{name}"],
            imagecodecs.imread(img),
            tile=(256, 256),
            photometric="rgb",
            resolution=(1e4 / um, 1e4 / um),
            resolutionunit="CENTIMETER",
        )
    w["half_blank"] = _half_blank_source(inputs / "case001-half-blank.png")

    # landmark files
    w["lm_columns"] = inputs / "lm-columns.csv"
    w["lm_columns"].write_text(",A,B\n1,63.0,309.0\n2,77.0,441.0\n")
    w["lm_nan"] = inputs / "lm-nan.csv"
    _write_landmarks_variant(w["lm_nan"], NAN_ROWS, ",")
    w["lm_outside"] = inputs / "lm-outside.csv"
    _write_landmarks_variant(w["lm_outside"], OUTSIDE_ROWS, f"{OUTSIDE_XY[0]},{OUTSIDE_XY[1]}")

    # configs
    w["owned"] = inputs / "OWNED-by-yaml"
    configs = {
        "typo": "nonrigid:\n  tiel: 256\n",
        "bad_value": "nonrigid:\n  tile: 100000\n",
        "python_tag": f"!!python/object/apply:os.system ['touch {w['owned']}']\n",
        "implausible": "rigid:\n  scale_min: 1.5\n  scale_max: 2.0\n",
        "half": "nonrigid:\n  levels: 1\n  tile: 256\n  overlap: 64\n",
        "stack": "nonrigid:\n  smooth_sigma: 4.0\n",
    }
    for name, text in configs.items():
        w[f"cfg_{name}"] = inputs / f"{name}.yaml"
        w[f"cfg_{name}"].write_text(text)

    # pair tables and an ANHIR dataset with FIFOs outside its root (opening one would block)
    w["table_columns"] = inputs / "pairs-missing-columns.csv"
    w["table_columns"].write_text(
        ",Target image,Source image\n0,case/a.jpg,case/b.jpg\n", encoding="utf-8"
    )
    ds = inputs / "dataset"
    (ds / "case").mkdir(parents=True)
    for p in (TARGET, SOURCE, TARGET_LM, SOURCE_LM):
        shutil.copy2(p, ds / "case" / p.name)
    outside = inputs / "outside"
    outside.mkdir()
    w["fifo_img"], w["fifo_lm"] = outside / "image.jpg", outside / "landmarks.csv"
    os.mkfifo(w["fifo_img"])
    os.mkfifo(w["fifo_lm"])
    w["dataset"], w["outside"] = ds, outside
    t, s = f"case/{TARGET.name}", f"case/{SOURCE.name}"
    tl, sl = f"case/{TARGET_LM.name}", f"case/{SOURCE_LM.name}"
    head = ",Target image,Source image,Target landmarks,Source landmarks,status,"
    head += "Image size [pixels],Image diagonal [pixels]\n"
    tail = 'training,"(660, 895)",1112.0\n'
    w["table_escape"] = inputs / "pairs-escaping-images.csv"
    w["table_escape"].write_text(
        head
        + f"0,{t},{s},{tl},{sl},{tail}"
        + f"1,{t},../outside/image.jpg,{tl},{sl},{tail}"
        + f"2,{t},{w['fifo_img']},{tl},{sl},{tail}"
    )
    w["table_lm_escape"] = inputs / "pairs-escaping-landmarks.csv"
    w["table_lm_escape"].write_text(
        head + f"0,{t},{s},case/../../outside/landmarks.csv,{sl},{tail}"
    )

    # run directories holding another job (one to refuse, one to --overwrite)
    for name in ("other_job", "other_job_overwrite"):
        d = runs / name
        (d / ".stages").mkdir(parents=True)
        (d / "job.json").write_text(
            json.dumps({"target": "/elsewhere/a.svs", "source": "/elsewhere/b.svs"})
        )
        (d / "metrics.json").write_text('{"note": "results of another job"}\n')
        (d / ".stages" / "qc.json").write_text('{"name": "qc"}\n')
        if name == "other_job":  # --overwrite refuses a run folder holding a user's file
            (d / "notes.txt").write_text("precious\n")
        w[name] = d

    # an existing ingest output
    from wsireg_flow.io.omezarr import ingest

    w["existing_zarr"] = runs / "existing.zarr"
    with open_slide(TARGET) as slide:
        ingest(slide, w["existing_zarr"], chunk=256, max_side=128)
    return w


def _cases(w: dict[str, Path]) -> dict[str, list]:
    r = w["runs"]
    return {
        # user errors (exit 2)
        "missing": _register(TARGET, w["missing"], r / "missing"),
        "empty": _register(TARGET, w["empty"], r / "empty"),
        "truncated": _register(TARGET, w["truncated"], r / "truncated"),
        "text_as_svs": _register(TARGET, w["text"], r / "text_as_svs"),
        "debug": _register(TARGET, SOURCE, r / "debug", "--config", w["cfg_typo"], "--debug"),
        "blank": _register(TARGET, w["blank"], r / "blank", lm=False),
        "landmark_columns": [
            *_register(TARGET, SOURCE, r / "landmark_columns", lm=False),
            "--target-landmarks",
            TARGET_LM,
            "--source-landmarks",
            w["lm_columns"],
        ],
        "config_typo": _register(TARGET, SOURCE, r / "config_typo", "--config", w["cfg_typo"]),
        "config_value": _register(
            TARGET, SOURCE, r / "config_value", "--config", w["cfg_bad_value"]
        ),
        "config_python_tag": _register(
            TARGET, SOURCE, r / "config_python_tag", "--config", w["cfg_python_tag"]
        ),
        "implausible_scale": _register(
            TARGET, SOURCE, r / "implausible_scale", "--config", w["cfg_implausible"]
        ),
        "pair_table_columns": [
            "anhir",
            "--dataset",
            w["dataset"],
            "--pairs",
            w["table_columns"],
            "--out",
            r / "pair_table_columns",
            "--quiet",
        ],
        "anhir_landmark_escape": [
            "anhir",
            "--dataset",
            w["dataset"],
            "--pairs",
            w["table_lm_escape"],
            "--out",
            r / "anhir_landmark_escape",
            "--quiet",
        ],
        "other_job": _register(TARGET, SOURCE, w["other_job"]),
        "ingest_existing": ["ingest", TARGET, "--out", w["existing_zarr"], "--quiet"],
        # runs that finish (or should)
        "reference": _reference_args(w, w["other_job_overwrite"], "--overwrite"),
        "landmarks_outside": [
            *_register(TARGET, SOURCE, r / "landmarks_outside", lm=False),
            "--target-landmarks",
            TARGET_LM,
            "--source-landmarks",
            w["lm_outside"],
        ],
        "landmarks_nan": [
            *_register(TARGET, SOURCE, r / "landmarks_nan", lm=False),
            "--target-landmarks",
            TARGET_LM,
            "--source-landmarks",
            w["lm_nan"],
        ],
        "physical_size": _register(w["phys_fine"], w["phys_coarse"], r / "physical_size", lm=False),
        "stack": [
            "stack",
            TARGET,
            SOURCE,
            "--out",
            r / "stack",
            "--landmarks",
            TARGET_LM,
            SOURCE_LM,
            "--config",
            w["cfg_stack"],
            "--quiet",
        ],
        "anhir_escape": [
            "anhir",
            "--dataset",
            w["dataset"],
            "--pairs",
            w["table_escape"],
            "--out",
            r / "anhir_escape",
            "--quiet",
        ],
    }


@pytest.fixture(scope="module")
def batch(cli_env: dict[str, str], world: dict[str, Path]) -> dict[str, Any]:
    """Run every CLI case at once; results by case name, plus input hashes before/after."""
    inputs = _regular_files(
        world["inputs"], TARGET, SOURCE, TARGET_LM, SOURCE_LM, CASE001_HE, KIDNEY_HE
    )
    assert len(inputs) >= 25
    other_job = _regular_files(world["other_job"])
    existing = _regular_files(world["existing_zarr"])
    before = {
        "inputs": _hash_files(inputs),
        "other_job": _hash_files(other_job),
        "existing": _hash_files(existing),
    }
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    # the run to be SIGKILLed (test 2a) goes first; a thread kills it mid non-rigid stage
    killed_dir = world["runs"] / "killed"
    victim = _cli(_reference_args(world, killed_dir), cli_env)
    kill: dict[str, Any] = {}
    killer = threading.Thread(target=_kill_after_coarse, args=(victim, killed_dir, kill))
    killer.start()
    procs = {name: _cli(args, cli_env) for name, args in _cases(world).items()}
    results: dict[str, Any] = {}
    try:
        # while the children run: two pairs through the library (point 4), in this process
        inproc = _library_runs(world)
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=600)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        killer.join(timeout=600)
    finally:
        for proc in [victim, *procs.values()]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    print(
        f"\n{len(procs) + 1} CLI runs at once (+2 library runs): "
        f"{time.perf_counter() - t0:.1f} s, {cpu:.0f} s CPU in the children"
    )
    after = {
        "inputs": _hash_files(inputs),
        "other_job": _hash_files(other_job),
        "existing": _hash_files(existing),
    }
    return {
        "results": results,
        "before": before,
        "after": after,
        "world": world,
        "killed": {"dir": killed_dir, **kill},
        "library": inproc,
    }


def _library_runs(w: dict[str, Path]) -> dict[str, dict[str, bool]]:
    """Unrelated tissue, and the half-blank pair, registered with ``run_pair`` (threads)."""
    from wsireg_flow.config import Config, load_config
    from wsireg_flow.pipeline import PairJob, run_pair

    jobs = {
        "unrelated": PairJob(CASE001_HE, KIDNEY_HE, w["runs"] / "unrelated", Config()),
        "half_blank": PairJob(
            CASE001_HE, w["half_blank"], w["runs"] / "half_blank", load_config(w["cfg_half"])
        ),
    }
    return {name: run_pair(job) for name, job in jobs.items()}


def _kill_after_coarse(proc: subprocess.Popen[str], run: Path, out: dict[str, Any]) -> None:
    """SIGKILL ``proc`` (its process group) as soon as the coarse stage is marked complete."""
    marker = run / ".stages" / "coarse.json"
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.005)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    out["stdout"], out["stderr"] = proc.communicate(timeout=60)
    out["returncode"] = proc.returncode
    out["markers"] = _markers(run)
    out["files"] = sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def _run_dir(batch: dict[str, Any], name: str) -> Path:
    return batch["world"]["runs"] / name


# -- 1. bad input -----------------------------------------------------------------------------
# case: (exit code, problem named in the error line, stage markers left in the run directory;
# None: no run directory at all)
ERROR_CASES: dict[str, tuple[int, str, set[str] | None]] = {
    "missing": (2, "file not found", None),
    # bad images are probed before any work: no run directory at all
    "empty": (2, "file is empty", None),
    "truncated": (2, "file is truncated", None),
    "text_as_svs": (2, "not a supported image (unrecognised file signature)", None),
    "blank": (2, "no tissue found in the source image", {"ingest_target", "ingest_source"}),
    "landmark_columns": (2, "missing landmark column(s) 'X', 'Y' (found '', 'A', 'B')", None),
    "config_typo": (2, "invalid configuration: unknown key 'nonrigid.tiel'", None),
    "config_value": (
        2,
        "'nonrigid.tile': Input should be less than or equal to 4096 (got 100000)",
        None,
    ),
    "config_python_tag": (2, "could not determine a constructor for the tag", None),
    "implausible_scale": (
        2,
        "coarse alignment is implausible: scale",
        {"ingest_target", "ingest_source", "preprocess"},
    ),
    "pair_table_columns": (
        2,
        "missing required column(s) 'Target landmarks', 'Source landmarks'",
        None,
    ),
    "landmarks_nan": (2, f"landmark row {NAN_ROWS[0] + 1} has no coordinates (NaN)", None),
    "landmarks_outside": (2, "lies outside the 892x661 image", None),
    "physical_size": (
        2,
        "physical size differs from the target's by",
        {"ingest_target", "ingest_source"},
    ),
}


def _named_file(w: dict[str, Path], case: str) -> Path:
    """The file an error line must name (the user's input, not an internal copy)."""
    return {
        "missing": w["missing"],
        "empty": w["empty"],
        "truncated": w["truncated"],
        "text_as_svs": w["text"],
        "blank": w["blank"],
        "landmark_columns": w["lm_columns"],
        "config_typo": w["cfg_typo"],
        "config_value": w["cfg_bad_value"],
        "config_python_tag": w["cfg_python_tag"],
        "implausible_scale": SOURCE,
        "pair_table_columns": w["table_columns"],
        "landmarks_nan": w["lm_nan"],
        "landmarks_outside": w["lm_outside"],
        "physical_size": w["phys_coarse"],
    }[case]


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_fails_with_one_line_and_no_complete_run(
    batch: dict[str, Any], case: str
) -> None:
    code, problem, markers = ERROR_CASES[case]
    res = batch["results"][case]
    assert res.returncode == code, res.stderr
    assert res.stdout == ""
    line = _one_line(res.stderr)
    assert line.startswith(ERR)
    assert problem in line, line
    assert "Traceback" not in res.stderr
    run = _run_dir(batch, case)
    if markers is None:
        assert not run.exists(), sorted(p.name for p in run.iterdir())
        return
    # finished stages keep their markers (a re-run resumes); the failed stage and everything
    # after it have none, and there is no metrics.json
    assert set(_markers(run)) == markers
    assert not (run / "metrics.json").exists()
    assert not any(TEMP_NAME.search(p.name) for p in run.rglob("*"))


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_line_names_the_input_file(batch: dict[str, Any], case: str) -> None:
    line = batch["results"][case].stderr.strip()
    assert line.startswith(f"{ERR}{_named_file(batch['world'], case)}: "), line


def test_debug_shows_the_traceback(batch: dict[str, Any]) -> None:
    res = batch["results"]["debug"]
    assert res.returncode == 1  # the exception propagates out of the interpreter
    lines = res.stderr.rstrip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert len(lines) > 5
    assert lines[-1] == (
        f"wsireg_flow.errors.ConfigError: {batch['world']['cfg_typo']}: "
        "invalid configuration: unknown key 'nonrigid.tiel' (did you mean 'tile'?)"
    )
    assert not _run_dir(batch, "debug").exists()


def test_python_tag_in_a_config_is_never_executed(batch: dict[str, Any]) -> None:
    assert batch["results"]["config_python_tag"].returncode == 2
    assert not batch["world"]["owned"].exists()


def test_nan_landmarks_are_read_as_nan_then_refused_by_register(batch: dict[str, Any]) -> None:
    """A blank cell reads as NaN (ANHIR's "unregistered" marker in results), but in an input
    landmark file it is a mistake: register refuses it before any work (see ERROR_CASES)."""
    pts = read_landmarks(batch["world"]["lm_nan"])
    assert pts.shape == (N_LANDMARKS, 2)
    assert np.isnan(pts).any(axis=1).nonzero()[0].tolist() == NAN_ROWS
    assert batch["results"]["landmarks_nan"].returncode == 2


def test_pixel_sizes_are_read_from_the_tiffs(batch: dict[str, Any]) -> None:
    """The refused 0.25 vs 8 um/px pair: both pixel sizes come from the TIFF tags."""
    w = batch["world"]
    with open_slide(w["phys_fine"]) as fine, open_slide(w["phys_coarse"]) as coarse:
        assert fine.pixel_size_um == pytest.approx(0.25)
        assert coarse.pixel_size_um == pytest.approx(8.0)
        ratio = (coarse.pixel_size_um * coarse.shapes[0][1]) / (
            fine.pixel_size_um * fine.shapes[0][1]
        )
    assert ratio > 30  # the source covers >30x the target's width
    assert "differs from the target's by 31.9x" in batch["results"]["physical_size"].stderr


# -- 2. faults --------------------------------------------------------------------------------
def _same_outputs(a: Path, b: Path) -> None:
    """Transform fields, warped landmarks and warped level 0 of two runs are identical."""
    for name in ("backward.zarr", "inverse.zarr"):
        fa, fb = load_field(a / "transform" / name), load_field(b / "transform" / name)
        assert fa.spacing == fb.spacing and fa.origin == fb.origin
        np.testing.assert_array_equal(fa.data, fb.data, err_msg=name)
    for name in ("warped-source-landmarks.csv", "warped-target-landmarks.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    levels = []
    for run in (a, b):
        group = zarr.open_group(str(run / "warped.zarr"), mode="r")
        levels.append(group[group.attrs["multiscales"][0]["datasets"][0]["path"]][:])
    assert levels[0].shape[0] == 3 and levels[0].ndim == 3
    np.testing.assert_array_equal(levels[0], levels[1])


def test_sigkill_mid_run_then_rerun_resumes_and_matches(
    batch: dict[str, Any], cli_env: dict[str, str]
) -> None:
    reference = batch["world"]["other_job_overwrite"]
    assert batch["results"]["reference"].returncode == 0
    killed = batch["killed"]
    run = killed["dir"]
    assert killed["returncode"] == -signal.SIGKILL, killed["stderr"]
    # killed in the non-rigid stage: four markers, nothing from later stages
    assert list(killed["markers"]) == sorted(FIRST_STAGES), killed["markers"]
    assert "metrics.json" not in killed["files"] and "transform" not in killed["files"]

    res = _cli(_reference_args(batch["world"], run), cli_env)
    stdout, stderr = res.communicate(timeout=300)
    assert res.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["stages_run"] == LATER_STAGES
    after = _markers(run)
    assert set(after) == set(PAIR_STAGES)
    for name in FIRST_STAGES:  # finished stages were not redone
        assert after[name] == killed["markers"][name], name
    for name in LATER_STAGES:
        assert after[name] > max(killed["markers"].values()), name
    _same_outputs(run, reference)
    leftovers = [str(p.relative_to(run)) for p in run.rglob("*") if TEMP_NAME.search(p.name)]
    assert leftovers == []


def test_dask_worker_killed_during_nonrigid_stage(batch: dict[str, Any], tmp_path: Path) -> None:
    from distributed import Client

    from wsireg_flow.config import Config
    from wsireg_flow.parallel import dask_scheduler
    from wsireg_flow.pipeline import PairJob, run_pair

    reference = batch["world"]["other_job_overwrite"]
    with dask_cluster(tmp_path) as (address, procs), Client(address, timeout="60s") as client:
        client.wait_for_workers(2, timeout=60)
        cfg = Config()
        cfg.dask.scheduler = address
        job = PairJob(TARGET, SOURCE, tmp_path / "run", cfg)
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                with dask_scheduler(cfg.dask) as scheduler:
                    outcome["ran"] = run_pair(job, scheduler=scheduler)
            except BaseException as exc:  # reported by the assertions below
                outcome["error"] = exc

        thread = threading.Thread(target=work)
        thread.start()
        victim, victim_keys = None, []
        try:
            while victim is None and thread.is_alive():
                for addr, keys in client.processing().items():
                    tiles = [k for k in keys if str(k).startswith("register_tile")]
                    info = client.scheduler_info()["workers"].get(addr)
                    if tiles and info is not None:  # kill the worker running the first tile
                        victim, victim_keys = info["name"], tiles
                        os.killpg(procs[victim].pid, signal.SIGKILL)
                        break
                time.sleep(0.002)
        finally:  # never leave the run going against a cluster being torn down
            thread.join(timeout=300)
        assert not thread.is_alive()
        assert "error" not in outcome, outcome.get("error")
        assert victim in ("w0", "w1") and len(victim_keys) >= 1
        assert all(outcome["ran"].values())
        survivors = [w["name"] for w in client.scheduler_info()["workers"].values()]
        assert survivors == [n for n in ("w0", "w1") if n != victim]
        executed = executed_tile_tasks(client)
    tiles = n_tiles(job.run_dir)
    print(f"\nkilled {victim} during {victim_keys[0]}; survivor ran {executed} of {tiles} tiles")
    assert list(executed.values()) == [tiles]  # the killed worker's task was re-run there
    a = load_field(job.run_dir / "transform" / "backward.zarr").data
    b = load_field(reference / "transform" / "backward.zarr").data
    assert np.abs(b).max() > 1.0
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


# -- 3. inputs never modified, results never overwritten silently ------------------------------
def test_register_stack_anhir_never_modify_their_inputs(batch: dict[str, Any]) -> None:
    res = batch["results"]
    for name in ("reference", "stack"):
        assert res[name].returncode == 0, (name, res[name].stderr)
    for name, ran in batch["library"].items():
        assert list(ran) == list(PAIR_STAGES) and all(ran.values()), name
    assert res["anhir_escape"].returncode == 0, res["anhir_escape"].stderr
    before, after = batch["before"]["inputs"], batch["after"]["inputs"]
    assert len(before) >= 25
    assert after == before


def test_register_refuses_a_directory_holding_another_job(batch: dict[str, Any]) -> None:
    d = batch["world"]["other_job"]
    res = batch["results"]["other_job"]
    assert res.returncode == 2
    line = _one_line(res.stderr)
    assert line == (
        f"{ERR}{d}: run directory exists and holds other results (target /elsewhere/a.svs, "
        "source /elsewhere/b.svs) (use --overwrite to replace it)"
    )
    assert batch["after"]["other_job"] == batch["before"]["other_job"]
    assert sorted(p.name for p in d.iterdir()) == [
        ".stages",
        "job.json",
        "metrics.json",
        "notes.txt",
    ]


def test_register_with_overwrite_replaces_another_job(batch: dict[str, Any]) -> None:
    d = batch["world"]["other_job_overwrite"]
    res = batch["results"]["reference"]
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["stages_run"] == list(PAIR_STAGES)
    job = json.loads((d / "job.json").read_text())
    assert (job["target"], job["source"]) == (str(TARGET), str(SOURCE))
    assert "note" not in json.loads((d / "metrics.json").read_text())
    assert set(_markers(d)) == set(PAIR_STAGES)


def test_ingest_refuses_an_existing_output(batch: dict[str, Any]) -> None:
    out = batch["world"]["existing_zarr"]
    res = batch["results"]["ingest_existing"]
    assert res.returncode == 2
    assert _one_line(res.stderr) == f"{ERR}{out}: output exists (use --overwrite to replace it)"
    assert batch["after"]["existing"] == batch["before"]["existing"]
    assert len(batch["before"]["existing"]) >= 4


# -- 4. failed registration is detected ---------------------------------------------------------
def _box_gap(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Chebyshev gap (px) between two (y0, x0, y1, x1) boxes; 0 when they touch or overlap."""
    dy = max(b[0] - a[2], a[0] - b[2], 0)
    dx = max(b[1] - a[3], a[1] - b[3], 0)
    return max(dy, dx)


def test_metrics_report_tiles_folding_and_coarse_fit(batch: dict[str, Any]) -> None:
    m = json.loads((batch["world"]["other_job_overwrite"] / "metrics.json").read_text())
    assert 0.0 <= m["folding_fraction"] < 0.01
    for key in ("scale", "shear", "rotation_deg", "anisotropy", "method", "notes"):
        assert key in m["rigid"], key
    assert abs(m["rigid"]["scale"] - 1.0) < 0.1 and abs(m["rigid"]["shear"]) < 0.05
    assert len(m["levels"]) == 2
    for lv in m["levels"]:
        assert sum(lv["statuses"].values()) == lv["tiles"]
        assert lv["tiles_ok"] == lv["statuses"].get("ok", 0)
        assert 0.0 <= lv["folding_fraction"] < 0.01
    assert [lv["tiles_ok"] for lv in m["levels"]] == [lv["tiles"] for lv in m["levels"]]


def test_unrelated_tissue_gives_rejected_tiles(batch: dict[str, Any]) -> None:
    """Case001 H&E against rat kidney H&E: most tiles are rejected and reported as such."""
    assert all(batch["library"]["unrelated"].values())
    run = _run_dir(batch, "unrelated")
    m = json.loads((run / "metrics.json").read_text())
    ref = json.loads((batch["world"]["other_job_overwrite"] / "metrics.json").read_text())
    coarse_level, finest = m["levels"]
    print(
        f"\nunrelated pair: tiles ok {coarse_level['tiles_ok']}/{coarse_level['tiles']}, "
        f"{finest['tiles_ok']}/{finest['tiles']} {finest['statuses']}, mean confidence "
        f"{finest['mean_confidence']:.3f} (related pair {ref['levels'][-1]['mean_confidence']:.3f})"
        f"; coarse scale {m['rigid']['scale']:.3f} shear {m['rigid']['shear']:.3f}"
    )
    # unrelated H&E tiles correlate at 0.1-0.25 after their flow, real different-stain lung
    # tiles of the ANHIR sample at 0.28-0.35: no confidence threshold separates them, so the
    # check is that most tiles are refused, at both levels
    for lv in (coarse_level, finest):
        assert lv["tiles_ok"] <= lv["tiles"] // 2
    assert finest["statuses"].get("low confidence", 0) >= 3
    for lv in m["levels"]:
        assert sum(lv["statuses"].values()) == lv["tiles"]
        assert lv["tiles_ok"] == lv["statuses"].get("ok", 0)
    assert finest["mean_confidence"] < 0.3 < ref["levels"][-1]["mean_confidence"]
    assert np.isfinite([m["rigid"]["scale"], m["rigid"]["shear"], m["folding_fraction"]]).all()
    tiles = load_tiles(run / "nonrigid" / "tiles.npz")
    for r in tiles.results:  # rejected tiles carry no residual into the stitched field
        assert (r.residual is None) == (r.status != "ok"), r.status


def test_rejected_tiles_keep_the_coarse_transform(batch: dict[str, Any]) -> None:
    """Left half: the same tissue, deformed (accepted tiles); right half blank (rejected)."""
    assert all(batch["library"]["half_blank"].values())
    run = _run_dir(batch, "half_blank")
    m = json.loads((run / "metrics.json").read_text())
    (lv,) = m["levels"]
    assert lv["statuses"].get("no gain", 0) >= 10 and lv["tiles_ok"] >= 10
    assert sum(lv["statuses"].values()) == lv["tiles"] == 35
    tiles = load_tiles(run / "nonrigid" / "tiles.npz")
    ok = [r.box for r in tiles.results if r.status == "ok"]
    rejected = [r for r in tiles.results if r.status not in ("ok", "no tissue")]
    assert all(r.residual is None for r in rejected)
    far = [r.box for r in rejected if min(_box_gap(r.box, b) for b in ok) >= 256]
    assert len(far) >= 4
    field = load_field(run / "transform" / "backward.zarr")
    assert field.spacing == 1.0  # level-0 grid

    def mean_abs(box: tuple[int, ...]) -> float:
        y0, x0, y1, x1 = box
        return float(np.abs(field.data[:, y0:y1, x0:x1]).mean())

    def core(box: tuple[int, ...], inset: int) -> tuple[int, ...]:
        y0, x0, y1, x1 = box
        return (y0 + inset, x0 + inset, y1 - inset, x1 - inset)

    accepted = [mean_abs(b) for b in ok]
    far_mean = [mean_abs(b) for b in far]
    # rejected tiles next to accepted ones: past the shared overlap (64 px) and the
    # regularisation (3 sigma = 15 px) their area keeps the coarse transform too
    near = [r.box for r in rejected if min(_box_gap(r.box, b) for b in ok) == 0]
    near_core = [mean_abs(core(b, 64 + 15)) for b in near]
    print(
        f"\n|residual| over accepted tiles {np.mean(accepted):.2f} px, far rejected "
        f"{np.round(far_mean, 4)}, cores of rejected next to accepted {np.round(near_core, 4)}"
    )
    assert np.mean(accepted) > 1.0
    assert max(far_mean) < 0.01
    assert len(near) >= 4
    assert max(near_core) < 0.05
    # the transform there is the coarse affine alone
    t = Transform.load(run / "transform")
    y0, x0, y1, x1 = far[0]
    pts = np.array([[x0 + 10.5, y0 + 20.0], [(x0 + x1) / 2, (y0 + y1) / 2], [x1 - 7.0, y1 - 9.5]])
    np.testing.assert_allclose(t.target_to_source(pts), apply_affine(t.affine, pts), atol=0.01)


@pytest.fixture(scope="module")
def lung_intensities() -> tuple[np.ndarray, ...]:
    from wsireg_flow.tissue import (
        intensity_stats,
        normalized_intensity,
        optical_density,
        tissue_mask,
    )

    out = []
    for p in (TARGET, SOURCE):
        with open_slide(p) as s:
            rgb = s.read_region(0, 0, 0, *s.shapes[0][:2])
        mask = tissue_mask(rgb)
        out += [normalized_intensity(rgb, intensity_stats(optical_density(rgb), mask)), mask]
    return tuple(out)


def test_implausible_coarse_scale_is_refused(
    lung_intensities: tuple[np.ndarray, ...], batch: dict[str, Any]
) -> None:
    from wsireg_flow.rigid import coarse_alignment

    t, tm, s, sm = lung_intensities
    with pytest.raises(RegistrationError) as info:
        coarse_alignment(t, s, tm, sm, RigidConfig(scale_min=1.5, scale_max=2.0))
    msg = str(info.value)
    assert "\n" not in msg
    reasons = msg.removeprefix("coarse alignment is implausible: ").split("; ")
    assert len(reasons) >= 2
    for reason in reasons:  # every candidate is a same-scale fit, outside [1.5, 2.0]
        scale = float(re.fullmatch(r"scale ([0-9.]+) outside \[1\.5, 2\.0\]", reason).group(1))
        assert abs(scale - 1.0) < 0.1
    # the command line reports the same refusal in one line (exit 2)
    res = batch["results"]["implausible_scale"]
    assert res.returncode == 2
    line = _one_line(res.stderr)
    assert line.startswith(f"{ERR}{SOURCE}: coarse alignment is implausible: scale ")
    assert line.count("outside [1.5, 2.0]") == len(line.split("; "))


# -- 5. untrusted inputs -----------------------------------------------------------------------
_UNSAFE_MSG = "pickle/eval/exec/unsafe yaml/allow_pickle=True"


def _unsafe_calls(source: str) -> list[str]:
    """Unsafe deserialisation or evaluation calls in Python source (comments/strings ignored)."""
    toks = [
        t
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type in (tokenize.NAME, tokenize.OP)
    ]
    found = []
    for i, t in enumerate(toks):
        prev = toks[i - 1].string if i else ""
        nxt = [x.string for x in toks[i + 1 : i + 4]]
        line = f"line {t.start[0]}"
        if t.string in ("eval", "exec") and prev != "." and nxt[:1] == ["("]:
            found.append(f"{line}: {t.string}(")
        if t.string in ("pickle", "cPickle", "dill", "marshal", "shelve") and nxt[:1] == ["."]:
            if nxt[1:2] and nxt[1] in ("load", "loads", "Unpickler", "open"):
                found.append(f"{line}: {t.string}.{nxt[1]}")
        if t.string == "yaml" and nxt[:1] == ["."] and nxt[1:2]:
            name = nxt[1]
            if name in ("unsafe_load", "unsafe_load_all", "full_load", "full_load_all"):
                found.append(f"{line}: yaml.{name}")
            if name in ("load", "load_all"):
                depth, j, safe = 0, i + 3, False
                while j < len(toks):
                    depth += {"(": 1, ")": -1}.get(toks[j].string, 0)
                    safe |= toks[j].string in ("SafeLoader", "CSafeLoader")
                    if depth == 0:
                        break
                    j += 1
                if not safe:
                    found.append(f"{line}: yaml.{name} without SafeLoader")
        if t.string == "allow_pickle" and nxt[:2] == ["=", "True"]:
            found.append(f"{line}: allow_pickle=True")
    return found


def test_unsafe_call_detector_finds_what_it_should() -> None:
    bad = (
        "import pickle, yaml\nimport numpy as np\n"
        "a = pickle.loads(b)\nb = pickle.load(f)\nc = eval('1')\nexec('x=1')\n"
        "d = yaml.load(s)\ne = yaml.load(s, Loader=yaml.Loader)\nf = yaml.unsafe_load(s)\n"
        "g = np.load(p, allow_pickle=True)\n"
    )
    assert len(_unsafe_calls(bad)) == 8
    ok = (
        "import yaml\nimport numpy as np\nx = yaml.safe_load(s)\n"
        "y = yaml.load(s, Loader=yaml.SafeLoader)\nmodel.eval()\n"
        "z = np.load(p, allow_pickle=False)\n"
        "msg = 'never eval( or pickle.loads( here'\n# eval(x) in a comment\n"
    )
    assert _unsafe_calls(ok) == []


def test_no_module_uses_unsafe_deserialisation_or_eval() -> None:
    files = [
        p
        for pkg in ("wsireg_flow", "flows", "benchmarks_anhir")
        for p in sorted((ROOT / pkg).rglob("*.py"))
    ]
    assert len(files) >= 30
    found = {
        str(p.relative_to(ROOT)): hits
        for p in files
        if (hits := _unsafe_calls(p.read_text(encoding="utf-8")))
    }
    assert found == {}, f"{_UNSAFE_MSG}: {found}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "kind: pair\ntarget: a.jpg\nsourse: b.jpg\n",
            "invalid manifest: 'sourse': Extra inputs are not permitted (did you mean 'source'?); "
            "a pair manifest needs 'source'",
        ),
        (
            "kind: stack\nfolder: s\nrefrence: 1\n",
            "invalid manifest: 'refrence': Extra inputs are not permitted "
            "(did you mean 'reference'?)",
        ),
        ("kind: pair\ntarget: a.jpg\n", "a pair manifest needs 'target' and 'source'"),
    ],
)
def test_manifest_key_typo_names_the_key_it_meant(tmp_path: Path, text: str, message: str) -> None:
    """A misspelt key was reported as an extra key only, not as the required key it misses."""
    from wsireg_flow.manifest import load_manifest

    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_manifest(path)
    assert str(info.value) == f"{path}: {message}"


def test_python_tag_in_a_manifest_is_refused_with_one_line(tmp_path: Path) -> None:
    from flows.inbox import run_manifest
    from wsireg_flow.manifest import load_manifest

    owned = tmp_path / "OWNED"
    texts = {
        "whole": f"!!python/object/apply:os.system ['touch {owned}']\n",
        "value": f"kind: pair\ntarget: !!python/object/apply:os.system ['touch {owned}']\n"
        "source: b.jpg\n",
        "config": "kind: pair\ntarget: a.jpg\nsource: b.jpg\n"
        f"config: !!python/object/new:os.system ['touch {owned}']\n",
    }
    for name, text in texts.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        for load in (load_manifest, lambda p: run_manifest(p, tmp_path, tmp_path / "runs", None)):
            with pytest.raises(InputError) as info:
                load(path)
            msg = str(info.value)
            assert "\n" not in msg
            assert msg.startswith(f"{path}: not a readable YAML manifest (could not determine")
    assert not owned.exists()
    assert not (tmp_path / "runs").exists()


def test_pair_table_paths_leaving_the_dataset_are_never_opened(batch: dict[str, Any]) -> None:
    w = batch["world"]
    res = batch["results"]["anhir_escape"]
    assert res.returncode == 0, res.stderr  # the bad pairs are recorded, the run goes on
    out = _run_dir(batch, "anhir_escape")
    failures = json.loads((out / "failures.json").read_text())
    assert failures == {
        "1": f"refusing path '../outside/image.jpg': it escapes the root directory {w['dataset']}",
        "2": f"refusing absolute path '{w['fifo_img']}': paths must be relative to {w['dataset']}",
    }
    assert res.stderr == f"wsireg-flow: 2 pair(s) failed: see {out / 'failures.json'}\n"
    assert sorted(p.name for p in (out / "pairs").iterdir()) == ["0"]
    assert set(_markers(out / "pairs" / "0")) == set(PAIR_STAGES)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["pairs"], summary["failed_pairs"]) == (3, 2)
    # the FIFO was never opened: reading it would have blocked the run forever
    assert _fifo_has_no_reader(w["fifo_img"])
    assert stat.S_ISFIFO(w["fifo_img"].lstat().st_mode)


def test_pair_table_landmark_path_leaving_the_dataset_is_a_recorded_failure(
    batch: dict[str, Any],
) -> None:
    """A landmark path outside the root is refused for that pair (never opened): the pair is a
    recorded failure that cannot be scored, and the run finishes (exit 0 without --strict)."""
    w = batch["world"]
    res = batch["results"]["anhir_landmark_escape"]
    assert res.returncode == 0
    out = _run_dir(batch, "anhir_landmark_escape")
    failures = json.loads((out / "failures.json").read_text())
    reason = "refusing path 'case/../../outside/landmarks.csv': it escapes the root directory"
    assert list(failures) == ["0"] and reason in failures["0"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_pairs"] == 1 and summary["pairs"] == 0
    assert list(summary["unscorable"]) == ["0"]
    assert not (out / "pairs").exists()  # the pair failed before any work
    assert _fifo_has_no_reader(w["fifo_lm"])


def test_manifest_paths_leaving_the_data_root_are_refused(tmp_path: Path) -> None:
    from flows.inbox import run_manifest

    root, runs = tmp_path / "data", tmp_path / "runs"
    (root / "case").mkdir(parents=True)
    for p in (TARGET, SOURCE):
        shutil.copy2(p, root / "case" / p.name)
    fifo = tmp_path / "outside.jpg"
    os.mkfifo(fifo)
    t, s = f"case/{TARGET.name}", f"case/{SOURCE.name}"
    manifests = {
        "dotdot": f"kind: pair\ntarget: {t}\nsource: ../outside.jpg\n",
        "absolute": f"kind: pair\ntarget: {fifo}\nsource: {s}\n",
        "nested": f"kind: pair\ntarget: {t}\nsource: case/../../outside.jpg\n",
        "landmarks": f"kind: pair\ntarget: {t}\nsource: {s}\nsource_landmarks: ../outside.jpg\n",
        "sections": f"kind: stack\nsections: [{t}, ../outside.jpg]\n",
        "folder": "kind: stack\nfolder: ..\n",
        "stack_landmarks": f"kind: stack\nsections: [{t}, {s}]\nlandmarks: [a.csv, {fifo}]\n",
    }
    for name, text in manifests.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        outcome: dict[str, BaseException] = {}

        def go(path: Path = path, outcome: dict[str, BaseException] = outcome) -> None:
            try:
                run_manifest(path, root, runs, None)
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=go, daemon=True)
        thread.start()
        thread.join(timeout=60)
        if thread.is_alive():  # blocked reading the FIFO: release it, then fail
            with open(fifo, "wb"):
                pass
            pytest.fail(f"{name}: the manifest path outside the data root was opened")
        err = outcome.get("error")
        assert isinstance(err, InputError), (name, err)
        assert re.match(r"refusing (absolute )?path '", str(err)), (name, str(err))
        assert "\n" not in str(err)
        assert not (runs / name).exists(), name
    assert _fifo_has_no_reader(fifo)


def test_local_cluster_listens_on_localhost_only() -> None:
    from wsireg_flow.parallel import dask_scheduler, resolve_scheduler

    with dask_scheduler(DaskConfig(scheduler="local", n_workers=1)) as handle:
        client = resolve_scheduler(handle)
        address = client.scheduler.address
        workers = list(client.scheduler_info()["workers"])
        nannies = [w["nanny"] for w in client.scheduler_info()["workers"].values()]
    print(f"\nLocalCluster: scheduler {address}, workers {workers}")
    assert address.startswith("tcp://127.0.0.1:")
    assert len(workers) == 1
    assert all(a.startswith("tcp://127.0.0.1:") for a in [*workers, *nannies])
