"""A study's results: per-setting figures, paired tests, the verdict; ``study.json``, ``study.md``, ``study.html``.

No setting is called best: every setting is reported, and no choice is made on the test folds.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import BaseModel, Field

from endodistill.config import Config
from endodistill.evaluate.fmt import fmt_auc, fmt_ci, fmt_p
from endodistill.evaluate.stats import compare_methods, nan_to_none, summarise_method
from endodistill.experiment.study_plan import StudyPlan
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
    comps = nan_to_none(compare_methods(ordered, reference=plan.reference, full=""))
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
    sig = [c for c in comps if c["p_adjusted"] is not None and c["p_adjusted"] < 0.05]
    if not sig:
        return (
            f"No setting differs from the reference {plan.reference} after Holm's correction "
            f"({len(comps)} paired DeLong tests){sens}."
        )
    parts = ", ".join(f"{c['method_a']} {c['diff']:+.3f} (Holm p {c['p_adjusted']:.3f})" for c in sig)
    return f"Different from the reference {plan.reference} after Holm's correction: {parts}{sens}."


def format_study_table(r: StudyResult) -> str:
    """The terminal table: one row per setting, its paired test against the reference."""
    comps = {c["method_a"]: c for c in r.comparisons}
    head = f"{'setting':<18} {'value':<30} {'AUC [95% CI]':<22} {'fold SD':>7} {'Δ vs ref':>8} {'Holm p':>7} {'McNemar p':>9}"
    lines = [f"study {r.study}: {r.question}", head, "-" * len(head)]
    for s in r.settings:
        c = comps.get(s.name)
        ci = fmt_ci(s.auc, s.auc_ci95)
        mc = (c or {}).get("mcnemar") or {}
        diff = "ref" if c is None else f"{c['diff']:+.3f}"
        p_adj = "" if c is None else fmt_p(c["p_adjusted"])
        p_mc = "" if not mc else fmt_p(mc.get("p_adjusted"))
        lines.append(
            f"{s.name:<18} {s.value[:30]:<30} {ci:<22} {fmt_auc(s.fold_auc_std):>7} {diff:>8} {p_adj:>7} {p_mc:>9}"
        )
    lines.append(r.verdict)
    lines.append(f"wall time {r.wall_seconds:.1f} s")
    return "\n".join(lines)


def _figure_png(r: StudyResult) -> bytes:
    fig = Figure(figsize=(max(5.0, 1.1 * len(r.settings) + 1.5), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(r.settings))
    auc = np.array([np.nan if s.auc is None else s.auc for s in r.settings], dtype=float)
    lo = np.array([np.nan if s.auc_ci95[0] is None else s.auc_ci95[0] for s in r.settings], dtype=float)
    hi = np.array([np.nan if s.auc_ci95[1] is None else s.auc_ci95[1] for s in r.settings], dtype=float)
    colors = ["tab:red" if s.name == r.reference else "tab:blue" for s in r.settings]
    ax.errorbar(x, auc, yerr=[auc - lo, hi - auc], fmt="none", ecolor="gray", capsize=4)
    ax.scatter(x, auc, c=colors, zorder=3)
    ref = next((s.auc for s in r.settings if s.name == r.reference), None)
    if ref is not None:
        ax.axhline(ref, color="tab:red", lw=0.8, ls="--", label=f"reference {r.reference}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xticks(x, [s.value for s in r.settings], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("pooled out-of-fold AUC (95% CI)")
    ax.set_title(f"study {r.study}: {r.varied}", fontsize=10)
    ax.axhline(0.5, color="black", lw=0.5, ls=":")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _table_rows(r: StudyResult) -> tuple[list[str], list[list[str]]]:
    comps = {c["method_a"]: c for c in r.comparisons}
    head = [
        "setting",
        "value",
        "AUC",
        "95% CI",
        "fold mean ± SD",
        "Δ vs ref [95% CI]",
        "DeLong p (Holm)",
        "McNemar p (Holm)",
    ]
    body = []
    for s in r.settings:
        c = comps.get(s.name)
        mc = (c or {}).get("mcnemar") or {}
        body.append(
            [
                s.name,
                s.value,
                fmt_auc(s.auc),
                f"[{fmt_auc(s.auc_ci95[0])}, {fmt_auc(s.auc_ci95[1])}]",
                f"{fmt_auc(s.fold_auc_mean)} ± {fmt_auc(s.fold_auc_std)}",
                "reference"
                if c is None
                else f"{c['diff']:+.3f} [{fmt_auc(c['diff_ci95'][0])}, {fmt_auc(c['diff_ci95'][1])}]",
                "" if c is None else f"{fmt_p(c['p'])} ({fmt_p(c['p_adjusted'])})",
                "" if not mc else f"{fmt_p(mc.get('p'))} ({fmt_p(mc.get('p_adjusted'))})",
            ]
        )
    if any(s.mae_probe_auc is not None for s in r.settings) and r.study in ("mask_ratio", "pool"):
        head.append("MAE probe (random)")
        for row, s in zip(body, r.settings):
            row.append(f"{fmt_auc(s.mae_probe_auc)} ({fmt_auc(s.mae_random_probe_auc)})")
    return head, body


_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>endodistill study {{ r.study }}</title>
<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;white-space:nowrap}
th{background:#f3f3f3}.v{font-weight:600;margin:1em 0}</style></head><body>
<h1>Study <code>{{ r.study }}</code></h1><p>{{ r.question }}</p>
<p class="v">{{ r.verdict }}</p>
<img alt="AUC per setting" src="data:image/png;base64,{{ png }}">
<table><tr>{% for h in head %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in body %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>
<p>{{ r.n_subjects }} subjects, {{ r.folds }}-fold cross-validation, seed {{ r.seed }}; every setting on the same
folds with the same per-fold seeds. Paired DeLong tests against the reference <code>{{ r.reference }}</code>,
Holm-adjusted over the study; McNemar's exact test of the decisions at the reference's Youden threshold
(Holm-adjusted). Every setting is reported: none is selected on the test folds.
{% if r.min_detectable_auc_difference %}Smallest AUC difference detectable at 80% power:
{{ "%.3f"|format(r.min_detectable_auc_difference) }}.{% endif %} Wall time {{ "%.1f"|format(r.wall_seconds) }} s.</p>
<h2>Shared units</h2><ul>{% for u, v in r.shared_units.items() %}<li><code>{{ u }}</code>: trained in
{{ v.trained_by }}, used by {{ v.used_by|join(", ") }}</li>{% endfor %}</ul></body></html>
"""


def write_study(out: Path, r: StudyResult, plan: StudyPlan) -> None:
    """``study.json``, ``study.md`` and a self-contained ``study.html`` (figure embedded), atomically."""
    atomic_write_json(out / "study.json", r.model_dump(mode="json"))
    head, body = _table_rows(r)
    png = base64.b64encode(_figure_png(r)).decode()
    env = jinja2.Environment(autoescape=True)
    atomic_write_text(out / "study.html", env.from_string(_HTML).render(r=r, head=head, body=body, png=png))
    md = [f"# Study `{r.study}`", "", r.question, "", f"**{r.verdict}**", ""]
    md.append("| " + " | ".join(head) + " |")
    md.append("|" + "---|" * len(head))
    md += ["| " + " | ".join(html.escape(c) for c in row) + " |" for row in body]
    md += [
        "",
        f"{r.n_subjects} subjects, {r.folds} folds, seed {r.seed}; paired DeLong against `{r.reference}` "
        f"(Holm); McNemar at the reference's Youden threshold. Wall time {r.wall_seconds:.1f} s.",
        "",
        f"![AUC per setting](data:image/png;base64,{png})",
        "",
    ]
    atomic_write_text(out / "study.md", "\n".join(md))
