"""Slide reading: SVS, OME-TIFF, generic TIFF, JPEG/PNG, and refusal of broken inputs."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import pytest
import tifffile

from wsireg_flow.errors import InputError
from wsireg_flow.io.slide import choose_main_series, open_slide

ROOT = Path(__file__).resolve().parents[1]
CMU = ROOT / "data" / "wsi" / "CMU-1-Small-Region.svs"
TCGA = ROOT / "data" / "wsi" / "tcga-cr-7395-01a-01-ts1.svs"
KIDNEY_JPG = ROOT / "data" / "anhir-sample" / "rat-kidney_" / "scale-5pc" / "Rat-Kidney_HE.jpg"


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _assert_input_error(exc: pytest.ExceptionInfo[InputError], path: Path, problem: str) -> None:
    msg = str(exc.value)
    assert str(path) in msg
    assert problem in msg
    assert "\n" not in msg
    assert exc.value.path == path


# --------------------------------------------------------------------------- real SVS files


def test_cmu1_svs_levels_and_metadata() -> None:
    with open_slide(CMU) as s:
        assert s.kind == "svs"
        assert s.series_name == "Baseline"
        assert s.shapes == [(2967, 2220, 3)]
        assert s.downsamples == [1.0]
        assert s.pixel_size_um == pytest.approx(0.499, abs=1e-9)
        assert s.level_pixel_size_um(0) == pytest.approx(0.499, abs=1e-9)
        assert s.dtype == np.uint8
        assert s.channels == 3
        d = s.describe()
        assert d["levels"] == [[2967, 2220, 3]]
        assert d["series"] == "Baseline"


def test_tcga_svs_levels_and_unknown_pixel_size() -> None:
    with open_slide(TCGA) as s:
        assert s.kind == "svs"
        assert s.series_name == "Baseline"
        assert s.shapes == [(3567, 4443, 3), (1783, 2221, 3)]
        # Aperio floors the halved sizes: the size ratio is 2.0005, the factor 2
        assert s.downsamples == [1.0, 2.0]
        assert s.pixel_size_um is None
        assert s.level_pixel_size_um(1) is None
        assert s.describe()["downsamples"] == [1.0, 2.0]


@pytest.mark.parametrize("path", [CMU, TCGA])
def test_pixel_size_override(path: Path) -> None:
    with open_slide(path, pixel_size_um=0.25) as s:
        assert s.pixel_size_um == 0.25
        assert s.level_pixel_size_um(len(s.levels) - 1) == pytest.approx(
            0.25 * s.downsamples[-1], rel=1e-12
        )


@pytest.mark.parametrize("bad", [0.0, -0.5, math.nan, math.inf])
def test_pixel_size_override_must_be_positive(bad: float) -> None:
    with pytest.raises(InputError) as exc:
        open_slide(CMU, pixel_size_um=bad)
    _assert_input_error(exc, CMU, "pixel size must be a positive number")


@pytest.mark.parametrize(
    ("path", "level", "region"),
    [
        (CMU, 0, (200, 300, 700, 900)),  # crosses 240 px tile boundaries
        (CMU, 0, (2900, 2100, 2967, 2220)),  # bottom-right edge tiles
        (TCGA, 0, (1000, 2000, 1600, 2700)),
        (TCGA, 1, (1700, 2150, 1783, 2221)),
    ],
)
def test_read_region_equals_tifffile(path: Path, level: int, region: tuple[int, ...]) -> None:
    y0, x0, y1, x1 = region
    ref = tifffile.imread(path, series=0, level=level)
    with open_slide(path) as s:
        got = s.read_region(level, y0, x0, y1, x1)
    assert got.shape == (y1 - y0, x1 - x0, 3)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref[y0:y1, x0:x1])
    # not a constant region: the comparison means something
    assert len(np.unique(got)) > 1


def test_read_region_clips_to_level() -> None:
    ref = tifffile.imread(CMU, series=0, level=0)
    with open_slide(CMU) as s:
        got = s.read_region(0, -10, -20, 30, 40)
        assert got.shape == (30, 40, 3)
        np.testing.assert_array_equal(got, ref[:30, :40])
        tail = s.read_region(0, 2960, 2210, 4000, 5000)
        assert tail.shape == (7, 10, 3)
        np.testing.assert_array_equal(tail, ref[2960:, 2210:])
        # boxes wholly outside the level read nothing (a negative end once read "all but the
        # last rows": (2867, 2120, 3) for this box)
        for box in ((-500, -500, -100, -100), (-50, 10, -1, 40), (3000, 10, 3100, 40)):
            assert s.read_region(0, *box).shape[:2] in ((0, 0), (0, 30)), box
            assert all(p.shape[0] == 0 for p in s.read_planes(0, *box)), box


def test_dask_level_matches_read_region() -> None:
    with open_slide(TCGA) as s:
        arr = s.dask_level(1, chunks=512)
        assert arr.shape == (1783, 2221, 3)
        assert arr.chunksize == (512, 512, 3)
        np.testing.assert_array_equal(
            arr[500:900, 1000:1400].compute(), s.read_region(1, 500, 1000, 900, 1400)
        )


# --------------------------------------------------------------------------- series choice


def test_choose_main_series_skips_aux_and_takes_largest() -> None:
    series = [
        ("Thumbnail", (768, 574, 3), "YXS"),
        ("Baseline", (3000, 2000, 3), "YXS"),
        ("Label", (9000, 9000, 3), "YXS"),  # larger, but a label
        ("Macro image", (8000, 9000, 3), "YXS"),
        ("Series 4", (3, 2000, 3001), "CYX"),  # planar, 6,002,000 px > 6,000,000 px
        ("overview", (10000, 10000), "YX"),
    ]
    assert choose_main_series(series) == 4
    assert choose_main_series(series[:4]) == 1
    # ties go to the first; an empty name counts as an image
    assert choose_main_series([("", (10, 10), "YX"), ("b", (10, 10), "YX")]) == 0
    # a series without X/Y axes has area 0 but still beats nothing
    assert choose_main_series([("map", (5, 5), "YX"), ("x", (7,), "I")]) == 1


def test_choose_main_series_only_aux_raises() -> None:
    with pytest.raises(ValueError, match="no image series"):
        choose_main_series([("Label", (10, 10, 3), "YXS"), ("THUMBNAIL", (5, 5, 3), "YXS")])


# --------------------------------------------------------------------------- plain images


def test_jpeg_read() -> None:
    with open_slide(KIDNEY_JPG) as s:
        assert s.kind == "plain"
        assert s.shapes == [(787, 1164, 3)]
        assert s.pixel_size_um is None
        img = s.read_region(0, 0, 0, 787, 1164)
    ref = cv2.imread(str(KIDNEY_JPG), cv2.IMREAD_COLOR)[:, :, ::-1]  # independent decoder path
    np.testing.assert_array_equal(img, ref)
    assert img[100, 200].tolist() == [243, 243, 243]


def test_png_gray_and_rgba(tmp_path: Path) -> None:
    gray = (np.arange(30 * 40).reshape(30, 40) % 251).astype(np.uint8)
    rgba = np.dstack([_rgb(30, 40), np.full((30, 40), 200, np.uint8)])
    (tmp_path / "g.png").write_bytes(imagecodecs.png_encode(gray))
    (tmp_path / "c.png").write_bytes(imagecodecs.png_encode(rgba))
    with open_slide(tmp_path / "g.png") as s:
        assert s.shapes == [(30, 40, 1)]
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 30, 40)[:, :, 0], gray)
    with open_slide(tmp_path / "c.png") as s:
        # alpha is composited over white (a brightfield background): RGB comes out
        assert s.shapes == [(30, 40, 3)]
        expected = np.rint(rgba[:, :, :3] * (200 / 255) + 255 * (55 / 255)).astype(np.uint8)
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 30, 40), expected)


def test_transparent_background_reads_as_white_glass(tmp_path: Path) -> None:
    """A transparent (0, 0, 0, 0) background once read as black, i.e. dark "tissue" all round:
    the mask covered 99 % of the image and the pair registered 112 degrees off."""
    rgb = _rgb(30, 40)
    alpha = np.zeros((30, 40), np.uint8)
    alpha[5:25, 10:30] = 255
    rgba = np.dstack([np.where(alpha[..., None] > 0, rgb, 0).astype(np.uint8), alpha])
    grey_alpha = np.dstack([rgb[:, :, 0], alpha])  # grey + alpha (PNG "LA")
    (tmp_path / "t.png").write_bytes(imagecodecs.png_encode(rgba))
    (tmp_path / "la.png").write_bytes(imagecodecs.png_encode(grey_alpha))
    for name, channels in (("t.png", 3), ("la.png", 1)):
        with open_slide(tmp_path / name) as s:
            assert s.shapes == [(30, 40, channels)]
            img = s.read_region(0, 0, 0, 30, 40)
        assert (img[alpha == 0] == 255).all()
        np.testing.assert_array_equal(img[alpha > 0], rgb[alpha > 0][:, :channels])


@pytest.mark.parametrize("tile", [None, (16, 16)], ids=["strips", "tiled"])
@pytest.mark.parametrize("kind", ["unassalpha", "assocalpha"])
def test_tiff_with_alpha_reads_composited_over_white(tmp_path: Path, kind: str, tile) -> None:
    """An RGBA TIFF used to keep 4 channels: its warped result could not be exported, and a
    transparent background read as black "tissue". It now reads like the RGBA PNG, region by
    region (the view composites each region it reads, never the whole level)."""
    rgb = _rgb(40, 50)
    alpha = np.zeros((40, 50), np.uint8)
    alpha[5:35, 10:40] = 255
    alpha[20:35, 10:40] = 100
    colour = rgb.astype(np.float32)
    if kind == "assocalpha":  # premultiplied colours
        colour = colour * alpha[..., None] / 255.0
    rgba = np.dstack([np.rint(colour).astype(np.uint8), alpha])
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=[kind], tile=tile)
    expected = np.rint(rgb * (alpha[..., None] / 255.0) + 255.0 * (1 - alpha[..., None] / 255.0))
    with open_slide(path) as s:
        assert s.shapes == [(40, 50, 3)]
        region = s.read_region(0, 18, 8, 38, 44)
        lazy = s.dask_level(0, chunks=16).compute()
    np.testing.assert_allclose(region, expected[18:38, 8:44], atol=1)
    np.testing.assert_array_equal(lazy[alpha == 0], 255)
    np.testing.assert_allclose(lazy, expected, atol=1)


def test_tiff_extra_sample_that_is_not_alpha_is_kept(tmp_path: Path) -> None:
    """An unspecified extra sample is data, not transparency: it stays a channel."""
    img = np.dstack([_rgb(20, 30), np.full((20, 30), 7, np.uint8)])
    tifffile.imwrite(tmp_path / "x.tif", img, photometric="rgb", extrasamples=["unspecified"])
    with open_slide(tmp_path / "x.tif") as s:
        assert s.shapes == [(20, 30, 4)]
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 20, 30), img)


# --------------------------------------------------------------------------- synthetic TIFFs


def test_pyramidal_ome_tiff(tmp_path: Path) -> None:
    data = _rgb(1000, 1500)
    path = tmp_path / "pyr.ome.tif"
    opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(
            data,
            subifds=2,
            resolution=(1e4 / 0.5, 1e4 / 0.5),
            resolutionunit="CENTIMETER",
            metadata={
                "axes": "YXS",
                "PhysicalSizeX": 0.5,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": 0.5,
                "PhysicalSizeYUnit": "µm",
            },
            **opts,
        )
        tw.write(data[::2, ::2], subfiletype=1, **opts)
        tw.write(data[::4, ::4], subfiletype=1, **opts)
    with open_slide(path) as s:
        assert s.kind == "ome-tiff"
        assert s.pixel_size_um == pytest.approx(0.5, abs=1e-12)
        assert s.shapes == [(1000, 1500, 3), (500, 750, 3), (250, 375, 3)]
        assert s.downsamples == [1.0, 2.0, 4.0]
        assert s.level_pixel_size_um(2) == pytest.approx(2.0, abs=1e-12)
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 1000, 1500), data)
        np.testing.assert_array_equal(
            s.read_region(1, 100, 200, 400, 700), data[::2, ::2][100:400, 200:700]
        )
        np.testing.assert_array_equal(s.read_region(2, 0, 0, 250, 375), data[::4, ::4])


def test_ome_tiff_pixel_size_in_nanometres_without_resolution_tags(tmp_path: Path) -> None:
    path = tmp_path / "nm.ome.tif"
    tifffile.imwrite(
        path,
        _rgb(64, 80),
        ome=True,
        photometric="rgb",
        metadata={"axes": "YXS", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm"},
    )
    with open_slide(path) as s:
        assert s.kind == "ome-tiff"
        assert s.pixel_size_um == pytest.approx(0.25, abs=1e-12)


def test_ome_tiff_pixel_size_is_the_main_images(tmp_path: Path) -> None:
    """The first PhysicalSizeX of the OME-XML was taken, here a label image's (20 µm)."""
    path = tmp_path / "two.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        for name, data, size in (("label", _rgb(40, 60), 20.0), ("main", _rgb(300, 400), 0.5)):
            tw.write(
                data,
                photometric="rgb",
                metadata={"axes": "YXS", "Name": name, "PhysicalSizeX": size},
            )
    with open_slide(path) as s:
        assert s.series_name == "main"
        assert s.shapes[0] == (300, 400, 3)
        assert s.pixel_size_um == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize(
    ("resolution", "unit", "expected"),
    [
        ((1e4 / 0.25, 1e4 / 0.25), "CENTIMETER", 0.25),  # 40000 px/cm
        ((25400 / 0.5, 25400 / 0.5), "INCH", 0.5),  # 50800 dpi
        ((72, 72), "INCH", None),  # writer default, not a measurement
        ((1, 1), "NONE", None),
    ],
)
def test_generic_tiled_tiff_resolution(
    tmp_path: Path, resolution: tuple[float, float], unit: str, expected: float | None
) -> None:
    data = _rgb(700, 900, seed=3)
    path = tmp_path / "generic.tif"
    tifffile.imwrite(
        path, data, tile=(256, 256), photometric="rgb", resolution=resolution, resolutionunit=unit
    )
    with open_slide(path) as s:
        assert s.kind == "tiff"
        assert s.shapes == [(700, 900, 3)]
        if expected is None:
            assert s.pixel_size_um is None
        else:
            assert s.pixel_size_um == pytest.approx(expected, rel=1e-6)
        np.testing.assert_array_equal(s.read_region(0, 250, 250, 520, 780), data[250:520, 250:780])


