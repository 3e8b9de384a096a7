"""The joint method: one network trained on a fold's labelled MRI and labelled TVUS clips together.

Design (ours; the follow-up paper's details are not public, see :mod:`endodistill.models.joint`):

* **Folds.** MRI: the protocol's folds, as for every method (same ``splits.json``, same fit seed, same
  inner validation split). Clips: fold ``k`` tests the clips of the ``k``-th subject group of
  :func:`clip_folds`, the teacher's own CV folds whenever ``teacher.folds == protocol.folds`` (the demo
  and paper presets). One fit per fold therefore gives an MRI out-of-fold prediction for every labelled
  MRI subject and a TVUS out-of-fold prediction for every labelled clip.
* **No subject leaks.** Fold ``k`` trains on the MRI of its training subjects that are not tested on TVUS
  in fold ``k``, and on the clips of every subject that is neither tested (on TVUS or MRI) nor an MRI
  validation subject of fold ``k``. With unpaired cohorts no one is dropped; with paired subjects a
  subject is never trained on in a fold that tests it in either modality.
* **Batches.** An epoch is the MRI plan of the student (:class:`~endodistill.train.batches.PlannedBatches`
  over the training volumes, the student's augmentation); every MRI batch of ``n`` cases is joined by ``n``
  training clips drawn without replacement from the batch's own generator, built by the teacher's
  :func:`~endodistill.train.teacher.clip_batch_fn` (random temporal window, the teacher's augmentation
  and motion transform). Equal counts keep DDP's row sharding of a global batch the same for both
  modalities. Batches stay pure functions of ``(fit seed, epoch, batch)``, so resuming is exact.
* **Loss.** ``CE_mri + joint.clip_weight * CE_tvus + align_weight * L_align``, each cross-entropy
  class-balanced on its own modality's training labels (``finetune.class_balance: weights``).
  ``L_align`` (optional, the method's ``align_weight``) is the cross-modal alignment of label-matched
  data: for every class present in both halves of the batch, ``1 - cos`` between the mean shared feature
  (the head's input) of its MRI cases and that of its clips, averaged over those classes.
* **Initialisation.** ``init: mae`` loads the MRI patch embedding, cls token, blocks and final norm from
  the run's MAE encoder (the clip tokenizer and the head start at random); ``init: scratch`` none.
* **Optimisation and selection.** The student's: AdamW with its weight decay and layer-wise decay (the clip
  tokenizer at the full rate) at ``joint.lr`` (else the student's), warm-up + cosine, ``joint.epochs`` epochs;
  selection on the inner validation split's MRI AUC (the target task), else the last epoch.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from endodistill import rundir
from endodistill.config import Config, MethodConfig
from endodistill.data.splits import stratified_group_folds
from endodistill.errors import InputError
from endodistill.evaluate.delong import delong_test
from endodistill.evaluate.metrics import auc_score, binary_metrics
from endodistill.models.joint import ClipPath, build_joint, load_mae_into_joint
from endodistill.train.batches import PlannedBatches
from endodistill.train.data import CohortData
from endodistill.train.finetune import (
    StudentModule,
    _write_predictions,
    init_from_mae,
    predict_test,
    selected_network,
)
from endodistill.train.fit import FitPlan, FitSpec, run_fit
from endodistill.train.inference import predict_logits
from endodistill.train.losses import balanced_class_weights, balanced_sample_weights, task_loss
from endodistill.train.module import StageModule
from endodistill.train.pretrain import augment_volumes
from endodistill.train.seeding import seed_all
from endodistill.train.teacher import clip_batch_fn, teacher_inputs
from endodistill.train.trainer import TimingCallback
from endodistill.utils import atomic_write_csv

CLIP_PREDICTIONS = "clip_predictions.csv"


def is_joint(cfg: Config, method: str) -> bool:
    """Whether ``method`` is of kind ``joint``."""
    return cfg.protocol.methods[method].kind == "joint"


def joint_epochs(cfg: Config) -> int:
    """Epochs of a joint fit."""
    return cfg.joint.epochs or cfg.finetune.epochs


def clip_folds(cfg: Config, data: CohortData) -> list[list[str]]:
    """The TVUS test subjects of each protocol fold: the teacher's CV folds with ``protocol.folds`` folds."""
    tv = data.tvus
    lab = np.flatnonzero(tv.labels >= 0)
    # train.teacher._cv_folds with k = protocol.folds: the very folds of the teacher when the numbers agree.
    return stratified_group_folds(
        [tv.subjects[i] for i in lab], tv.labels[lab].tolist(), cfg.protocol.folds, cfg.seed
    )


