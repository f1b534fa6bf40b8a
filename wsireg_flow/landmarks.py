"""ANHIR landmark files and pair tables: reading, writing and safe path resolution.

Coordinate convention (used by every function here): a landmark is a point ``(x, y)`` in pixels
of one image at one scale, with the origin at the top-left corner of the top-left pixel as in
ImageJ and ANHIR: ``x`` is the column coordinate (grows to the right) and ``y`` is the row
coordinate (grows downwards). Point arrays have shape ``(N, 2)`` with columns ``(x, y)``.

Landmark CSV (ANHIR / BIRL format)::

    ,X,Y
    1,63.0,309.0
    2,77.0,441.0

An unnamed index column counting from 1, then ``X`` and ``Y``. Row ``i`` of a target file
corresponds to row ``i`` of the source file; when the counts differ, the first ``min(N)`` rows
are used (:func:`paired`).

Pair table (ANHIR ``dataset_medium.csv``): an unnamed index column, ``Target image``,
``Source image``, ``Target landmarks``, ``Source landmarks``, ``status``,
``Image size [pixels]`` (``"(H, W)"`` of the target image), ``Image diagonal [pixels]``,
``Warped target landmarks``, ``Warped source landmarks``, ``Execution time [minutes]``.
Columns are always found by name, never by position. Paths in the table are relative to the
dataset root; resolve them with :func:`resolve_path`, which refuses paths leaving the root.

Every malformed input raises :class:`~wsireg_flow.errors.InputError` with a one-line message
that names the file and the problem. Programming errors (wrong array shapes passed by code)
raise :class:`ValueError`. Writes are atomic: a temporary file in the destination directory is
written, flushed to disk and renamed over the destination.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import numpy as np

from wsireg_flow.errors import InputError

__all__ = [
    "COL_DIAGONAL",
    "COL_EXECUTION_TIME",
    "COL_IMAGE_SIZE",
    "COL_INDEX",
    "COL_SOURCE_IMAGE",
    "COL_SOURCE_LANDMARKS",
    "COL_STATUS",
    "COL_TARGET_IMAGE",
    "COL_TARGET_LANDMARKS",
    "COL_WARPED_SOURCE",
    "COL_WARPED_TARGET",
    "PAIR_TABLE_COLUMNS",
    "REQUIRED_PAIR_COLUMNS",
    "Pair",
    "image_diagonal",
    "paired",
    "read_landmarks",
    "read_pair_table",
    "resolve_path",
    "write_landmarks",
    "write_pair_table",
]

COL_X = "X"
COL_Y = "Y"

COL_INDEX = ""
COL_TARGET_IMAGE = "Target image"
COL_SOURCE_IMAGE = "Source image"
COL_TARGET_LANDMARKS = "Target landmarks"
COL_SOURCE_LANDMARKS = "Source landmarks"
COL_STATUS = "status"
COL_IMAGE_SIZE = "Image size [pixels]"
COL_DIAGONAL = "Image diagonal [pixels]"
COL_WARPED_TARGET = "Warped target landmarks"
COL_WARPED_SOURCE = "Warped source landmarks"
COL_EXECUTION_TIME = "Execution time [minutes]"

#: ANHIR column order of a pair table; extra columns are written after these.
PAIR_TABLE_COLUMNS: tuple[str, ...] = (
    COL_INDEX,
    COL_TARGET_IMAGE,
    COL_SOURCE_IMAGE,
    COL_TARGET_LANDMARKS,
    COL_SOURCE_LANDMARKS,
    COL_STATUS,
    COL_IMAGE_SIZE,
    COL_DIAGONAL,
    COL_WARPED_TARGET,
    COL_WARPED_SOURCE,
    COL_EXECUTION_TIME,
)

#: Columns a pair table must have.
REQUIRED_PAIR_COLUMNS: tuple[str, ...] = (
    COL_TARGET_IMAGE,
    COL_SOURCE_IMAGE,
    COL_TARGET_LANDMARKS,
    COL_SOURCE_LANDMARKS,
)

_SIZE_RE = re.compile(r"^\(\s*(\d+)\s*,\s*(\d+)\s*\)$")


# --------------------------------------------------------------------------------------------
# Low-level CSV helpers
# --------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Read a CSV file into a header and ``(line number, cells)`` rows, validating its shape.

    Blank lines are skipped. Header names are stripped of surrounding whitespace; every data
    row must have as many fields as the header.
    """
    if not path.exists():
        raise InputError("file not found", path)
    if not path.is_file():
        raise InputError("not a regular file", path)
    rows: list[tuple[int, list[str]]] = []
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            try:
                for cells in reader:
                    if len(cells) <= 1 and not "".join(cells).strip():
                        continue  # blank line
                    rows.append((reader.line_num, cells))
            except csv.Error as exc:
                raise InputError(f"malformed CSV at line {reader.line_num}: {exc}", path) from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text (byte {exc.start}: {exc.reason})", path) from exc
    except OSError as exc:
        raise InputError(f"cannot read file: {exc.strerror or exc}", path) from exc
    if not rows:
        raise InputError("empty file (no CSV header)", path)
    _, raw_header = rows[0]
    header = [name.strip() for name in raw_header]
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise InputError(f"duplicate column {name!r} in the header", path)
        seen.add(name)
    for line, cells in rows[1:]:
        if len(cells) != len(header):
            raise InputError(
                f"line {line} has {len(cells)} fields but the header has {len(header)}", path
            )
    return header, rows[1:]


