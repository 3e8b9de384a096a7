"""The run report: one self-contained ``report.html`` (figures as base64 PNG) and ``report.md``.

Reads what the protocol leaves in a run directory: ``results.json``, ``oof_predictions.csv``,
``teacher/predictions.csv``, Lightning ``metrics.csv`` logs, optional ``examples/*.png`` (or a few
slices/frames drawn from the cohort manifest). Every input but ``results.json`` is optional: a
missing one becomes a one-line note in its section, so a partial run still gets a report.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from endodistill.errors import InputError
from endodistill.evaluate.delong import delong_auc_ci
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
from endodistill.evaluate.metrics import roc_points
from endodistill.evaluate.stats import read_oof_csv
from endodistill.utils import atomic_write_text

# The h2 ids of report.html, in order (tests and links rely on them).
SECTIONS: tuple[tuple[str, str], ...] = (
    ("ablation", "Ablation"),
    ("roc", "ROC curves (pooled out-of-fold)"),
    ("calibration", "Calibration"),
    ("teacher", "Teacher (TVUS)"),
    ("folds", "Per-fold AUCs"),
    ("comparisons", "Paired comparisons (DeLong)"),
    ("training", "Training curves"),
    ("examples", "Example images"),
    ("cohort", "Cohort"),
    ("config", "Configuration"),
    ("versions", "Software versions"),
    ("seed", "Seed"),
    ("timings", "Timings"),
)
SECTION_IDS: tuple[str, ...] = tuple(s for s, _ in SECTIONS)

# MRI AUC reported by the paper (arXiv 2307.02000, 5-fold CV on a private cohort; 65.0, 85.2, 90.6 there).
PAPER_AUC: dict[str, float] = {"scratch_ce": 0.650, "mae_kd": 0.852, "mae_kd_ce": 0.906}
_MAX_EXAMPLES = 12
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}
tr.full td{font-weight:600}img{max-width:100%;height:auto}td{white-space:nowrap}
table.kv td:last-child,table.kv th:last-child{text-align:left;white-space:normal}figure{display:inline-block;margin:0 1em 1em 0}
figcaption{font-size:.8em;color:#555}details{margin:.5em 0}summary{cursor:pointer}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}
.note{color:#666;font-style:italic}nav a{margin-right:.8em}
"""


# --- small formatting helpers (the numbers themselves: endodistill.evaluate.fmt) ----------------------


_num = num


def _auc_cell(m: Mapping[str, Any]) -> str:
    return fmt_ci(m.get("auc"), m.get("auc_ci95"))


def _fold_cell(m: Mapping[str, Any]) -> str:
    mean, std = fmt_auc(m.get("fold_auc_mean")), fmt_auc(m.get("fold_auc_std"))
    if mean == DASH:
        return DASH
    return f"{mean} ± {std}" if std != DASH else mean


def _op_cell(op: Any) -> str:
    if not isinstance(op, Mapping):
        return DASH
    return f"{fmt_pct(op.get('sensitivity'))} / {fmt_pct(op.get('specificity'))}"


def _high_sens_target(methods: Mapping[str, Any]) -> str:
    for m in methods.values():
        hs = m.get("high_sensitivity") if isinstance(m, Mapping) else None
        if isinstance(hs, Mapping) and _num(hs.get("target")) is not None:
            return f"{100 * float(hs['target']):.0f}%"
    return "target"


def _ablation_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
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
        rows.append([*_metric_cells(str(name), m), fmt_auc(paper)])
    return headers, rows


def _metric_cells(name: str, m: Mapping[str, Any]) -> list[str]:
    """Name, AUC [CI], fold mean ± SD, the two operating points, Brier, ECE: a method's or a baseline's."""
    return [
        name,
        _auc_cell(m),
        _fold_cell(m),
        _op_cell(m.get("youden")),
        _op_cell(m.get("high_sensitivity")),
        fmt_auc(m.get("brier")),
        fmt_auc(m.get("ece")),
    ]


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


def _baselines(results: Mapping[str, Any]) -> Mapping[str, Any]:
    b = results.get("baselines")
    return b if isinstance(b, Mapping) else {}


def _baseline_rows(results: Mapping[str, Any], ncols: int) -> list[list[str]]:
    """The baselines as rows of the ablation table (same columns; no paper AUC)."""
    rows = []
    for name in BASELINE_NAMES:
        m = _baselines(results).get(name)
        if not isinstance(m, Mapping):
            continue
        rows.append((_metric_cells(name, m) + [DASH] * ncols)[:ncols])
    return rows


def _sign_visibility(results: Mapping[str, Any]) -> dict[str, Any]:
    sv = _baselines(results).get("sign_visibility")
    return {str(k): v for k, v in sv.items()} if isinstance(sv, Mapping) else {}


def _ci_text(auc: Any, ci: Any) -> str:
    """``AUC [lo, hi]``, or just the AUC when the CI is missing."""
    return fmt_ci(auc, ci)


