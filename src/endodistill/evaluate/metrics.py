"""Binary and multi-class classification metrics: AUC with a DeLong CI, operating points, calibration.

AUC, ROC and Brier come from scikit-learn; the DeLong interval from :mod:`endodistill.evaluate.delong`.
The expected calibration error is a few lines written here (scikit-learn has only the binned curve).
Everything tolerates a single-class input (a small fold): the AUC and thresholds become NaN with a
``note`` instead of an exception, the trap MONAI's ``ROCAUCMetric`` falls into.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

from endodistill.evaluate.delong import delong_auc_ci

NAN = float("nan")


def _check(
    labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1 or y.size != p.size:
        raise ValueError(f"labels and probs must be 1-D of equal length, got {y.shape} and {p.shape}")
    if y.size == 0:
        raise ValueError("no cases")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("probs must be finite and within [0, 1]")
    return y.astype(np.int64), p


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    # Equal-width bins [k/B, (k+1)/B), the last one closed; edges k/B are exact decimals (3/10 == 0.3).
    edges = np.arange(1, n_bins) / n_bins
    return np.searchsorted(edges, p, side="right")


def expected_calibration_error(
    labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray, n_bins: int = 10
) -> float:
    """Expected calibration error of the positive-class probability.

    ``sum_b (n_b / N) * |mean(y in b) - mean(p in b)|`` over equal-width bins on [0, 1]: the gap of the
    reliability diagram drawn by :func:`calibration_points`, weighted by bin size.

    Args:
        labels: (N,) 0/1 labels.
        probs: (N,) predicted probabilities of class 1.
        n_bins: number of equal-width bins.

    Returns:
        The ECE in [0, 1].

    Raises:
        ValueError: bad input.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    y, p = _check(labels, probs)
    idx = _bin_index(p, n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins)
    # (n_b / N) * |sum_y / n_b - sum_p / n_b| == |sum_y - sum_p| / N; empty bins contribute 0.
    return float(np.abs(sum_y - sum_p).sum() / y.size)


def calibration_points(
    labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray, n_bins: int = 10
) -> dict[str, list[float]]:
    """Reliability-diagram points over the same bins as :func:`expected_calibration_error`.

    Args:
        labels: (N,) 0/1 labels.
        probs: (N,) predicted probabilities of class 1.
        n_bins: number of equal-width bins.

    Returns:
        ``{"mean_prob", "observed", "count"}``: one entry per non-empty bin.
    """
    y, p = _check(labels, probs)
    idx = _bin_index(p, n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins)
    keep = counts > 0
    return {
        "mean_prob": (sum_p[keep] / counts[keep]).tolist(),
        "observed": (sum_y[keep] / counts[keep]).tolist(),
        "count": counts[keep].astype(int).tolist(),
    }


def roc_points(
    labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray
) -> dict[str, list[float]]:
    """ROC curve points for plotting (scikit-learn's ``roc_curve``).

    Returns:
        ``{"fpr", "tpr", "thresholds"}``; empty lists when only one class is present.
    """
    y, p = _check(labels, probs)
    if y.min() == y.max():
        return {"fpr": [], "tpr": [], "thresholds": []}
    fpr, tpr, thr = roc_curve(y, p)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()}


