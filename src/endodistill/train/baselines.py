"""Reference baselines on the run's own folds: what the data holds, next to what the methods reach.

Every run (``baselines.enabled``) scores, on the same cross-validation folds and with the same statistics as
the methods (pooled out-of-fold AUC with DeLong CI, per-fold AUCs, operating points):

- ``logreg``: L2 logistic regression on the preprocessed voxels, its ``C`` chosen by inner stratified
  cross-validation on the training part only (scikit-learn);
- ``cnn3d``: a small 3D CNN (MONAI ``Classifier``) under the student's budget rules: fixed schedule, last
  epoch kept, the student's anatomy-respecting augmentation and class balancing, seeded per fold;
- ``oracle`` (synthetic cohorts only, from ``latents.csv`` next to the manifest): the exact posterior from the
  generator's latent signs, the ceiling of any model;
- ``sign_visibility`` (synthetic only): the out-of-fold AUC of a logistic-regression probe per latent MRI sign
  on the same voxels: which signs the chosen resolution can show at all;
- ``visible_ceiling`` (synthetic only): the population AUC of the exact posterior from only the signs whose
  probe reaches ``baselines.visible_auc``: what a model that reads those signs perfectly, and sees nothing
  of the others, reaches. The gap from it to the methods is how imperfectly they read what the grid shows.

The training part of a fold is every subject outside its test set (the student's ``train`` and ``val``
subjects): the baselines make their own choices on it (inner CV, fixed schedule), never on the test set.
Outputs go to ``RUN_DIR/baselines/``: ``oof_predictions.csv`` (subject_id,fold,method,label,prob) and
``done.json`` (written last; ``--resume`` reuses both).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import Classifier
from scipy.special import expit
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from torch import Tensor

from endodistill import rundir
from endodistill.config import CNN3DBaselineConfig, Config, LogRegBaselineConfig
from endodistill.data.synthetic.signs import MRI_SIGNS, population_ceilings
from endodistill.errors import InputError, TrainingDivergedError
from endodistill.evaluate.metrics import auc_score
from endodistill.evaluate.stats import adjust_pvalues, compare_methods, read_oof_csv, summarise_method
from endodistill.train.batches import PlannedBatches
from endodistill.train.data import CohortData
from endodistill.train.inference import inference_device, predict_logits
from endodistill.train.losses import balanced_class_weights, balanced_sample_weights
from endodistill.train.optim import adamw, param_groups, warmup_cosine
from endodistill.train.pretrain import augment_volumes
from endodistill.train.seeding import fit_seed, seed_all
from endodistill.train.units import read_done, write_done
from endodistill.utils import atomic_write_csv

log = logging.getLogger("endodistill")

BASELINES = ("logreg", "cnn3d", "oracle")
UNIT = rundir.BASELINES
_LOGREG_TOL = 1e-6
_LOGREG_MAX_ITER = 5000


# ------------------------------------------------------------------------------- reduced logistic regression
@dataclass
class ReducedFold:
    """One fold's voxels in the row space of its standardised training matrix.

    Attributes:
        z_train: ``(n, r)`` training rows, ``X_tr V`` (``r <= n``).
        z_test: ``(m, r)`` test rows, ``X_te V``.
        n_features: voxels per volume (the grid of ``C`` is in units of ``1 / n_features``).
    """

    z_train: np.ndarray
    z_test: np.ndarray
    n_features: int


def reduce_fold(
    x: np.ndarray, train: np.ndarray, test: np.ndarray, chunk: int = 1 << 16, rtol: float = 1e-10
) -> ReducedFold:
    """Standardise voxels with training-part statistics and express every row in the training row space.

    Why this is exact: with an unpenalised intercept, the L2 logistic regression on centred rows
    ``min_w,b C * sum_i loss(y_i, x_i.w + b) + |w|^2 / 2`` has its ``w`` in the span of the training rows
    ``x_i`` (a component orthogonal to all of them leaves every ``x_i.w`` unchanged and only adds to the
    penalty: the representer theorem). With ``X_tr = U S V^T`` (``V`` orthonormal, ``d x r``), ``w = V a`` and
    ``|w| = |a|``, so fitting on ``X_tr V`` (``n x r``) is the same problem and ``x.w = (x V).a`` for any row,
    test rows included. Inner CV folds fit on subsets of the training rows, which lie in the same span, so
    they are exact in this basis too. The voxels are centred by the training mean (the intercept takes the
    mean, unpenalised); the standardisation statistics never see a test row.

    ``V`` is never formed: ``X_tr V = U S`` and ``X_te V = (X_te X_tr^T) U / S`` come from the Gram matrices,
    accumulated over chunks of voxels (memory ``O(n^2 + chunk * n)``, also at the paper's 96^3 grid).

    Args:
        x: ``(N, d)`` voxels of every labelled volume (float32 or float64).
        train: row indices of the training part.
        test: row indices of the test part.
        chunk: voxels per accumulation step.
        rtol: eigenvalues of ``X_tr X_tr^T`` below ``rtol * max`` are numerically zero (the centred matrix
            has rank ``n - 1`` at most) and are dropped.

    Returns:
        The reduced fold.
    """
    n, m, d = train.size, test.size, x.shape[1]
    gram = np.zeros((n, n))
    cross = np.zeros((m, n))
    for c0 in range(0, d, chunk):
        a = x[train, c0 : c0 + chunk].astype(np.float64)
        mean = a.mean(axis=0)
        sd = a.std(axis=0)
        sd[sd < 1e-8] = 1.0  # a voxel constant over the training part: centred to 0, not divided by 0
        a -= mean
        a /= sd
        b = (x[test, c0 : c0 + chunk].astype(np.float64) - mean) / sd
        gram += a @ a.T
        cross += b @ a.T
    w, u = np.linalg.eigh(gram)
    keep = w > rtol * max(float(w.max()), 1e-300)
    s = np.sqrt(w[keep])
    u = u[:, keep]
    return ReducedFold(z_train=u * s, z_test=(cross @ u) / s, n_features=d)


def fit_logreg(z: np.ndarray, y: np.ndarray, c: float) -> Any:
    """L2 logistic regression (scikit-learn, lbfgs, tight tolerance) with inverse regularisation ``c``."""
    return LogisticRegression(C=c, tol=_LOGREG_TOL, max_iter=_LOGREG_MAX_ITER).fit(z, y)


def newton_logreg(
    z: np.ndarray, y: np.ndarray, c: float, start: np.ndarray | None = None, tol: float = 1e-10
) -> np.ndarray:
    """The same L2 logistic regression as :func:`fit_logreg`, by damped Newton steps; returns ``[w..., b]``.

    It minimises ``c * sum_i log(1 + exp(-s_i (z_i.w + b))) + |w|^2 / 2`` (intercept unpenalised), the
    objective of scikit-learn's ``LogisticRegression(C=c)``. Why not scikit-learn here: the inner CV fits
    each candidate ``C`` on each inner fold for every target (the label and six signs: about 1,200 fits on
    the demo), and at ``r <= 160`` reduced features a scikit-learn fit is mostly its input validation
    (15-20 ms each, so 20 s or more); a Newton step on ``(r + 1)^2`` is a fraction of a millisecond.

    Args:
        z: ``(n, r)`` rows.
        y: 0/1 targets.
        c: inverse regularisation strength.
        start: warm start (the solution at a neighbouring ``c``).
        tol: stop when the Newton decrement falls below ``tol * (1 + |objective|)``.
    """
    n, r = z.shape
    a = np.hstack([z, np.ones((n, 1))])
    yf = y.astype(np.float64)
    penal = np.ones(r + 1)
    penal[-1] = 0.0

    def objective(w: np.ndarray) -> float:
        t = a @ w
        return float(c * np.sum(np.logaddexp(0.0, t) - yf * t) + 0.5 * np.sum(penal * w * w))

    w = np.zeros(r + 1) if start is None else np.array(start, dtype=np.float64)
    f = objective(w)
    for _ in range(200):
        p = expit(a @ w)
        g = c * (a.T @ (p - yf)) + penal * w
        h = c * (a.T * (p * (1.0 - p))) @ a
        h[np.diag_indices_from(h)] += penal + 1e-12
        step = np.linalg.solve(h, g)
        dec = float(g @ step)
        if dec / 2 <= tol * (1.0 + abs(f)):
            break
        t = 1.0
        while True:  # backtracking (Armijo) keeps every step a descent on the convex objective
            w_new = w - t * step
            f_new = objective(w_new)
            if f_new <= f - 1e-4 * t * dec or t < 1e-8:
                break
            t /= 2
        w, f = w_new, f_new
    return w


def fast_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half; NaN for a single class."""
    pos = y.astype(bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def choose_c(
    z: np.ndarray, y: np.ndarray, grid: Sequence[float], inner_folds: int, seed: int
) -> tuple[float | None, list[float]]:
    """``C`` of the best mean ROC AUC over inner stratified folds of the training part.

    Ties in AUC (a sign every ``C`` separates perfectly) go to the lower mean log-loss: the AUC alone would
    keep the strongest penalty, whose near-constant probabilities differ from fold to fold by the training
    prevalence and so rank badly once the folds are pooled. Along the grid each inner fold warm-starts from
    the previous ``C``'s solution (:func:`newton_logreg`).

    Args:
        z: reduced training rows.
        y: their 0/1 targets.
        grid: candidate values of ``C``, increasing.
        inner_folds: inner folds (fewer when the minority class has fewer cases).
        seed: seed of the inner folds.

    Returns:
        ``(C, mean inner AUC per grid value)``; ``C`` is None when a class has fewer than 2 cases.
    """
    counts = np.bincount(y.astype(np.int64), minlength=2)
    k = min(int(inner_folds), int(counts.min()))
    if k < 2:
        return None, []
    aucs = np.zeros((k, len(grid)))
    losses = np.zeros((k, len(grid)))
    for i, (tr, te) in enumerate(StratifiedKFold(k, shuffle=True, random_state=seed).split(z, y)):
        w = None
        for j, c in enumerate(grid):
            w = newton_logreg(z[tr], y[tr], float(c), start=w)
            t = z[te] @ w[:-1] + w[-1]
            aucs[i, j] = fast_auc(y[te], t)
            p = np.clip(expit(t), 1e-15, 1 - 1e-15)
            losses[i, j] = -float(np.mean(y[te] * np.log(p) + (1 - y[te]) * np.log1p(-p)))
    auc, loss = aucs.mean(axis=0), losses.mean(axis=0)
    best = max(range(len(grid)), key=lambda j: (round(float(auc[j]), 9), -float(loss[j])))
    return float(grid[best]), [float(a) for a in auc]


def probe_fold(
    fold: ReducedFold, targets: Mapping[str, np.ndarray], cfg: LogRegBaselineConfig, seed: int
) -> dict[str, tuple[np.ndarray, float | None]]:
    """Fit one probe per training target on a reduced fold and score its test rows.

    Args:
        fold: the reduced fold.
        targets: name -> 0/1 targets of the training rows.
        cfg: the grid of ``C`` (units of ``1 / n_features``) and the inner folds.
        seed: seed of the inner folds.

    Returns:
        name -> ``(P(target = 1) of each test row, chosen C)``; a target with fewer than 2 cases of a class in
        the training part gives constant predictions (its prevalence) and C None.
    """
    grid = [float(c) / fold.n_features for c in cfg.c_grid]
    out: dict[str, tuple[np.ndarray, float | None]] = {}
    for name, y in targets.items():
        y = np.asarray(y, dtype=np.int64)
        c, _ = choose_c(fold.z_train, y, grid, cfg.inner_folds, seed)
        if c is None:
            out[name] = (np.full(fold.z_test.shape[0], float(y.mean()) if y.size else 0.5), None)
            continue
        model = fit_logreg(fold.z_train, y, c)
        out[name] = (model.predict_proba(fold.z_test)[:, 1], c * fold.n_features)
    return out


# ----------------------------------------------------------------------------------------------- 3D CNN
def build_cnn3d(cfg: CNN3DBaselineConfig, in_shape: Sequence[int], num_classes: int = 2) -> torch.nn.Module:
    """MONAI ``Classifier``: ``blocks`` strided conv blocks (width doubling), then a linear layer.

    Why this network: MONAI's ``Classifier`` is exactly "a few conv blocks and a linear head". With four
    stride-2 blocks the demo's 16 x 32 x 32 grid is 1 x 2 x 2 at the end, so the head sees almost a global
    pool. MONAI's ``ResNet`` at its smallest (one basic block per stage, same widths) costs 3x as much per
    training step with a stride-2 stem and 30x with a stride-1 stem (measured on one CPU thread, batch 16:
    17, 50 and 490 ms). Batch norm (eval mode: a test case's score depends on its own volume only) and
    ReLU; no residual units (1.6x the step time, measured).
    """
    channels = [cfg.width * 2**i for i in range(cfg.blocks)]
    return Classifier(
        in_shape=tuple(int(s) for s in in_shape),
        classes=num_classes,
        channels=channels,
        strides=[2] * cfg.blocks,
        num_res_units=0,
        norm="batch",
        act="relu",
        dropout=cfg.dropout or None,
    )


def train_cnn3d(cfg: Config, x_train: Tensor, y_train: np.ndarray, x_test: Tensor, seed: int) -> np.ndarray:
    """Train the 3D CNN on one training part (fixed schedule, last epoch kept) and score the test volumes.

    A plain PyTorch loop, not Lightning: at 2-4 s per fit, a Trainer's start-up and logging would be a large
    share of the time, and nothing here needs checkpoints (a fold is cheap to redo). The rules are the
    student's: AdamW (fused), linear warm-up then cosine decay per step, ``finetune.class_balance``,
    :func:`endodistill.train.pretrain.augment_volumes`, batches and augmentations that are pure functions of
    ``(seed, epoch, batch)`` (:class:`~endodistill.train.batches.PlannedBatches`), so CPU reruns are identical.

    Args:
        cfg: the run configuration (``baselines.cnn3d``, ``finetune.class_balance``/``translate``, ``task``).
        x_train: ``(n, 1, D, H, W)`` training volumes.
        y_train: their labels (0..K-1).
        x_test: ``(m, 1, D, H, W)`` test volumes.
        seed: the fit's seed.

    Returns:
        ``(m, K)`` class probabilities of the test volumes.
    """
    b = cfg.baselines.cnn3d
    k = cfg.task.num_classes
    dev = inference_device(cfg)
    seed_all(seed)
    net = build_cnn3d(b, x_train.shape[1:], k).to(dev)
    balance = cfg.finetune.class_balance
    cw = balanced_class_weights(y_train, k).to(dev) if balance == "weights" else None
    sw = balanced_sample_weights(y_train, k).numpy() if balance == "sampler" else None
    y_t = torch.from_numpy(np.asarray(y_train, dtype=np.int64))

    def make(idx: np.ndarray, rng: np.random.Generator, epoch: int) -> tuple[Tensor, Tensor]:
        it = torch.from_numpy(idx)
        xb = x_train[it]
        # The student's translation too (finetune.translate): the same augmentation rules.
        return (augment_volumes(xb, rng, cfg.finetune.translate) if b.augment else xb), y_t[it]

    batches = PlannedBatches(len(y_t), b.batch_size, seed, make, sample_weights=sw)
    batches.prefetch = False
    opt = adamw(param_groups(net, b.weight_decay), lr=b.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(len(batches) * b.epochs, 0.1))
    net.train()
    for epoch in range(b.epochs):
        for i in range(len(batches)):
            xb, yb = batches[(epoch, i)]
            loss = F.cross_entropy(net(xb.to(dev)), yb.to(dev), weight=cw)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"baseline cnn3d: loss {float(loss)} at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    return predict_logits(net, x_test, max(1, b.batch_size), dev).softmax(1).numpy()


# ----------------------------------------------------------------------------------------------- latents
def read_latents(manifest: Path, modality: str) -> dict[str, dict[str, str]] | None:
    """The rows of ``latents.csv`` next to the manifest for one modality, by subject (None: no such file)."""
    path = Path(manifest).parent / "latents.csv"
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not {"subject_id", "modality"} <= set(reader.fieldnames or []):
            raise InputError(path, "expected columns subject_id and modality")
        return {r["subject_id"]: r for r in reader if r["modality"] == modality}


def _sign_columns(latents: Mapping[str, Mapping[str, str]]) -> list[str]:
    first = next(iter(latents.values()), {})
    return [s for s in MRI_SIGNS if s in first]


# ----------------------------------------------------------------------------------------------- outputs
def _write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    atomic_write_csv(path, [dict(r) for r in rows], ["subject_id", "fold", "method", "label", "prob"])


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """:func:`endodistill.evaluate.metrics.auc_score` of 0/1 labels, None (JSON null) for one class."""
    a = auc_score(y, p)
    return None if math.isnan(a) else a


# ------------------------------------------------------------------------------------------------- runner
def compute_baselines(
    cfg: Config,
    data: CohortData,
    splits: Sequence[Mapping[str, Sequence[str]]],
    echo: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Fit every enabled baseline on every fold (nothing written).

    Args:
        cfg: the run configuration (``baselines``; ``task.positive_class``).
        data: the cohort (labelled volumes; ``latents.csv`` beside ``data.manifest`` for oracle and signs).
        splits: the run's folds (``train``, optional ``val``, ``test`` subject lists).
        echo: progress messages.

    Returns:
        ``{"rows": OOF rows of logreg/cnn3d/oracle, "sign_visibility": {sign: AUC}, "logreg_c": [C per fold],
        "timing": {baseline: seconds}}``.
    """
    bc = cfg.baselines
    lab = data.labelled
    pos = cfg.task.positive_class
    y_all = lab.labels.astype(np.int64)
    y_bin = (y_all == pos).astype(np.int64)
    x_flat = lab.x.reshape(len(lab), -1).numpy()
    latents = (
        read_latents(data.manifest, cfg.task.student_modality) if (bc.oracle or bc.sign_visibility) else None
    )
    if latents is not None and not all(s in latents for s in lab.subjects):
        missing = [s for s in lab.subjects if s not in latents]
        log.warning(
            "latents.csv lacks %d labelled subjects (e.g. %s): no oracle or sign probes",
            len(missing),
            missing[0],
        )
        latents = None
    signs = _sign_columns(latents) if latents is not None and bc.sign_visibility else []
    sign_y = (
        {s: np.array([int(float(latents[sid][s])) for sid in lab.subjects]) for s in signs} if latents else {}
    )

    sign_oof = {s: np.full(len(lab), np.nan) for s in signs}
    timing = dict.fromkeys(("logreg", "cnn3d", "oracle", "sign_visibility"), 0.0)
    logreg_c: list[float | None] = []
    # OOF rows by baseline (folds in order within each); written grouped: logreg, cnn3d, oracle.
    per_method: dict[str, list[dict[str, Any]]] = {m: [] for m in BASELINES}

    def add(method: str, fold: int, idx: np.ndarray, probs: np.ndarray) -> None:
        per_method[method] += [
            {
                "subject_id": lab.subjects[i],
                "fold": fold,
                "method": method,
                "label": int(y_all[i]),
                "prob": float(p),
            }
            for i, p in zip(idx, probs, strict=True)
        ]

    for f, split in enumerate(splits):
        test = lab.index(split["test"])
        train = lab.index([*split["train"], *split.get("val", [])])
        if test.size == 0:
            continue
        if train.size < 2:
            raise InputError(None, f"baselines fold {f}: fewer than 2 training subjects")
        if bc.logreg.enabled or signs:
            t0 = time.perf_counter()
            reduced = reduce_fold(x_flat, train, test)  # shared by the logreg and every sign probe
            timing["logreg" if bc.logreg.enabled else "sign_visibility"] += time.perf_counter() - t0
        if bc.logreg.enabled:
            t0 = time.perf_counter()
            seed = fit_seed(cfg.seed, "baseline_logreg", f)
            ((p, c),) = probe_fold(reduced, {"label": y_bin[train]}, bc.logreg, seed).values()
            logreg_c.append(c)
            add("logreg", f, test, p)
            timing["logreg"] += time.perf_counter() - t0
        if bc.cnn3d.enabled:
            t0 = time.perf_counter()
            probs = train_cnn3d(
                cfg,
                lab.x[torch.from_numpy(train)],
                y_all[train],
                lab.x[torch.from_numpy(test)],
                fit_seed(cfg.seed, "baseline_cnn3d", f),
            )
            add("cnn3d", f, test, probs[:, pos])
            timing["cnn3d"] += time.perf_counter() - t0
        if latents is not None and bc.oracle:
            t0 = time.perf_counter()
            add("oracle", f, test, np.array([float(latents[lab.subjects[i]]["oracle"]) for i in test]))
            timing["oracle"] += time.perf_counter() - t0
        if signs:
            t0 = time.perf_counter()
            seed = fit_seed(cfg.seed, "baseline_signs", f)
            for s, (p, _c) in probe_fold(
                reduced, {s: sign_y[s][train] for s in signs}, bc.logreg, seed
            ).items():
                sign_oof[s][test] = p
            timing["sign_visibility"] += time.perf_counter() - t0
        aucs = [
            f"{m} AUC {_fmt(_auc(y_bin[test], np.array([r['prob'] for r in per_method[m][-test.size :]])))}"
            for m in BASELINES
            if per_method[m] and per_method[m][-1]["fold"] == f
        ]
        echo(f"[baselines] fold {f + 1}/{len(splits)}: " + ", ".join(aucs))
    rows = [r for m in BASELINES for r in per_method[m]]
    visibility: dict[str, float | None] = {}
    for s in signs:
        done = np.isfinite(sign_oof[s])
        visibility[s] = _auc(sign_y[s][done], sign_oof[s][done])
    visible = visible_ceiling(visibility, bc.visible_auc, float(data.cohort.get("severity_coupling") or 0.0))
    enabled = {
        "logreg": bc.logreg.enabled,
        "cnn3d": bc.cnn3d.enabled,
        "oracle": latents is not None and bc.oracle,
        "sign_visibility": bool(signs),
    }
    return {
        "rows": rows,
        "sign_visibility": visibility,
        **({"visible_ceiling": visible} if visible is not None else {}),
        "logreg_c": logreg_c,
        "timing": {k: round(v, 3) for k, v in timing.items() if enabled[k]},
    }


def visible_ceiling(
    visibility: Mapping[str, float | None], threshold: float, coupling: float = 0.0
) -> dict[str, Any] | None:
    """The population ceiling from the signs the grid shows: ``{"threshold", "signs", "auc", "all_signs_auc"}``.

    Args:
        visibility: ``{sign: probe AUC}`` (None: undefined in this cohort).
        threshold: the probe AUC from which a sign counts as shown.
        coupling: the cohort's severity coupling (``cohort.json``).

    Returns:
        None without sign probes.
    """
    if not visibility:
        return None
    shown = [s for s, v in visibility.items() if v is not None and v >= threshold]
    return {
        "threshold": float(threshold),
        "signs": shown,
        "auc": population_ceilings(coupling, signs=shown)["mri"],
        "all_signs_auc": population_ceilings(coupling)["mri"],
    }


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"


def baseline_metrics(
    cfg: Config,
    computed: Mapping[str, Any],
    method_rows: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """``results["baselines"]``: each baseline summarised like a method, sign visibility, paired tests.

    Args:
        cfg: the run configuration (``task.positive_class``, ``protocol``).
        computed: what :func:`compute_baselines` returned (or its saved form).
        method_rows: the methods' OOF rows; the full method is compared with ``logreg`` and ``cnn3d``
            (DeLong, Holm over these comparisons), when its predictions are there.

    Returns:
        ``{"logreg": {...}, "cnn3d": {...}, "oracle": {...}, "sign_visibility": {...}, "comparisons": [...]}``
        with the baselines that ran.
    """
    pos = cfg.task.positive_class
    binary = [{**r, "label": int(int(r["label"]) == pos)} for r in computed["rows"]]
    out: dict[str, Any] = {}
    for m in BASELINES:
        mrows = [r for r in binary if r["method"] == m]
        if mrows:
            out[m] = summarise_method(mrows, m, cfg.protocol.high_sensitivity)
    if "logreg" in out:
        out["logreg"]["c_per_fold"] = list(computed.get("logreg_c") or [])
    if computed.get("sign_visibility"):
        out["sign_visibility"] = dict(computed["sign_visibility"])
    if computed.get("visible_ceiling"):
        out["visible_ceiling"] = dict(computed["visible_ceiling"])
    full = cfg.protocol.full_method
    full_rows = [{**r, "label": int(int(r["label"]) == pos)} for r in method_rows if r["method"] == full]
    comps = []
    if full_rows:
        for m in ("logreg", "cnn3d"):
            if m not in out:
                continue
            try:
                comps += compare_methods(
                    [*full_rows, *(r for r in binary if r["method"] == m)],
                    reference=m,
                    full=full,
                    correction="none",
                )
            except ValueError as e:
                log.warning("%s vs %s comparison skipped: %s", full, m, e)
        for c, q in zip(comps, adjust_pvalues([c["p"] for c in comps], "holm"), strict=True):
            c["p_adjusted"], c["correction"] = q, "holm"
    if comps:
        out["comparisons"] = comps
    return out


def run_baselines(
    cfg: Config,
    data: CohortData,
    splits: Sequence[Mapping[str, Sequence[str]]],
    run_dir: Path,
    resume: bool,
    method_rows: Sequence[Mapping[str, Any]] = (),
    echo: Callable[[str], None] = lambda _m: None,
    reuse: bool = False,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Compute (or, on resume, reload) the baselines into ``RUN_DIR/baselines`` and summarise them.

    Args:
        cfg: the run configuration.
        data: the cohort.
        splits: the run's folds.
        run_dir: the run directory.
        resume: reuse ``baselines/oof_predictions.csv`` and ``baselines/done.json`` when both are there.
        method_rows: the methods' OOF rows (for the full method vs baseline comparisons).
        echo: progress messages.
        reuse: reload them when they are done even in a fresh run (another process of a spread run computed
            them while this one trained the MAE).

    Returns:
        ``(results["baselines"], {"baseline_NAME": seconds})``; empty when the task is not binary (the
        baselines' statistics are the binary ones of the methods).
    """
    if cfg.task.num_classes != 2:
        echo("[baselines] skipped: they are defined for two classes")
        return {}, {}
    unit = Path(run_dir) / UNIT
    oof = unit / "oof_predictions.csv"
    done = read_done(unit) if resume or reuse else None
    if done is not None and oof.is_file():
        computed = {**done, "rows": read_oof_csv(oof)}
    else:
        t0 = time.perf_counter()
        computed = compute_baselines(cfg, data, splits, echo)
        unit.mkdir(parents=True, exist_ok=True)
        _write_rows(oof, computed["rows"])
        info = {k: v for k, v in computed.items() if k != "rows"}
        info["timing"]["total"] = round(time.perf_counter() - t0, 3)
        write_done(unit, info)  # last: a run killed before it recomputes the baselines on resume
        computed = {**info, "rows": read_oof_csv(oof)}  # the same floats on a first run and on resume
    timing = {f"baseline_{k}": float(v) for k, v in (computed.get("timing") or {}).items() if k != "total"}
    return baseline_metrics(cfg, computed, method_rows), timing
