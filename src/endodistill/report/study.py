"""A study's report: ``study.html`` (figure embedded) and ``study.md``, and its terminal table.

Takes a :class:`endodistill.experiment.study.StudyResult` (the content of ``study.json``; anything with
its attributes will do): this package does not import the orchestration that computes it.
"""

from __future__ import annotations

import base64
from typing import Any

from endodistill.evaluate.fmt import fmt_auc, fmt_ci, fmt_p
from endodistill.report.build import environment
from endodistill.report.figures import study_figure_png


def _partner(c: dict[str, Any] | None, r: Any) -> str:
    """The setting a comparison tests against when it is not the study's reference (studies in pairs)."""
    return "" if c is None or c["method_b"] == r.reference else c["method_b"]


def format_study_table(r: Any) -> str:
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
        vs = f"  vs {_partner(c, r)}" if _partner(c, r) else ""
        lines.append(
            f"{s.name:<18} {s.value[:30]:<30} {ci:<22} {fmt_auc(s.fold_auc_std):>7} {diff:>8} {p_adj:>7} {p_mc:>9}{vs}"
        )
    lines.append(r.verdict)
    lines.append(f"wall time {r.wall_seconds:.1f} s")
    return "\n".join(lines)


def study_table_rows(r: Any) -> tuple[list[str], list[list[str]]]:
    """The study table of ``study.html`` / ``study.md``: one row per setting, its test against the
    reference (the MAE probe AUCs too in the MAE studies)."""
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
                else f"{c['diff']:+.3f} [{fmt_auc(c['diff_ci95'][0])}, {fmt_auc(c['diff_ci95'][1])}]"
                + (f" vs {_partner(c, r)}" if _partner(c, r) else ""),
                "" if c is None else f"{fmt_p(c['p'])} ({fmt_p(c['p_adjusted'])})",
                "" if not mc else f"{fmt_p(mc.get('p'))} ({fmt_p(mc.get('p_adjusted'))})",
            ]
        )
    if any(s.mae_probe_auc is not None for s in r.settings) and r.study in ("mask_ratio", "pool"):
        head.append("MAE probe (random)")
        for row, s in zip(body, r.settings):
            row.append(f"{fmt_auc(s.mae_probe_auc)} ({fmt_auc(s.mae_random_probe_auc)})")
    return head, body


def render_study(r: Any) -> tuple[str, str]:
    """``(study.html, study.md)`` as text for the study result ``r``."""
    head, body = study_table_rows(r)
    png = base64.b64encode(study_figure_png(r)).decode()
    env = environment()
    # A study tested in pairs (``labels``) compares each setting with its own partner, not one reference.
    paired = any(_partner(c, r) for c in r.comparisons)
    ctx = {"r": r, "head": head, "body": body, "png": png, "paired": paired}
    return env.get_template("study.html.j2").render(ctx), env.get_template("study.md.j2").render(ctx)
