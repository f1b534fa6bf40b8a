"""Synthetic slide pairs: files, ground truth and the stain change are what `synth` promises."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from wsireg_flow.cli import main
from wsireg_flow.geometry import corner_origin
from wsireg_flow.io.slide import open_slide
from wsireg_flow.landmarks import read_landmarks, read_pair_table
from wsireg_flow.rigid import ncc
from wsireg_flow.tissue import normalized_intensity
from wsireg_flow.transform import Transform
from wsireg_flow.warp import warp_slide


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "pair"
    assert main(["synth", "--size", "3000x2600", "--out", str(out), "--seed", "3", "--quiet"]) == 0
    return out


def test_files_and_pyramids(pair: Path) -> None:
    for name in ("target.ome.tif", "source.ome.tif"):
        with tifffile.TiffFile(pair / name) as tf:
            series = tf.series[0]
            assert series.shape == (3000, 2600, 3)
            assert [lv.shape[:2] for lv in series.levels] == [
                (3000, 2600),
                (1500, 1300),
                (750, 650),
            ]
            assert tf.pages[0].compression == tifffile.COMPRESSION.JPEG
            assert tf.pages[0].is_tiled
        assert open_slide(pair / name).pixel_size_um == pytest.approx(0.5)
    (row,) = read_pair_table(pair / "pairs.csv")
    assert (row.target_image, row.source_image) == ("target.ome.tif", "source.ome.tif")
    assert row.image_size == (3000, 2600)
    assert json.loads((pair / "synth.json").read_text())["landmarks"] == 200


def test_landmarks_follow_the_ground_truth_exactly(pair: Path) -> None:
    truth = Transform.load(pair / "truth")
    t, s = read_landmarks(pair / "target.csv"), read_landmarks(pair / "source.csv")
    assert t.shape == s.shape == (200, 2)
    np.testing.assert_allclose(corner_origin(truth.target_to_source)(t), s, atol=1e-6)
    shift = np.linalg.norm(s - t, axis=1)
    assert 20 < float(np.median(shift)) < 400  # a real displacement to recover
    assert np.abs(truth.backward.data).max() == pytest.approx(30.0, rel=1e-3)  # field amplitude
    assert truth.backward.spacing == 16.0


def test_target_is_the_source_through_the_truth_with_a_stain_change(
    pair: Path, tmp_path: Path
) -> None:
    target, source = open_slide(pair / "target.ome.tif"), open_slide(pair / "source.ome.tif")
    warped = open_slide(warp_slide(Transform.load(pair / "truth"), source, tmp_path / "w.zarr"))
    lv = 1
    h, w = target.shapes[lv][:2]
    t_rgb, w_rgb = target.read_region(lv, 0, 0, h, w), warped.read_region(lv, 0, 0, h, w)
    s_rgb = source.read_region(lv, 0, 0, h, w)
    tissue = normalized_intensity(t_rgb) > 0.05
    blur = [cv2.GaussianBlur(normalized_intensity(x), (0, 0), 1.5) for x in (t_rgb, w_rgb, s_rgb)]
    aligned, unaligned = ncc(blur[0], blur[1], tissue), ncc(blur[0], blur[2], tissue)
    assert aligned > 0.8 and aligned > unaligned + 0.3, (aligned, unaligned)
    # different stains: mean tissue colours differ (H&E purple vs DAB brown)
    mean_t, mean_w = t_rgb[tissue].mean(axis=0), w_rgb[tissue].mean(axis=0)
    assert np.abs(mean_t - mean_w).max() > 15


def test_sizes_without_room_for_landmarks_are_refused(tmp_path: Path) -> None:
    """`synth --size 300x300` wrote a pair with 0 landmarks, which `register` then refused."""
    err = io.StringIO()
    out = tmp_path / "small"
    with contextlib.redirect_stderr(err):
        assert main(["synth", "--size", "700x2000", "--out", str(out), "--quiet"]) == 2
    assert err.getvalue().strip() == (
        "wsireg-flow: error: size 700x2000 leaves no room for landmarks: each side must be "
        "at least 736 px"
    )
    assert not out.exists()