def _sens_spec(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    pred = p >= threshold  # scikit-learn's convention: positive when score >= threshold
    pos, neg = y == 1, y == 0
    sens = float(pred[pos].mean()) if pos.any() else NAN
    spec = float((~pred[neg]).mean()) if neg.any() else NAN
    return sens, spec


def binary_metrics(
    labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray, high_sensitivity: float = 0.9
) -> dict[str, Any]:
    """Every metric the ablation table reports, for one method's pooled predictions.

    Args:
        labels: (N,) 0/1 labels.
        probs: (N,) predicted probabilities of class 1.
        high_sensitivity: target sensitivity of the second operating point.

    Returns:
        ``{"n", "n_pos", "prevalence", "auc", "auc_ci95": [lo, hi], "youden": {"threshold",
        "sensitivity", "specificity", "j"}, "high_sensitivity": {"target", "threshold", "sensitivity",
        "specificity"}, "brier", "ece"}`` plus ``"note"`` when only one class is present (then the
        AUC, CI and thresholds are NaN). A case is called positive when ``prob >= threshold``.

    Raises:
        ValueError: bad input.
    """
    if not 0 < high_sensitivity <= 1:
        raise ValueError(f"high_sensitivity must be in (0, 1], got {high_sensitivity}")
    y, p = _check(labels, probs)
    n, n_pos = int(y.size), int(y.sum())
    out: dict[str, Any] = {
        "n": n,
        "n_pos": n_pos,
        "prevalence": n_pos / n,
        "brier": float(brier_score_loss(y, p, pos_label=1)),
        "ece": expected_calibration_error(y, p),
    }
    if n_pos in (0, n):
        out.update(
            auc=NAN,
            auc_ci95=[NAN, NAN],
            youden={"threshold": NAN, "sensitivity": NAN, "specificity": NAN, "j": NAN},
            high_sensitivity={
                "target": high_sensitivity,
                "threshold": NAN,
                "sensitivity": NAN,
                "specificity": NAN,
            },
            note=f"only one class present (n={n}, n_pos={n_pos}): AUC and thresholds undefined",
        )
        return out
    auc = float(roc_auc_score(y, p))
    _, lo, hi = delong_auc_ci(y, p)
    # All thresholds (drop_intermediate=False) so that the highest one reaching the target is found.
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    finite = np.isfinite(thr)  # the first threshold is +inf (nothing called positive)
    fpr, tpr, thr = fpr[finite], tpr[finite], thr[finite]
    j = tpr - fpr
    k = int(np.argmax(j))  # thresholds decrease: the first maximum is the highest threshold
    y_sens, y_spec = _sens_spec(y, p, float(thr[k]))
    # tpr never decreases as the threshold falls; it reaches 1 at the lowest threshold.
    h = int(np.argmax(tpr >= high_sensitivity - 1e-12))
    h_sens, h_spec = _sens_spec(y, p, float(thr[h]))
    out.update(
        auc=auc,
        auc_ci95=[lo, hi],
        youden={"threshold": float(thr[k]), "sensitivity": y_sens, "specificity": y_spec, "j": float(j[k])},
        high_sensitivity={
            "target": high_sensitivity,
            "threshold": float(thr[h]),
            "sensitivity": h_sens,
            "specificity": h_spec,
        },
    )
    return out


def multiclass_auc(labels: Sequence[int] | np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """One-vs-rest AUC per class and their macro average.

    Args:
        labels: (N,) integer labels in [0, K).
        probs: (N, K) class probabilities (or scores).

    Returns:
        ``{"macro": float, "per_class": {k: float}}``; a class absent from ``labels`` (or present in
        every case) gets NaN and is left out of the macro mean (NaN when no class is defined).

    Raises:
        ValueError: bad shapes or labels outside [0, K).
    """
    y = np.asarray(labels)
    s = np.asarray(probs, dtype=np.float64)
    if s.ndim != 2 or y.ndim != 1 or s.shape[0] != y.size or y.size == 0:
        raise ValueError(f"probs must be (N, K) with N = len(labels), got {s.shape} for {y.shape}")
    k_classes = s.shape[1]
    if k_classes < 2:
        raise ValueError("need at least two classes")
    if not np.isin(y, np.arange(k_classes)).all():
        raise ValueError(f"labels must be integers in [0, {k_classes})")
    if not np.isfinite(s).all():
        raise ValueError("probs contain NaN or infinite values")
    per_class: dict[int, float] = {}
    for k in range(k_classes):
        yk = (y == k).astype(np.int64)
        per_class[k] = float(roc_auc_score(yk, s[:, k])) if 0 < yk.sum() < yk.size else NAN
    defined = [v for v in per_class.values() if np.isfinite(v)]
    return {"macro": float(np.mean(defined)) if defined else NAN, "per_class": per_class}


def auc_score(
    labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray, positive_class: int = 1
) -> float:
    """ROC AUC of ``(N,)`` scores of the positive class, or of ``(N, K)`` class probabilities: the positive
    class's column for K = 2, the macro one-vs-rest AUC (:func:`multiclass_auc`) for K > 2.

    Returns:
        NaN when there is no case or only one class.
    """
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if y.size == 0 or np.unique(y).size < 2:
        return NAN
    if p.ndim == 1:
        return float(roc_auc_score(y == positive_class, p))
    if p.shape[1] == 2:
        return float(roc_auc_score(y == positive_class, p[:, positive_class]))
    return float(multiclass_auc(y, p)["macro"])
