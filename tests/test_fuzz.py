"""Property-based tests (hypothesis) of the readers of untrusted files.

Landmark CSVs, pair tables, YAML configs and job manifests come from users: whatever their
content, a reader either returns well-formed data or raises its one-line user error
(:class:`~wsireg_flow.errors.InputError`, or :class:`~wsireg_flow.errors.ConfigError` for
configs); never another exception. Writers and readers round-trip. Paths from tables and
manifests never leave their root.

Examples run with a fixed budget each (``max_examples``); the whole module takes ~15 s. They
are derandomised (the same examples on every run); ``WSIREG_FUZZ_EXPLORE=1`` explores freshly.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from wsireg_flow.config import Config, config_to_yaml, load_config
from wsireg_flow.errors import ConfigError, InputError
from wsireg_flow.landmarks import (
    PAIR_TABLE_COLUMNS,
    REQUIRED_PAIR_COLUMNS,
    Pair,
    read_landmarks,
    read_pair_table,
    resolve_path,
    write_landmarks,
    write_pair_table,
)
from wsireg_flow.manifest import Manifest, load_manifest, manifest_config

# Fixed examples by default (the suite gives the same verdict on every run, as CI needs);
# WSIREG_FUZZ_EXPLORE=1 draws fresh random examples to look for new failures.
_FIXED = os.environ.get("WSIREG_FUZZ_EXPLORE", "") != "1"
FAST = settings(max_examples=150, deadline=None, database=None, derandomize=_FIXED)
MEDIUM = settings(max_examples=250, deadline=None, database=None, derandomize=_FIXED)

# YAML that PyYAML's safe loader fails on with something other than a YAMLError
YAML_TRAPS = [
    "io:\n  chunk: 2001-02-30\n",  # implicit timestamp, invalid date -> ValueError
    "io: {chunk: !!int x}\n",  # explicit tag, bad literal -> ValueError
    "a: !!float y\n",
    "a: !!timestamp 2001-99-99\n",
    "[" * 3000,  # deep nesting -> RecursionError
    "{a: " * 3000,
    "\x00",
    "- a\n",
    "42\n",
    "!!python/object/apply:os.system ['echo owned']\n",
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _write_bytes(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


# -- landmark CSVs ---------------------------------------------------------------------------
def _check_points(points: Any) -> None:
    assert isinstance(points, np.ndarray)
    assert points.dtype == np.float64
    assert points.ndim == 2 and points.shape[1] == 2 and points.shape[0] >= 1
    assert not np.isinf(points).any()


def _read_landmarks_or_input_error(path: Path) -> np.ndarray | None:
    try:
        points = read_landmarks(path)
    except InputError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), str(exc)
        return None
    _check_points(points)
    return points


@FAST
@given(data=st.binary(max_size=600))
@example(data=b"\xff\xfe,X,Y\n1,2,3\n")
@example(data=b",X,Y\n1,2\x00,3\n")
@example(data=b"")
def test_read_landmarks_arbitrary_bytes(scratch: Path, data: bytes) -> None:
    _read_landmarks_or_input_error(_write_bytes(scratch, "bytes.csv", data))


@FAST
@given(text=st.text(max_size=300))
@example(text=",X,Y\n1,1e400,2\n")
@example(text='X,Y\n"1\n2",3\n')
@example(text="X,Y\n" + "9" * 200_000 + ",1\n")  # field larger than csv's limit
def test_read_landmarks_arbitrary_text(scratch: Path, text: str) -> None:
    _read_landmarks_or_input_error(_write_bytes(scratch, "text.csv", text.encode("utf-8")))


_COORD_CELLS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(["", " ", "nan", "NaN", " 12.5 ", "1e400", "-inf", "1_0", "abc", "0x10"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=6),
)
_HEADER_NAMES = st.sampled_from(["", "X", "Y", " X ", "Y\t", "x", "y", "Z", "X Y", "id"])


def _expected_coordinate(cell: str) -> float | None:
    """What a landmark cell must read as (None: the file must be refused)."""
    text = cell.strip()
    if not text:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        return None
    return None if math.isinf(value) else value


@MEDIUM
@given(
    header=st.lists(_HEADER_NAMES, min_size=2, max_size=4),
    cells=st.lists(st.lists(_COORD_CELLS, min_size=4, max_size=4), max_size=6),
)
@example(header=["X", "Y"], cells=[["0\r", "0.0", "0.0", "0.0"]])  # a CR inside a cell
def test_read_landmarks_follows_the_columns_by_name(
    scratch: Path, header: list[str], cells: list[list[str]]
) -> None:
    """An oracle: values are float(cell) of the X and Y columns; anything else is refused."""
    rows = [r[: len(header)] for r in cells]
    buffer = io.StringIO()
    # with "\r\n" as terminator the writer quotes cells holding a CR or LF, so that the file
    # holds exactly these cells (an unquoted CR would end the line: a ragged row, refused)
    csv.writer(buffer, lineterminator="\r\n").writerows([header, *rows])
    path = _write_bytes(scratch, "table.csv", buffer.getvalue().encode("utf-8"))
    names = [h.strip() for h in header]
    expected: np.ndarray | None = None
    if len(set(names)) == len(names) and {"X", "Y"} <= set(names) and rows:
        ix, iy = names.index("X"), names.index("Y")
        values = [(_expected_coordinate(r[ix]), _expected_coordinate(r[iy])) for r in rows]
        if all(v is not None for pair in values for v in pair):
            expected = np.array(values, np.float64)
    points = _read_landmarks_or_input_error(path)
    if expected is None:
        assert points is None
    else:
        assert points is not None
        np.testing.assert_array_equal(points, expected)


_FINITE_OR_NAN = st.floats(allow_nan=True, allow_infinity=False, width=64)


@MEDIUM
@given(points=st.lists(st.tuples(_FINITE_OR_NAN, _FINITE_OR_NAN), min_size=1, max_size=20))
def test_landmarks_round_trip_keeps_nan_and_signed_zero(
    scratch: Path, points: list[tuple[float, float]]
) -> None:
    """(test_landmarks.py covers finite points; here NaN cells and -0.0 too)"""
    arr = np.array(points, np.float64)
    path = scratch / "round-trip.csv"
    write_landmarks(path, arr)
    back = read_landmarks(path)
    np.testing.assert_array_equal(back, arr)  # NaN where NaN, every float bit-exact
    finite = np.isfinite(arr)
    assert np.array_equal(np.signbit(back[finite]), np.signbit(arr[finite]))  # -0.0 stays


# -- pair tables ----------------------------------------------------------------------------
def _read_pairs_or_input_error(path: Path) -> list[Pair] | None:
    try:
        pairs = read_pair_table(path)
    except InputError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), str(exc)
        return None
    assert isinstance(pairs, list) and len(pairs) >= 1
    assert all(isinstance(p, Pair) and p.target_image and p.source_image for p in pairs)
    assert len({p.index for p in pairs}) == len(pairs)
    return pairs


@FAST
@given(data=st.binary(max_size=600))
def test_read_pair_table_arbitrary_bytes(scratch: Path, data: bytes) -> None:
    _read_pairs_or_input_error(_write_bytes(scratch, "pairs-bytes.csv", data))


@FAST
@given(text=st.text(max_size=300))
def test_read_pair_table_arbitrary_text(scratch: Path, text: str) -> None:
    _read_pairs_or_input_error(_write_bytes(scratch, "pairs-text.csv", text.encode("utf-8")))


_TABLE_CELLS = st.one_of(
    st.sampled_from(
        [
            "",
            "a/b.jpg",
            "../x.jpg",
            "/abs/x.jpg",
            " training ",
            "(660, 895)",
            "(0, 5)",
            "(1,2,3)",
            "1112.0",
            "-1",
            "nan",
            "inf",
            "0",
            "0.25",
            "0.04",
            "1e3",
        ]
    ),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8),
)
_TABLE_COLUMNS = st.lists(
    st.sampled_from([*PAIR_TABLE_COLUMNS, "tissue", "note", " status "]),
    min_size=1,
    max_size=8,
    unique=True,
)


@MEDIUM
@given(
    columns=_TABLE_COLUMNS,
    required=st.booleans(),
    rows=st.lists(st.lists(_TABLE_CELLS, min_size=14, max_size=14), max_size=5),
)
def test_read_pair_table_structured_and_round_trip(
    scratch: Path, columns: list[str], required: bool, rows: list[list[str]]
) -> None:
    header = list(dict.fromkeys([*columns, *(REQUIRED_PAIR_COLUMNS if required else [])]))
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *[r[: len(header)] for r in rows]])
    path = _write_bytes(scratch, "pairs.csv", buffer.getvalue().encode("utf-8"))
    pairs = _read_pairs_or_input_error(path)
    if pairs is None:
        return
    assert set(REQUIRED_PAIR_COLUMNS) <= {h.strip() for h in header}
    for p in pairs:
        assert p.image_size is None or min(p.image_size) > 0
        assert p.image_diagonal is None or (
            math.isfinite(p.image_diagonal) and p.image_diagonal > 0
        )
        assert p.execution_time_minutes is None or p.execution_time_minutes >= 0
    # round trip: what is written reads back the same (the diagonal with one decimal, or its
    # full digits when one decimal would round it to 0)
    out = scratch / "pairs-written.csv"
    write_pair_table(out, pairs)
    again = read_pair_table(out)
    assert len(again) == len(pairs)
    for a, b in zip(pairs, again, strict=True):
        assert (a.index, a.target_image, a.source_image, a.status) == (
            b.index,
            b.target_image,
            b.source_image,
            b.status,
        )
        assert (a.target_landmarks, a.source_landmarks, a.image_size) == (
            b.target_landmarks,
            b.source_landmarks,
            b.image_size,
        )
        assert a.execution_time_minutes == b.execution_time_minutes
        assert a.extra == b.extra
        if a.image_diagonal is None:
            assert b.image_diagonal is None
        else:
            assert b.image_diagonal == pytest.approx(
                a.image_diagonal, abs=0.05 + 1e-9 * a.image_diagonal
            )
    write_pair_table(out, again)
    assert read_pair_table(out) == again  # a fixed point after one pass


def test_pair_table_round_trip_of_a_tiny_diagonal(scratch: Path) -> None:
    path = scratch / "tiny-diagonal.csv"
    write_pair_table(path, [Pair("0", "a.jpg", "b.jpg", "", "", image_diagonal=0.04)])
    (back,) = read_pair_table(path)
    assert back.image_diagonal == pytest.approx(0.04)


# -- configs ----------------------------------------------------------------------------------
_SECTION_KEYS = {
    name: list(type(getattr(Config(), name)).model_fields) for name in Config.model_fields
}
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**9), 10**9),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.sampled_from(["lz4", "zstd", "sift", "orb", "affine", "ecc", "dis", "threads", "4GB"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def _config_documents(draw: st.DrawFn) -> dict[Any, Any]:
    """Nested dicts mostly shaped like a config: real sections and keys, any values."""
    doc: dict[Any, Any] = {}
    for section in draw(st.lists(st.sampled_from([*_SECTION_KEYS, "colour"]), max_size=3)):
        keys = _SECTION_KEYS.get(section, ["x"])
        entries = draw(st.dictionaries(st.sampled_from([*keys, "tiel", 3]), _VALUES, max_size=3))
        doc[section] = (
            draw(st.one_of(st.just(entries), _SCALARS)) if draw(st.booleans()) else entries
        )
    if draw(st.booleans()):
        doc[draw(st.one_of(st.text(max_size=4), st.integers()))] = draw(_VALUES)
    return doc


def _load_config_or_error(path: Path) -> Config | None:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), str(exc)
        return None
    assert isinstance(cfg, Config)
    return cfg


@MEDIUM
@given(doc=_config_documents())
def test_load_config_documents_give_a_config_or_config_error(
    scratch: Path, doc: dict[Any, Any]
) -> None:
    path = _write_bytes(scratch, "config.yaml", yaml.safe_dump(doc).encode("utf-8"))
    cfg = _load_config_or_error(path)
    if cfg is None:
        return
    # round trip: the effective config written as YAML loads back equal
    out = _write_bytes(scratch, "config-out.yaml", config_to_yaml(cfg).encode("utf-8"))
    assert load_config(out) == cfg


@FAST
@given(text=st.one_of(st.text(max_size=200), st.sampled_from(YAML_TRAPS)))
@example(text="io:\n  chunk: 2001-02-30\n")
@example(text="[" * 3000)
def test_load_config_arbitrary_text(scratch: Path, text: str) -> None:
    _load_config_or_error(_write_bytes(scratch, "config-text.yaml", text.encode("utf-8")))


@FAST
@given(data=st.binary(max_size=200))
def test_load_config_arbitrary_bytes(scratch: Path, data: bytes) -> None:
    _load_config_or_error(_write_bytes(scratch, "config-bytes.yaml", data))


@pytest.mark.parametrize("text", YAML_TRAPS)
def test_yaml_traps_are_config_errors(scratch: Path, text: str) -> None:
    path = _write_bytes(scratch, "trap.yaml", text.encode("utf-8"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "io: {pixel_size_um: .inf}\n",
        "rigid: {scale_max: .inf}\n",
        "rigid: {max_shear: .inf}\n",
        "nonrigid: {smooth_sigma: .inf}\n",
    ],
)
def test_config_refuses_infinite_numbers(scratch: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load_config(_write_bytes(scratch, "inf.yaml", text.encode("utf-8")))


# -- manifests --------------------------------------------------------------------------------
_MANIFEST_FIELDS = list(Manifest.model_fields)


@st.composite
def _manifest_documents(draw: st.DrawFn) -> dict[Any, Any]:
    doc: dict[Any, Any] = {}
    if draw(st.booleans()):
        doc["kind"] = draw(st.one_of(st.sampled_from(["pair", "stack", "Pair", ""]), _SCALARS))
    for key in draw(st.lists(st.sampled_from([*_MANIFEST_FIELDS, "colour"]), max_size=5)):
        if key == "config":
            doc[key] = draw(st.one_of(_config_documents(), _SCALARS))
        elif key in ("sections", "landmarks"):
            doc[key] = draw(
                st.one_of(
                    st.lists(st.sampled_from(["a.svs", "../b.svs", "/c.svs"]), max_size=3), _VALUES
                )
            )
        else:
            doc[key] = draw(st.one_of(st.sampled_from(["a.svs", "../x.svs", "/abs.svs"]), _VALUES))
    return doc


def _load_manifest_or_error(path: Path) -> Manifest | None:
    try:
        m = load_manifest(path)
    except InputError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), str(exc)
        return None
    assert isinstance(m, Manifest) and m.kind in ("pair", "stack")
    assert (m.target and m.source) if m.kind == "pair" else (m.sections or m.folder)
    return m


@MEDIUM
@given(doc=_manifest_documents())
def test_load_manifest_documents_give_a_manifest_or_input_error(
    scratch: Path, doc: dict[Any, Any]
) -> None:
    path = _write_bytes(scratch, "job.yaml", yaml.safe_dump(doc).encode("utf-8"))
    m = _load_manifest_or_error(path)
    if m is None:
        return
    try:  # the manifest's config overrides: a config or a one-line ConfigError
        cfg = manifest_config(m, Config(), path)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(cfg, Config)
    # round trip: the validated manifest, dumped, loads back the same (compared as YAML: NaN)
    text = yaml.safe_dump(m.model_dump(exclude_none=True))
    again = load_manifest(_write_bytes(scratch, "job-again.yaml", text.encode("utf-8")))
    assert yaml.safe_dump(again.model_dump(exclude_none=True)) == text


@FAST
@given(text=st.one_of(st.text(max_size=200), st.sampled_from(YAML_TRAPS)))
@example(text="kind: pair\ntarget: 2001-02-30\nsource: b\n")
def test_load_manifest_arbitrary_text(scratch: Path, text: str) -> None:
    _load_manifest_or_error(_write_bytes(scratch, "job-text.yaml", text.encode("utf-8")))


# -- paths from tables and manifests ------------------------------------------------------------
_SEGMENTS = st.sampled_from(["..", ".", "a", "b c", "", "~", "C:", "\\\\srv", "..\\x", "\x00"])


@MEDIUM
@given(
    rel=st.one_of(
        st.lists(_SEGMENTS, min_size=1, max_size=6).flatmap(
            lambda parts: st.sampled_from(["/", "\\", "//"]).map(lambda sep: sep.join(parts))
        ),
        st.text(max_size=30),
    )
)
@example(rel="a/../../etc/passwd")
@example(rel="/etc/passwd")
@example(rel="C:\\Windows")
def test_resolve_path_stays_under_the_root(rel: str) -> None:
    root = Path("/data/root")
    try:
        p = resolve_path(root, rel)
    except InputError as exc:
        assert str(exc).startswith("refusing ") or str(exc) == "empty path in the pair table"
        assert "\n" not in str(exc)
        return
    assert os.path.commonpath([root, p]) == str(root)
    inner = p.relative_to(root)
    assert inner.parts and ".." not in inner.parts and not inner.is_absolute()