def test_grayscale_tiff_has_one_channel(tmp_path: Path) -> None:
    data = (np.arange(300 * 500, dtype=np.uint32).reshape(300, 500) % 65521).astype(np.uint16)
    path = tmp_path / "gray.tif"
    tifffile.imwrite(path, data, tile=(128, 128), photometric="minisblack")
    with open_slide(path) as s:
        assert s.channels == 1
        assert s.shapes == [(300, 500, 1)]
        assert s.dtype == np.uint16
        region = s.read_region(0, 120, 130, 260, 400)
        assert region.shape == (140, 270, 1)
        np.testing.assert_array_equal(region[:, :, 0], data[120:260, 130:400])
        # channel slicing on a grayscale view
        assert s.levels[0][5:7, 8:9, 0:1].tolist() == [[[data[5, 8]]], [[data[6, 8]]]]


def test_planar_cyx_ome_tiff_is_presented_as_yxc(tmp_path: Path) -> None:
    data = _rgb(300, 400, seed=7)
    cyx = np.ascontiguousarray(np.moveaxis(data, 2, 0))
    path = tmp_path / "planar.ome.tif"
    tifffile.imwrite(
        path, cyx, ome=True, photometric="minisblack", metadata={"axes": "CYX"}, tile=(128, 128)
    )
    assert tifffile.TiffFile(path).series[0].axes == "CYX"
    with open_slide(path) as s:
        assert s.kind == "ome-tiff"
        assert s.shapes == [(300, 400, 3)]
        got = s.read_region(0, 10, 20, 210, 320)
        np.testing.assert_array_equal(got, data[10:210, 20:320])
        assert got[0, 0].tolist() == data[10, 20].tolist()
        assert s.levels[0][5:6, 6:7, 2:3].item() == cyx[2, 5, 6]


