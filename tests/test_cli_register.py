"""End-to-end ``wsireg-flow register`` on a real ANHIR pair (lung-lesion_3, CD31 <- HE).

The pair is registered once per module through ``wsireg_flow.cli.main``; the tests then check
the run directory: transform, warped NGFF pyramid, warped landmarks, metrics, QC figures, and
the one-line errors of the command line.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr_models.v04.image import Image

from wsireg_flow.cli import main
from wsireg_flow.geometry import corner_origin
from wsireg_flow.io.slide import open_slide
from wsireg_flow.landmarks import read_landmarks, write_landmarks
from wsireg_flow.qc import quality_warnings
from wsireg_flow.rigid import ncc
from wsireg_flow.tissue import intensity_stats, normalized_intensity, optical_density, tissue_mask
from wsireg_flow.transform import Transform

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "anhir-sample"
CASE = DATA / "lung-lesion_3" / "scale-5pc"
TARGET = CASE / "29-041-Izd2-w35-CD31-3-les3.jpg"
SOURCE = CASE / "29-041-Izd2-w35-He-les3.jpg"
TARGET_LM = CASE / "29-041-Izd2-w35-CD31-3-les3.csv"
SOURCE_LM = CASE / "29-041-Izd2-w35-He-les3.csv"
CC10 = CASE / "29-041-Izd2-w35-Cc10-5-les3.jpg"  # ANHIR pair 2: CD31 <- CC10
CC10_LM = CASE / "29-041-Izd2-w35-Cc10-5-les3.csv"
TARGET_SHAPE = (660, 895)  # (y, x) from data/anhir-sample/dataset.csv
N_LANDMARKS = 80
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _args(
    out: Path, source: Path = SOURCE, source_lm: Path = SOURCE_LM, target: Path = TARGET
) -> list[str]:
    return [
        "register",
        str(target),
        str(source),
        "--out",
        str(out),
        "--target-landmarks",
        str(TARGET_LM),
        "--source-landmarks",
        str(source_lm),
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("cli") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(_args(out))
    return {"code": code, "dir": out, "stdout": stdout.getvalue()}


def test_register_exits_zero_and_prints_summary(run: dict[str, object]) -> None:
    assert run["code"] == 0
    summary = json.loads(str(run["stdout"]).strip().splitlines()[-1])
    assert summary["out"] == str(run["dir"])
    assert summary["median_rtre"] < summary["initial_median_rtre"]
    assert Path(summary["report"]).is_file() and Path(summary["report"]).parent.name == "qc"
    ok, total = (int(v) for v in summary["tiles_ok"].split("/"))
    assert 0 < ok <= total
    assert 0.0 <= summary["folding_fraction"] < 0.01


def test_run_directory_holds_transform(run: dict[str, object]) -> None:
    d = Path(run["dir"])  # type: ignore[arg-type]
    for name in ("affine.json", "backward.zarr", "inverse.zarr"):
        assert (d / "transform" / name).exists(), name
    t = Transform.load(d / "transform")
    assert t.target_shape == TARGET_SHAPE
    assert t.backward is not None and t.inverse is not None
    # the warped source landmarks are the transform's source -> target map of the source CSV
    # (landmark files put the origin at a pixel's corner, transforms at its centre)
    warped = read_landmarks(d / "warped-source-landmarks.csv")
    to_target, to_source = corner_origin(t.source_to_target), corner_origin(t.target_to_source)
    np.testing.assert_allclose(warped, to_target(read_landmarks(SOURCE_LM)), atol=1e-3)
    warped_t = read_landmarks(d / "warped-target-landmarks.csv")
    np.testing.assert_allclose(warped_t, to_source(read_landmarks(TARGET_LM)), atol=1e-3)


def test_warped_is_ngff_pyramid_in_target_frame(run: dict[str, object]) -> None:
    path = Path(run["dir"]) / "warped.zarr"  # type: ignore[arg-type]
    group = zarr.open_group(str(path), mode="r")
    Image.from_zarr(group)  # validates the NGFF 0.4 metadata
    ms = group.attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    level0 = group[ms["datasets"][0]["path"]]
    assert level0.shape == (3, *TARGET_SHAPE)
    assert level0.dtype == np.uint8


def test_warped_landmark_files_have_all_rows(run: dict[str, object]) -> None:
    d = Path(run["dir"])  # type: ignore[arg-type]
    for name in ("warped-source-landmarks.csv", "warped-target-landmarks.csv"):
        pts = read_landmarks(d / name)
        assert pts.shape == (N_LANDMARKS, 2), name
        assert np.all(np.isfinite(pts))
        lines = (d / name).read_text().strip().splitlines()
        assert len(lines) == N_LANDMARKS + 1  # header + one row per landmark


def test_metrics_landmark_scores(run: dict[str, object]) -> None:
    metrics = json.loads((Path(run["dir"]) / "metrics.json").read_text())  # type: ignore[arg-type]
    lm = metrics["landmarks"]
    print(
        f"\nCD31 <- HE: initial median rTRE {lm['initial_median_rtre']:.5f}, "
        f"median rTRE {lm['median_rtre']:.5f}, max {lm['max_rtre']:.5f}, "
        f"robustness {lm['robustness']:.3f}"
    )
    assert lm["n_landmarks"] == N_LANDMARKS
    assert lm["diagonal"] == pytest.approx(1112.0, abs=0.5)
    assert lm["median_rtre"] < lm["initial_median_rtre"]
    assert lm["robustness"] >= 0.9
    # measured 0.0043 (initial 0.065): well below 1 % of the diagonal
    assert lm["median_rtre"] < 0.01
    assert metrics["rigid"]["method"]


def test_qc_figures_are_png(run: dict[str, object]) -> None:
    qc = Path(run["dir"]) / "qc"  # type: ignore[arg-type]
    for name in ("overlay.png", "checkerboard.png"):
        p = qc / name
        assert p.stat().st_size > 1000, name
        assert p.read_bytes()[:8] == PNG_MAGIC
        img = cv2.imread(str(p))
        assert img is not None and img.ndim == 3 and min(img.shape[:2]) > 100


def _intensity(rgb: np.ndarray) -> np.ndarray:
    stats = intensity_stats(optical_density(rgb), tissue_mask(rgb))
    return cv2.GaussianBlur(normalized_intensity(rgb, stats), (0, 0), 3.0)


def test_warped_image_is_aligned_with_target(run: dict[str, object]) -> None:
    with open_slide(TARGET) as t, open_slide(SOURCE) as s:
        target = t.read_region(0, 0, 0, *TARGET_SHAPE)
        source = s.read_region(0, 0, 0, *s.shapes[0][:2])
    with open_slide(Path(run["dir"]) / "warped.zarr") as w:  # type: ignore[arg-type]
        warped = w.read_region(0, 0, 0, *TARGET_SHAPE)
    unwarped = np.full_like(target, 255)  # the source as is, cropped/padded to the target
    h, w_ = min(TARGET_SHAPE[0], source.shape[0]), min(TARGET_SHAPE[1], source.shape[1])
    unwarped[:h, :w_] = source[:h, :w_]
    ti = _intensity(target)
    before, after = ncc(ti, _intensity(unwarped)), ncc(ti, _intensity(warped))
    print(f"\nNCC target vs source: before {before:.3f}, after {after:.3f}")
    assert after > before + 0.2
    assert after > 0.7


def _turned_source(out: Path, angle_deg: float) -> tuple[Path, Path]:
    """The source mirrored in x, then turned by ``angle_deg`` on a canvas that holds all of it
    (glass-coloured corners), saved as PNG with its landmarks moved along."""
    img = np.ascontiguousarray(cv2.imread(str(SOURCE))[:, ::-1])
    h, w = img.shape[:2]
    pts = read_landmarks(SOURCE_LM)
    pts[:, 0] = w - 1 - pts[:, 0]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle_deg, 1.0)
    c, s = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(h * s + w * c) + 1, int(h * c + w * s) + 1
    m[:, 2] += ((nw - w) / 2, (nh - h) / 2)
    glass = tuple(int(v) for v in np.median(img[:10, :10].reshape(-1, 3), axis=0))
    turned = cv2.warpAffine(img, m, (nw, nh), borderMode=cv2.BORDER_CONSTANT, borderValue=glass)
    out.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out / "turned.png"), turned)
    write_landmarks(out / "turned.csv", pts @ m[:, :2].T + m[:, 2])
    return out / "turned.png", out / "turned.csv"


def test_mirrored_and_turned_source_registers_as_well(
    run: dict[str, object], tmp_path: Path
) -> None:
    """Different stains defeat SIFT here: the rotation search must find the 97-degree turn and
    the mirror, and the pair must then score as the unturned one does."""
    source, source_lm = _turned_source(tmp_path / "in", 97.0)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*_args(tmp_path / "run", source, source_lm), "--quiet"]) == 0
    turned = json.loads((tmp_path / "run" / "metrics.json").read_text())
    plain = json.loads((Path(run["dir"]) / "metrics.json").read_text())  # type: ignore[arg-type]
    med, med0 = turned["landmarks"]["median_rtre"], plain["landmarks"]["median_rtre"]
    print(f"\nturned 97 deg + mirrored: {turned['rigid']['method']}, median rTRE {med:.5f}")
    assert turned["rigid"]["flipped"] and not plain["rigid"]["flipped"]
    assert turned["landmarks"]["initial_median_rtre"] > 0.1
    # measured 0.0036 vs 0.0040 unturned
    assert med == pytest.approx(med0, abs=0.001)


def _scaled_source(out: Path, factor: float) -> tuple[Path, Path]:
    """The source resized by ``factor`` as a PNG (no pixel size stated), landmarks moved along
    (pixel centres kept: x' = (x + 0.5) * factor - 0.5)."""
    img = cv2.imread(str(SOURCE))
    scaled = cv2.resize(img, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    out.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out / "scaled.png"), scaled)
    write_landmarks(out / "scaled.csv", (read_landmarks(SOURCE_LM) + 0.5) * factor - 0.5)
    return out / "scaled.png", out / "scaled.csv"


