"""``wsireg-flow export``: OME-Zarr pyramids as pyramidal OME-TIFF (SubIFDs), checked with
tifffile and the OME 2016-06 schema.

A real slide (CMU-1-Small-Region.svs, 2967 x 2220 px, 0.499 µm/px) is ingested once per module;
the registered lung-lesion_3 pair comes from :func:`test_qc_report.register_lung_pair`.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import io
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from test_qc_report import register_lung_pair

from wsireg_flow.cli import main
from wsireg_flow.io.slide import open_slide

ROOT = Path(__file__).resolve().parents[1]
SVS = ROOT / "data" / "wsi" / "CMU-1-Small-Region.svs"
SVS_SHAPE = (2967, 2220)  # (y, x) level 0
SVS_MPP = 0.499
LEVEL_SHAPES = [(2967, 2220), (1484, 1110), (742, 555)]  # max_side 1024
OME_NS = "{http://www.openmicroscopy.org/Schemas/OME/2016-06}"


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _zarr_levels(path: Path) -> list[np.ndarray]:
    with open_slide(path) as s:
        return [s.read_region(k, 0, 0, *s.shapes[k][:2]) for k in range(len(s.levels))]


def _tiff_levels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tf:
        return [lv.asarray() for lv in tf.series[0].levels]


@pytest.fixture(scope="module")
def cmu(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("export")
    zarr_path = d / "cmu.zarr"
    code, _, err = _cli(["ingest", str(SVS), "--out", str(zarr_path), "--quiet"])
    assert code == 0, err
    res: dict[str, Any] = {"dir": d, "zarr": zarr_path, "levels": _zarr_levels(zarr_path)}
    for comp in ("deflate", "jpeg"):
        out = d / f"cmu-{comp}.ome.tif"
        t0 = time.perf_counter()
        code, stdout, err = _cli(
            ["export", str(zarr_path), "--out", str(out), "--compression", comp, "--quiet"]
        )
        res[comp] = {
            "path": out,
            "code": code,
            "stdout": stdout,
            "stderr": err,
            "seconds": time.perf_counter() - t0,
        }
    return res


def test_ingested_zarr_has_three_levels(cmu: dict[str, Any]) -> None:
    assert [lv.shape[:2] for lv in cmu["levels"]] == LEVEL_SHAPES
    with open_slide(cmu["zarr"]) as s, open_slide(SVS) as svs:
        assert s.pixel_size_um == pytest.approx(SVS_MPP)
        np.testing.assert_array_equal(cmu["levels"][0], svs.read_region(0, 0, 0, *SVS_SHAPE))


def test_deflate_export_is_one_series_with_a_subifd_pyramid(cmu: dict[str, Any]) -> None:
    d = cmu["deflate"]
    assert d["code"] == 0, d["stderr"]
    assert d["stdout"].strip() == str(d["path"])
    with tifffile.TiffFile(d["path"]) as tf:
        assert tf.is_ome
        assert len(tf.series) == 1
        series = tf.series[0]
        assert series.axes == "YXS"
        assert [lv.shape for lv in series.levels] == [(*s, 3) for s in LEVEL_SHAPES]
        assert len(tf.pages) == 1  # one top-level IFD; coarser levels are its SubIFDs
        page0 = tf.pages[0]
        assert len(page0.subifds or ()) == 2
        for k, lv in enumerate(series.levels):
            page = lv.keyframe
            assert (page.tilelength, page.tilewidth) == (512, 512), k
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE, k
            assert page.subfiletype == (0 if k == 0 else 1), k
            # TIFF resolution tags: pixels per centimetre of that level
            assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
            ppcm = page.resolution[0]
            assert 1e4 / ppcm == pytest.approx(SVS_MPP * 2**k, rel=2e-3), k


def test_deflate_export_pixels_are_identical_at_every_level(cmu: dict[str, Any]) -> None:
    tiff = _tiff_levels(cmu["deflate"]["path"])
    assert len(tiff) == len(cmu["levels"]) == 3
    for k, (a, b) in enumerate(zip(tiff, cmu["levels"], strict=True)):
        assert a.dtype == np.uint8
        np.testing.assert_array_equal(a, b, err_msg=f"level {k}")


def test_ome_xml_pixel_size_and_schema(cmu: dict[str, Any]) -> None:
    with tifffile.TiffFile(cmu["deflate"]["path"]) as tf:
        xml = tf.ome_metadata
    assert xml
    pixels = ET.fromstring(xml).find(f"{OME_NS}Image/{OME_NS}Pixels")
    assert pixels is not None
    assert float(pixels.get("PhysicalSizeX")) == pytest.approx(SVS_MPP, abs=1e-9)
    assert float(pixels.get("PhysicalSizeY")) == pytest.approx(SVS_MPP, abs=1e-9)
    assert pixels.get("PhysicalSizeXUnit") == pixels.get("PhysicalSizeYUnit") == "µm"
    assert (int(pixels.get("SizeY")), int(pixels.get("SizeX"))) == SVS_SHAPE
    assert pixels.get("SizeC") == "3" and pixels.get("Type") == "uint8"
    xsd = (importlib.resources.files("ome_types") / "ome-2016-06.xsd").read_bytes()
    assert tifffile.OmeXml.validate(xml, xsd) is True
    # the library's own reader sees the pyramid and the pixel size
    with open_slide(cmu["deflate"]["path"]) as s:
        assert s.kind == "ome-tiff"
        assert s.pixel_size_um == pytest.approx(SVS_MPP, abs=1e-9)
        assert [sh[:2] for sh in s.shapes] == LEVEL_SHAPES


def test_jpeg_export_is_readable_and_close(cmu: dict[str, Any]) -> None:
    j = cmu["jpeg"]
    assert j["code"] == 0, j["stderr"]
    with tifffile.TiffFile(j["path"]) as tf:
        assert len(tf.series) == 1 and len(tf.series[0].levels) == 3
        assert tf.series[0].levels[0].keyframe.compression == tifffile.COMPRESSION.JPEG
        assert tifffile.OmeXml.validate(
            tf.ome_metadata,
            (importlib.resources.files("ome_types") / "ome-2016-06.xsd").read_bytes(),
        )
    diffs = []
    for a, b in zip(_tiff_levels(j["path"]), cmu["levels"], strict=True):
        assert a.shape == b.shape
        diffs.append(float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()))
    size_j, size_d = j["path"].stat().st_size, cmu["deflate"]["path"].stat().st_size
    print(
        f"\n[export] JPEG mean abs diff per level {[round(v, 3) for v in diffs]}; "
        f"size JPEG {size_j / 1e6:.2f} MB vs deflate {size_d / 1e6:.2f} MB; "
        f"times JPEG {j['seconds']:.2f} s, deflate {cmu['deflate']['seconds']:.2f} s"
    )
    # measured 2.89 at level 0 and 3.13 / 3.09 at levels 1-2 (quality 90 with tifffile's default
    # YCbCr 4:2:0 chroma subsampling; 4:4:4 would give 1.04 at level 0 for a 52 % larger file)
    assert diffs[0] < 3, diffs
    assert all(d < 3.5 for d in diffs), diffs
    assert size_j < size_d


def test_existing_output_is_refused_without_overwrite(cmu: dict[str, Any]) -> None:
    out: Path = cmu["deflate"]["path"]
    before = out.stat().st_mtime_ns
    code, stdout, err = _cli(["export", str(cmu["zarr"]), "--out", str(out), "--quiet"])
    assert code == 2
    assert stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(out) in lines[0] and "--overwrite" in lines[0]
    assert out.stat().st_mtime_ns == before
    # --overwrite replaces it (JPEG now), no partial file left behind
    code, _, err = _cli(["export", str(cmu["zarr"]), "--out", str(out), "--overwrite", "--quiet"])
    assert code == 0, err
    with tifffile.TiffFile(out) as tf:
        assert tf.series[0].levels[0].keyframe.compression == tifffile.COMPRESSION.JPEG
    assert not list(out.parent.glob(".*partial*"))
    # restore the deflate file for other tests
    code, _, err = _cli(
        [
            "export",
            str(cmu["zarr"]),
            "--out",
            str(out),
            "--overwrite",
            "--compression",
            "deflate",
            "--quiet",
        ]
    )
    assert code == 0, err


def test_label_pyramids_are_exported_losslessly_by_default(tmp_path: Path) -> None:
    """A label mask warped with --labels and exported with the default JPEG came out with
    labels 0..15 instead of {0, 3, 7, 11}."""
    import dask.array as da

    from wsireg_flow.io.omezarr import write_ngff_pyramid

    labels = np.zeros((1500, 1300, 1), np.uint8)
    labels[100:700, 200:900] = 3
    labels[800:1400, 100:600] = 7
    labels[300:500, 1000:1250] = 11
    src = write_ngff_pyramid(
        da.from_array(labels, chunks=(512, 512, 1)), tmp_path / "labels.zarr", labels=True
    )
    code, _, err = _cli(["export", str(src), "--out", str(tmp_path / "labels.ome.tif")])
    assert code == 0, err
    with tifffile.TiffFile(tmp_path / "labels.ome.tif") as tf:
        assert tf.series[0].levels[0].keyframe.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        for level in tf.series[0].levels:
            assert set(np.unique(level.asarray()).tolist()) <= {0, 3, 7, 11}
        np.testing.assert_array_equal(tf.series[0].levels[0].asarray(), labels[..., 0])


def test_export_of_a_one_strip_tiff_reads_a_few_tiles_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stripped TIFF (one strip of 3000 rows) once made the export read its whole level in
    one piece: the strip height was taken from the width axis of its (y, x, c) chunks."""
    from wsireg_flow.io.ometiff import MAX_STRIP_TILES, export_ome_tiff
    from wsireg_flow.io.slide import Slide

    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (3000, 2500, 3), dtype=np.uint8)
    src = tmp_path / "stripped.tif"
    tifffile.imwrite(src, data, photometric="rgb", rowsperstrip=3000)
    rows: list[int] = []
    read = Slide.read_region

    def spy(self: Slide, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        out = read(self, level, y0, x0, y1, x1)
        rows.append(out.shape[0])
        return out

    monkeypatch.setattr(Slide, "read_region", spy)
    out = export_ome_tiff(src, tmp_path / "stripped.ome.tif", compression="deflate", tile=256)
    assert max(rows) <= MAX_STRIP_TILES * 256
    with tifffile.TiffFile(out) as tf:
        np.testing.assert_array_equal(tf.series[0].levels[0].asarray(), data)


def test_registered_warped_zarr_round_trips(
    prefect_env: None, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    run = register_lung_pair(tmp_path_factory)
    warped = run / "warped.zarr"
    out = tmp_path / "warped.ome.tif"
    code, _, err = _cli(
        ["export", str(warped), "--out", str(out), "--compression", "deflate", "--quiet"]
    )
    assert code == 0, err
    zl = _zarr_levels(warped)
    tl = _tiff_levels(out)
    assert zl[0].shape == (660, 895, 3)
    assert len(tl) == len(zl)
    np.testing.assert_array_equal(tl[0], zl[0])
    with tifffile.TiffFile(out) as tf:
        assert len(tf.series) == 1
        xsd = (importlib.resources.files("ome_types") / "ome-2016-06.xsd").read_bytes()
        assert tifffile.OmeXml.validate(tf.ome_metadata, xsd) is True


# -- bounded memory -------------------------------------------------------------------------------
BIG = 12_000
CHUNK = 1024

# Runs the command given as arguments; RUSAGE_CHILDREN of this wrapper covers exactly that child.
_WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({
    "returncode": proc.returncode,
    "stdout": proc.stdout,
    "stderr": proc.stderr,
    "seconds": time.perf_counter() - t0,
    "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
}))
"""


def _texture(block: np.ndarray, block_info: dict[Any, Any] | None = None) -> np.ndarray:
    """A cheap, moderately compressible RGB texture for one (y, x, c) block."""
    assert block_info is not None
    (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
    y = np.arange(y0, y1, dtype=np.float32)[:, None]
    x = np.arange(x0, x1, dtype=np.float32)[None, :]
    out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    out[..., 0] = np.sin(x / 23.0) * 60 + 120 + ((y0 // CHUNK * 37 + x0 // CHUNK * 11) % 50)
    out[..., 1] = np.cos(y / 17.0) * 50 + 100
    out[..., 2] = (x + y) % 97 + 80
    return out


def test_export_of_a_12k_slide_keeps_peak_rss_bounded(tmp_path: Path) -> None:
    import dask.array as da

    from wsireg_flow.io.omezarr import write_ngff_pyramid

    src = tmp_path / "big.zarr"
    level0 = da.empty((BIG, BIG, 3), chunks=(CHUNK, CHUNK, 3), dtype=np.uint8)
    write_ngff_pyramid(level0.map_blocks(_texture, dtype=np.uint8), src, 0.5, name="big")
    out = tmp_path / "big.ome.tif"
    cmd = [sys.executable, "-m", "wsireg_flow.cli", "export", str(src), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["returncode"] == 0, rep["stderr"]
    peak_mb = rep["maxrss_kib"] / 1024
    raw_mb = BIG * BIG * 3 / 2**20
    print(
        f"\n[export] 12000 x 12000 RGB -> JPEG OME-TIFF in {rep['seconds']:.1f} s, "
        f"peak RSS {peak_mb:.0f} MiB (level-0 pixels {raw_mb:.0f} MiB), "
        f"file {out.stat().st_size / 1e6:.1f} MB"
    )
    assert peak_mb < 600
    with tifffile.TiffFile(out) as tf:
        levels = tf.series[0].levels
        assert [lv.shape for lv in levels] == [(BIG // 2**k, BIG // 2**k, 3) for k in range(5)]
    # the last (padded) tile row and column hold the right pixels
    with open_slide(out) as t, open_slide(src) as z:
        a = t.read_region(0, BIG - 700, BIG - 700, BIG, BIG).astype(np.int16)
        b = z.read_region(0, BIG - 700, BIG - 700, BIG, BIG).astype(np.int16)
        assert a.shape == (700, 700, 3)
        assert float(np.abs(a - b).mean()) < 3
