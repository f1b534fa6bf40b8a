"""Chunked warping of a source slide into the target frame (warp_chunk / warp_slide)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import dask.array as da
import numpy as np
import pytest

from wsireg_flow.field import StoredField
from wsireg_flow.geometry import rotation_about
from wsireg_flow.io.omezarr import write_ngff_pyramid
from wsireg_flow.io.slide import open_slide
from wsireg_flow.transform import Transform
from wsireg_flow.warp import background_value, warp_chunk, warp_slide

H, W = 700, 900
DX, DY = 10, -7  # target (x, y) -> source (x + 10, y - 7)
LABELS = (0, 3, 7, 200)


def _translation() -> Transform:
    a = np.array([[1.0, 0.0, float(DX)], [0.0, 1.0, float(DY)], [0.0, 0.0, 1.0]])
    return Transform(a, None, None, (H, W), (H, W))


def _rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(H // 10, W // 10, 3)).astype(np.float32)
    img = cv2.resize(noise, (W, H), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(scale=0.3, size=img.shape).astype(np.float32)
    img = (img - img.min()) / (img.max() - img.min())
    return (20 + img * 220).astype(np.uint8)  # 20..240: never white


def _labels() -> np.ndarray:
    rng = np.random.default_rng(1)
    blobs = cv2.resize(rng.normal(size=(H // 50, W // 50)).astype(np.float32), (W, H))
    lab = np.digitize(blobs, [-0.5, 0.0, 0.5]).astype(np.uint8)
    return np.asarray(LABELS, np.uint8)[lab][:, :, None]


@dataclass
class Slides:
    dir: Path
    rgb: np.ndarray  # (H, W, 3) uint8
    lab: np.ndarray  # (H, W, 1) uint8 labels
    rgb_path: Path
    lab_path: Path


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Slides:
    d = tmp_path_factory.mktemp("warp")
    rgb, lab = _rgb(), _labels()
    write_ngff_pyramid(da.from_array(rgb, chunks=(256, 256, 3)), d / "rgb.zarr", chunk=256)
    write_ngff_pyramid(da.from_array(lab, chunks=(256, 256, 1)), d / "lab.zarr", chunk=256)
    return Slides(d, rgb, lab, d / "rgb.zarr", d / "lab.zarr")


def _shifted(img: np.ndarray, fill: int) -> tuple[np.ndarray, np.ndarray]:
    """Expected warp of ``img`` by the translation, and the mask of target pixels inside."""
    out = np.full_like(img, fill)
    # target (y, x) reads source (y + DY, x + DX)
    out[-DY:, : W - DX] = img[: H + DY, DX:]
    inside = np.zeros((H, W), bool)
    inside[-DY:, : W - DX] = True
    return out, inside


def _read0(path: Path) -> np.ndarray:
    with open_slide(path) as s:
        return s.read_region(0, 0, 0, H, W)


def test_background_value() -> None:
    assert background_value(3, np.dtype(np.uint8), nearest=False) == 255
    assert background_value(4, np.dtype(np.uint8), nearest=False) == 255
    assert background_value(1, np.dtype(np.uint8), nearest=True) == 0
    assert background_value(1, np.dtype(np.uint16), nearest=False) == 0
    assert background_value(3, np.dtype(np.uint16), nearest=False) == 65535  # 16-bit white
    assert background_value(3, np.dtype(np.float32), nearest=False) == 0


def test_warp_chunk_translation_is_exact_shift(slides: Slides) -> None:
    rgb = slides.rgb
    expected, _ = _shifted(rgb, 255)
    t = _translation()
    # an interior chunk and one touching the top and right borders (partly outside the source)
    for y0, x0, h, w in [(100, 200, 300, 256), (0, 600, 128, 300)]:
        out = warp_chunk(t, str(slides.rgb_path), y0, x0, h, w, 3, np.dtype(np.uint8))
        assert out.shape == (h, w, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected[y0 : y0 + h, x0 : x0 + w])
    # a chunk whose whole footprint lies outside the source is pure background
    far = Transform(
        np.array([[1.0, 0, 5000.0], [0, 1.0, 0], [0, 0, 1]]), None, None, (H, W), (H, W)
    )
    out = warp_chunk(far, str(slides.rgb_path), 0, 0, 64, 64, 3, np.dtype(np.uint8))
    assert np.all(out == 255)


@pytest.mark.parametrize("chunk", [256, 1024])
def test_warp_slide_translation_rgb(slides: Slides, chunk: int) -> None:
    out_path = warp_slide(
        _translation(),
        open_slide(slides.rgb_path),
        slides.dir / f"rgb-{chunk}.zarr",
        chunk=chunk,
        max_side=256,
    )
    got = _read0(out_path)
    expected, inside = _shifted(slides.rgb, 255)
    assert got.shape == (H, W, 3)
    np.testing.assert_array_equal(got[inside], expected[inside])  # exact in the interior
    assert np.all(got[~inside] == 255)  # outside the source: white
    assert (~inside).sum() == H * W - (H + DY) * (W - DX)


def test_warp_slide_chunk_size_independent(slides: Slides) -> None:
    src = open_slide(slides.rgb_path)
    a = _read0(warp_slide(_translation(), src, slides.dir / "ci-256.zarr", chunk=256))
    b = _read0(warp_slide(_translation(), src, slides.dir / "ci-1024.zarr", chunk=1024))
    np.testing.assert_array_equal(a, b)


def test_warp_slide_labels_nearest_keeps_label_values(slides: Slides) -> None:
    lab = slides.lab
    src = open_slide(slides.lab_path)
    assert set(np.unique(lab).tolist()) == set(LABELS)
    # pure translation: exact shift, background 0
    got = _read0(warp_slide(_translation(), src, slides.dir / "lab-t.zarr", nearest=True))
    expected, _ = _shifted(lab, 0)
    assert got.shape == (H, W, 1) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    # sub-pixel rotation + translation: nearest sampling must not invent values
    rot = Transform(rotation_about(7.3, (450.0, 350.0), (455.3, 343.6)), None, None, (H, W), (H, W))
    got = _read0(warp_slide(rot, src, slides.dir / "lab-r.zarr", nearest=True))
    assert set(np.unique(got).tolist()) <= set(LABELS)
    assert len(np.unique(got)) == len(LABELS)
    # ...whereas linear interpolation of the same labels does create new values
    lin = warp_chunk(rot, str(slides.lab_path), 0, 0, H, W, 1, np.dtype(np.uint8))
    assert not set(np.unique(lin).tolist()) <= set(LABELS)
    # nearest output equals nearest resampling of the source by the same map
    mx, my = rot.backward_coords(0, 0, H, W)
    want = cv2.remap(lab[:, :, 0], mx, my, cv2.INTER_NEAREST, borderValue=0)
    np.testing.assert_array_equal(got[:, :, 0], want)


@pytest.mark.parametrize(
    "dtype, values",
    [
        ("uint32", (0, 2**31 + 3, 2**32 - 1, 7)),  # instance labels: cv2.remap refused them
        ("int64", (0, 2**40 + 3, -(2**40), 7)),  # cv2.remap truncated them to int32
        ("uint64", (0, 2**63 + 5, 2**40, 7)),
        ("int8", (0, -5, 100, 7)),
    ],
)
def test_warp_slide_labels_of_any_integer_dtype_keep_their_values(
    slides: Slides, dtype: str, values: tuple[int, ...]
) -> None:
    """Nearest warping of wide label values equals the uint8 labels' warp mapped to them."""
    lut = np.asarray(values, dtype)
    index = np.searchsorted(LABELS, slides.lab)  # 0..3 per pixel
    rot = Transform(rotation_about(7.3, (450.0, 350.0), (455.3, 343.6)), None, None, (H, W), (H, W))

    def warped(labels: np.ndarray, name: str) -> Path:
        path = slides.dir / f"{name}.zarr"
        write_ngff_pyramid(da.from_array(labels, chunks=(256, 256, 1)), path, chunk=256)
        out = slides.dir / f"w-{name}.zarr"
        return warp_slide(rot, open_slide(path), out, nearest=True, max_side=256)

    got, small = (
        _read0(warped(lut[index], dtype)),
        _read0(warped(index.astype(np.uint8), dtype + "-u8")),
    )
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, lut[small])
    with open_slide(slides.dir / f"w-{dtype}.zarr") as s:  # coarser levels: no new values either
        assert len(s.shapes) > 1
        assert set(np.unique(s.read_region(1, 0, 0, H, W)).tolist()) <= set(lut.tolist())


