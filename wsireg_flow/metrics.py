"""ANHIR registration metrics: TRE, relative TRE, robustness and leaderboard aggregates.

Conventions (ANHIR, see ``ANHIR.md``): points are ``(x, y)`` in pixels, ``x`` = column,
``y`` = row, origin at the top-left. The SOURCE image is registered onto the TARGET image; the
official output is the source landmarks mapped into the target frame ("warped source"), scored
against the target landmarks:

* ``TRE_i = ||warped_source_i - target_i||_2`` in target pixels;
* ``rTRE_i = TRE_i / d`` with ``d`` the diagonal of the TARGET image in pixels;
* initial error ``||source_i - target_i||_2`` (no registration);
* robustness = fraction of landmarks whose TRE is strictly smaller than the initial error;
* a missing pair or a NaN landmark counts as unregistered: initial error, not robust. Nothing
  is ever dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from wsireg_flow.landmarks import paired

__all__ = ["PairScore", "aggregate", "score_pair", "tre"]


def _as_points(points: object, name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) with columns (x, y), got {arr.shape}")
    return arr


def tre(warped: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Target registration error: Euclidean distance between corresponding points.

    Parameters
    ----------
    warped, reference
        Shape ``(N, 2)`` arrays of ``(x, y)`` pixel coordinates in the same image frame
        (``x`` = column, ``y`` = row, origin top-left). Row ``i`` of one matches row ``i`` of
        the other.

    Returns
    -------
    numpy.ndarray
        Shape ``(N,)``, float64, distances in pixels. A row with a NaN gives NaN.

    Raises
    ------
    ValueError
        If the arrays are not ``(N, 2)`` or their shapes differ.
    """
    w = _as_points(warped, "warped")
    r = _as_points(reference, "reference")
    if w.shape != r.shape:
        raise ValueError(f"warped {w.shape} and reference {r.shape} must have the same shape")
    diff = w - r
    return np.hypot(diff[:, 0], diff[:, 1])


@dataclass(frozen=True)
class PairScore:
    """ANHIR scores of one image pair. All ``*_rtre`` values are relative TRE (TRE in pixels
    divided by the target image diagonal in pixels), so they are dimensionless.

    Attributes
    ----------
    n_landmarks
        Number of scored landmarks, ``min(N_target, N_source)``.
    n_unregistered
        Landmarks counted at their initial error because the warped point was missing, NaN or
        infinite (all of them when the pair is not registered).
    registered
        ``False`` when the pair has no warped landmarks at all (missing / failed pair).
    initial_median_rtre, initial_mean_rtre, initial_max_rtre
        Statistics of ``||source_i - target_i|| / diagonal`` (before registration).
    median_rtre, mean_rtre, max_rtre
        Statistics of ``||warped_source_i - target_i|| / diagonal`` after registration, with
        unregistered landmarks at their initial error.
    robustness
        Fraction of landmarks whose final TRE is strictly smaller than the initial one, in
        ``[0, 1]``.
    """

    n_landmarks: int
    n_unregistered: int
    registered: bool
    initial_median_rtre: float
    initial_mean_rtre: float
    initial_max_rtre: float
    median_rtre: float
    mean_rtre: float
    max_rtre: float
    robustness: float

    def to_dict(self) -> dict[str, float | int | bool]:
        """Return the fields as a plain ``{name: value}`` dict (e.g. for JSON or CSV)."""
        return asdict(self)


def _rows_padded(points: np.ndarray, n: int) -> np.ndarray:
    """First ``n`` rows of ``points``; missing rows are NaN (counted as unregistered)."""
    out = np.full((n, 2), np.nan)
    m = min(n, len(points))
    out[:m] = points[:m]
    return out


