"""From finished fits to a run's figures: out-of-fold rows, per-method metrics, paired comparisons, timings.

Reads the units' ``predictions.csv`` and ``done.json``; the statistics themselves are
:mod:`endodistill.evaluate.stats` (pure, no training).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.figure import Figure

from endodistill import rundir
from endodistill.config import Config
from endodistill.evaluate.metrics import multiclass_auc
from endodistill.evaluate.stats import compare_methods, fold_spread, summarise_method
from endodistill.experiment import plan
from endodistill.train.clip_baseline import (
    COUPLING_QUANTILES,
    coupling_map,
    coupling_percentiles,
    displacement_motion,
)
from endodistill.train.finetune import read_predictions
from endodistill.utils import atomic_path, atomic_write_csv

log = logging.getLogger("endodistill")

OOF_FIELDS = ["subject_id", "fold", "method", "label", "prob"]


def oof_rows(
    cfg: Config, splits: list[dict[str, list[str]]], methods: list[str], run_dir: Path
) -> list[dict[str, Any]]:
    """One row per subject and method from the fits' test predictions (method-major, then fold)."""
    pos = cfg.task.positive_class
    rows = []
    for m in methods:
        for f in range(len(splits)):
            subjects, labels, probs = read_predictions(rundir.fit_dir(run_dir, f, m) / rundir.PREDICTIONS)
            for s, y, p in zip(subjects, labels, probs):
                row: dict[str, Any] = {
                    "subject_id": s,
                    "fold": f,
                    "method": m,
                    "label": int(y),
                    "prob": float(p[pos]),
                }
                if probs.shape[1] > 2:
                    row.update({f"prob_{c}": float(v) for c, v in enumerate(p)})
                rows.append(row)
    return rows


def write_oof(path: Path, rows: list[dict[str, Any]]) -> None:
    """``oof_predictions.csv``."""
    fields = list(rows[0].keys()) if rows else OOF_FIELDS
    atomic_write_csv(path, rows, fields)