@pytest.mark.parametrize("planar", [False, True], ids=["interleaved", "planar"])
def test_tiles_a_tiff_leaves_out_read_as_white_glass(tmp_path: Path, planar: bool) -> None:
    """A tile with byte count 0 was filled with 0: black, which reads as dense tissue."""
    rng = np.random.default_rng(0)
    shape = (3, 512, 512) if planar else (512, 512, 3)
    tile_shape = (256, 256) if planar else (256, 256, 3)
    n = 12 if planar else 4

    def tiles():  # tile 1 of every plane is left out
        for i in range(n):
            yield None if i % 4 == 1 else rng.integers(0, 100, tile_shape, dtype=np.uint8)

    path = tmp_path / "sparse.tif"
    tifffile.imwrite(
        path,
        tiles(),
        shape=shape,
        dtype=np.uint8,
        tile=(256, 256),
        photometric="rgb",
        planarconfig="separate" if planar else "contig",
    )
    with tifffile.TiffFile(path) as tf:
        assert 0 in tf.pages[0].databytecounts
    with open_slide(path) as s:
        img = s.read_region(0, 0, 0, 512, 512)
        assert (img[:256, 256:] == 255).all()
        assert img[:256, :256].max() < 100 and img[256:].max() < 100
        assert (s.read_planes(0, 0, 256, 256, 512)[0] == 255).all()


