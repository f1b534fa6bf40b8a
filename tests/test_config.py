"""Configuration: defaults, configs/default.yaml in sync, partial overrides, clear refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wsireg_flow.cli import main
from wsireg_flow.config import SCHEDULER_ENV, Config, config_from_dict, config_to_yaml, load_config
from wsireg_flow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_YAML = ROOT / "configs" / "default.yaml"


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert exc.value.path == path
    return msg


# --------------------------------------------------------------------------- defaults


def test_defaults() -> None:
    cfg = Config()
    assert cfg.io.pixel_size_um is None
    assert cfg.io.chunk == 1024
    assert cfg.io.pyramid_max_side == 1024
    assert cfg.io.codec == "lz4"
    assert cfg.io.registration_min_side == 128
    assert cfg.tissue.max_side == 1024
    assert cfg.tissue.min_area_fraction == 0.0005
    assert cfg.rigid.max_side == 1024
    assert cfg.rigid.model == "affine"
    assert cfg.rigid.ratio == 0.8
    assert (cfg.rigid.scale_min, cfg.rigid.scale_max) == (0.5, 2.0)
    assert (cfg.nonrigid.max_side, cfg.nonrigid.levels) == (4096, 2)
    assert cfg.nonrigid.smooth_sigma == 5.0
    assert (cfg.nonrigid.tile, cfg.nonrigid.overlap, cfg.nonrigid.margin) == (512, 128, 32)
    assert cfg.dask.n_workers is None
    assert cfg.dask.memory_limit == "auto"
    assert load_config(None) == cfg


def test_default_scheduler_is_a_local_cluster_unless_the_environment_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    assert Config().dask.scheduler == "local"
    monkeypatch.setenv(SCHEDULER_ENV, "tcp://10.0.0.5:8786")
    assert Config().dask.scheduler == "tcp://10.0.0.5:8786"
    assert load_config(None).dask.scheduler == "tcp://10.0.0.5:8786"
    # a config file that names a scheduler wins over the environment
    assert load_config(_write(tmp_path, "dask:\n  scheduler: threads\n")).dask.scheduler == (
        "threads"
    )


def test_default_yaml_mirrors_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    text = DEFAULT_YAML.read_text(encoding="utf-8")
    assert yaml.safe_load(text) == Config().model_dump(mode="json")
    # same keys in the same order, same spelling: the file is the dump plus comments
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    assert body == config_to_yaml(Config())
    assert load_config(DEFAULT_YAML) == Config()


def test_default_sections_are_not_shared() -> None:
    a, b = Config(), Config()
    a.rigid.ratio = 0.5
    a.nonrigid.levels = 3
    assert b.rigid.ratio == 0.8
    assert b.nonrigid.levels == 2
    assert Config().rigid.ratio == 0.8


# --------------------------------------------------------------------------- overrides


def test_partial_yaml_overrides_only_its_keys(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "# a comment\nrigid:\n  ratio: 0.7\n  detector: orb\nnonrigid:\n  tile: 256\n"
        "  overlap: 64\nio:\n  pixel_size_um: 0.25\n",
    )
    cfg = load_config(path)
    assert cfg.rigid.ratio == 0.7
    assert cfg.rigid.detector == "orb"
    assert cfg.nonrigid.tile == 256
    assert cfg.nonrigid.overlap == 64
    assert cfg.io.pixel_size_um == 0.25
    expected = Config().model_dump()
    expected["rigid"].update(ratio=0.7, detector="orb")
    expected["nonrigid"].update(tile=256, overlap=64)
    expected["io"]["pixel_size_um"] = 0.25
    assert cfg.model_dump() == expected


def test_empty_yaml_gives_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")) == Config()
    assert load_config(_write(tmp_path, "# only a comment\n", "c.yaml")) == Config()
    assert load_config(_write(tmp_path, "rigid: {}\n", "d.yaml")) == Config()


def test_config_from_dict_without_source() -> None:
    assert config_from_dict({"io": {"chunk": 512}}).io.chunk == 512
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"io": {"chunkk": 512}})
    assert str(exc.value) == (
        "invalid configuration: unknown key 'io.chunkk' (did you mean 'chunk'?)"
    )
    assert exc.value.path is None


def test_validate_assignment() -> None:
    cfg = Config()
    cfg.io.pixel_size_um = 0.3
    assert cfg.io.pixel_size_um == 0.3
    with pytest.raises(ValueError):
        cfg.io.pixel_size_um = -1.0


# --------------------------------------------------------------------------- refusals


def test_unknown_key(tmp_path: Path) -> None:
    msg = _config_error(_write(tmp_path, "rigid:\n  ratioo: 0.5\n"))
    assert "unknown key 'rigid.ratioo' (did you mean 'ratio'?)" in msg
    # no hint when nothing is close
    msg = _config_error(_write(tmp_path, "rigid:\n  zzzzzzz: 0.5\n"))
    assert msg.endswith("unknown key 'rigid.zzzzzzz'"), msg


def test_unknown_section(tmp_path: Path) -> None:
    msg = _config_error(_write(tmp_path, "rigidd:\n  ratio: 0.5\n"))
    assert "unknown key 'rigidd'" in msg


def test_two_errors_are_both_named(tmp_path: Path) -> None:
    msg = _config_error(_write(tmp_path, "io:\n  chunk: 1\n  codecc: lz4\n"))
    assert "'io.chunk'" in msg
    assert "unknown key 'io.codecc'" in msg


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("nonrigid:\n  tile: -5\n", "'nonrigid.tile'", "greater than or equal to 64"),
        ("io:\n  chunk: abc\n", "'io.chunk'", "valid integer"),
        ("rigid:\n  n_features: many\n", "'rigid.n_features'", "valid integer"),
        ("io:\n  chunk: 1024.5\n", "'io.chunk'", "fractional part"),
        ("io:\n  chunk: 100000\n", "'io.chunk'", "less than or equal to 8192"),
        ("io:\n  pyramid_max_side: 9000\n", "'io.pyramid_max_side'", "or equal to 4096"),
        ("io:\n  pixel_size_um: 0\n", "'io.pixel_size_um'", "greater than 0"),
        ("io:\n  codec: gzip\n", "'io.codec'", "'lz4' or 'zstd'"),
        ("rigid:\n  ratio: 1.5\n", "'rigid.ratio'", "less than 1"),
        ("rigid: 5\n", "'rigid'", "valid dictionary"),
        ("nonrigid:\n  levels: 0\n", "'nonrigid.levels'", "greater than or equal to 1"),
        ("nonrigid:\n  levels: 7\n", "'nonrigid.levels'", "less than or equal to 6"),
        # passed validation, then failed the run after three stages: "ValueError: Could not
        # interpret 'lots' as a byte unit", naming neither key nor file
        ("dask:\n  memory_limit: lots\n", "'dask.memory_limit'", "at least 128MiB"),
        ("dask:\n  memory_limit: 10MB\n", "'dask.memory_limit'", "at least 128MiB"),
        ("dask:\n  memory_limit: '4'\n", "'dask.memory_limit'", "or a size with a unit"),
    ],
)
def test_bad_value_names_the_key(tmp_path: Path, text: str, key: str, problem: str) -> None:
    msg = _config_error(_write(tmp_path, text))
    assert key in msg
    assert problem in msg
    assert "Value error" not in msg  # pydantic's prefix of a validator's message


def test_scale_min_not_below_scale_max(tmp_path: Path) -> None:
    msg = _config_error(_write(tmp_path, "rigid:\n  scale_min: 2.0\n  scale_max: 1.0\n"))
    assert "'rigid'" in msg
    assert "scale_min must be smaller than scale_max" in msg
    # equal is refused too
    msg = _config_error(_write(tmp_path, "rigid:\n  scale_min: 1.0\n  scale_max: 1.0\n", "eq.yaml"))
    assert "scale_min must be smaller than scale_max" in msg


def test_overlap_must_be_less_than_half_the_tile(tmp_path: Path) -> None:
    msg = _config_error(_write(tmp_path, "nonrigid:\n  tile: 256\n  overlap: 128\n"))
    assert "'nonrigid'" in msg
    assert "overlap must be less than half the tile size" in msg
    # 127 * 2 < 256 is fine
    assert (
        load_config(
            _write(tmp_path, "nonrigid:\n  tile: 256\n  overlap: 127\n", "ok.yaml")
        ).nonrigid.overlap
        == 127
    )
    # the default overlap (128) does not fit a 256 tile either
    msg = _config_error(_write(tmp_path, "nonrigid:\n  tile: 256\n", "t.yaml"))
    assert "overlap must be less than half the tile size" in msg


def test_invalid_yaml(tmp_path: Path) -> None:
    msg = _config_error(_write(tmp_path, "rigid: [1, 2\n"))
    assert "not valid YAML" in msg
    msg = _config_error(_write(tmp_path, "io:\n\tchunk: 5\n", "tab.yaml"))
    assert "not valid YAML" in msg


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"\xff\xfe\x00bad")
    assert "not valid YAML" in _config_error(path)


def test_yaml_list_is_refused(tmp_path: Path) -> None:
    msg = _config_error(_write(tmp_path, "- io\n- rigid\n"))
    assert "a config must be a mapping of sections, got list" in msg
    msg = _config_error(_write(tmp_path, "42\n", "scalar.yaml"))
    assert "got int" in msg


def test_missing_file(tmp_path: Path) -> None:
    assert "config file not found" in _config_error(tmp_path / "absent.yaml")
    (tmp_path / "configs").mkdir()
    assert "is a directory, not a config file" in _config_error(tmp_path / "configs")


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    """A second `nonrigid:` block replaced the first without a word (its tile size was lost)."""
    text = "nonrigid:\n  tile: 768\nrigid:\n  ratio: 0.7\nnonrigid:\n  levels: 3\n"
    assert "key 'nonrigid' is given twice" in _config_error(_write(tmp_path, text))
    text = "nonrigid:\n  tile: 768\n  tile: 1024\n"
    assert "key 'tile' is given twice" in _config_error(_write(tmp_path, text, "inner.yaml"))
    # keys written differently that YAML reads as one (`yes` and `true` are both True)
    text = "rigid:\n  try_flip: false\nnonrigid: {yes: 1, true: 2}\n"
    assert "key 'true' is given twice" in _config_error(_write(tmp_path, text, "bool.yaml"))
    # YAML merge keys may still be overridden
    text = "nonrigid:\n  <<: {tile: 768, levels: 2}\n  tile: 1024\n"
    cfg = load_config(_write(tmp_path, text, "merge.yaml"))
    assert (cfg.nonrigid.tile, cfg.nonrigid.levels) == (1024, 2)


@pytest.mark.parametrize(
    "text",
    [
        "rigid: !!python/object:os.system\n  x: 1\n",
        "!!python/object/apply:os.system ['echo owned > owned.txt']\n",
        "io: !!python/name:os.getcwd ''\n",
    ],
)
def test_python_tags_are_refused(tmp_path: Path, text: str) -> None:
    msg = _config_error(_write(tmp_path, text))
    assert "not valid YAML" in msg
    assert "could not determine a constructor" in msg
    assert not (tmp_path / "owned.txt").exists()


# --------------------------------------------------------------------------- CLI


def test_cli_config_prints_effective_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "rigid:\n  ratio: 0.65\n")
    assert main(["config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    data = yaml.safe_load(out)
    expected = Config().model_dump(mode="json")
    expected["rigid"]["ratio"] = 0.65
    assert data == expected


def test_cli_config_bad_file_subprocess(tmp_path: Path) -> None:
    path = _write(tmp_path, "rigid:\n  ratioo: 0.5\n", "bad.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "wsireg_flow.cli", "config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (
        f"wsireg-flow: error: {path}: invalid configuration: unknown key 'rigid.ratioo' "
        "(did you mean 'ratio'?)\n"
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("rigid: [1, 2\n", "not valid YAML"),
        ("- a\n", "must be a mapping"),
        ("nonrigid:\n  tile: 256\n  overlap: 200\n", "overlap must be less than half"),
    ],
)
def test_cli_config_errors_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, problem: str
) -> None:
    path = _write(tmp_path, text)
    assert main(["config", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"wsireg-flow: error: {path}: ")
    assert problem in lines[0]
    assert "Traceback" not in captured.err


def test_cli_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.yaml"
    assert main(["config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"wsireg-flow: error: {path}: config file not found\n"


@pytest.mark.parametrize(
    "value",
    ["local", "threads", "sync", "tcp://127.0.0.1:8786", "tls://sched.example.org:8786",
     "10.0.0.5:8786", "inproc://10.0.0.5/1234/1"],
)  # fmt: skip
def test_scheduler_names_and_addresses_are_accepted(value: str) -> None:
    assert config_from_dict({"dask": {"scheduler": value}}).dask.scheduler == value


@pytest.mark.parametrize("value", ["foo", "Local", "tcp://host", "http://host:8786", "", " "])
def test_bad_scheduler_is_refused_naming_the_key(tmp_path: Path, value: str) -> None:
    path = _write(tmp_path, f"dask:\n  scheduler: {value!r}\n")
    msg = _config_error(path)
    assert "dask.scheduler" in msg and "not 'local', 'threads', 'sync'" in msg


def test_bad_scheduler_in_the_environment_or_on_the_command_line_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SCHEDULER_ENV, "bogus")
    with pytest.raises(ConfigError) as exc:
        Config()
    assert str(exc.value).startswith(f"${SCHEDULER_ENV}: 'bogus' is not")
    monkeypatch.setenv(SCHEDULER_ENV, "threads")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsireg_flow.cli",
            "register",
            "t.svs",
            "s.svs",
            "--out",
            str(tmp_path / "run"),
            "--scheduler",
            "tcp:/x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "wsireg-flow: error: --scheduler: 'tcp:/x' is not 'local', 'threads', 'sync' or a "
        "scheduler address such as tcp://host:8786"
    ]
    assert not (tmp_path / "run").exists()


ANHIR = ROOT / "data" / "anhir-sample"
CMU = ROOT / "data" / "wsi" / "CMU-1-Small-Region.svs"
BAD_OPTIONS = {
    "info-pixel-size": (
        ["info", str(CMU), "--pixel-size", "-1"],
        "--pixel-size: input should be greater than 0, got -1",
    ),
    "register-pixel-size": (
        ["register", str(CMU), str(CMU), "--out", "{out}", "--pixel-size", "0"],
        "--pixel-size: input should be greater than 0, got 0",
    ),
    "anhir-limit": (
        [
            "anhir",
            "--dataset",
            str(ANHIR),
            "--pairs",
            str(ANHIR / "dataset.csv"),
            "--out",
            "{out}",
            "--limit",
            "-1",
        ],
        "--limit: must be at least 1, got -1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_value_is_one_line_naming_the_option(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A negative --limit once scored all pairs but the last (a Python slice) and a pixel size
    <= 0 gave a pydantic ValidationError without the option's name (exit 1)."""
    argv, message = BAD_OPTIONS[case]
    out = tmp_path / "out"
    assert main([a.replace("{out}", str(out)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"wsireg-flow: error: {message}"]
    assert not out.exists()


@pytest.mark.parametrize(
    "preset", sorted(p.name for p in DEFAULT_YAML.parent.glob("*.yaml") if p != DEFAULT_YAML)
)
def test_every_preset_loads_and_changes_only_what_it_names(preset: str) -> None:
    path = DEFAULT_YAML.parent / preset
    cfg = load_config(path)
    given = yaml.safe_load(path.read_text())
    default = Config().model_dump()
    got = cfg.model_dump()
    for section, values in given.items():
        for key, value in values.items():
            assert got[section][key] == value
    changed = {(s, k) for s in default for k in default[s] if got[s][k] != default[s][k]}
    assert changed == {(s, k) for s, v in given.items() for k in v}


def test_quiet_and_progress_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """`--progress --quiet` printed progress: one of them was ignored without a word."""
    with pytest.raises(SystemExit) as exc:
        main(["config", "--quiet", "--progress"])
    assert exc.value.code == 2
    assert "argument --progress: not allowed with argument --quiet" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["auto", "4GB", "2GiB", "0.5", "1", "0"])
def test_memory_limits_dask_reads_are_accepted(value: str) -> None:
    """A share of memory ('0.5'), no limit ('0') and sizes with a unit, as Dask reads them."""
    assert Config.model_validate({"dask": {"memory_limit": value}}).dask.memory_limit == value
