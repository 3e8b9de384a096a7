"""Every figure of the run and study reports, drawn headless and returned as ``data:image/png;base64`` URIs.

Each figure is a bare :class:`matplotlib.figure.Figure` on the Agg canvas: no pyplot global state, no GUI
backend, safe in threads and without a display. The figures take numbers already read by
:mod:`endodistill.report.load` (the report reads nothing else).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from endodistill.evaluate.delong import delong_auc_ci
from endodistill.evaluate.fmt import fmt_auc, fmt_ci, num
from endodistill.evaluate.metrics import roc_points
from endodistill.report.load import Groups, read_metrics_csv
from endodistill.report.tables import quantile_calibration

_STYLES = ["-", "--", "-.", ":"]


def new_figure(w: float, h: float) -> Figure:
    """A ``w`` x ``h`` inch figure at 100 dpi on the Agg canvas."""
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure, tight: bool = True) -> bytes:
    """The figure as PNG bytes (no ``Software`` metadata: the same figure gives the same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight" if tight else None, metadata={"Software": None})
    return buf.getvalue()


def bytes_uri(png: bytes) -> str:
    """PNG bytes as a ``data:`` URI for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_uri(fig: Figure) -> str:
    """The figure as a ``data:`` URI."""
    return bytes_uri(png_bytes(fig))


def _colours(names: Sequence[str]) -> dict[str, Any]:
    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _ci_label(name: str, summary: Mapping[str, Any] | None, y: np.ndarray, p: np.ndarray) -> str:
    auc = lo = hi = None
    if isinstance(summary, Mapping):
        auc = num(summary.get("auc"))
        ci = summary.get("auc_ci95")
        if isinstance(ci, list) and len(ci) == 2:
            lo, hi = num(ci[0]), num(ci[1])
    if auc is None and 0 < y.sum() < y.size:
        auc, lo, hi = delong_auc_ci(y, p)
        lo, hi = num(lo), num(hi)
    if auc is None:
        return f"{name} (AUC undefined)"
    return f"{name}: AUC {fmt_ci(auc, [lo, hi])}"


def roc_figure(groups: Groups, summaries: Mapping[str, Any], title: str) -> str | None:
    """One ROC curve per group, labelled with its AUC and DeLong CI (None when no curve can be drawn)."""
    fig = new_figure(6.0, 5.5)
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
    return png_uri(fig)


def calibration_figure(groups: Groups, methods: Mapping[str, Any]) -> str | None:
    """One reliability panel per method (quantile bins, the bin sizes in the title) over a histogram of
    its predicted probabilities."""
    names = [n for n, (y, _) in groups.items() if y.size]
    if not names:
        return None
    ncol = min(3, len(names))
    nrow = -(-len(names) // ncol)
    fig = new_figure(3.6 * ncol, 3.9 * nrow)
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
    return png_uri(fig)


def folds_figure(methods: Mapping[str, Any]) -> str | None:
    """The per-fold AUCs of each method as dots, their mean as a bar (None without per-fold AUCs)."""
    names = [n for n, m in methods.items() if isinstance(m, Mapping) and m.get("fold_aucs")]
    if not names:
        return None
    fig = new_figure(max(4.0, 1.2 * len(names) + 1.5), 4.0)
    ax = fig.add_subplot()
    colours = _colours(list(methods))
    for i, n in enumerate(names):
        vals = [v for v in (num(a) for a in methods[n]["fold_aucs"]) if v is not None]
        offs = np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else np.zeros(len(vals))
        ax.scatter(i + offs, vals, color=colours[n], s=22, zorder=3)
        if vals:
            ax.hlines(np.mean(vals), i - 0.3, i + 0.3, color="k", lw=1.5)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set(ylabel="AUC within fold", ylim=(min(0.4, ax.get_ylim()[0]), 1.02))
    ax.axhline(0.5, color="#999", ls=":", lw=1)
    return png_uri(fig)


def _curve_columns(series: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """The columns a panel draws: the total train / val loss (left axis; every loss column when neither is
    logged) and the validation AUC (right axis, [0, 1]; else any AUC or accuracy logged). Loss parts, KD
    weights and learning rates are left out: in the logs, not in the figure."""
    cols = {c for s in series for c in s}
    left: list[str] = [c for c in ("train_loss", "val_loss") if c in cols]
    left = left or sorted(c for c in cols if "loss" in c)
    scores = sorted(c for c in cols if ("auc" in c or "acc" in c) and "loss" not in c)
    right = [c for c in scores if c.startswith("val")] or scores  # val AUC over training accuracy
    return left, right


def training_figure(
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
            series = read_metrics_csv(f)
            if series:
                loaded.setdefault(title, []).append((label, series))
    if not loaded:
        return None, []
    cmap = colormaps["tab10"]
    ncol = min(3, len(loaded))
    nrow = -(-len(loaded) // ncol)
    fig = new_figure(4.3 * ncol, 3.3 * nrow + (0 if shared_legend else 0.8 * nrow))
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
            handles = _legend_handles(cmap, [lb for lb, _ in fits] if len(fits) > 1 else [],
                                      left + right, set(right))  # fmt: skip
            ax.legend(
                handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
                frameon=False,
            )  # fmt: skip
            legend_labels += [str(h.get_label()) for h in handles]
    if shared_legend:
        cols = list(all_cols)
        handles = _legend_handles(cmap, all_fits, cols, {c for c, r in all_cols.items() if r})
        fig.subplots_adjust(wspace=0.45, hspace=0.45)
        fig.legend(
            handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.03), ncol=min(len(handles), 8),
            fontsize=8, frameon=False,
        )  # fmt: skip
        legend_labels = [str(h.get_label()) for h in handles]
    else:
        fig.subplots_adjust(wspace=0.45, hspace=0.9)
    return png_uri(fig), legend_labels


def _legend_handles(cmap: Any, fits: Sequence[str], cols: Sequence[str], right: set[str]) -> list[Line2D]:
    handles = [Line2D([], [], color=cmap(i % 10), lw=2, label=lb) for i, lb in enumerate(fits)]
    handles += [
        Line2D([], [], color="#444", ls=_STYLES[i % len(_STYLES)], lw=1.2,
               label=f"{c} (right axis)" if c in right else c)
        for i, c in enumerate(cols)
    ]  # fmt: skip
    return handles


def study_figure_png(r: Any) -> bytes:
    """A study's pooled AUC with its 95% CI per setting, the reference in red (``r``: a ``StudyResult``)."""
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
    return png_bytes(fig, tight=False)
