"""Stage 3: distillation + fine-tuning of the MRI student for one (method, fold).

Every epoch each labelled training MRI case is paired with a TVUS clip of the same label, drawn anew from
``(fit seed, epoch)`` (:func:`~endodistill.train.pairing.label_matched_pairs`); its KD target is the frozen
teacher's output on that clip (or the class prototype). The loss is ``a_e * L_KD + (1 - a_e) * L_task``
with ``a_e`` from the method's schedule. Model selection uses an inner validation split of the training
subjects only (best validation AUC, ties to the lower validation loss); the test fold is predicted once,
with the selected weights. The TVUS clips of test and validation subjects (when a subject has both
modalities) are left out of the pairing pool.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from endodistill import rundir
from endodistill.config import Config, MethodConfig
from endodistill.errors import InputError
from endodistill.evaluate.metrics import auc_score
from endodistill.models.student import build_student, load_mae_encoder
from endodistill.models.weights import load_weights, save_weights
from endodistill.train.batches import PlannedBatches
from endodistill.train.data import CohortData
from endodistill.train.fit import FitPlan, FitSpec, run_fit
from endodistill.train.inference import inference_device, predict_logits
from endodistill.train.losses import (
    balanced_class_weights,
    balanced_sample_weights,
    kd_loss,
    kd_weight,
    mixed_loss,
    task_loss,
)
from endodistill.train.module import StageModule
from endodistill.train.optim import adamw, param_groups
from endodistill.train.pairing import class_prototypes, control_targets, label_matched_pairs, noisy_partners
from endodistill.train.pretrain import augment_volumes
from endodistill.train.seeding import seed_all
from endodistill.train.teacher import TeacherOutputs
from endodistill.train.trainer import TimingCallback
from endodistill.utils import atomic_write_csv

log = logging.getLogger("endodistill")


class StudentModule(StageModule):
    """Lightning module of distillation + fine-tuning with in-fold model selection.

    Args:
        cfg: the run configuration.
        method: the method (init, KD loss, schedule).
        net: the student (already initialised).
        class_weights: ``(K,)`` task-loss weights, or None.
        total_steps: optimiser steps of the fit.
        batches: training batches.
        val: ``(x, y)`` of the inner validation subjects, or None (then the last epoch is kept).
        **kw: passed to :class:`StageModule`.
    """

    def __init__(
        self,
        cfg: Config,
        method: MethodConfig,
        net: torch.nn.Module,
        class_weights: Tensor | None,
        total_steps: int,
        batches: PlannedBatches,
        val: tuple[Tensor, np.ndarray] | None,
        **kw: Any,
    ) -> None:
        super().__init__(cfg=cfg, batches=batches, total_steps=total_steps, **kw)
        self.method = method
        self.net = net
        self.val = val
        self.class_weights: Tensor | None
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.best_state: dict[str, Tensor] | None = None
        self.best: dict[str, Any] = {"auc": None, "loss": None, "epoch": None}

    def network(self) -> torch.nn.Module:
        return self.net

    def kd_weight(self) -> float:
        """``a_e`` of the current epoch."""
        return float(kd_weight(self.method.schedule, int(self.current_epoch), self.cfg.finetune.epochs))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.net(batch["x"])
        a = self.kd_weight()
        kd = kd_loss(self.method.kd_loss, logits, batch["t"], self.method.temperature)
        task = task_loss(logits, batch["y"], self.class_weights)
        loss = mixed_loss(a, kd, task)  # exactly kd at a = 1 and exactly task at a = 0
        self.check_loss(loss)
        self.accumulate(int(batch["y"].numel()), train_loss=loss, kd_loss=kd, task_loss=task)
        return loss

    @torch.no_grad()
    def _validate(self) -> tuple[float, float]:
        assert self.val is not None
        x, y = self.val
        was = self.net.training
        self.net.eval()
        try:
            logits = predict_logits(self.net, x, self.cfg.finetune.batch_size, self.device)
        finally:
            self.net.train(was)
        loss = float(F.cross_entropy(logits, torch.from_numpy(y)))
        probs = logits.softmax(1).numpy()
        return auc_score(y, probs, self.cfg.task.positive_class), loss

    def on_train_epoch_end(self) -> None:
        row: dict[str, Any] = {**self.epoch_means(), "kd_weight": self.kd_weight(), "lr": self.lr()}
        better = True
        if self.val is not None:
            with self.timing.section():
                auc, loss = self._validate()
            row.update(val_auc=auc, val_loss=loss)
            # Best validation AUC; ties (and undefined AUCs of a one-class validation set) go to the
            # lower validation loss.
            key = (auc if math.isfinite(auc) else -math.inf, -loss)
            if self.best["epoch"] is not None:
                b_auc = self.best["auc"] if self.best["auc"] is not None else -math.inf
                better = key > (b_auc, -self.best["loss"])
            if better:
                self.best = {
                    "auc": auc if math.isfinite(auc) else None,
                    "loss": loss,
                    "epoch": int(self.current_epoch),
                }
        else:
            # No selection: the last epoch's weights are the fit's, nothing to copy.
            self.best = {"auc": None, "loss": None, "epoch": int(self.current_epoch)}
            self.best_state, better = None, False
        if better:
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        self.end_epoch(row)

    def extra_state(self) -> dict[str, Any]:
        return {"best": dict(self.best), "best_state": self.best_state}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.best = dict(state.get("best", self.best))
        self.best_state = state.get("best_state")

    def peak_lr(self) -> float:
        """The schedule's peak learning rate (``finetune.lr``)."""
        return self.cfg.finetune.lr

    def optimiser(self) -> torch.optim.Optimizer:
        f = self.cfg.finetune
        lr = self.peak_lr()
        return adamw(layer_decay_groups(self.net, f.weight_decay, lr, f.layer_decay), lr=lr)


