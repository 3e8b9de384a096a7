"""The report's tables and sentences as display strings, from ``results.json`` (numbers: evaluate.fmt).

Every function here takes plain data and returns strings or rows of strings; the templates lay them out
(HTML or Markdown) and :func:`format_ablation_table` aligns them for the terminal. No file is read here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from endodistill.evaluate.fmt import (
    DASH,
    fmt_auc,
    fmt_ci,
    fmt_float,
    fmt_p,
    fmt_pct,
    fmt_value,
    fmt_z,
    num,
)

# MRI AUC reported by the paper (arXiv 2307.02000, 5-fold CV on a private cohort; 65.0, 85.2, 90.6 there).
PAPER_AUC: dict[str, float] = {"scratch_ce": 0.650, "mae_kd": 0.852, "mae_kd_ce": 0.906}

# The reference baselines (results["baselines"]), in display order, and what each one is.
BASELINE_NAMES: dict[str, str] = {
    "logreg": "L2 logistic regression on the preprocessed voxels (C by inner CV on the training part)",
    "cnn3d": "small 3D CNN (MONAI Classifier), the student's budget rules",
    "oracle": "posterior from the synthetic cohort's latent signs (the ceiling)",
}
SIGN_VISIBILITY_SENTENCE = (
    "A probe per latent sign on the preprocessed grid: which signs the chosen resolution can show at all "
    "(out-of-fold AUC of an L2 logistic regression predicting the sign from the voxels, on the run's folds; "
    "about 0.5 means the sign is invisible at this grid)."
)

Rows = list[list[str]]


# --- results.json access ---------------------------------------------------------------------------


def cfg_of(results: Mapping[str, Any]) -> Mapping[str, Any]:
    """``results["config"]``, or ``{}``."""
    cfg = results.get("config")
    return cfg if isinstance(cfg, Mapping) else {}


def mapping(results: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``results[key]`` when it is an object, else ``{}``."""
    v = results.get(key)
    return v if isinstance(v, Mapping) else {}


def baselines_of(results: Mapping[str, Any]) -> Mapping[str, Any]:
    """``results["baselines"]``, or ``{}``."""
    return mapping(results, "baselines")


