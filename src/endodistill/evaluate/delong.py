"""DeLong's confidence interval and test for (correlated) ROC AUCs.

Written by hand because no maintained library in this environment offers it: scikit-learn and SciPy
have no AUC variance, statsmodels is not installed (and has no DeLong test either); the PyPI
packages that do (e.g. ``pauc``) are small single-author scripts. The algorithm is the fast DeLong
of Sun & Xu (2014, IEEE SPL 21:1389): the structural components of DeLong et al. (1988) from
midranks, O(N log N) instead of O(m*n). Midranks come from :func:`scipy.stats.rankdata`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

# Below this a variance is treated as zero (identical or perfectly separated predictions).
_TINY = 1e-15


def _as_binary_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError("labels must be a non-empty 1-D array")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(np.unique(y).tolist()))[:5]}")
    return y.astype(np.int64)


def structural_components(
    labels: Sequence[int] | np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeLong's structural components of K score vectors on the same cases (Sun & Xu's midrank form).

    Args:
        labels: (N,) 0/1 labels, 1 = positive.
        scores: (K, N) or (N,) scores, higher = more likely positive.

    Returns:
        ``(aucs (K,), v10 (K, m), v01 (K, n))`` where m / n are the numbers of positives / negatives,
        ``v10[k, i]`` is the fraction of negatives ranked below positive i (ties count 1/2) and
        ``v01[k, j]`` the fraction of positives ranked above negative j.

    Raises:
        ValueError: bad shapes, non-binary labels, non-finite scores, or a single class.
    """
    y = _as_binary_labels(labels)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if s.ndim != 2 or s.shape[1] != y.size:
        raise ValueError(f"scores must have shape (K, {y.size}), got {np.asarray(scores).shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    pos, neg = s[:, y == 1], s[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError(f"AUC needs both classes (positives {m}, negatives {n})")
    tx = stats.rankdata(pos, axis=1)  # midranks among positives
    ty = stats.rankdata(neg, axis=1)  # midranks among negatives
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # midranks among all
    # A positive's overall midrank minus its rank among positives = negatives below it (+1/2 per tie).
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    aucs = v10.mean(axis=1)
    return aucs, v10, v01


def delong_covariance(
    labels: Sequence[int] | np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance matrix ``S10 / m + S01 / n``.

    Args:
        labels: (N,) 0/1 labels.
        scores: (K, N) or (N,) scores.

    Returns:
        ``(aucs (K,), cov (K, K))``; the covariance is NaN when a class has fewer than two cases.
    """
    aucs, v10, v01 = structural_components(labels, scores)
    k, m = v10.shape
    n = v01.shape[1]
    if m < 2 or n < 2:
        # The sample covariance of one case is undefined: say so rather than pretend it is zero.
        return aucs, np.full((k, k), np.nan)
    s10 = np.atleast_2d(np.cov(v10, ddof=1))
    s01 = np.atleast_2d(np.cov(v01, ddof=1))
    return aucs, s10 / m + s01 / n


def delong_auc_ci(
    labels: Sequence[int] | np.ndarray,
    probs: Sequence[float] | np.ndarray,
    alpha: float = 0.05,
    logit: bool = False,
) -> tuple[float, float, float]:
    """AUC with DeLong's (1 - alpha) confidence interval.

    Args:
        labels: (N,) 0/1 labels.
        probs: (N,) scores.
        alpha: 1 - confidence level.
        logit: build the interval on the logit scale (better coverage near 0 or 1); falls back to
            the plain interval when the AUC is exactly 0 or 1.

    Returns:
        ``(auc, lo, hi)`` with the interval clipped to [0, 1]; lo/hi are NaN when the variance is
        undefined (fewer than two cases of a class).

    Raises:
        ValueError: bad input or a single class.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    aucs, cov = delong_covariance(labels, np.asarray(probs, dtype=np.float64)[None, :])
    auc, var = float(aucs[0]), float(cov[0, 0])
    if not np.isfinite(var):
        return auc, float("nan"), float("nan")
    z = float(stats.norm.ppf(1 - alpha / 2))
    se = float(np.sqrt(max(var, 0.0)))
    if logit and 0.0 < auc < 1.0:
        centre = np.log(auc / (1 - auc))
        half = z * se / (auc * (1 - auc))  # delta method
        lo, hi = 1 / (1 + np.exp(-(centre - half))), 1 / (1 + np.exp(-(centre + half)))
    else:
        lo, hi = auc - z * se, auc + z * se
    return auc, float(np.clip(lo, 0.0, 1.0)), float(np.clip(hi, 0.0, 1.0))


def delong_test(
    labels: Sequence[int] | np.ndarray,
    probs_a: Sequence[float] | np.ndarray,
    probs_b: Sequence[float] | np.ndarray,
) -> dict[str, float]:
    """DeLong's two-sided test of equal AUCs for two models scored on the same cases.

    Args:
        labels: (N,) 0/1 labels.
        probs_a: (N,) scores of model A.
        probs_b: (N,) scores of model B, same case order.

    Returns:
        ``{"auc_a", "auc_b", "diff" (a - b), "se" (of the difference), "z", "p"}``. Identical
        predictions give z = 0, p = 1; p is NaN when the variance is undefined.

    Raises:
        ValueError: bad input, different lengths, or a single class.
    """
    a = np.asarray(probs_a, dtype=np.float64)
    b = np.asarray(probs_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"probs_a and probs_b must be 1-D of equal length, got {a.shape} and {b.shape}")
    aucs, cov = delong_covariance(labels, np.stack([a, b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    out = {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff}
    if not np.isfinite(var):
        return {**out, "se": float("nan"), "z": float("nan"), "p": float("nan")}
    if var <= _TINY:
        # Zero variance of the difference: the two rankings agree case by case.
        if abs(diff) <= 1e-12:
            return {**out, "se": 0.0, "z": 0.0, "p": 1.0}
        return {**out, "se": 0.0, "z": float(np.copysign(np.inf, diff)), "p": 0.0}
    se = float(np.sqrt(var))
    z = diff / se
    return {**out, "se": se, "z": z, "p": float(2 * stats.norm.sf(abs(z)))}
