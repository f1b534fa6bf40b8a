"""Pyramid level shapes, 2x2 box-average downsampling and level selection."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from wsireg_flow.pyramid import (
    downsample2,
    downsample2_cyx,
    level_downsamples,
    level_for_max_side,
    level_for_pixel_size,
    pyramid_shapes,
)


def _box_mean_reference(a: np.ndarray) -> np.ndarray:
    """Exact 2x2 means (edge rows/cols averaged with themselves), ints rounded half up."""
    h, w = a.shape[:2]
    p = np.pad(a, [(0, h % 2), (0, w % 2)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    if a.dtype.kind in "iub":
        p = p.astype(object)  # Python ints: no overflow for any integer dtype
        s = p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2]
        return (s + 2) // 4  # object array of exact Python ints
    p = p.astype(np.float64)
    return (p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2]) / 4


# --------------------------------------------------------------------------- pyramid_shapes


def test_pyramid_shapes_tcga() -> None:
    assert pyramid_shapes(3567, 4443, 1024) == [(3567, 4443), (1784, 2222), (892, 1111), (446, 556)]


def test_pyramid_shapes_values() -> None:
    assert pyramid_shapes(2967, 2220) == [(2967, 2220), (1484, 1110), (742, 555)]
    assert pyramid_shapes(1024, 1024) == [(1024, 1024)]
    assert pyramid_shapes(1025, 10) == [(1025, 10), (513, 5)]
    assert pyramid_shapes(20000, 20000) == [
        (20000, 20000),
        (10000, 10000),
        (5000, 5000),
        (2500, 2500),
        (1250, 1250),
        (625, 625),
    ]
    assert pyramid_shapes(5, 7, max_side=1) == [(5, 7), (3, 4), (2, 2), (1, 1)]
    assert pyramid_shapes(1, 1, max_side=1) == [(1, 1)]


@pytest.mark.parametrize(("h", "w", "m"), [(0, 5, 10), (5, -1, 10), (5, 5, 0)])
def test_pyramid_shapes_rejects_bad_input(h: int, w: int, m: int) -> None:
    with pytest.raises(ValueError):
        pyramid_shapes(h, w, m)


# --------------------------------------------------------------------------- downsample2


def test_downsample2_even_by_hand() -> None:
    a = np.array(
        [
            [0, 4, 8, 12],
            [4, 8, 12, 16],
            [1, 1, 10, 20],
            [1, 2, 30, 40],
        ],
        dtype=np.uint8,
    )
    # means: (0+4+4+8)/4=4, (8+12+12+16)/4=12, (1+1+1+2)/4=1.25->1, (10+20+30+40)/4=25
    out = downsample2(a)
    assert out.dtype == np.uint8
    assert out.tolist() == [[4, 12], [1, 25]]


def test_downsample2_odd_sizes_by_hand() -> None:
    a = (np.arange(15, dtype=np.uint8).reshape(3, 5) * 10).astype(np.uint8)
    # [[  0  10  20  30  40]
    #  [ 50  60  70  80  90]
    #  [100 110 120 130 140]]
    # last column (40, 90) is averaged with itself: (40+40+90+90)/4 = 65
    # last row (100..140) is averaged with itself: (100+110+100+110)/4 = 105
    # corner: (140*4)/4 = 140
    out = downsample2(a)
    assert out.shape == (2, 3)
    assert out.tolist() == [[30, 50, 65], [105, 125, 140]]


def test_downsample2_rounds_half_up() -> None:
    a = np.array([[0, 0, 1, 1, 2, 2, 0, 0], [1, 1, 2, 2, 3, 3, 0, 1]], dtype=np.uint8)
    # sums 2, 6, 10, 1 -> means 0.5, 1.5, 2.5, 0.25
    assert downsample2(a).tolist() == [[1, 2, 3, 0]]


def test_downsample2_rgb_by_hand() -> None:
    a = np.zeros((3, 3, 3), np.uint8)
    a[..., 0] = [[0, 8, 100], [8, 16, 200], [40, 80, 255]]
    a[..., 1] = 7
    a[..., 2] = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    out = downsample2(a)
    assert out.shape == (2, 2, 3)
    # channel 0: (0+8+8+16)/4=8, (100+100+200+200)/4=150, (40+80+40+80)/4=60, 255
    assert out[..., 0].tolist() == [[8, 150], [60, 255]]
    assert out[..., 1].tolist() == [[7, 7], [7, 7]]
    # channel 2: (1+2+4+5)/4=3, (3+3+6+6)/4=4.5->5, (7+8+7+8)/4=7.5->8, 9
    assert out[..., 2].tolist() == [[3, 5], [8, 9]]


def test_downsample2_keeps_single_channel_axis() -> None:
    a = np.array([[[10], [20], [30]], [[30], [40], [50]]], dtype=np.uint8)
    out = downsample2(a)
    assert out.shape == (1, 2, 1)
    assert out[:, :, 0].tolist() == [[25, 40]]


def test_downsample2_float() -> None:
    a = np.array([[0.0, 1.0, 2.0], [0.5, 0.25, 8.0]], dtype=np.float32)
    out = downsample2(a)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.4375, 5.0]], rtol=1e-6)


@pytest.mark.parametrize("channels", [None, 1, 2, 3, 4, 5])
@pytest.mark.parametrize(
    "dtype",
    [np.uint8, np.uint16, np.int16, np.float32, np.float64, np.int8, np.int32, np.uint32, np.int64],
)
def test_downsample2_matches_reference(dtype: type, channels: int | None) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{np.dtype(dtype).str}/{channels}".encode()))
    shape = (37, 22) if channels is None else (37, 22, channels)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    else:
        a = (rng.random(shape) * 1000 - 200).astype(dtype)
    out = downsample2(a)
    ref = _box_mean_reference(a)
    assert out.shape == ref.shape == ((19, 11) if channels is None else (19, 11, channels))
    assert out.dtype == a.dtype
    if np.issubdtype(dtype, np.integer):
        assert [int(v) for v in out.ravel()] == [int(v) for v in ref.ravel()]
    else:
        np.testing.assert_allclose(out.astype(np.float64), ref, rtol=1e-6)


def test_downsample2_bool_mask() -> None:
    a = np.array([[1, 0, 1, 1], [0, 0, 1, 0], [1, 0, 0, 0]], dtype=bool)
    # 2x2 shares: 1/4, 3/4 | bottom row averaged with itself: 2/4 (half rounds up), 0/4
    out = downsample2(a)
    assert out.dtype == bool
    assert out.tolist() == [[False, True], [True, False]]


def test_downsample2_cyx_by_hand() -> None:
    yxc = np.zeros((3, 4, 2), np.uint8)
    yxc[..., 0] = [[0, 4, 8, 12], [4, 8, 12, 16], [20, 20, 21, 23]]
    yxc[..., 1] = [[255, 255, 0, 1], [255, 255, 2, 3], [9, 9, 9, 9]]
    cyx = np.ascontiguousarray(np.moveaxis(yxc, 2, 0))
    out = downsample2_cyx(cyx)
    assert out.shape == (2, 2, 2)
    # channel 0: 4, 12, (20+20+20+20)/4=20, (21+23+21+23)/4=22
    assert out[0].tolist() == [[4, 12], [20, 22]]
    # channel 1: 255, (0+1+2+3)/4=1.5->2, 9, 9
    assert out[1].tolist() == [[255, 2], [9, 9]]
    np.testing.assert_array_equal(out, np.moveaxis(downsample2(yxc), 2, 0))


def test_downsample2_cyx_rgb_matches_reference() -> None:
    rng = np.random.default_rng(5)
    cyx = rng.integers(0, 256, (3, 41, 30), dtype=np.uint8)
    out = downsample2_cyx(cyx)
    assert out.shape == (3, 21, 15)
    ref = np.moveaxis(_box_mean_reference(np.moveaxis(cyx, 0, -1)), -1, 0)
    np.testing.assert_array_equal(out, ref.astype(np.uint8))


# --------------------------------------------------------------------------- level selection


def test_level_for_max_side() -> None:
    shapes = [(3567, 4443, 3), (1784, 2222, 3), (892, 1111, 3), (446, 556, 3)]
    assert level_for_max_side(shapes, 5000) == 0
    assert level_for_max_side(shapes, 4443) == 0
    assert level_for_max_side(shapes, 4442) == 1
    assert level_for_max_side(shapes, 2222) == 1
    assert level_for_max_side(shapes, 1111) == 2
    assert level_for_max_side(shapes, 1110) == 3
    assert level_for_max_side(shapes, 100) == 3  # nothing that small: coarsest
    assert level_for_max_side([(10, 800)], 1024) == 0


def test_level_for_pixel_size() -> None:
    sizes = [0.499, 0.998, 1.996, 3.992]
    assert level_for_pixel_size(sizes, 0.1) == 0  # finer than level 0: level 0
    assert level_for_pixel_size(sizes, 0.499) == 0
    assert level_for_pixel_size(sizes, 0.9) == 0
    assert level_for_pixel_size(sizes, 0.998) == 1
    assert level_for_pixel_size(sizes, 0.998 * (1 - 1e-7)) == 1  # relative tolerance 1e-6
    assert level_for_pixel_size(sizes, 0.998 * (1 - 1e-5)) == 0
    assert level_for_pixel_size(sizes, 2.5) == 2
    assert level_for_pixel_size(sizes, 100.0) == 3


# --------------------------------------------------------------------------- level_downsamples


def test_level_downsamples_are_the_factors_not_the_size_ratios() -> None:
    # ceil-halved (ours): 1025 -> 513 -> ... -> 17 px, size ratio 60.3 at level 6
    assert level_downsamples(pyramid_shapes(1025, 1030, 20)) == [2.0**k for k in range(7)]
    # Aperio: 4x steps with floored sizes
    assert level_downsamples([(40001, 30003), (10000, 7500), (2500, 1875)]) == [1.0, 4.0, 16.0]
    # a step no integer factor explains keeps its size ratio
    assert level_downsamples([(1000, 1000), (400, 400), (200, 200)]) == [1.0, 2.5, 5.0]
    assert level_downsamples([(7, 9)]) == [1.0]


def test_ingested_levels_map_back_to_level0_positions(tmp_path: Path) -> None:
    """A blob at level-0 (x, y) = (880, 900) in a 1025 px image, found at every level of the
    ingested pyramid and mapped back with the slide's downsamples, lands within 0.6 px (the
    size ratio, 31.06 instead of 32 at level 5, would put it 27 px off)."""
    import dask.array as da

    from wsireg_flow.io.omezarr import write_ngff_pyramid
    from wsireg_flow.io.slide import open_slide

    yy, xx = np.mgrid[0:1025, 0:1025]
    blob = 255 * np.exp(-((xx - 880.0) ** 2 + (yy - 900.0) ** 2) / (2 * 25.0**2))
    img = da.from_array(blob.astype(np.float32)[..., None], chunks=(512, 512, 1))
    with open_slide(write_ngff_pyramid(img, tmp_path / "blob.zarr", max_side=40)) as s:
        assert len(s.levels) == 6
        for k in range(1, len(s.levels)):
            a = s.read_region(k, 0, 0, *s.shapes[k][:2])[..., 0].astype(np.float64)
            a = np.where(a > 0.02 * a.max(), a, 0.0)
            v, u = np.mgrid[0 : a.shape[0], 0 : a.shape[1]]
            y, x = (v * a).sum() / a.sum(), (u * a).sum() / a.sum()  # level-k pixel centres
            d = s.downsamples[k]
            assert d == 2.0**k
            assert abs((x + 0.5) * d - 0.5 - 880.0) < 0.6, k
            assert abs((y + 0.5) * d - 0.5 - 900.0) < 0.6, k


def test_label_levels_are_the_2x2_mode_centred_like_image_levels(tmp_path: Path) -> None:
    """Label levels took every second pixel: level-k pixel u sat on level-0 pixel u 2^k,
    (2^k - 1) / 2 px (3.5, 7.5, 15.5 px at levels 3, 4, 5) off the image levels' centres;
    the mode is off by 0.3, 0.9, 4.1 px there (a disk of 9 pixels at level 5)."""
    import itertools
    from collections import Counter

    import dask.array as da

    from wsireg_flow.io.omezarr import mode2_cyx, write_ngff_pyramid
    from wsireg_flow.io.slide import open_slide

    for values in itertools.product(range(4), repeat=4):  # every 2x2 block of 4 labels
        count = Counter(values)
        most = [v for v in values if count[v] == max(count.values())]
        # ties: the first in reading order, or the last in every other block (checkerboard)
        a, b, d, e = values  # the same 2x2 block twice, side by side
        block = np.array([[[a, b, a, b], [d, e, d, e]]], np.uint8)
        assert mode2_cyx(block)[0, 0].tolist() == [most[0], most[-1]], values
    assert mode2_cyx(np.arange(15, dtype=np.uint8).reshape(1, 3, 5)).shape == (1, 2, 3)

    yy, xx = np.mgrid[0:1025, 0:1025]
    disk = ((xx - 880.0) ** 2 + (yy - 900.0) ** 2 < 60.0**2).astype(np.uint8) * 7
    src = da.from_array(disk[..., None], chunks=(512, 512, 1))
    path = write_ngff_pyramid(src, tmp_path / "labels.zarr", max_side=40, labels=True)
    with open_slide(path) as s:
        for k in range(1, len(s.levels)):
            lv = s.read_region(k, 0, 0, *s.shapes[k][:2])[..., 0]
            assert set(np.unique(lv).tolist()) == {0, 7}, k
            v, u = np.nonzero(lv)
            d = s.downsamples[k]
            assert abs((u.mean() + 0.5) * d - 0.5 - 880.0) < 0.15 * d + 0.5, k
            assert abs((v.mean() + 0.5) * d - 0.5 - 900.0) < 0.15 * d + 0.5, k
