"""Open whole-slide images lazily, level by level.

Supported inputs
----------------
* Tiled TIFF family through tifffile: Aperio SVS, Hamamatsu NDPI, OME-TIFF, generic tiled or
  pyramidal TIFF. Pixels are read through tifffile's Zarr store, so only the tiles that a read
  touches are decoded.
* OME-Zarr (NGFF 0.4) pyramids written by :func:`wsireg_flow.io.omezarr.write_ngff_pyramid`.
* Small plain images (JPEG, PNG, and anything else imagecodecs decodes): read into memory.

Conventions
-----------
Every level is exposed as an array of shape (y, x, c) with ``c`` in {1, 3, 4} (grayscale gets a
channel axis of 1). ``downsamples[k]`` is level-0 pixels per level-k pixel along x and y.
The physical pixel size is in micrometres per level-0 pixel.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import dask.array as da
import numpy as np

from wsireg_flow.errors import InputError, captured_warnings
from wsireg_flow.pyramid import level_downsamples

TIFF_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".scn")
PLAIN_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".jp2")
_AUX_SERIES = ("label", "macro", "thumbnail", "overview", "map")


@dataclass
class Slide:
    """A whole-slide image opened lazily.

    Attributes
    ----------
    path : Path
        The file (or OME-Zarr directory) that was opened.
    levels : list of array-like
        One array per pyramid level, each indexable as ``[y0:y1, x0:x1, :]`` and shaped
        (y, x, c). Level 0 is full resolution.
    pixel_size_um : float or None
        Micrometres per level-0 pixel (x and y assumed equal), or None when unknown.
    kind : str
        ``"svs"``, ``"ndpi"``, ``"ome-tiff"``, ``"tiff"``, ``"ome-zarr"`` or ``"plain"``.
    series_name : str
        The name of the image series that was chosen (e.g. ``"Baseline"``).
    """

    path: Path
    levels: list[Any]
    pixel_size_um: float | None
    kind: str
    series_name: str = ""
    _handles: list[Any] = field(default_factory=list, repr=False)

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """(y, x, c) shape of every level."""
        return [tuple(int(s) for s in lev.shape) for lev in self.levels]  # type: ignore[misc]

    @property
    def downsamples(self) -> list[float]:
        """Level-0 pixels per level-k pixel: the pyramid's integer factor (see
        :func:`wsireg_flow.pyramid.level_downsamples`), not the ratio of rounded sizes."""
        return level_downsamples(self.shapes)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.levels[0].dtype)

    @property
    def channels(self) -> int:
        return self.shapes[0][2]

    def level_pixel_size_um(self, level: int) -> float | None:
        """Micrometres per pixel at ``level`` (None when the slide's pixel size is unknown)."""
        if self.pixel_size_um is None:
            return None
        return self.pixel_size_um * self.downsamples[level]

    def dask_level(self, level: int, chunks: int = 1024) -> da.Array:
        """Level ``level`` as a lazy dask array of shape (y, x, c), chunked ``chunks`` px.

        Only valid in the process that opened the slide (tifffile stores are not picklable):
        distributed work reads the ingested OME-Zarr instead.
        """
        arr = self.levels[level]
        return da.from_array(arr, chunks=(chunks, chunks, arr.shape[2]), lock=False)

    def read_region(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """Read pixels [y0:y1, x0:x1] of ``level`` (clipped to the level) as (y, x, c)."""
        arr = self.levels[level]
        ys, xs = self._clip(arr, y0, x0, y1, x1)
        with self._decoding():
            return np.asarray(arr[ys, xs, :])

    def read_planes(self, level: int, y0: int, x0: int, y1: int, x1: int) -> list[np.ndarray]:
        """Pixels [y0:y1, x0:x1] of ``level`` (clipped) as one contiguous (y, x) plane per channel.

        Levels stored channel-first (OME-Zarr (c, y, x)) are read plane by plane, without the
        interleaving copy that :meth:`read_region` makes.
        """
        arr = self.levels[level]
        ys, xs = self._clip(arr, y0, x0, y1, x1)
        with self._decoding():
            if isinstance(arr, _YXCView):
                return arr.planes(ys, xs)
            crop = np.asarray(arr[ys, xs, :])
        return [np.ascontiguousarray(crop[:, :, k]) for k in range(crop.shape[2])]

    @staticmethod
    def _clip(arr: Any, y0: int, x0: int, y1: int, x1: int) -> tuple[slice, slice]:
        h, w = arr.shape[:2]
        # clamp both ends to [0, size]: a negative end must give an empty read, not numpy's
        # "all but the last rows" (a box wholly above or left of the level)
        ys = slice(min(max(0, y0), h), min(max(0, y1), h))
        xs = slice(min(max(0, x0), w), min(max(0, x1), w))
        return ys, xs

    @contextmanager
    def _decoding(self) -> Iterator[None]:
        """Turn decoder errors on corrupt tiles into an InputError naming the slide."""
        try:
            yield
        except Exception as exc:
            raise InputError(
                f"cannot decode pixels ({type(exc).__name__}: {exc})", self.path
            ) from exc

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary: kind, series, level shapes (y, x, c), downsamples, pixel size."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "series": self.series_name,
            "dtype": str(self.dtype),
            "levels": [list(s) for s in self.shapes],
            "downsamples": [round(d, 4) for d in self.downsamples],
            "pixel_size_um": self.pixel_size_um,
        }

    def close(self) -> None:
        for h in self._handles:
            h.close()
        self._handles.clear()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_slide(path: str | os.PathLike[str], pixel_size_um: float | None = None) -> Slide:
    """Open a slide lazily.

    Parameters
    ----------
    path : path-like
        SVS, NDPI, (OME-)TIFF, OME-Zarr directory, or a plain JPEG/PNG image.
    pixel_size_um : float, optional
        Micrometres per level-0 pixel. When given it overrides the file's metadata; when the
        file has none it is the only source.

    Raises
    ------
    InputError
        The path is missing, empty, truncated or not an image; the message names the file.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("file not found", p)
    if p.is_dir():
        if (p / ".zattrs").exists() or (p / "zarr.json").exists():
            from wsireg_flow.io.omezarr import open_ngff

            slide = open_ngff(p)
        else:
            raise InputError("is a directory, not a slide or an OME-Zarr pyramid", p)
    else:
        if p.stat().st_size == 0:
            raise InputError("file is empty", p)
        slide = _open_file(p)
    if pixel_size_um is not None:
        if not (pixel_size_um > 0 and np.isfinite(pixel_size_um)):
            raise InputError(f"pixel size must be a positive number, got {pixel_size_um}", p)
        slide.pixel_size_um = float(pixel_size_um)
    return slide


def probe_shape(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Level-0 (height, width) of a slide without decoding its pixels.

    Runs the same checks as :func:`open_slide` (missing, empty, truncated, unrecognised);
    for JPEG/PNG only the header is parsed (Pillow, a scikit-image dependency), so probing a
    20k px JPEG costs milliseconds instead of a full decode.
    """
    p = Path(path)
    if p.is_file() and p.stat().st_size > 0:
        with open(p, "rb") as fh:
            head = fh.read(8)
        if head[:2] == b"\xff\xd8" or head == b"\x89PNG\r\n\x1a\n":
            _check_plain_complete(p, head)
            from PIL import Image

            try:
                with Image.open(p) as im:
                    w, h = im.size
            except Exception as exc:
                raise InputError(f"not a readable image ({_first_line(exc)})", p) from exc
            return int(h), int(w)
    with open_slide(p) as slide:
        h, w = slide.shapes[0][:2]
    return int(h), int(w)


def _check_plain_complete(p: Path, head: bytes) -> None:
    with open(p, "rb") as fh:
        fh.seek(max(0, p.stat().st_size - 64))
        tail = fh.read()
    if head[:2] == b"\xff\xd8" and b"\xff\xd9" not in tail:
        raise InputError("JPEG file is truncated (no end-of-image marker)", p)
    if head[:2] != b"\xff\xd8" and b"IEND" not in tail[-32:]:
        raise InputError("PNG file is truncated (no IEND chunk)", p)


def _open_file(p: Path) -> Slide:
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] in (b"II", b"MM") and magic[2:4] in (b"*\x00", b"\x00*", b"+\x00", b"\x00+"):
        return _open_tiff(p)
    return _open_plain(p)


