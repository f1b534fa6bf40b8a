"""Coarse alignment at low resolution: features + robust fit, rotation/flip search, ECC.

All images are (y, x) float32 intensity images in [0, 1] (see :mod:`wsireg_flow.tissue`) at one
working level; matrices are 3x3 target->source affines on (x, y) pixel coordinates of that level.

Strategy
--------
1. SIFT (or ORB) features on both images, Lowe's ratio test, USAC-MAGSAC affine fit (RANSAC
   for the similarity model: OpenCV's similarity estimator has no USAC methods); the
   same against the x-mirrored source when ``try_flip`` (kept only if clearly better).
2. If that fails or is implausible: exhaustive rotation search (every ``rotation_step_deg``,
   mirrored too), translation by phase correlation, scored by normalised cross-correlation.
3. ECC (enhanced correlation coefficient) affine refinement, kept only when it raises the
   correlation and stays plausible.
Implausible results (scale outside [scale_min, scale_max], shear above ``max_shear``, too few
inliers) are rejected and the reason is kept in ``RigidResult.notes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from skimage.registration import phase_cross_correlation

from wsireg_flow.config import RigidConfig
from wsireg_flow.errors import RegistrationError
from wsireg_flow.geometry import (
    as3x3,
    decompose,
    flip_x,
    nearest_similarity,
    rotation_about,
    translation,
)


@dataclass
class RigidResult:
    """Outcome of coarse alignment (matrix: 3x3 target->source at the working level).

    ``score_initial`` / ``score_final`` are :func:`selection_score` values (two intensity NCCs
    plus half the tissue-mask NCC, between -2.5 and 2.5, less a coverage penalty of up to
    :data:`COVERAGE_PENALTY`: down to -7.5) before (identity) and after.
    """

    matrix: np.ndarray
    method: str
    n_matches: int = 0
    n_inliers: int = 0
    flipped: bool = False
    score_initial: float = float("nan")
    score_final: float = float("nan")
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict of the fit and its diagnostics."""
        return {
            "method": self.method,
            "n_matches": self.n_matches,
            "n_inliers": self.n_inliers,
            "flipped": self.flipped,
            "score_initial": self.score_initial,
            "score_final": self.score_final,
            "notes": list(self.notes),
            **decompose(self.matrix),
        }


def warp_affine(image: np.ndarray, matrix: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample ``image`` (source) onto a (y, x) ``shape`` grid with a target->source affine."""
    return cv2.warpAffine(
        image,
        np.ascontiguousarray(matrix[:2], dtype=np.float64),
        (shape[1], shape[0]),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised cross-correlation of two same-shape images (over ``mask`` if given)."""
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    if a.size < 16:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def plausibility(matrix: np.ndarray, cfg: RigidConfig) -> str | None:
    """None when the affine is plausible, else the reason it is not."""
    if not np.all(np.isfinite(matrix)):
        return "non-finite matrix"
    d = decompose(matrix)
    if not cfg.scale_min <= d["scale"] <= cfg.scale_max:
        return f"scale {d['scale']:.3f} outside [{cfg.scale_min}, {cfg.scale_max}]"
    if abs(d["shear"]) > cfg.max_shear:
        return f"shear {d['shear']:.3f} above {cfg.max_shear}"
    if d["anisotropy"] > 1.0 + 2 * cfg.max_shear:
        return f"anisotropic scaling {d['anisotropy']:.3f}"
    return None


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255.0, 0, 255).astype(np.uint8)


def _features(img: np.ndarray, mask: np.ndarray | None, cfg: RigidConfig):
    u8 = _to_u8(img)
    m = (
        None
        if mask is None
        else cv2.dilate(mask.astype(np.uint8) * 255, np.ones((15, 15), np.uint8))
    )
    if cfg.detector == "sift":
        det = cv2.SIFT_create(nfeatures=cfg.n_features)
    else:
        det = cv2.ORB_create(nfeatures=cfg.n_features)
    kps, desc = det.detectAndCompute(u8, m)
    pts = np.array([k.pt for k in kps], dtype=np.float64).reshape(-1, 2)
    if cfg.detector == "sift":
        pts -= 0.25  # OpenCV's SIFT reports positions a quarter pixel off (upsampled octave)
    return pts, desc


