"""Dense displacement fields: tiling, blending/stitching, composition, inversion, storage."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from wsireg_flow.errors import InputError
from wsireg_flow.field import (
    StoredField,
    blend_window,
    compose_residual,
    invert,
    invert_points,
    jacobian_determinant,
    load_field,
    resize_field,
    row_bands,
    sample,
    save_field,
    stitch,
    tile_boxes,
)


def smooth_field(h: int, w: int, amplitude: float = 10.0) -> np.ndarray:
    """(2, h, w) float32 sum of low-frequency sines, max |component| == amplitude."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy = 6 * np.sin(2 * np.pi * xx / 530 + 0.3) + 4 * np.cos(2 * np.pi * yy / 410)
    dx = 5 * np.cos(2 * np.pi * (xx + yy) / 700) + 5 * np.sin(2 * np.pi * yy / 290 + 1)
    f = np.stack([dy, dx])
    return (f / np.abs(f).max() * amplitude).astype(np.float32)


def endpoint_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.hypot(a[0] - b[0], a[1] - b[1])


# --------------------------------------------------------------------------- tile_boxes


@pytest.mark.parametrize(
    ("shape", "tile", "overlap"),
    [((600, 800), 256, 64), ((1000, 1300), 512, 128), ((896, 520), 512, 128), ((5, 5), 4, 1)],
)
def test_tile_boxes_cover_grid_with_overlap_and_flush_last_tile(
    shape: tuple[int, int], tile: int, overlap: int
) -> None:
    boxes = tile_boxes(shape, tile, overlap)
    h, w = shape
    cover = np.zeros(shape, int)
    for y0, x0, y1, x1 in boxes:
        assert (y1 - y0, x1 - x0) == (min(tile, h), min(tile, w))
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    ys = sorted({b[0] for b in boxes})
    xs = sorted({b[1] for b in boxes})
    assert len(boxes) == len(ys) * len(xs)  # a full grid
    for starts, n in ((ys, h), (xs, w)):
        assert starts[0] == 0
        assert starts[-1] + min(tile, n) == n  # last tile flush with the border
        steps = np.diff(starts)
        # regular stride tile - overlap, only the last step can be shorter (larger overlap)
        assert np.all(steps[:-1] == tile - overlap)
        if len(steps):
            assert 0 < steps[-1] <= tile - overlap


def test_tile_boxes_exact_layout() -> None:
    assert tile_boxes((600, 800), 256, 64) == [
        (y, x, y + 256, x + 256) for y in (0, 192, 344) for x in (0, 192, 384, 544)
    ]
    assert tile_boxes((100, 300), 512, 128) == [(0, 0, 100, 300)]  # grid smaller than a tile
    with pytest.raises(ValueError, match="overlap"):
        tile_boxes((600, 800), 256, 128)


# --------------------------------------------------------------------------- blend_window


def test_blend_window_borders_and_ramps() -> None:
    shape, overlap = (1000, 1300), 128
    ramp_down = (np.arange(128)[::-1] + 0.5) / 128  # last 128 px of a ramped edge
    ramp_up = (np.arange(128) + 0.5) / 128

    corner = blend_window((0, 0, 512, 512), shape, overlap)
    assert corner.shape == (512, 512)
    assert corner.dtype == np.float32
    # 1 on the grid border sides and in the interior, ramp over the inner overlap
    np.testing.assert_allclose(corner[0, :384], 1.0)
    np.testing.assert_allclose(corner[:384, 0], 1.0)
    np.testing.assert_allclose(corner[0, 384:], ramp_down, rtol=1e-6)
    np.testing.assert_allclose(corner[384:, 0], ramp_down, rtol=1e-6)
    assert corner[511, 511] == pytest.approx((0.5 / 128) ** 2, rel=1e-5)

    inner = blend_window((384, 384, 896, 896), shape, overlap)
    mid = inner[256]
    np.testing.assert_allclose(mid[:128], ramp_up, rtol=1e-6)
    np.testing.assert_allclose(mid[128:384], 1.0)
    np.testing.assert_allclose(mid[384:], ramp_down, rtol=1e-6)
    assert inner[0, 0] == pytest.approx((0.5 / 128) ** 2, rel=1e-5)

    last = blend_window((488, 788, 1000, 1300), shape, overlap)
    np.testing.assert_allclose(last[-1, 128:], 1.0)  # bottom and right are grid borders
    np.testing.assert_allclose(last[128:, -1], 1.0)
    np.testing.assert_allclose(last[300, :128], ramp_up, rtol=1e-6)

    # no overlap: all ones; each axis ramp is floored at 1e-3 (so 1e-6 in a corner)
    np.testing.assert_array_equal(blend_window((0, 0, 64, 64), (128, 128), 0), 1.0)
    tiny = blend_window((100, 100, 200, 200), (400, 400), 2000)
    assert tiny.min() == pytest.approx(1e-6, rel=1e-4)
    assert tiny[50, 0] == pytest.approx(1e-3 * 49.5 / 2000, rel=1e-4)


