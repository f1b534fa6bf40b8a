"""Tests for wsireg_flow.landmarks: ANHIR landmark CSVs, pair tables and path safety."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from wsireg_flow.errors import InputError
from wsireg_flow.landmarks import (
    PAIR_TABLE_COLUMNS,
    Pair,
    image_diagonal,
    paired,
    read_landmarks,
    read_pair_table,
    resolve_path,
    write_landmarks,
    write_pair_table,
)

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "anhir-sample"
DATASET = SAMPLE / "dataset.csv"
KIDNEY_HE = SAMPLE / "rat-kidney_" / "scale-5pc" / "Rat-Kidney_HE.csv"
KIDNEY_CK = SAMPLE / "rat-kidney_" / "scale-5pc" / "Rat-Kidney_PanCytokeratin.csv"
LES3_HE = SAMPLE / "lung-lesion_3" / "scale-5pc" / "29-041-Izd2-w35-He-les3.csv"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ read_landmarks


def test_read_real_landmarks_integer_file() -> None:
    points = read_landmarks(KIDNEY_HE)
    assert points.shape == (71, 2)
    assert points.dtype == np.float64
    # first rows of the file: "1,63,309" and "2,77,441" -> (x, y) = (column, row)
    np.testing.assert_array_equal(points[:2], [[63.0, 309.0], [77.0, 441.0]])


def test_read_real_landmarks_decimal_file() -> None:
    points = read_landmarks(LES3_HE)
    assert points.shape == (80, 2)
    np.testing.assert_array_equal(points[0], [212.4, 158.4])


def test_read_columns_by_name_with_extra_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.csv", "Y,label,X\n2.5,a,1\n4,b,3.25\n")
    np.testing.assert_array_equal(read_landmarks(path), [[1.0, 2.5], [3.25, 4.0]])


def test_read_empty_cells_and_nan_become_nan(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.csv", ",X,Y\n1,,2\n2,nan,NaN\n3,1.5,2.5\n")
    points = read_landmarks(path)
    assert np.isnan(points[0, 0]) and points[0, 1] == 2.0
    assert np.isnan(points[1]).all()
    np.testing.assert_array_equal(points[2], [1.5, 2.5])


def test_read_tolerates_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(b"\xef\xbb\xbf,X,Y\r\n1,10,20\r\n")
    np.testing.assert_array_equal(read_landmarks(path), [[10.0, 20.0]])


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        read_landmarks(tmp_path / "absent.csv")


@pytest.mark.parametrize("content", ["", "\n\n", "   \n"])
def test_read_empty_file(tmp_path: Path, content: str) -> None:
    path = _write(tmp_path / "empty.csv", content)
    with pytest.raises(InputError, match="empty file") as info:
        read_landmarks(path)
    assert "empty.csv" in str(info.value)


def test_read_header_only(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no landmark rows"):
        read_landmarks(_write(tmp_path / "h.csv", ",X,Y\n"))


def test_read_missing_column_names_column_and_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "noy.csv", ",X,Z\n1,2,3\n")
    with pytest.raises(InputError) as info:
        read_landmarks(path)
    message = str(info.value)
    assert "missing landmark column(s) 'Y' (found" in message and "noy.csv" in message
    assert "\n" not in message


def test_read_column_names_are_case_sensitive(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"missing landmark column\(s\) 'X', 'Y'"):
        read_landmarks(_write(tmp_path / "lower.csv", ",x,y\n1,2,3\n"))


def test_read_non_numeric_value_names_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.csv", ",X,Y\n1,1,2\n2,3,abc\n")
    with pytest.raises(InputError, match=r"non-numeric Y value 'abc' at row 2 \(line 3\)"):
        read_landmarks(path)


def test_read_infinite_value(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="infinite X value"):
        read_landmarks(_write(tmp_path / "inf.csv", ",X,Y\n1,inf,2\n"))


def test_read_ragged_row(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="line 3 has 2 fields but the header has 3"):
        read_landmarks(_write(tmp_path / "ragged.csv", ",X,Y\n1,1,2\n2,3\n"))


def test_read_duplicate_column(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="duplicate column 'X'"):
        read_landmarks(_write(tmp_path / "dup.csv", ",X,X,Y\n1,1,2,3\n"))


# ------------------------------------------------------------------ write_landmarks


def test_write_landmarks_exact_text(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    write_landmarks(path, np.array([[1.5, 2.0], [np.nan, 0.1]]))
    assert path.read_text() == ",X,Y\n1,1.5,2.0\n2,,0.1\n"


def test_write_read_round_trip_real_file(tmp_path: Path) -> None:
    original = read_landmarks(LES3_HE)
    path = tmp_path / "copy.csv"
    write_landmarks(path, original)
    np.testing.assert_array_equal(read_landmarks(path), original)


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    write_landmarks(path, [[1.0, 2.0]])
    write_landmarks(path, [[3.0, 4.0], [5.0, 6.0]])  # replace an existing file
    np.testing.assert_array_equal(read_landmarks(path), [[3.0, 4.0], [5.0, 6.0]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_write_rejects_bad_shape_and_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    write_landmarks(path, [[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        write_landmarks(path, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="infinite"):
        write_landmarks(path, [[np.inf, 0.0]])
    np.testing.assert_array_equal(read_landmarks(path), [[1.0, 2.0]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=os.environ.get("WSIREG_FUZZ_EXPLORE", "") != "1",  # see tests/test_fuzz.py
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    points=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 20), st.just(2)),
        elements=st.floats(allow_nan=False, allow_infinity=False, width=64),
    )
)
def test_write_read_round_trip_property(tmp_path: Path, points: np.ndarray) -> None:
    path = tmp_path / "prop.csv"
    write_landmarks(path, points)
    back = read_landmarks(path)
    assert back.shape == points.shape
    np.testing.assert_allclose(back, points, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(back, points)  # repr formatting is in fact lossless


# ------------------------------------------------------------------ paired


def test_paired_truncates_to_min_rows() -> None:
    target = np.arange(10, dtype=float).reshape(5, 2)
    source = np.arange(6, dtype=float).reshape(3, 2) + 100
    t, s = paired(target, source)
    assert t.shape == s.shape == (3, 2)
    np.testing.assert_array_equal(t, target[:3])
    np.testing.assert_array_equal(s, source)


def test_paired_real_rat_kidney_71_vs_69() -> None:
    target, source = read_landmarks(KIDNEY_HE), read_landmarks(KIDNEY_CK)
    assert (len(target), len(source)) == (71, 69)
    t, s = paired(target, source)
    assert len(t) == len(s) == 69
    np.testing.assert_array_equal(t, target[:69])


def test_paired_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="target"):
        paired(np.zeros(4), np.zeros((4, 2)))


# ------------------------------------------------------------------ image_diagonal


def test_image_diagonal() -> None:
    assert image_diagonal(3, 4) == 5.0
    # sqrt(787^2 + 1164^2) = sqrt(1974265) = 1405.085... -> 1405.1
    assert image_diagonal(787, 1164) == 1405.1
    assert image_diagonal(733, 890) == 1153.0  # 1152.999... -> 1153.0
    with pytest.raises(ValueError):
        image_diagonal(0, 10)


# ------------------------------------------------------------------ pair tables


def test_read_real_pair_table() -> None:
    pairs = read_pair_table(DATASET)
    assert len(pairs) == 8
    first = pairs[0]
    assert first.index == "0"
    assert first.target_image == "rat-kidney_/scale-5pc/Rat-Kidney_HE.jpg"
    assert first.source_image == "rat-kidney_/scale-5pc/Rat-Kidney_PanCytokeratin.jpg"
    assert first.target_landmarks == "rat-kidney_/scale-5pc/Rat-Kidney_HE.csv"
    assert first.source_landmarks == "rat-kidney_/scale-5pc/Rat-Kidney_PanCytokeratin.csv"
    assert first.status == "training"
    assert first.image_size == (787, 1164)
    assert first.image_diagonal == 1405.1
    assert first.warped_target_landmarks == first.warped_source_landmarks == ""
    assert first.execution_time_minutes is None
    assert first.extra == {}
    assert [p.index for p in pairs] == [str(i) for i in range(8)]
    for pair in pairs:  # the table's diagonal is sqrt(H^2 + W^2) of its size, rounded to 0.1
        assert pair.image_size is not None
        assert image_diagonal(*pair.image_size) == pair.image_diagonal
        assert resolve_path(SAMPLE, pair.target_landmarks).is_file()
        assert resolve_path(SAMPLE, pair.source_landmarks).is_file()


def test_pair_table_round_trip_is_byte_identical(tmp_path: Path) -> None:
    out = tmp_path / "dataset.csv"
    write_pair_table(out, read_pair_table(DATASET))
    assert out.read_bytes() == DATASET.read_bytes()
    assert read_pair_table(out) == read_pair_table(DATASET)


def test_pair_table_reads_by_name_and_keeps_extra_columns(tmp_path: Path) -> None:
    text = (
        "note,Source landmarks,Target landmarks,Source image,Target image,,status\n"
        "hello,s.csv,,s.jpg,t.jpg,7,evaluation\n"
    )
    path = _write(tmp_path / "shuffled.csv", text)
    (pair,) = read_pair_table(path)
    assert pair == Pair(
        index="7",
        target_image="t.jpg",
        source_image="s.jpg",
        target_landmarks="",
        source_landmarks="s.csv",
        status="evaluation",
        extra={"note": "hello"},
    )
    out = tmp_path / "out.csv"
    write_pair_table(out, [pair])
    header = out.read_text().splitlines()[0].split(",")
    assert header == [*PAIR_TABLE_COLUMNS, "note"]
    assert read_pair_table(out) == [pair]


def test_pair_table_optional_columns_absent(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "min.csv",
        "Target image,Source image,Target landmarks,Source landmarks\nt.jpg,s.jpg,t.csv,s.csv\n"
        "t2.jpg,s2.jpg,t2.csv,s2.csv\n",
    )
    pairs = read_pair_table(path)
    assert [p.index for p in pairs] == ["0", "1"]  # no index column: 0-based row position
    assert pairs[0].status == ""
    assert pairs[0].image_size is None and pairs[0].image_diagonal is None


def test_pair_table_writes_outputs(tmp_path: Path) -> None:
    pair = dataclasses.replace(
        read_pair_table(DATASET)[1],
        warped_source_landmarks="warped/1_source.csv",
        warped_target_landmarks="warped/1_target.csv",
        execution_time_minutes=0.145,
    )
    out = tmp_path / "results.csv"
    write_pair_table(out, [pair])
    line = out.read_text().splitlines()[1]
    assert line.endswith(
        ',training,"(733, 890)",1153.0,warped/1_target.csv,warped/1_source.csv,0.145'
    )
    assert read_pair_table(out) == [pair]


def test_pair_table_missing_columns_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "broken_table.csv", ",Target image,Source image\n0,t.jpg,s.jpg\n")
    with pytest.raises(InputError) as info:
        read_pair_table(path)
    message = str(info.value)
    assert "broken_table.csv" in message
    assert "'Target landmarks', 'Source landmarks'" in message
    assert "\n" not in message


def test_pair_table_missing_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        read_pair_table(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="empty file"):
        read_pair_table(_write(tmp_path / "empty.csv", ""))
    header_only = ",".join(PAIR_TABLE_COLUMNS) + "\n"
    with pytest.raises(InputError, match="no pair rows"):
        read_pair_table(_write(tmp_path / "header.csv", header_only))


@pytest.mark.parametrize(
    ("cells", "pattern"),
    [
        ('"787x1164",1405.1,', r"line 2: 'Image size \[pixels\]' must look like '\(H, W\)'"),
        ('"(787, 1164)",abc,', r"line 2: non-numeric 'Image diagonal \[pixels\]' value 'abc'"),
        ('"(787, 1164)",-3,', r"line 2: 'Image diagonal \[pixels\]' must be a finite positive"),
        ('"(787, 1164)",1405.1,nan', r"line 2: 'Execution time \[minutes\]' must be a finite"),
    ],
)
def test_pair_table_malformed_cells(tmp_path: Path, cells: str, pattern: str) -> None:
    header = (
        ",Target image,Source image,Target landmarks,Source landmarks,"
        "Image size [pixels],Image diagonal [pixels],Execution time [minutes]\n"
    )
    path = _write(tmp_path / "bad.csv", header + f"0,t.jpg,s.jpg,t.csv,s.csv,{cells}\n")
    with pytest.raises(InputError, match=pattern):
        read_pair_table(path)


def test_pair_table_duplicate_index_and_empty_image(tmp_path: Path) -> None:
    header = ",Target image,Source image,Target landmarks,Source landmarks\n"
    dup = _write(tmp_path / "dup.csv", header + "0,t.jpg,s.jpg,,\n0,t.jpg,s.jpg,,\n")
    with pytest.raises(InputError, match="line 3: duplicate index '0'"):
        read_pair_table(dup)
    empty = _write(tmp_path / "empty_img.csv", header + "0,,s.jpg,,\n")
    with pytest.raises(InputError, match="line 2: empty 'Target image'"):
        read_pair_table(empty)


def test_write_pair_table_rejects_clashing_extra_column(tmp_path: Path) -> None:
    pair = Pair("0", "t.jpg", "s.jpg", "", "s.csv")
    with pytest.raises(ValueError, match="clash"):
        write_pair_table(tmp_path / "x.csv", [pair], columns=["status"])


# ------------------------------------------------------------------ resolve_path


def test_resolve_path_inside_root(tmp_path: Path) -> None:
    assert resolve_path(tmp_path, "a/b.csv") == tmp_path / "a" / "b.csv"
    assert resolve_path(tmp_path, "a/./c/../b.csv") == tmp_path / "a" / "b.csv"
    assert resolve_path(tmp_path, "a/../b.csv") == tmp_path / "b.csv"


@pytest.mark.parametrize(
    "relative",
    [
        "../secret.csv",
        "a/../../secret.csv",
        "..",
        "/etc/passwd",
        "C:\\data\\x.csv",
        "",
        ".",
        "a\x00",
    ],
)
def test_resolve_path_refuses_escape(tmp_path: Path, relative: str) -> None:
    with pytest.raises(InputError) as info:
        resolve_path(tmp_path, relative)
    assert "\n" not in str(info.value)


def test_resolve_path_message_names_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"refusing path '\.\./x\.csv': it escapes the root"):
        resolve_path(tmp_path, "../x.csv")


def test_nan_written_values_are_not_confused_with_numbers(tmp_path: Path) -> None:
    path = tmp_path / "n.csv"
    write_landmarks(path, [[math.nan, math.nan]])
    assert np.isnan(read_landmarks(path)).all()


def test_landmark_files_of_different_lengths_are_paired_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows are paired over the shorter file (ANHIR: rat-kidney has 71 vs 69); metrics.json
    records both counts, and the log says so (a swapped file once went unnoticed)."""
    import logging

    from wsireg_flow.pipeline import landmark_outputs
    from wsireg_flow.transform import Transform

    shift = np.array([5.0, -3.0])  # target -> source translation, (x, y) px
    affine = np.eye(3)
    affine[:2, 2] = shift
    rng = np.random.default_rng(0)
    target = rng.uniform(10, 90, size=(6, 2))
    source = np.vstack([target[:4] + shift, rng.uniform(10, 90, size=(3, 2))])  # 7 rows
    write_landmarks(tmp_path / "t.csv", target)
    write_landmarks(tmp_path / "s.csv", source)
    transform = Transform(affine, None, None, (100, 100), (100, 100))
    with caplog.at_level(logging.WARNING, logger="wsireg_flow.pipeline"):
        stats = landmark_outputs(transform, tmp_path, tmp_path / "t.csv", tmp_path / "s.csv")
    assert stats is not None
    assert (stats["n_target_landmarks"], stats["n_source_landmarks"]) == (6, 7)
    assert stats["n_landmarks"] == 6
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 't.csv'} has 6 landmarks, {tmp_path / 's.csv'} has 7: rows 1-6 of each "
        "are paired (ANHIR convention)"
    ]
    # every source row is warped, the paired ones land exactly on their targets
    warped = read_landmarks(tmp_path / "warped-source-landmarks.csv")
    assert warped.shape == (7, 2)
    np.testing.assert_allclose(warped[:4], target[:4], atol=1e-9)
