"""DeLong's AUC variance and test against scikit-learn and a brute-force DeLong et al. (1988)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from endodistill.evaluate.delong import (
    delong_auc_ci,
    delong_covariance,
    delong_test,
    structural_components,
)


def _brute_force(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """O(m*n) structural components straight from DeLong et al. 1988 (Heaviside kernel, 1/2 on ties)."""
    x = scores[:, labels == 1]  # (K, m) positives
    y = scores[:, labels == 0]  # (K, n) negatives
    k, m = x.shape
    n = y.shape[1]
    v10 = np.zeros((k, m))
    v01 = np.zeros((k, n))
    for r in range(k):
        for i in range(m):
            for j in range(n):
                psi = 1.0 if x[r, i] > y[r, j] else (0.5 if x[r, i] == y[r, j] else 0.0)
                v10[r, i] += psi / n
                v01[r, j] += psi / m
    auc = v10.mean(axis=1)
    s10 = np.zeros((k, k))
    s01 = np.zeros((k, k))
    for r in range(k):
        for s in range(k):
            s10[r, s] = ((v10[r] - auc[r]) * (v10[s] - auc[s])).sum() / (m - 1)
            s01[r, s] = ((v01[r] - auc[r]) * (v01[s] - auc[s])).sum() / (n - 1)
    return auc, v10, v01, s10 / m + s01 / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    y[:2] = [0, 1]
    p = rng.random(200) + 0.4 * y
    auc, lo, hi = delong_auc_ci(y, p)
    assert auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert 0 <= lo < auc < hi <= 1


@pytest.mark.parametrize("seed", [0, 1])
def test_covariance_matches_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_cases = 60
    y = rng.integers(0, 2, n_cases)
    y[:2] = [0, 1]
    # Rounded scores: many ties, within and across classes and between the three models.
    scores = np.round(
        np.stack([rng.random(n_cases) + 0.3 * y, rng.random(n_cases), rng.random(n_cases) * y]), 1
    )
    auc_bf, v10_bf, v01_bf, cov_bf = _brute_force(y, scores)
    aucs, v10, v01 = structural_components(y, scores)
    np.testing.assert_allclose(v10, v10_bf, atol=1e-12)
    np.testing.assert_allclose(v01, v01_bf, atol=1e-12)
    np.testing.assert_allclose(aucs, auc_bf, atol=1e-12)
    aucs2, cov = delong_covariance(y, scores)
    np.testing.assert_allclose(cov, cov_bf, atol=1e-12)
    for r in range(3):
        assert aucs2[r] == pytest.approx(roc_auc_score(y, scores[r]), abs=1e-12)
    # The test's variance of a difference is the matching quadratic form of the brute-force matrix.
    t = delong_test(y, scores[0], scores[1])
    var_bf = cov_bf[0, 0] + cov_bf[1, 1] - 2 * cov_bf[0, 1]
    assert t["se"] == pytest.approx(np.sqrt(var_bf), rel=1e-10)
    assert t["diff"] == pytest.approx(auc_bf[0] - auc_bf[1], abs=1e-12)


def test_ci_is_auc_plus_minus_z_se() -> None:
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 40)
    p = rng.random(80) + 0.3 * y
    auc, cov = delong_covariance(y, p)
    _, lo, hi = delong_auc_ci(y, p, alpha=0.05)
    se = np.sqrt(cov[0, 0])
    assert lo == pytest.approx(auc[0] - 1.959963984540054 * se)
    assert hi == pytest.approx(auc[0] + 1.959963984540054 * se)
    _, llo, lhi = delong_auc_ci(y, p, logit=True)
    assert 0 < llo < auc[0] < lhi < 1


def test_ci_clipped_and_perfect_separation() -> None:
    y = np.array([0] * 10 + [1] * 10)
    p = np.linspace(0, 1, 20)
    auc, lo, hi = delong_auc_ci(y, p)
    assert (auc, lo, hi) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    p2 = np.where(y == 1, 0.9, 0.1) + 0.01 * rng.random(20)
    p2[0] = 0.95  # one negative ranked above every positive
    auc2, lo2, hi2 = delong_auc_ci(y, p2)
    assert hi2 == 1.0 and lo2 < auc2 < 1.0


def test_identical_predictions_p_is_one() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 50)
    y[:2] = [0, 1]
    p = rng.random(50)
    t = delong_test(y, p, p.copy())
    assert t["p"] == 1.0 and t["z"] == 0.0 and t["diff"] == 0.0


def test_better_model_small_p_and_sign() -> None:
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 100)
    good = rng.normal(size=200) + 2.5 * y
    bad = rng.normal(size=200) + 0.2 * y
    t = delong_test(y, good, bad)
    assert t["auc_a"] > t["auc_b"] and t["diff"] > 0 and t["z"] > 0
    assert t["p"] < 1e-6
    flipped = delong_test(y, bad, good)
    assert flipped["z"] == pytest.approx(-t["z"]) and flipped["p"] == pytest.approx(t["p"])


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="both classes"):
        delong_auc_ci([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 or 1"):
        delong_auc_ci([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="equal length"):
        delong_test([0, 1, 1], [0.1, 0.2, 0.3], [0.1, 0.2])
    # One positive: the variance is undefined, the CI says so with NaN.
    auc, lo, hi = delong_auc_ci([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4])
    assert auc == 1.0 and np.isnan(lo) and np.isnan(hi)
