"""One training stage on its own (``endodistill train STAGE``), into a run directory.

A distill fit locks only its own unit, so fits of other folds/methods can run at the same time (one per
device, e.g. a SLURM array); ``endodistill run --resume`` then gathers them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from endodistill import rundir
from endodistill.config import Config, ConfigError
from endodistill.data.splits import inner_val_split
from endodistill.errors import InputError
from endodistill.experiment import plan
from endodistill.experiment.provenance import load_or_make_splits, manifest_path, start_stage
from endodistill.experiment.runner import echo, fit_result
from endodistill.train.data import load_cohort
from endodistill.train.finetune import finetune
from endodistill.train.joint import clip_folds, is_joint, joint_fit
from endodistill.train.pretrain import pretrain_mae
from endodistill.train.runtime import rank_run_dir
from endodistill.train.seeding import configure_torch
from endodistill.train.teacher import load_teacher_outputs, train_teacher
from endodistill.utils import RunLock

STAGES = ("teacher", "pretrain", "distill")


def run_stage(
    cfg: Config,
    out: str | Path,
    stage: str,
    method: str = "mae_kd_ce",
    fold: int | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run one training stage on its own, writing into the run directory ``out``.

    Args:
        cfg: the configuration.
        out: the run directory (distill reads the teacher outputs and MAE encoder found there).
        stage: ``teacher``, ``pretrain`` or ``distill``.
        method: the method for ``distill``.
        fold: the fold for ``distill`` (0-based, as in ``splits.json`` and ``folds/fold_K``); None trains on all
            labelled subjects (with the inner validation split) into ``distill/METHOD``.
        resume: reuse a finished unit / continue from its last checkpoint.

    Returns:
        The stage's info.

    Raises:
        ConfigError: an unknown stage, method or fold.
        InputError: distill without teacher outputs, or without the MAE encoder for an MAE-initialised method.
    """
    if stage not in STAGES:
        raise ConfigError(stage, f"unknown stage (choose from {', '.join(STAGES)})")
    if stage == "distill" and method not in cfg.protocol.methods:
        raise ConfigError(method, f"unknown method (known: {', '.join(cfg.protocol.methods)})")
    # Under DDP only rank 0 writes `out`; the other ranks work in a scratch copy of it (what they read).
    with rank_run_dir(out, mirror=True) as out:
        out.mkdir(parents=True, exist_ok=True)
        with RunLock(_lock_dir(out, stage, method, fold)):
            return _run_stage(cfg, out, stage, method, fold, resume)


def _lock_dir(out: Path, stage: str, method: str, fold: int | None) -> Path:
    if stage != "distill":
        return out
    return rundir.distill_dir(out, method) if fold is None else rundir.fit_dir(out, fold, method)


def _run_stage(
    cfg: Config, out: Path, stage: str, method: str, fold: int | None, resume: bool
) -> dict[str, Any]:
    configure_torch(cfg)
    cfg = start_stage(cfg, out)
    data = load_cohort(cfg, manifest_path(cfg, out))
    if stage == "teacher":
        return train_teacher(cfg, data, out, resume, echo)
    if stage == "pretrain":
        train_subjects: list[str] = []
        if cfg.mae.use_labelled_train:
            splits = load_or_make_splits(cfg, out, data.labelled.subjects, data.labelled.labels.tolist())
            if fold is not None:
                plan.check_fold(fold, splits)
                train_subjects = splits[fold]["train"]
            else:
                train_subjects = list(data.labelled.subjects)
        return pretrain_mae(
            cfg, data, out / plan.mae_unit(cfg, fold), plan.mae_seed(cfg, fold), resume, train_subjects, echo
        )
    teacher = load_teacher_outputs(out)
    if fold is None:
        lab = data.labelled
        train, val = inner_val_split(lab.subjects, lab.labels.tolist(), cfg.finetune.val_fraction, cfg.seed)
        split = {"train": train, "val": val, "test": []}
        unit, seed, where = rundir.distill_dir(out, method), plan.final_seed(cfg), f"distill {method}"
    else:
        splits = load_or_make_splits(cfg, out, data.labelled.subjects, data.labelled.labels.tolist())
        plan.check_fold(fold, splits)
        split = splits[fold]
        unit, seed = rundir.fit_dir(out, fold, method), plan.cv_seed(cfg, fold)
        where = f"distill fold {fold} {method}"
    encoder = None
    if cfg.protocol.methods[method].init == "mae":
        encoder = out / plan.mae_unit(cfg, fold) / rundir.ENCODER
        if not encoder.is_file():
            raise InputError(
                encoder,
                f"method '{method}' starts from the MAE encoder: run `endodistill train pretrain` first",
            )
    t1 = time.perf_counter()
    reused = resume and rundir.fit_reusable(unit)
    if is_joint(cfg, method):
        clip_test = [] if fold is None else clip_folds(cfg, data)[fold]
        info = joint_fit(cfg, method, data, split, clip_test, unit, seed, where, resume, encoder)
    else:
        info = finetune(cfg, method, data, teacher, split, unit, seed, where, resume, encoder)
    echo(f"[{where}] {fit_result(info, time.perf_counter() - t1, reused)}")
    return info
