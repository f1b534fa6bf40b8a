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
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    mx -= bx0
    my -= by0
    # linear: fixed-point maps give the same result (remap quantises to 1/32 px anyway) faster;
    # nearest keeps float maps so that ties round exactly as documented
    m1, m2 = (mx, my) if nearest else cv2.convertMaps(mx, my, cv2.CV_16SC2)
    for k, plane in enumerate(planes):
        out[:, :, k] = cv2.remap(
            plane, m1, m2, interp, borderMode=cv2.BORDER_CONSTANT, borderValue=fill
        )
    return out


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
) -> Path:
    """Write the source warped into the target frame as an OME-Zarr pyramid (out of core).

    ``nearest`` uses nearest-neighbour sampling (label masks keep their values).
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
        extra_attrs={"source": str(source.path), "warped_into": "target frame"},
    )