def _match(desc_t: np.ndarray, desc_s: np.ndarray, cfg: RigidConfig) -> np.ndarray:
    if desc_t is None or desc_s is None or len(desc_t) < 2 or len(desc_s) < 2:
        return np.zeros((0, 2), int)
    norm = cv2.NORM_L2 if cfg.detector == "sift" else cv2.NORM_HAMMING
    knn = cv2.BFMatcher(norm).knnMatch(desc_t, desc_s, k=2)
    good = [
        (m[0].queryIdx, m[0].trainIdx)
        for m in knn
        if len(m) == 2 and m[0].distance < cfg.ratio * m[1].distance
    ]
    return np.array(good, int).reshape(-1, 2)


def _fit(pt: np.ndarray, ps: np.ndarray, cfg: RigidConfig, diag: float):
    if len(pt) < 4:
        return None, 0
    thr = cfg.ransac_px * diag
    if cfg.model == "affine":
        fit, method = cv2.estimateAffine2D, cv2.USAC_MAGSAC
    else:  # OpenCV's similarity estimator has only plain RANSAC and LMedS
        fit, method = cv2.estimateAffinePartial2D, cv2.RANSAC
    m, inl = fit(pt, ps, method=method, ransacReprojThreshold=thr, maxIters=5000, confidence=0.999)
    if m is None:
        return None, 0
    return as3x3(m), int(inl.sum())


def feature_alignment(
    target: np.ndarray,
    source: np.ndarray,
    target_mask: np.ndarray | None,
    source_mask: np.ndarray | None,
    cfg: RigidConfig,
) -> RigidResult | None:
    """Feature-based target->source affine, or None when no plausible fit is found."""
    diag = float(np.hypot(*target.shape))
    pt_all, dt = _features(target, target_mask, cfg)
    candidates: list[RigidResult] = []
    variants = [False, True] if cfg.try_flip else [False]
    for flipped in variants:
        src = source[:, ::-1] if flipped else source
        msk = None if source_mask is None else (source_mask[:, ::-1] if flipped else source_mask)
        ps_all, ds = _features(
            np.ascontiguousarray(src), None if msk is None else np.ascontiguousarray(msk), cfg
        )
        pairs = _match(dt, ds, cfg)
        m, n_in = (
            _fit(pt_all[pairs[:, 0]], ps_all[pairs[:, 1]], cfg, diag) if len(pairs) else (None, 0)
        )
        if m is None:
            continue
        if flipped:
            m = flip_x(source.shape[1]) @ m
        res = RigidResult(m, "features", n_matches=len(pairs), n_inliers=n_in, flipped=flipped)
        reason = plausibility(m, cfg)
        if n_in < cfg.min_inliers:
            reason = f"only {n_in} inliers (< {cfg.min_inliers})"
        if reason:
            res.notes.append(
                f"features{' (mirrored)' if flipped else ''} rejected: {reason} "
                f"({n_in} inliers of {len(pairs)} matches)"
            )
        candidates.append(res)
    ok = [c for c in candidates if not any("rejected" in n for n in c.notes)]
    if not ok:
        if not candidates:
            return None
        # every candidate rejected: a sentinel result carries the reasons back
        notes = [n for c in candidates for n in c.notes]
        return RigidResult(np.eye(3), "rejected", notes=notes)
    best = max(ok, key=lambda r: r.n_inliers * (1.0 if not r.flipped else 1.0 / 1.5))
    for c in candidates:
        if c is not best:
            best.notes.extend(c.notes)
    return best


def _spread(mask: np.ndarray) -> np.ndarray:
    """Square roots of the eigenvalues of the (x, y) covariance of the mask's pixels, sorted
    (the tissue's extents along its principal axes, up to a factor; px)."""
    yy, xx = np.nonzero(mask)
    cov = np.cov(np.stack([xx, yy]).astype(np.float64))
    return np.sqrt(np.clip(np.sort(np.linalg.eigvalsh(cov)), 0.0, None))


def tissue_area_scale(
    target_mask: np.ndarray | None, source_mask: np.ndarray | None
) -> float | None:
    """``sqrt(source tissue px / target tissue px)``: the target->source scale the tissue areas
    imply (None without both masks or with almost no tissue)."""
    if target_mask is None or source_mask is None:
        return None
    area_t, area_s = float(np.count_nonzero(target_mask)), float(np.count_nonzero(source_mask))
    if area_t < 16 or area_s < 16:
        return None
    return float(np.sqrt(area_s / area_t))