def _layer_id(name: str, num_layers: int) -> int:
    """Depth of a student parameter: 0 = tokens and patch embedding, i + 1 = block i, num_layers + 1 = the rest."""
    if name.startswith(("cls_token", "patch_embedding.")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def layer_decay_groups(
    net: torch.nn.Module, weight_decay: float, lr: float, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise learning-rate decay (the MAE fine-tuning recipe).

    Block ``i`` (0-based) gets ``lr * layer_decay**(num_layers - i)``, the cls token, position and patch
    embedding ``lr * layer_decay**(num_layers + 1)``, the final norm and the head ``lr``. The weight-decay /
    no-decay split of :func:`param_groups` is kept within every depth. Hand-written: MONAI and torch have no
    layer-decay helper.

    Args:
        net: the student (``blocks`` is its list of transformer blocks).
        weight_decay: AdamW weight decay of the decayed parameters.
        lr: base learning rate (that of the head).
        layer_decay: per-block factor in ``(0, 1]``; 1.0 returns exactly :func:`param_groups`.

    Returns:
        Parameter groups, each with ``params``, ``weight_decay``, ``lr`` and ``lr_scale``; the head's first
        (so the logged lr of group 0 stays the base lr).
    """
    if layer_decay == 1.0:
        return param_groups(net, weight_decay)
    num_layers = len(net.blocks)  # type: ignore[arg-type]
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for group in param_groups(net, weight_decay):
        ids = {id(p) for p in group["params"]}
        for name, p in net.named_parameters():
            if id(p) not in ids:
                continue
            layer = _layer_id(name, num_layers)
            key = (layer, group["weight_decay"] > 0)
            if key not in groups:
                scale = layer_decay ** (num_layers + 1 - layer)
                groups[key] = {
                    "params": [],
                    "weight_decay": group["weight_decay"],
                    "lr": lr * scale,
                    "lr_scale": scale,
                }
            groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], not k[1]))]


def student_batch_fn(
    x: Tensor,
    y: np.ndarray,
    subjects: list[str],
    teacher: TeacherOutputs,
    pool: np.ndarray,
    method: MethodConfig,
    seed: int,
    num_classes: int,
    augment: bool,
    translate: int = 0,
) -> Callable[[np.ndarray, np.random.Generator, int], dict[str, Tensor]]:
    """Training batches: volumes, labels and the KD target of each case's TVUS partner of this epoch.

    Args:
        x: training volumes ``(N, 1, ...)``.
        y: their labels.
        subjects: their subject ids (for ``paired`` pairing).
        teacher: frozen teacher outputs on every clip.
        pool: clip indices the pairing may draw from.
        method: the method (pairing mode, KD loss).
        seed: the fit's seed (pairs are a function of ``(seed, epoch)``).
        num_classes: K.
        augment: flips and intensity jitter.
        translate: random translation in voxels (:func:`~endodistill.train.pretrain.augment_volumes`).
    """
    pool_labels = teacher.labels[pool]
    pool_logits = control_targets(
        teacher.logits[torch.from_numpy(pool)],
        teacher.probs[torch.from_numpy(pool)],
        pool_labels,
        method.kd_target,
        seed,
    )
    pool_subjects = [teacher.subjects[i] for i in pool]
    protos = (
        class_prototypes(pool_logits, pool_labels, num_classes) if method.kd_loss == "prototype" else None
    )
    y_t = torch.from_numpy(y.astype(np.int64))
    pairs: dict[int, Tensor] = {}

    def targets(epoch: int) -> Tensor:
        if epoch not in pairs:
            if protos is not None:
                tgt = protos[y_t]
            else:
                p = label_matched_pairs(y, pool_labels, seed, epoch, subjects, pool_subjects, method.pairing)
                p = noisy_partners(p, y, pool_labels, method.pairing_noise, seed, epoch)
                tgt = pool_logits[torch.from_numpy(p)]
            pairs.clear()
            pairs[epoch] = tgt
        return pairs[epoch]

    def make(idx: np.ndarray, rng: np.random.Generator, epoch: int) -> dict[str, Tensor]:
        it = torch.from_numpy(idx)
        xb = x[it]
        return {
            "x": augment_volumes(xb, rng, translate) if augment else xb,
            "y": y_t[it],
            "t": targets(epoch)[it],
            "i": it,
        }

    return make


def _write_predictions(
    path: Path, subjects: list[str], labels: np.ndarray, probs: np.ndarray, pos: int
) -> None:
    k = probs.shape[1]
    fields = ["subject_id", "label", "prob"] + ([f"prob_{c}" for c in range(k)] if k > 2 else [])
    rows = [
        dict(zip(fields, [s, int(lab), float(p[pos]), *([float(v) for v in p] if k > 2 else [])]))
        for s, lab, p in zip(subjects, labels, probs)
    ]
    atomic_write_csv(path, rows, fields)  # floats as repr: they read back exactly


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(subjects, labels, probs (N, K))`` from a fit's ``predictions.csv`` (K = 2 rebuilt from ``prob``)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    subjects = [r["subject_id"] for r in rows]
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    if rows and "prob_0" in rows[0]:
        k = sum(1 for c in rows[0] if c.startswith("prob_"))
        probs = np.array([[float(r[f"prob_{c}"]) for c in range(k)] for r in rows])
    else:
        p = np.array([float(r["prob"]) for r in rows])
        probs = np.stack([1 - p, p], axis=1) if rows else np.zeros((0, 2))
    return subjects, labels, probs


def init_from_mae(
    net: torch.nn.Module,
    load: Callable[..., None],
    method_name: str,
    where: str,
    encoder_path: Path | None,
) -> None:
    """Load the MAE encoder at ``encoder_path`` into ``net`` with ``load`` (a method with ``init: mae``).

    Raises:
        InputError: the encoder file is missing (the pretrain stage has not run).
    """
    if encoder_path is None or not Path(encoder_path).is_file():
        raise InputError(
            encoder_path,
            f"{where}: method '{method_name}' starts from the MAE encoder, which is missing: run the pretrain stage first",
        )
    load(net, load_weights(encoder_path), source=encoder_path)


def selected_network(
    module: StudentModule, unit_dir: Path, cfg: Config
) -> tuple[torch.nn.Module, torch.device]:
    """The fit's selected weights (best validation epoch, else the last) saved as ``model.safetensors``.

    Returns:
        ``(net in eval mode on the inference device, that device)``.
    """
    net = module.net
    if module.best_state is not None:
        net.load_state_dict(module.best_state)
    net.eval()
    save_weights(unit_dir / rundir.WEIGHTS, net.state_dict())
    dev = inference_device(cfg)
    net.to(dev)
    return net, dev


def predict_test(
    net: torch.nn.Module, x: Tensor, labels: np.ndarray, cfg: Config, dev: torch.device
) -> tuple[np.ndarray, float]:
    """``(probs (N, K), AUC)`` of the test volumes ``x`` (zero rows and NaN when there are none)."""
    if not x.shape[0]:
        return np.zeros((0, cfg.task.num_classes)), float("nan")
    probs = predict_logits(net, x, cfg.finetune.batch_size, dev).softmax(1).numpy()
    return probs, auc_score(labels, probs, cfg.task.positive_class)


class StudentFit(FitSpec):
    """One distillation + fine-tuning fit of a method on a fold (see :func:`finetune`)."""

    def __init__(
        self,
        cfg: Config,
        method_name: str,
        data: CohortData,
        teacher: TeacherOutputs,
        split: dict[str, list[str]],
        seed: int,
        where: str,
        encoder_path: Path | None,
    ) -> None:
        self.cfg, self.method_name, self.data, self.teacher = cfg, method_name, data, teacher
        self.split, self.seed, self.where, self.encoder_path = split, seed, where, encoder_path

    def plan(self) -> FitPlan:
        cfg, split, teacher, where, seed = self.cfg, self.split, self.teacher, self.where, self.seed
        self.method = cfg.protocol.methods[self.method_name]
        k = cfg.task.num_classes
        lab = self.data.labelled
        self.tr, self.va = lab.index(split["train"]), lab.index(split.get("val", []))
        self.te = lab.index(split.get("test", []))
        tr, va = self.tr, self.va
        if tr.size == 0:
            raise InputError(None, f"{where}: no training subjects")
        excluded = set(split.get("test", [])) | set(split.get("val", []))
        self.pool = pool = np.array(
            [
                i
                for i in range(len(teacher.labels))
                if teacher.labels[i] >= 0 and teacher.subjects[i] not in excluded
            ],
            dtype=np.int64,
        )
        missing = sorted(set(lab.labels[tr].tolist()) - set(teacher.labels[pool].tolist()))
        if missing:
            raise InputError(
                None, f"{where}: class(es) {missing} have MRI training cases but no TVUS clip to pair with"
            )

        seed_all(seed)  # the head (and scratch encoders) start from the fit's seed, whatever ran before
        self.net = build_student(cfg)
        if self.method.init == "mae":
            init_from_mae(self.net, load_mae_encoder, self.method_name, where, self.encoder_path)

        y_tr = lab.labels[tr]
        f = cfg.finetune
        self.class_weights = balanced_class_weights(y_tr, k) if f.class_balance == "weights" else None
        sw = balanced_sample_weights(y_tr, k).numpy() if f.class_balance == "sampler" else None
        make = student_batch_fn(
            lab.x[torch.from_numpy(tr)],
            y_tr,
            [lab.subjects[i] for i in tr],
            teacher,
            pool,
            self.method,
            seed,
            k,
            f.augment,
            f.translate,
        )
        batches = PlannedBatches(tr.size, f.batch_size, seed, make, sample_weights=sw)
        self.val = (lab.x[torch.from_numpy(va)], lab.labels[va]) if va.size else None
        return FitPlan(batches, f.epochs)

    def module(self, plan: FitPlan, timing: TimingCallback) -> StudentModule:
        f = self.cfg.finetune
        hp = {
            "stage": "distill",
            "where": self.where,
            "method": self.method_name,
            "seed": self.seed,
            "n_train": int(self.tr.size),
            "n_val": int(self.va.size),
            "config": {"method": self.method.model_dump(mode="json"), "finetune": f.model_dump(mode="json")},
        }
        return StudentModule(
            self.cfg,
            self.method,
            self.net,
            self.class_weights,
            total_steps=len(plan.batches) * plan.epochs,
            batches=plan.batches,
            val=self.val,
            hparams=hp,
            seed=self.seed,
            where=self.where,
            timing=timing,
        )

    def finish(self, unit_dir: Path, module: StageModule, timing: TimingCallback) -> dict[str, Any]:
        assert isinstance(module, StudentModule)
        lab, tr, va, te, pos = self.data.labelled, self.tr, self.va, self.te, self.cfg.task.positive_class
        net, dev = selected_network(module, unit_dir, self.cfg)
        with timing.section():
            probs, test_auc = predict_test(net, lab.x[torch.from_numpy(te)], lab.labels[te], self.cfg, dev)
        _write_predictions(
            unit_dir / rundir.PREDICTIONS, [lab.subjects[i] for i in te], lab.labels[te], probs, pos
        )
        best = module.best
        return {
            "method": self.method_name,
            "where": self.where,
            "seed": self.seed,
            "train_subjects": sorted(lab.subjects[i] for i in tr),
            "val_subjects": sorted(lab.subjects[i] for i in va),
            "test_subjects": sorted(lab.subjects[i] for i in te),
            "tvus_subjects": sorted({self.teacher.subjects[i] for i in self.pool}),
            "best_epoch": best["epoch"],
            "val_auc": best["auc"],
            "val_loss": best["loss"],
            "test_auc": test_auc if math.isfinite(test_auc) else None,
            "train_loss_first": module.history[0].get("train_loss") if module.history else None,
            "train_loss_last": module.history[-1].get("train_loss") if module.history else None,
        }


def finetune(
    cfg: Config,
    method_name: str,
    data: CohortData,
    teacher: TeacherOutputs,
    split: dict[str, list[str]],
    unit_dir: Path,
    seed: int,
    where: str,
    resume: bool = False,
    encoder_path: Path | None = None,
) -> dict[str, Any]:
    """Fit one student (method, fold), select it on the inner validation split, predict the test subjects.

    Args:
        cfg: the run configuration (``cfg.protocol.methods[method_name]`` is the method).
        method_name: the method's name.
        data: the cohort.
        teacher: the frozen teacher outputs.
        split: ``{"train", "val", "test"}`` subject lists (test may be empty: the final model).
        unit_dir: the fit's directory.
        seed: the fit's seed.
        where: name used in messages (``"fold 2 mae_kd_ce"``).
        resume: reuse a finished fit / continue from ``last.ckpt``.
        encoder_path: MAE encoder weights (needed when the method's init is ``mae``).

    Returns:
        The fit's info (also ``done.json``): subjects trained/validated/tested on, TVUS subjects used,
        selected epoch, validation and test AUC, timing. Predictions are in ``unit_dir/predictions.csv``
        and the selected weights in ``unit_dir/model.safetensors``.

    Raises:
        InputError: a missing MAE encoder, or a class without TVUS clips to pair with.
    """
    spec = StudentFit(cfg, method_name, data, teacher, split, seed, where, encoder_path)
    return run_fit(unit_dir, spec, resume)