@pytest.mark.parametrize("dtype", ["int64", "uint64"])
def test_linear_warps_of_64_bit_integers_keep_the_fill_in_range(dtype: str) -> None:
    """The fill (the dtype's maximum, white for RGB) went through float64, rounded up past the
    dtype and wrapped: int64 white came back as -2**63, uint64 white as 0."""
    from wsireg_flow.warp import remap_linear

    top = int(np.iinfo(dtype).max)
    mx, my = np.meshgrid(np.arange(8, dtype=np.float32) + 4.25, np.arange(4, dtype=np.float32))
    m1, m2 = cv2.convertMaps(mx, my, cv2.CV_16SC2)
    got = remap_linear(np.full((4, 8), 5, dtype), m1, m2, top)
    assert got.dtype == np.dtype(dtype)
    assert got[0, 0] == 5 and got.min() >= 5 and got[0, -1] > top // 2  # fill: near the top


@pytest.mark.parametrize("dtype", ["int8", "int32", "uint32", "int64", "float16"])
def test_warp_chunk_interpolates_dtypes_opencv_cannot(slides: Slides, dtype: str) -> None:
    """Linear warping of dtypes cv2.remap refuses (int8, int32, uint32, int64, float16) equals
    the float32 warp, rounded for integers, in the same dtype."""
    grey = slides.rgb[:, :, :1].astype(np.float32) - (128 if dtype.startswith("int") else 0)
    rot = Transform(rotation_about(7.3, (450.0, 350.0), (455.3, 343.6)), None, None, (H, W), (H, W))
    warped = {}
    for name in (dtype, "float32"):
        path = slides.dir / f"grey-{dtype}-as-{name}.zarr"
        write_ngff_pyramid(da.from_array(grey.astype(name), chunks=(256, 256, 1)), path, chunk=256)
        warped[name] = warp_chunk(rot, str(path), 40, 60, 300, 400, 1, np.dtype(name))
    got, want = warped[dtype], warped["float32"]
    assert got.dtype == np.dtype(dtype)
    tol = 0.5 if dtype != "float16" else 0.2  # rounding; float16 keeps 11 bits of 240
    assert np.abs(got.astype(np.float64) - want).max() <= tol + 1e-6