def _open_tiff(p: Path) -> Slide:
    import tifffile
    import zarr

    with captured_warnings("tifffile") as warnings:
        try:
            tf = tifffile.TiffFile(p)
            all_series = list(tf.series)
        except Exception as exc:
            raise InputError(f"not a readable TIFF ({_first_line(exc)})", p) from exc
    try:
        broken = [w for w in warnings if "offset" in w or "truncat" in w]
        if broken:
            raise InputError(f"file is truncated or corrupt ({broken[0]})", p)
        for s in all_series:
            _check_not_truncated(s, p)
        index = choose_main_series([(s.name, s.shape, s.axes) for s in all_series])
        series = all_series[index]
        fill = empty_tile_fill(series.levels[0].pages[0])
        group = zarr.open(tf.aszarr(series=index, fillvalue=fill), mode="r")
        raw = (
            [group]
            if hasattr(group, "shape")
            else [group[str(k)] for k in range(len(series.levels))]
        )
        fd = _Fd(os.open(p, os.O_RDONLY))
        levels: list[Any] = []
        for k, a in enumerate(raw):
            direct = _TiledLevel.try_create(series.levels[k], fd.fd, fill)
            levels.append(direct if direct is not None else _YXCView(a, series.levels[k].axes))
        alpha = tiff_alpha(series.levels[0].pages[0])
        check_tiff_colour(series.levels[0].pages[0], levels[0].shape[2], alpha, p)
        if alpha is not None:
            levels = [_OverWhiteView(lev, premultiplied=alpha == "associated") for lev in levels]
        kind = "ome-tiff" if tf.is_ome else "svs" if tf.is_svs else "ndpi" if tf.is_ndpi else "tiff"
        mpp = tiff_pixel_size_um(tf, index)
    except InputError:
        tf.close()
        raise
    except Exception as exc:
        tf.close()
        raise InputError(f"unsupported or corrupt TIFF ({_first_line(exc)})", p) from exc
    return Slide(p, levels, mpp, kind, series.name or "", [tf, fd])


