"""The run directory contract: every path, unit name and marker of a run directory, in one place.

Layout of a run directory (``RUN_DIR``)::

    config.yaml          resolved configuration (``--resume`` reads it)
    run.json             package versions, sha256 of every input file, seed          (:class:`RunInfo`)
    splits.json          the folds (nnU-Net-like, editable by hand, reused when present)  (:class:`Splits`)
    fingerprint.json     what the inputs looked like (spacings, sizes, intensities, clip timing; per site)
    cohort/              a synthetic cohort generated into the run (when the config names no manifest)
    teacher/             sub-fits, outputs.safetensors + outputs.json, predictions.csv, metrics.json
    mae/                 encoder.safetensors (shared by every method and fold); mae/fold_K, mae/all per fold
    folds/fold_K/METHOD/ checkpoints, logs, history.csv, predictions.csv, model.safetensors, done.json
    distill/METHOD/      a single-stage distill fit on all labelled subjects (``endodistill train distill``)
    final/               the deployed method trained on all labelled MRI
    baselines/           reference baselines on the same folds
    model/               the deployable MRI model (infer.model_dir), with fingerprint.json
    teacher_model/       the deployable TVUS teacher: the CV fold teachers as one ensemble (same format)
    oof_predictions.csv  subject_id,fold,method,label,prob (one row per subject and method)
    oof_tvus_predictions.csv  the joint methods' out-of-fold clip predictions
    results.json         metrics, comparisons, cohort, config, seed, timings          (:class:`Results`)
    timings.json         per-fit time breakdown (start-up, steps, data, eval, checkpoints) (:class:`Timings`)
    examples/            example MRI slices and TVUS frames (PNG)
    report.html, report.md

Every unit (teacher, mae, each fold x method, final, baselines) writes ``done.json`` (:class:`DoneInfo`) last.

A study directory holds ``shared/<unit>-<key>/`` (units shared between its runs) and ``runs/<run>/``.

This module imports nothing heavy (pydantic only), so that ``train``, ``experiment``, the report, ``infer``
and the tests can all use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from endodistill.errors import InputError
from endodistill.utils import atomic_write_json, atomic_write_text, json_default

SCHEMA_VERSION = 1

# ------------------------------------------------------------------------------------------------ names
CONFIG = "config.yaml"
RUN = "run.json"
SPLITS = "splits.json"
FINGERPRINT = "fingerprint.json"  # = endodistill.data.fingerprint.FILE_NAME
RESULTS = "results.json"
TIMINGS = "timings.json"
DONE = "done.json"
LAST_CKPT = "checkpoints/last.ckpt"  # a fit's resumable Lightning checkpoint
OOF = "oof_predictions.csv"
OOF_TVUS = "oof_tvus_predictions.csv"
LOCK = ".lock"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"

COHORT = "cohort"
EXAMPLES = "examples"
TEACHER = "teacher"
MAE = "mae"
FOLDS = "folds"
DISTILL = "distill"
FINAL = "final"
BASELINES = "baselines"
MODEL = "model"
TEACHER_MODEL = "teacher_model"

# Study directories
SHARED = "shared"
RUNS = "runs"

# Inside a unit
PREDICTIONS = "predictions.csv"
WEIGHTS = "model.safetensors"
ENCODER = "encoder.safetensors"
MAE_PROBE = "probe.json"
MODEL_METADATA = "metadata.json"  # = endodistill.infer.model_dir.METADATA_FILE


# ------------------------------------------------------------------------------------------------ units
def fold_name(fold: int) -> str:
    """``fold_K``: the name of fold ``K`` (0-based, as in ``splits.json``)."""
    return f"fold_{fold}"


def teacher_member_name(fold: int, member: int = 0) -> str:
    """``fold_K`` (member 0) or ``fold_K_mJ``: the unit of one teacher network of fold K under RUN_DIR/teacher."""
    return fold_name(fold) if member == 0 else f"{fold_name(fold)}_m{member}"


def teacher_member_key(name: str) -> tuple[int, int]:
    """``(fold, member)`` of a :func:`teacher_member_name` (the order of a teacher ensemble's members)."""
    parts = name.split("_")
    return int(parts[1]), int(parts[2][1:]) if len(parts) > 2 else 0


def fit_name(fold: int, method: str) -> str:
    """``fold_K/METHOD``: a cross-validation fit's name (timings, spread records, progress)."""
    return f"{fold_name(fold)}/{method}"


def fit_dir(run_dir: Path, fold: int, method: str) -> Path:
    """``RUN_DIR/folds/fold_K/METHOD``: the unit of one fold x method fit."""
    return Path(run_dir) / FOLDS / fold_name(fold) / method


def distill_dir(run_dir: Path, method: str) -> Path:
    """``RUN_DIR/distill/METHOD``: a single-stage distill fit on all labelled subjects."""
    return Path(run_dir) / DISTILL / method


def mae_unit_name(per_fold: bool, fold: int | None) -> str:
    """The MAE unit a fit uses: ``mae`` (shared), or ``mae/fold_K`` / ``mae/all`` with labelled training data."""
    if not per_fold:
        return MAE
    return f"{MAE}/all" if fold is None else f"{MAE}/{fold_name(fold)}"


def done_path(unit_dir: Path) -> Path:
    """A unit's done marker."""
    return Path(unit_dir) / DONE


def is_done(unit_dir: Path) -> bool:
    """Whether a unit has written its done marker (not whether the marker parses)."""
    return done_path(unit_dir).is_file()


def fit_reusable(unit_dir: Path) -> bool:
    """Whether a fit unit is finished: a readable done marker and its weights (a resumed fit reuses it)."""
    return read_done_info(unit_dir) is not None and (Path(unit_dir) / WEIGHTS).is_file()


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run directory (config.yaml and a model/ or teacher_model/ folder), not a model."""
    p = Path(path)
    return (
        (p / CONFIG).is_file()
        and not (p / MODEL_METADATA).is_file()
        and ((p / MODEL).is_dir() or (p / TEACHER_MODEL).is_dir())
    )


def check_out_dir(path: str | Path) -> None:
    """Refuse an output path that exists and is not a folder (before anything is written or launched).

    Raises:
        InputError: naming the path.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(p, "exists and is not a directory: give a new or an existing run directory")


def shared_unit_dir(study_dir: Path, unit: str, key: str) -> Path:
    """``STUDY/shared/<unit>-<key>``: a unit shared between the runs of a study."""
    return Path(study_dir) / SHARED / f"{unit}-{key}"


# ----------------------------------------------------------------------------------------------- models
class _Fixed(BaseModel):
    """A file part of fixed shape: an unknown key is an error."""

    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """A file part that carries unit-specific keys besides the typed ones."""

    model_config = ConfigDict(extra="allow")

    def get(self, key: str, default: Any = None) -> Any:
        """A typed field or an extra key, like ``dict.get``."""
        if key in type(self).model_fields:
            return getattr(self, key)
        return (self.model_extra or {}).get(key, default)


class OperatingPoint(_Fixed):
    """A threshold with its sensitivity and specificity (Youden's, or the one at a target sensitivity)."""

    target: float | None = None
    threshold: float | None
    sensitivity: float | None
    specificity: float | None
    j: float | None = None


class MethodMetrics(_Fixed):
    """``results.json`` ``methods.NAME``: pooled out-of-fold metrics of one method.

    Binary tasks (:func:`endodistill.evaluate.stats.summarise_method`) fill everything but
    ``per_class_auc``; multi-class tasks only ``auc`` (macro), ``per_class_auc``, the fold AUCs and ``n``.
    Fields in the order the statistics write them (results.json keeps that order).
    """

    n: int
    n_pos: int | None = None
    prevalence: float | None = None
    brier: float | None = None
    ece: float | None = None
    auc: float | None
    per_class_auc: dict[int, float | None] | None = None
    auc_ci95: list[float | None] | None = None
    youden: OperatingPoint | None = None
    high_sensitivity: OperatingPoint | None = None
    fold_aucs: list[float | None]
    fold_auc_mean: float | None
    fold_auc_std: float | None


class McNemar(_Fixed):
    """McNemar's exact test of two methods' decisions at the reference's Youden threshold."""

    threshold: float | None
    a_only: int
    b_only: int
    accuracy_a: float | None
    accuracy_b: float | None
    p: float | None
    p_adjusted: float | None = None


class Comparison(_Fixed):
    """``results.json`` ``comparisons[i]``: a paired DeLong test of two methods (and McNemar's)."""

    method_a: str
    method_b: str
    n: int
    n_pos: int
    auc_a: float | None
    auc_b: float | None
    diff: float | None
    se: float | None
    z: float | None
    p: float | None
    mcnemar: McNemar | None = None
    p_adjusted: float | None = None
    correction: str | None = None


class FinalModelInfo(_Fixed):
    """``results.json`` ``final_model``: the deployed method trained on all labelled MRI."""

    method: str
    threshold: float
    val_auc: float | None
    best_epoch: int | None
    path: str


class TeacherModelInfo(_Fixed):
    """``results.json`` ``teacher_model``: the deployable TVUS teacher."""

    path: str
    members: list[str]
    threshold: float


class Results(_Fixed):
    """``results.json``: what a finished run found (the report reads it; ``endodistill report`` rebuilds)."""

    schema_version: int = SCHEMA_VERSION
    methods: dict[str, MethodMetrics]
    teacher: dict[str, Any]
    mae: dict[str, Any] | None = None
    comparisons: list[Comparison]
    cohort: dict[str, Any]
    config: dict[str, Any]
    seed: int
    folds: int
    reference: str
    full_method: str
    correction: str
    final_model: FinalModelInfo | None = None
    teacher_model: TeacherModelInfo | None = None
    timings: dict[str, float]
    fit_processes: int = 1
    tvus: dict[str, Any] | None = None
    baselines: dict[str, Any] | None = None
    # Written by the user, never by the protocol: {method: name shown in the report} (`endodistill report`).
    display_names: dict[str, str] | None = None


class RunInfo(_Fixed):
    """``run.json``: where a run comes from (written once, checked on ``--resume``)."""

    schema_version: int = SCHEMA_VERSION
    seed: int
    versions: dict[str, str]
    manifest: str
    inputs: dict[str, str] = Field(description="input file (relative to the manifest's folder) -> sha256")
    command: str


class Fold(_Fixed):
    """One fold of ``splits.json``: subject ids per side."""

    train: list[str]
    val: list[str] = []
    test: list[str] = []


class Splits(RootModel[list[Fold]]):
    """``splits.json``: a bare list of folds (nnU-Net's ``splits_final.json`` shape, editable by hand).

    The file stays a list, so it carries no ``schema_version`` of its own (:data:`SPLITS_SCHEMA_VERSION`
    documents the shape); :mod:`endodistill.data.splits` checks it for leaks.
    """


SPLITS_SCHEMA_VERSION = 1


class FitTiming(_Open):
    """Seconds per part of one fit (``TimingCallback.summary``); the teacher's sub-fits add their own keys."""

    wall: float = 0.0
    step: float = 0.0


class SpreadInfo(_Fixed):
    """``timings.json`` ``spread``: the processes the cross-validation fits ran in."""

    processes: int = 1
    engine: str | None = None
    assignment: str | None = None
    trained_by_rank: dict[str, list[str]] | None = None
    skipped_by_rank: dict[str, list[str]] | None = None
    # The teacher's cross-validation fits (units under RUN_DIR/teacher) each rank trained or found done.
    teacher_by_rank: dict[str, list[str]] | None = None
    # Wall-clock seconds from the start of the spread fits to the last rank's end (the stage timings add up the
    # fits' own times instead).
    wall_seconds: float | None = None
    # Rank 0's wall-clock seconds for the teacher stage: its share of the fits, the wait for the others', the
    # gathering (the "teacher" stage timing is the gathering alone).
    teacher_wall_seconds: float | None = None
    # The rank that computed the reference baselines, alongside rank 0's MAE (their stage timings overlap).
    baselines_rank: int | None = None


class Timings(_Fixed):
    """``timings.json``: stage seconds and each fit's breakdown (start-up, steps, data, eval, checkpoints)."""

    schema_version: int = SCHEMA_VERSION
    stages: dict[str, float]
    fits: dict[str, dict[str, Any]]
    step_seconds: float
    fit_wall_seconds: float
    overhead: float | None
    this_process_wall_seconds: float
    spread: SpreadInfo


class DoneInfo(_Open):
    """``done.json`` of a unit: written last, after all its outputs; its presence means "finished".

    The typed fields are common to the fits (teacher sub-fits, MAE, fold x method fits, final); each stage
    adds its own keys (``method``, ``best_epoch``, ``val_auc``, ``test_auc``, ``n_volumes``, ``metrics`` ...),
    kept as extras.
    """

    schema_version: int = SCHEMA_VERSION
    seed: int | None = None
    where: str | None = None
    timing: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------- read / write
def plain_json(obj: Any) -> Any:
    """``obj`` as plain JSON values (NumPy scalars and arrays, paths converted)."""
    return json.loads(json.dumps(obj, default=json_default))


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when missing, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _dump(model: BaseModel) -> dict[str, Any]:
    # exclude_unset: an optional part the run did not write (tvus, baselines) stays absent, as before.
    # Python mode, not "json": pydantic's JSON mode would turn a NaN (a done.json's undefined AUC) into null.
    return {"schema_version": SCHEMA_VERSION, **model.model_dump(exclude_unset=True)}


def _validated(model: type[BaseModel], obj: Any, path: Path) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "top level"
        raise InputError(path, f"not a valid {path.name} ('{where}': {err['msg']})") from None


def write_results(run_dir: Path, results: Results) -> dict[str, Any]:
    """Write ``results.json`` (methods in the configuration's order, not key-sorted); returns its content."""
    d = _dump(results)
    atomic_write_text(Path(run_dir) / RESULTS, json.dumps(d, indent=2, default=json_default) + "\n")
    return d


def read_results(run_dir: Path) -> Results:
    """``results.json`` of a finished run.

    Raises:
        InputError: missing, not JSON, or not of the :class:`Results` shape (the first wrong key is named).
    """
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise InputError(path, "not found (has the run finished?)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid JSON ({e})") from None
    return _validated(Results, obj, path)


def write_timings(run_dir: Path, timings: Timings) -> None:
    """Write ``timings.json`` (key-sorted)."""
    atomic_write_json(Path(run_dir) / TIMINGS, _dump(timings))


def read_timings(run_dir: Path) -> Timings | None:
    """``timings.json``, or None when absent. Raises InputError when it has another shape."""
    path = Path(run_dir) / TIMINGS
    obj = read_json_object(path)
    return None if obj is None else _validated(Timings, obj, path)


def write_run_info(run_dir: Path, info: RunInfo) -> None:
    """Write ``run.json`` (key-sorted)."""
    atomic_write_json(Path(run_dir) / RUN, _dump(info))


def read_run_info(run_dir: Path) -> RunInfo | None:
    """``run.json``, or None when absent or unreadable. Raises InputError when it has another shape."""
    path = Path(run_dir) / RUN
    obj = read_json_object(path)
    return None if obj is None else _validated(RunInfo, obj, path)


def read_splits(run_dir: Path) -> Splits | None:
    """``splits.json`` (shape only; :func:`endodistill.data.splits.load_splits` checks leaks), or None."""
    path = Path(run_dir) / SPLITS
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return _validated(Splits, obj, path)


def write_done_info(unit_dir: Path, info: DoneInfo | dict[str, Any]) -> None:
    """Mark a unit finished: ``done.json`` (key-sorted, atomically). Write it last, after all outputs."""
    model = info if isinstance(info, DoneInfo) else DoneInfo.model_validate(plain_json(info))
    atomic_write_json(done_path(unit_dir), _dump(model))


def read_done_info(unit_dir: Path) -> DoneInfo | None:
    """A unit's done marker, or None when absent or damaged (the unit is then redone)."""
    obj = read_json_object(done_path(unit_dir))
    if obj is None:
        return None
    try:
        return DoneInfo.model_validate(obj)
    except ValidationError:
        return None