@pytest.mark.parametrize("factor", [0.6, 1.7])
def test_source_at_another_scale_without_pixel_size_registers(
    run: dict[str, object], tmp_path: Path, factor: float
) -> None:
    """Two images scanned at different magnifications whose files state no pixel size: the
    rotation search also tries the scale the tissue areas imply (it used to try scale 1 only,
    and at 1.7 ended worse than it started, with exit 0)."""
    source, source_lm = _scaled_source(tmp_path / "in", factor)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*_args(tmp_path / "run", source, source_lm), "--quiet"]) == 0
    scaled = json.loads((tmp_path / "run" / "metrics.json").read_text())
    plain = json.loads((Path(run["dir"]) / "metrics.json").read_text())  # type: ignore[arg-type]
    med, med0 = scaled["landmarks"]["median_rtre"], plain["landmarks"]["median_rtre"]
    print(f"\nsource x{factor:g}: {scaled['rigid']['method']}, median rTRE {med:.5f}")
    assert scaled["rigid"]["scale"] == pytest.approx(factor, rel=0.03)
    assert med == pytest.approx(med0, abs=0.001)


def test_a_scale_beyond_the_plausible_range_is_named(
    run: dict[str, object], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A source scanned at 0.3x the target's resolution, no pixel size stated: outside
    [scale_min, scale_max] no scale search can find it. The command used to print only
    "tiles_ok 0/6" (exit 0, the source pasted in the wrong place); it now says why and what
    to do, on stderr. A good pair gets no such warning."""
    source, source_lm = _scaled_source(tmp_path / "in", 0.3)
    with contextlib.redirect_stdout(io.StringIO()), caplog.at_level("WARNING"):
        assert main([*_args(tmp_path / "run", source, source_lm), "--quiet"]) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "wsireg_flow.cli"]
    print("\n" + "\n".join(said))
    assert len(said) == 2
    assert said[0].startswith(f"{tmp_path / 'run'}: the tissue areas imply a scale of 0.3")
    assert "state their pixel sizes (ingest --pixel-size)" in said[0]
    assert "no tile on tissue registered at any level" in said[1]
    good = json.loads((Path(run["dir"]) / "metrics.json").read_text())  # type: ignore[arg-type]
    assert quality_warnings(good) == []


def _as_tiff(src: Path, out: Path, kind: str) -> Path:
    """``src`` re-encoded as a TIFF that once broke the command: 16-bit RGB (values x 257), or
    RGBA (opaque alpha)."""
    rgb = cv2.cvtColor(cv2.imread(str(src)), cv2.COLOR_BGR2RGB)
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "16-bit":
        tifffile.imwrite(out, rgb.astype(np.uint16) * 257, photometric="rgb")
    else:
        alpha = np.full(rgb.shape[:2], 255, np.uint8)
        tifffile.imwrite(
            out, np.dstack([rgb, alpha]), photometric="rgb", extrasamples=["unassalpha"]
        )
    return out


def _contrast(png: Path) -> float:
    return float(cv2.imread(str(png), cv2.IMREAD_GRAYSCALE).std())


@pytest.mark.parametrize("kind", ["16-bit", "rgba"])
def test_16_bit_and_rgba_tiffs_register_export_and_draw_like_8_bit(
    run: dict[str, object], tmp_path: Path, kind: str
) -> None:
    """16-bit RGB TIFFs registered, but their QC figures were blank white (clipped to 0-255)
    and a wrong optical density sent the rotation search to scale 0.75; RGBA TIFFs kept their
    alpha as a 4th channel and `export` failed with a ValueError."""
    target = _as_tiff(TARGET, tmp_path / "in" / "target.tif", kind)
    source = _as_tiff(SOURCE, tmp_path / "in" / "source.tif", kind)
    out = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*_args(out, source, SOURCE_LM, target), "--quiet"]) == 0
        assert main(["export", str(out / "warped.zarr"), "--out", str(tmp_path / "w.ome.tif")]) == 0
    got = json.loads((out / "metrics.json").read_text())
    plain = json.loads((Path(run["dir"]) / "metrics.json").read_text())  # type: ignore[arg-type]
    med, med0 = got["landmarks"]["median_rtre"], plain["landmarks"]["median_rtre"]
    print(f"\n{kind}: {got['rigid']['method']}, median rTRE {med:.5f} (8-bit {med0:.5f})")
    assert got["rigid"]["scale"] == pytest.approx(plain["rigid"]["scale"], abs=0.02)
    assert med == pytest.approx(med0, abs=0.001)
    with open_slide(tmp_path / "w.ome.tif") as w:
        assert w.channels == 3 and w.dtype == (np.uint16 if kind == "16-bit" else np.uint8)
    plain_qc = Path(run["dir"]) / "qc"  # type: ignore[operator]
    for name in ("checkerboard.png", "landmarks.png", "tissue.png"):
        assert _contrast(out / "qc" / name) > 0.8 * _contrast(plain_qc / name), name


def _on_white_canvas(image: Path, landmarks: Path, out: Path, margin: int) -> tuple[Path, Path]:
    """``image`` pasted ``margin`` px from the corner of an exactly white canvas (PNG), as a
    crop exported onto padding; landmarks moved along."""
    img = cv2.imread(str(image))
    h, w = img.shape[:2]
    canvas = np.full((h + 2 * margin, w + 2 * margin, 3), 255, np.uint8)
    canvas[margin : margin + h, margin : margin + w] = img
    out.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out / f"{image.stem}.png"), canvas)
    write_landmarks(out / f"{image.stem}.csv", read_landmarks(landmarks) + margin)
    return out / f"{image.stem}.png", out / f"{image.stem}.csv"


def test_cut_sections_on_white_padding_register(tmp_path: Path) -> None:
    """Both images of a pair (CD31 <- CC10 here) pasted at the same place on wide white
    canvases: the sections are cut at the edges of the pasted area, and those straight edges
    (the same in both) used to hold the coarse alignment at the identity (81 px median error,
    85 px before; 4.5 px unpadded). The coarse step now works on each image's scanned box."""
    target, target_lm = _on_white_canvas(TARGET, TARGET_LM, tmp_path / "in", 400)
    source, source_lm = _on_white_canvas(CC10, CC10_LM, tmp_path / "in", 400)
    args = _args(tmp_path / "run", source, source_lm, target)
    args[args.index("--target-landmarks") + 1] = str(target_lm)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*args, "--quiet"]) == 0
    got = json.loads((tmp_path / "run" / "metrics.json").read_text())["landmarks"]
    px, px0 = (got[k] * got["diagonal"] for k in ("median_rtre", "initial_median_rtre"))
    print(f"\npadded CD31 <- CC10: median {px:.1f} px (initial {px0:.1f})")
    assert px0 > 80 and px < 8.0  # measured 5.8 px


