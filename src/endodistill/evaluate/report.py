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
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from endodistill.errors import InputError
from endodistill.evaluate.delong import delong_auc_ci
from endodistill.evaluate.metrics import calibration_points, roc_points
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

# MRI AUC (x100) reported by the paper (arXiv 2307.02000, 5-fold CV on a private cohort).
PAPER_AUC: dict[str, float] = {"scratch_ce": 65.0, "mae_kd": 85.2, "mae_kd_ce": 90.6}
DASH = "—"
_MAX_EXAMPLES = 12
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}
tr.full td{font-weight:600}img{max-width:100%;height:auto}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}
.note{color:#666;font-style:italic}nav a{margin-right:.8em}
"""


# --- small formatting helpers ---------------------------------------------------------------------


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _x100(x: Any, digits: int = 1) -> str:
    v = _num(x)
    return DASH if v is None else f"{100 * v:.{digits}f}"


def _f(x: Any, digits: int = 3) -> str:
    v = _num(x)
    return DASH if v is None else f"{v:.{digits}f}"


def _p(x: Any) -> str:
    v = _num(x)
    if v is None:
        return DASH
    return "<0.001" if v < 1e-3 else f"{v:.3f}"


def _auc_cell(m: Mapping[str, Any]) -> str:
    ci = m.get("auc_ci95") or [None, None]
    auc = _x100(m.get("auc"))
    if auc == DASH:
        return DASH
    lo, hi = [*ci, None, None][:2] if isinstance(ci, list) else (None, None)
    return f"{auc} [{_x100(lo)}, {_x100(hi)}]" if _num(lo) is not None else auc


def _fold_cell(m: Mapping[str, Any]) -> str:
    mean, std = _x100(m.get("fold_auc_mean")), _x100(m.get("fold_auc_std"))
    if mean == DASH:
        return DASH
    return f"{mean} ± {std}" if std != DASH else mean


def _op_cell(op: Any) -> str:
    if not isinstance(op, Mapping):
        return DASH
    return f"{_x100(op.get('sensitivity'))} / {_x100(op.get('specificity'))}"


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
        "Sens / Spec @ Youden",
        f"Sens / Spec @ sens ≥ {_high_sens_target(methods)}",
        "Brier",
        "ECE",
        "Paper AUC",
    ]
    rows = []
    for name, m in methods.items():
        m = m if isinstance(m, Mapping) else {}
        paper = PAPER_AUC.get(name)
        rows.append([*_metric_cells(str(name), m), DASH if paper is None else f"{paper:.1f}"])
    return headers, rows


def _metric_cells(name: str, m: Mapping[str, Any]) -> list[str]:
    """Name, AUC [CI], fold mean ± SD, the two operating points, Brier, ECE: a method's or a baseline's."""
    return [
        name,
        _auc_cell(m),
        _fold_cell(m),
        _op_cell(m.get("youden")),
        _op_cell(m.get("high_sensitivity")),
        _f(m.get("brier")),
        _f(m.get("ece")),
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
    "about 50 means the sign is invisible at this grid)."
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
    """``AUC [lo, hi]`` x100, or just the AUC when the CI is missing."""
    txt = _x100(auc)
    if txt != DASH and isinstance(ci, Sequence) and not isinstance(ci, str) and len(ci) == 2:
        lo, hi = _num(ci[0]), _num(ci[1])
        if lo is not None and hi is not None:
            txt += f" [{_x100(lo)}, {_x100(hi)}]"
    return txt


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
    """The ablation table as aligned plain text for the terminal (AUC, sensitivity, specificity x100).

    Args:
        results: the content of ``results.json``.

    Returns:
        The table, one line per method, then the reference baselines (same columns), the sign visibility,
        the MAE probe and the teacher's cross-validated AUC when ``results.json`` holds them, and last the
        cohort's AUC ceilings when known.
    """
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
            + ", ".join(f"{k} {_x100(v)}" for k, v in sv.items())
        )
    lines += _diagnostic_lines(results)
    ceil = _ceilings(results)
    if ceil:
        lines.append(
            "AUC ceilings of the synthetic cohort: " + ", ".join(f"{k} {_x100(v)}" for k, v in ceil.items())
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


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], highlight: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cls = ' class="full"' if highlight is not None and r and r[0] == highlight else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


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
    ci_txt = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
    return f"{name}: AUC {auc:.3f}{ci_txt}"


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


def _calibration_figure(groups: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str | None:
    fig = _new_figure(6.0, 5.5)
    ax = fig.add_subplot()
    colours = _colours(list(groups))
    for name, (y, p) in groups.items():
        pts = calibration_points(y, p)
        ax.plot(pts["mean_prob"], pts["observed"], marker="o", ms=4, lw=1.4, color=colours[name], label=name)
    if not groups:
        return None
    ax.plot([0, 1], [0, 1], color="#999", ls=":", lw=1, label="perfect calibration")
    ax.set(
        xlabel="mean predicted probability (10 equal-width bins)",
        ylabel="observed fraction positive",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    return _png_uri(fig)


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
    """Series ``column -> (x, y)`` from a Lightning CSVLogger file (x = step, else epoch, else row)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    cols = list(rows[0].keys())
    xcol = "step" if "step" in cols else ("epoch" if "epoch" in cols else None)
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


def _training_groups(run_dir: Path) -> dict[str, list[tuple[str, Path]]]:
    """metrics.csv files grouped by stage: teacher, mae, one group per CV method, anything else."""
    groups: dict[str, list[tuple[str, Path]]] = {}
    for f in sorted(run_dir.rglob("metrics.csv")):
        rel = f.relative_to(run_dir).parts
        if len(rel) >= 4 and rel[0] == "folds":
            key, label = f"cross-validation: {rel[2]}", rel[1]
        else:
            key, label = rel[0] if len(rel) > 1 else "run", "/".join(rel[1:-1]) or rel[0]
        groups.setdefault(key, []).append((label, f))
    # Several logs of one fold (resumed versions) keep their sub-path so lines stay distinguishable.
    for key, items in groups.items():
        labels = [lb for lb, _ in items]
        if len(set(labels)) < len(labels):
            groups[key] = [(str(f.parent.relative_to(run_dir)), f) for _, f in items]
    return groups


def _training_figure(title: str, items: Sequence[tuple[str, Path]]) -> str | None:
    loaded = []
    for label, f in items:
        try:
            loaded.append((label, _read_metrics_csv(f)))
        except (OSError, csv.Error, UnicodeDecodeError):
            continue
    loss_cols = sorted({c for _, s in loaded for c in s if "loss" in c})
    # Learning rates live on another scale: left out; everything else (AUC, KD weight, ...) shares [0, 1].
    other_cols = sorted({c for _, s in loaded for c in s if "loss" not in c and not c.startswith("lr")})
    if not loss_cols and not other_cols:
        return None
    panels = [(cols, name) for cols, name in ((loss_cols, "loss"), (other_cols, "metric")) if cols]
    fig = _new_figure(5.2 * len(panels), 3.6)
    axes = [fig.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    styles = ["-", "--", ":", "-."]
    for ax, (cols, ylabel) in zip(axes, panels, strict=True):
        for li, (label, series) in enumerate(loaded):
            for ci, c in enumerate(cols):
                if c not in series:
                    continue
                xs, ys = series[c]
                name = f"{label} {c}" if len(loaded) > 1 else c
                ax.plot(
                    xs,
                    ys,
                    color=cmap(li % 10),
                    ls=styles[ci % len(styles)],
                    lw=1.2,
                    marker="." if len(xs) < 30 else None,
                    label=name,
                )
        ax.set(xlabel="step", ylabel=ylabel)
        ax.legend(fontsize=6, ncol=2 if len(loaded) > 2 else 1)
    fig.suptitle(title, fontsize=10)
    return _png_uri(fig)


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


def _kv_table(d: Mapping[str, Any], key: str = "Key", value: str = "Value") -> str:
    rows = []
    for k, v in d.items():
        txt = v if isinstance(v, str) else json.dumps(v, default=str)
        rows.append([str(k), txt])
    return _html_table([key, value], rows)


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
    rows = [
        [
            str(c.get("method_a", "?")),
            str(c.get("method_b", "?")),
            _f(c.get("auc_a")),
            _f(c.get("auc_b")),
            _f(c.get("diff")),
            _f(c.get("z"), 2),
            _p(c.get("p")),
            _p(c.get("p_adjusted")),
        ]
        for c in comps
        if isinstance(c, Mapping)
    ]
    return headers, rows


def _correction_sentence(comps: Sequence[Mapping[str, Any]]) -> str:
    names = {str(c.get("correction")) for c in comps if isinstance(c, Mapping) and c.get("correction")}
    name = names.pop() if len(names) == 1 else ("mixed" if names else "unknown")
    long = {"holm": "Holm-Bonferroni (step-down)", "bonferroni": "Bonferroni", "none": "no"}.get(name, name)
    return (
        f"DeLong's two-sided test for correlated AUCs on the same subjects; {len(comps)} comparisons, "
        f"p-values adjusted with the {long} correction for multiple comparisons across the whole family."
    )


def _value_text(v: Any) -> Any:
    """Floats (and lists of them) at 3 decimals for the key-value tables; anything else unchanged."""
    if isinstance(v, float):
        return _f(v)
    if isinstance(v, list) and v and all(isinstance(x, int | float) or x is None for x in v):
        return "[" + ", ".join(_f(x) if isinstance(x, float) or x is None else str(x) for x in v) + "]"
    return v


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
            _html_table(["Latent sign", "Probe AUC"], [[k, _x100(v)] for k, v in sv.items()]),
        ]
    mae = [ln for ln in _diagnostic_lines(results) if ln.startswith("MAE")]
    if mae:
        parts += ["<h3>MAE linear probe</h3>", f"<p>{html.escape(mae[0])} (x100, 95% CI).</p>"]
    return parts


def _html_sections(results: dict[str, Any], run_dir: Path) -> dict[str, str]:
    methods: dict[str, Any] = results.get("methods") or {}
    protocol = _cfg(results).get("protocol")
    full = str(protocol.get("full_method", "mae_kd_ce") if isinstance(protocol, Mapping) else "mae_kd_ce")
    body: dict[str, str] = {}

    headers, rows = _ablation_rows(results)
    parts = [
        _html_table(headers, rows, highlight=full) if rows else _note("no methods in results.json"),
        _note(
            "AUC, fold AUCs, sensitivity and specificity in % (x100); pooled out-of-fold predictions with "
            "DeLong 95% CIs. Paper: Wang et al., arXiv 2307.02000 (private cohort, no CIs published)."
        ),
    ]
    parts += _baselines_html(results, headers)
    ceil = _ceilings(results)
    if ceil:
        parts.append(
            "<p>AUC ceilings of the synthetic cohort (Bayes-optimal on the generator's latents): "
            + ", ".join(f"<b>{html.escape(k)}</b> {_x100(v)}" for k, v in ceil.items())
            + "</p>"
        )
    body["ablation"] = "".join(parts)

    oof_path = run_dir / "oof_predictions.csv"
    groups: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    oof_note = ""
    if oof_path.is_file():
        try:
            groups = _group(read_oof_csv(oof_path))
        except InputError as e:
            oof_note = str(e)
    else:
        oof_note = "oof_predictions.csv not found"
    roc = _roc_figure(groups, methods, "Out-of-fold ROC, all methods") if groups else None
    body["roc"] = _img(roc, "ROC curves") if roc else _note(oof_note or "no method has both classes")
    cal = _calibration_figure(groups) if groups else None
    if cal:
        ece = ", ".join(f"{n} {_f((methods.get(n) or {}).get('ece'))}" for n in groups)
        body["calibration"] = _img(cal, "calibration curves") + _note(f"expected calibration error: {ece}")
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
        tparts.append(f"<p>{html.escape(teacher_cv[0])} (x100, 95% CI).</p>")
    if teacher:
        scalars = {
            k: _value_text(v)
            for k, v in teacher.items()
            if not isinstance(v, Mapping | list) or k in ("auc_ci95", "cv_auc_ci95")
        }
        tparts.append(_kv_table(scalars, "Teacher metric"))
    body["teacher"] = "".join(tparts)

    fold_fig = _folds_figure(methods)
    fold_rows = []
    n_folds = max(
        (len(m.get("fold_aucs") or []) for m in methods.values() if isinstance(m, Mapping)), default=0
    )
    baselines = {n: m for n, m in _baselines(results).items() if n in BASELINE_NAMES}
    for n, m in [*methods.items(), *((f"{n} (baseline)", m) for n, m in baselines.items())]:
        if isinstance(m, Mapping) and m.get("fold_aucs"):
            vals = [_x100(a) for a in m["fold_aucs"]][:n_folds]
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
    for title, items in _training_groups(run_dir).items():
        fig = _training_figure(title, items)
        if fig:
            tparts.append(f"<h3>{html.escape(title)}</h3>" + _img(fig, f"training curves {title}"))
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
            cparts.append(_kv_table({f"{k} AUC ceiling": _f(v) for k, v in ceil.items()}, "Ceiling", "AUC"))
        body["cohort"] = "".join(cparts)
    else:
        body["cohort"] = _note("no cohort information in results.json")

    cfg_text = _config_text(results, run_dir)
    body["config"] = f"<pre>{html.escape(cfg_text)}</pre>" if cfg_text else _note("no configuration recorded")
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
        trows = [[str(k), _f(v, 1)] for k, v in timings.items()]
        total = sum(v for v in (_num(x) for x in timings.values()) if v is not None)
        trows.append(["total", f"{total:.1f}"])
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
        "AUC (x100) of pooled out-of-fold predictions with DeLong 95% CI; fold AUC mean ± SD; "
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
        out.append(_md_table(["Latent sign", "Probe AUC"], [[k, _x100(v)] for k, v in sv.items()]))
    diag = _diagnostic_lines(results)
    if diag:
        out += ["", *(f"- {ln} (x100, 95% CI)" for ln in diag)]
    ceil = _ceilings(results)
    if ceil:
        out += [
            "",
            "AUC ceilings of the synthetic cohort: " + ", ".join(f"{k} {_x100(v)}" for k, v in ceil.items()),
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
    results = _read_results(run_dir)
    body = _html_sections(results, run_dir)
    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    atomic_write_text(html_path, _render_html(results, body))
    atomic_write_text(md_path, _render_md(results))
    return html_path, md_path