def test_read_planes_equals_read_region_for_planar_and_interleaved(tmp_path: Path) -> None:
    """read_planes gives the channels of read_region (clipped alike) whether the level is stored
    (c, y, x) or (y, x, c)."""
    data = _rgb(300, 400, seed=11)
    planar = tmp_path / "planar.ome.tif"
    tifffile.imwrite(
        planar,
        np.ascontiguousarray(np.moveaxis(data, 2, 0)),
        ome=True,
        photometric="minisblack",
        metadata={"axes": "CYX"},
        tile=(128, 128),
    )
    interleaved = tmp_path / "rgb.tif"
    tifffile.imwrite(interleaved, data, tile=(128, 128), photometric="rgb")
    for path in (planar, interleaved):
        with open_slide(path) as s:
            for box in ((10, 20, 210, 320), (-5, 350, 40, 500)):
                planes = s.read_planes(0, *box)
                region = s.read_region(0, *box)
                assert len(planes) == 3
                for k, plane in enumerate(planes):
                    assert plane.flags.c_contiguous
                    np.testing.assert_array_equal(plane, region[:, :, k])


def test_planar_separate_rgb_tiff(tmp_path: Path) -> None:
    data = _rgb(200, 260, seed=9)
    path = tmp_path / "sep.tif"
    tifffile.imwrite(path, np.moveaxis(data, 2, 0), photometric="rgb", planarconfig="separate")
    assert tifffile.TiffFile(path).series[0].axes == "SYX"
    with open_slide(path) as s:
        assert s.shapes == [(200, 260, 3)]
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 200, 260), data)


