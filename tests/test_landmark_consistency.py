"""The landmark-consistency diagnostic finds a known local misalignment and a smooth residual."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from benchmarks_anhir.landmark_consistency import rematch_shifts, smooth_residual_prediction


def _texture(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), 2.0).astype(np.float32)


def test_rematch_recovers_a_known_shift() -> None:
    target = _texture((300, 400))
    dx, dy = 3, -2
    # warped content sits (dx, dy) px away from where the target has it
    warped = np.roll(target, (dy, dx), axis=(0, 1))
    pts = np.array([(x, y) for x in (60, 150, 250, 340) for y in (50, 150, 250)], float)
    shifts, kept = rematch_shifts(target, warped, pts, radius=15, search=6)
    assert kept.tolist() == list(range(len(pts)))
    np.testing.assert_array_equal(shifts, np.tile([dx, dy], (len(pts), 1)))
    # points whose search window leaves the image are skipped, not clipped
    _, kept = rematch_shifts(target, warped, np.array([[5.0, 5.0], [200.0, 150.0]]), 15, 6)
    assert kept.tolist() == [1]


def test_smooth_residual_is_predicted_and_noise_is_not() -> None:
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, 800, size=(80, 2))
    smooth = np.column_stack([3 + pts[:, 0] / 200, -2 + pts[:, 1] / 300])  # px
    left = np.linalg.norm(smooth - smooth_residual_prediction(pts, smooth, 60.0), axis=1)
    assert np.median(left) < 0.3 * np.median(np.linalg.norm(smooth, axis=1))
    noise = rng.normal(0, 4, size=(80, 2))
    left = np.linalg.norm(noise - smooth_residual_prediction(pts, noise, 60.0), axis=1)
    assert np.median(left) > 0.9 * np.median(np.linalg.norm(noise, axis=1))
