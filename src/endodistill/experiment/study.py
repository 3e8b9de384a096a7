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
    .locks/              locks the shards of a sharded study take turns on (``--shard I/N``)

The plans are :mod:`~endodistill.experiment.study_plan`, the statistics and outputs
:mod:`~endodistill.experiment.study_results`; this module runs a study (in one process or in shards).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from endodistill import rundir
from endodistill.config import Config, MethodConfig
from endodistill.data.cache import content_hash
from endodistill.data.manifest import read_manifest
from endodistill.errors import ConfigError, InputError
from endodistill.evaluate.stats import read_oof_csv
from endodistill.experiment.plan import cv_fits, needs_mae
from endodistill.experiment.protocol import run_experiment
from endodistill.experiment.stage import run_stage
from endodistill.experiment.study_plan import STUDIES, Setting, StudyPlan, merge_dicts, plan_study
from endodistill.experiment.study_results import StudyResult, summarise_study, write_study
from endodistill.report.study import format_study_table
from endodistill.train.data import ensure_manifest
from endodistill.utils import atomic_write_json, stable_hash

__all__ = ["STUDIES", "StudyResult", "parse_shard", "plan_study", "run_study", "run_study_shard"]

log = logging.getLogger(__name__)

_SHARED_UNITS = ("teacher", "mae")


# ------------------------------------------------------------------------------------------ running


def _setting_config(cfg: Config, overrides: dict[str, Any], methods: dict[str, MethodConfig]) -> Config:
    """The run config of a group of settings: overrides applied, the settings as its only methods."""
    d = merge_dicts(cfg.model_dump(mode="json"), overrides)
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
        if d["protocol"]["train_fraction"] != 1:
            # The probe trains on the folds' training parts; only when they shrink, so the keys of units
            # shared before the option existed stay valid.
            sections["protocol"]["train_fraction"] = d["protocol"]["train_fraction"]
        rows = m.select(cfg.task.student_modality)
    files = sorted((r.subject_id, r.label, content_hash(r.path)) for r in rows)
    return stable_hash({"unit": unit, "sections": sections, "inputs": files})


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
    key = stable_hash(cfg.data.synth.model_dump(mode="json"))
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
        groups.setdefault(stable_hash(s.overrides), []).append(s)
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