def prototype_alignment(f_a: Tensor, y_a: Tensor, f_b: Tensor, y_b: Tensor, num_classes: int) -> Tensor:
    """Mean over the classes present in both sets of ``1 - cos(mean f_a of the class, mean f_b of the class)``.

    Zero (with a graph, so DDP sees every parameter used) when no class is in both.
    """
    terms = []
    for c in range(num_classes):
        ma, mb = y_a == c, y_b == c
        if bool(ma.any()) and bool(mb.any()):
            pa, pb = f_a[ma].mean(0), f_b[mb].mean(0)
            terms.append(1.0 - torch.nn.functional.cosine_similarity(pa, pb, dim=0))
    if not terms:
        return (f_a.sum() + f_b.sum()) * 0.0
    return torch.stack(terms).mean()


def joint_batch_fn(
    x: Tensor,
    y: np.ndarray,
    data: CohortData,
    clip_idx: np.ndarray,
    cfg: Config,
) -> Callable[[np.ndarray, np.random.Generator, int], dict[str, Tensor]]:
    """Training batches: MRI cases of the plan plus as many training clips, drawn from the batch's generator.

    Args:
        x: training volumes ``(N, 1, ...)``.
        y: their labels.
        data: the cohort (its clips).
        clip_idx: indices of the training clips in ``data.tvus``.
        cfg: the run config (student augmentation switch, the teacher's clip augmentation).
    """
    clips = clip_batch_fn(data.tvus, clip_idx, cfg, cfg.teacher.augment)
    y_t = torch.from_numpy(y.astype(np.int64))
    n_clips = int(clip_idx.size)

    def make(idx: np.ndarray, rng: np.random.Generator, epoch: int) -> dict[str, Tensor]:
        it = torch.from_numpy(idx)
        xb = x[it]
        xb = augment_volumes(xb, rng, cfg.finetune.translate) if cfg.finetune.augment else xb
        ci = rng.choice(n_clips, size=len(idx), replace=len(idx) > n_clips)
        cb = clips(ci, rng, epoch)
        return {"x": xb, "y": y_t[it], "c": cb["x"], "yc": cb["y"], "i": it}

    return make