def comparisons_of(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The methods' paired comparisons (``results["comparisons"]``)."""
    return [c for c in results.get("comparisons") or [] if isinstance(c, Mapping)]


def baseline_comparisons_of(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The full method against the reference baselines (``results["baselines"]["comparisons"]``)."""
    return [c for c in baselines_of(results).get("comparisons") or [] if isinstance(c, Mapping)]


def full_method(results: Mapping[str, Any]) -> str:
    """The full method's name as shown (the highlighted row)."""
    protocol = cfg_of(results).get("protocol")
    full = str(protocol.get("full_method", "mae_kd_ce") if isinstance(protocol, Mapping) else "mae_kd_ce")
    return display_names(results).get(full, full)


def display_names(results: Mapping[str, Any]) -> dict[str, str]:
    """``results["display_names"]``: an optional ``{method: name shown in the report}`` (edit it and run
    ``endodistill report RUN`` to rename methods in every table and figure)."""
    names = results.get("display_names")
    if not isinstance(names, Mapping):
        return {}
    return {str(k): str(v) for k, v in names.items() if isinstance(v, str) and v.strip()}


def renamed(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` with the methods under their display names (in ``methods``, the comparisons, the
    reference and full method); each renamed method keeps its key in ``_key`` (the paper's AUC)."""
    names = display_names(results)
    if not names or results.get("_renamed"):
        return results

    def comps(cs: Any) -> Any:
        if not isinstance(cs, list):
            return cs
        return [
            {**c, **{k: names.get(str(c[k]), c[k]) for k in ("method_a", "method_b") if k in c}}
            if isinstance(c, Mapping)
            else c
            for c in cs
        ]

    out = dict(results, _renamed=True)
    methods = results.get("methods")
    if isinstance(methods, Mapping):
        out["methods"] = {
            names.get(k, k): ({**m, "_key": k} if isinstance(m, Mapping) else m) for k, m in methods.items()
        }
    out["comparisons"] = comps(results.get("comparisons"))
    if isinstance(results.get("baselines"), Mapping):
        out["baselines"] = {
            **results["baselines"],
            "comparisons": comps(results["baselines"].get("comparisons")),
        }
        if results["baselines"].get("comparisons") is None:
            out["baselines"].pop("comparisons")
    for k in ("reference", "full_method"):
        if isinstance(results.get(k), str):
            out[k] = names.get(results[k], results[k])
    return out


# --- cells -------------------------------------------------------------------------------------------


def auc_cell(m: Mapping[str, Any]) -> str:
    return fmt_ci(m.get("auc"), m.get("auc_ci95"))


def fold_cell(m: Mapping[str, Any]) -> str:
    """``mean ± SD`` of the per-fold AUCs (just the mean without an SD)."""
    mean, std = fmt_auc(m.get("fold_auc_mean")), fmt_auc(m.get("fold_auc_std"))
    if mean == DASH:
        return DASH
    return f"{mean} ± {std}" if std != DASH else mean


def op_cell(op: Any) -> str:
    """An operating point as ``sens / spec`` in %."""
    if not isinstance(op, Mapping):
        return DASH
    return f"{fmt_pct(op.get('sensitivity'))} / {fmt_pct(op.get('specificity'))}"


def _high_sens_target(methods: Mapping[str, Any]) -> str:
    for m in methods.values():
        hs = m.get("high_sensitivity") if isinstance(m, Mapping) else None
        if isinstance(hs, Mapping) and num(hs.get("target")) is not None:
            return f"{100 * float(hs['target']):.0f}%"
    return "target"


def metric_cells(name: str, m: Mapping[str, Any]) -> list[str]:
    """Name, AUC [CI], fold mean ± SD, the two operating points, Brier, ECE: a method's or a baseline's."""
    return [
        name,
        auc_cell(m),
        fold_cell(m),
        op_cell(m.get("youden")),
        op_cell(m.get("high_sensitivity")),
        fmt_auc(m.get("brier")),
        fmt_auc(m.get("ece")),
    ]


# --- tables ------------------------------------------------------------------------------------------


def ablation_rows(results: Mapping[str, Any]) -> tuple[list[str], Rows]:
    """The ablation table: one row per method, the paper's AUC last."""
    methods = results.get("methods") or {}
    headers = [
        "Method",
        "AUC [95% CI]",
        "Fold AUC mean ± SD",
        "Sens / Spec % @ Youden",
        f"Sens / Spec % @ sens ≥ {_high_sens_target(methods)}",
        "Brier",
        "ECE",
        "Paper AUC",
    ]
    rows = []
    for name, m in methods.items():
        m = m if isinstance(m, Mapping) else {}
        paper = PAPER_AUC.get(str(m.get("_key", name)))
        rows.append([*metric_cells(str(name), m), fmt_auc(paper)])
    return headers, rows


def baseline_rows(results: Mapping[str, Any], ncols: int) -> Rows:
    """The baselines as rows of the ablation table (same columns; no paper AUC)."""
    rows = []
    for name in BASELINE_NAMES:
        m = baselines_of(results).get(name)
        if not isinstance(m, Mapping):
            continue
        rows.append((metric_cells(name, m) + [DASH] * ncols)[:ncols])
    return rows


def baseline_descriptions(results: Mapping[str, Any]) -> dict[str, str]:
    """``{baseline: what it is}`` for the baselines the run has."""
    return {k: v for k, v in BASELINE_NAMES.items() if baselines_of(results).get(k)}


def sign_visibility(results: Mapping[str, Any]) -> dict[str, Any]:
    """``{latent sign: probe AUC}`` (``results["baselines"]["sign_visibility"]``)."""
    sv = baselines_of(results).get("sign_visibility")
    return {str(k): v for k, v in sv.items()} if isinstance(sv, Mapping) else {}


def visible_ceiling_line(results: Mapping[str, Any]) -> str | None:
    """One sentence on the population ceiling from the signs the grid shows (None when not computed)."""
    vc = baselines_of(results).get("visible_ceiling")
    if not isinstance(vc, Mapping) or vc.get("auc") is None:
        return None
    signs = list(vc.get("signs") or [])
    n_all = len(sign_visibility(results)) or len(signs)
    return (
        f"Population AUC ceiling from the {len(signs)} of {n_all} signs this grid shows (probe AUC >= "
        f"{float(vc['threshold']):.2f}: {', '.join(signs) or 'none'}): {fmt_auc(vc['auc'])}, against "
        f"{fmt_auc(vc.get('all_signs_auc'))} from all signs"
    )


def sign_visibility_rows(results: Mapping[str, Any]) -> Rows:
    return [[k, fmt_auc(v)] for k, v in sign_visibility(results).items()]


def diagnostic_lines(results: Mapping[str, Any]) -> list[str]:
    """One line each for the MAE probe, the teacher's CV AUC and the joint models' TVUS AUC, when present."""
    lines = []
    mae = results.get("mae")
    if isinstance(mae, Mapping) and num(mae.get("probe_auc")) is not None:
        line = "MAE linear probe AUC " + fmt_ci(mae.get("probe_auc"), mae.get("probe_auc_ci95"))
        if num(mae.get("random_probe_auc")) is not None:
            draws = mae.get("random_probe_draws")
            # Runs before probe_draws compared with one untrained encoder, the MAE's own initialisation.
            what = (
                f"the mean of {draws} untrained encoders"
                if num(draws) not in (None, 1)
                else "an untrained encoder"
            )
            line += f" vs the same probe on {what} of the same shape " + fmt_ci(
                mae.get("random_probe_auc"), mae.get("random_probe_auc_ci95")
            )
            if num(mae.get("gain")) is not None:
                line += "; gain " + fmt_ci(mae.get("gain"), mae.get("gain_ci95"))
        lines.append(line)
    teacher = results.get("teacher")
    if isinstance(teacher, Mapping) and num(teacher.get("cv_auc")) is not None:
        line = "Teacher cross-validated AUC " + fmt_ci(teacher.get("cv_auc"), teacher.get("cv_auc_ci95"))
        clip = teacher.get("clip_baseline")
        if isinstance(clip, Mapping) and num(clip.get("auc")) is not None:
            what = f" ({clip['feature_set']} features)" if isinstance(clip.get("feature_set"), str) else ""
            line += f"; simple clip baseline{what} " + fmt_ci(clip.get("auc"), clip.get("auc_ci95"))
            d, p = num(clip.get("teacher_minus_baseline")), num(clip.get("p_vs_teacher"))
            if d is not None and p is not None:
                line += f"; teacher minus baseline {float(d):+.3f}, paired DeLong p = {float(p):.3g}"
        lines.append(line)
    tvus = results.get("tvus")
    if isinstance(tvus, Mapping):
        tests = {c.get("method_a"): c for c in tvus.get("comparisons") or [] if isinstance(c, Mapping)}
        for m, tm in (tvus.get("methods") or {}).items():
            line = f"Joint model {m} on TVUS clips (out-of-fold, {tm.get('n')} clips) AUC " + fmt_ci(
                tm.get("auc"), tm.get("auc_ci95")
            )
            c = tests.get(m)
            if isinstance(c, Mapping) and num(c.get("p")) is not None:
                line += f"; vs the teacher on the same {c.get('n')} clips: DeLong p = {float(c['p']):.3g}"
            lines.append(line)
    return lines


def ceilings(results: Mapping[str, Any]) -> dict[str, float]:
    """``{modality: AUC ceiling}`` of the synthetic cohort (``results["cohort"]["ceilings"]``)."""
    ceil = mapping(results, "cohort").get("ceilings")
    if not isinstance(ceil, Mapping):
        return {}
    return {str(k): v for k, v in ceil.items() if num(v) is not None}


def fold_table(results: Mapping[str, Any]) -> tuple[list[str], Rows]:
    """Per-fold AUCs of each method and baseline, with their mean ± SD (no rows: no per-fold AUCs)."""
    methods: Mapping[str, Any] = results.get("methods") or {}
    n_folds = max(
        (len(m.get("fold_aucs") or []) for m in methods.values() if isinstance(m, Mapping)), default=0
    )
    baselines = {n: m for n, m in baselines_of(results).items() if n in BASELINE_NAMES}
    rows = []
    for n, m in [*methods.items(), *((f"{n} (baseline)", m) for n, m in baselines.items())]:
        if isinstance(m, Mapping) and m.get("fold_aucs"):
            vals = [fmt_auc(a) for a in m["fold_aucs"]][:n_folds]
            rows.append([n, *vals, *[""] * (n_folds - len(vals)), fold_cell(m)])
    return ["Method", *[f"fold {i}" for i in range(n_folds)], "mean ± SD"], rows


def comparisons_rows(comps: Sequence[Mapping[str, Any]]) -> tuple[list[str], Rows]:
    """The paired DeLong tests (and McNemar's, when the comparisons hold it), one row each."""
    headers = ["A", "B", "AUC A", "AUC B", "A − B", "z", "p", "p adjusted"]
    with_mc = any(isinstance(c, Mapping) and isinstance(c.get("mcnemar"), Mapping) for c in comps)
    if with_mc:
        headers += ["McNemar A / B only", "McNemar p adjusted"]
    rows = []
    for c in comps:
        if not isinstance(c, Mapping):
            continue
        row = [
            str(c.get("method_a", "?")),
            str(c.get("method_b", "?")),
            fmt_auc(c.get("auc_a")),
            fmt_auc(c.get("auc_b")),
            fmt_float(c.get("diff")),
            fmt_z(c.get("z")),
            fmt_p(c.get("p")),
            fmt_p(c.get("p_adjusted")),
        ]
        if with_mc:
            mc = c.get("mcnemar") if isinstance(c.get("mcnemar"), Mapping) else {}
            row += [
                f"{mc.get('a_only', DASH)} / {mc.get('b_only', DASH)}" if mc else DASH,
                fmt_p(mc.get("p_adjusted")) if mc else DASH,
            ]
        rows.append(row)
    return headers, rows


def correction_sentence(comps: Sequence[Mapping[str, Any]]) -> str:
    """What the comparisons test and how their p-values are adjusted."""
    names = {str(c.get("correction")) for c in comps if isinstance(c, Mapping) and c.get("correction")}
    name = names.pop() if len(names) == 1 else ("mixed" if names else "unknown")
    long = {"holm": "Holm-Bonferroni (step-down)", "bonferroni": "Bonferroni", "none": "no"}.get(name, name)
    return (
        f"DeLong's two-sided test for correlated AUCs on the same subjects; {len(comps)} comparisons, "
        f"p-values adjusted with the {long} correction for multiple comparisons across the whole family. "
        "McNemar: the exact test of the two methods' decisions at B's Youden threshold (cases only A / only "
        "B gets right), adjusted the same way."
    )


def teacher_rows(teacher: Mapping[str, Any]) -> dict[str, str]:
    """The teacher's metrics as display strings: AUCs with their CI, operating points, scalars; the rest
    (per-fold lists, the clip baseline: shown in their own sentence) left out."""
    rows: dict[str, str] = {}
    for k, v in teacher.items():
        if k in ("auc_ci95", "cv_auc_ci95", "fold_aucs") or isinstance(v, list):
            continue
        if k in ("auc", "cv_auc"):
            rows[k] = fmt_ci(v, teacher.get(f"{k}_ci95"))
        elif k in ("youden", "high_sensitivity") and isinstance(v, Mapping):
            target = num(v.get("target"))
            label = (
                "Youden"
                if k == "youden"
                else f"sens ≥ {fmt_float(None if target is None else 100 * target, 0)}%"
            )
            rows[f"sens / spec % @ {label}"] = op_cell(v)
            rows[f"threshold @ {label}"] = fmt_auc(v.get("threshold"))
        elif not isinstance(v, Mapping):
            rows[k] = DASH if v is None else str(fmt_value(v))
    folds = teacher.get("fold_aucs")
    if isinstance(folds, list) and len(folds) > 1:
        rows["fold AUCs"] = ", ".join(fmt_auc(a) for a in folds)
    return rows


def _leaves(v: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(v, Mapping):
        return [leaf for k, x in v.items() for leaf in _leaves(x, f"{prefix}.{k}")]
    return [(prefix, v)]


def kv_rows(d: Mapping[str, Any]) -> tuple[Rows, list[tuple[str, str]]]:
    """Key-value rows: numbers formatted, a small nested object flattened into ``key.sub`` rows; a large
    one (the generator's settings) folded away as indented JSON under its key.

    Returns:
        ``(rows, folded)``: ``[[key, value]]`` and ``[(key, JSON text)]``.
    """
    rows, folded = [], []
    for k, v in d.items():
        leaves = _leaves(v, str(k)) if isinstance(v, Mapping) else [(str(k), v)]
        if len(leaves) > 8 or any(isinstance(x, list) and len(x) > 8 for _, x in leaves):
            folded.append((str(k), json.dumps(v, indent=1, default=str)))
            continue
        for name, x in leaves:
            x = fmt_value(x, trim=True)
            rows.append(
                [name, x if isinstance(x, str) else DASH if x is None else json.dumps(x, default=str)]
            )
    return rows, folded


def timing_rows(timings: Mapping[str, Any]) -> Rows:
    """``[[stage, seconds]]`` and a total row."""
    rows = [[str(k), fmt_float(v, 1)] for k, v in timings.items()]
    total = sum(v for v in (num(x) for x in timings.values()) if v is not None)
    rows.append(["total", fmt_float(total, 1)])
    return rows


# --- calibration -------------------------------------------------------------------------------------


def quantile_bins(n: int) -> int:
    """How many quantile bins a reliability diagram of ``n`` cases gets: about 20 cases a bin, 3 to 10 bins."""
    return int(min(10, max(3, n // 20))) if n >= 6 else max(1, n // 2)


def quantile_calibration(
    labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray, n_bins: int | None = None
) -> dict[str, list[Any]]:
    """Reliability-diagram points over quantile bins: the cases sorted by probability, cut into
    ``n_bins`` groups of near-equal size (sizes differ by at most one; ties may straddle a cut).

    Args:
        labels: (N,) 0/1 labels.
        probs: (N,) predicted probabilities of class 1.
        n_bins: number of bins (default :func:`quantile_bins` of N).

    Returns:
        ``{"lo", "hi", "mean_prob", "observed", "count"}``, one entry per bin: the smallest and largest
        probability in the bin, its mean probability, its fraction of positives and its number of cases.
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    out: dict[str, list[Any]] = {"lo": [], "hi": [], "mean_prob": [], "observed": [], "count": []}
    if y.size == 0 or y.size != p.size:
        return out
    k = quantile_bins(y.size) if n_bins is None else max(1, min(int(n_bins), y.size))
    order = np.argsort(p, kind="stable")
    for idx in np.array_split(order, k):
        out["lo"].append(float(p[idx].min()))
        out["hi"].append(float(p[idx].max()))
        out["mean_prob"].append(float(p[idx].mean()))
        out["observed"].append(float(y[idx].mean()))
        out["count"].append(int(idx.size))
    return out


def calibration_table(groups: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> tuple[list[str], Rows]:
    """The reliability diagrams' bins as rows: method, bin, probability range, cases, mean, observed."""
    headers = ["Method", "Bin", "Probability range", "Cases", "Mean predicted", "Observed positive"]
    rows = []
    for name, (y, p) in groups.items():
        pts = quantile_calibration(y, p)
        for b in range(len(pts["count"])):
            rows.append(
                [
                    name,
                    str(b + 1),
                    f"{fmt_auc(pts['lo'][b])}-{fmt_auc(pts['hi'][b])}",
                    str(pts["count"][b]),
                    fmt_auc(pts["mean_prob"][b]),
                    fmt_auc(pts["observed"][b]),
                ]
            )
    return headers, rows


# --- the terminal ------------------------------------------------------------------------------------


def format_ablation_table(results: Mapping[str, Any]) -> str:
    """The ablation table as aligned plain text for the terminal (AUCs at 3 decimals, sensitivity in %).

    Args:
        results: the content of ``results.json``.

    Returns:
        The table, one line per method, then the reference baselines (same columns), the sign visibility,
        the MAE probe and the teacher's cross-validated AUC when ``results.json`` holds them, and last the
        cohort's AUC ceilings when known.
    """
    results = renamed(dict(results))
    headers, rows = ablation_rows(results)
    base = baseline_rows(results, len(headers))
    widths = [max(len(r[i]) for r in [headers, *rows, *base]) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    lines = [line(r) for r in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if base:
        lines.append("Reference baselines (same folds and statistics):")
        lines += [line(r) for r in base]
    sv = sign_visibility(results)
    if sv:
        lines.append(
            "Sign visibility (probe AUC per latent sign on the preprocessed grid): "
            + ", ".join(f"{k} {fmt_auc(v)}" for k, v in sv.items())
        )
    vc = visible_ceiling_line(results)
    if vc:
        lines.append(vc)
    lines += diagnostic_lines(results)
    ceil = ceilings(results)
    if ceil:
        lines.append(
            "AUC ceilings of the synthetic cohort: " + ", ".join(f"{k} {fmt_auc(v)}" for k, v in ceil.items())
        )
    return "\n".join(lines)