def test_blend_weights_of_regular_overlaps_sum_to_one() -> None:
    shape, tile, overlap = (1024, 1024), 256, 64  # (1024 - 256) / 192 = 4: no short last step
    total = np.zeros(shape)
    for b in tile_boxes(shape, tile, overlap):
        total[b[0] : b[2], b[1] : b[3]] += blend_window(b, shape, overlap)
    np.testing.assert_allclose(total, 1.0, atol=1e-5)


# --------------------------------------------------------------------------- stitch


def _tiles(field: np.ndarray, tile: int, overlap: int):
    shape = field.shape[1:]
    boxes = tile_boxes(shape, tile, overlap)
    fields = [field[:, y0:y1, x0:x1].copy() for y0, x0, y1, x1 in boxes]
    weights = [blend_window(b, shape, overlap) for b in boxes]
    return boxes, fields, weights


def test_stitch_recovers_smooth_field_without_seams() -> None:
    f = smooth_field(600, 800, 10.0)
    boxes, fields, weights = _tiles(f, 256, 64)
    assert len(boxes) == 12
    out, den = stitch(zip(fields, weights, boxes, strict=True), (600, 800), smooth_sigma=0.0)
    assert out.shape == (2, 600, 800) and out.dtype == np.float32
    err = endpoint_error(out, f)
    # measured: 0.014 px max (the 1e-3 prior shrinks the field by den / (den + prior))
    assert err.max() < 0.5
    assert err.max() < 0.02
    assert den.min() >= 1.0 - 1e-5
    # no seams: neighbour differences of the stitched field equal those of the truth
    for axis in (1, 2):
        seam = np.abs(np.diff(out, axis=axis) - np.diff(f, axis=axis)).max()
        assert seam < 1e-3


def test_stitch_with_missing_tile_rebalances_neighbours() -> None:
    f = smooth_field(600, 800, 10.0)
    boxes, fields, weights = _tiles(f, 256, 64)
    missing = boxes.index((192, 192, 448, 448))
    fields[missing] = None
    weights[missing] = None
    out, den = stitch(zip(fields, weights, boxes, strict=True), (600, 800), smooth_sigma=0.0)
    err = endpoint_error(out, f)
    covered = den > 0
    uncovered = ~covered
    # only the part of the missing tile no neighbour overlaps gets nothing:
    # y in [256, 344) (rows end at 256 / start at 344), x in [256, 384)
    assert uncovered.sum() == 88 * 128
    assert not uncovered[:256].any() and not uncovered[344:].any()
    assert np.all(out[:, uncovered] == 0)
    # where neighbours cover it with a weight sum well above the prior (1e-3): < 0.5 px
    # (measured 0.47 px at den >= 0.02, 0.21 px at den >= 0.05; in the outermost ramp pixels,
    # den ~ 0.008, the prior shrinks the field by up to 1.3 px, by design)
    solid = den >= 0.02
    assert solid[covered].mean() > 0.999
    assert err[solid].max() < 0.5
    # with prior 0 the rebalanced weights are exact wherever any neighbour contributes
    out0, _ = stitch(
        zip(fields, weights, boxes, strict=True), (600, 800), smooth_sigma=0.0, prior=0.0
    )
    assert endpoint_error(out0, f)[covered].max() < 1e-3