def _diagnostic_lines(results: Mapping[str, Any]) -> list[str]:
    """One line each for the MAE probe, the teacher's CV AUC and the joint models' TVUS AUC, when present."""
    lines = []
    mae = results.get("mae")
    if isinstance(mae, Mapping) and _num(mae.get("probe_auc")) is not None:
        line = "MAE linear probe AUC " + _ci_text(mae.get("probe_auc"), mae.get("probe_auc_ci95"))
        if _num(mae.get("random_probe_auc")) is not None:
            line += " vs the same probe on a randomly initialised encoder " + _ci_text(
                mae.get("random_probe_auc"), mae.get("random_probe_auc_ci95")
            )
        lines.append(line)
    teacher = results.get("teacher")
    if isinstance(teacher, Mapping) and _num(teacher.get("cv_auc")) is not None:
        line = "Teacher cross-validated AUC " + _ci_text(teacher.get("cv_auc"), teacher.get("cv_auc_ci95"))
        clip = teacher.get("clip_baseline")
        if isinstance(clip, Mapping) and _num(clip.get("auc")) is not None:
            line += "; simple clip baseline " + _ci_text(clip.get("auc"), clip.get("auc_ci95"))
        lines.append(line)
    tvus = results.get("tvus")
    if isinstance(tvus, Mapping):
        tests = {c.get("method_a"): c for c in tvus.get("comparisons") or [] if isinstance(c, Mapping)}
        for m, tm in (tvus.get("methods") or {}).items():
            line = f"Joint model {m} on TVUS clips (out-of-fold, {tm.get('n')} clips) AUC " + _ci_text(
                tm.get("auc"), tm.get("auc_ci95")
            )
            c = tests.get(m)
            if isinstance(c, Mapping) and _num(c.get("p")) is not None:
                line += f"; vs the teacher on the same {c.get('n')} clips: DeLong p = {float(c['p']):.3g}"
            lines.append(line)
    return lines


def _ceilings(results: Mapping[str, Any]) -> dict[str, float]:
    cohort = results.get("cohort")
    ceil = cohort.get("ceilings") if isinstance(cohort, Mapping) else None
    if not isinstance(ceil, Mapping):
        return {}
    return {str(k): v for k, v in ceil.items() if _num(v) is not None}