def tissue_scale(
    target_mask: np.ndarray | None,
    source_mask: np.ndarray | None,
    cfg: RigidConfig,
    min_ratio: float = 1.2,
    agreement: float = 0.1,
) -> float | None:
    """Scale of the target->source map implied by the tissue, when far from 1.

    Areas scale with the square of the map's scale, so the estimate is
    ``sqrt(source tissue px / target tissue px)`` (source pixels per target pixel). The
    tissue's extents along both principal axes must scale alike (within ``agreement``,
    relative): a section half missing or torn changes the area too, but not as a
    magnification does. Returns ``None`` without both masks, when the estimates disagree,
    when the scale is within a factor ``min_ratio`` of 1 (the working levels already share a
    pixel size when the slides state theirs), or when it lies outside
    ``[cfg.scale_min, cfg.scale_max]``.
    """
    scale = tissue_area_scale(target_mask, source_mask)
    if scale is None:
        return None
    if abs(np.log(scale)) < np.log(min_ratio) or not cfg.scale_min <= scale <= cfg.scale_max:
        return None
    assert target_mask is not None and source_mask is not None
    spread_t, spread_s = _spread(target_mask), _spread(source_mask)
    if np.any(spread_t <= 0):
        return None
    if np.any(np.abs(spread_s / spread_t / scale - 1.0) > agreement):
        return None
    return scale


def rotation_search(
    target: np.ndarray,
    source: np.ndarray,
    target_mask: np.ndarray | None,
    source_mask: np.ndarray | None,
    cfg: RigidConfig,
    size: int = 256,
) -> list[RigidResult]:
    """Exhaustive rotation (and mirror) search at ``size`` px, translation by phase correlation.

    Every ``rotation_step_deg`` is tried, then the best angle is refined in 1-degree steps. The
    search runs at scale 1 and, when the tissue areas differ by more than a factor 1.44 and its
    extents scale alike (slides without a stated pixel size scanned at different
    magnifications), also at the scale they imply (:func:`tissue_scale`); ECC refines the
    scale later. Candidates are scored by
    blurred intensity and tissue-mask NCC at ``size`` px. Returns, for each scale and
    mirroring, the unrotated candidate and the best rotated one (when different): blurred
    layouts can prefer a wrong symmetric pose, so the caller decides after refinement.
    """
    f = size / max(target.shape)
    t_small, s_small = _small(target, f), _small(source, f)
    tm_small = None if target_mask is None else _small(target_mask.astype(np.float32), f)
    sm_small = None if source_mask is None else _small(source_mask.astype(np.float32), f)
    ct, cs = _centroid(t_small), _centroid(s_small)

    def evaluate(angle: float, flipped: bool, scale: float) -> tuple[float, np.ndarray]:
        m = rotation_about(angle, ct, cs, scale, s_small.shape[1] if flipped else None)
        warped = warp_affine(s_small, m, t_small.shape)
        shift, _, _ = phase_cross_correlation(t_small, warped, normalization=None)
        # `shift` (dy, dx) moves `warped` onto the target: compose that translation
        m2 = m @ translation(-shift[1], -shift[0])
        return _layout_score_small(t_small, s_small, tm_small, sm_small, m2), m2

    dn = _scale_matrix(f)
    up = np.linalg.inv(dn)
    scales = [1.0]
    implied = tissue_scale(target_mask, source_mask, cfg)
    if implied is not None:
        scales.append(implied)
    found: list[RigidResult] = []
    for scale in scales:
        for flipped in [False, True] if cfg.try_flip else [False]:
            angles = np.arange(0.0, 360.0, cfg.rotation_step_deg)
            scores = [(*evaluate(float(a), flipped, scale), float(a)) for a in angles]
            best = max(scores, key=lambda x: x[0])
            starts = [scores[0]] if best is scores[0] else [scores[0], best]
            for score, m, angle in starts:
                half = cfg.rotation_step_deg / 2
                for a in np.arange(angle - half, angle + half + 1e-9, 1.0):
                    sc, mm = evaluate(float(a), flipped, scale)
                    if sc > score:
                        score, m = sc, mm
                method = "rotation-search" + ("" if scale == 1.0 else f"(scale {scale:.2f})")
                found.append(RigidResult(up @ m @ dn, method, flipped=flipped, score_final=score))
    return found


def _scale_matrix(f: float) -> np.ndarray:
    """Affine from full-size to ``cv2.resize(fx=f)`` pixel coordinates (pixel centres kept)."""
    o = 0.5 * f - 0.5
    return np.array([[f, 0.0, o], [0.0, f, o], [0.0, 0.0, 1.0]])