def test_stitch_smoothing_keeps_constant_field_next_to_missing_tile() -> None:
    shape = (600, 800)
    f = np.empty((2, *shape), np.float32)
    f[0], f[1] = 3.0, -4.0
    boxes, fields, weights = _tiles(f, 256, 64)
    missing = boxes.index((192, 192, 448, 448))
    fields[missing] = weights[missing] = None
    out, den = stitch(zip(fields, weights, boxes, strict=True), shape, smooth_sigma=8.0)
    # normalised convolution: smoothing does not drag the field to zero next to the hole
    solid = den >= 0.5
    np.testing.assert_allclose(out[0][solid], 3.0, atol=0.01)
    np.testing.assert_allclose(out[1][solid], -4.0, atol=0.01)


def test_tiles_without_tissue_keep_the_coarse_transform_away_from_tissue() -> None:
    """Tiles without tissue give nothing to the stitch. With the default settings the field
    continues smoothly from the tissue tiles into a band of up to one tile (no fold at the
    tissue border) and beyond it is zero: the transform of the level above is kept."""
    from wsireg_flow.config import Config

    nr = Config().nonrigid
    shape = (2048, 3072)
    f = np.empty((2, *shape), np.float32)
    f[0], f[1] = -3.0, 6.0
    boxes, fields, weights = _tiles(f, nr.tile, nr.overlap)
    # tiles ending at x <= 1024 have tissue and a residual of (-3, 6) px; the last ends at 896
    tissue_right = max(b[3] for b in boxes if b[3] <= 1024)
    for k, b in enumerate(boxes):
        on_tissue = b[3] <= 1024
        fields[k] = fields[k] if on_tissue else None
        weights[k] = weights[k] * 0.6 if on_tissue else None
    out, _ = stitch(
        zip(fields, weights, boxes, strict=True), shape, nr.smooth_sigma, fill_sigma=nr.tile / 4
    )
    magnitude = np.hypot(out[0], out[1])
    # full residual up to the last tissue tile's blend ramp (the weight prior costs 0.01 px)
    assert np.abs(magnitude[:, : tissue_right - nr.overlap] - np.hypot(3, 6)).max() < 0.02
    assert magnitude[:, tissue_right + nr.tile :].max() < 0.05  # one tile beyond: coarse kept
    assert jacobian_determinant(out).min() > 0.9  # the transition does not fold


# --------------------------------------------------------------------------- compose_residual


def test_compose_residual_matches_analytic_linear_composition() -> None:
    h, w = 120, 160
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    inner = np.stack([0.01 * yy + 0.5, -0.02 * xx + 1.0]).astype(np.float32)
    outer = np.stack([0.03 * xx - 1.0, 0.01 * yy + 2.0]).astype(np.float32)
    got = compose_residual(outer, inner)
    qy, qx = yy + inner[0], xx + inner[1]  # where the inner map sends each node
    want = np.stack([inner[0] + 0.03 * qx - 1.0, inner[1] + 0.01 * qy + 2.0])
    inside = (qy >= 0) & (qy <= h - 1) & (qx >= 0) & (qx <= w - 1)
    assert inside.mean() > 0.9
    np.testing.assert_allclose(got[:, inside], want[:, inside], atol=1e-4)

    # constant fields simply add
    c1 = np.broadcast_to(np.array([1.5, -2.0], np.float32)[:, None, None], (2, h, w)).copy()
    c2 = np.broadcast_to(np.array([-0.25, 3.0], np.float32)[:, None, None], (2, h, w)).copy()
    np.testing.assert_allclose(compose_residual(c2, c1), c1 + c2, atol=1e-6)


# --------------------------------------------------------------------------- invert


def test_invert_round_trip_on_smooth_field() -> None:
    h, w = 300, 400
    r = smooth_field(h, w, 8.0)
    s = invert(r)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    # forward then inverse: x -> y = x + r(x) -> y + s(y)
    y1, x1 = yy + r[0], xx + r[1]
    back = sample(s, y1, x1)
    zy, zx = y1 + back[0], x1 + back[1]
    inside = (y1 >= 0) & (y1 <= h - 1) & (x1 >= 0) & (x1 <= w - 1)
    err = np.hypot(zy - yy, zx - xx)[inside]
    assert err.mean() < 0.01
    # inverse then forward (the defining property): (x + s(x)) + r(x + s(x)) = x
    y2, x2 = yy + s[0], xx + s[1]
    fwd = sample(r, y2, x2)
    inside2 = (y2 >= 0) & (y2 <= h - 1) & (x2 >= 0) & (x2 <= w - 1)
    err2 = np.hypot(y2 + fwd[0] - yy, x2 + fwd[1] - xx)[inside2]
    assert err2.max() < 0.01
    assert err2.mean() < 1e-3


