"""Everything the report reads, in one place: the files of a run directory, and nothing else.

The report never opens the cohort, its manifest or a raw image: what it shows is what the protocol left in
the run directory. One function per file (or family of files):

=============================  =========================================  ==========================
file                           function                                   missing
=============================  =========================================  ==========================
``results.json``               :func:`read_results`                       InputError
``oof_predictions.csv``        :func:`read_oof_groups`                    a note
``teacher/predictions.csv``    :func:`read_teacher_predictions`           None
``**/metrics.csv``             :func:`training_panels`,                   left out
                               :func:`read_metrics_csv`
``examples/*.png``             :func:`read_example_pngs`                  ``[]``
``config.yaml``                :func:`read_config_text`                   None (``results["config"]``
                                                                          first)
``run.json``                   :func:`read_versions`                      ``{}`` (``results["versions"]``
                                                                          first)
=============================  =========================================  ==========================
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from endodistill import rundir
from endodistill.errors import InputError
from endodistill.evaluate.fmt import num
from endodistill.evaluate.stats import read_oof_csv

# A method's (or the teacher's) labels and probabilities: ``{name: (labels, probs)}``.
Groups = Mapping[str, tuple[np.ndarray, np.ndarray]]

MAX_EXAMPLES = 12
CV_TRAINING = "Cross-validation fits"
OTHER_TRAINING = "Teacher, MAE and final model"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_results(run_dir: Path) -> dict[str, Any]:
    """``RUN/results.json``, read through the run-directory contract (:class:`endodistill.rundir.Results`),
    as the plain JSON dict the tables and templates format.

    Raises:
        InputError: missing, not JSON, or not of the contract's shape (the first wrong key is named).
    """
    return rundir.read_results(run_dir).model_dump(mode="json", exclude_unset=True)


def _group(rows: list[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    by: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        y, p = by.setdefault(str(r["method"]), ([], []))
        y.append(int(r["label"]))
        p.append(float(r["prob"]))
    return {k: (np.asarray(y), np.asarray(p)) for k, (y, p) in by.items()}


def read_oof_groups(run_dir: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """``RUN/oof_predictions.csv`` (columns subject_id, fold, method, label, prob) grouped by method.

    Returns:
        ``({method: (labels, probs)}, note)``: the note is empty when the file was read, else says why
        there are no groups (missing, unreadable).
    """
    path = run_dir / rundir.OOF
    if not path.is_file():
        return {}, "oof_predictions.csv not found"
    try:
        return _group(read_oof_csv(path)), ""
    except InputError as e:
        return {}, str(e)


def read_teacher_predictions(run_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """``RUN/teacher/predictions.csv`` (columns label, prob; rows without both numbers skipped), or None."""
    path = run_dir / rundir.TEACHER / rundir.PREDICTIONS
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [
            r
            for r in csv.DictReader(fh)
            if num(r.get("prob")) is not None and num(r.get("label")) is not None
        ]
    if not rows:
        return None
    return np.array([int(float(r["label"])) for r in rows]), np.array([float(r["prob"]) for r in rows])


def read_metrics_csv(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Series ``column -> (x, y)`` from a Lightning CSVLogger file (x = epoch, else step, else row);
    ``{}`` when the file is empty or unreadable."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    if not rows:
        return {}
    cols = list(rows[0].keys())
    xcol = "epoch" if "epoch" in cols else ("step" if "step" in cols else None)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, r in enumerate(rows):
        x = num(r.get(xcol)) if xcol else float(i)
        if x is None:
            x = float(i)
        for c in cols:
            if c in ("step", "epoch") or c is None:
                continue
            v = num(r.get(c))
            if v is not None:
                xs, ys = series.setdefault(c, ([], []))
                xs.append(x)
                ys.append(v)
    return series


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
        if len(rel) >= 4 and rel[0] == rundir.FOLDS:
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


def read_example_pngs(run_dir: Path) -> list[tuple[str, bytes]]:
    """``RUN/examples/*.png`` (written by the protocol), sorted by name, at most :data:`MAX_EXAMPLES`:
    ``[(file name, PNG bytes)]``; files that are not PNGs are skipped."""
    out = []
    for f in sorted((run_dir / rundir.EXAMPLES).glob("*.png"))[:MAX_EXAMPLES]:
        data = f.read_bytes()
        if data[:8] == _PNG_MAGIC:
            out.append((f.name, data))
    return out


def read_config_text(results: Mapping[str, Any], run_dir: Path) -> str | None:
    """The run's resolved configuration as YAML: ``results["config"]``, else ``RUN/config.yaml``."""
    cfg = results.get("config")
    if isinstance(cfg, Mapping) and cfg:
        return yaml.safe_dump(json.loads(json.dumps(cfg, default=str)), sort_keys=False, allow_unicode=True)
    f = run_dir / rundir.CONFIG
    return f.read_text(encoding="utf-8") if f.is_file() else None


def read_versions(results: Mapping[str, Any], run_dir: Path) -> Mapping[str, Any]:
    """Package versions from ``RUN/run.json`` (the contract's :class:`endodistill.rundir.RunInfo`); ``{}``
    when it is absent or unreadable."""
    try:
        info = rundir.read_run_info(run_dir)
    except InputError:
        return {}
    return {} if info is None else dict(info.versions)
