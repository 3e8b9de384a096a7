"""The run report: one self-contained ``report.html`` (figures as base64 PNG) and ``report.md``.

Built from the run directory alone (:mod:`endodistill.report.load`): ``results.json``,
``oof_predictions.csv``, ``teacher/predictions.csv``, the Lightning ``metrics.csv`` logs and the
``examples/*.png`` the protocol writes. Every input but ``results.json`` is optional: a missing one becomes
a one-line note in its section, so a partial run still gets a report. The layout is in the Jinja2
templates ``templates/report.html.j2`` and ``templates/report.md.j2``; the strings they show come from
:mod:`endodistill.report.tables`, the figures from :mod:`endodistill.report.figures`.
"""

from __future__ import annotations

import functools
import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from endodistill import rundir
from endodistill.errors import InputError
from endodistill.evaluate.fmt import fmt_auc
from endodistill.report import figures, load, tables
from endodistill.utils import RunLock, atomic_write_text

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


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


@functools.cache
def environment() -> jinja2.Environment:
    """The templates of this package: HTML autoescaped (``*.html.j2``), Markdown verbatim (``*.md.j2``)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("endodistill.report", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["md_cell"] = _md_cell
    env.filters["html_cell"] = lambda text: html.escape(str(text))
    return env


def _kv(d: Mapping[str, Any], key: str = "Key", value: str = "Value") -> dict[str, Any]:
    rows, folded = tables.kv_rows(d)
    return {"headers": [key, value], "rows": rows, "folded": folded}


def _table(headers: list[str], rows: list[list[str]]) -> dict[str, Any]:
    return {"headers": headers, "rows": rows}


def report_context(results: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """What the templates show, section by section: strings, rows of strings and figure URIs.

    Args:
        results: ``results.json`` with the methods under their display names (:func:`tables.renamed`).
        run_dir: the run directory (predictions, logs, examples).
    """
    methods: dict[str, Any] = results.get("methods") or {}
    names = tables.display_names(results)
    full = tables.full_method(results)
    headers, rows = tables.ablation_rows(results)
    ceil = tables.ceilings(results)
    diag = tables.diagnostic_lines(results)
    base = tables.baseline_rows(results, len(headers))
    ctx: dict[str, Any] = {
        "name": str(tables.cfg_of(results).get("name", "endodistill")),
        "sections": SECTIONS,
        "full": full,
        "ablation": _table(headers, rows),
        "baselines": _table(["Baseline", *headers[1:]], base) if base else None,
        "baseline_descriptions": tables.baseline_descriptions(results),
        "sign_visibility": _table(["Latent sign", "Probe AUC"], tables.sign_visibility_rows(results)),
        "sign_visibility_sentence": tables.SIGN_VISIBILITY_SENTENCE,
        "visible_ceiling_line": tables.visible_ceiling_line(results),
        "mae_line": next((ln for ln in diag if ln.startswith("MAE")), None),
        "teacher_cv_line": next((ln for ln in diag if ln.startswith("Teacher")), None),
        "diagnostics": diag,
        "ceilings": {k: fmt_auc(v) for k, v in ceil.items()},
        "seed": results.get("seed"),
    }

    groups, oof_note = load.read_oof_groups(run_dir)
    groups = {names.get(k, k): v for k, v in groups.items()}
    ctx["oof_note"] = oof_note
    ctx["roc"] = figures.roc_figure(groups, methods, "Out-of-fold ROC, all methods") if groups else None
    cal = figures.calibration_figure(groups, methods) if groups else None
    ctx["calibration"] = {"uri": cal, **_table(*tables.calibration_table(groups))} if cal else None

    teacher = tables.mapping(results, "teacher")
    tp = load.read_teacher_predictions(run_dir)
    ctx["teacher"] = {
        "found": tp is not None,
        "uri": (
            figures.roc_figure({"teacher": tp}, {"teacher": teacher}, "Teacher ROC on held-out TVUS clips")
            if tp is not None
            else None
        ),
        "table": _kv(tables.teacher_rows(teacher), "Teacher metric") if teacher else None,
    }

    ctx["folds"] = {"uri": figures.folds_figure(methods), **_table(*tables.fold_table(results))}
    comps, bcomps = tables.comparisons_of(results), tables.baseline_comparisons_of(results)
    ctx["comparisons"] = (
        {"sentence": tables.correction_sentence(comps), **_table(*tables.comparisons_rows(comps))}
        if comps
        else None
    )
    ctx["baseline_comparisons"] = (
        {"sentence": tables.correction_sentence(bcomps), **_table(*tables.comparisons_rows(bcomps))}
        if bcomps
        else None
    )

    training = []
    for title, panels in load.training_panels(run_dir).items():
        if title == load.CV_TRAINING:
            panels = {names.get(k, k): v for k, v in panels.items()}
        uri, _ = figures.training_figure(
            panels, shared_legend=title == load.CV_TRAINING, order=[*methods, "teacher", "mae", "final"]
        )
        if uri:
            what = "one panel per method, a line per fold" if title == load.CV_TRAINING else "a line per fit"
            training.append({"title": title, "uri": uri, "what": what})
    ctx["training"] = training
    ctx["examples"] = [
        {"name": name, "uri": figures.bytes_uri(png)} for name, png in load.read_example_pngs(run_dir)
    ]

    cohort = tables.mapping(results, "cohort")
    ctx["cohort"] = (
        {
            "table": _kv({k: v for k, v in cohort.items() if k != "ceilings"}, "Cohort"),
            "ceilings": (
                _kv({f"{k} AUC ceiling": fmt_auc(v) for k, v in ceil.items()}, "Ceiling", "AUC")
                if ceil
                else None
            ),
        }
        if cohort
        else None
    )
    ctx["config_text"] = load.read_config_text(results, run_dir)
    versions = load.read_versions(results, run_dir)
    ctx["versions"] = _kv(versions, "Package", "Version") if versions else None
    ctx["seed_shown"] = results.get("seed", tables.cfg_of(results).get("seed"))
    timings = tables.mapping(results, "timings")
    ctx["timings"] = _table(["Stage", "Seconds"], tables.timing_rows(timings)) if timings else None
    return ctx


def markdown_context(results: dict[str, Any]) -> dict[str, Any]:
    """What ``report.md`` shows: the ablation and baseline tables, the diagnostics, the comparisons."""
    headers, rows = tables.ablation_rows(results)
    base = tables.baseline_rows(results, len(headers))
    comps, bcomps = tables.comparisons_of(results), tables.baseline_comparisons_of(results)
    return {
        "name": tables.cfg_of(results).get("name", "endodistill"),
        "ablation": _table(headers, rows),
        "baselines": _table(["Baseline", *headers[1:]], base) if base else None,
        "baseline_descriptions": tables.baseline_descriptions(results),
        "sign_visibility": _table(["Latent sign", "Probe AUC"], tables.sign_visibility_rows(results)),
        "sign_visibility_sentence": tables.SIGN_VISIBILITY_SENTENCE,
        "visible_ceiling_line": tables.visible_ceiling_line(results),
        "diagnostics": tables.diagnostic_lines(results),
        "ceilings": {k: fmt_auc(v) for k, v in tables.ceilings(results).items()},
        "comparisons": (
            {"sentence": tables.correction_sentence(comps), **_table(*tables.comparisons_rows(comps))}
            if comps
            else None
        ),
        "baseline_comparisons": (
            {"sentence": tables.correction_sentence(bcomps), **_table(*tables.comparisons_rows(bcomps))}
            if bcomps
            else None
        ),
        "seed": results.get("seed"),
    }


def render_report(results: dict[str, Any], run_dir: Path) -> tuple[str, str]:
    """``(report.html, report.md)`` as text, for ``results`` (display names applied here)."""
    results = tables.renamed(results)
    env = environment()
    html = env.get_template("report.html.j2").render(report_context(results, run_dir))
    md = env.get_template("report.md.j2").render(markdown_context(results))
    return html, md


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
    html, md = render_report(load.read_results(run_dir), run_dir)
    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    atomic_write_text(html_path, html)
    atomic_write_text(md_path, md)
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
        InputError: ``run_dir`` is not a directory, or holds no ``results.json`` of the run-directory
            contract's shape (the run has not finished; the first wrong key is named).
        RunLockedError: another process (a run, a resume) holds the run directory.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(run_dir, "not a run directory (no such folder)")
    if not (run_dir / rundir.RESULTS).is_file():
        raise InputError(run_dir, "not a finished run directory (no results.json)")
    with RunLock(run_dir):
        return write_report(run_dir)