def test_invert_points_solves_forward_map() -> None:
    h, w = 300, 400
    r = smooth_field(h, w, 8.0)
    rng = np.random.default_rng(1)
    p = np.stack([rng.uniform(20, h - 20, 500), rng.uniform(20, w - 20, 500)], 1)
    x = invert_points(r, p)
    assert x.shape == (500, 2)
    rx = sample(r, x[:, 0], x[:, 1])
    np.testing.assert_allclose(x[:, 0] + rx[0], p[:, 0], atol=1e-3)
    np.testing.assert_allclose(x[:, 1] + rx[1], p[:, 1], atol=1e-3)


def test_invert_points_converges_where_the_field_stretches_more_than_twice() -> None:
    """r_x = 1.5 (x - 50): x + r(x) = 2.5 x - 75 is invertible, but the plain iteration
    x <- p - r(x) multiplies its error by -1.5 each step (measured on DIS-only ANHIR fields:
    landmarks left 19-29 px from their solution)."""
    yy, xx = np.mgrid[0:100, 0:100].astype(np.float32)
    r = np.stack([np.zeros_like(yy), 1.5 * (xx - 50)])
    p = np.array([[30.0, 60.0], [70.0, 45.0], [10.0, 80.0]])  # (y, x)
    x = invert_points(r, p)
    np.testing.assert_allclose(x[:, 1], (p[:, 1] + 75) / 2.5, atol=1e-3)
    np.testing.assert_allclose(x[:, 0], p[:, 0], atol=1e-6)


def test_invert_points_finds_the_solution_beside_a_fold() -> None:
    """f(x) = x + r(x) rises, falls back and rises again: from p the damped iteration stops at
    the local extremum of f (up to 6.8 px off here); the restarts around it find the solution (on
    an ANHIR pair: one landmark 4.1 px off, its solution 2 px away)."""
    yy, xx = np.mgrid[0:60, 0:120].astype(np.float32)
    r = np.stack([np.zeros_like(yy), 12.0 * np.exp(-(((xx - 60) / 4.0) ** 2)) * np.tanh(xx - 60)])
    p = np.stack([np.full(62, 30.0), np.arange(45.0, 76.0, 0.5)], 1)
    x = invert_points(r.astype(np.float32), p)
    rx = sample(r.astype(np.float32), x[:, 0], x[:, 1])
    np.testing.assert_allclose(x[:, 1] + rx[1], p[:, 1], atol=0.05)


# --------------------------------------------------------------------------- sample / resize


def test_sample_large_grid_path_matches_exact_bilinear() -> None:
    f = smooth_field(300, 400, 10.0)
    rng = np.random.default_rng(2)
    ys = rng.uniform(0, 299, (500, 500))  # 250k > 200k samples: OpenCV remap path
    xs = rng.uniform(0, 399, (500, 500))
    fast = sample(f, ys, xs)
    exact = sample(f, ys[:200], xs[:200])  # 100k: scipy path
    assert fast.shape == (2, 500, 500)
    assert np.abs(fast[:, :200] - exact).max() < 0.01  # 1/32 px weight quantisation


def test_resize_field_linear_field_is_exact_with_pixel_centre_alignment() -> None:
    hc, wc, factor = 40, 60, 4.0
    cy, cx = np.mgrid[0:hc, 0:wc].astype(np.float64)
    coarse = np.stack([0.05 * cy - 0.02 * cx + 1.0, 0.03 * cy + 0.04 * cx - 2.0]).astype(np.float32)
    fine = resize_field(coarse, (160, 240), factor)
    assert fine.shape == (2, 160, 240)
    fy, fx = np.mgrid[0:160, 0:240].astype(np.float64)
    uy, ux = (fy + 0.5) / factor - 0.5, (fx + 0.5) / factor - 0.5  # coarse coordinates
    want = factor * np.stack([0.05 * uy - 0.02 * ux + 1.0, 0.03 * uy + 0.04 * ux - 2.0])
    inner = (slice(2, -2), slice(2, -2))  # the outer 1.5 px map outside the coarse grid
    np.testing.assert_allclose(fine[0][inner], want[0][inner], atol=1e-4)
    np.testing.assert_allclose(fine[1][inner], want[1][inner], atol=1e-4)
    # a constant coarse field becomes a constant factor-times-larger fine field everywhere
    const = np.ones((2, 10, 10), np.float32)
    np.testing.assert_allclose(resize_field(const, (20, 20), 2.0), 2.0)