# --------------------------------------------------------------------------- broken inputs


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.svs"
    with pytest.raises(InputError) as exc:
        open_slide(path)
    _assert_input_error(exc, path, "file not found")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.svs"
    path.write_bytes(b"")
    with pytest.raises(InputError) as exc:
        open_slide(path)
    _assert_input_error(exc, path, "file is empty")


@pytest.mark.parametrize(("src", "size"), [(CMU, 1_000_000), (TCGA, 1_000_000), (TCGA, 3_000_000)])
def test_truncated_svs(tmp_path: Path, src: Path, size: int) -> None:
    path = tmp_path / "cut.svs"
    path.write_bytes(src.read_bytes()[:size])
    with pytest.raises(InputError) as exc:
        open_slide(path)
    _assert_input_error(exc, path, "truncated")


def test_truncated_tiff_tile_data(tmp_path: Path) -> None:
    # tifffile writes the IFD first, so the header parses and only the tile data are cut off
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, _rgb(600, 600), tile=(128, 128), photometric="rgb")
    data = full.read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as exc:
        open_slide(path)
    _assert_input_error(exc, path, f"the file has {len(data) // 2}")


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = KIDNEY_JPG.read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as exc:
        open_slide(path)
    _assert_input_error(exc, path, "JPEG file is truncated")