def empty_tile_fill(page: Any) -> int:
    """Value of pixels in tiles a TIFF leaves out (byte count 0): white (the dtype's maximum)
    for RGB and YCbCr brightfield images of an integer dtype, where a missing tile is empty
    glass, else 0. Black would read as dense tissue."""
    rgb = int(getattr(page, "photometric", -1)) in (2, 6)  # RGB, YCbCr
    dtype = np.dtype(page.dtype)
    return int(np.iinfo(dtype).max) if rgb and np.issubdtype(dtype, np.integer) else 0


def tiff_alpha(page: Any) -> str | None:
    """``"associated"`` (premultiplied) or ``"unassociated"`` when the page's last sample is an
    alpha channel (RGB + 1 or grey + 1 extra sample marked as alpha), else None."""
    extra = tuple(int(e) for e in (getattr(page, "extrasamples", None) or ()))
    colour = {1: 1, 2: 3}.get(int(getattr(page, "photometric", -1)))  # min-is-black grey, RGB
    if colour is None or len(extra) != 1 or int(page.samplesperpixel) != colour + 1:
        return None
    return {1: "associated", 2: "unassociated"}.get(extra[0])


# photometric interpretations read as they are: min-is-black grey (also planar channels, as
# OME-TIFF stores them), RGB, and YCbCr where the codec decodes it to RGB (JPEG, JPEG 2000)
READ_PHOTOMETRIC = (1, 2, 6)
DECODED_TO_RGB = frozenset({6, 7, 33003, 33005, 34712})  # TIFF compressions: JPEG, JPEG 2000