class JointModule(StudentModule):
    """The student's module (selection on MRI validation AUC, optimiser, resume state) with the joint loss.

    Args:
        clip_class_weights: ``(K,)`` weights of the TVUS cross-entropy, or None.
        **kw: passed to :class:`~endodistill.train.finetune.StudentModule`.
    """

    def __init__(self, *args: Any, clip_class_weights: Tensor | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.clip_class_weights: Tensor | None
        self.register_buffer("clip_class_weights", clip_class_weights, persistent=False)

    def peak_lr(self) -> float:
        """``joint.lr``, else the student's ``finetune.lr``."""
        return self.cfg.joint.lr or self.cfg.finetune.lr

    def kd_weight(self) -> float:
        """No distillation in the joint method (the history's ``kd_weight`` column is 0)."""
        return 0.0

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        net: Any = self.net  # a JointViT (features, clip_features, classification_head)
        fm = net.features(batch["x"])
        fc = net.clip_features(batch["c"])
        lm = task_loss(net.classification_head(fm), batch["y"], self.class_weights)
        lc = task_loss(net.classification_head(fc), batch["yc"], self.clip_class_weights)
        loss = lm + self.cfg.joint.clip_weight * lc
        w = self.method.align_weight
        values: dict[str, Tensor] = {"mri_loss": lm, "tvus_loss": lc}
        if w > 0:
            al = prototype_alignment(fm, batch["y"], fc, batch["yc"], self.cfg.task.num_classes)
            loss = loss + w * al
            values["align_loss"] = al
        self.check_loss(loss)
        self.accumulate(int(batch["y"].numel()), train_loss=loss, **values)
        return loss


def _write_clip_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_csv(path, rows, ["subject_id", "label", "prob", "path"], cell=lambda v: v)


def read_clip_predictions(path: Path) -> list[dict[str, Any]]:
    """Rows of a joint fit's ``clip_predictions.csv`` (``label``: 1 = positive class, ``prob`` float)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [
            {
                "subject_id": r["subject_id"],
                "label": int(r["label"]),
                "prob": float(r["prob"]),
                "path": r["path"],
            }
            for r in csv.DictReader(fh)
        ]


@torch.no_grad()
def clip_probs(net: Any, x: Tensor, batch_size: int, device: torch.device | str = "cpu") -> np.ndarray:
    """Softmax probabilities ``(N, K)`` of preprocessed clips ``x`` (eval mode is the caller's job)."""
    return predict_logits(ClipPath(net), x, batch_size, device).softmax(1).numpy()


class JointFit(FitSpec):
    """One joint fit of a method on a fold (see :func:`joint_fit`)."""

    def __init__(
        self,
        cfg: Config,
        method_name: str,
        data: CohortData,
        split: dict[str, list[str]],
        clip_test: list[str],
        seed: int,
        where: str,
        encoder_path: Path | None,
    ) -> None:
        self.cfg, self.method_name, self.data, self.split = cfg, method_name, data, split
        self.clip_test, self.seed, self.where, self.encoder_path = clip_test, seed, where, encoder_path

    def plan(self) -> FitPlan:
        cfg, data, split, where, seed = self.cfg, self.data, self.split, self.where, self.seed
        self.method: MethodConfig = cfg.protocol.methods[self.method_name]
        k = cfg.task.num_classes
        lab, tv = data.labelled, data.tvus
        clip_test_set = set(self.clip_test)
        mri_train = [s for s in split["train"] if s not in clip_test_set]
        self.tr, self.va = lab.index(mri_train), lab.index(split.get("val", []))
        self.te = lab.index(split.get("test", []))
        tr, va = self.tr, self.va
        if tr.size == 0:
            raise InputError(None, f"{where}: no training subjects")
        excluded = clip_test_set | set(split.get("test", [])) | set(split.get("val", []))
        self.clip_tr = clip_tr = np.array(
            [i for i in range(len(tv)) if tv.labels[i] >= 0 and tv.subjects[i] not in excluded],
            dtype=np.int64,
        )
        self.clip_te = np.array(
            [i for i in range(len(tv)) if tv.labels[i] >= 0 and tv.subjects[i] in clip_test_set],
            dtype=np.int64,
        )
        missing = sorted(set(range(k)) - set(tv.labels[clip_tr].tolist()))
        if clip_tr.size == 0 or missing:
            raise InputError(
                None, f"{where}: no training '{cfg.task.teacher_modality}' clip of class(es) {missing}"
            )

        seed_all(seed)
        self.net = build_joint(cfg)
        if self.method.init == "mae":
            init_from_mae(self.net, load_mae_into_joint, self.method_name, where, self.encoder_path)

        y_tr = lab.labels[tr]
        f = cfg.finetune
        weights = f.class_balance == "weights"
        self.class_weights = balanced_class_weights(y_tr, k) if weights else None
        self.clip_class_weights = balanced_class_weights(tv.labels[clip_tr], k) if weights else None
        sw = balanced_sample_weights(y_tr, k).numpy() if f.class_balance == "sampler" else None
        make = joint_batch_fn(lab.x[torch.from_numpy(tr)], y_tr, data, clip_tr, cfg)
        batches = PlannedBatches(tr.size, f.batch_size, seed, make, sample_weights=sw)
        self.val = (lab.x[torch.from_numpy(va)], lab.labels[va]) if va.size else None
        return FitPlan(batches, joint_epochs(cfg))

    def module(self, plan: FitPlan, timing: TimingCallback) -> JointModule:
        cfg, f = self.cfg, self.cfg.finetune
        hp = {
            "stage": "joint",
            "where": self.where,
            "method": self.method_name,
            "seed": self.seed,
            "n_train": int(self.tr.size),
            "n_train_clips": int(self.clip_tr.size),
            "n_val": int(self.va.size),
            "config": {
                "method": self.method.model_dump(mode="json"),
                "finetune": f.model_dump(mode="json"),
                "joint": cfg.joint.model_dump(mode="json"),
            },
        }
        return JointModule(
            cfg,
            self.method,
            self.net,
            self.class_weights,
            total_steps=len(plan.batches) * plan.epochs,
            batches=plan.batches,
            val=self.val,
            clip_class_weights=self.clip_class_weights,
            hparams=hp,
            seed=self.seed,
            where=self.where,
            timing=timing,
        )

    def finish(self, unit_dir: Path, module: StageModule, timing: TimingCallback) -> dict[str, Any]:
        assert isinstance(module, JointModule)
        cfg = self.cfg
        k, pos = cfg.task.num_classes, cfg.task.positive_class
        lab, tv = self.data.labelled, self.data.tvus
        tr, va, te, clip_tr, clip_te = self.tr, self.va, self.te, self.clip_tr, self.clip_te
        net, dev = selected_network(module, unit_dir, cfg)
        clip_auc = float("nan")
        with timing.section():
            probs, test_auc = predict_test(net, lab.x[torch.from_numpy(te)], lab.labels[te], cfg, dev)
            cprobs = np.zeros((0, k))
            if clip_te.size:
                x_clip = teacher_inputs(tv, cfg)[torch.from_numpy(clip_te)]
                cprobs = clip_probs(net, x_clip, cfg.finetune.batch_size, dev)
                clip_auc = auc_score(tv.labels[clip_te], cprobs, pos)
        _write_predictions(
            unit_dir / rundir.PREDICTIONS, [lab.subjects[i] for i in te], lab.labels[te], probs, pos
        )
        _write_clip_predictions(
            unit_dir / CLIP_PREDICTIONS,
            [
                {
                    "subject_id": tv.subjects[i],
                    "label": int(tv.labels[i] == pos) if k == 2 else int(tv.labels[i]),
                    "prob": repr(float(p[pos])),
                    "path": Path(tv.paths[i]).name,
                }
                for i, p in zip(clip_te, cprobs)
            ],
        )
        best = module.best
        return {
            "method": self.method_name,
            "kind": "joint",
            "where": self.where,
            "seed": self.seed,
            "train_subjects": sorted(lab.subjects[i] for i in tr),
            "val_subjects": sorted(lab.subjects[i] for i in va),
            "test_subjects": sorted(lab.subjects[i] for i in te),
            "tvus_subjects": sorted({tv.subjects[i] for i in clip_tr}),
            "tvus_test_subjects": sorted({tv.subjects[i] for i in clip_te}),
            "n_train_clips": int(clip_tr.size),
            "n_test_clips": int(clip_te.size),
            "best_epoch": best["epoch"],
            "val_auc": best["auc"],
            "val_loss": best["loss"],
            "test_auc": test_auc if math.isfinite(test_auc) else None,
            "tvus_test_auc": clip_auc if math.isfinite(clip_auc) else None,
            "train_loss_first": module.history[0].get("train_loss") if module.history else None,
            "train_loss_last": module.history[-1].get("train_loss") if module.history else None,
        }


def joint_fit(
    cfg: Config,
    method_name: str,
    data: CohortData,
    split: dict[str, list[str]],
    clip_test: list[str],
    unit_dir: Path,
    seed: int,
    where: str,
    resume: bool = False,
    encoder_path: Path | None = None,
) -> dict[str, Any]:
    """Fit one joint model (method, fold) and predict its held-out MRI subjects and clips.

    Args:
        cfg: the run configuration.
        method_name: the method (of kind ``joint``).
        data: the cohort.
        split: the MRI ``{"train", "val", "test"}`` subjects (test empty: the final model).
        clip_test: subjects whose clips are held out and predicted (empty: the final model).
        unit_dir: the fit's directory.
        seed: the fit's seed (the fold's, shared with every method).
        where: the fit's name in messages.
        resume: reuse a finished fit / continue from ``last.ckpt``.
        encoder_path: MAE encoder weights (``init: mae``).

    Returns:
        The fit's info (also ``done.json``). MRI predictions go to ``predictions.csv`` (the format of
        every method), clip predictions to ``clip_predictions.csv``, weights to ``model.safetensors``.

    Raises:
        InputError: no training subjects, a missing MAE encoder, or a class without training clips.
    """
    spec = JointFit(cfg, method_name, data, split, clip_test, seed, where, encoder_path)
    return run_fit(unit_dir, spec, resume)


def tvus_summary(
    cfg: Config,
    methods: list[str],
    n_folds: int,
    run_dir: Path,
    teacher_metrics: dict[str, Any],
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The joint methods' TVUS out-of-fold results next to the teacher's, and the pooled rows.

    Returns:
        ``(summary, rows)``: ``summary`` (None without joint methods) holds per method the pooled metrics of
        :func:`~endodistill.evaluate.metrics.binary_metrics` with ``fold_aucs``, and per method a paired
        DeLong test against the teacher's out-of-fold predictions on the clips both scored
        (``teacher/predictions.csv``); ``rows`` are ``subject_id, fold, method, label, prob, path``.
    """
    joint = [m for m in methods if is_joint(cfg, m)]
    if not joint or cfg.task.num_classes != 2:
        return None, []
    rows: list[dict[str, Any]] = []
    for m in joint:
        for f in range(n_folds):
            for r in read_clip_predictions(rundir.fit_dir(run_dir, f, m) / CLIP_PREDICTIONS):
                rows.append({"subject_id": r["subject_id"], "fold": f, "method": m, **r})
    teacher: dict[tuple[str, str], float] = {}
    tpath = run_dir / rundir.TEACHER / rundir.PREDICTIONS
    if tpath.is_file():
        with open(tpath, newline="", encoding="utf-8") as fh:
            teacher = {(r["subject_id"], r["path"]): float(r["prob"]) for r in csv.DictReader(fh)}
    out: dict[str, Any] = {
        "folds": "protocol.folds subject-stratified folds of the labelled clips"
        + (" (the teacher's CV folds)" if cfg.teacher.folds == cfg.protocol.folds else ""),
        "teacher_auc": teacher_metrics.get("auc"),
        "teacher_auc_ci95": teacher_metrics.get("auc_ci95"),
        "teacher_scheme": teacher_metrics.get("scheme"),
        "methods": {},
        "comparisons": [],
    }
    hs = cfg.protocol.high_sensitivity
    for m in joint:
        mr = [r for r in rows if r["method"] == m]
        y = np.array([r["label"] for r in mr])
        p = np.array([r["prob"] for r in mr])
        metrics = binary_metrics(y, p, hs)
        metrics["fold_aucs"] = [
            auc_score(y[sel], np.stack([1 - p[sel], p[sel]], 1))
            for f in range(n_folds)
            if (sel := np.array([r["fold"] == f for r in mr], dtype=bool)).any()
        ]
        out["methods"][m] = metrics
        both = [
            (r, teacher[(r["subject_id"], r["path"])]) for r in mr if (r["subject_id"], r["path"]) in teacher
        ]
        yb = np.array([r["label"] for r, _ in both])
        if both and 0 < yb.sum() < yb.size:
            t = delong_test(yb, [r["prob"] for r, _ in both], [tp for _, tp in both])
            out["comparisons"].append(
                {"method_a": m, "method_b": "teacher", "n": int(yb.size), "n_pos": int(yb.sum()), **t}
            )
    return out, rows
