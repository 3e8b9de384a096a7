"""L2 logistic regression cross-validated on given subject-level folds, C chosen inside each training part.

One mechanism for the small reference models that read a feature table: the teacher's clip baseline
(motion features of TVUS clips) and the MAE's linear probe (pooled encoder features of MRI volumes). For each
test fold, C is chosen by an inner, subject-level, stratified cross-validation on the fold's training part
only, the model (standardisation + scikit-learn L2 logistic regression with balanced class weights) is
refitted there, and the test rows are scored: no choice ever sees a test row. The voxel baseline ``logreg``
(:mod:`endodistill.train.baselines`) solves the same problem on 16k-dimensional rows with an exact reduction
and its own Newton search, for speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from endodistill.data.splits import stratified_group_folds
from endodistill.evaluate.delong import delong_auc_ci
from endodistill.evaluate.metrics import auc_score

# C of the L2 penalty tried by the inner cross-validation (inverse regularisation strength; features are
# standardised inside the model).
DEFAULT_CS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def _inner_folds(
    subjects: Sequence[str], y: np.ndarray, k: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Subject-level stratified inner splits ``(train rows, val rows)`` of one training part."""
    per_class = np.bincount(y)
    k = int(min(k, per_class[per_class > 0].min(), len(set(subjects))))
    if k < 2:
        return []
    subj = np.asarray(subjects)
    out = []
    for val_subjects in stratified_group_folds(list(subjects), y.tolist(), k, seed):
        val = np.isin(subj, val_subjects)
        out.append((np.flatnonzero(~val), np.flatnonzero(val)))
    return out


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> Any:
    # Balanced class weights, as the teacher's loss; the scaler is part of the model (fitted on its rows only).
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000))
    return model.fit(x, y)


def choose_c(
    x: np.ndarray, y: np.ndarray, subjects: Sequence[str], k: int, seed: int, cs: Sequence[float] = DEFAULT_CS
) -> float:
    """The C with the best mean inner-CV AUC on ``(x, y)`` (ties: the smaller C, the stronger penalty).

    Args:
        x: features of the training part only.
        y: their labels in ``[0, k)``.
        subjects: subject of each row (inner folds are subject-level).
        k: number of classes.
        seed: seed of the inner folds.
        cs: candidate values.
    """
    splits = _inner_folds(subjects, y, 5, seed)
    if not splits:
        return float(cs[len(cs) // 2])
    scores = []
    for c in cs:
        aucs = []
        for tr, va in splits:
            if len(np.unique(y[tr])) < k:
                continue
            p = np.zeros((va.size, k))
            p[:, np.unique(y[tr])] = _fit(x[tr], y[tr], c).predict_proba(x[va])
            aucs.append(auc_score(y[va], p))
        finite = [a for a in aucs if np.isfinite(a)]
        scores.append(float(np.mean(finite)) if finite else float("-inf"))
    return float(cs[int(np.argmax(scores))])  # argmax takes the first (smallest C) of equal scores


def cross_validated_logreg(
    features: np.ndarray,
    labels: np.ndarray,
    subjects: Sequence[str],
    fold: np.ndarray,
    k: int,
    positive_class: int,
    seed: int,
    cs: Sequence[float] = DEFAULT_CS,
) -> dict[str, Any]:
    """Logistic regression on a feature table, cross-validated on given subject-level folds.

    Args:
        features: ``(N, F)`` features of every row (clip or volume).
        labels: ``(N,)`` labels (-1 unlabelled: never used).
        subjects: subject of each row (inner folds never split a subject).
        fold: ``(N,)`` test fold of each row (>= 0), -1 for rows that are only ever trained on (the
            training part of a hold-out) or unlabelled. Fold ``f`` trains on every labelled clip not in fold f.
        k: number of classes.
        positive_class: the class whose probability is scored (binary).
        seed: seed of the inner folds (fold ``f`` uses ``seed + f``).
        cs: candidate values of C.

    Returns:
        ``{"auc", "auc_ci95", "fold_aucs", "fold_c", "probs"}``: pooled out-of-fold AUC of the held-out clips
        (macro one-vs-rest for K > 2, then no CI), DeLong's 95% CI, the AUC and chosen C of each fold, and
        ``probs`` ``(N, K)`` (NaN for clips never held out).
    """
    y_all = np.asarray(labels)
    fold = np.asarray(fold)
    subjects = list(subjects)
    labelled = y_all >= 0
    probs = np.full((len(y_all), k), np.nan)
    fold_aucs, fold_c = [], []
    for f in sorted(set(fold[fold >= 0].tolist())):
        te = np.flatnonzero(fold == f)
        tr = np.flatnonzero(labelled & (fold != f))
        c = choose_c(features[tr], y_all[tr], [subjects[i] for i in tr], k, seed + f, cs)
        model = _fit(features[tr], y_all[tr], c)
        p = np.zeros((te.size, k))
        p[:, np.unique(y_all[tr])] = model.predict_proba(features[te])
        probs[te] = p
        fold_aucs.append(auc_score(y_all[te], p, positive_class))
        fold_c.append(c)
    held = np.flatnonzero(fold >= 0)
    y, p = y_all[held], probs[held]
    auc, ci = auc_score(y, p, positive_class), [float("nan"), float("nan")]
    if k == 2 and np.isfinite(auc):
        _, lo, hi = delong_auc_ci((y == positive_class).astype(int), p[:, positive_class])
        ci = [lo, hi]
    return {"auc": auc, "auc_ci95": ci, "fold_aucs": fold_aucs, "fold_c": fold_c, "probs": probs}
