"""Linear-probe diagnostic of the MAE encoder: does pre-training make the labelled MRI more separable?

The MAE encoder's pooled features of every labelled volume are scored by an L2 logistic regression on the
run's own cross-validation folds (C by inner cross-validation on each training part only), and so are the
features of untrained encoders of the same shape: the very network the MAE started from (built from the MAE
fit's seed) and ``mae.probe_draws - 1`` more, each from its own seed. One untrained encoder is a noisy
reference: its probe AUC varies with the initialisation by 0.03-0.05 (standard deviation over 8 draws on demo
cohorts 10-12), comparable to the margin it is compared with, so the reference is the mean over the draws. The
difference of the MAE's pooled out-of-fold AUC and that mean is what pre-training added to the features,
before any fine-tuning. The MAE's probe gets a DeLong 95% CI; the mean over draws and the gain get one from
the draws' joint DeLong covariance (the same cases score every encoder) plus the spread between draws
(``sd**2 / draws``: the initialisation is a random effect of its own). It takes seconds.

The probe reads the mean of the patch tokens, the usual MAE linear probe (a global representation in which
the label should be linearly readable), whatever the student's head reads. The same probe on all patch
tokens flattened is reported beside it (``flat_*``, against the MAE's own initialisation only: it is the
slow one): it mostly measures the voxels themselves, since an untrained encoder's tokens are close to a
random projection of its patches (demo seeds 10-12: flat probe 0.718 after pre-training against 0.742
before, mean-of-tokens probe 0.687 against 0.609).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from torch import Tensor

from endodistill.config import Config
from endodistill.evaluate.delong import delong_auc_ci, delong_covariance
from endodistill.models.student import build_mae, build_student, load_mae_encoder
from endodistill.models.weights import load_weights
from endodistill.train.seeding import fit_seed, seed_all

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


# Up to this many features the probe solves each fit by Newton's method on the Cholesky factor of the
# Hessian (exact, a few iterations): 3x faster than L-BFGS on the 48 mean-of-tokens features of the demo
# (benchmarks/bench_speedups.py, "probe" row). Its cost grows with the cube of the width, so the 3,072
# flat-token features keep L-BFGS.
NEWTON_MAX_FEATURES = 256


def probe_oof(
    features: np.ndarray,
    labels: np.ndarray,
    folds: Sequence[np.ndarray],
    seed: int = 0,
    trains: Sequence[np.ndarray] | None = None,
    solver: str | None = None,
) -> np.ndarray:
    """Out-of-fold probabilities of an L2 logistic-regression probe, every choice made on training parts.

    Args:
        features: ``(N, F)``.
        labels: ``(N,)`` binary labels.
        folds: the test indices of each fold (together a partition of ``range(N)``).
        seed: seed of the inner stratified folds.
        trains: the training indices of each fold (default: every case outside its test fold); fewer
            under ``protocol.train_fraction``.
        solver: scikit-learn's solver; default ``newton-cholesky`` up to :data:`NEWTON_MAX_FEATURES`
            features, else ``lbfgs``.

    Returns:
        ``(N,)`` probability of class 1, each from the probe fitted without its fold.

    Not :func:`endodistill.train.logreg_cv.cross_validated_logreg` (the clip baseline's loop of separate fits
    per C): on the demo's 3,072 flat-token features that loop made the probe take 22-26 s instead of 8.6 s;
    ``LogisticRegressionCV`` warm-starts along the C path. One volume per subject, so row-level inner folds
    are subject-level here.
    """
    oof = np.full(len(labels), np.nan)
    if solver is None:
        solver = "newton-cholesky" if features.shape[1] <= NEWTON_MAX_FEATURES else "lbfgs"
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
            solver=solver,
        )
        clf.fit((features[train] - mu) / sd, y)
        oof[test] = clf.predict_proba((features[test] - mu) / sd)[:, 1]
    return oof


def _auc_ci(labels: np.ndarray, probs: np.ndarray) -> tuple[float, list[float]]:
    auc, lo, hi = delong_auc_ci(labels, probs)
    return float(auc), [float(lo), float(hi)]


def _interval(centre: float, var: float, clip: bool = True) -> list[float]:
    """Normal 95% interval of ``centre`` with variance ``var``, clipped to [0, 1] (an AUC) unless ``clip`` is off."""
    half = float(stats.norm.ppf(0.975)) * float(np.sqrt(max(var, 0.0)))
    lo, hi = centre - half, centre + half
    return [float(np.clip(lo, 0.0, 1.0)), float(np.clip(hi, 0.0, 1.0))] if clip else [lo, hi]


def untrained_seed(mae_seed: int, draw: int) -> int:
    """The seed of untrained encoder ``draw``: the MAE's own for draw 0, then one of its own per draw."""
    return int(mae_seed) if draw == 0 else fit_seed(mae_seed, "probe_untrained", draw)


