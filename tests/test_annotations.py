"""Warping QuPath-style GeoJSON annotations (``wsireg-flow warp-annotations``) and label masks
(``wsireg-flow warp --labels``).

Geometry handling is checked with a pure-affine transform whose results are computed by hand;
the acceptance test uses a real registration (lung-lesion_3 CD31 <- HE, shared with
:mod:`test_qc_report`) and shows that tiny polygons around the source landmarks land where the
landmark warp puts the landmarks.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from test_qc_report import SOURCE_LM, TARGET_LM, register_lung_pair

from wsireg_flow.annotations import warp_geojson, warp_geojson_file
from wsireg_flow.cli import main
from wsireg_flow.errors import InputError
from wsireg_flow.geometry import corner_origin
from wsireg_flow.io.slide import open_slide
from wsireg_flow.transform import Transform

# Source -> target: a quarter turn plus a shift, F(x, y) = (500 - y, 100 + x), on GeoJSON's
# corner-origin points. Transforms put the origin at pixel centres (x - 0.5), where F reads
# (499 - y, 100 + x); the stored affine maps TARGET -> SOURCE: A(u, v) = (v - 100, 499 - u).
AFFINE_T2S = np.array([[0.0, 1.0, -100.0], [-1.0, 0.0, 499.0], [0.0, 0.0, 1.0]])


def _F(x: float, y: float) -> list[float]:
    return [500.0 - y, 100.0 + x]


@pytest.fixture
def affine() -> Transform:
    return Transform(AFFINE_T2S.copy(), None, None, (1000, 1000), (1000, 1000))


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def qupath_collection() -> dict[str, Any]:
    """A FeatureCollection as QuPath exports it (properties with nested classification)."""
    square = [[0, 0], [100, 0], [100, 50], [0, 50], [0, 0]]
    hole = [[10, 10], [20, 10], [20, 20], [10, 20], [10, 10]]
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "id": "a1",
                "geometry": {"type": "Point", "coordinates": [10, 20]},
                "properties": {"objectType": "annotation", "name": "seed"},
            },
            {
                "type": "Feature",
                "id": "a2",
                "geometry": {"type": "Polygon", "coordinates": [square, hole]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                    "isLocked": False,
                    "measurements": {"Area px^2": 4900.0},
                },
            },
            {
                "type": "Feature",
                "id": "a3",
                "geometry": {
                    "type": "MultiPolygon",
                    "coordinates": [
                        [[[200, 200], [210, 200], [210, 220], [200, 220], [200, 200]]],
                        [[[300, 300], [301, 300], [301, 301], [300, 301], [300, 300]]],
                    ],
                },
                "properties": {"classification": {"name": "Stroma", "color": [0, 150, 0]}},
            },
            {
                "type": "Feature",
                "id": "a4",
                "geometry": {"type": "LineString", "coordinates": [[0, 0], [30, 40]]},
                "properties": {"objectType": "annotation", "name": "ruler"},
            },
            {
                "type": "Feature",
                "id": "a5",
                "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]},
                "properties": {"classification": {"name": "Immune cells"}},
            },
        ],
    }


EXPECTED = {
    "a1": [480.0, 110.0],
    "a2": [
        [[500.0, 100.0], [500.0, 200.0], [450.0, 200.0], [450.0, 100.0], [500.0, 100.0]],
        [[490.0, 110.0], [490.0, 120.0], [480.0, 120.0], [480.0, 110.0], [490.0, 110.0]],
    ],
    "a3": [
        [[[300.0, 300.0], [300.0, 310.0], [280.0, 310.0], [280.0, 300.0], [300.0, 300.0]]],
        [[[200.0, 400.0], [200.0, 401.0], [199.0, 401.0], [199.0, 400.0], [200.0, 400.0]]],
    ],
    "a4": [[500.0, 100.0], [460.0, 130.0]],
    "a5": [[498.0, 101.0], [496.0, 103.0]],
}


def _by_id(fc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["id"]: f for f in fc["features"]}


def test_hand_computed_expectations_follow_the_map() -> None:
    """The literal EXPECTED values are F of the inputs (guards the table itself)."""
    src = _by_id(qupath_collection())
    assert EXPECTED["a1"] == _F(*src["a1"]["geometry"]["coordinates"])
    assert EXPECTED["a4"] == [_F(*p) for p in src["a4"]["geometry"]["coordinates"]]


def test_affine_warp_gives_exact_coordinates(affine: Transform) -> None:
    data = qupath_collection()
    original = copy.deepcopy(data)
    warped = warp_geojson(data, affine, "source-to-target")
    assert data == original  # input untouched
    assert warped["type"] == "FeatureCollection"
    got = _by_id(warped)
    assert list(got) == list(EXPECTED)
    for fid, coords in EXPECTED.items():
        np.testing.assert_allclose(
            np.asarray(got[fid]["geometry"]["coordinates"], float),
            coords,
            atol=1e-9,
            err_msg=fid,
        )
        assert got[fid]["geometry"]["type"] == _by_id(original)[fid]["geometry"]["type"]


def test_rings_stay_closed_and_properties_are_kept(affine: Transform) -> None:
    data = qupath_collection()
    got = _by_id(warp_geojson(data, affine))
    for fid in ("a2",):
        for ring in got[fid]["geometry"]["coordinates"]:
            assert ring[0] == ring[-1]
    for poly in got["a3"]["geometry"]["coordinates"]:
        for ring in poly:
            assert ring[0] == ring[-1]
    for fid, f in _by_id(data).items():
        assert got[fid]["properties"] == f["properties"]
        assert got[fid]["id"] == fid
    assert got["a2"]["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}


def test_non_axis_rotation_matches_the_formula() -> None:
    theta = math.radians(30.0)
    c, s = math.cos(theta), math.sin(theta)
    fwd = np.array([[c, -s, 12.5], [s, c, -7.25], [0, 0, 1]])  # source -> target
    t = Transform(np.linalg.inv(fwd), None, None, (800, 800), (800, 800))
    ring = [[50.0, 60.0], [150.0, 60.0], [150.0, 90.0], [50.0, 90.0], [50.0, 60.0]]
    out = warp_geojson({"type": "Polygon", "coordinates": [ring]}, t)
    # the formula acts on pixel-centre points: GeoJSON's corner-origin points are half a
    # pixel further right and down
    centred = [(x - 0.5, y - 0.5) for x, y in ring]
    expected = [[c * x - s * y + 12.5 + 0.5, s * x + c * y - 7.25 + 0.5] for x, y in centred]
    np.testing.assert_allclose(out["coordinates"][0], expected, atol=1e-9)
    assert out["coordinates"][0][0] == out["coordinates"][0][-1]


def test_list_of_features_and_single_feature_inputs(affine: Transform) -> None:
    features = qupath_collection()["features"]
    as_list = warp_geojson(features, affine)
    assert isinstance(as_list, list) and len(as_list) == len(features)
    single = warp_geojson(features[1], affine)
    assert single["type"] == "Feature"
    np.testing.assert_allclose(single["geometry"]["coordinates"][0], EXPECTED["a2"][0], atol=1e-9)
    for f in as_list:
        np.testing.assert_allclose(
            np.asarray(f["geometry"]["coordinates"], float), EXPECTED[f["id"]], atol=1e-9
        )
    bare = warp_geojson({"type": "Point", "coordinates": [10, 20]}, affine)
    assert bare == {"type": "Point", "coordinates": EXPECTED["a1"]}
    empty = warp_geojson({"type": "Feature", "geometry": None, "properties": {"a": 1}}, affine)
    assert empty == {"type": "Feature", "geometry": None, "properties": {"a": 1}}


def test_densify_adds_vertices_along_edges(affine: Transform) -> None:
    square = {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]]}
    plain = warp_geojson(square, affine)["coordinates"][0]
    dense = warp_geojson(square, affine, densify=10.0)["coordinates"][0]
    assert len(plain) == 5
    assert len(dense) == 1 + 4 * 10  # every 100 px edge split into 10 steps
    assert dense[0] == dense[-1]
    # the new vertices are the images of points 10 px apart along the source edges
    src_first_edge = [[10.0 * k, 0.0] for k in range(11)]
    np.testing.assert_allclose(dense[:11], [_F(*p) for p in src_first_edge], atol=1e-9)
    line = {"type": "LineString", "coordinates": [[0, 0], [30, 40]]}  # 50 px
    assert len(warp_geojson(line, affine, densify=10.0)["coordinates"]) == 6
    point = {"type": "MultiPoint", "coordinates": [[0, 0], [300, 400]]}
    assert len(warp_geojson(point, affine, densify=10.0)["coordinates"]) == 2


def test_z_and_further_values_of_a_position_are_kept(affine: Transform) -> None:
    """Positions [x, y, z] lost their z: only x and y are mapped, the rest is kept (and
    interpolated along densified edges)."""
    empty = {"type": "LineString", "coordinates": []}  # RFC 7946 allows empty geometries
    assert warp_geojson(empty, affine) == empty
    point = warp_geojson({"type": "Point", "coordinates": [10, 20, 7.5]}, affine)
    assert point["coordinates"] == [*_F(10, 20), 7.5]
    line = {"type": "LineString", "coordinates": [[0, 0, 1.0], [30, 40, 6.0]]}  # 50 px
    dense = warp_geojson(line, affine, densify=10.0)["coordinates"]
    np.testing.assert_allclose([p[2] for p in dense], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    np.testing.assert_allclose(dense[1][:2], _F(6.0, 8.0))


def test_target_to_source_inverts_source_to_target_affine(affine: Transform) -> None:
    data = qupath_collection()
    back = warp_geojson(warp_geojson(data, affine), affine, "target-to-source")
    for fid, f in _by_id(data).items():
        np.testing.assert_allclose(
            np.asarray(_by_id(back)[fid]["geometry"]["coordinates"], float),
            np.asarray(f["geometry"]["coordinates"], float),
            atol=1e-9,
        )


def test_cli_warp_annotations_with_a_saved_affine(affine: Transform, tmp_path: Path) -> None:
    tdir = affine.save(tmp_path / "transform")
    src = tmp_path / "in.geojson"
    src.write_text(json.dumps(qupath_collection()))
    out = tmp_path / "out.geojson"
    code, stdout, err = _cli(["warp-annotations", str(tdir), str(src), "--out", str(out)])
    assert code == 0, err
    assert stdout.strip() == str(out)
    got = _by_id(json.loads(out.read_text()))
    for fid, coords in EXPECTED.items():
        np.testing.assert_allclose(
            np.asarray(got[fid]["geometry"]["coordinates"], float), coords, atol=1e-9
        )
    back = tmp_path / "back.geojson"
    code, _, err = _cli(
        [
            "warp-annotations",
            str(tdir),
            str(out),
            "--out",
            str(back),
            "--direction",
            "target-to-source",
        ]
    )
    assert code == 0, err
    orig = _by_id(qupath_collection())
    for fid, f in _by_id(json.loads(back.read_text())).items():
        np.testing.assert_allclose(
            np.asarray(f["geometry"]["coordinates"], float),
            np.asarray(orig[fid]["geometry"]["coordinates"], float),
            atol=1e-9,
        )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        (
            json.dumps({"type": "Feature", "geometry": {"type": "Circle", "coordinates": [1, 2]}}),
            "not valid GeoJSON",
        ),
        (json.dumps({"type": "Polygon", "coordinates": 5}), "not valid GeoJSON"),
        # a NaN went through and came out as `[NaN, NaN]`, which no JSON reader accepts
        ('{"type": "Point", "coordinates": [NaN, 5]}', "position [nan, 5.0] is not finite"),
        ('{"type": "LineString", "coordinates": [[1, 2], [Infinity, 3]]}', "is not finite"),
        ('{"type": "MultiPoint", "coordinates": [[1, 2], [3]]}', "as many values"),
        ('{"type": "LineString", "coordinates": [[1, 2], [3, 4, 5]]}', "as many values"),
        # finite, but inf once in the fields' float32: the write failed, exit 1, no file named
        ('{"type": "Point", "coordinates": [1e308, 1e308]}', "is beyond 1e+09 px"),
    ],
)
def test_bad_geojson_exits_2_with_one_line(
    affine: Transform, tmp_path: Path, content: str, problem: str
) -> None:
    tdir = affine.save(tmp_path / "transform")
    bad = tmp_path / "bad.geojson"
    bad.write_text(content)
    out = tmp_path / "out.geojson"
    code, stdout, err = _cli(["warp-annotations", str(tdir), str(bad), "--out", str(out)])
    assert code == 2
    assert stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(bad) in lines[0] and problem in lines[0]
    assert "Traceback" not in err
    assert not out.exists()
    with pytest.raises(InputError, match=r"bad\.geojson"):
        warp_geojson_file(tdir, bad, out)


# -- a real registration ----------------------------------------------------------------------
def _points(path: Path) -> np.ndarray:
    with open(path, newline="") as fh:
        return np.array([[float(r["X"]), float(r["Y"])] for r in csv.DictReader(fh)])


def _centroid(ring: list[list[float]]) -> np.ndarray:
    """Area centroid of a closed ring (shoelace)."""
    p = np.asarray(ring, float)
    x, y = p[:, 0], p[:, 1]
    cross = x[:-1] * y[1:] - x[1:] * y[:-1]
    area = cross.sum() / 2
    cx = ((x[:-1] + x[1:]) * cross).sum() / (6 * area)
    cy = ((y[:-1] + y[1:]) * cross).sum() / (6 * area)
    return np.array([cx, cy])


@pytest.fixture(scope="module")
def run(prefect_env: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return register_lung_pair(tmp_path_factory)


def test_polygons_around_source_landmarks_land_on_target_landmarks(
    run: Path, tmp_path: Path
) -> None:
    source = _points(SOURCE_LM)
    target = _points(TARGET_LM)
    n = min(len(source), len(target))
    source, target = source[:n], target[:n]
    fc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "id": f"lm{i + 1}",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [
                        [
                            [x - 1, y - 1],
                            [x + 1, y - 1],
                            [x + 1, y + 1],
                            [x - 1, y + 1],
                            [x - 1, y - 1],
                        ]
                    ],
                },
                "properties": {"classification": {"name": "landmark"}, "index": i + 1},
            }
            for i, (x, y) in enumerate(source.tolist())
        ],
    }
    src = tmp_path / "landmarks.geojson"
    src.write_text(json.dumps(fc))
    out = tmp_path / "landmarks-in-target.geojson"
    code, _, err = _cli(["warp-annotations", str(run / "transform"), str(src), "--out", str(out)])
    assert code == 0, err
    warped = json.loads(out.read_text())["features"]
    assert [f["properties"]["index"] for f in warped] == list(range(1, n + 1))
    centroids = np.array([_centroid(f["geometry"]["coordinates"][0]) for f in warped])
    landmark_warp = _points(run / "warped-source-landmarks.csv")[:n]

    err_centroid = np.linalg.norm(centroids - target, axis=1)
    err_landmark = np.linalg.norm(landmark_warp - target, axis=1)
    diff = np.abs(err_centroid - err_landmark)
    gap = np.linalg.norm(centroids - landmark_warp, axis=1)
    print(
        f"\n[annotations] {n} landmark squares: median error centroid {np.median(err_centroid):.3f}"
        f" px vs landmark warp {np.median(err_landmark):.3f} px; per landmark |difference| "
        f"median {np.median(diff):.4f} px, max {diff.max():.4f} px; centroid-to-warped-landmark "
        f"distance median {np.median(gap):.4f} px, max {gap.max():.4f} px"
    )
    assert np.median(diff) < 0.2
    assert abs(np.median(err_centroid) - np.median(err_landmark)) < 0.1
    # and the registration did something: errors are far below the initial ones
    assert np.median(err_landmark) < 0.5 * np.median(np.linalg.norm(source - target, axis=1))
    # each warped square is a closed quadrilateral whose corners are the source corners mapped
    # by the transform (its size follows the field's local stretch, which on these lung pairs
    # reaches several times at a few landmarks: a 2 x 2 px square is checked, not assumed)
    transform = Transform.load(run / "transform")
    for f, (x, y) in zip(warped, source.tolist(), strict=True):
        ring = np.asarray(f["geometry"]["coordinates"][0], float)
        assert len(ring) == 5 and (ring[0] == ring[-1]).all()
        corners = np.array([[x - 1, y - 1], [x + 1, y - 1], [x + 1, y + 1], [x - 1, y + 1]])
        to_target = corner_origin(transform.source_to_target)  # GeoJSON: corner origin
        np.testing.assert_allclose(ring[:4], to_target(corners), atol=0.01)


def test_round_trip_through_a_registered_transform(run: Path) -> None:
    t = Transform.load(run / "transform")
    source = _points(SOURCE_LM)
    ring = [[x, y] for x, y in source[:20].tolist()] + [source[0].tolist()]
    line = {"type": "LineString", "coordinates": ring}
    there = warp_geojson(line, t, "source-to-target")
    back = warp_geojson(there, t, "target-to-source")
    d = np.linalg.norm(np.asarray(back["coordinates"]) - np.asarray(ring), axis=1)
    moved = np.linalg.norm(np.asarray(there["coordinates"]) - np.asarray(ring), axis=1)
    print(
        f"\n[annotations] round trip max error {d.max():.2e} px "
        f"(points moved {moved.min():.1f}+ px)"
    )
    assert d.max() < 1e-3
    assert moved.min() > 1.0  # a real, non-identity map


# -- label masks ---------------------------------------------------------------------------------
LABELS = (0, 3, 7, 50, 200)


def _label_mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.rectangle(m, (w // 8, h // 8), (w // 2, h // 2), 3, -1)
    cv2.circle(m, (2 * w // 3, h // 3), min(h, w) // 6, 7, -1)
    cv2.ellipse(m, (w // 3, 3 * h // 4), (w // 6, h // 10), 25, 0, 360, 50, -1)
    cv2.rectangle(m, (3 * w // 5, 3 * h // 5), (5 * w // 6, 7 * h // 8), 200, -1)
    return m


def _levels(path: Path) -> list[np.ndarray]:
    with open_slide(path) as s:
        return [s.read_region(k, 0, 0, *s.shapes[k][:2]) for k in range(len(s.levels))]


def test_warp_labels_keeps_only_label_values_at_every_level(run: Path, tmp_path: Path) -> None:
    t = Transform.load(run / "transform")
    h, w = t.source_shape
    png = tmp_path / "mask.png"
    assert cv2.imwrite(str(png), _label_mask(h, w))
    mask_zarr = tmp_path / "mask.zarr"
    code, _, err = _cli(["ingest", str(png), "--out", str(mask_zarr), "--quiet"])
    assert code == 0, err
    cfg = tmp_path / "small-pyramid.yaml"
    cfg.write_text("io:\n  pyramid_max_side: 128\n")
    outs = {}
    for name, extra in (("labels", ["--labels"]), ("smooth", [])):
        outs[name] = tmp_path / f"warped-{name}.zarr"
        code, _, err = _cli(
            [
                "warp",
                str(run / "transform"),
                str(mask_zarr),
                "--out",
                str(outs[name]),
                "--config",
                str(cfg),
                "--quiet",
                *extra,
            ]
        )
        assert code == 0, err
    levels = _levels(outs["labels"])
    assert levels[0].shape == (*t.target_shape, 1)
    assert len(levels) == 4  # 660 x 895 down to <= 128 px
    found = []
    for k, lv in enumerate(levels):
        values = set(np.unique(lv).tolist())
        found.append(sorted(values))
        assert values <= set(LABELS), (k, sorted(values - set(LABELS)))
        assert len(values - {0}) >= 3, (k, values)  # the labels survive the warp
    # control: the default (interpolating) warp does create other values
    smooth = _levels(outs["smooth"])
    extra = [sorted(set(np.unique(lv).tolist()) - set(LABELS)) for lv in smooth]
    print(
        f"\n[annotations] label warp values per level {found}; interpolating warp adds "
        f"{[len(e) for e in extra]} foreign values per level"
    )
    assert all(len(e) > 0 for e in extra)
    # labels land where the smooth warp puts them (same transform, nearest vs linear)
    same = (levels[0] == smooth[0]).mean()
    assert same > 0.95, same


def test_warp_labels_the_output_with_the_other_frame_and_refuses_a_wrong_size(
    tmp_path: Path,
) -> None:
    """The output of ``warp`` is in the other slide's frame: it carries that slide's pixel size
    (it once carried the input's), and an image of another size than the frame it should come
    from is refused (it once gave an all-white or wrongly cropped result)."""
    affine = np.diag([2.0, 2.0, 1.0])  # target (x, y) -> source (2x, 2y): source at 0.5 um/px
    meta = {"target_pixel_size_um": 1.0, "source_pixel_size_um": 0.5}
    Transform(affine, None, None, (50, 60), (100, 120), meta).save(tmp_path / "transform")
    rng = np.random.default_rng(0)
    for name, (h, w) in (("source", (100, 120)), ("target", (50, 60))):
        assert cv2.imwrite(str(tmp_path / f"{name}.png"), rng.integers(0, 255, (h, w, 3), np.uint8))
    cases = [
        ("source", "source-to-target", (50, 60), 1.0),
        ("target", "target-to-source", (100, 120), 0.5),
    ]
    for name, direction, shape, pixel_size in cases:
        out = tmp_path / f"{name}-warped.zarr"
        image = tmp_path / f"{name}.png"
        argv = ["warp", str(tmp_path / "transform"), str(image), "--out", str(out)]
        code, _, err = _cli([*argv, "--direction", direction, "--quiet"])
        assert code == 0, err
        with open_slide(out) as s:
            assert s.shapes[0][:2] == shape
            assert s.pixel_size_um == pytest.approx(pixel_size)
        # the metadata says which frame (it said "target frame" both ways)
        attrs = json.loads((out / ".zattrs").read_text())["wsireg_flow"]
        assert attrs["warped_into"] == f"{direction.rsplit('-', 1)[1]} frame"
    wrong = tmp_path / "wrong.zarr"
    argv = ["warp", str(tmp_path / "transform"), str(tmp_path / "target.png"), "--out", str(wrong)]
    code, _, err = _cli([*argv, "--quiet"])
    assert code == 2
    assert err.strip() == (
        f"wsireg-flow: error: {tmp_path / 'target.png'}: image is 60x50 px but the run's source "
        "is 120x100 px: source-to-target warps images of the source's size"
    )
    assert not (tmp_path / "wrong.zarr").exists()
