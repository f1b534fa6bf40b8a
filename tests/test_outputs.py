"""Outputs never destroy inputs: every command refuses an ``--out`` that is, or holds, one of
its inputs (``--overwrite`` would replace or empty it), single-file outputs are not replaced
without ``--overwrite`` and get their missing folders, and ``anhir`` refuses a folder that holds
another run before it starts.

All refusals happen before any work: one line naming the path, exit 2, inputs byte-identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from wsireg_flow.cli import main
from wsireg_flow.transform import Transform

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "data" / "anhir-sample" / "lesions_" / "scale-5pc"
DATASET = ROOT / "data" / "anhir-sample"


def _cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([*argv, "--quiet"])
    return code, err.getvalue()


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _refused(code: int, err: str, path: Path, problem: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and problem in lines[0], lines[0]


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """A folder holding two slides and a note, as a user keeps them."""
    d = tmp_path / "case"
    d.mkdir()
    shutil.copy(CASE / "Izd2-29-041-w35_HE.jpg", d / "a.jpg")
    shutil.copy(CASE / "Izd2-29-041-w35_proSPC.jpg", d / "b.jpg")
    (d / "notes.txt").write_text("keep me\n")
    return d


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_register_and_stack_refuse_a_run_directory_holding_their_inputs(
    inputs: Path, overwrite: bool
) -> None:
    """`register a b --out FOLDER-OF-a-AND-b --overwrite` once emptied the folder: the slides
    and the user's other files were deleted."""
    before = _digest(inputs)
    flag = ["--overwrite"] if overwrite else []
    a, b = str(inputs / "a.jpg"), str(inputs / "b.jpg")
    for argv in (
        ["register", a, b, "--out", str(inputs), *flag],
        ["stack", str(inputs / "a.jpg"), str(inputs / "b.jpg"), "--out", str(inputs), *flag],
        ["stack", a, b, "--out", str(inputs.parent), *flag],  # a folder above the inputs
    ):
        code, err = _cli(argv)
        _refused(code, err, Path(argv[argv.index("--out") + 1]), "is or holds the input")
    # a folder of sections is an input too: a run written into it was taken for a section by
    # the next stack of the folder ("aligned.zarr: is a directory, not a slide")
    inside = inputs / "aligned"
    code, err = _cli(["stack", str(inputs), "--out", str(inside), *flag])
    _refused(code, err, inside, f"is inside the input {inputs}")
    assert _digest(inputs) == before and not inside.exists()


def test_ingest_and_export_refuse_to_write_over_their_input(inputs: Path, tmp_path: Path) -> None:
    a = inputs / "a.jpg"
    before = _digest(inputs)
    code, err = _cli(["ingest", str(a), "--out", str(a), "--overwrite"])
    _refused(code, err, a, "is or holds the input")
    assert _digest(inputs) == before
    zarr = tmp_path / "a.zarr"
    assert _cli(["ingest", str(a), "--out", str(zarr)])[0] == 0
    code, err = _cli(["export", str(zarr), "--out", str(zarr), "--overwrite"])
    _refused(code, err, zarr, "is or holds the input")
    assert (zarr / ".zattrs").is_file()
    # a single-file output gets its missing folders; a folder is not a file name
    deep = tmp_path / "new" / "folder" / "a.ome.tif"
    assert _cli(["export", str(zarr), "--out", str(deep)])[0] == 0 and deep.is_file()
    code, err = _cli(["export", str(zarr), "--out", str(deep.parent)])
    _refused(code, err, deep.parent, "exists and is a directory")


