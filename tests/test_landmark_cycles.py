"""The cycle analysis splits pair errors into per-image offsets and per-pair residuals."""

from __future__ import annotations

import numpy as np

from benchmarks_anhir.landmark_cycles import (
    correction_slope,
    offset_only_rtre,
    solve_image_offsets,
)

PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # ANHIR pairs every image of a set


def _rotation(deg: float, scale: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _errors(offsets: np.ndarray, linear: np.ndarray) -> np.ndarray:
    """e_jk = L_jk^-1 n_k - n_j for every pair (the model, without pair error)."""
    return np.stack(
        [offsets[k] @ np.linalg.inv(linear[p]).T - offsets[j] for p, (j, k) in enumerate(PAIRS)]
    )


def test_consistent_errors_are_explained_by_image_offsets() -> None:
    rng = np.random.default_rng(0)
    offsets = rng.normal(0, 3, size=(4, 80, 2))
    offsets -= offsets.mean(axis=0)  # the gauge the solver uses
    angles, scales = [5, -20, 90, 3, 0, 30], [1.0, 1.1, 0.9, 1.02, 1.0, 1.05]
    linear = np.stack([_rotation(a, s) for a, s in zip(angles, scales, strict=True)])
    found, residual = solve_image_offsets(PAIRS, _errors(offsets, linear), linear, 4)
    # without rotation the gauge is exact; with rotated frames the sum-zero gauge differs a
    # little from the one the offsets were drawn in, but the residual is still zero
    assert np.abs(residual).max() < 1e-9
    same = np.stack([np.eye(2)] * 6)
    found, residual = solve_image_offsets(PAIRS, _errors(offsets, same), same, 4)
    np.testing.assert_allclose(found, offsets, atol=1e-9)
    assert np.abs(residual).max() < 1e-9


def test_independent_pair_errors_are_explained_only_by_chance() -> None:
    rng = np.random.default_rng(1)
    errors = rng.normal(0, 4, size=(6, 2000, 2))
    same = np.stack([np.eye(2)] * 6)
    _, residual = solve_image_offsets(PAIRS, errors, same, 4)
    explained = 1 - (residual**2).sum() / (errors**2).sum()
    assert abs(explained - 3 / 6) < 0.02  # (K - 1) / P


def test_mixed_errors_leave_the_pair_part() -> None:
    rng = np.random.default_rng(2)
    offsets = rng.normal(0, 4, size=(4, 500, 2))
    pair_error = rng.normal(0, 1, size=(6, 500, 2))
    same = np.stack([np.eye(2)] * 6)
    _, residual = solve_image_offsets(PAIRS, _errors(offsets, same) + pair_error, same, 4)
    # the residual is the pair error projected off the offsets' span: half its energy here
    ratio = (residual**2).sum() / (pair_error**2).sum()
    assert abs(ratio - 0.5) < 0.05


def test_second_annotator_slope_tells_annotation_error_from_deformation() -> None:
    rng = np.random.default_rng(3)
    n = rng.normal(0, 4, size=(400, 2))  # what the registrations see as this image's offset
    second_noise = rng.normal(0, 2, size=(400, 2))
    # annotation error: the first annotator put the points off by n, the second did not
    s = correction_slope(n, second_noise - n)
    assert -1.1 < s["slope_x"] < -0.9 and -1.1 < s["slope_y"] < -0.9
    assert s["corr_x"] < -0.8
    # deformation: both annotators clicked the same (deformed) tissue, so no correction
    s = correction_slope(n, second_noise)
    assert abs(s["slope_x"]) < 0.1 and abs(s["slope_y"]) < 0.1


def test_offset_only_score_is_the_error_when_offsets_explain_it_and_lower_when_not() -> None:
    rng = np.random.default_rng(4)
    offsets = rng.normal(0, 3, size=(4, 400, 2))
    same = np.stack([np.eye(2)] * 6)
    diagonals = [1000.0] * 6
    consistent = _errors(offsets, same)
    _, residual = solve_image_offsets(PAIRS, consistent, same, 4)
    full = np.median(np.linalg.norm(consistent, axis=2), axis=1) / 1000.0
    np.testing.assert_allclose(offset_only_rtre(consistent - residual, diagonals), full, atol=1e-12)
    # independent pair errors: the offsets keep only part of them, so the score drops
    independent = rng.normal(0, 3, size=(6, 400, 2))
    _, residual = solve_image_offsets(PAIRS, independent, same, 4)
    kept = offset_only_rtre(independent - residual, diagonals)
    whole = np.median(np.linalg.norm(independent, axis=2), axis=1) / 1000.0
    assert np.all(kept < 0.85 * whole)
    # the diagonal divides: twice the diagonal, half the rTRE
    np.testing.assert_allclose(offset_only_rtre(consistent, [2000.0] * 6), full / 2)