def score_pair(
    target: np.ndarray,
    source: np.ndarray,
    warped_source: np.ndarray | None,
    diagonal: float,
) -> PairScore:
    """Score one pair the official ANHIR way (warped source landmarks vs target landmarks).

    Parameters
    ----------
    target
        Target landmarks, shape ``(N_t, 2)``, ``(x, y)`` pixels of the target image (``x`` =
        column, ``y`` = row, origin top-left). Must be finite.
    source
        Source landmarks, shape ``(N_s, 2)``, ``(x, y)`` pixels of the source image. Must be
        finite. Only the first ``n = min(N_t, N_s)`` rows of target and source are used.
    warped_source
        The source landmarks mapped into the target frame, ``(x, y)`` target pixels; row ``i``
        is source row ``i``. Rows beyond ``n`` are ignored; missing rows and NaN/infinite rows
        count as unregistered (initial error, not robust). ``None`` means the whole pair is
        missing/failed: final error = initial error, robustness 0, ``registered=False``.
    diagonal
        Diagonal of the TARGET image in pixels (``sqrt(H**2 + W**2)``); must be positive.

    Returns
    -------
    PairScore

    Raises
    ------
    ValueError
        On wrong array shapes, no landmarks to score, NaN in the target/source landmarks, or a
        non-positive diagonal.
    """
    if not (math.isfinite(diagonal) and diagonal > 0):
        raise ValueError(f"diagonal must be a positive number of pixels, got {diagonal!r}")
    t, s = paired(target, source)
    n = len(t)
    if n == 0:
        raise ValueError("no landmarks to score (target or source is empty)")
    if not (np.isfinite(t).all() and np.isfinite(s).all()):
        raise ValueError("target and source landmarks must be finite (reference has NaN/inf)")

    initial = tre(s, t)
    if warped_source is None:
        final = initial
        unregistered = np.ones(n, dtype=bool)
    else:
        w = _rows_padded(_as_points(warped_source, "warped_source"), n)
        measured = tre(w, t)
        unregistered = ~np.isfinite(measured)
        final = np.where(unregistered, initial, measured)
    robust = (final < initial) & ~unregistered

    initial_r = initial / diagonal
    final_r = final / diagonal
    return PairScore(
        n_landmarks=n,
        n_unregistered=int(unregistered.sum()),
        registered=warped_source is not None,
        initial_median_rtre=float(np.median(initial_r)),
        initial_mean_rtre=float(np.mean(initial_r)),
        initial_max_rtre=float(np.max(initial_r)),
        median_rtre=float(np.median(final_r)),
        mean_rtre=float(np.mean(final_r)),
        max_rtre=float(np.max(final_r)),
        robustness=float(np.mean(robust)),
    )


def aggregate(scores: Sequence[PairScore]) -> dict[str, float | int]:
    """ANHIR leaderboard aggregates over pairs (every pair counts, failed ones included).

    Parameters
    ----------
    scores
        One :class:`PairScore` per pair.

    Returns
    -------
    dict
        ``AMrTRE`` mean over pairs of the per-pair median rTRE; ``MMrTRE`` median over pairs of
        the per-pair median rTRE; ``AArTRE`` mean of the per-pair mean rTRE; ``AMxrTRE`` mean of
        the per-pair max rTRE; ``average_robustness``; the same four rTRE aggregates of the
        initial (unregistered) errors as ``initial_AMrTRE``, ``initial_MMrTRE``,
        ``initial_AArTRE``, ``initial_AMxrTRE``; ``pairs`` (count) and ``failed_pairs``
        (pairs with ``registered=False``). rTRE values are dimensionless (pixels / pixels).

    Raises
    ------
    ValueError
        If ``scores`` is empty.
    """
    scores = list(scores)
    if not scores:
        raise ValueError("cannot aggregate an empty list of pair scores")

    def column(name: str) -> np.ndarray:
        return np.array([getattr(score, name) for score in scores], dtype=np.float64)

    result: dict[str, float | int] = {
        "pairs": len(scores),
        "failed_pairs": sum(not score.registered for score in scores),
    }
    for prefix in ("", "initial_"):
        medians = column(f"{prefix}median_rtre")
        result[f"{prefix}AMrTRE"] = float(np.mean(medians))
        result[f"{prefix}MMrTRE"] = float(np.median(medians))
        result[f"{prefix}AArTRE"] = float(np.mean(column(f"{prefix}mean_rtre")))
        result[f"{prefix}AMxrTRE"] = float(np.mean(column(f"{prefix}max_rtre")))
    result["average_robustness"] = float(np.mean(column("robustness")))
    return result