def _small(img: np.ndarray, f: float, sigma: float = 2.0) -> np.ndarray:
    small = cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(small, (0, 0), sigma)


def _layout_score_small(
    t: np.ndarray, s: np.ndarray, tm: np.ndarray | None, sm: np.ndarray | None, m: np.ndarray
) -> float:
    score = ncc(t, warp_affine(s, m, t.shape))
    if tm is not None and sm is not None:
        score += ncc(tm, warp_affine(sm, m, tm.shape))
    return score


def _centroid(img: np.ndarray) -> tuple[float, float]:
    w = img.astype(np.float64)
    tot = w.sum()
    if tot <= 0:
        return ((img.shape[1] - 1) / 2, (img.shape[0] - 1) / 2)
    yy, xx = np.indices(img.shape)
    return (float((xx * w).sum() / tot), float((yy * w).sum() / tot))


def ecc_refine(
    target: np.ndarray,
    source: np.ndarray,
    matrix: np.ndarray,
    cfg: RigidConfig,
    sizes: tuple[int, ...] = (128, 256, 512),
    target_data: np.ndarray | None = None,
    source_data: np.ndarray | None = None,
) -> np.ndarray:
    """Refine a target->source affine by ECC, coarse to fine over ``sizes`` px.

    Images are blurred (sigma 1 px at each size). A step is kept only when it converges, stays
    plausible and raises the NCC at that size; the input matrix comes back when none does.
    With ``cfg.model == "similarity"`` each ECC affine is projected to the nearest similarity
    (OpenCV's Euclidean ECC motion has no scale). ``target_data``, ``source_data``: (y, x)
    bool masks of the pixels holding data (None: all do); with either, ECC and the NCC see
    only the :func:`overlap` of the data (padding's straight edges would pull the fit).
    """
    center = ((target.shape[1] - 1) / 2, (target.shape[0] - 1) / 2)
    for size in sizes:
        f = min(1.0, size / max(target.shape))
        t, s = _small(target, f, 1.0), _small(source, f, 1.0)
        sd = _scale_matrix(f)
        m_small = sd @ matrix @ np.linalg.inv(sd)
        warp = np.ascontiguousarray(m_small[:2], dtype=np.float32)
        t_data, s_data = data_mask(target_data, f), data_mask(source_data, f)
        try:
            warp = _ecc(t, s, warp, t_data, s_data)
        except cv2.error:
            continue
        cand = np.linalg.inv(sd) @ as3x3(warp) @ sd
        if cfg.model == "similarity":
            cand = nearest_similarity(cand, center)
        before = _agreement(t, s, m_small, t_data, s_data)
        after = _agreement(t, s, sd @ cand @ np.linalg.inv(sd), t_data, s_data)
        if after > before and plausibility(cand, cfg) is None:
            matrix = cand
    return matrix


def _ecc(
    t: np.ndarray,
    s: np.ndarray,
    warp: np.ndarray,
    t_data: np.ndarray | None,
    s_data: np.ndarray | None,
) -> np.ndarray:
    """One OpenCV ECC affine fit (2x3 float32, target->source at this size). With a data
    mask for either image ((y, x) bool, None: all data) only pixels holding data in both
    count."""
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 1e-5)
    if t_data is None and s_data is None:
        return cv2.findTransformECC(t, s, warp, cv2.MOTION_AFFINE, criteria, None, 1)[1]
    t_mask = np.ones(t.shape, np.uint8) if t_data is None else t_data.astype(np.uint8)
    s_mask = np.ones(s.shape, np.uint8) if s_data is None else s_data.astype(np.uint8)
    return cv2.findTransformECCWithMask(t, s, t_mask, s_mask, warp, cv2.MOTION_AFFINE, criteria, 1)[
        1
    ]


def _agreement(
    t: np.ndarray,
    s: np.ndarray,
    m: np.ndarray,
    t_data: np.ndarray | None,
    s_data: np.ndarray | None,
) -> float:
    """NCC of ``t`` and ``s`` warped by ``m``: over the :func:`overlap` of their data when
    either has a data mask, else over the whole of ``t`` (outside the source: 0)."""
    if t_data is None and s_data is None:
        return ncc(t, warp_affine(s, m, t.shape))
    return ncc(t, warp_affine(s, m, t.shape), overlap(t.shape, s.shape, m, 3, t_data, s_data))


