"""Tissue masks and a stain-independent intensity image.

Brightfield slides are white where there is no tissue. Optical density (OD) turns transmitted
light into absorbance, which is additive over stains: summing OD over the RGB channels gives a
"how much material is here" image that looks alike for H&E and for IHC stains of neighbouring
sections. All functions take (y, x, c) integer arrays (c = 1 or 3; a 4th alpha channel is
ignored); white is the dtype's maximum (255 for uint8, 65535 for uint16), so a 16-bit scan
gives the same optical density as its 8-bit version.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu


def _channels(rgb: np.ndarray) -> np.ndarray:
    """(y, x, c) colour channels without alpha; a (y, x) grey image gets a channel axis."""
    return rgb[..., :3] if rgb.ndim == 3 else rgb[..., None]


def scanned(rgb: np.ndarray) -> np.ndarray:
    """(y, x) bool: pixels not exactly white and not exactly black in every channel. Such
    pixels are padding with no data (outside a scanner's scanned area, the corners of a
    rotated export, a canvas an image was pasted on), not glass and not tissue."""
    img = _channels(rgb)
    return (img.min(axis=-1) < white_level(img.dtype)) & (img.max(axis=-1) > 0)


def data_region(
    rgb: np.ndarray, min_fraction: float = 0.001, ink: np.ndarray | None = None
) -> np.ndarray | None:
    """(y, x) bool: what the coarse step should compare. False on padding and on marker ink
    (``ink``, computed by :func:`ink_mask` when not given); None when there is neither.

    Padding is an exactly white or black region (see :func:`scanned`), or a nearly white or
    black one (see :func:`near_padding`: JPEG compression leaves padding only nearly so; the
    two are judged apart, as near values can join exact padding to bright glass, and a near
    region must be at least half exact), of at least ``min_fraction`` of the image
    (8-connected) whose outline, once the specks JPEG ringing punches into it are filled,
    runs straight (at least :data:`PADDING_STRAIGHT` of it on segments of 20 px or more),
    such as the corners of a rotated crop. Glass clipped to exact white by an export is not
    padding: its outline follows the tissue, and it must be compared, or the tissue's outline
    no longer guides the fit. (On the bundled slides clipped at 225 only one straight-edged
    lumen of one image, 0.5 % of it, counts as padding; its coarse fit moved by 0.1 px.)
    Lone saturated pixels of a JPEG scan's glass are not padding either.
    """
    ink = ink_mask(rgb) if ink is None else ink
    # exact padding next to bright glass merges with it once near values count: both are tried
    exact = ~scanned(rgb)
    padding = _straight_regions(exact, min_fraction) | _straight_regions(
        near_padding(rgb), min_fraction, exact
    )
    if not padding.any():
        return ~ink if ink.any() else None
    return ~padding & ~ink


def _straight_regions(
    candidates: np.ndarray, min_fraction: float, exact: np.ndarray | None = None
) -> np.ndarray:
    """(y, x) bool: the 8-connected regions of ``candidates`` of at least ``min_fraction`` of
    the image whose outline, specks filled, is straight (:data:`PADDING_STRAIGHT`) and, with
    ``exact``, at least half of whose pixels are in it: compression leaves most of a padded
    region exactly white or black (92 % at JPEG quality 95), while glass brighter than 243
    reaching the image's edge can have an outline as straight (the frame's)."""
    least = min_fraction * candidates.size
    if candidates.sum() < least:
        return np.zeros(candidates.shape, bool)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(
        candidates.astype(np.uint8), connectivity=8
    )
    large = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= least) + 1
    if exact is not None:
        held = ndi.sum(exact, labels, index=large) / stats[large, cv2.CC_STAT_AREA]
        large = large[held >= 0.5]
    regions = [k for k in large if straight_share(_fill_specks(labels == k)) >= PADDING_STRAIGHT]
    return np.isin(labels, regions)


PADDING_STRAIGHT = 0.8


def _fill_specks(region: np.ndarray, largest: int = 4) -> np.ndarray:
    """(y, x) bool ``region`` with its holes of at most ``largest`` px filled (the specks
    JPEG ringing leaves in compressed padding; tissue inside glass makes larger holes)."""
    holes = ndi.binary_fill_holes(region) & ~region
    if not holes.any():
        return region
    _, labels, stats, _ = cv2.connectedComponentsWithStats(holes.view(np.uint8), connectivity=4)
    small = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] <= largest) + 1
    return region | np.isin(labels, small)


# how far from exact white or black (of 255) a JPEG-compressed export leaves its padding
PADDING_TOLERANCE = 12.0


def near_padding(rgb: np.ndarray) -> np.ndarray:
    """(y, x) bool: pixels within :data:`PADDING_TOLERANCE` (of 255, scaled to the dtype) of
    white or of black in every channel: padding, once JPEG compression has blurred it (at
    quality 95 ringing leaves 8 % of a white corner's pixels short of 255, and the region full
    of holes), and also bright glass and the darkest ink. :func:`data_region` keeps only the
    regions with a straight outline, at least half of them exactly white or black."""
    img = _channels(rgb)
    white = white_level(img.dtype)
    tol = PADDING_TOLERANCE * white / 255.0
    return (img.min(axis=-1) >= white - tol) | (img.max(axis=-1) <= tol)


def straight_share(region: np.ndarray, eps: float = 2.0, long: float = 20.0) -> float:
    """Share of the outline of a (y, x) bool ``region`` (holes included) that lies on straight
    segments of at least ``long`` px, once simplified within ``eps`` px (Douglas-Peucker)."""
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    total = straight = 0.0
    for contour in contours:
        corners = cv2.approxPolyDP(contour, eps, True)[:, 0, :].astype(np.float64)
        sides = np.linalg.norm(np.roll(corners, -1, axis=0) - corners, axis=1)
        total += float(sides.sum())
        straight += float(sides[sides >= long].sum())
    return straight / total if total > 0 else 0.0


def white_level(dtype: np.dtype) -> float:
    """The value of white: the integer dtype's maximum (255 for uint8), 255 for floats."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 255.0


