"""Stage 1: the TVUS teacher (ResNet(2+1)D), its held-out AUC, and its frozen outputs for distillation.

The teacher's own AUC on held-out TVUS subjects bounds what a student can be taught. It is estimated on one
stratified subject hold-out (``teacher.folds == 1``) or by k-fold cross-validation (pooled out-of-fold AUC).

The KD targets are computed once and stored in ``RUN_DIR/teacher/outputs.safetensors`` (logits, probabilities,
pooled features per clip) with ``outputs.json`` (subject ids, labels, paths):

* ``in_sample`` (the paper): a teacher trained on every labelled clip scores every clip;
* ``oof``: cross-fitted, each clip is scored by a teacher that did not train on it (k folds; k = ``folds``
  when > 1, else ``round(1 / holdout_fraction)``), so the targets are as calibrated as on new patients.

Distillation reads these files only; the video network never runs again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from endodistill import rundir
from endodistill.config import Config
from endodistill.data.preprocess import sample_frames
from endodistill.data.splits import holdout_split, stratified_group_folds
from endodistill.errors import InputError
from endodistill.evaluate.delong import delong_test
from endodistill.evaluate.metrics import auc_score, binary_metrics, multiclass_auc
from endodistill.evaluate.stats import nan_to_none
from endodistill.models.teacher import TeacherNet, build_teacher, normalise_clips, teacher_in_channels
from endodistill.models.weights import load_weights, save_weights
from endodistill.train.batches import PlannedBatches
from endodistill.train.clip_baseline import (
    GRID,
    clip_coupling_features,
    clip_motion_features,
    coupling_name,
    features_name,
)
from endodistill.train.data import ClipSet, CohortData
from endodistill.train.fit import FitPlan, FitSpec, run_fit
from endodistill.train.inference import inference_device
from endodistill.train.logreg_cv import cross_validated_logreg
from endodistill.train.losses import balanced_class_weights, task_loss
from endodistill.train.module import StageModule
from endodistill.train.optim import adamw, param_groups
from endodistill.train.seeding import fit_seed, seed_all
from endodistill.train.speed import compile_if_enabled, teacher_channels_last
from endodistill.train.trainer import TimingCallback
from endodistill.train.units import prepare_unit, read_done, write_done
from endodistill.utils import atomic_write_csv, atomic_write_json

log = logging.getLogger("endodistill")


@dataclasses.dataclass
class TeacherOutputs:
    """The frozen teacher outputs on every TVUS clip (what distillation reads).

    Attributes:
        logits: ``(N, K)``.
        probs: ``(N, K)`` softmax of the logits.
        features: ``(N, F)`` pooled features of the last stage.
        labels: ``(N,)`` int64 (-1 unlabelled).
        subjects: subject id per clip.
        paths: source file per clip.
        targets: ``in_sample`` or ``oof``.
    """

    logits: Tensor
    probs: Tensor
    features: Tensor
    labels: np.ndarray
    subjects: list[str]
    paths: list[str]
    targets: str


def clip_batch_fn(
    clips: ClipSet, idx_map: np.ndarray, cfg: Config, augment: bool
) -> Callable[[np.ndarray, np.random.Generator, int], dict[str, Tensor]]:
    """Training batches of clips: random temporal window, intensity jitter, small spatial shift.

    Args:
        clips: all clips.
        idx_map: dataset index -> clip index.
        cfg: frames per clip in ``cfg.tvus.frames``.
        augment: jitter intensity and position (the temporal window is always random in training).
    """
    n = cfg.tvus.frames
    flow = cfg.teacher.motion == "flow"
    if flow and clips.flows is None:
        raise ValueError("teacher.motion 'flow' needs clips loaded with their displacement fields")

    def make(idx: np.ndarray, rng: np.random.Generator, epoch: int) -> dict[str, Tensor]:
        ci = idx_map[idx]
        if flow:
            return make_flow(ci, rng)
        x = np.stack([sample_frames(clips.clips[i], n, train=True, rng=rng) for i in ci]).astype(np.float32)
        if augment:
            b, _, h, w = x.shape
            # Gain/contrast/brightness differ between machines and presets: jitter them per clip.
            contrast = rng.uniform(0.8, 1.2, size=(b, 1, 1, 1)).astype(np.float32)
            bright = rng.uniform(-0.08, 0.08, size=(b, 1, 1, 1)).astype(np.float32)
            mean = x.mean(axis=(1, 2, 3), keepdims=True)
            x = np.clip((x - mean) * contrast + mean + bright, 0.0, 1.0)
            # Probe position varies: shift each clip by a few pixels (edge padding, same shift every frame).
            pad = max(1, min(h, w) // 16)
            xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="edge")
            d = rng.integers(0, 2 * pad + 1, size=(b, 2))
            x = np.stack([xp[k, :, d[k, 0] : d[k, 0] + h, d[k, 1] : d[k, 1] + w] for k in range(b)])
            # The sliding sign is the same played backwards (pressure released instead of applied) and
            # mirrored left-right: both keep the label and double what ~100 clips show. No draws when off,
            # so configurations without them keep their batches.
            if cfg.teacher.time_reverse:
                rev = rng.random(b) < 0.5
                x[rev] = x[rev][:, ::-1]
            if cfg.teacher.hflip:
                flip = rng.random(b) < 0.5
                x[flip] = x[flip][:, :, :, ::-1]
        x_t = torch.from_numpy(np.ascontiguousarray(x))[:, None]
        return {"x": normalise_clips(x_t, cfg), "y": torch.from_numpy(clips.labels[ci])}

    def make_flow(ci: np.ndarray, rng: np.random.Generator) -> dict[str, Tensor]:
        # (B, T, 2, H, W) displacement fields; no intensity jitter (flow does not depend on gain).
        assert clips.flows is not None
        x = np.stack([sample_frames(clips.flows[i], n, train=True, rng=rng) for i in ci]).astype(np.float32)
        if augment:
            b, _, _, h, w = x.shape
            pad = max(1, min(h, w) // 16)
            xp = np.pad(x, ((0, 0), (0, 0), (0, 0), (pad, pad), (pad, pad)), mode="edge")
            d = rng.integers(0, 2 * pad + 1, size=(b, 2))
            x = np.stack([xp[k, ..., d[k, 0] : d[k, 0] + h, d[k, 1] : d[k, 1] + w] for k in range(b)])
            if cfg.teacher.time_reverse:
                rev = rng.random(b) < 0.5
                x[rev] = x[rev][:, ::-1]
            if cfg.teacher.hflip:
                # Mirrored left-right, the x component of the motion changes sign.
                flip = rng.random(b) < 0.5
                x[flip] = x[flip][..., ::-1] * np.array([-1.0, 1.0], dtype=np.float32)[:, None, None]
        x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3, 4)))
        return {"x": normalise_clips(x_t, cfg), "y": torch.from_numpy(clips.labels[ci])}

    return make


def teacher_inputs(tv: ClipSet, cfg: Config) -> Tensor:
    """The evaluation inputs of every clip before :func:`~endodistill.models.teacher.normalise_clips`: ``(N, C, frames, H, W)``.

    Grey frames (C = 1), or their displacement fields (C = 2) when ``teacher.motion`` is ``flow``.
    """
    if cfg.teacher.motion == "flow":
        return tv.eval_flow_tensor(cfg.tvus.frames)
    return tv.eval_tensor(cfg.tvus.frames)


class TeacherModule(StageModule):
    """Lightning module training the video teacher with class-weighted cross-entropy.

    Args:
        cfg: the run configuration.
        net: the teacher network.
        class_weights: ``(K,)`` loss weights (balanced), or None.
        total_steps: optimiser steps of the whole fit (for the LR schedule).
        batches: the training batches.
        monitor: ``(x, y)`` of held-out clips whose AUC is logged every epoch (curves only, no selection).
        **kw: passed to :class:`~endodistill.train.module.StageModule`.
    """

    def __init__(
        self,
        cfg: Config,
        net: TeacherNet,
        class_weights: Tensor | None,
        total_steps: int,
        batches: PlannedBatches,
        monitor: tuple[Tensor, np.ndarray] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(cfg=cfg, batches=batches, total_steps=total_steps, **kw)
        self.net = net
        self.monitor = monitor
        self.channels_last = False
        self.class_weights: Tensor | None
        self.register_buffer("class_weights", class_weights, persistent=False)

    def network(self) -> TeacherNet:
        return self.net

    def configure_model(self) -> None:
        # channels_last_3d weights and inputs where measured faster (cuDNN; oneDNN on CPU, see
        # teacher_channels_last). Done before Lightning moves the model and wraps it for DDP.
        dev = self.trainer.strategy.root_device
        self.channels_last = teacher_channels_last(self.cfg, dev)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last_3d)
        compile_if_enabled(self.net, self.cfg, dev)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["x"]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        logits = self.net(x)
        loss = task_loss(logits, batch["y"], self.class_weights)
        self.check_loss(loss)
        acc = (logits.argmax(1) == batch["y"]).float().mean()
        self.accumulate(int(batch["y"].numel()), train_loss=loss, train_acc=acc)
        return loss

    def on_train_epoch_end(self) -> None:
        row: dict[str, Any] = {**self.epoch_means(), "lr": self.lr()}
        if self.monitor is not None:
            with self.timing.section():
                probs = predict_probs(self.net, self.monitor[0], self.cfg)
                row["val_auc"] = auc_score(self.monitor[1], probs.numpy(), self.cfg.task.positive_class)
        self.end_epoch(row)

    def optimiser(self) -> torch.optim.Optimizer:
        t = self.cfg.teacher
        return adamw(param_groups(self.net, t.weight_decay), lr=t.lr)


@torch.no_grad()
def teacher_forward(net: TeacherNet, x: Tensor, cfg: Config, batch_size: int = 32) -> tuple[Tensor, Tensor]:
    """``(logits, features)`` of clips ``x`` (eval mode, batches, CPU results)."""
    was = net.training
    net.eval()
    dev = next(net.parameters()).device
    logits, feats = [], []
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = normalise_clips(x[i : i + batch_size].to(dev), cfg)
            f = net.features(xb)
            logits.append(net.backbone.fc(f).float().cpu())
            feats.append(f.float().cpu())
    finally:
        net.train(was)
    k = net.num_classes
    if not logits:
        return torch.empty(0, k), torch.empty(0, net.num_features)
    return torch.cat(logits), torch.cat(feats)


def predict_probs(net: TeacherNet, x: Tensor, cfg: Config) -> Tensor:
    """Softmax probabilities ``(N, K)`` of clips ``x``."""
    return teacher_forward(net, x, cfg)[0].softmax(dim=1)


class TeacherFit(FitSpec):
    """One teacher fit on the clips ``train_idx`` (see :func:`fit_teacher`); ``net`` is the fitted network.

    The network is built (from the fit's seed) when the spec is made, for a fresh fit and a reused one alike.
    """

    def __init__(
        self,
        cfg: Config,
        data: CohortData,
        train_idx: np.ndarray,
        seed: int,
        where: str,
        monitor_idx: np.ndarray | None,
    ) -> None:
        self.cfg, self.data, self.train_idx = cfg, data, train_idx
        self.seed, self.where, self.monitor_idx = seed, where, monitor_idx
        seed_all(seed)  # the initial weights depend on the fit's seed only, not on what ran before
        self.net = build_teacher(cfg.teacher, cfg.task.num_classes, teacher_in_channels(cfg))

    def reuse(self, unit_dir: Path, done: dict[str, Any]) -> None:
        self.net.load_state_dict(load_weights(unit_dir / self.artefact))
        dev = inference_device(self.cfg)
        # The memory layout a fresh fit leaves the network in, so a reloaded teacher's outputs are the same.
        if teacher_channels_last(self.cfg, dev):
            self.net.to(memory_format=torch.channels_last_3d)
        self.net = self.net.eval().to(dev)

    def plan(self) -> FitPlan:
        cfg, tv, idx = self.cfg, self.data.tvus, self.train_idx
        self.class_weights = balanced_class_weights(tv.labels[idx], cfg.task.num_classes)
        batches = PlannedBatches(
            len(idx), cfg.teacher.batch_size, self.seed, clip_batch_fn(tv, idx, cfg, cfg.teacher.augment)
        )
        self.monitor = None
        if self.monitor_idx is not None and len(self.monitor_idx):
            self.monitor = (teacher_inputs(tv, cfg)[self.monitor_idx], tv.labels[self.monitor_idx])
        return FitPlan(batches, cfg.teacher.epochs)

    def module(self, plan: FitPlan, timing: TimingCallback) -> TeacherModule:
        hp = {
            "stage": "teacher",
            "where": self.where,
            "seed": self.seed,
            "n_train": len(self.train_idx),
            "teacher": self.cfg.teacher.model_dump(mode="json"),
        }
        return TeacherModule(
            self.cfg,
            self.net,
            self.class_weights,
            total_steps=len(plan.batches) * plan.epochs,
            batches=plan.batches,
            monitor=self.monitor,
            hparams=hp,
            seed=self.seed,
            where=self.where,
            timing=timing,
        )

    def finish(self, unit_dir: Path, module: StageModule, timing: TimingCallback) -> dict[str, Any]:
        assert isinstance(module, TeacherModule)
        net = module.net.eval()
        save_weights(unit_dir / self.artefact, net.state_dict())
        self.net = net.to(inference_device(self.cfg))
        tv = self.data.tvus
        return {
            "where": self.where,
            "seed": self.seed,
            "n_train": len(self.train_idx),
            "train_subjects": sorted(set(tv.subjects[i] for i in self.train_idx)),
            "history": module.history,
        }


def fit_teacher(
    cfg: Config,
    data: CohortData,
    train_idx: np.ndarray,
    unit_dir: Path,
    seed: int,
    where: str,
    resume: bool,
    monitor_idx: np.ndarray | None = None,
) -> tuple[TeacherNet, dict[str, Any]]:
    """Train one teacher on the clips ``train_idx`` (or reload it when its unit is done).

    Args:
        cfg: the run configuration.
        data: the cohort.
        train_idx: clip indices to train on (labelled).
        unit_dir: the fit's directory (checkpoints, logs, ``model.safetensors``, ``done.json``).
        seed: the fit's seed.
        where: name used in messages.
        resume: continue from ``last.ckpt`` / reuse a finished fit.
        monitor_idx: held-out clips whose AUC is logged each epoch.

    Returns:
        ``(net in eval mode, info)`` with ``info["timing"]`` the fit's time breakdown.
    """
    spec = TeacherFit(cfg, data, train_idx, seed, where, monitor_idx)
    info = run_fit(unit_dir, spec, resume)
    return spec.net, info


def _write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    # Cells as the csv module writes them (the rows hold Python floats already).
    atomic_write_csv(path, rows, ["subject_id", "label", "prob", "fold", "path"], cell=lambda v: v)


def _prediction_rows(
    tv: ClipSet, held: np.ndarray, fold: np.ndarray, probs: np.ndarray, k: int, pos: int
) -> list[dict[str, Any]]:
    return [
        {
            "subject_id": tv.subjects[i],
            "label": int(tv.labels[i] == pos) if k == 2 else int(tv.labels[i]),
            "prob": float(probs[i, pos]),
            "fold": int(fold[i]),
            "path": Path(tv.paths[i]).name,
        }
        for i in held
    ]


def _shuffled_labels(data: CohortData, seed: int) -> CohortData:
    """The cohort with its labelled clips' labels permuted (seeded): what a shuffled-label teacher trains on."""
    tv = data.tvus
    labels = tv.labels.copy()
    lab = np.flatnonzero(labels >= 0)
    labels[lab] = labels[lab][np.random.default_rng([seed, 15485863]).permutation(lab.size)]
    clips = dataclasses.replace(tv, labels=labels, _eval=tv._eval)
    return dataclasses.replace(data, tvus=clips)


def _fit_data(cfg: Config, data: CohortData) -> CohortData:
    """What the teacher's fits train on: the cohort, or its shuffled-label control."""
    return _shuffled_labels(data, cfg.seed) if cfg.teacher.shuffle_labels else data


@dataclasses.dataclass(frozen=True)
class TeacherCVFit:
    """One fit of the teacher's cross-validation: ensemble member ``member`` of fold ``fold``."""

    index: int  # position in the fold x member loop (a spread run's rank i % world trains fit i)
    fold: int
    member: int
    train: np.ndarray  # clip indices
    test: np.ndarray
    seed: int
    unit: str  # the fit's directory under RUN_DIR/teacher
    where: str  # its name in messages


def teacher_cv_fits(cfg: Config, data: CohortData) -> list[TeacherCVFit]:
    """The teacher's cross-validation fits, fold by fold, ``teacher.ensemble`` members each.

    Member 0 of fold ``f`` keeps the seed and the unit (``fold_f``) of a teacher without an ensemble, so
    ``ensemble: 1`` trains exactly what it did before the option existed.
    """
    tv = data.tvus
    lab = np.flatnonzero(tv.labels >= 0)
    folds = _cv_folds(cfg, [tv.subjects[i] for i in lab], tv.labels[lab])
    fits: list[TeacherCVFit] = []
    for f, test_subjects in enumerate(folds):
        test_set = set(test_subjects)
        te = np.array([i for i in lab if tv.subjects[i] in test_set], dtype=np.int64)
        tr = np.array([i for i in lab if tv.subjects[i] not in test_set], dtype=np.int64)
        for m in range(cfg.teacher.ensemble):
            fits.append(
                TeacherCVFit(
                    index=len(fits),
                    fold=f,
                    member=m,
                    train=tr,
                    test=te,
                    seed=fit_seed(cfg.seed, "teacher", f, "cv" if m == 0 else f"cv member {m}"),
                    unit=rundir.teacher_member_name(f, m),
                    where=f"teacher fold {f}" + (f" member {m}" if m else ""),
                )
            )
    return fits


def train_teacher_share(
    cfg: Config, data: CohortData, run_dir: Path, owns: Callable[[int], bool], resume: bool = False
) -> list[str]:
    """Train the teacher's cross-validation fits ``i`` with ``owns(i)`` (a spread run's share of them).

    The fits land in their unit directories; :func:`train_teacher` with ``reuse_fits`` then reloads them.

    Returns:
        The units this call trained or found done.
    """
    if not cfg.teacher.cross_validated:
        return []  # one hold-out fit (and maybe a full one): nothing to spread
    fit_data = _fit_data(cfg, data)
    out = Path(run_dir) / "teacher"
    done = []
    for fit in teacher_cv_fits(cfg, data):
        if owns(fit.index):
            fit_teacher(cfg, fit_data, fit.train, out / fit.unit, fit.seed, fit.where, resume, fit.test)
            done.append(fit.unit)
    return done


def _cv_folds(cfg: Config, subjects: list[str], labels: np.ndarray) -> list[list[str]]:
    k = cfg.teacher.folds if cfg.teacher.folds > 1 else max(2, round(1 / cfg.teacher.holdout_fraction))
    return stratified_group_folds(subjects, labels.tolist(), k, cfg.seed)


def train_teacher(
    cfg: Config,
    data: CohortData,
    run_dir: Path,
    resume: bool = False,
    echo: Callable[[str], None] = print,
    reuse_fits: bool = False,
) -> dict[str, Any]:
    """Train, evaluate and freeze the teacher; store its outputs on every clip in ``RUN_DIR/teacher``.

    Args:
        cfg: the run configuration.
        data: the cohort.
        run_dir: the run directory.
        resume: reuse finished sub-fits and continue interrupted ones.
        echo: where progress lines go.
        reuse_fits: reload the cross-validation fits that are done (other processes of a spread run trained
            them, :func:`train_teacher_share`) even in a fresh run.

    Returns:
        The teacher's metrics (also in ``teacher/metrics.json``), with ``timing`` and ``fits``.

    Raises:
        InputError: fewer than two labelled clips per class.
    """
    out = Path(run_dir) / "teacher"
    done = read_done(out) if resume else None
    if done is not None and (out / "outputs.safetensors").is_file():
        return done["metrics"]
    prepare_unit(out, resume)
    t0 = time.perf_counter()
    tv = data.tvus
    k = cfg.task.num_classes
    pos = cfg.task.positive_class
    lab = np.flatnonzero(tv.labels >= 0)
    counts = np.bincount(tv.labels[lab], minlength=k)
    if lab.size == 0 or counts.min() < 2:
        raise InputError(
            data.manifest,
            f"the teacher needs >= 2 labelled '{cfg.task.teacher_modality}' clips per class, got {counts.tolist()}",
        )
    subj = [tv.subjects[i] for i in lab]
    x_eval = teacher_inputs(tv, cfg)
    fit_data = _fit_data(cfg, data)
    n = len(tv)
    fits: dict[str, Any] = {}
    heldout_probs = np.full((n, k), np.nan)
    heldout_fold = np.full(n, -1)
    use_cv = cfg.teacher.cross_validated
    oof_logits = torch.zeros(n, k)
    oof_feats: Tensor | None = None
    unl = np.flatnonzero(tv.labels < 0)
    if use_cv:
        cv = teacher_cv_fits(cfg, data)
        n_folds = max(fit.fold for fit in cv) + 1
        scheme = f"{n_folds}-fold cross-validation"
        if cfg.teacher.ensemble > 1:
            scheme += f", {cfg.teacher.ensemble} networks per fold"
        unl_logits, unl_feats = [], []
        for f in range(n_folds):
            members = [fit for fit in cv if fit.fold == f]
            te = members[0].test
            t1 = time.perf_counter()
            outs, unl_outs = [], []
            for fit in members:
                net, info = fit_teacher(
                    cfg, fit_data, fit.train, out / fit.unit, fit.seed, fit.where, resume or reuse_fits, te
                )
                outs.append(teacher_forward(net, x_eval[te], cfg))
                if unl.size:
                    unl_outs.append(teacher_forward(net, x_eval[unl], cfg))
                fits[fit.unit] = {
                    **{kk: v for kk, v in info.items() if kk != "history"},
                    "test_subjects": sorted(tv.subjects[i] for i in te),
                }
            # The fold's members as one model: the mean of their logits (and features).
            logits, feats = (
                torch.stack([o[0] for o in outs]).mean(0),
                torch.stack([o[1] for o in outs]).mean(0),
            )
            if oof_feats is None:
                oof_feats = torch.zeros(n, feats.shape[1])
            oof_logits[te], oof_feats[te] = logits, feats
            heldout_probs[te] = logits.softmax(1).numpy()
            heldout_fold[te] = f
            if unl_outs:
                unl_logits.append(torch.stack([o[0] for o in unl_outs]).mean(0))
                unl_feats.append(torch.stack([o[1] for o in unl_outs]).mean(0))
            a = auc_score(tv.labels[te], heldout_probs[te], pos)
            echo(f"[teacher fold {f + 1}/{n_folds}] held-out AUC {a:.3f} ({time.perf_counter() - t1:.1f} s)")
        if unl.size and oof_feats is not None:
            # Unlabelled clips were in no training fold: average the fold teachers.
            oof_logits[unl] = torch.stack(unl_logits).mean(0)
            oof_feats[unl] = torch.stack(unl_feats).mean(0)
    else:
        _tr_s, te_s = holdout_split(subj, tv.labels[lab].tolist(), cfg.teacher.holdout_fraction, cfg.seed)
        te_set = set(te_s)
        te = np.array([i for i in lab if tv.subjects[i] in te_set], dtype=np.int64)
        tr = np.array([i for i in lab if tv.subjects[i] not in te_set], dtype=np.int64)
        scheme = f"hold-out ({len(te_s)} of {len(set(subj))} subjects)"
        t1 = time.perf_counter()
        net, info = fit_teacher(
            cfg,
            fit_data,
            tr,
            out / "holdout",
            fit_seed(cfg.seed, "teacher", None, "holdout"),
            "teacher hold-out",
            resume,
            te,
        )
        heldout_probs[te] = predict_probs(net, x_eval[te], cfg).numpy()
        heldout_fold[te] = 0
        fits["holdout"] = {
            **{kk: v for kk, v in info.items() if kk != "history"},
            "test_subjects": sorted(te_set),
        }
        a = auc_score(tv.labels[te], heldout_probs[te], pos)
        echo(f"[teacher hold-out] held-out AUC {a:.3f} ({time.perf_counter() - t1:.1f} s)")

    if cfg.teacher.targets == "oof":
        logits, feats = oof_logits, oof_feats if oof_feats is not None else torch.zeros(n, 1)
    else:
        t1 = time.perf_counter()
        net, info = fit_teacher(
            cfg,
            fit_data,
            lab,
            out / "full",
            fit_seed(cfg.seed, "teacher", None, "full"),
            "teacher (all clips)",
            resume,
            None,
        )
        logits, feats = teacher_forward(net, x_eval, cfg)
        fits["full"] = {kk: v for kk, v in info.items() if kk != "history"}
        echo(f"[teacher all clips] trained on {lab.size} clips ({time.perf_counter() - t1:.1f} s)")
    probs = logits.softmax(1)

    held = np.flatnonzero(heldout_fold >= 0)
    y_held = tv.labels[held]
    p_held = heldout_probs[held]
    metrics: dict[str, Any] = {}
    if k == 2:
        metrics.update(binary_metrics((y_held == pos).astype(int), p_held[:, pos]))
    else:
        mc = multiclass_auc(y_held, p_held)
        metrics.update(auc=mc["macro"], per_class_auc=mc["per_class"])
    metrics.update(
        scheme=scheme,
        targets=cfg.teacher.targets,
        arch=cfg.teacher.arch,
        n_clips=int(n),
        n_labelled_clips=int(lab.size),
        n_heldout_clips=int(held.size),
        # The AUC of the KD targets themselves on all labelled clips: near 1 for in-sample targets
        # (an over-confident teacher), close to the held-out AUC for cross-fitted ones.
        targets_auc=auc_score(tv.labels[lab], probs[lab].numpy(), pos),
        fold_aucs=[
            auc_score(tv.labels[heldout_fold == f], heldout_probs[heldout_fold == f], pos)
            for f in range(int(heldout_fold.max()) + 1)
        ],
    )
    # Under cross-validation every labelled clip is held out once: the pooled out-of-fold AUC (DeLong CI)
    # is the teacher's estimate on new patients, and `auc` is that same number (the report and the model
    # metadata read `auc`). A hold-out leaves these None rather than pass its smaller sample off as CV.
    metrics.update(
        cv_auc=metrics.get("auc") if use_cv else None,
        cv_auc_ci95=metrics.get("auc_ci95") if use_cv else None,
    )
    rows = _prediction_rows(tv, held, heldout_fold, heldout_probs, k, pos)
    t_base = time.perf_counter()
    if cfg.teacher.clip_baseline:
        # The same clips, frames and folds as the teacher; each fold's choices see its training part only.
        feature_set = cfg.teacher.clip_feature_set
        if feature_set == "coupling":
            clip_x, clip_name = clip_coupling_features(teacher_inputs(tv, cfg)), coupling_name()
        else:
            clip_x, clip_name = (
                clip_motion_features(tv.eval_tensor(cfg.tvus.frames), GRID),
                features_name(GRID),
            )
        base = cross_validated_logreg(
            clip_x,
            tv.labels,
            tv.subjects,
            heldout_fold,
            k,
            pos,
            cfg.seed,
        )
        base_probs = base.pop("probs")
        metrics["clip_baseline"] = {**base, "feature_set": feature_set, "features": clip_name}
        if k == 2 and held.size and len(np.unique(y_held)) == 2:
            # Both scored every held-out clip: DeLong's paired test says whether the gap is more than noise.
            t = delong_test((y_held == pos).astype(int), p_held[:, pos], base_probs[held, pos])
            metrics["clip_baseline"]["teacher_minus_baseline"] = t["diff"]
            metrics["clip_baseline"]["p_vs_teacher"] = t["p"]
        _write_predictions(
            out / "clip_baseline_predictions.csv",
            [{**r, "prob": float(base_probs[i, pos])} for r, i in zip(rows, held)],
        )
    t_base = time.perf_counter() - t_base
    metrics = nan_to_none(metrics)

    save_weights(out / "outputs.safetensors", {"logits": logits, "probs": probs, "features": feats})
    atomic_write_json(
        out / "outputs.json",
        {
            "subjects": tv.subjects,
            "labels": tv.labels.tolist(),
            "paths": tv.paths,
            "targets": cfg.teacher.targets,
            "class_names": cfg.task.class_names,
        },
    )
    _write_predictions(out / rundir.PREDICTIONS, rows)
    atomic_write_json(out / "metrics.json", metrics)
    timing = {
        "wall": round(time.perf_counter() - t0, 4),
        "fits": {kk: v.get("timing") for kk, v in fits.items()},
        "clip_baseline": round(t_base, 4),
    }
    write_done(out, {"metrics": metrics, "fits": fits, "timing": timing})
    what = f"cross-validated AUC over all {held.size} labelled clips" if use_cv else "held-out AUC"
    echo(f"[teacher] {what} {_auc_text(metrics)} ({scheme}), targets: {cfg.teacher.targets}")
    if "clip_baseline" in metrics:
        echo(
            f"[teacher] clip baseline ({metrics['clip_baseline']['feature_set']} motion features + logistic "
            f"regression, same folds) AUC "
            f"{_auc_text(metrics['clip_baseline'])}{_paired_text(metrics['clip_baseline'])}"
        )
    return metrics


def _paired_text(base: dict[str, Any]) -> str:
    """``; teacher - baseline +0.012, DeLong p 0.41`` when the paired test was run, else empty."""
    d, p = base.get("teacher_minus_baseline"), base.get("p_vs_teacher")
    if d is None or p is None:
        return ""
    return f"; teacher - baseline {d:+.3f}, paired DeLong p {p:.2g}"


def _auc_text(m: dict[str, Any]) -> str:
    """``0.912 [95% CI 0.850, 0.970]`` from a metrics dict's ``auc`` and ``auc_ci95`` (n/a where undefined)."""
    auc, ci = m.get("auc"), m.get("auc_ci95")
    if auc is None:
        return "n/a"
    if not ci or None in ci:
        return f"{auc:.3f}"
    return f"{auc:.3f} [95% CI {ci[0]:.3f}, {ci[1]:.3f}]"


def load_teacher_outputs(run_dir: Path) -> TeacherOutputs:
    """Read the frozen teacher outputs of a run.

    Raises:
        InputError: the teacher stage has not finished in ``run_dir``.
    """
    out = Path(run_dir) / "teacher"
    f, j = out / "outputs.safetensors", out / "outputs.json"
    if not f.is_file() or not j.is_file():
        raise InputError(out, "no teacher outputs: run the teacher stage first (endodistill train teacher)")
    t = load_weights(f)
    meta = json.loads(j.read_text(encoding="utf-8"))
    return TeacherOutputs(
        logits=t["logits"],
        probs=t["probs"],
        features=t["features"],
        labels=np.asarray(meta["labels"], dtype=np.int64),
        subjects=list(meta["subjects"]),
        paths=list(meta["paths"]),
        targets=str(meta.get("targets", "in_sample")),
    )
