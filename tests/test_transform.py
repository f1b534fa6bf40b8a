"""Transform (affine + backward residual + stored inverse) and affine geometry helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsireg_flow.errors import InputError
from wsireg_flow.field import StoredField, invert
from wsireg_flow.geometry import (
    apply_affine,
    corner_origin,
    decompose,
    flip_x,
    level_to_level0,
    nearest_similarity,
    rescale_affine,
    rotation_about,
    to_level0_affine,
)
from wsireg_flow.transform import InverseView, Transform, TransformChain

TARGET_SHAPE = (800, 1000)  # level-0 (H, W)
SPACING = 4.0  # level-0 px per field grid px


def _affine() -> np.ndarray:
    return rotation_about(10.0, (500.0, 400.0), (530.0, 380.0), scale=1.05)


def _fields() -> tuple[StoredField, StoredField]:
    """Smooth backward residual (up to 8 level-0 px) on a spacing-4 grid, and its inverse."""
    gh, gw = int(TARGET_SHAPE[0] / SPACING), int(TARGET_SHAPE[1] / SPACING)
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float64)
    dy = np.sin(2 * np.pi * xx / 120 + 0.4) + 0.6 * np.cos(2 * np.pi * yy / 90)
    dx = np.cos(2 * np.pi * (xx + yy) / 150) + 0.5 * np.sin(2 * np.pi * yy / 70 + 1)
    r = np.stack([dy, dx])
    r = (r / np.abs(r).max() * 2.0).astype(np.float32)  # grid px: 2 grid px = 8 level-0 px
    s = invert(r)
    origin = 0.5 * SPACING - 0.5
    back = StoredField(r * np.float32(SPACING), SPACING, origin, {"direction": "backward"})
    inv = StoredField(s * np.float32(SPACING), SPACING, origin, {"direction": "inverse"})
    return back, inv


@pytest.fixture(scope="module")
def warped_transform() -> Transform:
    back, inv = _fields()
    return Transform(_affine(), back, inv, TARGET_SHAPE, (900, 1100), {"rigid_method": "test"})


def _random_points(n: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack(
        [rng.uniform(0, TARGET_SHAPE[1] - 1, n), rng.uniform(0, TARGET_SHAPE[0] - 1, n)], 1
    )


# --------------------------------------------------------------------------- affine only


def test_affine_only_mappings_are_exact_inverses() -> None:
    a = _affine()
    t = Transform(a, None, None, TARGET_SHAPE, (900, 1100))
    pts = _random_points()
    src = t.target_to_source(pts)
    np.testing.assert_allclose(src, apply_affine(a, pts), atol=1e-9)
    np.testing.assert_allclose(t.source_to_target(src), pts, atol=1e-9)
    np.testing.assert_allclose(t.source_to_target(src, exact=False), pts, atol=1e-9)
    np.testing.assert_allclose(t.target_to_source(t.source_to_target(pts)), pts, atol=1e-9)


def test_pure_translation_maps_points() -> None:
    a = np.array([[1.0, 0, 10.0], [0, 1.0, -7.0], [0, 0, 1]])
    t = Transform(a, None, None, (100, 100), (100, 100))
    np.testing.assert_allclose(t.target_to_source([[0.0, 0.0], [5.5, 3.0]]), [[10, -7], [15.5, -4]])
    mx, my = t.backward_coords(2, 3, 4, 5)
    np.testing.assert_array_equal(mx, np.arange(3, 8)[None].repeat(4, 0) + 10.0)
    np.testing.assert_array_equal(my, np.arange(2, 6)[:, None].repeat(5, 1) - 7.0)


# --------------------------------------------------------------------------- with fields


def test_fields_round_trip_exact_and_stored_inverse(warped_transform: Transform) -> None:
    t = warped_transform
    pts = _random_points()
    src = t.target_to_source(pts)
    # the residual really moves points (up to 8 px before the affine)
    moved = np.linalg.norm(src - apply_affine(t.affine, pts), axis=1)
    assert moved.max() > 5.0
    exact = t.source_to_target(src, exact=True)
    assert np.abs(exact - pts).max() < 1e-3
    approx = t.source_to_target(src, exact=False)
    err = np.linalg.norm(approx - pts, axis=1)
    # measured: mean 0.004 px, 0.05 px max where q = A^-1 p lies on the field grid; the few
    # points whose q falls off the grid (residual pushing outwards at the image border) read
    # the edge-clamped inverse and are off by up to 0.44 px
    assert err.mean() < 0.01
    assert np.median(err) < 0.005
    q = apply_affine(np.linalg.inv(t.affine), src)
    lo, hi = 1.5, np.array([TARGET_SHAPE[1], TARGET_SHAPE[0]]) - 2.5  # first/last grid node
    on_grid = np.all((q >= lo) & (q <= hi), axis=1)
    assert on_grid.mean() > 0.98
    assert err[on_grid].max() < 0.1
    assert err.max() < 0.5


def test_source_to_target_propagates_nan(warped_transform: Transform) -> None:
    out = warped_transform.source_to_target(np.array([[10.0, 20.0], [np.nan, 5.0]]))
    assert np.all(np.isfinite(out[0]))
    assert np.all(np.isnan(out[1]))
    assert warped_transform.source_to_target(np.zeros((0, 2))).shape == (0, 2)


@pytest.mark.parametrize(("y0", "x0", "h", "w"), [(37, 101, 90, 120), (100, 200, 500, 500)])
def test_backward_coords_match_target_to_source(
    warped_transform: Transform, y0: int, x0: int, h: int, w: int
) -> None:
    mx, my = warped_transform.backward_coords(y0, x0, h, w)
    assert mx.shape == my.shape == (h, w)
    assert mx.dtype == np.float32
    ys, xs = np.mgrid[y0 : y0 + h, x0 : x0 + w]
    pts = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    want = warped_transform.target_to_source(pts)
    err = np.hypot(mx.ravel() - want[:, 0], my.ravel() - want[:, 1])
    # small boxes sample exactly (scipy); > 200k px uses cv2.remap (1/32 px weights)
    assert err.max() < (1e-3 if h * w <= 200_000 else 0.05)


def test_chain_composes_in_order_and_inverts(warped_transform: Transform) -> None:
    """A stack chain reference -> neighbour -> section: points go through the transforms in
    order, come back through their inverses, and the chain's resampling maps agree with its
    point map. An empty chain is the identity."""
    shift = Transform(
        np.array([[1.0, 0, 12.5], [0, 1.0, -6.0], [0, 0, 1]]), None, None, (900, 1100), (900, 1100)
    )
    chain = TransformChain([warped_transform, shift], TARGET_SHAPE)
    pts = _random_points(500, seed=3)
    far = chain.target_to_source(pts)
    np.testing.assert_allclose(far, warped_transform.target_to_source(pts) + np.array([12.5, -6.0]))
    assert np.abs(chain.source_to_target(far) - pts).max() < 1e-3
    mx, my = chain.backward_coords(40, 60, 30, 50)
    ys, xs = np.mgrid[40:70, 60:110]
    want = chain.target_to_source(np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64))
    assert np.hypot(mx.ravel() - want[:, 0], my.ravel() - want[:, 1]).max() < 1e-3
    empty = TransformChain([], TARGET_SHAPE)
    np.testing.assert_array_equal(empty.target_to_source(pts), pts)
    mx, my = empty.backward_coords(5, 7, 2, 3)
    np.testing.assert_array_equal(mx, [[7, 8, 9]] * 2)
    np.testing.assert_array_equal(my, [[5] * 3, [6] * 3])


def test_inverse_view_resamples_target_into_source_frame(warped_transform: Transform) -> None:
    """InverseView's maps send source-frame pixels to the target points the forward map
    sends back onto them (stored inverse: within 0.1 px on the field grid)."""
    view = InverseView(warped_transform)
    assert view.target_shape == (900, 1100)
    y0, x0, h, w = 300, 400, 40, 60
    mx, my = view.backward_coords(y0, x0, h, w)
    q = np.stack([mx.ravel(), my.ravel()], 1).astype(np.float64)
    ys, xs = np.mgrid[y0 : y0 + h, x0 : x0 + w]
    back = warped_transform.target_to_source(q)
    assert np.hypot(back[:, 0] - xs.ravel(), back[:, 1] - ys.ravel()).max() < 0.1
    # without fields the view is the inverse affine, exactly
    plain = InverseView(Transform(_affine(), None, None, TARGET_SHAPE, (900, 1100)))
    mx, my = plain.backward_coords(y0, x0, h, w)
    want = apply_affine(np.linalg.inv(_affine()), np.stack([xs.ravel(), ys.ravel()], 1))
    assert np.hypot(mx.ravel() - want[:, 0], my.ravel() - want[:, 1]).max() < 1e-3


def test_save_load_round_trip(tmp_path: Path, warped_transform: Transform) -> None:
    t = warped_transform
    d = t.save(tmp_path / "transform")
    assert sorted(p.name for p in d.iterdir()) == ["affine.json", "backward.zarr", "inverse.zarr"]
    info = json.loads((d / "affine.json").read_text())
    assert info["backward"] == "backward.zarr" and info["inverse"] == "inverse.zarr"
    u = Transform.load(d)
    np.testing.assert_array_equal(u.affine, t.affine)
    assert u.target_shape == TARGET_SHAPE and u.source_shape == (900, 1100)
    assert u.meta == {"rigid_method": "test"}
    assert u.backward is not None and u.inverse is not None
    assert u.backward.spacing == SPACING and u.backward.origin == 1.5
    pts = _random_points(500, seed=3)
    np.testing.assert_array_equal(u.target_to_source(pts), t.target_to_source(pts))
    src = t.target_to_source(pts)
    np.testing.assert_array_equal(u.source_to_target(src), t.source_to_target(src))
    np.testing.assert_array_equal(
        u.source_to_target(src, exact=False), t.source_to_target(src, exact=False)
    )


def test_save_load_affine_only(tmp_path: Path) -> None:
    t = Transform(_affine(), None, None, TARGET_SHAPE, (900, 1100))
    u = Transform.load(t.save(tmp_path / "t"))
    assert u.backward is None and u.inverse is None
    assert not (tmp_path / "t" / "backward.zarr").exists()
    np.testing.assert_array_equal(u.affine, t.affine)


def test_load_refuses_non_transform_directory(tmp_path: Path) -> None:
    folder = tmp_path / "transform"
    folder.mkdir()
    with pytest.raises(InputError, match="not a transform directory"):
        Transform.load(folder)
    # an affine.json without its shapes raised a bare KeyError (exit 1); warp-annotations
    # then blamed the GeoJSON file
    (folder / "affine.json").write_text(json.dumps({"affine": np.eye(3).tolist()}))
    with pytest.raises(InputError, match=r"not a transform directory \(KeyError") as exc:
        Transform.load(folder)
    assert exc.value.path == folder
    from wsireg_flow.annotations import warp_geojson_file

    src = tmp_path / "points.geojson"
    src.write_text(json.dumps({"type": "Point", "coordinates": [1.0, 2.0]}))
    with pytest.raises(InputError, match="not a transform directory") as exc:
        warp_geojson_file(folder, src, tmp_path / "out.geojson")
    assert exc.value.path == folder
    # the run directory given instead of its transform/: say which folder to give
    run = tmp_path / "run"
    Transform(np.eye(3), None, None, (4, 5), (4, 5), {}).save(run / "transform")
    with pytest.raises(InputError) as exc:
        Transform.load(run)
    assert str(exc.value) == f"{run}: is a run directory: give {run / 'transform'}"


# --------------------------------------------------------------------------- geometry


def test_level_pixel_centres() -> None:
    # pixel 0 of a level with downsample 8 is centred between level-0 pixels 3 and 4
    np.testing.assert_allclose(apply_affine(level_to_level0(8.0), [[0.0, 0.0]]), [[3.5, 3.5]])
    np.testing.assert_allclose(apply_affine(level_to_level0(1.0), [[5.0, 7.0]]), [[5.0, 7.0]])


def test_corner_origin_points_map_like_the_pixels_they_name() -> None:
    """A 100 px wide mirror sends pixel-centre x to 99 - x, and corner-origin x (landmark CSVs,
    GeoJSON) to 100 - x: the left edge of the image to its right edge. A 2x downscale sends
    corner-origin x to x / 2 (pixel centre x to (x - 0.5) / 2)."""
    mirror = Transform(flip_x(100), None, None, (50, 100), (50, 100))
    pts = np.array([[0.0, 0.0], [0.5, 10.5], [100.0, 50.0]])
    np.testing.assert_allclose(mirror.target_to_source(pts), [[99, 0], [98.5, 10.5], [-1, 50]])
    np.testing.assert_allclose(
        corner_origin(mirror.target_to_source)(pts), [[100, 0], [99.5, 10.5], [0, 50]]
    )
    half = Transform(np.linalg.inv(level_to_level0(2.0)), None, None, (50, 100), (25, 50))
    np.testing.assert_allclose(corner_origin(half.target_to_source)(pts), pts / 2)


def test_rescale_and_to_level0_are_inverses() -> None:
    rng = np.random.default_rng(5)
    m0 = rotation_about(37.0, (1000.0, 800.0), (1200.0, 700.0), scale=0.9)
    m0[:2, :2] += rng.normal(scale=0.01, size=(2, 2))
    for dt, ds in [(8.0, 8.0), (4.0, 16.0), (2.0, 1.0)]:
        mk = rescale_affine(m0, dt, ds)
        np.testing.assert_allclose(to_level0_affine(mk, dt, ds), m0, atol=1e-9)
        # a level point maps consistently through level 0
        u = rng.uniform(0, 100, (20, 2))
        via0 = apply_affine(
            np.linalg.inv(level_to_level0(ds)), apply_affine(m0, u * dt + 0.5 * dt - 0.5)
        )
        np.testing.assert_allclose(apply_affine(mk, u), via0, atol=1e-9)


def test_level0_translation_of_8px_is_1px_at_downsample_8() -> None:
    m0 = np.array([[1.0, 0, 8.0], [0, 1.0, -16.0], [0, 0, 1]])
    np.testing.assert_allclose(
        rescale_affine(m0, 8.0, 8.0), [[1, 0, 1.0], [0, 1, -2.0], [0, 0, 1]], atol=1e-12
    )
    # identity between levels of downsample 4 (target) and 8 (source): u_s = 0.5 u_t - 0.25
    np.testing.assert_allclose(
        rescale_affine(np.eye(3), 4.0, 8.0), [[0.5, 0, -0.25], [0, 0.5, -0.25], [0, 0, 1]]
    )


def test_decompose_similarity_and_reflection() -> None:
    m = rotation_about(30.0, (10.0, 20.0), (30.0, 40.0), scale=1.2)
    d = decompose(m)
    assert d["scale"] == pytest.approx(1.2, abs=1e-9)
    assert d["rotation_deg"] == pytest.approx(30.0, abs=1e-9)
    assert d["shear"] == pytest.approx(0.0, abs=1e-9)
    assert d["anisotropy"] == pytest.approx(1.0, abs=1e-9)
    assert d["reflection"] == 0.0
    np.testing.assert_allclose(apply_affine(m, [[10.0, 20.0]]), [[30.0, 40.0]], atol=1e-9)

    mirrored = rotation_about(30.0, (10.0, 20.0), (30.0, 40.0), scale=1.2, flip_width=100)
    dm = decompose(mirrored)
    assert dm["reflection"] == 1.0
    assert dm["scale"] == pytest.approx(1.2, abs=1e-9)
    np.testing.assert_allclose(flip_x(100) @ flip_x(100), np.eye(3))

    sheared = np.array([[1.0, 0.3, 0], [0, 1.0, 0], [0, 0, 1]])
    assert decompose(sheared)["shear"] == pytest.approx(0.3, abs=1e-9)
    assert decompose(np.diag([2.0, 1.0, 1.0]))["anisotropy"] == pytest.approx(2.0)


@pytest.mark.parametrize("flip", [None, 100.0])
def test_nearest_similarity_keeps_similarities_and_projects_affines(flip: float | None) -> None:
    sim = rotation_about(-70.0, (10.0, 20.0), (30.0, 40.0), scale=0.8, flip_width=flip)
    np.testing.assert_allclose(nearest_similarity(sim, (50.0, 50.0)), sim, atol=1e-12)
    # add shear and anisotropy: the projection drops both, keeps rotation, scale and mirror
    distorted = sim @ np.array([[1.1, 0.05, 0.0], [0.02, 0.95, 0.0], [0.0, 0.0, 1.0]])
    out = nearest_similarity(distorted, (50.0, 50.0))
    d, d0 = decompose(out), decompose(sim)
    assert d["anisotropy"] == pytest.approx(1.0, abs=1e-12)
    assert d["shear"] == pytest.approx(0.0, abs=1e-12)
    assert d["reflection"] == d0["reflection"]
    assert d["rotation_deg"] == pytest.approx(d0["rotation_deg"], abs=2.0)
    assert d["scale"] == pytest.approx(0.8 * 1.025, abs=0.01)
    # the centre maps where the affine maps it
    np.testing.assert_allclose(
        apply_affine(out, [[50.0, 50.0]]), apply_affine(distorted, [[50.0, 50.0]]), atol=1e-9
    )