def mae_probe(
    cfg: Config,
    labelled_x: Tensor,
    labels: np.ndarray,
    folds: Sequence[np.ndarray],
    encoder_path: Path,
    mae_seed: int,
    trains: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Linear-probe AUC of the pre-trained MAE encoder against untrained encoders of the same shape.

    Args:
        cfg: the run configuration (``student`` and ``mae`` build the encoder; ``mae.probe_draws``).
        labelled_x: the labelled volumes ``(N, 1, ...)``.
        labels: their labels (binary, 1 = ``cfg.task.positive_class``).
        folds: test indices of the run's folds.
        encoder_path: ``encoder.safetensors`` of the MAE (ViT key names).
        mae_seed: the MAE fit's seed (its initial weights are the first untrained encoder's).
        trains: training indices of the run's folds (default: all cases outside each test fold).

    Returns:
        ``probe_auc`` and ``random_probe_auc`` (the mean over the untrained draws) with ``*_ci95``,
        ``random_probe_aucs`` (per draw, the MAE's own initialisation first), ``random_probe_sd``, ``gain``
        with ``gain_ci95``, the flat-token probes ``flat_probe_auc`` / ``flat_random_probe_auc`` (the MAE's
        initialisation) with CIs, and what the features are.
    """
    y = np.asarray(labels, dtype=np.int64)
    draws = int(cfg.mae.probe_draws)
    inner_seed = mae_seed % 2**31  # the same inner folds for every encoder: the comparison is paired
    student = build_student(cfg)
    load_mae_encoder(student, load_weights(encoder_path), source=encoder_path)
    out: dict[str, Any] = {
        "features": "mean of the patch tokens",
        "flat_features": "all patch tokens, flattened",
        "random_probe_draws": draws,
    }

    def oof(enc: Any, pool: str) -> np.ndarray:
        return probe_oof(encoder_features(enc, labelled_x, pool), y, folds, seed=inner_seed, trains=trains)

    mean_oofs = [oof(student, "mean")]
    out["probe_auc"], out["probe_auc_ci95"] = _auc_ci(y, mean_oofs[0])
    out["flat_probe_auc"], out["flat_probe_auc_ci95"] = _auc_ci(y, oof(student, "flat"))
    for draw in range(draws):
        seed_all(untrained_seed(mae_seed, draw))  # draw 0: pretrain_mae seeds the same way before its build
        untrained = build_mae(cfg)
        mean_oofs.append(oof(untrained, "mean"))
        if draw == 0:
            out["flat_random_probe_auc"], out["flat_random_probe_auc_ci95"] = _auc_ci(
                y, oof(untrained, "flat")
            )
    aucs, cov = delong_covariance(y, np.stack(mean_oofs))
    rand = aucs[1:]
    sd = float(np.std(rand, ddof=1)) if draws > 1 else 0.0
    between = sd**2 / draws
    w_mean = np.r_[0.0, np.full(draws, 1.0 / draws)]
    w_gain = np.r_[1.0, np.full(draws, -1.0 / draws)]
    out["random_probe_aucs"] = [float(a) for a in rand]
    out["random_probe_sd"] = sd
    out["random_probe_auc"] = float(rand.mean())
    out["random_probe_auc_ci95"] = _interval(out["random_probe_auc"], float(w_mean @ cov @ w_mean) + between)
    out["gain"] = out["probe_auc"] - out["random_probe_auc"]
    out["gain_ci95"] = _interval(out["gain"], float(w_gain @ cov @ w_gain) + between, clip=False)
    return out