# --------------------------------------------------------------------------- errors


def test_rerun_same_job_does_no_work(run: dict[str, object]) -> None:
    d = Path(run["dir"])  # type: ignore[arg-type]
    before = (d / "metrics.json").stat().st_mtime_ns
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*_args(d), "--quiet"]) == 0
    assert json.loads(stdout.getvalue().strip().splitlines()[-1])["stages_run"] == []
    assert (d / "metrics.json").stat().st_mtime_ns == before


def test_one_landmark_file_is_warped_and_the_missing_one_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--target-landmarks alone was warped and silently not scored."""
    out = tmp_path / "run"
    argv = ["register", str(TARGET), str(SOURCE), "--out", str(out), "--quiet"]
    with contextlib.redirect_stdout(io.StringIO()), caplog.at_level("WARNING"):
        assert main([*argv, "--target-landmarks", str(TARGET_LM), "--scheduler", "threads"]) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "wsireg_flow.cli"] == [
        "--target-landmarks is warped but not scored: rTRE needs --source-landmarks too"
    ]
    assert len(read_landmarks(out / "warped-target-landmarks.csv")) == N_LANDMARKS
    assert not (out / "warped-source-landmarks.csv").exists()
    assert "median_rtre" not in json.dumps(json.loads((out / "metrics.json").read_text()))


@pytest.fixture(scope="module")
def error_runs(
    run: dict[str, object], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, subprocess.CompletedProcess[str]]:
    """The failing invocations, as a user runs them (own process: stderr exactly as seen).

    In-process runs are not reliable for this: Prefect binds its log handler to whatever
    stderr was current when it first logged, so captured output depends on test order.
    """
    d = Path(run["dir"])  # type: ignore[arg-type]
    other = CASE / "29-041-Izd2-w35-Cc10-5-les3.jpg"
    empty = tmp_path_factory.mktemp("missing")
    cases = {
        "other_job": ["register", str(TARGET), str(other), "--out", str(d), "--quiet"],
        "missing": [
            "register",
            str(TARGET),
            str(empty / "nothere.jpg"),
            "--out",
            str(empty / "run"),
            "--quiet",
        ],
    }
    procs = {
        k: subprocess.Popen(
            [sys.executable, "-m", "wsireg_flow.cli", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k, args in cases.items()
    }  # both at once: each pays the Prefect start-up (~10 s)
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[k] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    out["missing_dir"] = empty  # type: ignore[assignment]
    return out


def test_other_landmark_files_rescore_a_finished_run(
    run: dict[str, object], tmp_path: Path
) -> None:
    """A run given landmark files under another path was refused as "another job" (exit 2):
    everything had to be registered again. Only the scoring runs again now."""
    import shutil

    d = tmp_path / "run"
    shutil.copytree(Path(run["dir"]), d)  # type: ignore[arg-type]
    moved = tmp_path / "v2.csv"
    shutil.copy(SOURCE_LM, moved)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*_args(d, source_lm=moved), "--quiet"]) == 0
    summary = json.loads(stdout.getvalue().strip().splitlines()[-1])
    assert summary["stages_run"] == ["evaluate", "qc"]
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["inputs"]["source_landmarks"] == str(moved.resolve())
    before = json.loads((Path(run["dir"]) / "metrics.json").read_text())  # type: ignore[arg-type]
    assert metrics["landmarks"] == before["landmarks"]  # the same points score the same


def test_other_job_into_existing_run_dir_fails_with_one_line(
    run: dict[str, object], error_runs: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    d = Path(run["dir"])  # type: ignore[arg-type]
    res = error_runs["other_job"]
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("wsireg-flow: error: ")
    assert str(d) in lines[0] and "--overwrite" in lines[0]
    assert (d / "metrics.json").is_file()  # the finished run is untouched


def test_missing_source_fails_with_one_line_and_no_run_dir(
    error_runs: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    empty = Path(error_runs["missing_dir"])  # type: ignore[arg-type]
    res = error_runs["missing"]
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("wsireg-flow: error: ")
    assert str(empty / "nothere.jpg") in lines[0]
    assert list(empty.iterdir()) == []  # no run directory, no partial/hidden directory