def _channel_od(img: np.ndarray) -> np.ndarray:
    """(y, x, c) float32 optical density of each channel of a (y, x, c) image (see
    :func:`optical_density`)."""
    white = white_level(img.dtype)
    unit = white / 255.0
    return -np.log10((img.astype(np.float32) + np.float32(unit)) / np.float32(white + unit))


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Sum over channels of the optical density -log10((I + u) / (white + u)), as (y, x)
    float32, with white from :func:`white_level` and u = white / 255 (1 for uint8).

    0 for white; about 2.4 per channel for near-black, whatever the bit depth: a 16-bit image
    with the values of an 8-bit one times 257 has exactly its optical density. Exactly black
    regions (0 in every channel, at least 3x3 px) are padding, like exactly white ones, and
    get 0: a rotated export padded black would otherwise be dense tissue with straight edges.
    Lone black pixels (the darkest nuclei of a JPEG scan) keep their density. Works for
    grayscale (c = 1) too.
    """
    img = _channels(rgb)
    total = _channel_od(img).sum(axis=-1, dtype=np.float32)
    # only a pixel at 0 in every channel reaches the largest sum (faster than testing the
    # channels: a reduction along the short last axis doubled this function's time)
    black = _channel_od(np.zeros((1, 1, img.shape[-1]), img.dtype)).sum(axis=-1, dtype=np.float32)
    is_black = (total >= black[0, 0]).view(np.uint8)
    if is_black.any():
        region = cv2.morphologyEx(is_black, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        total[region > 0] = 0.0
    return total


# Marker ink (pen marks on the slide or coverslip). Blue and green markers are dark (summed
# optical density above INK_MIN_OD) and absorb red clearly more than green
# (INK_RED_TO_GREEN); haematoxylin, eosin, DAB and their mixtures do not: on the darkest 2 %
# of the bundled slides' tissue pixels at the preprocessing level (longest side <= 1024 px)
# red/green is at most 1.06 (H&E, IHC, Ki67). Black markers are dark in every channel
# (INK_BLACK_OD each) and neutral (no channel absorbs INK_NEUTRAL times more than another):
# the same pixels reach 0.82 at most. At full resolution single nuclei, DAB grains and colour
# fringes can pass both tests; they are scattered, and ink must form one piece of at least
# INK_MIN_AREA of the image (a stroke).
INK_MIN_OD = 1.0
INK_RED_TO_GREEN = 1.2
INK_BLACK_OD = 0.85
INK_NEUTRAL = 1.5
INK_MIN_AREA = 0.0005


def ink_mask(rgb: np.ndarray) -> np.ndarray:
    """(y, x) bool: pixels coloured like blue, green or black marker ink rather than a stain
    (see :data:`INK_MIN_OD` and the constants after it) in connected pieces of at least
    :data:`INK_MIN_AREA` of the image, and the 1 px rim around them (a stroke's soft edge).
    All False for a grey image (no colour). Ink is left out of the intensity statistics
    (:func:`intensity_stats`), whose 99th percentile a stroke over 1 % of the tissue would
    otherwise set, and out of the coarse comparison (:func:`data_region`). Dense blue-green
    stains (the aniline blue of a trichrome, Alcian blue) can qualify as ink too."""
    img = _channels(rgb)
    if img.shape[-1] < 3:
        return np.zeros(img.shape[:2], bool)
    od = _channel_od(img)
    lo, hi = od.min(axis=-1), od.max(axis=-1)
    coloured = (od.sum(axis=-1) > INK_MIN_OD) & (od[..., 0] > INK_RED_TO_GREEN * od[..., 1])
    black = (lo > INK_BLACK_OD) & (hi < INK_NEUTRAL * lo)
    core = (coloured | black) & (img.max(axis=-1) > 0)  # exactly black: padding, not ink
    if not core.any():
        return core
    # a stroke is one piece: scattered dark nuclei or DAB are not ink
    _, labels, stats, _ = cv2.connectedComponentsWithStats(core.astype(np.uint8), connectivity=8)
    strokes = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= INK_MIN_AREA * core.size) + 1
    if strokes.size == 0:
        return np.zeros(core.shape, bool)
    core = np.isin(labels, strokes)
    return cv2.dilate(core.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0


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


@dataclass(frozen=True)
class GlassLevel:
    """Optical density of the empty glass: the peak (mode) and its spread (both summed OD)."""

    level: float
    spread: float


def glass_level(rgb: np.ndarray, od: np.ndarray, below: float) -> GlassLevel | None:
    """The background (glass) peak of the OD histogram under ``below``, or None if there is none.

    The glass peak is the brightest (lowest OD) local maximum of the histogram (0.005 bins,
    smoothed over 3) at least a quarter as high as its highest bin: pale tissue can outnumber
    the glass, but nothing is brighter. Scanned glass is a narrow peak (summed OD 0.03-0.1 and
    spread under 0.02 on the bundled slides). Pixels that are exactly white (or black) in every
    channel are left out: they are padding with no data (:func:`scanned`), not glass. The spread is
    the RMS distance to the peak of the pixels up to 0.1 below it (the dark side holds faint
    tissue). None when fewer than 1 % of the pixels are candidates, the peak is not bright
    (OD > 0.3) or it is not narrow (spread > 0.03): then the image has no usable glass.

    Parameters
    ----------
    rgb : (y, x, c) integer image.
    od : (y, x) float32 summed optical density of ``rgb`` (see :func:`optical_density`).
    below : only pixels with OD under this value are glass candidates.
    """
    candidates = od[scanned(rgb) & (od < below)]
    if candidates.size < 0.01 * od.size:
        return None
    step = 0.005
    edges = np.arange(0.0, max(below, 2 * step) + step, step)
    counts = np.convolve(np.histogram(candidates, bins=edges)[0], np.ones(3) / 3.0, mode="same")
    padded = np.concatenate([[-1.0], counts, [-1.0]])
    is_peak = (counts >= padded[:-2]) & (counts > padded[2:]) & (counts >= 0.25 * counts.max())
    peak = float(edges[int(np.flatnonzero(is_peak)[0])] + step / 2)
    if peak > 0.3:
        return None
    bright_side = candidates[(candidates < peak) & (candidates > peak - 0.1)]
    spread = float(np.sqrt(np.mean((bright_side - peak) ** 2))) if bright_side.size else 0.0
    return None if spread > 0.03 else GlassLevel(peak, spread)


def scanned_box(rgb: np.ndarray) -> tuple[slice, slice]:
    """(y, x) slices of the bounding box of the scanned pixels: those not exactly white
    (from :func:`white_level`) or black in every channel. Such padding outside that box
    holds no data. The whole image when nothing was scanned."""
    data = scanned(rgb)
    rows, cols = np.flatnonzero(data.any(axis=1)), np.flatnonzero(data.any(axis=0))
    if rows.size == 0:
        return slice(0, data.shape[0]), slice(0, data.shape[1])
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def tissue_mask(
    rgb: np.ndarray, min_area_fraction: float = 0.0005, closing_px: int = 3
) -> np.ndarray:
    """Boolean (y, x) tissue mask of a low-resolution image.

    Tissue is what absorbs clearly more light than the glass: optical density above the glass
    peak plus 5 spreads (at least 0.04 above it, see :func:`glass_level`), or above Otsu's
    threshold (of the scanned pixels: exactly white or black padding left out) if that is
    lower. Otsu
    alone splits dark stain from faint tissue on IHC slides whose counterstain is pale (the
    bundled cytokeratin section: 10 % of the image instead of 54 %). Without a glass peak
    (tissue everywhere) the threshold is halfway between the 5th percentile and Otsu's, plus
    0.02. Then a small closing, hole filling and removal of pieces smaller than
    ``min_area_fraction`` of the image. A blank image (no contrast) gives an all-False mask.
    """
    od = cv2.GaussianBlur(optical_density(rgb), (0, 0), 1.0)
    if float(od.max() - od.min()) < 0.05:
        return np.zeros(od.shape, bool)
    # exactly white (or black) pixels are padding (no data): a wide margin would otherwise pull
    # Otsu's threshold between padding and glass, and the whole scanned area would be "tissue"
    data = od[scanned(rgb)]
    otsu = float(threshold_otsu(data if data.size >= 0.01 * od.size else od))
    glass = glass_level(rgb, od, otsu)
    if glass is not None:
        thr = min(otsu, glass.level + max(5.0 * glass.spread, 0.04))
    else:  # no glass (tissue everywhere): do not let dark stain lift Otsu over faint tissue
        p5 = float(np.percentile(od, 5))
        thr = min(otsu, p5 + 0.5 * (otsu - p5) + 0.02)
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


def stained(intensity: np.ndarray, mask: np.ndarray, min_stain: float) -> np.ndarray:
    """(h, w) bool: pixels of the tissue ``mask`` that hold stain.

    ``intensity`` is the (h, w) normalised intensity of the same pixels (see
    :func:`normalized_intensity`), lightly blurred (sigma 1 px) here. The mask is filled and
    closed, so it also covers empty space inside tissue (lumens, alveolar spaces, faint flat
    areas): pixels below ``min_stain`` there carry no texture to match, and their optical flow
    is only what the flow filled in from around them.
    """
    return mask & (cv2.GaussianBlur(intensity, (0, 0), 1.0) > min_stain)


def fill_ink(
    intensity: np.ndarray, ink: np.ndarray, sigma: float = 8.0, widen: int = 2
) -> np.ndarray:
    """``intensity`` (y, x) float32 with the marker-ink pixels ``ink`` ((y, x) bool, widened
    by ``widen`` px: a stroke's soft rim, and the blocky edge of a mask found at a coarser
    level) replaced by the intensity around them (its Gaussian-weighted mean over the pixels
    without ink, ``sigma`` px; the mean of all of them where none is near). A stroke on one
    image only would otherwise pull the optical flow along its edges. ``intensity`` is left
    alone (returned as is when there is no ink)."""
    if not ink.any():
        return intensity
    side = 2 * widen + 1
    wide = cv2.dilate(ink.astype(np.uint8), np.ones((side, side), np.uint8)) > 0
    if wide.all():
        return intensity.copy()
    keep = (~wide).astype(np.float32)
    weight = cv2.GaussianBlur(keep, (0, 0), sigma)
    mean = cv2.GaussianBlur(intensity * keep, (0, 0), sigma) / np.maximum(weight, 1e-6)
    mean[weight < 1e-3] = float(intensity[~wide].mean())
    out = intensity.copy()
    out[wide] = mean[wide]
    return out