def test_warp_annotations_keeps_existing_files_without_overwrite(tmp_path: Path) -> None:
    """warp-annotations replaced an existing output, or its own input, without a word."""
    transform_dir = tmp_path / "transform"
    shift = np.array([[1.0, 0.0, -5.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # target -> source
    Transform(shift, None, None, (100, 100), (100, 100)).save(transform_dir)
    src = tmp_path / "points.geojson"
    src.write_text(json.dumps({"type": "Point", "coordinates": [10.0, 20.0]}))
    original = src.read_bytes()
    code, err = _cli(["warp-annotations", str(transform_dir), str(src), "--out", str(src)])
    _refused(code, err, src, "is or holds the input")
    assert src.read_bytes() == original
    out = tmp_path / "new" / "warped.geojson"
    assert _cli(["warp-annotations", str(transform_dir), str(src), "--out", str(out)])[0] == 0
    assert json.loads(out.read_text())["coordinates"] == [15.0, 20.0]
    out.write_text("mine")
    code, err = _cli(["warp-annotations", str(transform_dir), str(src), "--out", str(out)])
    _refused(code, err, out, "--overwrite")
    assert out.read_text() == "mine"
    argv = ["warp-annotations", str(transform_dir), str(src), "--out", str(out), "--overwrite"]
    assert _cli(argv)[0] == 0
    assert json.loads(out.read_text())["coordinates"] == [15.0, 20.0]


def test_anhir_refuses_a_folder_holding_another_run(tmp_path: Path) -> None:
    """anhir once wrote beside a register run, and failed every pair whose folder held another
    dataset's pair, advising an --overwrite it does not have."""
    table = DATASET / "dataset.csv"
    base = ["anhir", "--dataset", str(DATASET), "--pairs", str(table), "--limit", "1"]
    register_run = tmp_path / "register-run"
    register_run.mkdir()
    (register_run / "job.json").write_text("{}")
    code, err = _cli([*base, "--out", str(register_run)])
    _refused(code, err, register_run, "holds a register run")
    other = tmp_path / "other-anhir"
    (other / "pairs" / "0").mkdir(parents=True)
    (other / "pairs" / "0" / "job.json").write_text(json.dumps({"target": "elsewhere.jpg"}))
    code, err = _cli([*base, "--out", str(other)])
    _refused(code, err, other / "pairs" / "0", "holds another pair's results")
    assert sorted(p.name for p in other.iterdir()) == ["pairs"]  # nothing written


def test_anhir_refuses_a_folder_another_anhir_run_is_writing(tmp_path: Path) -> None:
    """Two anhir runs into one --out both ran: each failed the pair the other held ("another
    wsireg-flow run is writing"), both exited 0, and the last one's report scored a finished
    pair as unregistered. The folder now has a lock of its own, held for the whole run."""
    from benchmarks_anhir.run import run_benchmark
    from wsireg_flow.config import Config
    from wsireg_flow.errors import WsiregError
    from wsireg_flow.stages import run_dir_lock

    table = DATASET / "dataset.csv"
    out = tmp_path / "anhir"
    argv = ["anhir", "--dataset", str(DATASET), "--pairs", str(table), "--out", str(out)]
    with run_dir_lock(out):
        code, err = _cli(argv)
        _refused(code, err, out, "another wsireg-flow run is writing to this run directory")
        with pytest.raises(WsiregError, match="another wsireg-flow run is writing"):
            run_benchmark(DATASET, table, out, Config(), limit=1)
    assert _names(out) == [".wsireg.lock"]  # nothing else written


def test_a_reader_that_goes_away_is_not_an_error() -> None:
    """`wsireg-flow config | head -1` printed 'error: BrokenPipeError' and exited 1."""
    import subprocess
    import sys

    p = subprocess.Popen(
        [sys.executable, "-m", "wsireg_flow.cli", "config"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # the reader is gone before anything is written
    err = p.stderr.read()
    assert p.wait(timeout=60) == 0, err
    assert err == ""


@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    """A run directory as `register` leaves it: job.json, a transform, a result beside them."""
    run = tmp_path / "run"
    shift = np.array([[1.0, 0.0, -5.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # target -> source
    Transform(shift, None, None, (100, 120), (100, 120)).save(run / "transform")
    (run / "job.json").write_text("{}")
    (run / "metrics.json").write_text("{}")
    return run


def test_warp_refuses_an_output_over_its_transform(finished_run: Path, tmp_path: Path) -> None:
    """`warp RUN/transform IMAGE --out RUN --overwrite` deleted the whole registration run (and
    `--out RUN/transform` replaced the transform by an image): the transform is an input."""
    import cv2

    image = tmp_path / "image.png"
    cv2.imwrite(str(image), np.full((100, 120, 3), 200, np.uint8))
    before = _digest(finished_run)
    transform = finished_run / "transform"
    for out, problem in (
        (finished_run, "is or holds the input"),
        (transform, "is or holds the input"),
        (transform / "warped.zarr", "is inside the input"),
    ):
        code, err = _cli(["warp", str(transform), str(image), "--out", str(out), "--overwrite"])
        _refused(code, err, out, problem)
    assert _digest(finished_run) == before
    assert _cli(["warp", str(transform), str(image), "--out", str(tmp_path / "w.zarr")])[0] == 0


def test_export_refuses_an_output_inside_its_input_pyramid(inputs: Path, tmp_path: Path) -> None:
    zarr = tmp_path / "a.zarr"
    assert _cli(["ingest", str(inputs / "a.jpg"), "--out", str(zarr)])[0] == 0
    before = _digest(zarr)
    out = zarr / "a.ome.tif"
    code, err = _cli(["export", str(zarr), "--out", str(out)])
    _refused(code, err, out, "is inside the input")
    assert _digest(zarr) == before


def test_overwrite_replaces_only_what_wsireg_flow_wrote(inputs: Path, tmp_path: Path) -> None:
    """`--overwrite` emptied any existing folder: a user's notes and documents given as --out
    were deleted without a word, and so was the --config file kept in it."""
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("important\n")
    (mine / "sub" / "thesis.docx").write_text("x\n")
    before = _digest(mine)
    a, b = str(inputs / "a.jpg"), str(inputs / "b.jpg")
    for argv in (
        ["register", a, b, "--out", str(mine)],
        ["stack", a, b, "--out", str(mine)],
        ["ingest", a, "--out", str(mine)],
        ["synth", "--size", "800x800", "--out", str(mine)],
    ):
        code, err = _cli([*argv, "--overwrite"])
        _refused(code, err, mine, "holds notes.txt, sub, which no ")
    assert _digest(mine) == before
    # a name wsireg-flow writes does not make the rest of the folder its own
    (mine / "job.json").write_text("{}")
    code, err = _cli(["register", a, b, "--out", str(mine), "--overwrite"])
    _refused(code, err, mine, "holds notes.txt, sub, which no register run of wsireg-flow holds")
    (mine / "job.json").unlink()
    assert _digest(mine) == before
    # the config is an input too, wherever it is kept
    config = mine / "my.yaml"
    config.write_text("nonrigid:\n  levels: 1\n")
    code, err = _cli(["register", a, b, "--out", str(mine), "--config", str(config), "--overwrite"])
    _refused(code, err, mine, f"is or holds the input {config}")
    assert config.is_file()
    # what wsireg-flow wrote is replaced as before
    zarr = tmp_path / "a.zarr"
    for _ in range(2):
        assert _cli(["ingest", a, "--out", str(zarr), "--overwrite"])[0] == 0
    assert (zarr / ".zattrs").is_file()
    # ...but not through a symbolic link (the link would be replaced), nor while a run writes
    link = tmp_path / "link.zarr"
    link.symlink_to(zarr)
    code, err = _cli(["ingest", a, "--out", str(link), "--overwrite"])
    _refused(code, err, link, "is a symbolic link")
    from wsireg_flow.stages import LOCK_NAME, exclusive_lock

    with exclusive_lock(zarr / LOCK_NAME) as held:
        assert held
        code, err = _cli(["ingest", a, "--out", str(zarr), "--overwrite"])
    _refused(code, err, zarr, "another wsireg-flow run is writing")
    assert (zarr / ".zattrs").is_file()
    # the config is an input of every command that takes one
    code, err = _cli(["export", str(zarr), "--out", str(config), "--config", str(config)])
    _refused(code, err, config, "is or holds the input")
    assert config.read_text() == "nonrigid:\n  levels: 1\n"


def test_an_output_under_a_broken_link_or_a_file_is_refused_before_any_work(
    inputs: Path, tmp_path: Path
) -> None:
    """An --out under a dangling symbolic link (a share that is not mounted) ended in
    "FileExistsError" (exit 1; for ingest blamed on the input slide, after Prefect started for
    register); under a file, ingest said the input could not be read."""
    link = tmp_path / "share"
    link.symlink_to(tmp_path / "not-mounted")
    a, b = str(inputs / "a.jpg"), str(inputs / "b.jpg")
    afile = inputs / "notes.txt"
    for parent, problem in ((link, "a broken symbolic link"), (afile, "not a directory")):
        for argv in (
            ["register", a, b, "--out", str(parent / "run")],
            ["ingest", a, "--out", str(parent / "a.zarr")],
            ["synth", "--size", "800x800", "--out", str(parent / "synth")],
        ):
            code, err = _cli(argv)
            _refused(code, err, parent / argv[argv.index("--out") + 1].rsplit("/", 1)[1], problem)
    assert not (tmp_path / "not-mounted").exists()


def test_stack_and_anhir_refuse_bad_input_before_starting_prefect(
    inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stack` with a text file named .svs, or `anhir` whose --status selects no pair, failed
    only after Prefect's temporary server had started (about 10 s)."""
    import flows.server

    def no_prefect() -> None:
        raise AssertionError("Prefect was started")

    monkeypatch.setattr(flows.server, "prefect_api", no_prefect)
    fake = tmp_path / "text.svs"
    fake.write_text("not a slide\n")
    code, err = _cli(["stack", str(inputs / "a.jpg"), str(fake), "--out", str(tmp_path / "s")])
    assert code == 2 and str(fake) in err and len(err.strip().splitlines()) == 1, err
    table = DATASET / "dataset.csv"
    argv = ["anhir", "--dataset", str(DATASET), "--pairs", str(table), "--status", "evaluation"]
    code, err = _cli([*argv, "--out", str(tmp_path / "a")])
    _refused(code, err, table, "no pairs selected (none has status 'evaluation')")
    assert not (tmp_path / "s").exists() and not (tmp_path / "a").exists()
    # a folder holding other things is refused before Prefect too, and left as it was (the
    # refusal used to come from inside the flow, after the run's lock file was created in it)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("important\n")
    code, err = _cli(["stack", str(inputs / "a.jpg"), str(inputs / "b.jpg"), "--out", str(mine)])
    _refused(code, err, mine, "run directory exists and holds other results")
    assert _names(mine) == ["notes.txt"]
    # a folder holding another stack says which (as register names the pair it holds)
    other = tmp_path / "other"
    other.mkdir()
    (other / "stack.json").write_text(json.dumps({"sections": ["/x/s1.svs", "/x/s2.svs"]}))
    code, err = _cli(["stack", str(inputs / "a.jpg"), str(inputs / "b.jpg"), "--out", str(other)])
    _refused(code, err, other, "holds other results (a stack of s1.svs, s2.svs) (use --overwrite")


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_refused_folder_gets_no_lock_file(inputs: Path, tmp_path: Path) -> None:
    """Runs started from the library (as inbox jobs are) took the run's lock, creating
    ``.wsireg.lock`` in the folder, before refusing it: a user's folder kept that file."""
    from wsireg_flow.config import Config
    from wsireg_flow.errors import WsiregError
    from wsireg_flow.pipeline import PairJob, run_pair

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("important\n")
    job = PairJob(inputs / "a.jpg", inputs / "b.jpg", mine, Config())
    for overwrite, problem in ((False, "holds other results"), (True, "holds notes.txt")):
        with pytest.raises(WsiregError, match=problem):
            run_pair(job, overwrite=overwrite)
        assert _names(mine) == ["notes.txt"]