def test_jacobian_determinant_of_linear_field() -> None:
    a, b, c, d = 0.1, -0.2, 0.05, 0.3
    yy, xx = np.mgrid[0:50, 0:70].astype(np.float64)
    r = np.stack([a * yy + b * xx, c * yy + d * xx]).astype(np.float32)
    jac = jacobian_determinant(r)
    assert jac.shape == (50, 70)
    np.testing.assert_allclose(jac, (1 + a) * (1 + d) - b * c, atol=1e-5)
    # a fold: x -> -x has det < 0
    fold = np.stack([np.zeros_like(xx), -2.0 * xx]).astype(np.float32)
    assert np.all(jacobian_determinant(fold) < 0)


# --------------------------------------------------------------------------- storage


def test_save_load_field_round_trip(tmp_path: Path) -> None:
    data = smooth_field(130, 170, 12.0)
    sf = StoredField(data, 8.0, 3.5, {"direction": "backward", "level": 3, "note": [1, 2]})
    save_field(tmp_path / "f.zarr", sf)
    back = load_field(tmp_path / "f.zarr")
    np.testing.assert_array_equal(back.data, data)
    assert back.data.dtype == np.float32
    assert back.spacing == 8.0
    assert back.origin == 3.5
    assert back.meta["direction"] == "backward"
    assert back.meta["level"] == 3
    assert back.meta["note"] == [1, 2]
    assert back.meta["units"] == "level-0 pixels"


def test_load_field_refuses_non_field(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a readable displacement field"):
        load_field(tmp_path / "missing.zarr")


@pytest.mark.parametrize("shape", [(1, 7), (300, 400), (2500, 2500), (3100, 1700), (50, 90000)])
def test_row_bands_cover_the_grid_once_and_stay_above_the_exact_sampling_size(
    shape: tuple[int, int],
) -> None:
    h, w = shape
    bands = row_bands(h, w)
    assert bands[0][0] == 0 and bands[-1][1] == h
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bands))
    assert all(y1 > y0 for y0, y1 in bands)
    if h * w > 1_000_000:
        assert len(bands) > 1 and min((y1 - y0) * w for y0, y1 in bands) > 200_000
    else:
        assert bands == [(0, h)]


def test_banded_field_operations_match_the_whole_grid_formulas() -> None:
    """invert, compose_residual and jacobian_determinant work in bands of rows; on a 2100 x
    1300 grid (3 bands) they equal the whole-grid formulas (no seam at band edges)."""
    f = smooth_field(2100, 1300, amplitude=8.0)
    g = smooth_field(2100, 1300, amplitude=5.0)[:, ::-1].copy()
    assert len(row_bands(2100, 1300)) == 3
    yy, xx = np.mgrid[0:2100, 0:1300].astype(np.float32)
    np.testing.assert_allclose(
        compose_residual(f, g), g + sample(f, yy + g[0], xx + g[1]), atol=1e-5
    )
    dy_dy, dy_dx = np.gradient(f[0] * np.float32(0.5))
    dx_dy, dx_dx = np.gradient(f[1] * np.float32(0.5))
    whole = (1 + dy_dy) * (1 + dx_dx) - dy_dx * dx_dy
    np.testing.assert_allclose(jacobian_determinant(f, 0.5), whole, atol=1e-6)
    inv = invert(f)
    back = np.abs(inv + sample(f, yy + inv[0], xx + inv[1]))  # x + s(x) mapped by r is x
    assert float(back.mean()) < 1e-4 and float(back.max()) < 0.01  # measured 4e-5 and 0.005
    edges = [y0 for y0, _ in row_bands(2100, 1300)[1:]]
    assert float(back[:, [e - 1 for e in edges] + edges].max()) < 0.01  # no seam at band edges