def method_metrics(cfg: Config, rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per method: pooled out-of-fold AUC with CI, per-fold AUCs, thresholds (binary) or macro AUC."""
    out: dict[str, Any] = {}
    k = cfg.task.num_classes
    for m in methods:
        mrows = [r for r in rows if r["method"] == m]
        if k == 2:
            binary = [{**r, "label": int(r["label"] == cfg.task.positive_class)} for r in mrows]
            out[m] = summarise_method(binary, m, cfg.protocol.high_sensitivity)
        else:
            y = np.array([r["label"] for r in mrows])
            p = np.array([[r[f"prob_{c}"] for c in range(k)] for r in mrows])
            mc = multiclass_auc(y, p)
            folds = sorted({r["fold"] for r in mrows})
            fold_aucs = []
            for f in folds:
                sel = [i for i, r in enumerate(mrows) if r["fold"] == f]
                fold_aucs.append(multiclass_auc(y[sel], p[sel])["macro"])
            out[m] = {
                "auc": mc["macro"],
                "per_class_auc": mc["per_class"],
                "fold_aucs": fold_aucs,
                **fold_spread(fold_aucs),
                "n": len(mrows),
            }
    return out


def comparisons(cfg: Config, rows: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Paired DeLong (and McNemar) tests against the reference method and the full method, Holm-adjusted."""
    if cfg.task.num_classes != 2 or len(methods) < 2:
        return []
    binary = [{**r, "label": int(r["label"] == cfg.task.positive_class)} for r in rows]
    try:
        return compare_methods(
            binary, reference=plan.reference_method(methods), full=cfg.protocol.full_method, correction="holm"
        )
    except ValueError as e:
        log.warning("paired comparisons skipped: %s", e)
        return []


def collect_timings(
    run_dir: Path, splits: list[Any], methods: list[str], t_data: float
) -> tuple[dict[str, float], dict[str, Any]]:
    """Stage seconds and per-fit breakdowns from the units' done markers (also right after a resume)."""
    fits: dict[str, Any] = {}

    def add(name: str, d: Path) -> float:
        info = rundir.read_done_info(d)
        t = (info.timing if info is not None else None) or {}
        if "fits" in t:  # the teacher: several sub-fits
            for sub, st in (t["fits"] or {}).items():
                if st:
                    fits[f"{name}/{sub}"] = st
        elif t:
            fits[name] = t
        return float(t.get("wall", 0.0))

    stages = {"data": round(t_data, 3), "teacher": round(add(rundir.TEACHER, run_dir / rundir.TEACHER), 3)}
    mae = sum(
        add(str(p.parent.relative_to(run_dir)), p.parent)
        for p in sorted(run_dir.glob(f"{rundir.MAE}/**/{rundir.DONE}"))
    )
    stages["mae"] = round(mae, 3)
    cv = 0.0
    for fit in plan.cv_fits(len(splits), methods):
        cv += add(fit.name, fit.unit(run_dir))
    stages["cross_validation"] = round(cv, 3)
    if rundir.is_done(run_dir / rundir.FINAL):
        stages["final_model"] = round(add(rundir.FINAL, run_dir / rundir.FINAL), 3)
    return stages, fits


def write_examples(cfg: Config, data: Any, run_dir: Path) -> list[Path]:
    """A central sagittal MRI slice and a middle TVUS frame of one subject of each class (preprocessed), and
    with optical flow that clip's coupling map (what the clip baseline reads)."""
    out_dir = run_dir / rundir.EXAMPLES
    written = []
    names = cfg.task.class_names

    def save(
        img: np.ndarray,
        title: str,
        name: str,
        origin: Literal["upper", "lower"],
        cmap: str = "gray",
        vmin: float | None = None,
        vmax: float | None = None,
    ) -> None:
        fig = Figure(figsize=(2.6, 2.6), dpi=80)
        ax = fig.add_subplot()
        ax.imshow(img, cmap=cmap, origin=origin, vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=7)
        ax.axis("off")
        path = out_dir / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
        written.append(path)

    for k in range(cfg.task.num_classes):
        idx = np.flatnonzero(data.labelled.labels == k)
        if idx.size:
            i = int(idx[0])
            vol = data.labelled.x[i, 0].numpy()
            # Model space is RAS: axis 0 runs left -> right, so its middle index is the mid-sagittal slice;
            # transposed so that superior is up and anterior to the right.
            sl = vol[vol.shape[0] // 2].T
            s = data.labelled.subjects[i]
            save(
                sl,
                f"{cfg.task.student_modality} {s}: {names[k]}",
                f"{cfg.task.student_modality}_class{k}_{s}.png",
                "lower",
            )
        idx = np.flatnonzero(data.tvus.labels == k)
        if idx.size:
            i = int(idx[0])
            clip = data.tvus.clips[i]
            s = data.tvus.subjects[i]
            save(
                clip[clip.shape[0] // 2],
                f"{cfg.task.teacher_modality} {s}: {names[k]}",
                f"{cfg.task.teacher_modality}_class{k}_{s}.png",
                "upper",
            )
            if data.tvus.flows is not None and cfg.teacher.motion == "flow":
                # The same flow and frames as the teacher and the clip baseline: bright where tissue moves
                # with the uterus, dark where it stays behind (the rectum gliding: POD open).
                motion = displacement_motion(data.tvus.eval_flow_tensor(cfg.tvus.frames)[i : i + 1])
                g = coupling_map(motion)
                stat = coupling_percentiles(motion, g)[0]
                pct = ", ".join(f"p{100 * q:g} {v:.2f}" for q, v in zip(COUPLING_QUANTILES, stat))
                save(
                    g[0].numpy(),
                    f"{s} ({names[k]}): coupling map, {pct}",
                    f"{cfg.task.teacher_modality}_class{k}_{s}_coupling.png",
                    "upper",
                    cmap="magma",
                    vmin=0.0,
                    vmax=1.2,
                )
    return written