def format_ablation_table(results: Mapping[str, Any]) -> str:
    """The ablation table as aligned plain text for the terminal (AUCs at 3 decimals, sensitivity in %).

    Args:
        results: the content of ``results.json``.

    Returns:
        The table, one line per method, then the reference baselines (same columns), the sign visibility,
        the MAE probe and the teacher's cross-validated AUC when ``results.json`` holds them, and last the
        cohort's AUC ceilings when known.
    """
    results = _renamed(results)
    headers, rows = _ablation_rows(results)
    base = _baseline_rows(results, len(headers))
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
    sv = _sign_visibility(results)
    if sv:
        lines.append(
            "Sign visibility (probe AUC per latent sign on the preprocessed grid): "
            + ", ".join(f"{k} {fmt_auc(v)}" for k, v in sv.items())
        )
    lines += _diagnostic_lines(results)
    ceil = _ceilings(results)
    if ceil:
        lines.append(
            "AUC ceilings of the synthetic cohort: " + ", ".join(f"{k} {fmt_auc(v)}" for k, v in ceil.items())
        )
    return "\n".join(lines)


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    out = [
        "| " + " | ".join(esc(h) for h in headers) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|",
    ]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _html_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], highlight: str | None = None, cls: str = ""
) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for r in rows:
        full = ' class="full"' if highlight is not None and r and r[0] == highlight else ""
        body.append(f"<tr{full}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    table_cls = f' class="{cls}"' if cls else ""
    return f"<table{table_cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _cfg(results: Mapping[str, Any]) -> Mapping[str, Any]:
    cfg = results.get("config")
    return cfg if isinstance(cfg, Mapping) else {}


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


# --- figures --------------------------------------------------------------------------------------


def _new_figure(w: float, h: float) -> Any:
    # A bare Figure on the Agg canvas: no pyplot global state, no GUI backend, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    return _bytes_uri(buf.getvalue())


def _bytes_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _colours(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _group(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    by: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        y, p = by.setdefault(str(r["method"]), ([], []))
        y.append(int(r["label"]))
        p.append(float(r["prob"]))
    return {k: (np.asarray(y), np.asarray(p)) for k, (y, p) in by.items()}


def _ci_label(name: str, summary: Mapping[str, Any] | None, y: np.ndarray, p: np.ndarray) -> str:
    auc = lo = hi = None
    if isinstance(summary, Mapping):
        auc = _num(summary.get("auc"))
        ci = summary.get("auc_ci95")
        if isinstance(ci, list) and len(ci) == 2:
            lo, hi = _num(ci[0]), _num(ci[1])
    if auc is None and 0 < y.sum() < y.size:
        auc, lo, hi = delong_auc_ci(y, p)
        lo, hi = _num(lo), _num(hi)
    if auc is None:
        return f"{name} (AUC undefined)"
    return f"{name}: AUC {fmt_ci(auc, [lo, hi])}"


def _roc_figure(
    groups: Mapping[str, tuple[np.ndarray, np.ndarray]], summaries: Mapping[str, Any], title: str
) -> str | None:
    fig = _new_figure(6.0, 5.5)
    ax = fig.add_subplot()
    colours = _colours(list(groups))
    drawn = 0
    for name, (y, p) in groups.items():
        pts = roc_points(y, p)
        if not pts["fpr"]:
            continue
        ax.plot(
            pts["fpr"],
            pts["tpr"],
            color=colours[name],
            lw=1.8,
            label=_ci_label(name, summaries.get(name), y, p),
        )
        drawn += 1
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], color="#999", ls=":", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8, title="AUC [95% CI, DeLong]", title_fontsize=8)
    return _png_uri(fig)


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


def _calibration_figure(
    groups: Mapping[str, tuple[np.ndarray, np.ndarray]], methods: Mapping[str, Any]
) -> str | None:
    """One reliability panel per method (quantile bins, the bin sizes in the title) over a histogram of
    its predicted probabilities."""
    names = [n for n, (y, _) in groups.items() if y.size]
    if not names:
        return None
    ncol = min(3, len(names))
    nrow = -(-len(names) // ncol)
    fig = _new_figure(3.6 * ncol, 3.9 * nrow)
    colours = _colours(list(groups))
    outer = fig.add_gridspec(nrow, ncol, hspace=0.42, wspace=0.28)
    for i, name in enumerate(names):
        y, p = groups[name]
        r, c = divmod(i, ncol)
        inner = outer[r, c].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.08)
        ax = fig.add_subplot(inner[0])
        hist = fig.add_subplot(inner[1], sharex=ax)
        pts = quantile_calibration(y, p)
        ax.plot([0, 1], [0, 1], color="#999", ls=":", lw=1)
        ax.plot(pts["mean_prob"], pts["observed"], marker="o", ms=4, lw=1.4, color=colours[name])
        counts = pts["count"]
        size = str(counts[0]) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
        ece = (methods.get(name) or {}).get("ece") if isinstance(methods.get(name), Mapping) else None
        ax.set_title(f"{name}\n{len(counts)} bins of {size} cases; ECE {fmt_auc(ece)}", fontsize=8)
        ax.set(xlim=(0, 1), ylim=(-0.02, 1.02))
        ax.tick_params(labelbottom=False, labelsize=7)
        if c == 0:
            ax.set_ylabel("observed fraction positive", fontsize=8)
        hist.hist(p, bins=20, range=(0, 1), color=colours[name], alpha=0.6)
        hist.tick_params(labelsize=7)
        hist.set_xlabel("predicted probability", fontsize=8)
        if c == 0:
            hist.set_ylabel("cases", fontsize=8)
    return _png_uri(fig)


def _calibration_table(
    groups: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> tuple[list[str], list[list[str]]]:
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


def _folds_figure(methods: Mapping[str, Any]) -> str | None:
    names = [n for n, m in methods.items() if isinstance(m, Mapping) and m.get("fold_aucs")]
    if not names:
        return None
    fig = _new_figure(max(4.0, 1.2 * len(names) + 1.5), 4.0)
    ax = fig.add_subplot()
    colours = _colours(list(methods))
    for i, n in enumerate(names):
        vals = [v for v in (_num(a) for a in methods[n]["fold_aucs"]) if v is not None]
        offs = np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else np.zeros(len(vals))
        ax.scatter(i + offs, vals, color=colours[n], s=22, zorder=3)
        if vals:
            ax.hlines(np.mean(vals), i - 0.3, i + 0.3, color="k", lw=1.5)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set(ylabel="AUC within fold", ylim=(min(0.4, ax.get_ylim()[0]), 1.02))
    ax.axhline(0.5, color="#999", ls=":", lw=1)
    return _png_uri(fig)


# --- training logs --------------------------------------------------------------------------------


def _read_metrics_csv(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Series ``column -> (x, y)`` from a Lightning CSVLogger file (x = epoch, else step, else row)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    cols = list(rows[0].keys())
    xcol = "epoch" if "epoch" in cols else ("step" if "step" in cols else None)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, r in enumerate(rows):
        x = _num(r.get(xcol)) if xcol else float(i)
        if x is None:
            x = float(i)
        for c in cols:
            if c in ("step", "epoch") or c is None:
                continue
            v = _num(r.get(c))
            if v is not None:
                xs, ys = series.setdefault(c, ([], []))
                xs.append(x)
                ys.append(v)
    return series


CV_TRAINING = "Cross-validation fits"
OTHER_TRAINING = "Teacher, MAE and final model"


def training_panels(run_dir: str | Path) -> dict[str, dict[str, list[tuple[str, Path]]]]:
    """The ``metrics.csv`` logs of a run directory as figures of panels of lines.

    Returns:
        ``{CV_TRAINING: {method: [(fold label, path), ...]}, OTHER_TRAINING: {stage: [(fit label, path)]}}``:
        one panel per cross-validation method with a line per fold, one panel per other stage (teacher,
        mae, final, ...) with a line per fit in it; figures without logs are left out.
    """
    run_dir = Path(run_dir)
    figs: dict[str, dict[str, list[tuple[str, Path]]]] = {CV_TRAINING: {}, OTHER_TRAINING: {}}
    for f in sorted(run_dir.rglob("metrics.csv")):
        rel = f.relative_to(run_dir).parts
        inner = rel[:-1]
        if "logs" in inner:  # <unit>/logs/version_N/metrics.csv
            inner = inner[: inner.index("logs")]
        if len(rel) >= 4 and rel[0] == "folds":
            fig, panel, label = CV_TRAINING, rel[2], rel[1].replace("fold_", "fold ")
        else:
            fig, panel = OTHER_TRAINING, rel[0] if len(rel) > 1 else "run"
            label = "/".join(inner[1:]).replace("fold_", "fold ") or panel
        figs[fig].setdefault(panel, []).append((label, f))
    for panels in figs.values():
        # Several logs of one fit (resumed versions) keep their sub-path so lines stay distinguishable.
        for key, items in panels.items():
            labels = [lb for lb, _ in items]
            if len(set(labels)) < len(labels):
                panels[key] = [(str(f.parent.relative_to(run_dir)), f) for _, f in items]
    return {k: v for k, v in figs.items() if v}


_STYLES = ["-", "--", "-.", ":"]


def _curve_columns(series: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """The columns a panel draws: the total train / val loss (left axis; every loss column when neither is
    logged) and the validation AUC (right axis, [0, 1]; else any AUC or accuracy logged). Loss parts, KD weights and learning rates
    are left out: in the logs, not in the figure."""
    cols = {c for s in series for c in s}
    left = [c for c in ("train_loss", "val_loss") if c in cols] or sorted(c for c in cols if "loss" in c)
    scores = sorted(c for c in cols if ("auc" in c or "acc" in c) and "loss" not in c)
    right = [c for c in scores if c.startswith("val")] or scores  # val AUC over training accuracy
    return left, right


def _training_figure(
    panels: Mapping[str, Sequence[tuple[str, Path]]], shared_legend: bool, order: Sequence[str] = ()
) -> tuple[str | None, list[str]]:
    """One panel per entry of ``panels``, a colour per fit and a line style per column.

    Panels named in ``order`` (the methods of results.json) come first, in that order.

    Returns:
        The PNG data URI (None when nothing can be drawn) and the legend's labels (one per fit, one per
        column: never fits x columns).
    """
    rank = {n: i for i, n in enumerate(order)}
    panels = dict(sorted(panels.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))
    loaded: dict[str, list[tuple[str, dict[str, tuple[list[float], list[float]]]]]] = {}
    for title, items in panels.items():
        for label, f in items:
            try:
                series = _read_metrics_csv(f)
            except (OSError, csv.Error, UnicodeDecodeError):
                continue
            if series:
                loaded.setdefault(title, []).append((label, series))
    if not loaded:
        return None, []
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    cmap = colormaps["tab10"]
    ncol = min(3, len(loaded))
    nrow = -(-len(loaded) // ncol)
    fig = _new_figure(4.3 * ncol, 3.3 * nrow + (0 if shared_legend else 0.8 * nrow))
    all_fits = list(dict.fromkeys(lb for fits in loaded.values() for lb, _ in fits))
    all_cols: dict[str, bool] = {}  # column -> on the right axis
    legend_labels: list[str] = []
    for i, (title, fits) in enumerate(loaded.items()):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        left, right = _curve_columns([s for _, s in fits])
        twin = ax.twinx() if right else None
        fit_names = [lb for lb, _ in fits] if not shared_legend else all_fits
        for lb, series in fits:
            colour = cmap(fit_names.index(lb) % 10)
            for ci, c in enumerate(left + right):
                if c not in series:
                    continue
                xs, ys = series[c]
                target = ax if c in left else twin
                assert target is not None
                target.plot(
                    xs, ys, color=colour, ls=_STYLES[ci % len(_STYLES)], lw=1.2,
                    marker="." if len(xs) < 30 else None, ms=3,
                )  # fmt: skip
        for c in left:
            all_cols.setdefault(c, False)
        for c in right:
            all_cols.setdefault(c, True)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
        if twin is not None:
            twin.set_ylim(-0.02, 1.02)
            twin.set_ylabel(" / ".join(right), fontsize=8)
            twin.tick_params(labelsize=7)
        if not shared_legend:
            handles = _legend_handles(Line2D, cmap, [lb for lb, _ in fits] if len(fits) > 1 else [],
                                      left + right, set(right))  # fmt: skip
            ax.legend(
                handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
                frameon=False,
            )  # fmt: skip
            legend_labels += [str(h.get_label()) for h in handles]
    if shared_legend:
        cols = list(all_cols)
        handles = _legend_handles(Line2D, cmap, all_fits, cols, {c for c, r in all_cols.items() if r})
        fig.subplots_adjust(wspace=0.45, hspace=0.45)
        fig.legend(
            handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.03), ncol=min(len(handles), 8),
            fontsize=8, frameon=False,
        )  # fmt: skip
        legend_labels = [str(h.get_label()) for h in handles]
    else:
        fig.subplots_adjust(wspace=0.45, hspace=0.9)
    return _png_uri(fig), legend_labels


def _legend_handles(
    line2d: Any, cmap: Any, fits: Sequence[str], cols: Sequence[str], right: set[str]
) -> list:
    handles = [line2d([], [], color=cmap(i % 10), lw=2, label=lb) for i, lb in enumerate(fits)]
    handles += [
        line2d([], [], color="#444", ls=_STYLES[i % len(_STYLES)], lw=1.2,
               label=f"{c} (right axis)" if c in right else c)
        for i, c in enumerate(cols)
    ]  # fmt: skip
    return handles


# --- example images -------------------------------------------------------------------------------


def _example_pngs(run_dir: Path) -> list[tuple[str, str]]:
    out = []
    for f in sorted((run_dir / "examples").glob("*.png"))[:_MAX_EXAMPLES]:
        data = f.read_bytes()
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            out.append((f.name, _bytes_uri(data)))
    return out


def _scaled(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    return np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img, dtype=np.float64)


def _load_slices(path: Path, series_uid: str | None) -> list[tuple[str, np.ndarray]]:
    import nibabel as nib

    try:
        from endodistill.data.mri import load_volume

        vol = load_volume(path, series_uid=series_uid)
        arr, affine = np.asarray(vol.array, dtype=np.float32), np.asarray(vol.affine, dtype=np.float64)
    except ImportError:  # helper module absent: plain NIfTI only
        img = nib.load(str(path))
        arr, affine = np.asarray(img.get_fdata(dtype=np.float32)), np.asarray(img.affine)
    arr = arr[..., 0] if arr.ndim == 4 else arr
    if arr.ndim != 3:
        return [("slice", np.squeeze(arr))]
    # The thick (through-plane) axis of a 2D-acquired series: largest spacing, then fewest voxels.
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    thick = int(np.lexsort((np.array(arr.shape), -np.round(zooms, 3)))[0])
    # Reorient to RAS (nibabel) so every example shows anatomy the same way up.
    ornt = nib.orientations.io_orientation(affine)
    arr = nib.orientations.apply_orientation(arr, ornt)
    axis = int(ornt[thick, 0])
    n = arr.shape[axis]
    step = max(1, n // 6)
    picks = sorted({min(max(n // 2 + d * step, 0), n - 1) for d in (-1, 0, 1)})
    # Shown with origin="lower" the slice's later RAS axis points up; the horizontal flip gives the
    # radiological convention (patient's right / anterior on the viewer's left).
    return [(f"slice {k}", np.take(arr, k, axis=axis).T[:, ::-1]) for k in picks]


def _load_frames(path: Path) -> list[tuple[str, np.ndarray]]:
    try:
        from endodistill.data.video import load_clip

        frames = np.asarray(load_clip(path).frames)
    except ImportError:  # helper module absent: decode with PyAV
        import av

        with av.open(str(path)) as container:
            frames = np.stack([f.to_ndarray(format="gray") for f in container.decode(video=0)])
    if frames.ndim == 4:
        frames = frames.mean(axis=-1)
    n = frames.shape[0]
    picks = sorted({n // 4, n // 2, (3 * n) // 4})  # the first frames are often blank
    return [(f"frame {k}", frames[k].astype(np.float32)) for k in picks]


def _cohort_examples(results: Mapping[str, Any], run_dir: Path) -> tuple[str | None, str]:
    cohort = results.get("cohort")
    raw = cohort.get("manifest") if isinstance(cohort, Mapping) else None
    if not raw:
        return None, "no examples/*.png in the run directory and no cohort manifest in results.json"
    cand = [Path(raw)] if Path(raw).is_absolute() else [run_dir / raw, Path(raw)]
    manifest_path = next((c for c in cand if c.is_file()), None)
    if manifest_path is None:
        return None, f"cohort manifest {raw} not readable: no example images"
    from endodistill.data.manifest import read_manifest

    task = _cfg(results).get("task")
    task = task if isinstance(task, Mapping) else {}
    student = str(task.get("student_modality", "mri")).lower()
    teacher = str(task.get("teacher_modality", "tvus")).lower()
    manifest = read_manifest(manifest_path)
    panels: list[tuple[str, list[tuple[str, np.ndarray]]]] = []
    skipped = 0
    for modality, loader in ((student, "volume"), (teacher, "clip")):
        seen: set[int] = set()
        for rec in manifest.select(modality, labelled=True):
            if rec.label in seen:
                continue
            try:
                imgs = (
                    _load_slices(rec.path, rec.extra.get("series_uid") or None)
                    if loader == "volume"
                    else _load_frames(rec.path)
                )
            except Exception:  # any unreadable file just means no example from it
                skipped += 1
                continue
            seen.add(rec.label)
            panels.append((f"{modality} {rec.subject_id} (label {rec.label})", imgs))
            if len(seen) >= 2:
                break
    if not panels:
        return None, f"no readable example in {manifest_path}"
    ncol = max(len(imgs) for _, imgs in panels)
    fig = _new_figure(2.6 * ncol, 2.6 * len(panels))
    for r, (title, imgs) in enumerate(panels):
        for c, (sub, img) in enumerate(imgs):
            ax = fig.add_subplot(len(panels), ncol, r * ncol + c + 1)
            ax.imshow(_scaled(img), cmap="gray", origin="lower" if title.startswith(student) else "upper")
            ax.set_title(f"{title}\n{sub}", fontsize=7)
            ax.axis("off")
    note = f"drawn from {manifest_path.name}" + (f" ({skipped} unreadable files skipped)" if skipped else "")
    return _png_uri(fig), note


# --- the report -----------------------------------------------------------------------------------


def _read_results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "results.json"
    if not path.is_file():
        raise InputError(path, "not found (has the run finished?)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid JSON ({e})") from None
    if not isinstance(results, dict) or not isinstance(results.get("methods", {}), dict):
        raise InputError(path, "expected an object with a 'methods' object")
    return results


def _read_teacher_predictions(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [
            r
            for r in csv.DictReader(fh)
            if _num(r.get("prob")) is not None and _num(r.get("label")) is not None
        ]
    if not rows:
        return None
    return np.array([int(float(r["label"])) for r in rows]), np.array([float(r["prob"]) for r in rows])


def _leaves(v: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(v, Mapping):
        return [leaf for k, x in v.items() for leaf in _leaves(x, f"{prefix}.{k}")]
    return [(prefix, v)]


def _kv_table(d: Mapping[str, Any], key: str = "Key", value: str = "Value") -> str:
    """Key-value rows (values left-aligned): numbers formatted, a small nested object flattened into
    ``key.sub`` rows; a large one (the generator's settings) folded away as JSON under its key."""
    rows, folded = [], []
    for k, v in d.items():
        leaves = _leaves(v, str(k)) if isinstance(v, Mapping) else [(str(k), v)]
        if len(leaves) > 8 or any(isinstance(x, list) and len(x) > 8 for _, x in leaves):
            folded.append((str(k), v))
            continue
        for name, x in leaves:
            x = fmt_value(x, trim=True)
            rows.append(
                [name, x if isinstance(x, str) else DASH if x is None else json.dumps(x, default=str)]
            )
    out = _html_table([key, value], rows, cls="kv")
    for name, v in folded:
        out += (
            f"<details><summary>{html.escape(name)}</summary>"
            f"<pre>{html.escape(json.dumps(v, indent=1, default=str))}</pre></details>"
        )
    return out


def _config_text(results: Mapping[str, Any], run_dir: Path) -> str | None:
    import yaml

    cfg = results.get("config")
    if isinstance(cfg, Mapping) and cfg:
        return yaml.safe_dump(json.loads(json.dumps(cfg, default=str)), sort_keys=False, allow_unicode=True)
    f = run_dir / "config.yaml"
    return f.read_text(encoding="utf-8") if f.is_file() else None


def _versions(results: Mapping[str, Any], run_dir: Path) -> Mapping[str, Any]:
    v = results.get("versions")
    if isinstance(v, Mapping) and v:
        return v
    f = run_dir / "run.json"
    try:
        run = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    v = run.get("versions") if isinstance(run, dict) else None
    return v if isinstance(v, Mapping) else {}


def _comparisons_rows(comps: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
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


def _correction_sentence(comps: Sequence[Mapping[str, Any]]) -> str:
    names = {str(c.get("correction")) for c in comps if isinstance(c, Mapping) and c.get("correction")}
    name = names.pop() if len(names) == 1 else ("mixed" if names else "unknown")
    long = {"holm": "Holm-Bonferroni (step-down)", "bonferroni": "Bonferroni", "none": "no"}.get(name, name)
    return (
        f"DeLong's two-sided test for correlated AUCs on the same subjects; {len(comps)} comparisons, "
        f"p-values adjusted with the {long} correction for multiple comparisons across the whole family. "
        "McNemar: the exact test of the two methods' decisions at B's Youden threshold (cases only A / only "
        "B gets right), adjusted the same way."
    )


def _teacher_rows(teacher: Mapping[str, Any]) -> dict[str, str]:
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
            rows[f"sens / spec % @ {label}"] = _op_cell(v)
            rows[f"threshold @ {label}"] = fmt_auc(v.get("threshold"))
        elif not isinstance(v, Mapping):
            rows[k] = DASH if v is None else str(fmt_value(v))
    folds = teacher.get("fold_aucs")
    if isinstance(folds, list) and len(folds) > 1:
        rows["fold AUCs"] = ", ".join(fmt_auc(a) for a in folds)
    return rows


def _baselines_html(results: Mapping[str, Any], headers: Sequence[str]) -> list[str]:
    """The reference baselines, sign visibility and MAE probe blocks of the ablation section."""
    parts = []
    base = _baseline_rows(results, len(headers))
    if base:
        what = "; ".join(
            f"<b>{k}</b>: {html.escape(v)}" for k, v in BASELINE_NAMES.items() if _baselines(results).get(k)
        )
        parts += [
            "<h3>Reference baselines</h3>",
            f"<p>Same folds and statistics as the methods, apart from them: {what}.</p>",
            _html_table(["Baseline", *headers[1:]], base),
        ]
    sv = _sign_visibility(results)
    if sv:
        parts += [
            "<h3>Sign visibility</h3>",
            f"<p>{html.escape(SIGN_VISIBILITY_SENTENCE)}</p>",
            _html_table(["Latent sign", "Probe AUC"], [[k, fmt_auc(v)] for k, v in sv.items()]),
        ]
    mae = [ln for ln in _diagnostic_lines(results) if ln.startswith("MAE")]
    if mae:
        parts += ["<h3>MAE linear probe</h3>", f"<p>{html.escape(mae[0])} (95% CI).</p>"]
    return parts


def _html_sections(results: dict[str, Any], run_dir: Path) -> dict[str, str]:
    methods: dict[str, Any] = results.get("methods") or {}
    protocol = _cfg(results).get("protocol")
    full = str(protocol.get("full_method", "mae_kd_ce") if isinstance(protocol, Mapping) else "mae_kd_ce")
    names = _display_names(results)
    full = names.get(full, full)
    body: dict[str, str] = {}

    headers, rows = _ablation_rows(results)
    parts = [
        _html_table(headers, rows, highlight=full) if rows else _note("no methods in results.json"),
        _note(
            "AUCs as fractions (0.500 = chance); sensitivity and specificity in %; pooled out-of-fold predictions with "
            "DeLong 95% CIs. Paper: Wang et al., arXiv 2307.02000 (private cohort, no CIs published)."
        ),
    ]
    parts += _baselines_html(results, headers)
    ceil = _ceilings(results)
    if ceil:
        parts.append(
            "<p>AUC ceilings of the synthetic cohort (Bayes-optimal on the generator's latents): "
            + ", ".join(f"<b>{html.escape(k)}</b> {fmt_auc(v)}" for k, v in ceil.items())
            + "</p>"
        )
    body["ablation"] = "".join(parts)

    oof_path = run_dir / "oof_predictions.csv"
    groups: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    oof_note = ""
    if oof_path.is_file():
        try:
            groups = {names.get(k, k): v for k, v in _group(read_oof_csv(oof_path)).items()}
        except InputError as e:
            oof_note = str(e)
    else:
        oof_note = "oof_predictions.csv not found"
    roc = _roc_figure(groups, methods, "Out-of-fold ROC, all methods") if groups else None
    body["roc"] = _img(roc, "ROC curves") if roc else _note(oof_note or "no method has both classes")
    cal = _calibration_figure(groups, methods) if groups else None
    if cal:
        h, r = _calibration_table(groups)
        body["calibration"] = (
            _img(cal, "reliability diagrams")
            + _note(
                "Reliability over quantile bins (the pooled out-of-fold cases sorted by predicted probability, "
                "cut into groups of near-equal size), the dotted line is perfect calibration; below each "
                "panel the histogram of the predicted probabilities. The ECE of the tables uses 10 "
                "equal-width bins."
            )
            + "<details><summary>Cases, mean predicted probability and observed fraction per bin</summary>"
            + _html_table(h, r)
            + "</details>"
        )
    else:
        body["calibration"] = _note(oof_note or "no predictions")

    teacher = results.get("teacher") if isinstance(results.get("teacher"), Mapping) else {}
    tp = _read_teacher_predictions(run_dir / "teacher" / "predictions.csv")
    tparts = []
    if tp is not None:
        fig = _roc_figure({"teacher": tp}, {"teacher": teacher}, "Teacher ROC on held-out TVUS clips")
        tparts.append(_img(fig, "teacher ROC") if fig else _note("teacher predictions hold one class only"))
    else:
        tparts.append(_note("teacher/predictions.csv not found"))
    teacher_cv = [ln for ln in _diagnostic_lines(results) if ln.startswith("Teacher")]
    if teacher_cv:
        tparts.append(f"<p>{html.escape(teacher_cv[0])} (95% CI).</p>")
    if teacher:
        tparts.append(_kv_table(_teacher_rows(teacher), "Teacher metric"))
    body["teacher"] = "".join(tparts)

    fold_fig = _folds_figure(methods)
    fold_rows = []
    n_folds = max(
        (len(m.get("fold_aucs") or []) for m in methods.values() if isinstance(m, Mapping)), default=0
    )
    baselines = {n: m for n, m in _baselines(results).items() if n in BASELINE_NAMES}
    for n, m in [*methods.items(), *((f"{n} (baseline)", m) for n, m in baselines.items())]:
        if isinstance(m, Mapping) and m.get("fold_aucs"):
            vals = [fmt_auc(a) for a in m["fold_aucs"]][:n_folds]
            fold_rows.append([n, *vals, *[""] * (n_folds - len(vals)), _fold_cell(m)])
    body["folds"] = (_img(fold_fig, "per-fold AUCs") if fold_fig else "") + (
        _html_table(["Method", *[f"fold {i}" for i in range(n_folds)], "mean ± SD"], fold_rows, full)
        if fold_rows
        else _note("no per-fold AUCs in results.json")
    )

    comps = [c for c in results.get("comparisons") or [] if isinstance(c, Mapping)]
    if comps:
        h, r = _comparisons_rows(comps)
        body["comparisons"] = f"<p>{html.escape(_correction_sentence(comps))}</p>" + _html_table(h, r)
    else:
        body["comparisons"] = _note("no comparisons in results.json")
    bcomps = [c for c in _baselines(results).get("comparisons") or [] if isinstance(c, Mapping)]
    if bcomps:
        h, r = _comparisons_rows(bcomps)
        body["comparisons"] += (
            "<h3>Full method vs reference baselines</h3>"
            f"<p>{html.escape(_correction_sentence(bcomps))} (A separate family from the methods' tests.)</p>"
            + _html_table(h, r)
        )

    tparts = []
    for title, panels in training_panels(run_dir).items():
        if title == CV_TRAINING:
            panels = {names.get(k, k): v for k, v in panels.items()}
        fig, _ = _training_figure(
            panels, shared_legend=title == CV_TRAINING, order=[*methods, "teacher", "mae", "final"]
        )
        if fig:
            what = "one panel per method, a line per fold" if title == CV_TRAINING else "a line per fit"
            tparts.append(f"<h3>{html.escape(title)}</h3>" + _img(fig, f"training curves: {title}"))
            tparts.append(
                _note(f"{what}; loss on the left axis and, where logged, the AUC on the right (0-1) axis")
            )
    body["training"] = "".join(tparts) or _note("no Lightning metrics.csv logs under the run directory")

    pngs = _example_pngs(run_dir)
    if pngs:
        body["examples"] = "".join(
            f"<figure>{_img(uri, name)}<figcaption>{html.escape(name)}</figcaption></figure>"
            for name, uri in pngs
        )
    else:
        try:
            uri, note = _cohort_examples(results, run_dir)
        except Exception as e:  # the report must not fail for want of an example image
            uri, note = None, f"example images unavailable ({type(e).__name__}: {e})"
        body["examples"] = (_img(uri, "example MRI slices and TVUS frames") if uri else "") + _note(note)

    cohort = results.get("cohort") if isinstance(results.get("cohort"), Mapping) else {}
    if cohort:
        flat = {k: v for k, v in cohort.items() if k != "ceilings"}
        cparts = [_kv_table(flat, "Cohort")]
        if ceil:
            cparts.append(
                _kv_table({f"{k} AUC ceiling": fmt_auc(v) for k, v in ceil.items()}, "Ceiling", "AUC")
            )
        body["cohort"] = "".join(cparts)
    else:
        body["cohort"] = _note("no cohort information in results.json")

    cfg_text = _config_text(results, run_dir)
    body["config"] = (
        "<details><summary>The resolved configuration of the run (YAML)</summary>"
        f"<pre>{html.escape(cfg_text)}</pre></details>"
        if cfg_text
        else _note("no configuration recorded")
    )
    versions = _versions(results, run_dir)
    body["versions"] = (
        _kv_table(versions, "Package", "Version") if versions else _note("no versions recorded")
    )
    seed = results.get("seed", _cfg(results).get("seed"))
    body["seed"] = (
        f"<p><code>{html.escape(str(seed))}</code></p>" if seed is not None else _note("no seed recorded")
    )

    timings = results.get("timings") if isinstance(results.get("timings"), Mapping) else {}
    if timings:
        trows = [[str(k), fmt_float(v, 1)] for k, v in timings.items()]
        total = sum(v for v in (_num(x) for x in timings.values()) if v is not None)
        trows.append(["total", fmt_float(total, 1)])
        body["timings"] = _html_table(["Stage", "Seconds"], trows)
    else:
        body["timings"] = _note("no timings recorded")
    return body


def _render_html(results: dict[str, Any], body: Mapping[str, str]) -> str:
    name = str(_cfg(results).get("name", "endodistill"))
    nav = "".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title in SECTIONS)
    sections = "".join(
        f'<section><h2 id="{sid}">{html.escape(title)}</h2>{body.get(sid, "")}</section>'
        for sid, title in SECTIONS
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(name)}: endodistill report</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(name)}: MRI POD-obliteration ablation</h1><nav>{nav}</nav>{sections}</body></html>\n"
    )


def _render_md(results: dict[str, Any]) -> str:
    headers, rows = _ablation_rows(results)
    out = [
        f"# {_cfg(results).get('name', 'endodistill')}: ablation",
        "",
        "AUC of pooled out-of-fold predictions with DeLong 95% CI; fold AUC mean ± SD; "
        "sensitivity / specificity in %.",
        "",
        _md_table(headers, rows) if rows else "_no methods_",
    ]
    base = _baseline_rows(results, len(headers))
    if base:
        out += [
            "",
            "## Reference baselines",
            "",
            "Same folds and statistics as the methods: "
            + "; ".join(f"{k}: {v}" for k, v in BASELINE_NAMES.items() if _baselines(results).get(k))
            + ".",
            "",
            _md_table(["Baseline", *headers[1:]], base),
        ]
    sv = _sign_visibility(results)
    if sv:
        out += ["", "### Sign visibility", "", SIGN_VISIBILITY_SENTENCE, ""]
        out.append(_md_table(["Latent sign", "Probe AUC"], [[k, fmt_auc(v)] for k, v in sv.items()]))
    diag = _diagnostic_lines(results)
    if diag:
        out += ["", *(f"- {ln} (95% CI)" for ln in diag)]
    ceil = _ceilings(results)
    if ceil:
        out += [
            "",
            "AUC ceilings of the synthetic cohort: "
            + ", ".join(f"{k} {fmt_auc(v)}" for k, v in ceil.items()),
        ]
    comps = [c for c in results.get("comparisons") or [] if isinstance(c, Mapping)]
    if comps:
        h, r = _comparisons_rows(comps)
        out += ["", "## Paired comparisons", "", _correction_sentence(comps), "", _md_table(h, r)]
    bcomps = [c for c in _baselines(results).get("comparisons") or [] if isinstance(c, Mapping)]
    if bcomps:
        h, r = _comparisons_rows(bcomps)
        out += [
            "",
            "### Full method vs reference baselines",
            "",
            _correction_sentence(bcomps),
            "",
            _md_table(h, r),
        ]
    if results.get("seed") is not None:
        out += ["", f"Seed: {results['seed']}"]
    return "\n".join(out) + "\n"


def _display_names(results: Mapping[str, Any]) -> dict[str, str]:
    """``results["display_names"]``: an optional ``{method: name shown in the report}`` (edit it and run
    ``endodistill report RUN`` to rename methods in every table and figure)."""
    names = results.get("display_names")
    if not isinstance(names, Mapping):
        return {}
    return {str(k): str(v) for k, v in names.items() if isinstance(v, str) and v.strip()}


def _renamed(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` with the methods under their display names (in ``methods``, the comparisons, the
    reference and full method); each renamed method keeps its key in ``_key`` (the paper's AUC)."""
    names = _display_names(results)
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


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``RUN_DIR/report.html`` (self-contained, opens offline) and ``RUN_DIR/report.md``.

    Args:
        run_dir: a run directory holding at least ``results.json``.

    Returns:
        ``(html_path, md_path)``.

    Raises:
        InputError: ``results.json`` missing or not a JSON object with a ``methods`` object.
    """
    run_dir = Path(run_dir)
    results = _renamed(_read_results(run_dir))
    body = _html_sections(results, run_dir)
    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    atomic_write_text(html_path, _render_html(results, body))
    atomic_write_text(md_path, _render_md(results))
    return html_path, md_path


def rebuild_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Rebuild ``report.html`` and ``report.md`` of a finished run from what it left on disk (``endodistill
    report``): results.json (edited or not), the out-of-fold and teacher predictions, the training logs,
    the example images. Nothing is trained or recomputed; each file is replaced atomically, under the run
    directory's lock (so not while a run or a resume writes into it).

    Args:
        run_dir: the run directory (``--out`` of ``endodistill run`` / ``demo``).

    Returns:
        ``(html_path, md_path)``.

    Raises:
        InputError: ``run_dir`` is not a directory, or holds no readable ``results.json`` with a ``methods``
            object (the run has not finished).
        RunLockedError: another process (a run, a resume) holds the run directory.
    """
    from endodistill.utils import RunLock

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(run_dir, "not a run directory (no such folder)")
    path = run_dir / "results.json"
    if not path.is_file():
        raise InputError(run_dir, "not a finished run directory (no results.json)")
    if not isinstance(_read_results(run_dir).get("methods"), dict):
        raise InputError(path, "expected an object with a 'methods' object")
    with RunLock(run_dir):
        return write_report(run_dir)