def test_warp_chunk_with_fields_matches_backward_coords(slides: Slides) -> None:
    """With a residual field the warp samples the source exactly where backward_coords says."""
    gh, gw = H // 4, W // 4
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    r = np.stack([3 * np.sin(xx / 20), 2 * np.cos(yy / 15)]).astype(np.float32) * 4
    back = StoredField(r, 4.0, 1.5, {})
    t = Transform(_translation().affine, back, None, (H, W), (H, W))
    out = warp_chunk(t, str(slides.rgb_path), 64, 96, 200, 240, 3, np.dtype(np.uint8))
    mx, my = t.backward_coords(64, 96, 200, 240)
    want = cv2.remap(slides.rgb, mx, my, cv2.INTER_LINEAR, borderValue=(255, 255, 255))
    np.testing.assert_array_equal(out, want)


def test_warp_slide_with_fields_nearly_chunk_size_independent(
    slides: Slides,
) -> None:
    """With a residual field, chunks of > 200k px sample it through cv2.remap (1/32 px weights)
    and smaller chunks exactly (scipy): outputs may differ by one grey level on a few pixels."""
    gh, gw = H // 4 + 1, W // 4 + 1
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    r = np.stack([3 * np.sin(xx / 20), 2 * np.cos(yy / 15)]).astype(np.float32) * 4
    t = Transform(_translation().affine, StoredField(r, 4.0, 1.5, {}), None, (H, W), (H, W))
    src = open_slide(slides.rgb_path)
    d = slides.dir
    a = _read0(warp_slide(t, src, d / "f-256.zarr", chunk=256)).astype(int)
    b = _read0(warp_slide(t, src, d / "f-1024.zarr", chunk=1024)).astype(int)
    diff = np.abs(a - b)
    assert diff.max() <= 1
    assert (diff > 0).mean() < 1e-3
