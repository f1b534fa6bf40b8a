"""`wsireg-flow ingest`: SVS -> OME-Zarr (NGFF 0.4) pyramid, and refusal of broken inputs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr_models.v04.image import Image

from wsireg_flow.cli import main
from wsireg_flow.errors import InputError
from wsireg_flow.io.omezarr import ingest
from wsireg_flow.io.slide import Slide, open_slide

ROOT = Path(__file__).resolve().parents[1]
CMU = ROOT / "data" / "wsi" / "CMU-1-Small-Region.svs"
TCGA = ROOT / "data" / "wsi" / "tcga-cr-7395-01a-01-ts1.svs"

TCGA_SHAPES = [(3, 3567, 4443), (3, 1784, 2222), (3, 892, 1111), (3, 446, 556)]
CMU_SHAPES = [(3, 2967, 2220), (3, 1484, 1110), (3, 742, 555)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ingest(src: Path, out: Path, *extra: str) -> int:
    return main(["ingest", str(src), "--out", str(out), "--quiet", *extra])


def _levels(path: Path) -> list[np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    ms = group.attrs["multiscales"][0]
    return [group[d["path"]][:] for d in ms["datasets"]]


def _box_mean(prev: np.ndarray) -> np.ndarray:
    """Exact 2x2 means of a (c, y, x) uint8 level, edges averaged with themselves."""
    _, h, w = prev.shape
    p = np.pad(prev, [(0, 0), (0, h % 2), (0, w % 2)], mode="edge").astype(np.int32)
    s = p[:, 0::2, 0::2] + p[:, 1::2, 0::2] + p[:, 0::2, 1::2] + p[:, 1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


@pytest.fixture(scope="module")
def tcga_zarr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tcga") / "t.zarr"
    before = _sha256(TCGA)
    assert _ingest(TCGA, out) == 0
    assert _sha256(TCGA) == before  # input unchanged
    return out


@pytest.fixture(scope="module")
def cmu_zarr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cmu") / "cmu.zarr"
    before = _sha256(CMU)
    assert _ingest(CMU, out) == 0
    assert _sha256(CMU) == before
    return out


# --------------------------------------------------------------------------- pixels


def test_level0_equals_slide_pixels(tcga_zarr: Path) -> None:
    ref = tifffile.imread(TCGA, series=0, level=0)
    assert ref.shape == (3567, 4443, 3)
    level0 = zarr.open_group(str(tcga_zarr), mode="r")["0"][:]
    assert level0.dtype == np.uint8
    np.testing.assert_array_equal(np.moveaxis(level0, 0, -1), ref)


def test_cmu_level0_equals_slide_pixels(cmu_zarr: Path) -> None:
    ref = tifffile.imread(CMU, series=0, level=0)
    level0 = zarr.open_group(str(cmu_zarr), mode="r")["0"][:]
    np.testing.assert_array_equal(np.moveaxis(level0, 0, -1), ref)


def test_level_shapes_chunks_and_compressor(tcga_zarr: Path) -> None:
    group = zarr.open_group(str(tcga_zarr), mode="r")
    assert sorted(group.array_keys()) == ["0", "1", "2", "3"]
    for k, shape in enumerate(TCGA_SHAPES):
        arr = group[str(k)]
        assert arr.shape == shape
        assert arr.chunks == (3, 1024, 1024)
        assert arr.dtype == np.uint8
        meta = json.loads((tcga_zarr / str(k) / ".zarray").read_text())
        assert meta["zarr_format"] == 2
        assert meta["chunks"] == [3, 1024, 1024]
        assert meta["dimension_separator"] == "/"
        assert meta["compressor"]["id"] == "blosc"
        assert meta["compressor"]["cname"] == "lz4"
        assert meta["compressor"]["shuffle"] == 0  # lz4 without shuffle: faster, smaller on tissue
    # "/" separator: chunk (0, 3, 4) of level 0 is the file 0/0/3/4 (last row and column)
    assert (tcga_zarr / "0" / "0" / "3" / "4").is_file()
    # the pyramid stops at the first level whose longest side is <= 1024
    assert max(TCGA_SHAPES[-1][1:]) <= 1024 < max(TCGA_SHAPES[-2][1:])


def test_coarser_levels_are_2x2_means(tcga_zarr: Path) -> None:
    levels = _levels(tcga_zarr)
    assert [lv.shape for lv in levels] == TCGA_SHAPES
    for k in range(1, len(levels)):
        prev, cur = levels[k - 1].astype(np.int32), levels[k]
        # a few pixels by hand, including the odd last row (averaged with itself)
        for i, j in [
            (0, 0),
            (100, 200),
            (cur.shape[1] - 1, cur.shape[2] - 1),
            (cur.shape[1] // 2, 3),
        ]:
            for c in range(3):
                block = prev[c, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
                if block.shape[0] == 1:
                    block = np.concatenate([block, block], axis=0)
                if block.shape[1] == 1:
                    block = np.concatenate([block, block], axis=1)
                assert int(cur[c, i, j]) == (int(block.sum()) + 2) // 4
        # and every pixel
        np.testing.assert_array_equal(cur, _box_mean(levels[k - 1]))
    # level 0 has an odd height (3567): level 1's last row comes from row 3566 alone
    np.testing.assert_array_equal(levels[1][:, -1, :10], _box_mean(levels[0][:, -1:, :20])[:, 0, :])


def test_open_ingested_pyramid(cmu_zarr: Path) -> None:
    with open_slide(cmu_zarr) as s:
        assert s.kind == "ome-zarr"
        assert s.shapes == [(2967, 2220, 3), (1484, 1110, 3), (742, 555, 3)]
        assert s.pixel_size_um == pytest.approx(0.499, rel=1e-9)
        ref = tifffile.imread(CMU, series=0, level=0)
        np.testing.assert_array_equal(
            s.read_region(0, 1000, 500, 1300, 900), ref[1000:1300, 500:900]
        )


# --------------------------------------------------------------------------- metadata


def test_ngff_metadata_validates_with_micrometres(cmu_zarr: Path) -> None:
    image = Image.from_zarr(zarr.open_group(str(cmu_zarr), mode="r"))
    ms = image.attributes.multiscales[0]
    assert ms.version == "0.4"
    assert [(a.name, a.type, a.unit) for a in ms.axes] == [
        ("c", "channel", None),
        ("y", "space", "micrometer"),
        ("x", "space", "micrometer"),
    ]
    assert [d.path for d in ms.datasets] == ["0", "1", "2"]
    for k, d in enumerate(ms.datasets):
        scale = d.coordinateTransformations[0].scale
        assert scale[0] == 1.0
        assert scale[1] == pytest.approx(0.499 * 2**k, rel=1e-3)
        assert scale[2] == pytest.approx(0.499 * 2**k, rel=1e-3)
    assert ms.datasets[0].coordinateTransformations[0].scale == [1.0, 0.499, 0.499]
    # a level-k pixel averages 2**k x 2**k level-0 pixels: its centre is (2**k - 1) / 2 level-0
    # pixels further than scale * index (which put level 1 half a pixel off, level 2 1.5 px)
    assert len(ms.datasets[0].coordinateTransformations) == 1  # level 0: no translation
    for k, d in enumerate(ms.datasets[1:], start=1):
        shift = d.coordinateTransformations[1].translation
        assert shift == pytest.approx([0.0, 0.499 * (2**k - 1) / 2, 0.499 * (2**k - 1) / 2])
    attrs = zarr.open_group(str(cmu_zarr), mode="r").attrs.asdict()
    assert attrs["wsireg_flow"]["pixel_size_um"] == 0.499
    assert attrs["wsireg_flow"]["complete"] is True
    assert attrs["wsireg_flow"]["source_kind"] == "svs"
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["R", "G", "B"]


def test_ngff_metadata_without_pixel_size_is_unitless(tcga_zarr: Path) -> None:
    image = Image.from_zarr(zarr.open_group(str(tcga_zarr), mode="r"))
    ms = image.attributes.multiscales[0]
    assert [a.unit for a in ms.axes] == [None, None, None]
    scales = [d.coordinateTransformations[0].scale for d in ms.datasets]
    assert scales[0] == [1.0, 1.0, 1.0]
    # the factor each level was made with (level-0 pixels per pixel), not the size ratio
    # (3567 / 1784 = 1.99944 rows)
    assert scales == [[1.0, 2.0**k, 2.0**k] for k in range(len(scales))]
    shifts = [d.coordinateTransformations[1].translation for d in ms.datasets[1:]]
    assert shifts == [[0.0, (2.0**k - 1) / 2, (2.0**k - 1) / 2] for k in range(1, len(scales))]
    attrs = zarr.open_group(str(tcga_zarr), mode="r").attrs.asdict()
    assert attrs["wsireg_flow"]["pixel_size_um"] is None
    with open_slide(tcga_zarr) as s:
        assert s.pixel_size_um is None


def test_pixel_size_option_overrides(tmp_path: Path) -> None:
    out = tmp_path / "px.zarr"
    assert _ingest(TCGA, out, "--pixel-size", "0.25") == 0
    image = Image.from_zarr(zarr.open_group(str(out), mode="r"))
    ms = image.attributes.multiscales[0]
    assert [a.unit for a in ms.axes] == [None, "micrometer", "micrometer"]
    assert ms.datasets[0].coordinateTransformations[0].scale == [1.0, 0.25, 0.25]
    assert ms.datasets[3].coordinateTransformations[0].scale == [1.0, 2.0, 2.0]
    with open_slide(out) as s:
        assert s.pixel_size_um == pytest.approx(0.25, rel=1e-12)
    # an override also replaces known metadata (CMU-1 says 0.499)
    out2 = tmp_path / "cmu-px.zarr"
    assert _ingest(CMU, out2, "--pixel-size", "0.5") == 0
    with open_slide(out2) as s:
        assert s.pixel_size_um == pytest.approx(0.5, rel=1e-12)


# --------------------------------------------------------------------------- overwrite


def test_existing_output_refused_then_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exists.zarr"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert _ingest(CMU, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert str(out) in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.zarr"]

    # a folder wsireg-flow did not write is not replaced, even with --overwrite
    assert _ingest(CMU, out, "--overwrite") == 2
    assert (
        "holds keep.txt, which no OME-Zarr pyramid of wsireg-flow holds" in capsys.readouterr().err
    )
    assert (out / "keep.txt").read_text() == "precious"

    # a pyramid it wrote is
    before = _sha256(CMU)
    mine = tmp_path / "mine.zarr"
    assert _ingest(TCGA, mine) == 0
    assert _ingest(CMU, mine, "--overwrite") == 0
    assert _sha256(CMU) == before
    with open_slide(mine) as s:
        assert s.shapes[0] == (2967, 2220, 3)
    assert sorted(zarr.open_group(str(mine), mode="r").array_keys()) == ["0", "1", "2"]
    # nothing left behind: no .partial-* or .old-* siblings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.zarr", "mine.zarr"]


# --------------------------------------------------------------------------- broken inputs (CLI)


def _make_bad_input(kind: str, tmp_path: Path) -> Path:
    if kind == "missing":
        return tmp_path / "missing.svs"
    path = tmp_path / f"{kind}.svs"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "cmu-1000000":
        path.write_bytes(CMU.read_bytes()[:1_000_000])
    elif kind == "tcga-1000000":
        path.write_bytes(TCGA.read_bytes()[:1_000_000])
    elif kind == "tcga-3000000":
        path.write_bytes(TCGA.read_bytes()[:3_000_000])
    elif kind == "text":
        path.write_text("Aperio? no, just text\nline two\n")
    elif kind == "corrupt-tile":
        # intact structure, one JPEG 2000 tile zeroed: fails while level 0 is being written
        data = bytearray(TCGA.read_bytes())
        page = tifffile.TiffFile(TCGA).pages[0]
        off, n = page.dataoffsets[5], page.databytecounts[5]
        data[off : off + n] = bytes(n)
        path.write_bytes(bytes(data))
    else:  # pragma: no cover
        raise AssertionError(kind)
    return path


BAD_INPUTS = {
    "missing": "file not found",
    "empty": "file is empty",
    "cmu-1000000": "truncated",
    "tcga-1000000": "truncated",
    "tcga-3000000": "truncated",
    "text": "not a supported image",
    "corrupt-tile": "cannot read pixel data",
}


def test_bad_inputs_fail_cleanly_in_a_subprocess(tmp_path: Path) -> None:
    # all cases at once (each child is mostly interpreter start-up)
    procs = {}
    for kind in BAD_INPUTS:
        case_dir = tmp_path / kind
        case_dir.mkdir()
        src = _make_bad_input(kind, case_dir)
        out = case_dir / "out.zarr"
        before = _sha256(src) if src.exists() else None
        cmd = [sys.executable, "-m", "wsireg_flow.cli", "ingest", str(src), "--out", str(out)]
        if kind == "corrupt-tile":
            cmd.append("--quiet")  # progress lines would precede the error line
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[kind] = (proc, src, out, before)
    for kind, (proc, src, out, before) in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (kind, stderr)
        assert stdout == ""
        lines = stderr.splitlines()
        assert len(lines) == 1 and stderr.endswith("\n"), (kind, stderr)
        line = lines[0]
        assert line.startswith("wsireg-flow: error: ")
        assert str(src) in line
        assert BAD_INPUTS[kind] in line, (kind, line)
        assert "Traceback" not in stderr
        assert not out.exists()
        leftovers = sorted(p.name for p in out.parent.iterdir() if p.name.startswith("."))
        assert leftovers == [], (kind, leftovers)
        assert (_sha256(src) if src.exists() else None) == before


def test_installed_script_reports_missing_input(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "wsireg-flow"
    src = tmp_path / "absent.svs"
    out = tmp_path / "o.zarr"
    proc = subprocess.run(
        [str(script), "ingest", str(src), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"wsireg-flow: error: {src}: file not found\n"
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


class _FlakyLevel:
    """A (y, x, c) level whose chunk at (64, 64) fails while another (slow) read is running."""

    shape = (256, 256, 3)
    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.partner_taken = False
        # the failing read and the first slow read meet here, so they surely overlap
        self.meet = threading.Barrier(2, timeout=10)

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        ys, xs, _ = key
        h, w = (ys.stop or 0) - (ys.start or 0), (xs.stop or 0) - (xs.start or 0)
        if h <= 0 or w <= 0:  # dask probing for metadata
            return np.zeros((max(h, 0), max(w, 0), 3), np.uint8)
        if ys.start == 64 and xs.start == 64:
            self.meet.wait()
            raise OSError("simulated decoder failure")
        with self.lock:
            self.in_flight += 1
            partner, self.partner_taken = not self.partner_taken, True
        if partner:
            self.meet.wait()
            time.sleep(0.3)  # still reading when the failure is raised
        with self.lock:
            self.in_flight -= 1
        return np.full((h, w, 3), 7, np.uint8)


def test_failed_ingest_waits_for_running_reads_and_leaves_nothing(tmp_path: Path) -> None:
    level = _FlakyLevel()
    slide = Slide(tmp_path / "fake.svs", [level], None, "tiff", "fake")
    out = tmp_path / "out" / "fake.zarr"
    with pytest.raises(InputError) as exc:
        ingest(slide, out, chunk=64, max_side=64)
    # no read of the slide may still be running once ingest has raised (the caller closes it)
    assert level.in_flight == 0
    assert "simulated decoder failure" in str(exc.value)
    assert str(tmp_path / "fake.svs") in str(exc.value)
    time.sleep(0.5)  # a straggling writer would re-create the partial directory by now
    assert not out.exists()
    assert list(out.parent.iterdir()) == []
