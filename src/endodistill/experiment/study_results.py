"""A study's results: per-setting figures, paired tests, the verdict; ``study.json``, ``study.md``, ``study.html``.

No setting is called best: every setting is reported, and no choice is made on the test folds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from endodistill.config import Config
from endodistill.evaluate.stats import compare_methods, nan_to_none, summarise_method
from endodistill.experiment.study_plan import StudyPlan
from endodistill.report.study import render_study
from endodistill.utils import atomic_write_json, atomic_write_text

SCHEMA_VERSION = 1


class SettingResult(BaseModel):
    """One setting's figures in ``study.json``."""

    name: str
    value: str
    run: str
    auc: float | None
    auc_ci95: list[float | None]
    fold_aucs: list[float | None]
    fold_auc_mean: float | None
    fold_auc_std: float | None
    teacher_auc: float | None = None
    mae_probe_auc: float | None = None
    mae_random_probe_auc: float | None = None
    config: dict[str, Any]


class StudyResult(BaseModel):
    """``study.json``."""

    schema_version: int = SCHEMA_VERSION
    study: str
    question: str
    varied: str
    reference: str
    seed: int
    folds: int
    n_subjects: int
    settings: list[SettingResult]
    comparisons: list[dict[str, Any]]
    verdict: str
    min_detectable_auc_difference: float | None = Field(
        None, description="2.8 x the median DeLong SE of the differences: 80% power at two-sided 0.05"
    )
    shared_units: dict[str, dict[str, Any]] = Field(
        description="shared unit -> the run that trained it and the runs that use it"
    )
    wall_seconds: float


# ------------------------------------------------------------------------------------------ results


def summarise_study(
    plan: StudyPlan,
    rows: list[dict[str, Any]],
    per_setting: dict[str, dict[str, Any]],
    cfg: Config,
    shared_use: dict[str, dict[str, Any]],
    wall: float,
) -> StudyResult:
    """Per-setting metrics, paired tests against the reference, the verdict (no setting called best)."""
    names = [s.name for s in plan.settings]
    settings = []
    for s in plan.settings:
        m = nan_to_none(summarise_method(rows, s.name))
        extra = per_setting.get(s.name, {})
        settings.append(
            SettingResult(
                name=s.name,
                value=s.value,
                run=extra.get("run", ""),
                auc=m.get("auc"),
                auc_ci95=m.get("auc_ci95") or [None, None],
                fold_aucs=m.get("fold_aucs") or [],
                fold_auc_mean=m.get("fold_auc_mean"),
                fold_auc_std=m.get("fold_auc_std"),
                teacher_auc=extra.get("teacher_auc"),
                mae_probe_auc=extra.get("mae_probe_auc"),
                mae_random_probe_auc=extra.get("mae_random_probe_auc"),
                config=extra.get("config", {}),
            )
        )
    ordered = [r for n in names for r in rows if r["method"] == n]
    # full="": only the settings against the reference (no second family of full-vs-others pairs).
    comps = nan_to_none(compare_methods(ordered, reference=plan.reference, full="", pairs=plan.pairs))
    for c in comps:  # the size of each difference with its CI (DeLong's SE of the paired difference)
        ok = c.get("se") is not None and c.get("diff") is not None
        c["diff_ci95"] = [c["diff"] - 1.96 * c["se"], c["diff"] + 1.96 * c["se"]] if ok else [None, None]
    ses = [c["se"] for c in comps if c.get("se")]
    mde = round(2.8 * float(np.median(ses)), 4) if ses else None
    n_subj = len({r["subject_id"] for r in rows})
    return StudyResult(
        study=plan.name,
        question=plan.question,
        varied=plan.varied,
        reference=plan.reference,
        seed=cfg.seed,
        folds=cfg.protocol.folds,
        n_subjects=n_subj,
        settings=settings,
        comparisons=comps,
        verdict=verdict(plan, comps, mde),
        min_detectable_auc_difference=mde,
        shared_units=shared_use,
        wall_seconds=round(wall, 1),
    )


def _cmp(comps: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((c for c in comps if c["method_a"] == name), None)


def verdict(plan: StudyPlan, comps: list[dict[str, Any]], mde: float | None) -> str:
    """One sentence on what the paired tests say (``kd_controls``: whether KD acts as label smoothing)."""
    sens = f" (the study detects AUC differences of about {mde:.3f} at 80% power)" if mde else ""
    if plan.name == "kd_controls":
        a, b = _cmp(comps, "class_mean"), _cmp(comps, "label_smoothing")
        if a is None or b is None:
            return "controls missing"
        same = all((c["p_adjusted"] is not None and c["p_adjusted"] >= 0.05) for c in (a, b))
        txt = (
            f"class-mean targets {a['diff']:+.3f} (Holm p {a['p_adjusted']:.2f}), matched label smoothing "
            f"{b['diff']:+.3f} (Holm p {b['p_adjusted']:.2f}) against the full method"
        )
        if same:
            return (
                f"On these data KD acts as class-wise label smoothing: {txt}; the controls cannot be told "
                f"apart from the teacher's outputs{sens}."
            )
        return f"KD differs from class-wise label smoothing on these data: {txt}{sens}."
    if plan.pairs is not None:
        parts = ", ".join(
            f"{c['method_a']} {c['diff']:+.3f} (Holm p {c['p_adjusted']:.2f}) against {c['method_b']}"
            for c in comps
            if c["p_adjusted"] is not None
        )
        return f"Each setting against its pair: {parts}{sens}."
    sig = [c for c in comps if c["p_adjusted"] is not None and c["p_adjusted"] < 0.05]
    if not sig:
        return (
            f"No setting differs from the reference {plan.reference} after Holm's correction "
            f"({len(comps)} paired DeLong tests){sens}."
        )
    parts = ", ".join(f"{c['method_a']} {c['diff']:+.3f} (Holm p {c['p_adjusted']:.3f})" for c in sig)
    return f"Different from the reference {plan.reference} after Holm's correction: {parts}{sens}."


def write_study(out: Path, r: StudyResult, plan: StudyPlan) -> None:
    """``study.json``, ``study.md`` and a self-contained ``study.html`` (figure embedded), atomically."""
    atomic_write_json(out / "study.json", r.model_dump(mode="json"))
    html, md = render_study(r)
    atomic_write_text(out / "study.html", html)
    atomic_write_text(out / "study.md", md)