def check_tiff_colour(page: Any, channels: int, alpha: str | None, p: Path) -> None:
    """Refuse a TIFF whose samples are not grey or RGB: CMYK (``separated``), a palette, CIE
    L*a*b*, min-is-white, YCbCr stored without a JPEG codec, or min-is-black channels other
    than grey, grey + alpha or three planes (RGB as OME-TIFF stores it; four or more are
    fluorescence). Their samples would be taken for R, G, B (a CMYK source registered 513 px
    off with exit 0). RGB may carry extra samples (kept as channels).

    Raises
    ------
    InputError
        Naming the file and its colour space.
    """
    photometric = int(getattr(page, "photometric", 1))
    name = getattr(getattr(page, "photometric", None), "name", str(photometric))
    compression = int(getattr(page, "compression", 1))
    if photometric not in READ_PHOTOMETRIC or (
        photometric == 6 and compression not in DECODED_TO_RGB
    ):
        stored = f", compression {compression}" if photometric == 6 else ""
        raise InputError(
            f"unsupported colour space {name} (TIFF photometric {photometric}{stored}): save "
            "the image as RGB or greyscale",
            p,
        )
    colour = channels - (alpha is not None)
    if photometric == 1 and colour not in (1, 3):
        raise InputError(
            f"{channels} channels that are not grey, grey + alpha or RGB: save the image as "
            "RGB or greyscale",
            p,
        )


def choose_main_series(series: Sequence[tuple[str, tuple[int, ...], str]]) -> int:
    """Index of the main image series among (name, shape, axes) descriptions.

    Label, macro, thumbnail and overview images are skipped; of the rest the one with the
    largest y*x area wins (ties: the first).
    """
    best, best_area = -1, -1
    for i, (name, shape, axes) in enumerate(series):
        if any(word in (name or "").lower() for word in _AUX_SERIES):
            continue
        dims = dict(zip(axes, shape, strict=False))
        area = int(dims.get("Y", 0)) * int(dims.get("X", 0))
        if area > best_area:
            best, best_area = i, area
    if best < 0:
        raise ValueError("no image series besides label/macro/thumbnail images")
    return best


def _check_not_truncated(series: Any, p: Path) -> None:
    """Refuse files whose tile/strip data lie past the end of the file."""
    size = p.stat().st_size
    for level in series.levels:
        for page in level.pages:
            if page is None or not hasattr(page, "dataoffsets"):
                continue
            ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=False) if c]
            if ends and max(ends) > size:
                raise InputError(
                    f"file is truncated: image data end at byte {max(ends)}, the file has {size}",
                    p,
                )


_MPP_RE = re.compile(r"\bMPP\s*=\s*([0-9.eE+-]+)")


def tiff_pixel_size_um(tf: Any, series: int = 0) -> float | None:
    """Micrometres per level-0 pixel of image series ``series`` from Aperio, OME or TIFF
    resolution metadata, or None. Each is read from that series (its OME ``Image`` element,
    its first page): a label or macro image stored first has a pixel size of its own."""
    page = tf.series[series].levels[0].pages[0]
    desc = page.description or ""
    if tf.is_svs:
        m = _MPP_RE.search(desc)
        if m:
            return _positive(m.group(1))
    if tf.is_ome and tf.ome_metadata:
        v = _ome_pixel_size_um(tf.ome_metadata, series)
        if v:
            return v
    tags = page.tags
    res, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
    if res is not None and unit is not None:
        num, den = res.value if isinstance(res.value, tuple) else (res.value, 1)
        per_unit = num / den if den else 0
        unit_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
        if per_unit > 0 and unit_um:
            v = unit_um / per_unit
            # 72/96 dpi are writer defaults, not a measurement
            if 0.01 < v < 100:
                return v
    return None


