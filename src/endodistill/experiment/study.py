"""Studies: the paper's open questions as grids of settings, run on the same folds with shared units.

A study is a list of settings. Each setting is one method configuration (the fine-tuned student) plus,
where the question needs it, overrides of the rest of the config (the MAE's mask ratio, the teacher's
labels, the cohort). Settings whose non-method config is the same run as methods of ONE protocol run, so
they share its teacher, MAE, folds and seeds by construction; the others get a run each, and units whose
inputs do not change (the teacher across mask ratios, one MAE per mask ratio and pool) are trained once
into ``DIR/shared/<unit>-<key>`` and linked into every run that needs them. The key is a hash of the
config sections the unit depends on and of the content of its input files, so ``--resume`` and reruns
skip them.

Every run uses the study's seed, hence the same folds and the same per-fold seeds (common random
numbers: the same batch order and augmentations for every setting). Statistics (:mod:`evaluate.stats`):
pooled out-of-fold AUC with DeLong CI and fold SD per setting; paired DeLong tests against the study's
reference setting, Holm-adjusted; McNemar's test at the reference's Youden threshold. No setting is
called best: every setting is reported, and no choice is made on the test folds.

Layout of ``DIR``::

    study.json           typed summary (schema_version), every setting's resolved config
    study.html study.md  self-contained report: AUC against the varied value, paired tests, verdict
    runs/<run>/          one ordinary run directory per group of settings (report, results, folds)
    shared/<unit>-<key>/ teacher and MAE units shared between runs
    cohorts/<key>/       synthetic cohorts (one per distinct cohort setting)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, Field

from endodistill import rundir
from endodistill.config import Config, MethodConfig
from endodistill.data.cache import content_hash
from endodistill.data.manifest import read_manifest
from endodistill.errors import ConfigError, InputError
from endodistill.evaluate.stats import compare_methods, nan_to_none, read_oof_csv, summarise_method
from endodistill.experiment.plan import cv_fits, needs_mae
from endodistill.experiment.protocol import run_experiment
from endodistill.experiment.stage import run_stage
from endodistill.report.study import format_study_table, render_study
from endodistill.train.data import ensure_manifest
from endodistill.utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STUDIES = ("alpha", "mask_ratio", "kd_controls", "pairing", "pool", "grid")
_SHARED_UNITS = ("teacher", "mae")
# Severity coupling of the pairing study's cohorts: MRI population ceiling 0.816 (0.872 uncoupled), TVUS
# 0.980 unchanged (population_ceilings).
PAIRING_COUPLING = 0.5


@dataclass
class Setting:
    """One setting of a study.

    Attributes:
        name: the setting's name (a method name in its run, a row of every table).
        value: what the study varies, as shown on the figure's x axis.
        method: the fine-tuned method of this setting.
        overrides: nested config overrides outside ``protocol.methods`` (empty: the study's base config).
    """

    name: str
    value: str
    method: MethodConfig
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyPlan:
    """What a study runs: its settings, the reference they are compared with, and how to read them."""

    name: str
    question: str
    settings: list[Setting]
    reference: str
    varied: str


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


# ------------------------------------------------------------------------------------------- plans


def _full(cfg: Config) -> MethodConfig:
    return cfg.protocol.methods[cfg.protocol.full_method]


def _upd(m: MethodConfig, **kw: Any) -> MethodConfig:
    """``m`` with fields replaced (nested dicts merged), validated."""
    return MethodConfig.model_validate(_merge(m.model_dump(mode="json"), kw))


def _num(v: float) -> str:
    return f"{v:g}"


def _parse_value(text: str) -> Any:
    """A ``--vary`` value: YAML scalar rules (numbers, booleans, null), else the string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # PyYAML reads "3e-3" as a string (YAML 1.1 floats need a dot)
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _nested(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        d = out
        parts = key.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    return out


def plan_study(name: str, cfg: Config, vary: Sequence[str] = ()) -> StudyPlan:
    """The settings of a built-in study (or of ``grid`` over ``vary``) on top of ``cfg``.

    Args:
        name: one of :data:`STUDIES`.
        cfg: the base configuration; its full method is the method every setting varies.
        vary: ``KEY=V1,V2,...`` (``grid`` only): the cartesian product of the values is the grid.

    Raises:
        ConfigError: an unknown study, or ``grid`` without ``vary`` / with a malformed one.
    """
    full = _full(cfg)
    if name == "alpha":
        alphas = (0.5, 0.7, 0.85, 0.95, 0.99)
        settings = [
            Setting(f"exp_{_num(a)}", f"exp {_num(a)}", _upd(full, schedule={"kind": "exp", "alpha": a}))
            for a in alphas
        ]
        settings += [
            Setting("constant_0.5", "constant 0.5", _upd(full, schedule={"kind": "constant", "alpha": 0.5})),
            Setting(
                "linear", "linear", _upd(full, schedule={"kind": "linear", "alpha": full.schedule.alpha})
            ),
            Setting(
                "cosine", "cosine", _upd(full, schedule={"kind": "cosine", "alpha": full.schedule.alpha})
            ),
        ]
        ref = f"exp_{_num(full.schedule.alpha)}" if full.schedule.alpha in alphas else settings[0].name
        return StudyPlan(
            name,
            "How does the KD weight schedule alpha**epoch (and its shape) change the full method?",
            settings,
            ref,
            "KD weight schedule",
        )
    if name == "mask_ratio":
        ratios = (0.3, 0.5, 0.75, 0.9)
        settings = [Setting(f"mask_{_num(r)}", _num(r), full, {"mae": {"mask_ratio": r}}) for r in ratios]
        ref_r = cfg.mae.mask_ratio if cfg.mae.mask_ratio in ratios else ratios[0]
        return StudyPlan(
            name,
            "Which MAE mask ratio pre-trains the best encoder (linear probe) and the best fine-tuned student?",
            settings,
            f"mask_{_num(ref_r)}",
            "MAE mask ratio",
        )
    if name == "kd_controls":
        settings = [
            Setting("full", "teacher outputs", full),
            Setting("class_mean", "(a) class-mean targets", _upd(full, kd_target="class_mean")),
            Setting(
                "label_smoothing", "(b) matched label smoothing", _upd(full, kd_target="smoothed_labels")
            ),
            Setting("permuted", "(c) permuted within class", _upd(full, kd_target="permuted")),
            Setting(
                "shuffled_teacher", "(d) shuffled-label teacher", full, {"teacher": {"shuffle_labels": True}}
            ),
        ]
        return StudyPlan(
            name,
            "Does distillation from unpaired, label-matched clips carry more than the label "
            "(class-wise label smoothing)?",
            settings,
            "full",
            "KD target",
        )
    if name == "pairing":
        # Every setting on a cohort with the planted severity (PAIRING_COUPLING): a paired subject's clip
        # then says how severe its MRI case is, which no label-matched clip can.
        planted = {"severity_coupling": PAIRING_COUPLING}
        settings = [
            Setting(
                f"noise_{_num(f)}",
                f"label noise {_num(f)}",
                _upd(full, pairing_noise=f),
                {"data": {"synth": dict(planted)}},
            )
            for f in (0.0, 0.1, 0.3)
        ]
        settings += [
            Setting(
                f"paired_{_num(p)}",
                f"paired {_num(p)}",
                _upd(full, pairing="paired"),
                {"data": {"synth": {**planted, "paired_fraction": p}}},
            )
            for p in (0.25, 0.5, 1.0)
        ]
        return StudyPlan(
            name,
            "What does imperfect label matching cost, and what does real pairing (a subject's own clip) add?",
            settings,
            "noise_0",
            "pairing",
        )
    if name == "pool":
        settings = [
            Setting(f"pool_{_num(f)}", f"{round(100 * f)}% of the pool", full, {"mae": {"pool_fraction": f}})
            for f in (0.25, 0.5, 1.0)
        ]
        settings.append(
            Setting("pool_shifted", "shifted-site pool", full, {"data": {"synth": {"pool_shift": True}}})
        )
        return StudyPlan(
            name,
            "How much do the size and the domain of the unlabelled MRI pool matter?",
            settings,
            "pool_1",
            "unlabelled pool",
        )
    if name == "grid":
        if not vary:
            raise ConfigError("study grid", "needs at least one --vary KEY=V1,V2,...")
        axes: list[tuple[str, list[Any]]] = []
        for v in vary:
            if "=" not in v:
                raise ConfigError(v, "--vary must look like KEY=V1,V2,...")
            key, values = v.split("=", 1)
            axes.append((key.strip(), [_parse_value(x.strip()) for x in values.split(",") if x.strip()]))
        settings = []
        for combo in itertools.product(*(vals for _, vals in axes)):
            dotted = {k: val for (k, _), val in zip(axes, combo)}
            label = ", ".join(f"{k.split('.')[-1]}={val}" for k, val in dotted.items())
            nm = "_".join(f"{k.split('.')[-1]}-{val}" for k, val in dotted.items())
            method_keys = {k: val for k, val in dotted.items() if k.startswith("method.")}
            other = {k: val for k, val in dotted.items() if not k.startswith("method.")}
            m = _upd(full, **_nested({k[len("method.") :]: val for k, val in method_keys.items()}))
            settings.append(Setting(nm, label, m, _nested(other)))
        return StudyPlan(
            name, "Grid over " + ", ".join(k for k, _ in axes), settings, settings[0].name, label
        )
    raise ConfigError(name, f"unknown study (choose from {', '.join(STUDIES)})")


# ------------------------------------------------------------------------------------------ running


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _setting_config(cfg: Config, overrides: dict[str, Any], methods: dict[str, MethodConfig]) -> Config:
    """The run config of a group of settings: overrides applied, the settings as its only methods."""
    d = _merge(cfg.model_dump(mode="json"), overrides)
    d["protocol"]["methods"] = {n: m.model_dump(mode="json") for n, m in methods.items()}
    d["protocol"]["full_method"] = next(iter(methods))
    d["protocol"]["final_model"] = False
    d.setdefault("baselines", {})["enabled"] = False
    try:
        return Config.model_validate(d)
    except Exception as e:  # pydantic's ValidationError: one line naming the study's override
        raise ConfigError("study", f"invalid setting overrides {overrides}: {e}") from None


def _unit_key(unit: str, cfg: Config, manifest: Path) -> str:
    """Content key of a shareable unit: the config sections it reads and the content of its inputs."""
    d = cfg.model_dump(mode="json")
    m = read_manifest(manifest, num_classes=cfg.task.num_classes)
    if unit == "teacher":
        sections = {k: d[k] for k in ("teacher", "tvus", "task", "seed")}
        rows = m.select(cfg.task.teacher_modality)
    else:
        # The MAE reads the unlabelled pool; its probe (mae/probe.json) the labelled volumes and folds.
        sections = {k: d[k] for k in ("mae", "student", "mri", "task", "seed", "protocol") if k in d}
        sections["protocol"] = {"folds": d["protocol"]["folds"]}
        rows = m.select(cfg.task.student_modality)
    files = sorted((r.subject_id, r.label, content_hash(r.path)) for r in rows)
    return _key({"unit": unit, "sections": sections, "inputs": files})


def _link_shared(run_dir: Path, shared: Path, unit: str, key: str) -> bool:
    """Link a finished shared unit into ``run_dir`` (True when it was found)."""
    src = shared / f"{unit}-{key}"
    dst = run_dir / unit
    if not rundir.is_done(src) or dst.exists() or dst.is_symlink():
        return False
    dst.symlink_to(os.path.relpath(src, run_dir), target_is_directory=True)
    return True


def _publish_shared(run_dir: Path, shared: Path, unit: str, key: str) -> bool:
    """Move a unit trained in ``run_dir`` into the shared store and link it back (True when moved)."""
    src = run_dir / unit
    dst = shared / f"{unit}-{key}"
    if src.is_symlink() or not rundir.is_done(src) or dst.exists():
        return False
    shared.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)
    src.symlink_to(os.path.relpath(dst, run_dir), target_is_directory=True)
    return True


def _read_index(shared: Path) -> dict[str, str]:
    """``shared/index.json``: shared unit -> the run that trained it."""
    f = shared / "index.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


def _cohort_manifest(cfg: Config, out: Path, overrides: dict[str, Any]) -> Path:
    """The manifest of a run config: its own, or a synthetic cohort shared by equal cohort settings."""
    if cfg.data.manifest is not None:
        if "synth" in overrides.get("data", {}):
            raise ConfigError(
                "data.manifest",
                f"this study's settings change the synthetic cohort ({overrides['data']['synth']}); "
                "run it on the synthetic cohort (no data.manifest)",
            )
        return Path(cfg.data.manifest).resolve()
    key = _key(cfg.data.synth.model_dump(mode="json"))
    return ensure_manifest(cfg, out / "cohorts" / key)


def check_shard(shard: tuple[int, int]) -> None:
    """Raises ConfigError unless ``shard`` is ``(i, n)`` with ``0 <= i < n``."""
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError("--shard", f"{i}/{n}: needs 0 <= I < N (I/N, 0-based)")


def parse_shard(text: str | None, env: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """``--shard I/N``, else a SLURM array's task (``SLURM_ARRAY_TASK_ID``/``_COUNT``, minus ``_MIN``).

    Raises:
        ConfigError: ``text`` is not ``I/N`` with ``0 <= I < N``.
    """
    if text is None:
        if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
            return None
        task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
        shard = (task, int(env["SLURM_ARRAY_TASK_COUNT"]))
    else:
        i, sep, n = text.partition("/")
        if not sep or not i.strip().isdigit() or not n.strip().isdigit():
            raise ConfigError("--shard", f"{text!r}: give I/N, e.g. 0/4 (share I of N, 0-based)")
        shard = (int(i), int(n))
    check_shard(shard)
    return shard


@contextlib.contextmanager
def _study_lock(out: Path, name: str) -> Iterator[None]:
    """Block until this process holds ``STUDY/.locks/NAME.lock`` (the shards of a study take turns)."""
    path = out / ".locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@dataclass
class _Group:
    """One run of a study: the settings that share its non-method config."""

    name: str
    dir: Path
    cfg: Config
    keys: dict[str, str]  # shared unit -> content key


def _run_groups(plan: StudyPlan) -> list[list[Setting]]:
    """Settings with the same non-method config run as methods of one run (in the plan's order)."""
    groups: dict[str, list[Setting]] = {}
    for s in plan.settings:
        groups.setdefault(_key(s.overrides), []).append(s)
    return list(groups.values())


def _run_name(i: int, members: list[Setting]) -> str:
    return f"run{i}_{members[0].name}" if len(members) == 1 else f"run{i}"


def _needs_unit(cfg: Config, unit: str) -> bool:
    if unit == rundir.TEACHER:
        return True
    return needs_mae(cfg, list(cfg.protocol.methods)) and not cfg.mae.use_labelled_train


def _run_shard(
    plan: StudyPlan, cfg: Config, out: Path, shard: tuple[int, int], echo: Callable[[str], None]
) -> None:
    """Share ``i`` of ``n`` of the study's fits, with the shared units they need (trained once, under a lock)."""
    i, n = shard
    shared = out / rundir.SHARED
    groups: list[_Group] = []
    for gi, members in enumerate(_run_groups(plan)):
        run_name = _run_name(gi, members)
        run_cfg = _setting_config(cfg, members[0].overrides, {s.name: s.method for s in members})
        with _study_lock(out, "cohorts"):  # a synthetic cohort is generated once
            run_cfg.data.manifest = _cohort_manifest(run_cfg, out, members[0].overrides)
        run_dir = out / rundir.RUNS / run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        keys = {u: _unit_key(u, run_cfg, Path(run_cfg.data.manifest)) for u in _SHARED_UNITS}
        groups.append(_Group(run_name, run_dir, run_cfg, keys))
    # A shared unit is trained in the first run that needs it, as in a one-process study.
    owner: dict[str, int] = {}
    for gi, g in enumerate(groups):
        for unit, k in g.keys.items():
            if _needs_unit(g.cfg, unit):
                owner.setdefault(f"{unit}-{k}", gi)
    fits = [
        (gi, f)
        for gi, g in enumerate(groups)
        for f in cv_fits(g.cfg.protocol.folds, list(g.cfg.protocol.methods))
    ]
    mine = [(gi, f) for j, (gi, f) in enumerate(fits) if j % n == i]
    echo(f"[study {plan.name}] shard {i}/{n}: {len(mine)} of {len(fits)} fits")
    prepared: set[int] = set()
    for gi, fit in mine:
        g = groups[gi]
        if gi not in prepared:
            for unit, k in g.keys.items():
                if not _needs_unit(g.cfg, unit):
                    continue
                with _study_lock(out, f"{unit}-{k}"):
                    if not rundir.is_done(rundir.shared_unit_dir(out, unit, k)):
                        o = groups[owner[f"{unit}-{k}"]]
                        stage = "teacher" if unit == rundir.TEACHER else "pretrain"
                        run_stage(o.cfg, o.dir, stage, resume=True)
                        with _study_lock(out, "index"):
                            if _publish_shared(o.dir, shared, unit, k):
                                index = _read_index(shared)
                                index[f"{unit}-{k}"] = o.name
                                atomic_write_json(shared / "index.json", index)
                    _link_shared(g.dir, shared, unit, k)
            if needs_mae(g.cfg, list(g.cfg.protocol.methods)) and g.cfg.mae.use_labelled_train:
                for f in range(g.cfg.protocol.folds):  # per-fold MAEs belong to their run
                    with _study_lock(out, f"{g.name}-mae-{f}"):
                        run_stage(g.cfg, g.dir, "pretrain", fold=f, resume=True)
            prepared.add(gi)
        run_stage(g.cfg, g.dir, "distill", fit.method, fit.fold, resume=True)
    echo(
        f"[study {plan.name}] shard {i}/{n} done: when every shard has finished, "
        f"`endodistill study {plan.name} --resume` (no --shard) writes the study's results"
    )


def _start_study(
    name: str, cfg: Config, out: Path, resume: bool, vary: Sequence[str], sharded: bool
) -> StudyPlan:
    """The study's plan; ``study_plan.json`` written, or checked against the one a resumed study began with."""
    plan = plan_study(name, cfg, vary)
    marker = out / "study_plan.json"
    plan_json = {
        "study": name,
        "vary": list(vary),
        "config": cfg.model_dump(mode="json"),
        "settings": [
            {"name": s.name, "method": s.method.model_dump(mode="json"), "overrides": s.overrides}
            for s in plan.settings
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    with _study_lock(out, "plan"):  # the shards of one study start at the same time
        if marker.is_file() and not resume and not sharded:
            raise InputError(
                out, "already holds a study: continue it with --resume, or choose another folder"
            )
        if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) != json.loads(
            json.dumps(plan_json, default=str)
        ):
            raise InputError(marker, "the study was started with other settings or config: cannot resume")
        atomic_write_json(marker, plan_json)
    return plan


def run_study_shard(
    name: str,
    cfg: Config,
    out: str | Path,
    shard: tuple[int, int],
    vary: Sequence[str] = (),
    echo: Callable[[str], None] = print,
) -> None:
    """Run share ``i`` of ``n`` (``shard=(i, n)``) of a study's cross-validation fits, resuming what is done.

    Fit ``j`` of the study's fixed list (its runs in order, each fold-major) is share ``j % n``'s; the teacher
    and MAE units those fits need are trained once (the first shard to need one trains it, in the first run
    that uses it, while the others wait on its lock) and shared as in a one-process study. ``n`` processes
    (a SLURM array) can run their shares at the same time; then :func:`run_study` with ``resume=True`` finds
    every unit done and writes the study's outputs: the same numbers as a study run in one process.

    Raises:
        ConfigError: an invalid shard, study or overrides.
        InputError: the study was started with other settings, or bad inputs.
    """
    check_shard(shard)
    out = Path(out)
    plan = _start_study(name, cfg, out, True, vary, sharded=True)
    _run_shard(plan, cfg, out, shard, echo)


def run_study(
    name: str,
    cfg: Config,
    out: str | Path,
    resume: bool = False,
    vary: Sequence[str] = (),
    echo: Callable[[str], None] = print,
) -> StudyResult:
    """Run a study into ``out`` and write ``study.json``, ``study.md`` and ``study.html``.

    Args:
        name: one of :data:`STUDIES`.
        cfg: the base configuration.
        out: the study directory.
        resume: continue a study: finished units and fits are skipped (also: gather the shares that
            :func:`run_study_shard` processes ran).
        vary: ``grid`` axes (``KEY=V1,V2``; ``method.`` keys change the fine-tuned method).
        echo: where progress lines go.

    Raises:
        InputError: ``out`` holds another study (without ``resume``), or bad inputs.
        ConfigError: an unknown study or invalid overrides.
    """
    t0 = time.perf_counter()
    out = Path(out)
    plan = _start_study(name, cfg, out, resume, vary, sharded=False)

    groups = _run_groups(plan)
    shared = out / rundir.SHARED
    used: dict[str, list[str]] = {}
    rows: list[dict[str, Any]] = []
    per_setting: dict[str, dict[str, Any]] = {}
    for i, members in enumerate(groups):
        run_name = _run_name(i, members)
        run_dir = out / rundir.RUNS / run_name
        run_cfg = _setting_config(cfg, members[0].overrides, {s.name: s.method for s in members})
        run_cfg.data.manifest = _cohort_manifest(run_cfg, out, members[0].overrides)
        run_dir.mkdir(parents=True, exist_ok=True)
        keys = {u: _unit_key(u, run_cfg, Path(run_cfg.data.manifest)) for u in _SHARED_UNITS}
        for unit, k in keys.items():
            _link_shared(run_dir, shared, unit, k)
        echo(f"[study {name}] {run_name}: {', '.join(s.name for s in members)} ({i + 1}/{len(groups)})")
        run_experiment(run_cfg, run_dir, resume=True)
        results = rundir.read_results(run_dir)
        for unit, k in keys.items():
            if not (run_dir / unit).is_symlink() and _publish_shared(run_dir, shared, unit, k):
                index = _read_index(shared)
                index[f"{unit}-{k}"] = run_name
                atomic_write_json(shared / "index.json", index)
            if (run_dir / unit).is_symlink():
                used.setdefault(f"{unit}-{k}", []).append(run_name)
        for r in read_oof_csv(run_dir / rundir.OOF):
            rows.append({**r, "label": int(r["label"] == cfg.task.positive_class)})
        for s in members:
            mae = results.mae or {}
            per_setting[s.name] = {
                "run": run_name,
                "teacher_auc": results.teacher.get("auc"),
                "mae_probe_auc": mae.get("probe_auc"),
                "mae_random_probe_auc": mae.get("random_probe_auc"),
                "config": {
                    "method": s.method.model_dump(mode="json"),
                    "overrides": s.overrides,
                    "run_config": f"runs/{run_name}/config.yaml",
                },
            }
    index = _read_index(shared)
    shared_use = {u: {"trained_by": index.get(u, ""), "used_by": runs} for u, runs in sorted(used.items())}
    result = summarise_study(plan, rows, per_setting, cfg, shared_use, time.perf_counter() - t0)
    write_study(out, result, plan)
    echo(format_study_table(result))
    return result


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


def write_study(out: Path, r: StudyResult, plan: StudyPlan) -> None:
    """``study.json``, ``study.md`` and a self-contained ``study.html`` (figure embedded), atomically."""
    atomic_write_json(out / "study.json", r.model_dump(mode="json"))
    html, md = render_study(r)
    atomic_write_text(out / "study.html", html)
    atomic_write_text(out / "study.md", md)
