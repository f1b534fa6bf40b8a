"""Warp full-resolution slides chunk by chunk into another slide's frame.

Each output chunk (level-0 target pixels) computes its backward coordinates from the transform,
reads only the source box those coordinates cover (plus one pixel), and resamples it with
``cv2.remap``. Boxes wider than OpenCV's 32767 px limit are refused per chunk (they cannot
occur with 1024 px chunks and plausible scales). Memory is a few chunks per thread.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import dask.array as da
import numpy as np

from wsireg_flow.io.omezarr import write_ngff_pyramid
from wsireg_flow.io.slide import Slide, open_slide
from wsireg_flow.progress import ProgressFn
from wsireg_flow.stages import check_not_over_inputs
from wsireg_flow.transform import InverseView, Transform, TransformChain

CV_MAX = 32767


def background_value(channels: int, dtype: np.dtype, nearest: bool) -> int:
    """Fill value outside the source: white (the dtype's maximum: 255, 65535) for brightfield
    RGB(A) of an integer dtype, else 0 (grey, float, and labels)."""
    if not nearest and channels in (3, 4) and np.issubdtype(np.dtype(dtype), np.integer):
        return int(np.iinfo(np.dtype(dtype)).max)
    return 0


def warp_chunk(
    transform: Transform | TransformChain | InverseView,
    source: Slide | str,
    y0: int,
    x0: int,
    h: int,
    w: int,
    channels: int,
    dtype: np.dtype,
    nearest: bool = False,
) -> np.ndarray:
    """Warp the source into the target box [y0:y0+h, x0:x0+w] (level 0); returns (h, w, c)."""
    mx, my = transform.backward_coords(y0, x0, h, w)
    fill = background_value(channels, dtype, nearest)
    out = np.full((h, w, channels), fill, dtype)
    finite = np.isfinite(mx) & np.isfinite(my)
    if not finite.any():
        return out
    src = open_slide(source) if isinstance(source, str) else source
    try:
        sh, sw = src.shapes[0][:2]
        bx0 = max(int(np.floor(mx[finite].min())) - 1, 0)
        by0 = max(int(np.floor(my[finite].min())) - 1, 0)
        bx1 = min(int(np.ceil(mx[finite].max())) + 2, sw)
        by1 = min(int(np.ceil(my[finite].max())) + 2, sh)
        if bx1 <= bx0 or by1 <= by0:
            return out
        if bx1 - bx0 >= CV_MAX or by1 - by0 >= CV_MAX:
            raise ValueError(f"source box {(by1 - by0, bx1 - bx0)} exceeds OpenCV's limit")
        planes = src.read_planes(0, by0, bx0, by1, bx1)
    finally:
        if isinstance(source, str):
            src.close()
    mx -= bx0
    my -= by0
    if nearest:  # float maps, so that ties round as cv2.remap documents
        for k, plane in enumerate(planes):
            out[:, :, k] = remap_nearest(plane, mx, my, fill)
        return out
    # fixed-point maps give the same result (remap quantises to 1/32 px anyway), faster
    m1, m2 = cv2.convertMaps(mx, my, cv2.CV_16SC2)
    for k, plane in enumerate(planes):
        out[:, :, k] = remap_linear(plane, m1, m2, fill)
    return out


# dtypes cv2.remap resamples exactly as they are; it refuses uint32, float16 and bool and
# silently truncates 64-bit integers to int32 (2**40 + 3 came back as 3)
_REMAP_NEAREST = frozenset(map(np.dtype, ("u1", "i1", "u2", "i2", "i4", "f4", "f8")))
_REMAP_LINEAR = frozenset(map(np.dtype, ("u1", "u2", "i2", "f4", "f8")))


def remap_nearest(plane: np.ndarray, mx: np.ndarray, my: np.ndarray, fill: int) -> np.ndarray:
    """Nearest-neighbour resampling of a (y, x) plane of any dtype at float32 maps (x, y).

    Values are copied, never converted: where cv2.remap cannot take the dtype, it resamples
    the flat index of each source pixel (int32: crops stay below 32767 px a side) and the
    values are gathered from it. Outside the plane: ``fill``.
    """
    if plane.dtype in _REMAP_NEAREST:
        return cv2.remap(
            plane, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=fill
        )
    index = np.arange(plane.size, dtype=np.int32).reshape(plane.shape)
    at = cv2.remap(index, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=-1)
    out = plane.reshape(-1)[np.maximum(at, 0)]
    out[at < 0] = fill
    return out


def remap_linear(plane: np.ndarray, m1: np.ndarray, m2: np.ndarray, fill: int) -> np.ndarray:
    """Bilinear resampling of a (y, x) plane at fixed-point maps (``cv2.convertMaps``).

    Dtypes cv2.remap cannot interpolate go through float64 and come back rounded and clipped
    to the dtype's range (bool as a 0/1 threshold at one half). Outside the plane: ``fill``.
    """
    if plane.dtype in _REMAP_LINEAR:
        return cv2.remap(
            plane, m1, m2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fill
        )
    out = cv2.remap(
        plane.astype(np.float64),
        m1,
        m2,
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=fill,
    )
    if plane.dtype == np.bool_:
        return out >= 0.5
    if np.issubdtype(plane.dtype, np.integer):
        info = np.iinfo(plane.dtype)
        # the largest float64 that converts back: 2**63 - 1 and 2**64 - 1 round up past the
        # dtype and would wrap (64-bit values above 2**53 are interpolated to float64 precision)
        top = np.nextafter(np.float64(info.max), 0) if info.bits == 64 else info.max
        out = np.clip(np.rint(out), info.min, top)
    return out.astype(plane.dtype)


def warped_level0(
    transform: Transform | TransformChain | InverseView,
    source: Slide,
    chunk: int = 1024,
    nearest: bool = False,
) -> da.Array:
    """Lazy (y, x, c) dask array of the source warped onto the target's level-0 grid."""
    h, w = transform.target_shape
    c = source.channels
    dtype = source.dtype
    template = da.empty((h, w, c), chunks=(chunk, chunk, c), dtype=dtype)

    def block(_: np.ndarray, block_info: dict[Any, Any] | None = None) -> np.ndarray:
        assert block_info is not None
        (yy0, yy1), (xx0, xx1), _c = block_info[None]["array-location"]
        return warp_chunk(transform, source, yy0, xx0, yy1 - yy0, xx1 - xx0, c, dtype, nearest)

    return template.map_blocks(block, dtype=dtype)


def warp_slide(
    transform: Transform | TransformChain | InverseView,
    source: Slide,
    out: str | os.PathLike[str],
    pixel_size_um: float | None = None,
    *,
    chunk: int = 1024,
    max_side: int = 1024,
    codec: str = "lz4",
    nearest: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    frame: str = "target",
) -> Path:
    """Warp ``source`` through ``transform`` (out of core) and write it as an OME-Zarr
    pyramid: into the target frame through a :class:`Transform`, into the source frame
    through an :class:`InverseView`, into the reference section's through a stack's chain.

    ``nearest`` uses nearest-neighbour sampling (label masks keep their values). ``frame``
    names that frame in the metadata (``warped_into: "<frame> frame"``).
    """
    check_not_over_inputs(out, [source.path])
    level0 = warped_level0(transform, source, chunk, nearest)
    return write_ngff_pyramid(
        level0,
        out,
        pixel_size_um,
        name="warped",
        chunk=chunk,
        max_side=max_side,
        codec=codec,
        overwrite=overwrite,
        labels=nearest,
        progress=progress,
        extra_attrs={"source": str(source.path), "warped_into": f"{frame} frame"},
    )