def _inner(shape: tuple[int, ...], margin: int = 3) -> np.ndarray:
    """(y, x) mask of the pixels at least ``margin`` px from the image's edge."""
    mask = np.zeros(shape[:2], bool)
    mask[margin : shape[0] - margin, margin : shape[1] - margin] = True
    return mask


def overlap(
    target_shape: tuple[int, ...],
    source_shape: tuple[int, ...],
    matrix: np.ndarray,
    margin: int = 3,
    target_data: np.ndarray | None = None,
    source_data: np.ndarray | None = None,
) -> np.ndarray:
    """(y, x) mask of the target pixels at least ``margin`` px from the target's edge that
    the target->source affine ``matrix`` maps at least ``margin`` px inside the source: where
    both images have data (:func:`selection_score` compares only these). ``target_data`` and
    ``source_data``: (y, x) bool masks of each image's pixels that hold data (None: all do;
    see :func:`data_mask`)."""
    inner_t, inner_s = _inner(target_shape, margin), _inner(source_shape, margin)
    if target_data is not None:
        inner_t &= target_data
    if source_data is not None:
        inner_s &= source_data
    return inner_t & (warp_affine(inner_s.astype(np.uint8), matrix, target_shape[:2]) > 0)


def data_mask(data: np.ndarray | None, f: float, margin: int = 3) -> np.ndarray | None:
    """A (y, x) bool mask of the pixels holding data (``data``: False on padding and ink, see
    :func:`wsireg_flow.tissue.data_region`), resized by ``f`` like :func:`_small` and shrunk
    by ``margin`` px (the blur of the resized images spreads padding into its neighbours).
    None stays None (all data)."""
    if data is None:
        return None
    small = cv2.resize(data.astype(np.float32), None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    return cv2.erode((small > 0.5).astype(np.uint8), kernel, borderValue=1) > 0


def selection_score(
    target: np.ndarray,
    source: np.ndarray,
    target_mask: np.ndarray | None,
    source_mask: np.ndarray | None,
    matrix: np.ndarray,
    target_data: np.ndarray | None = None,
    source_data: np.ndarray | None = None,
) -> float:
    """Score used to choose among refined candidates (higher is better).

    Intensity NCC at 256 px (blur 2) and at 512 px (blur 1) plus half the tissue-mask NCC,
    each over the :func:`overlap` of the two images only, less a penalty when that overlap
    holds less than :data:`FULL_COVERAGE` of either image's tissue
    (:func:`tissue_coverage`). Masks alone are fooled by blob-like tissue (a 90-degree turn of
    a round section overlaps well); finer intensity correlation is not, while the mask term
    still breaks ties on symmetric outlines (measured on the bundled ANHIR pairs in both
    directions). Over the whole target frame
    (beyond the source's edge a fill of glass) a source showing part of the target scored
    best stretched over all of it: a correct partial overlap counted the target's tissue
    outside the source as a mismatch. For the same reason the overlap leaves out padding
    (``target_data``, ``source_data``: (y, x) bool, False where an image holds no data, e.g.
    the white corners of a rotated crop; None: data everywhere).
    """
    score = 0.0
    for size, sigma in ((256, 2.0), (512, 1.0)):
        f = min(1.0, size / max(target.shape))
        sd = _scale_matrix(f)
        t, s = _small(target, f, sigma), _small(source, f, sigma)
        m = sd @ matrix @ np.linalg.inv(sd)
        both = overlap(t.shape, s.shape, m, 3, data_mask(target_data, f), data_mask(source_data, f))
        score += ncc(t, warp_affine(s, m, t.shape), both)
    if target_mask is not None and source_mask is not None:
        f = 256 / max(target.shape)
        sd = _scale_matrix(f)
        tm = _small(target_mask.astype(np.float32), f)
        sm = _small(source_mask.astype(np.float32), f)
        m = sd @ matrix @ np.linalg.inv(sd)
        t_data, s_data = data_mask(target_data, f), data_mask(source_data, f)
        both = overlap(tm.shape, sm.shape, m, 3, t_data, s_data)
        score += 0.5 * ncc(tm, warp_affine(sm, m, tm.shape), both)
        coverage = tissue_coverage(tm > 0.5, sm > 0.5, m, both, t_data)
        if coverage is not None:  # a penalty: scaling would favour a poor negative score
            score -= COVERAGE_PENALTY * max(0.0, 1.0 - coverage / FULL_COVERAGE)
    return score


# the share of one image's tissue an overlap must hold to count fully, and the score lost by
# an overlap holding none: the whole range of :func:`selection_score` without it (-2.5..2.5),
# since a correlation over a small overlap can be high by chance
FULL_COVERAGE = 0.8
COVERAGE_PENALTY = 5.0


def tissue_coverage(
    target_mask: np.ndarray,
    source_mask: np.ndarray,
    matrix: np.ndarray,
    both: np.ndarray | None = None,
    target_data: np.ndarray | None = None,
) -> float | None:
    """The larger of the shares of target tissue and of source tissue that lie in the
    :func:`overlap` of the two images under the target->source affine ``matrix`` (masks (y, x)
    bool). 1 when one image's tissue lies wholly inside the other, as when a source shows a
    part of the target; small for an alignment that overlaps the images only at an edge; 0
    for a singular matrix. None when a mask is empty (no tissue to cover). ``both``: that
    overlap, when the caller has it already; ``target_data``: (y, x) bool, the target's pixels
    holding data (None: all; the source's are in ``both``)."""
    if not target_mask.any() or not source_mask.any():
        return None
    if abs(np.linalg.det(matrix[:2, :2])) < 1e-9:
        return 0.0
    if both is None:
        both = overlap(target_mask.shape, source_mask.shape, matrix, 3, target_data)
    inner_t = _inner(target_mask.shape)
    if target_data is not None:
        inner_t &= target_data
    inside = warp_affine(inner_t.astype(np.uint8), np.linalg.inv(matrix), source_mask.shape[:2]) > 0
    shares = [
        (target_mask & both).sum() / target_mask.sum(),
        (source_mask & inside).sum() / source_mask.sum(),
    ]
    return float(max(shares))


SCALE_NOTE = "the tissue areas imply a scale of"


def _rotated(matrix: np.ndarray) -> float:
    return float(abs(decompose(matrix)["rotation_deg"]) > 20.0)


def coarse_alignment(
    target: np.ndarray,
    source: np.ndarray,
    target_mask: np.ndarray | None,
    source_mask: np.ndarray | None,
    cfg: RigidConfig,
    target_data: np.ndarray | None = None,
    source_data: np.ndarray | None = None,
) -> RigidResult:
    """Coarse target->source affine at the working level (see module docstring).

    Candidates (feature fit when plausible, rotation search always) are refined by ECC and the
    one with the best :func:`selection_score` wins. ``target_data``, ``source_data``: (y, x)
    bool masks of the pixels holding data (False on padding and ink; None: all hold data),
    which ECC and the score respect; the rotation search's blurred layouts do not use them.

    Raises
    ------
    RegistrationError
        When no candidate is plausible.
    """
    candidates: list[RigidResult] = []
    notes: list[str] = []
    implied = tissue_area_scale(target_mask, source_mask)
    if implied is not None and not cfg.scale_min <= implied <= cfg.scale_max:
        notes.append(
            f"{SCALE_NOTE} {implied:.2f}, outside rigid.scale_min..scale_max "
            f"[{cfg.scale_min:g}, {cfg.scale_max:g}]: if the slides were scanned at different "
            "resolutions, state their pixel sizes (ingest --pixel-size) or widen the range"
        )
    feat = feature_alignment(target, source, target_mask, source_mask, cfg)
    if feat is not None and feat.method != "rejected":
        candidates.append(feat)
    elif feat is not None:
        notes.extend(feat.notes)
    candidates.extend(rotation_search(target, source, target_mask, source_mask, cfg))
    data = {"target_data": target_data, "source_data": source_data}
    identity = selection_score(target, source, target_mask, source_mask, np.eye(3), **data)
    for c in candidates:
        if cfg.refine == "ecc":
            refined = ecc_refine(target, source, c.matrix, cfg, **data)
            if refined is not c.matrix:
                c.matrix, c.method = refined, c.method + "+ecc"
        c.score_initial = identity
        c.score_final = selection_score(target, source, target_mask, source_mask, c.matrix, **data)
    ok = [c for c in candidates if plausibility(c.matrix, cfg) is None]
    if not ok:
        reasons = "; ".join(str(plausibility(c.matrix, cfg)) for c in candidates)
        raise RegistrationError(f"coarse alignment is implausible: {reasons}")
    # the simplest hypothesis wins unless clearly beaten (symmetric tissue fools blurred scores)
    best = max(ok, key=lambda c: c.score_final - 0.05 * c.flipped - 0.05 * _rotated(c.matrix))
    best.notes[:0] = notes + [
        f"{c.method}: score {c.score_final:.3f}" for c in candidates if c is not best
    ]
    return best
