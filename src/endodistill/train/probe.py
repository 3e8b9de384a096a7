"""Linear-probe diagnostic of the MAE encoder: does pre-training make the labelled MRI more separable?

The MAE encoder's pooled features of every labelled volume are scored by an L2 logistic regression on the
run's own cross-validation folds (C by inner cross-validation on each training part only), and so are the
features of the SAME encoder before pre-training (built from the MAE fit's seed, so it is the very network
the MAE started from). The difference of the two pooled out-of-fold AUCs is what pre-training added to the
features, before any fine-tuning; both get DeLong 95% CIs. It takes seconds.

The probe reads the mean of the patch tokens, the usual MAE linear probe (a global representation in which
the label should be linearly readable), whatever the student's head reads. The same probe on all patch
tokens flattened is reported beside it (``flat_*``): it mostly measures the voxels themselves, since an
untrained encoder's tokens are close to a random projection of its patches (demo seeds 10-12: flat probe
0.718 after pre-training against 0.742 before, mean-of-tokens probe 0.687 against 0.609).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from torch import Tensor

from endodistill.config import Config
from endodistill.evaluate.delong import delong_auc_ci
from endodistill.models.student import build_mae, build_student, load_mae_encoder
from endodistill.models.weights import load_weights
from endodistill.train.seeding import seed_all

# Inner-CV grid of the probe's inverse regularisation strength (features are standardised first).
PROBE_CS = tuple(float(c) for c in np.logspace(-3, 2, 8))


@torch.no_grad()
def encoder_features(encoder: Any, x: Tensor, pool: str, batch_size: int = 64) -> np.ndarray:
    """Pooled encoder features ``(N, F)`` of volumes.

    Args:
        encoder: a module (duck-typed) with ``encode(x) -> (B, N + 1, hidden)`` (the MAE or the student).
        x: volumes ``(N, C, ...)``.
        pool: ``cls``, ``mean`` (of the patch tokens) or ``flat`` (all patch tokens, concatenated).
        batch_size: volumes per forward pass.
    """
    was = encoder.training
    encoder.eval()
    out = []
    try:
        for i in range(0, x.shape[0], batch_size):
            t = encoder.encode(x[i : i + batch_size])
            if pool == "mean":
                t = t[:, 1:].mean(1)
            elif pool == "flat":
                t = t[:, 1:].flatten(1)
            else:
                t = t[:, 0]
            out.append(t.float().cpu())
    finally:
        encoder.train(was)
    return torch.cat(out).numpy().astype(np.float64)


def probe_oof(
    features: np.ndarray,
    labels: np.ndarray,
    folds: Sequence[np.ndarray],
    seed: int = 0,
    trains: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Out-of-fold probabilities of an L2 logistic-regression probe, every choice made on training parts.

    Args:
        features: ``(N, F)``.
        labels: ``(N,)`` binary labels.
        folds: the test indices of each fold (together a partition of ``range(N)``).
        seed: seed of the inner stratified folds.
        trains: the training indices of each fold (default: every case outside its test fold); fewer
            under ``protocol.train_fraction``.

    Returns:
        ``(N,)`` probability of class 1, each from the probe fitted without its fold.

    Not :func:`endodistill.train.logreg_cv.cross_validated_logreg` (the clip baseline's loop of separate fits
    per C): on the demo's 3,072 flat-token features that loop made the probe take 22-26 s instead of 8.6 s;
    ``LogisticRegressionCV`` warm-starts along the C path. One volume per subject, so row-level inner folds
    are subject-level here.
    """
    oof = np.full(len(labels), np.nan)
    for f, test in enumerate(folds):
        train = np.setdiff1d(np.arange(len(labels)), test) if trains is None else np.asarray(trains[f])
        mu = features[train].mean(0)
        sd = features[train].std(0) + 1e-8
        y = labels[train]
        inner = max(2, min(3, int(np.bincount(y, minlength=2).min())))
        clf = LogisticRegressionCV(
            Cs=list(PROBE_CS),
            cv=StratifiedKFold(inner, shuffle=True, random_state=seed),
            scoring="roc_auc",
            max_iter=5000,
            # The L2 path scikit-learn 1.10 makes the default, said explicitly (same fit, no FutureWarning).
            l1_ratios=(0.0,),
            use_legacy_attributes=False,
        )
        clf.fit((features[train] - mu) / sd, y)
        oof[test] = clf.predict_proba((features[test] - mu) / sd)[:, 1]
    return oof


def _auc_ci(labels: np.ndarray, probs: np.ndarray) -> tuple[float, list[float]]:
    auc, lo, hi = delong_auc_ci(labels, probs)
    return float(auc), [float(lo), float(hi)]


def mae_probe(
    cfg: Config,
    labelled_x: Tensor,
    labels: np.ndarray,
    folds: Sequence[np.ndarray],
    encoder_path: Path,
    mae_seed: int,
    trains: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Linear-probe AUC of the pre-trained MAE encoder against the same encoder before pre-training.

    Args:
        cfg: the run configuration (``student`` and ``mae`` build the encoder).
        labelled_x: the labelled volumes ``(N, 1, ...)``.
        labels: their labels (binary, 1 = ``cfg.task.positive_class``).
        folds: test indices of the run's folds.
        encoder_path: ``encoder.safetensors`` of the MAE (ViT key names).
        mae_seed: the MAE fit's seed (its initial weights are the random encoder's).
        trains: training indices of the run's folds (default: all cases outside each test fold).

    Returns:
        ``probe_auc``, ``probe_auc_ci95``, ``random_probe_auc``, ``random_probe_auc_ci95``, ``features``.
    """
    y = np.asarray(labels, dtype=np.int64)
    seed_all(mae_seed)  # pretrain_mae seeds the same way before building its MAE
    random_encoder = build_mae(cfg)
    student = build_student(cfg)
    load_mae_encoder(student, load_weights(encoder_path), source=encoder_path)
    out: dict[str, Any] = {
        "features": "mean of the patch tokens",
        "flat_features": "all patch tokens, flattened",
    }
    for name, enc in (("probe", student), ("random_probe", random_encoder)):
        for prefix, pool in (("", "mean"), ("flat_", "flat")):
            feats = encoder_features(enc, labelled_x, pool)
            oof = probe_oof(feats, y, folds, seed=mae_seed % 2**31, trains=trains)
            out[f"{prefix}{name}_auc"], out[f"{prefix}{name}_auc_ci95"] = _auc_ci(y, oof)
    out["gain"] = out["probe_auc"] - out["random_probe_auc"]
    return out