def _ome_pixel_size_um(xml: str, image: int = 0) -> float | None:
    """``PhysicalSizeX`` (in µm) of the ``image``-th OME ``Image``'s ``Pixels``, or None.

    OME-XML declares no entities: a document that does is not parsed (entity expansion)."""
    if "<!ENTITY" in xml:
        return None
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    images = [e for e in root if e.tag.rsplit("}", 1)[-1] == "Image"]
    if image >= len(images):
        return None
    pixels = next((e for e in images[image] if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    value = _positive(pixels.attrib["PhysicalSizeX"])
    unit = pixels.attrib.get("PhysicalSizeXUnit", "µm")
    factor = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
    if value is None or unit not in factor:
        return None
    return value * factor[unit]


def _positive(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return v if v > 0 and np.isfinite(v) else None


class _Fd:
    """A raw file descriptor closed with the slide."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _TiledLevel:
    """Direct reader of one tiled TIFF level as (y, x, c): reads only the tiles a region
    touches with ``os.pread`` and decodes them with tifffile's per-page decoder.

    tifffile's Zarr store runs every read and decode inside zarr's single event-loop thread,
    which serialises Dask's worker threads; this reader releases the GIL while decoding, so
    reads scale with threads. Used for single-page, chunky (interleaved) tiled levels; other
    layouts go through the Zarr store.
    """

    def __init__(self, page: Any, fd: int, fill: int = 0) -> None:
        self._page = page
        self._fd = fd
        self._fill = fill
        self._decode = page.decode
        self._tables = getattr(page, "jpegtables", None)
        self._th, self._tw = int(page.tilelength), int(page.tilewidth)
        h, w = int(page.imagelength), int(page.imagewidth)
        c = int(page.samplesperpixel)
        self.shape = (h, w, c)
        self.dtype = np.dtype(page.dtype)
        self.ndim = 3
        self._ntx = -(-w // self._tw)
        self._offsets = page.dataoffsets
        self._counts = page.databytecounts

    @classmethod
    def try_create(cls, level: Any, fd: int, fill: int = 0) -> _TiledLevel | None:
        pages = getattr(level, "pages", None)
        if not pages or len(pages) != 1:
            return None
        page = pages[0]
        if page is None or not getattr(page, "is_tiled", False):
            return None
        if int(getattr(page, "imagedepth", 1)) != 1 or int(getattr(page, "tiledepth", 1)) != 1:
            return None
        if int(page.samplesperpixel) > 1 and int(page.planarconfig) != 1:  # planar: use zarr
            return None
        return cls(page, fd, fill)

    def _tile(self, ty: int, tx: int) -> np.ndarray | None:
        i = ty * self._ntx + tx
        count = int(self._counts[i])
        if count == 0:
            return None
        data = os.pread(self._fd, count, int(self._offsets[i]))
        seg, _, _ = self._decode(data, i, jpegtables=self._tables)
        return None if seg is None else seg.reshape(self._th, self._tw, -1)

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        ys, xs, cs = key
        h, w, c = self.shape
        y0, y1, _ = ys.indices(h)
        x0, x1, _ = xs.indices(w)
        out = np.full((max(0, y1 - y0), max(0, x1 - x0), c), self._fill, self.dtype)
        if out.size == 0:
            return out[:, :, cs]
        for ty in range(y0 // self._th, (y1 - 1) // self._th + 1):
            for tx in range(x0 // self._tw, (x1 - 1) // self._tw + 1):
                tile = self._tile(ty, tx)
                if tile is None:
                    continue
                ty0, tx0 = ty * self._th, tx * self._tw
                sy0, sy1 = max(y0, ty0), min(y1, ty0 + self._th)
                sx0, sx1 = max(x0, tx0), min(x1, tx0 + self._tw)
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[
                    sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0
                ]
        return out[:, :, cs]


class _YXCView:
    """Present a tifffile/zarr array with axes like 'YXS', 'CYX', 'YX', 'TCZYX' as (y, x, c)."""

    def __init__(self, arr: Any, axes: str) -> None:
        self._arr = arr
        axes = axes.replace("S", "C")
        if "Y" not in axes or "X" not in axes:
            raise ValueError(f"image axes {axes!r} have no Y/X")
        self._axes = axes
        self._sizes = dict(zip(axes, arr.shape, strict=True))
        for ax, n in self._sizes.items():
            if ax not in "YXC" and n != 1:
                raise ValueError(f"axis {ax!r} of length {n} is not supported (one plane only)")
        c = self._sizes.get("C", 1)
        self.shape = (self._sizes["Y"], self._sizes["X"], c)
        self.dtype = arr.dtype
        self.ndim = 3

    def _index(self, ys: slice, xs: slice, cs: slice) -> tuple[Any, ...]:
        return tuple(
            ys if ax == "Y" else xs if ax == "X" else cs if ax == "C" else 0 for ax in self._axes
        )

    @property
    def chunk_rows(self) -> int | None:
        """Rows per stored chunk (tile or strip) along y, None when the store has no chunks."""
        chunks = getattr(self._arr, "chunks", None)
        return int(chunks[self._axes.index("Y")]) if chunks else None

    def planes(self, ys: slice, xs: slice) -> list[np.ndarray]:
        """The (ys, xs) region as one contiguous (y, x) plane per channel."""
        if [ax for ax in self._axes if ax in "YXC"] == ["C", "Y", "X"]:
            block = np.asarray(self._arr[self._index(ys, xs, slice(None))])
            return [np.ascontiguousarray(p) for p in block]
        crop = self[ys, xs, slice(None)]
        return [np.ascontiguousarray(crop[:, :, k]) for k in range(crop.shape[2])]

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        ys, xs, cs = key
        out = np.asarray(self._arr[self._index(ys, xs, cs)])
        kept = [ax for ax in self._axes if ax in "YXC"]
        if "C" not in kept:
            return out[..., None][:, :, cs]
        return np.moveaxis(out, [kept.index("Y"), kept.index("X"), kept.index("C")], [0, 1, 2])


def _open_plain(p: Path) -> Slide:
    import imagecodecs

    data = p.read_bytes()
    if data[:2] == b"\xff\xd8":
        decode, fmt = imagecodecs.jpeg8_decode, "JPEG"
        # a JPEG stream ends with the EOI marker; decoders silently grey-fill truncated ones
        if b"\xff\xd9" not in data[-64:]:
            raise InputError("JPEG file is truncated (no end-of-image marker)", p)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        decode, fmt = imagecodecs.png_decode, "PNG"
        if b"IEND" not in data[-32:]:
            raise InputError("PNG file is truncated (no IEND chunk)", p)
    else:
        raise InputError("not a supported image (unrecognised file signature)", p)
    try:
        img = decode(data)
    except Exception as exc:
        raise InputError(f"cannot decode {fmt} ({_first_line(exc)})", p) from exc
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4) or min(img.shape[:2]) < 2:
        raise InputError(f"unsupported image shape {img.shape}", p)
    if img.shape[2] in (2, 4):
        img = over_white(img)
    return Slide(p, [img], None, "plain", "image")


def over_white(img: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    """Composite a (y, x, c) image whose last channel is alpha (grey + alpha, or RGBA) over
    white, as a brightfield background: (y, x, c - 1) of the same integer dtype.

    Transparent pixels hold no data; kept as they are (often black), they would be dark
    "tissue" to the mask and the registration. ``premultiplied`` colours (TIFF "associated
    alpha") are already multiplied by alpha.
    """
    top = float(np.iinfo(img.dtype).max)
    alpha = img[:, :, -1:].astype(np.float32) / top
    colour = img[:, :, :-1].astype(np.float32)
    out = (colour if premultiplied else colour * alpha) + top * (1.0 - alpha)
    return np.clip(np.rint(out), 0, top).astype(img.dtype)


class _OverWhiteView:
    """A (y, x, c) level whose last channel is alpha, read as (y, x, c - 1) composited over
    white (:func:`over_white`) region by region, so nothing is read whole."""

    def __init__(self, arr: Any, premultiplied: bool) -> None:
        self._arr = arr
        self._premultiplied = premultiplied
        h, w, c = arr.shape
        self.shape = (h, w, c - 1)
        self.dtype = arr.dtype
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        ys, xs, cs = key
        return over_white(np.asarray(self._arr[ys, xs, :]), self._premultiplied)[:, :, cs]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
