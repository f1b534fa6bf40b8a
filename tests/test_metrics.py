"""Tests for wsireg_flow.metrics, with expected numbers worked out by hand in the comments."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from wsireg_flow.landmarks import read_landmarks, read_pair_table, resolve_path
from wsireg_flow.metrics import PairScore, aggregate, score_pair, tre

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "anhir-sample"
NAN = math.nan

# Toy pair, (x, y) pixels. Offsets source - target are 3-4-5, 6-8-10, 0-5-5 and 5-12-13 triangles.
TARGET = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [20.0, 20.0]])
SOURCE = np.array([[3.0, 4.0], [16.0, 8.0], [0.0, 15.0], [25.0, 32.0]])
# initial TRE = [5, 10, 5, 13]
WARPED = np.array([[0.0, 0.0], [13.0, 4.0], [0.0, 23.0], [NAN, NAN]])
# final TRE = [0, 5 (3-4-5), 13 (worse: 5-12-13 from (0, 10)), NaN -> initial 13]


# ------------------------------------------------------------------ tre


def test_tre_three_four_five() -> None:
    np.testing.assert_array_equal(tre([[3.0, 4.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, 1.0]]), [5, 0])


def test_tre_toy_and_nan_row() -> None:
    distances = tre(WARPED, TARGET)
    np.testing.assert_array_equal(distances[:3], [0.0, 5.0, 13.0])
    assert np.isnan(distances[3])
    np.testing.assert_array_equal(tre(SOURCE, TARGET), [5.0, 10.0, 5.0, 13.0])


def test_tre_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same shape"):
        tre(np.zeros((3, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        tre(np.zeros((3, 3)), np.zeros((3, 3)))


# ------------------------------------------------------------------ score_pair


def test_score_pair_toy_by_hand() -> None:
    score = score_pair(TARGET, SOURCE, WARPED, diagonal=100.0)
    assert score.n_landmarks == 4
    assert score.n_unregistered == 1
    assert score.registered is True
    # initial rTRE = [0.05, 0.10, 0.05, 0.13]
    assert score.initial_median_rtre == pytest.approx(0.075)  # (0.05 + 0.10) / 2
    assert score.initial_mean_rtre == pytest.approx(0.0825)  # 0.33 / 4
    assert score.initial_max_rtre == pytest.approx(0.13)
    # final rTRE = [0, 0.05, 0.13, 0.13 (NaN landmark counted at its initial error)]
    assert score.median_rtre == pytest.approx(0.09)  # (0.05 + 0.13) / 2
    assert score.mean_rtre == pytest.approx(0.0775)  # 0.31 / 4
    assert score.max_rtre == pytest.approx(0.13)
    # robust: 0 < 5 yes, 5 < 10 yes, 13 < 5 no, NaN no -> 2 / 4
    assert score.robustness == 0.5


def test_score_pair_equal_error_is_not_robust() -> None:
    target = [[0.0, 0.0], [0.0, 0.0]]
    source = [[3.0, 4.0], [6.0, 8.0]]  # initial 5, 10
    warped = [[4.0, 3.0], [0.0, 6.0]]  # final 5 (equal, not strictly smaller), 6 (< 10)
    score = score_pair(target, source, warped, diagonal=10.0)
    assert score.robustness == 0.5
    assert score.median_rtre == pytest.approx(0.55)  # (0.5 + 0.6) / 2
    assert score.initial_median_rtre == pytest.approx(0.75)  # (0.5 + 1.0) / 2


def test_score_pair_perfect_registration() -> None:
    score = score_pair(TARGET, SOURCE, TARGET.copy(), diagonal=100.0)
    assert score.median_rtre == score.mean_rtre == score.max_rtre == 0.0
    assert score.robustness == 1.0
    assert score.n_unregistered == 0


def test_score_pair_missing_pair_counts_initial_error() -> None:
    score = score_pair(TARGET, SOURCE, None, diagonal=100.0)
    assert score.registered is False
    assert score.n_unregistered == 4
    assert score.robustness == 0.0
    assert score.median_rtre == score.initial_median_rtre == pytest.approx(0.075)
    assert score.mean_rtre == score.initial_mean_rtre == pytest.approx(0.0825)
    assert score.max_rtre == score.initial_max_rtre == pytest.approx(0.13)


def test_score_pair_all_nan_warped_is_registered_but_unregistered_landmarks() -> None:
    score = score_pair(TARGET, SOURCE, np.full((4, 2), NAN), diagonal=100.0)
    assert score.registered is True
    assert score.n_unregistered == 4
    assert score.robustness == 0.0
    assert score.median_rtre == pytest.approx(0.075)


def test_score_pair_truncates_to_min_rows_and_pads_short_warped() -> None:
    target = [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [100.0, 100.0], [200.0, 200.0]]  # 5 points
    source = [[3.0, 4.0], [6.0, 8.0], [0.0, 1.0]]  # 3 points; initial TRE = [5, 10, 1]
    # warped has only 2 rows: the third landmark is missing -> initial error 1, not robust
    short = score_pair(target, source, [[0.0, 0.0], [0.0, 0.0]], diagonal=10.0)
    assert short.n_landmarks == 3
    assert short.n_unregistered == 1
    assert short.robustness == pytest.approx(2 / 3)
    assert short.median_rtre == 0.0  # final rTRE = [0, 0, 0.1]
    assert short.mean_rtre == pytest.approx(1 / 30)
    assert short.max_rtre == pytest.approx(0.1)
    # warped rows beyond min(N) are ignored
    long = score_pair(target, source, [[0.0, 0.0]] * 3 + [[999.0, 999.0]], diagonal=10.0)
    assert long.n_landmarks == 3
    assert long.max_rtre == 0.0
    assert long.robustness == 1.0


def test_score_pair_real_rat_kidney_uses_69_of_71() -> None:
    target = read_landmarks(SAMPLE / "rat-kidney_/scale-5pc/Rat-Kidney_HE.csv")
    source = read_landmarks(SAMPLE / "rat-kidney_/scale-5pc/Rat-Kidney_PanCytokeratin.csv")
    # first landmark: target (63, 309), source (62, 290) -> sqrt(1 + 19^2) = sqrt(362)
    assert tre(source[:1], target[:1])[0] == pytest.approx(math.sqrt(362))
    score = score_pair(target, source, source, diagonal=1405.1)  # identity: nothing moved
    assert score.n_landmarks == 69
    assert score.registered is True
    assert score.robustness == 0.0  # equal to the initial error is not an improvement
    assert score.median_rtre == score.initial_median_rtre


def test_score_pair_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="diagonal"):
        score_pair(TARGET, SOURCE, WARPED, diagonal=0.0)
    with pytest.raises(ValueError, match="diagonal"):
        score_pair(TARGET, SOURCE, WARPED, diagonal=NAN)
    with pytest.raises(ValueError, match="finite"):
        score_pair([[NAN, 0.0]], [[1.0, 1.0]], None, diagonal=10.0)
    with pytest.raises(ValueError, match="no landmarks"):
        score_pair(np.zeros((0, 2)), SOURCE, None, diagonal=10.0)
    with pytest.raises(ValueError, match="warped_source"):
        score_pair(TARGET, SOURCE, np.zeros((4, 3)), diagonal=10.0)


def test_pair_score_to_dict() -> None:
    data = score_pair(TARGET, SOURCE, WARPED, diagonal=100.0).to_dict()
    assert data["n_landmarks"] == 4
    assert data["robustness"] == 0.5
    assert set(data) == {
        "n_landmarks",
        "n_unregistered",
        "registered",
        "initial_median_rtre",
        "initial_mean_rtre",
        "initial_max_rtre",
        "median_rtre",
        "mean_rtre",
        "max_rtre",
        "robustness",
    }


# ------------------------------------------------------------------ aggregate


def _score(
    median: float,
    mean: float,
    maximum: float,
    robustness: float,
    initial: tuple[float, float, float],
    registered: bool = True,
) -> PairScore:
    return PairScore(
        n_landmarks=10,
        n_unregistered=0 if registered else 10,
        registered=registered,
        initial_median_rtre=initial[0],
        initial_mean_rtre=initial[1],
        initial_max_rtre=initial[2],
        median_rtre=median,
        mean_rtre=mean,
        max_rtre=maximum,
        robustness=robustness,
    )


def test_aggregate_three_pairs_by_hand() -> None:
    scores = [
        _score(0.01, 0.02, 0.05, 1.0, (0.04, 0.05, 0.10)),
        _score(0.02, 0.03, 0.10, 0.5, (0.06, 0.07, 0.20)),
        _score(0.06, 0.07, 0.15, 0.0, (0.06, 0.07, 0.15), registered=False),
    ]
    result = aggregate(scores)
    assert set(result) == {
        "AMrTRE",
        "MMrTRE",
        "AArTRE",
        "AMxrTRE",
        "average_robustness",
        "pairs",
        "failed_pairs",
        "initial_AMrTRE",
        "initial_MMrTRE",
        "initial_AArTRE",
        "initial_AMxrTRE",
    }
    assert result["pairs"] == 3
    assert result["failed_pairs"] == 1
    assert result["AMrTRE"] == pytest.approx(0.03)  # (0.01 + 0.02 + 0.06) / 3
    assert result["MMrTRE"] == pytest.approx(0.02)
    assert result["AArTRE"] == pytest.approx(0.04)  # (0.02 + 0.03 + 0.07) / 3
    assert result["AMxrTRE"] == pytest.approx(0.10)  # (0.05 + 0.10 + 0.15) / 3
    assert result["average_robustness"] == pytest.approx(0.5)
    assert result["initial_AMrTRE"] == pytest.approx(0.16 / 3)
    assert result["initial_MMrTRE"] == pytest.approx(0.06)
    assert result["initial_AArTRE"] == pytest.approx(0.19 / 3)
    assert result["initial_AMxrTRE"] == pytest.approx(0.15)


def test_aggregate_end_to_end_with_missing_pair() -> None:
    registered = score_pair(TARGET, SOURCE, WARPED, diagonal=100.0)  # median rTRE 0.09
    missing = score_pair([[0.0, 0.0]], [[3.0, 4.0]], None, diagonal=50.0)  # 5 / 50 = 0.1
    result = aggregate([registered, missing])
    assert result["AMrTRE"] == pytest.approx(0.095)
    assert result["MMrTRE"] == pytest.approx(0.095)  # median of two values = their mean
    assert result["initial_AMrTRE"] == pytest.approx((0.075 + 0.1) / 2)
    assert result["average_robustness"] == pytest.approx(0.25)  # (0.5 + 0) / 2
    assert result["failed_pairs"] == 1


def test_aggregate_empty() -> None:
    with pytest.raises(ValueError, match="empty"):
        aggregate([])


# ------------------------------------------------------------------ real sample


def test_unregistered_amrtre_of_the_sample() -> None:
    root = SAMPLE
    scores = []
    for pair in read_pair_table(root / "dataset.csv"):
        target = read_landmarks(resolve_path(root, pair.target_landmarks))
        source = read_landmarks(resolve_path(root, pair.source_landmarks))
        assert pair.image_diagonal is not None
        scores.append(score_pair(target, source, None, pair.image_diagonal))
    result = aggregate(scores)
    assert result["pairs"] == 8
    assert result["failed_pairs"] == 8
    assert result["average_robustness"] == 0.0
    assert result["AMrTRE"] == result["initial_AMrTRE"]
    assert result["AMrTRE"] == pytest.approx(0.049, abs=0.003)  # ANHIR.md: "about 0.049"
    assert result["AMrTRE"] == pytest.approx(0.0490680167, rel=1e-8)  # regression pin
