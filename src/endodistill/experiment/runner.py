"""Running the units of a run in this process: progress lines, one cross-validation fit, the MAE units.

Every unit (teacher, mae, each fold x method, final) writes ``done.json`` last; ``resume=True`` skips finished
units and continues an interrupted fit from its ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from endodistill import rundir
from endodistill.config import Config
from endodistill.evaluate.fmt import fmt_auc, fmt_clock, fmt_seconds, num
from endodistill.experiment import plan
from endodistill.train.finetune import finetune
from endodistill.train.joint import clip_folds, is_joint, joint_fit
from endodistill.train.pretrain import pretrain_mae
from endodistill.train.probe import mae_probe
from endodistill.train.runtime import is_rank_zero
from endodistill.utils import atomic_write_json


def echo(msg: str) -> None:
    """Print a progress line (rank 0 only), above the progress bar when one is shown."""
    if is_rank_zero():  # under DDP every rank runs the protocol; one prints
        if FitProgress.bar is not None:  # above the progress bar, which is redrawn below it
            FitProgress.bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)


class FitProgress:
    """Progress over the units of this process's run, with the elapsed time and an estimate of the time left.

    A unit is a stage (teacher, MAE, final model, baselines) or one cross-validation fit, each weighted by
    its optimiser steps (epochs x batches). The estimate is the remaining steps times the seconds per step
    measured so far: per kind of unit once one of that kind has been trained, else over all trained units
    (a teacher step costs more than a student step, so the first estimate is rough and then improves).
    Units a resumed run reuses count as done, not in the rates.

    On a terminal (stdout a TTY, rank 0): a tqdm bar under the progress lines (each fit's Lightning bar,
    when shown, sits below it). Elsewhere (CI logs, pipes): no bar, each unit's line ends with ``i/N``,
    the elapsed time and the ETA.
    """

    bar: Any = None  # the active tqdm bar, if any (one at a time: echo writes above it)

    def __init__(self, units: int | list[tuple[str, float]], what: str = "fits", bar: bool = True) -> None:
        plan_ = [("fit", 1.0)] * units if isinstance(units, int) else list(units)
        self.left: dict[str, list[float]] = {}
        for kind, w in plan_:
            self.left.setdefault(kind, []).append(max(float(w), 1.0))
        self.total, self.i = len(plan_), 0
        self.rate_s: dict[str, float] = {}
        self.rate_w: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self.tty = bar and bool(self.total) and is_rank_zero() and sys.stdout.isatty()
        if self.tty:
            FitProgress.bar = tqdm(
                total=self.total,
                desc=what,
                unit="unit",
                file=sys.stdout,
                dynamic_ncols=True,
                leave=True,
                position=0,
                bar_format=self._bar_format(),
            )

    def eta(self) -> float | None:
        """Seconds left, or None before the first trained unit (the estimate needs one)."""
        if not any(self.left.values()):
            return 0.0
        if not self.rate_w:
            return None
        overall = sum(self.rate_s.values()) / sum(self.rate_w.values())
        return sum(
            sum(ws) * (self.rate_s[k] / self.rate_w[k] if k in self.rate_w else overall)
            for k, ws in self.left.items()
        )

    def _times(self) -> str:
        eta = self.eta()
        return f"elapsed {fmt_clock(time.perf_counter() - self.t0)}, ETA {'?' if eta is None else fmt_clock(eta)}"

    def _bar_format(self) -> str:
        return "{desc} {n_fmt}/{total_fmt} |{bar}| " + self._times()

    def _count(self, kind: str, seconds: float, reused: bool) -> None:
        self.i += 1
        ws = self.left.get(kind) or []
        w = ws.pop(0) if ws else 1.0
        if not reused:
            self.rate_s[kind] = self.rate_s.get(kind, 0.0) + seconds
            self.rate_w[kind] = self.rate_w.get(kind, 0.0) + w

    def done(self, line: str, seconds: float, reused: bool = False, tag: str = "", kind: str = "fit") -> None:
        """Count one unit and print its line (``line`` says what it got; ``tag`` ends the line)."""
        self._count(kind, seconds, reused)
        if FitProgress.bar is not None and self.tty:
            echo(f"{line}{tag}")
            FitProgress.bar.bar_format = self._bar_format()
            FitProgress.bar.update(1)
        else:
            echo(f"{line}; unit {self.i}/{self.total}, {self._times()}{tag}")

    def stage(self, kind: str, seconds: float, reused: bool = False) -> None:
        """Count a stage unit whose own lines were printed by the stage (teacher, MAE, final, baselines)."""
        self.done(
            f"[run] {kind} {'reused' if reused else 'done'} ({seconds:.1f} s)", seconds, reused, kind=kind
        )

    def close(self) -> None:
        """Close the bar (if one is shown)."""
        if self.tty and FitProgress.bar is not None:
            FitProgress.bar.bar_format = self._bar_format()
            FitProgress.bar.close()
            FitProgress.bar = None


def fit_result(info: dict[str, Any], seconds: float, reused: bool) -> str:
    """``val AUC 0.912, test AUC 0.873 (4.2 s)``: the validation AUC only when the fit had a validation part."""
    parts = [] if num(info.get("val_auc")) is None else [f"val AUC {fmt_auc(info.get('val_auc'))}"]
    parts.append(f"test AUC {fmt_auc(info.get('test_auc'))}")
    return ", ".join(parts) + (" (done before, reused)" if reused else f" ({fmt_seconds(seconds)})")


# ------------------------------------------------------------------------------------------------ units
def mae_encoder(
    cfg: Config,
    data: Any,
    run_dir: Path,
    fold: int | None,
    train_subjects: list[str],
    resume: bool,
    echo: Callable[[str], None] = echo,
) -> Path:
    """Pre-train (or reuse) the MAE unit that fold ``fold`` uses; returns its encoder."""
    unit = plan.mae_unit(cfg, fold)
    labelled = train_subjects if cfg.mae.use_labelled_train else []
    pretrain_mae(cfg, data, run_dir / unit, plan.mae_seed(cfg, fold), resume, labelled, echo)
    return run_dir / unit / rundir.ENCODER


def mae_diagnostic(
    cfg: Config,
    data: Any,
    run_dir: Path,
    splits: list[dict[str, list[str]]],
    encoder: Path | None,
    resume: bool,
) -> dict[str, Any] | None:
    """The MAE's linear probe against the same encoder before pre-training (``mae/probe.json``).

    Only for the shared MAE (``mae.use_labelled_train`` trains one per fold, each seeing its fold's training
    volumes: a probe of one of them on every fold would leak); binary tasks only.
    """
    if encoder is None or cfg.task.num_classes != 2:
        return None
    path = run_dir / rundir.MAE / rundir.MAE_PROBE
    if resume and path.is_file():
        prev = rundir.read_json_object(path)
        if prev is not None:
            return prev
    t0 = time.perf_counter()
    lab = data.labelled
    y = (lab.labels == cfg.task.positive_class).astype(np.int64)
    folds = [lab.index(f["test"]) for f in splits]
    trains = [lab.index([*f["train"], *f.get("val", [])]) for f in splits]
    info = mae_probe(cfg, lab.x, y, folds, encoder, plan.probe_seed(cfg), trains)
    done = rundir.read_done_info(run_dir / rundir.MAE) or rundir.DoneInfo()
    info.update(
        n_volumes=done.get("n_volumes"),
        loss_first=done.get("loss_first"),
        loss_last=done.get("loss_last"),
    )
    atomic_write_json(path, info)
    seconds = time.perf_counter() - t0
    lo, hi = info["probe_auc_ci95"]
    rlo, rhi = info["random_probe_auc_ci95"]
    glo, ghi = info["gain_ci95"]
    echo(
        f"[mae] linear probe AUC {info['probe_auc']:.3f} [{lo:.3f}, {hi:.3f}] vs "
        f"{info['random_probe_draws']} untrained encoders of its shape {info['random_probe_auc']:.3f} "
        f"[{rlo:.3f}, {rhi:.3f}] (sd {info['random_probe_sd']:.3f}): gain {info['gain']:+.3f} "
        f"[{glo:+.3f}, {ghi:+.3f}] ({seconds:.1f} s)"
    )
    return info


def cv_fit(
    cfg: Config,
    data: Any,
    teacher: Any,
    splits: list[dict[str, list[str]]],
    fit: plan.CVFit,
    run_dir: Path,
    resume: bool,
    encoder: Path | None,
    progress: FitProgress,
    tag: str = "",
) -> dict[str, Any]:
    """One fold x method fit into ``folds/fold_K/METHOD`` (same unit, seed and inputs in every mode)."""
    fold, method = fit.fold, fit.method
    t1 = time.perf_counter()
    unit = fit.unit(run_dir)
    reused = resume and rundir.fit_reusable(unit)
    seed = plan.cv_seed(cfg, fold)
    enc = encoder if cfg.protocol.methods[method].init == "mae" else None
    extra = ""
    if is_joint(cfg, method):
        # The same MRI split and fold seed as every method; fold k also holds out the k-th clip fold.
        where = f"joint fold {fold} {method}"
        info = joint_fit(
            cfg, method, data, splits[fold], clip_folds(cfg, data)[fold], unit, seed, where, resume, enc
        )
        extra = f"{cfg.task.teacher_modality} test AUC {fmt_auc(info.get('tvus_test_auc'))}; "
    else:
        where = f"distill fold {fold} {method}"
        info = finetune(cfg, method, data, teacher, splits[fold], unit, seed, where, resume, enc)
    dt = time.perf_counter() - t1
    progress.done(
        f"[fold {fold + 1}/{len(splits)}] {method}: {extra}{fit_result(info, dt, reused)}", dt, reused, tag
    )
    return info
