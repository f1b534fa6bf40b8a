"""Multiscale pyramids: level shapes, 2x anti-aliased downsampling, level selection.

Arrays are (y, x[, c]) unless a function says otherwise. Downsampling by 2 is a 2x2 box
average (``cv2.INTER_AREA`` at exactly half size), which is the anti-aliasing filter matched to
the new grid: output pixel (i, j) is the mean of input pixels (2i..2i+1, 2j..2j+1). Odd sizes are
padded by edge replication, so the last output row/column averages the last input row/column
with itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import cv2
import numpy as np


def pyramid_shapes(height: int, width: int, max_side: int = 1024) -> list[tuple[int, int]]:
    """(y, x) shapes of a 2x pyramid from (height, width) down to longest side <= ``max_side``.

    Each level is ``ceil(previous / 2)``. Level 0 is (height, width) and always present.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image shape must be positive, got {(height, width)}")
    if max_side < 1:
        raise ValueError("max_side must be >= 1")
    shapes = [(int(height), int(width))]
    while max(shapes[-1]) > max_side:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def level_downsamples(shapes: Sequence[Sequence[int]]) -> list[float]:
    """Level-0 pixels per pixel of each level of a pyramid of (y, x[, c]) ``shapes``.

    Pyramids are built with an integer factor per step (2x here, 2x or 4x in SVS and NDPI files)
    and sizes rounded to whole pixels (``ceil`` here, ``floor`` in Aperio files), so the ratio of
    sizes is not the factor: 1025 px halved five times is 33 px, a ratio of 31.06 instead of 32,
    which would misplace level-0 positions near the far edge by most of a level-k pixel. Each
    step's factor is the integer nearest its size ratio when that integer reproduces both sizes
    to within one pixel (else, for a pyramid with non-integer steps, the ratio itself), and a
    level's downsample is the product of the steps above it. Level-k pixel u is then centred on
    level-0 pixel ``(u + 0.5) * d_k - 0.5``.
    """
    out = [1.0]
    for prev, cur in pairwise(shapes):
        ratio = (prev[0] / cur[0] + prev[1] / cur[1]) / 2
        step = max(1, round(ratio))
        exact = abs(prev[0] / step - cur[0]) < 1 and abs(prev[1] / step - cur[1]) < 1
        out.append(out[-1] * (step if exact else ratio))
    return out


def downsample2(block: np.ndarray) -> np.ndarray:
    """Halve a (y, x) or (y, x, c) block with a 2x2 box average (anti-aliased).

    Returns shape (ceil(y/2), ceil(x/2)[, c]) with the input dtype (integers are rounded).
    """
    h, w = block.shape[:2]
    pad_y, pad_x = h % 2, w % 2
    if pad_y or pad_x:
        pad = [(0, pad_y), (0, pad_x)] + [(0, 0)] * (block.ndim - 2)
        block = np.pad(block, pad, mode="edge")
    out_size = (block.shape[1] // 2, block.shape[0] // 2)  # cv2 takes (width, height)
    # cv2 rounds .5 ties differently for 2-channel images: do those channel by channel too
    if block.ndim == 3 and block.shape[2] not in (1, 3, 4):
        return np.stack([downsample2(block[:, :, k]) for k in range(block.shape[2])], axis=2)
    if block.dtype not in _CV2_DTYPES:  # e.g. int8, int32, bool: cv2.resize refuses them
        return _downsample2_numpy(block)
    out = cv2.resize(np.ascontiguousarray(block), out_size, interpolation=cv2.INTER_AREA)
    if block.ndim == 3 and out.ndim == 2:  # cv2 drops a channel axis of 1
        out = out[:, :, None]
    return out


_CV2_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.int16, np.float32, np.float64))


def _downsample2_numpy(block: np.ndarray) -> np.ndarray:
    """2x2 box average of an even-sized block in numpy (integers rounded half up, like cv2)."""
    quads = (block[0::2, 0::2], block[1::2, 0::2], block[0::2, 1::2], block[1::2, 1::2])
    if block.dtype == np.bool_:
        return _downsample2_numpy(block.view(np.uint8)).astype(np.bool_)
    if np.issubdtype(block.dtype, np.integer):
        # floor(sum / 4 + 1/2) without overflow: x = 4 * (x // 4) + x % 4
        q = sum(a // 4 for a in quads)
        r = sum(a % 4 for a in quads)
        return (q + (r + 2) // 4).astype(block.dtype)
    acc = np.float64 if block.dtype.itemsize > 4 else np.float32
    return (sum(a.astype(acc) for a in quads) / 4).astype(block.dtype)


def downsample2_cyx(block: np.ndarray) -> np.ndarray:
    """:func:`downsample2` for a (c, y, x) block."""
    return np.moveaxis(downsample2(np.moveaxis(block, 0, -1)), -1, 0)


def level_for_max_side(shapes: Sequence[Sequence[int]], max_side: int) -> int:
    """Index of the finest level whose longest (y, x) side is at most ``max_side``.

    When no level is that small, the coarsest level is returned.
    """
    for k, s in enumerate(shapes):
        if max(s[0], s[1]) <= max_side:
            return k
    return len(shapes) - 1


def level_for_pixel_size(pixel_sizes_um: Sequence[float], target_um: float) -> int:
    """Index of the coarsest level whose pixel size (um) does not exceed ``target_um``.

    Levels are assumed ordered fine to coarse. When even level 0 is coarser than the target,
    level 0 is returned.
    """
    best = 0
    for k, size in enumerate(pixel_sizes_um):
        if size <= target_um * (1 + 1e-6):
            best = k
    return best
