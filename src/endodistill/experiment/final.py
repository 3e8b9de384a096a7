"""The deployable models of a run and their thresholds: ``RUN_DIR/model`` and ``RUN_DIR/teacher_model``.

Threshold policy: Youden's threshold on the deployed method's out-of-fold predictions (clipped to [0, 1]),
0.5 when it is undefined; a joint model also gets one on its clips' out-of-fold predictions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from endodistill import rundir
from endodistill.config import Config
from endodistill.data.splits import inner_val_split
from endodistill.experiment import plan
from endodistill.experiment.runner import echo, mae_encoder
from endodistill.infer.model_dir import METADATA_FILE, save_model_dir
from endodistill.infer.teacher_model import save_teacher_model, teacher_member_dirs
from endodistill.models.weights import load_weights
from endodistill.train.finetune import finetune
from endodistill.train.joint import is_joint, joint_fit

CV_KEYS = ("auc", "auc_ci95", "fold_auc_mean", "fold_auc_std", "youden", "high_sensitivity", "brier", "ece")


def youden_or_half(summary: dict[str, Any]) -> float:
    """Youden's threshold of a method's out-of-fold summary, 0.5 when undefined, clipped to [0, 1]."""
    youden = (summary.get("youden") or {}).get("threshold")
    threshold = float(youden) if youden is not None and np.isfinite(youden) else 0.5
    return min(1.0, max(0.0, threshold))


def teacher_model(
    cfg: Config, run_dir: Path, metrics: dict[str, Any], fingerprint: dict[str, Any], resume: bool
) -> dict[str, Any] | None:
    """Write the deployable TVUS teacher ``RUN_DIR/teacher_model`` (with the final model's switch)."""
    if not cfg.protocol.final_model:
        return None
    out = run_dir / rundir.TEACHER_MODEL
    members = teacher_member_dirs(run_dir)
    fresh = not (resume and (out / METADATA_FILE).is_file())
    if fresh and save_teacher_model(cfg, run_dir, metrics, fingerprint, out) is None:
        return None
    meta = json.loads((out / METADATA_FILE).read_text(encoding="utf-8"))
    echo(
        f"[teacher model] {len(members)} network(s) ({', '.join(m.name for m in members)}), "
        f"threshold {meta['threshold']:.3f} -> {out.name}/"
    )
    return {"path": out.name, "members": [m.name for m in members], "threshold": meta["threshold"]}


def final_model(
    cfg: Config,
    data: Any,
    teacher: Any,
    run_dir: Path,
    method_metrics: dict[str, Any],
    teacher_metrics: dict[str, Any],
    shared_encoder: Path | None,
    resume: bool,
    tvus: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the deployed method (``protocol.final_method``, else the full method) on all labelled MRI
    (inner validation split for selection; a joint method also on all labelled clips) and save RUN_DIR/model."""
    m = cfg.protocol.deployed_method
    joint = is_joint(cfg, m)
    lab = data.labelled
    train, val = inner_val_split(lab.subjects, lab.labels.tolist(), cfg.finetune.val_fraction, cfg.seed)
    encoder = shared_encoder
    if cfg.protocol.methods[m].init == "mae" and encoder is None:
        encoder = mae_encoder(cfg, data, run_dir, None, train, resume, echo)
    t1 = time.perf_counter()
    split = {"train": train, "val": val, "test": []}
    encoder = encoder if cfg.protocol.methods[m].init == "mae" else None
    seed = plan.final_seed(cfg)
    unit = run_dir / rundir.FINAL
    if joint:
        info = joint_fit(cfg, m, data, split, [], unit, seed, f"final model {m}", resume, encoder)
    else:
        info = finetune(cfg, m, data, teacher, split, unit, seed, f"final model {m}", resume, encoder)
    summary = method_metrics.get(m, {})
    threshold = youden_or_half(summary)
    extra: dict[str, Any] = {}
    if joint:
        tsum = ((tvus or {}).get("methods") or {}).get(m, {})
        extra["tvus_threshold"] = youden_or_half(tsum)
    model_dir = run_dir / rundir.MODEL
    if not (resume and model_dir.is_dir() and (model_dir / METADATA_FILE).is_file()):
        metrics = {
            "method": m,
            "cross_validation": {k: summary.get(k) for k in CV_KEYS},
            "teacher_auc": teacher_metrics.get("auc"),
            "threshold_source": "Youden on out-of-fold predictions"
            if (summary.get("youden") or {}).get("threshold") is not None
            else "default 0.5",
            "final_val_auc": info.get("val_auc"),
        }
        if joint:
            tsum = ((tvus or {}).get("methods") or {}).get(m, {})
            metrics["tvus_cross_validation"] = {
                k: tsum.get(k) for k in ("auc", "auc_ci95", "fold_aucs", "youden", "n")
            }
            metrics["tvus_threshold_source"] = "Youden on the clips' out-of-fold predictions"
        save_model_dir(
            model_dir,
            load_weights(unit / rundir.WEIGHTS),
            cfg,
            threshold,
            metrics,
            fingerprint=data.fingerprint,
            kind="joint" if joint else "student",
            **extra,
        )
    echo(
        f"[final] {m} on {len(train)} + {len(val)} subjects, threshold {threshold:.3f} ({time.perf_counter() - t1:.1f} s)"
    )
    return {
        "method": m,
        "threshold": threshold,
        "val_auc": info.get("val_auc"),
        "best_epoch": info.get("best_epoch"),
        "path": rundir.MODEL,
    }