def test_truncated_png(tmp_path: Path) -> None:
    data = imagecodecs.png_encode(_rgb(50, 60))
    path = tmp_path / "cut.png"
    path.write_bytes(data[:-30])
    with pytest.raises(InputError) as exc:
        open_slide(path)
    _assert_input_error(exc, path, "PNG file is truncated")


def test_text_file_named_svs(tmp_path: Path) -> None:
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\nsecond line\n")
    with pytest.raises(InputError) as exc:
        open_slide(path)
    _assert_input_error(exc, path, "not a supported image")


def test_tiff_magic_with_garbage(tmp_path: Path) -> None:
    path = tmp_path / "garbage.tif"
    path.write_bytes(b"II*\x00" + b"\xff" * 200)
    with pytest.raises(InputError) as exc:
        open_slide(path)
    _assert_input_error(exc, path, "corrupt")


def test_directory(tmp_path: Path) -> None:
    path = tmp_path / "folder.svs"
    path.mkdir()
    with pytest.raises(InputError) as exc:
        open_slide(path)
    _assert_input_error(exc, path, "is a directory")


@pytest.mark.parametrize(
    "kind", ["cmyk", "two-channel", "four-planes", "palette", "miniswhite", "ycbcr-deflate"]
)
def test_a_tiff_that_is_not_grey_or_rgb_is_refused_in_one_line(tmp_path: Path, kind: str) -> None:
    """A CMYK TIFF was read as RGB (C, M, Y taken for R, G, B: a source registered 513 px off,
    exit 0, no warning), and a 2-channel (y, x, 2) TIFF failed at the last stage with a
    ValueError from the QC figures (exit 1) after every other stage had run."""
    path = tmp_path / f"{kind}.tif"
    rng = np.random.default_rng(0)
    if kind == "cmyk":
        tifffile.imwrite(path, rng.integers(0, 255, (40, 50, 4), np.uint8), photometric="separated")
        problem = "unsupported colour space SEPARATED (TIFF photometric 5)"
    elif kind == "two-channel":
        img = rng.integers(0, 255, (40, 50, 2), np.uint8)
        tifffile.imwrite(path, img, photometric="minisblack", planarconfig="contig")
        problem = "2 channels that are not grey, grey + alpha or RGB"
    elif kind == "four-planes":  # fluorescence: four min-is-black planes, not R, G, B
        img = rng.integers(0, 255, (4, 40, 50), np.uint8)
        tifffile.imwrite(path, img, photometric="minisblack", metadata={"axes": "CYX"}, ome=True)
        problem = "4 channels that are not grey, grey + alpha or RGB"
    elif kind == "ycbcr-deflate":  # YCbCr decoded only by JPEG codecs: raw Y, Cb, Cr otherwise
        img = rng.integers(0, 255, (40, 50, 3), np.uint8)
        tifffile.imwrite(path, img, photometric="ycbcr", compression="zlib", subsampling=(1, 1))
        problem = "unsupported colour space YCBCR (TIFF photometric 6, compression 8)"
    elif kind == "palette":
        colormap = rng.integers(0, 65535, (3, 256), np.uint16)
        img = rng.integers(0, 255, (40, 50), np.uint8)
        tifffile.imwrite(path, img, photometric="palette", colormap=colormap)
        problem = "unsupported colour space PALETTE (TIFF photometric 3)"
    else:
        img = rng.integers(0, 255, (40, 50), np.uint8)
        tifffile.imwrite(path, img, photometric="miniswhite")
        problem = "unsupported colour space MINISWHITE (TIFF photometric 0)"
    with pytest.raises(InputError) as caught:
        open_slide(path)
    assert str(caught.value) == f"{path}: {problem}: save the image as RGB or greyscale"