def test_field_operations_hold_few_grid_sized_temporaries() -> None:
    """Peak memory of stitch, invert, compose_residual and jacobian_determinant on a 2000² grid,
    in grid-sized float32 arrays (numpy allocations, traced; outputs included): the whole-grid
    versions measured 16, 10, 8 and 6; the banded ones 8, 4.5, 3.5 and 3.8 (a band of 1M pixels
    is a quarter of this grid, so band temporaries count here)."""
    import tracemalloc

    h = w = 2000
    rng = np.random.default_rng(0)
    boxes = tile_boxes((h, w), 512, 64)
    fields = [
        rng.normal(0, 1, (2, y1 - y0, x1 - x0)).astype(np.float32) for (y0, x0, y1, x1) in boxes
    ]
    weights = [blend_window(b, (h, w), 64) for b in boxes]
    small = smooth_field(h, w, amplitude=3.0)
    grid = h * w * 4
    calls = {
        "stitch": (
            lambda: stitch(
                zip(fields, weights, boxes, strict=True), (h, w), smooth_sigma=5, fill_sigma=128
            ),
            8.5,
        ),
        "invert": (lambda: invert(small, iterations=3), 5.0),
        "compose": (lambda: compose_residual(small, small), 4.0),
        "jacobian": (lambda: jacobian_determinant(small), 4.0),
    }
    for name, (call, limit) in calls.items():
        tracemalloc.start()
        result = call()
        peak = tracemalloc.get_traced_memory()[1] / grid
        tracemalloc.stop()
        del result
        assert peak <= limit, (name, peak)


def test_stored_tiles_are_blended_one_at_a_time(tmp_path: Path) -> None:
    """The stitch stage reads the stored tiles one by one while blending (``open_tiles``): same
    field and report as with every tile loaded first (``load_tiles``), without holding the
    tiles (numpy allocations traced)."""
    import tracemalloc

    from wsireg_flow.config import Config
    from wsireg_flow.nonrigid import TileResult
    from wsireg_flow.register import LevelTiles, stitch_level
    from wsireg_flow.tilestore import load_tiles, open_tiles, save_tiles

    h = w = 1500
    cfg = Config()
    rng = np.random.default_rng(0)
    boxes = tile_boxes((h, w), 384, 64)
    statuses = itertools.cycle(["ok", "ok", "ok", "low confidence", "no tissue"])
    results = []
    for box, status in zip(boxes, statuses, strict=False):
        y0, x0, y1, x1 = box
        ok = status == "ok"
        residual = rng.normal(0, 1, (2, y1 - y0, x1 - x0)).astype(np.float32) if ok else None
        weight = blend_window(box, (h, w), 64) * np.float32(0.8) if ok else None
        results.append(TileResult(box, residual, weight, 0.8, 0.9, 0.5, 0.6, status))
    tile_bytes = sum(r.residual.nbytes + r.weight.nbytes for r in results if r.status == "ok")
    prior = smooth_field(h, w, amplitude=2.0)
    mask = np.ones((h, w), bool)
    path = tmp_path / "tiles.npz"
    save_tiles(path, LevelTiles(1, 1, (h, w), 4.0, prior, mask, results, 1.0))

    def eager() -> tuple[np.ndarray, object]:
        return stitch_level(load_tiles(path), cfg)

    def lazy() -> tuple[np.ndarray, object]:
        with open_tiles(path) as tiles:
            assert all(r.residual is None for r in tiles.results)
            return stitch_level(tiles, cfg)

    peaks, outputs = {}, {}
    for name, call in (("eager", eager), ("lazy", lazy)):
        tracemalloc.start()
        outputs[name] = call()
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    (field_e, report_e), (field_l, report_l) = outputs["eager"], outputs["lazy"]
    np.testing.assert_array_equal(field_e, field_l)
    assert report_e.tiles_ok == report_l.tiles_ok == sum(r.status == "ok" for r in results)
    assert report_e.statuses == report_l.statuses
    np.testing.assert_array_equal(report_e.confidence_map, report_l.confidence_map)
    saved = peaks["eager"] - peaks["lazy"]
    print(
        f"\ntiles {tile_bytes / 1e6:.0f} MB; traced peak eager {peaks['eager'] / 1e6:.0f} MB, "
        f"lazy {peaks['lazy'] / 1e6:.0f} MB"
    )
    assert saved > 0.8 * tile_bytes, (saved, tile_bytes)
