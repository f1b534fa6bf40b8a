"""Tissue masks and a stain-independent intensity image.

Brightfield slides are white where there is no tissue. Optical density (OD) turns transmitted
light into absorbance, which is additive over stains: summing OD over the RGB channels gives a
"how much material is here" image that looks alike for H&E and for IHC stains of neighbouring
sections. All functions take (y, x, c) uint8 arrays (c = 1 or 3; a 4th alpha channel is ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Sum over channels of the optical density -log10((I + 1) / 256), as (y, x) float32.

    0 for white; about 2.4 per channel for black. Works for grayscale (c = 1) too.
    """
    img = rgb[..., :3] if rgb.ndim == 3 else rgb[..., None]
    od = -np.log10((img.astype(np.float32) + 1.0) / 256.0)
    return od.sum(axis=-1, dtype=np.float32)


@dataclass(frozen=True)
class IntensityStats:
    """Percentiles of the OD image over tissue, used to normalise every tile the same way."""

    low: float
    high: float


def intensity_stats(od: np.ndarray, mask: np.ndarray | None = None) -> IntensityStats:
    """1st and 99th percentile of the OD image (over ``mask`` when it has enough pixels)."""
    values = od[mask] if mask is not None and mask.sum() > 100 else od.ravel()
    lo, hi = np.percentile(values, [1.0, 99.0])
    if hi - lo < 1e-3:
        hi = lo + 1e-3
    return IntensityStats(float(lo), float(hi))


def normalized_intensity(rgb: np.ndarray, stats: IntensityStats | None = None) -> np.ndarray:
    """Stain-independent intensity in [0, 1] as (y, x) float32: OD rescaled by ``stats``.

    Background is near 0 and dense tissue near 1; applied tile by tile with the same ``stats``
    the result is seamless across tiles.
    """
    od = optical_density(rgb)
    if stats is None:
        stats = intensity_stats(od)
    out = (od - stats.low) / (stats.high - stats.low)
    return np.clip(out, 0.0, 1.0, out=out)


def tissue_mask(
    rgb: np.ndarray, min_area_fraction: float = 0.0005, closing_px: int = 3
) -> np.ndarray:
    """Boolean (y, x) tissue mask of a low-resolution image.

    Otsu's threshold on optical density (background is bright, tissue absorbs), then a small
    closing, hole filling and removal of pieces smaller than ``min_area_fraction`` of the image.
    A blank image (no contrast) gives an all-False mask.
    """
    od = cv2.GaussianBlur(optical_density(rgb), (0, 0), 1.0)
    if float(od.max() - od.min()) < 0.05:
        return np.zeros(od.shape, bool)
    thr = threshold_otsu(od)
    # faint tissue (IHC counterstain) sits just above white: do not let dark stain lift Otsu
    thr = min(thr, float(np.percentile(od, 5)) + 0.5 * (thr - float(np.percentile(od, 5))) + 0.02)
    mask = od > thr
    if closing_px > 0:
        mask = ndi.binary_closing(mask, structure=np.ones((closing_px, closing_px)), iterations=2)
    mask = ndi.binary_fill_holes(mask)
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = ndi.sum(mask, labels, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= min_area_fraction * mask.size) + 1
    return np.isin(labels, keep)