def _missing_columns(header: Sequence[str], required: Iterable[str]) -> list[str]:
    present = set(header)
    return [name for name in required if name not in present]


def _format_columns(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: temp file in the same dir, then rename.

    The parent directory must exist. An existing file keeps its permission bits; a new file
    gets ``0o644``.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o644
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _csv_text(rows: Iterable[Sequence[object]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _as_points(points: object, name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) with columns (x, y), got {arr.shape}")
    return arr


def _format_float(value: float) -> str:
    """Shortest text that reads back to exactly the same float; NaN becomes ''."""
    value = float(value)
    return "" if math.isnan(value) else repr(value)


# --------------------------------------------------------------------------------------------
# Landmark files
# --------------------------------------------------------------------------------------------


def _parse_coordinate(cell: str, column: str, row: int, line: int, path: Path) -> float:
    text = cell.strip()
    if not text:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise InputError(
            f"non-numeric {column} value {cell!r} at row {row} (line {line})", path
        ) from None
    if math.isinf(value):
        raise InputError(f"infinite {column} value {cell!r} at row {row} (line {line})", path)
    return value


def read_landmarks(path: str | Path) -> np.ndarray:
    """Read an ANHIR landmark CSV.

    Parameters
    ----------
    path
        CSV file with columns ``X`` and ``Y`` (case-sensitive, found by name; other columns,
        such as the unnamed index column, are ignored).

    Returns
    -------
    numpy.ndarray
        Shape ``(N, 2)``, float64, columns ``(x, y)`` in pixels of the image the file belongs to:
        ``x`` = column, ``y`` = row, origin at the top-left. Rows keep the file order. An empty
        cell or a ``nan`` value becomes NaN (ANHIR counts such a landmark as unregistered).

    Raises
    ------
    InputError
        If the file is missing or unreadable, empty, has no landmark rows, lacks the ``X`` or
        ``Y`` column, has a ragged row, or holds a non-numeric or infinite coordinate.
    """
    path = Path(path)
    header, rows = _read_csv(path)
    missing = _missing_columns(header, (COL_X, COL_Y))
    if missing:
        raise InputError(
            f"missing landmark column(s) {_format_columns(missing)} "
            f"(found {_format_columns(header)})",
            path,
        )
    if not rows:
        raise InputError("no landmark rows after the header", path)
    ix, iy = header.index(COL_X), header.index(COL_Y)
    points = np.empty((len(rows), 2), dtype=np.float64)
    for k, (line, cells) in enumerate(rows):
        points[k, 0] = _parse_coordinate(cells[ix], COL_X, k + 1, line, path)
        points[k, 1] = _parse_coordinate(cells[iy], COL_Y, k + 1, line, path)
    return points


def write_landmarks(path: str | Path, points: np.ndarray) -> None:
    """Write points as an ANHIR landmark CSV (header ``,X,Y``, index from 1), atomically.

    Parameters
    ----------
    path
        Destination file; its directory must exist. An existing file is replaced atomically.
    points
        Shape ``(N, 2)``, columns ``(x, y)`` in pixels (``x`` = column, ``y`` = row, origin
        top-left). Values are written with ``repr`` precision, so reading the file back gives
        exactly the same floats. NaN (an unregistered landmark) is written as an empty cell.

    Raises
    ------
    ValueError
        If ``points`` does not have shape ``(N, 2)`` or holds an infinite value.
    """
    arr = _as_points(points, "points")
    if np.isinf(arr).any():
        raise ValueError("points must not contain infinite values")
    rows: list[list[object]] = [[COL_INDEX, COL_X, COL_Y]]
    rows.extend([i, _format_float(x), _format_float(y)] for i, (x, y) in enumerate(arr, 1))
    _atomic_write_text(Path(path), _csv_text(rows))


def paired(target: np.ndarray, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the first ``min(N_target, N_source)`` rows of both landmark arrays.

    Row ``i`` of the target corresponds to row ``i`` of the source (ANHIR/BIRL convention).

    Parameters
    ----------
    target, source
        Shape ``(N, 2)`` arrays of ``(x, y)`` pixel coordinates (x = column, y = row).

    Returns
    -------
    tuple of numpy.ndarray
        ``(target[:n], source[:n])`` as float64 arrays with ``n = min(len(target), len(source))``.

    Raises
    ------
    ValueError
        If either array does not have shape ``(N, 2)``.
    """
    t = _as_points(target, "target")
    s = _as_points(source, "source")
    n = min(len(t), len(s))
    return t[:n], s[:n]


def image_diagonal(height: int, width: int) -> float:
    """Image diagonal ``sqrt(H**2 + W**2)`` in pixels, rounded to 0.1 (as in ANHIR tables).

    Parameters
    ----------
    height, width
        Image size in pixels (rows, columns); both must be positive.

    Raises
    ------
    ValueError
        If a dimension is not a positive finite number.
    """
    for name, value in (("height", height), ("width", width)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")
    return round(math.hypot(height, width), 1)


# --------------------------------------------------------------------------------------------
# Pair tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One row of an ANHIR pair table.

    Attributes
    ----------
    index
        Value of the unnamed first column (as text). When the table has no unnamed column, the
        0-based row position.
    target_image, source_image
        Image paths as written in the table, relative to the dataset root (see
        :func:`resolve_path`). The source image is registered onto the target image.
    target_landmarks, source_landmarks
        Landmark CSV paths as written, relative to the dataset root; ``''`` when the cell is
        empty (ANHIR evaluation pairs withhold the target landmarks).
    status
        ``'training'`` or ``'evaluation'`` in ANHIR; ``''`` when the cell or the whole column is
        absent.
    image_size
        ``(H, W)`` of the TARGET image in pixels (rows, columns), or ``None`` when the column is
        absent or the cell empty (the caller then measures the image).
    image_diagonal
        Diagonal of the TARGET image in pixels (``sqrt(H**2 + W**2)`` rounded to 0.1), or
        ``None`` when absent or empty.
    warped_target_landmarks, warped_source_landmarks
        Output landmark CSV paths (relative to the folder holding the table), ``''`` if none.
        ``warped_source_landmarks`` holds the source points mapped into the target frame, the
        file the official ANHIR scores use.
    execution_time_minutes
        Wall-clock registration time of the pair in minutes, or ``None``.
    extra
        Cells of columns that are not ANHIR columns, by column name, verbatim, so they survive
        a read/write round trip. Not part of the hash.
    """

    index: str
    target_image: str
    source_image: str
    target_landmarks: str
    source_landmarks: str
    status: str = ""
    image_size: tuple[int, int] | None = None
    image_diagonal: float | None = None
    warped_target_landmarks: str = ""
    warped_source_landmarks: str = ""
    execution_time_minutes: float | None = None
    extra: dict[str, str] = field(default_factory=dict, hash=False)


def _parse_size(cell: str, where: str, path: Path) -> tuple[int, int] | None:
    text = cell.strip()
    if not text:
        return None
    match = _SIZE_RE.match(text)
    if match is None:
        raise InputError(f"{where}: {COL_IMAGE_SIZE!r} must look like '(H, W)', got {cell!r}", path)
    height, width = int(match.group(1)), int(match.group(2))
    if height <= 0 or width <= 0:
        raise InputError(f"{where}: {COL_IMAGE_SIZE!r} must be positive, got {cell!r}", path)
    return height, width


def _parse_optional_float(
    cell: str, column: str, where: str, path: Path, *, positive: bool
) -> float | None:
    text = cell.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{where}: non-numeric {column!r} value {cell!r}", path) from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        kind = "positive" if positive else "non-negative"
        raise InputError(f"{where}: {column!r} must be a finite {kind} number, got {cell!r}", path)
    return value


def read_pair_table(path: str | Path) -> list[Pair]:
    """Read an ANHIR pair table (``dataset_medium.csv``-style), finding columns by name.

    Parameters
    ----------
    path
        CSV file. Required columns: ``Target image``, ``Source image``, ``Target landmarks``,
        ``Source landmarks``. Optional: the unnamed index column, ``status`` (``''`` when
        absent), ``Image size [pixels]`` as ``"(H, W)"`` of the target image and
        ``Image diagonal [pixels]`` (both ``None`` when absent or empty), ``Warped target
        landmarks``, ``Warped source landmarks`` and ``Execution time [minutes]``. Any other
        column is kept in :attr:`Pair.extra`. Cells are stripped of surrounding whitespace.

    Returns
    -------
    list of Pair
        One per data row, in file order. Paths stay as written (relative to the dataset root).

    Raises
    ------
    InputError
        If the file is missing, empty or has no pair rows, a required column is missing (the
        message names them), an index is empty or repeated, an image path is empty, or an image
        size, diagonal or execution time cell is malformed.
    """
    path = Path(path)
    header, rows = _read_csv(path)
    missing = _missing_columns(header, REQUIRED_PAIR_COLUMNS)
    if missing:
        raise InputError(
            f"missing required column(s) {_format_columns(missing)} "
            f"(found {_format_columns(header)})",
            path,
        )
    if not rows:
        raise InputError("no pair rows after the header", path)
    known = set(PAIR_TABLE_COLUMNS)
    extra_columns = [name for name in header if name not in known]
    has_index = COL_INDEX in header

    pairs: list[Pair] = []
    seen_index: set[str] = set()
    for position, (line, cells) in enumerate(rows):
        row = dict(zip(header, cells, strict=True))
        where = f"line {line}"

        def text(column: str, row: dict[str, str] = row) -> str:
            return row.get(column, "").strip()

        index = text(COL_INDEX) if has_index else str(position)
        if not index:
            raise InputError(f"{where}: empty index (first, unnamed column)", path)
        if index in seen_index:
            raise InputError(f"{where}: duplicate index {index!r}", path)
        seen_index.add(index)
        for column in (COL_TARGET_IMAGE, COL_SOURCE_IMAGE):
            if not text(column):
                raise InputError(f"{where}: empty {column!r}", path)
        pairs.append(
            Pair(
                index=index,
                target_image=text(COL_TARGET_IMAGE),
                source_image=text(COL_SOURCE_IMAGE),
                target_landmarks=text(COL_TARGET_LANDMARKS),
                source_landmarks=text(COL_SOURCE_LANDMARKS),
                status=text(COL_STATUS),
                image_size=_parse_size(text(COL_IMAGE_SIZE), where, path),
                image_diagonal=_parse_optional_float(
                    text(COL_DIAGONAL), COL_DIAGONAL, where, path, positive=True
                ),
                warped_target_landmarks=text(COL_WARPED_TARGET),
                warped_source_landmarks=text(COL_WARPED_SOURCE),
                execution_time_minutes=_parse_optional_float(
                    text(COL_EXECUTION_TIME), COL_EXECUTION_TIME, where, path, positive=False
                ),
                extra={name: row[name] for name in extra_columns},
            )
        )
    return pairs


def _format_diagonal(value: float) -> str:
    """ANHIR writes diagonals with one decimal; values that would round to 0 keep their digits."""
    text = f"{value:.1f}"
    return text if float(text) > 0 or value == 0 else repr(float(value))


def write_pair_table(
    path: str | Path, pairs: Sequence[Pair], columns: Sequence[str] | None = None
) -> None:
    """Write pairs as an ANHIR pair table, atomically.

    Columns are written in the ANHIR order (:data:`PAIR_TABLE_COLUMNS`: the unnamed index,
    ``Target image`` ... ``Execution time [minutes]``), then the extra columns. The image size
    is written as ``"(H, W)"``, the diagonal with one decimal, the execution time with ``repr``
    precision; ``None`` becomes an empty cell.

    Parameters
    ----------
    path
        Destination file; its directory must exist.
    pairs
        Rows to write, in order.
    columns
        Names of the extra (non-ANHIR) columns to write after the ANHIR ones, in this order;
        a pair lacking one gets an empty cell. Default: every key of :attr:`Pair.extra`, in
        first-seen order (so a table read with :func:`read_pair_table` round-trips).

    Raises
    ------
    ValueError
        If an extra column name clashes with an ANHIR column.
    """
    if columns is None:
        extra_columns = list(dict.fromkeys(name for pair in pairs for name in pair.extra))
    else:
        extra_columns = list(columns)
    clash = [name for name in extra_columns if name in PAIR_TABLE_COLUMNS]
    if clash:
        raise ValueError(f"extra column(s) {_format_columns(clash)} clash with ANHIR columns")

    rows: list[list[object]] = [[*PAIR_TABLE_COLUMNS, *extra_columns]]
    for pair in pairs:
        size = "" if pair.image_size is None else f"({pair.image_size[0]}, {pair.image_size[1]})"
        diagonal = "" if pair.image_diagonal is None else _format_diagonal(pair.image_diagonal)
        minutes = (
            "" if pair.execution_time_minutes is None else repr(float(pair.execution_time_minutes))
        )
        rows.append(
            [
                pair.index,
                pair.target_image,
                pair.source_image,
                pair.target_landmarks,
                pair.source_landmarks,
                pair.status,
                size,
                diagonal,
                pair.warped_target_landmarks,
                pair.warped_source_landmarks,
                minutes,
                *(pair.extra.get(name, "") for name in extra_columns),
            ]
        )
    _atomic_write_text(Path(path), _csv_text(rows))


def resolve_path(root: str | Path, relative: str | Path) -> Path:
    """Join a path from an (untrusted) pair table onto the dataset root, refusing escapes.

    The check is lexical: ``relative`` is normalised (``a/./b/../c`` -> ``a/c``) and refused
    when it is absolute (POSIX or Windows style), names the root itself, or climbs above the
    root with ``..``. Symbolic links inside the root are followed by the OS and not checked, so
    a dataset may link its image folders elsewhere.

    Parameters
    ----------
    root
        Dataset root directory (need not exist).
    relative
        Path as written in the table, relative to ``root``.

    Returns
    -------
    pathlib.Path
        ``root / normalised(relative)``.

    Raises
    ------
    InputError
        If ``relative`` is empty, contains a NUL byte, is absolute or escapes ``root``.
    """
    text = os.fspath(relative)
    if not text.strip():
        raise InputError("empty path in the pair table")
    if "\x00" in text:
        raise InputError(f"refusing path {text!r}: it contains a NUL byte")
    windows = PureWindowsPath(text)
    if Path(text).is_absolute() or windows.drive or windows.root:
        raise InputError(f"refusing absolute path {text!r}: paths must be relative to {root}")
    normalised = os.path.normpath(text)
    if normalised == os.curdir:
        raise InputError(f"refusing path {text!r}: it names the root directory {root} itself")
    if normalised == os.pardir or normalised.startswith(os.pardir + os.sep):
        raise InputError(f"refusing path {text!r}: it escapes the root directory {root}")
    return Path(root) / normalised
