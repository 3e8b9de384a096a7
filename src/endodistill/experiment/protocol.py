"""The experiment: teacher, MAE, every method on the same cross-validation folds, the final model, the report.

The run directory it fills is described in :mod:`endodistill.rundir`. Every unit (teacher, mae, each
fold x method, final) writes ``done.json`` last; ``resume=True`` skips finished units and continues an
interrupted fit from its ``checkpoints/last.ckpt``. Seeds are per fit (:mod:`endodistill.experiment.plan`),
so a resumed run gives the same ``results.json`` (timings aside).

``trainer.spread_fits`` under torchrun spreads the fold x method fits over the processes, one fit per process
and device, into the same run directory (:mod:`endodistill.experiment.spread`); the results are the same.

The parts: :mod:`~endodistill.experiment.plan` (fits, units, seeds), :mod:`~endodistill.experiment.provenance`
(config.yaml, run.json, splits.json, resume checks), :mod:`~endodistill.experiment.runner` (progress, one fit),
:mod:`~endodistill.experiment.aggregate` (out-of-fold rows, metrics, comparisons, timings),
:mod:`~endodistill.experiment.final` (deployable models, thresholds), :mod:`~endodistill.experiment.stage`
(one stage on its own).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from endodistill import rundir
from endodistill.config import Config
from endodistill.evaluate.fmt import fmt_auc, fmt_seconds
from endodistill.evaluate.stats import nan_to_none
from endodistill.experiment import plan
from endodistill.experiment.aggregate import (
    collect_timings,
    comparisons,
    method_metrics,
    oof_rows,
    write_examples,
    write_oof,
)
from endodistill.experiment.final import final_model, teacher_model
from endodistill.experiment.provenance import load_or_make_splits, manifest_path, record_run, start_run
from endodistill.experiment.runner import FitProgress, cv_fit, echo, mae_diagnostic, mae_encoder
from endodistill.experiment.spread import (
    BASELINES_RANK,
    Spread,
    run_share,
    run_teacher_share,
    run_worker,
    start_spread,
)
from endodistill.report import format_ablation_table, write_report
from endodistill.train.baselines import run_baselines
from endodistill.train.data import load_cohort
from endodistill.train.joint import tvus_summary
from endodistill.train.runtime import fault_point, rank_run_dir
from endodistill.train.seeding import configure_torch
from endodistill.train.teacher import load_teacher_outputs, train_teacher
from endodistill.utils import RunLock, atomic_write_csv, atomic_write_json


def run_experiment(cfg: Config, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the whole experiment into ``run_dir``; returns the content of ``results.json``.

    With ``trainer.spread_fits`` in processes started by torchrun, the cross-validation fits are spread over
    the processes (see :mod:`endodistill.experiment.spread`): rank 0 returns ``results.json`` as usual, the
    other ranks return ``{"rank": r, "trained": [...], "skipped": [...]}`` (the fits they trained / found done).

    Args:
        cfg: the configuration (``data.manifest`` empty: a synthetic cohort is generated into RUN_DIR/cohort).
        run_dir: the run directory.
        resume: skip finished units and continue interrupted fits.

    Raises:
        InputError: bad inputs, a run directory holding another run, or a configuration that differs from
            the one a resumed run was started with.
        RunLockedError: another process is using ``run_dir``.
        TrainingDivergedError: a loss became NaN/inf.
        SpreadError: another process of a spread run failed.
    """
    rundir.check_out_dir(run_dir)
    spread = start_spread(cfg)  # None unless trainer.spread_fits and several torchrun processes
    if spread is not None:
        with spread:
            if spread.rank != 0:
                # Not locked (rank 0 holds the run's lock) and no scratch mirror: this rank writes only
                # the unit directories of its own fits, which no other process writes.
                return run_worker(cfg, Path(run_dir), resume, spread)
            return _locked_run(cfg, Path(run_dir), resume, spread)

    # Under DDP only rank 0 writes run_dir; the other ranks run the same units in a scratch copy.
    with rank_run_dir(run_dir, mirror=resume) as run_dir:
        return _locked_run(cfg, run_dir, resume, None)


def _locked_run(cfg: Config, run_dir: Path, resume: bool, spread: Spread | None) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        try:
            return _run_experiment(cfg, run_dir, resume, spread)
        except KeyboardInterrupt:
            echo(f"interrupted: continue with `endodistill run --resume {run_dir}`")
            raise


def _run_experiment(cfg: Config, run_dir: Path, resume: bool, spread: Spread | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    plan.check_mae_config(cfg)
    configure_torch(cfg)
    t0 = time.perf_counter()
    cfg = start_run(cfg, run_dir, resume)
    data = load_cohort(cfg, manifest_path(cfg, run_dir))
    record_run(cfg, run_dir, data.files)
    atomic_write_json(run_dir / rundir.FINGERPRINT, data.fingerprint)
    lab = data.labelled
    splits = load_or_make_splits(cfg, run_dir, lab.subjects, lab.labels.tolist())
    t_data = time.perf_counter() - t0
    echo(
        f"[data] {len(lab)} labelled + {len(data.unlabelled)} unlabelled {cfg.task.student_modality}, "
        f"{len(data.tvus)} {cfg.task.teacher_modality} clips, {len(splits)} folds ({t_data:.1f} s)"
    )

    methods = list(cfg.protocol.methods)
    # One progress over the whole run (rank 0 of a spread run counts its own fits in the spread bar).
    run_progress = FitProgress(
        [u for u in plan.run_units(cfg, data, len(splits), methods) if spread is None or u[0] != "fit"],
        "run",
        bar=spread is None,  # a spread run's rank 0 shows the bar of its own fits instead
    )
    try:
        return _run_units_in_order(
            cfg, data, run_dir, resume, spread, splits, methods, run_progress, t_start, t_data
        )
    finally:
        run_progress.close()


def _run_units_in_order(
    cfg: Config,
    data: Any,
    run_dir: Path,
    resume: bool,
    spread: Spread | None,
    splits: list[dict[str, list[str]]],
    methods: list[str],
    progress: FitProgress,
    t_start: float,
    t_data: float,
) -> dict[str, Any]:
    """The run after its data: teacher, MAE, the fits, the final model, baselines, results and report."""
    t1 = time.perf_counter()
    reused = resume and rundir.is_done(run_dir / rundir.TEACHER)
    if spread is not None:  # the teacher's fits too are spread: this rank's share, then the others'
        spread.arrive("data")
        run_teacher_share(cfg, data, run_dir, resume, spread)
        spread.wait("teacher")
    teacher_metrics = train_teacher(cfg, data, run_dir, resume, echo, reuse_fits=spread is not None)
    t_teacher = time.perf_counter() - t1
    teacher = load_teacher_outputs(run_dir)
    teacher_info = teacher_model(cfg, run_dir, teacher_metrics, data.fingerprint, resume)
    progress.stage("teacher", time.perf_counter() - t1, reused)

    shared_encoder: Path | None = None
    if plan.needs_mae(cfg, methods) and not cfg.mae.use_labelled_train:
        t1 = time.perf_counter()
        reused = resume and rundir.is_done(run_dir / rundir.MAE)
        shared_encoder = mae_encoder(cfg, data, run_dir, None, [], resume, echo)
        progress.stage("mae", time.perf_counter() - t1, reused)
    t_probe = time.perf_counter()
    mae_info = mae_diagnostic(cfg, data, run_dir, splits, shared_encoder, resume)
    t_probe = time.perf_counter() - t_probe
    fold_encoders: dict[int, Path | None] = {}

    def encoder_of(f: int) -> Path | None:
        # Per-fold MAE encoders (mae.use_labelled_train) are trained when their fold is first reached.
        if f not in fold_encoders:
            enc = shared_encoder
            if enc is None and plan.needs_mae(cfg, methods):
                enc = mae_encoder(cfg, data, run_dir, f, splits[f]["train"], resume, echo)
            fold_encoders[f] = enc
        return fold_encoders[f]

    k = len(splits)
    spread_info = rundir.SpreadInfo(processes=1)
    if spread is None:
        for fit in plan.cv_fits(k, methods):
            cv_fit(cfg, data, teacher, splits, fit, run_dir, resume, encoder_of(fit.fold), progress)
    else:
        for f in range(k):  # every encoder before the others start: they only read them
            encoder_of(f)
        spread.arrive("ready")
        t_fits = time.perf_counter()
        echo(
            f"[spread] {k * len(methods)} fits over {spread.world} processes "
            "(dealt out longest first; equally long fits round robin)"
        )
        run_share(cfg, data, teacher, splits, methods, run_dir, resume, encoder_of, spread)
        spread.wait("fits")
        by_rank = {str(r): json.loads(spread.get(f"trained/{r}")) for r in range(spread.world)}
        spread_info = rundir.SpreadInfo(
            processes=spread.world,
            engine="torchrun",
            assignment=(
                f"longest first over {spread.world} ranks (plan.fit_cost; joint epochs weigh "
                f"{plan.JOINT_EPOCH_COST} student epochs): fit i on rank i % {spread.world} when all weigh the same"
            ),
            trained_by_rank={r: v["trained"] for r, v in by_rank.items()},
            skipped_by_rank={r: v["skipped"] for r, v in by_rank.items()},
            teacher_by_rank={
                str(r): json.loads(spread.get(f"teacher_units/{r}")) for r in range(spread.world)
            },
            wall_seconds=round(time.perf_counter() - t_fits, 3),
            teacher_wall_seconds=round(t_teacher, 3),
            baselines_rank=BASELINES_RANK if cfg.baselines.enabled else None,
        )

    rows = oof_rows(cfg, splits, methods, run_dir)
    write_oof(run_dir / rundir.OOF, rows)
    metrics = method_metrics(cfg, rows, methods)
    comps = comparisons(cfg, rows, methods)

    # Joint methods: their TVUS out-of-fold predictions on the clip folds, next to the teacher's.
    tvus, tvus_rows = tvus_summary(cfg, methods, k, run_dir, teacher_metrics)
    if tvus is not None:
        fields = ["subject_id", "fold", "method", "label", "prob", "path"]
        atomic_write_csv(run_dir / rundir.OOF_TVUS, tvus_rows, fields)
        for m, tm in tvus["methods"].items():
            echo(
                f"[{m}] {cfg.task.teacher_modality} out-of-fold AUC {fmt_auc(tm.get('auc'))} over "
                f"{tm.get('n')} clips (teacher {fmt_auc(tvus.get('teacher_auc'))})"
            )

    final: dict[str, Any] | None = None
    if cfg.protocol.final_model:
        t1 = time.perf_counter()
        reused = resume and (run_dir / rundir.MODEL / rundir.MODEL_METADATA).is_file()
        final = final_model(
            cfg, data, teacher, run_dir, metrics, teacher_metrics, shared_encoder, resume, tvus
        )
        progress.stage("final", time.perf_counter() - t1, reused)

    timings, fits = collect_timings(run_dir, splits, methods, t_data)
    if mae_info is not None:
        timings["mae_probe"] = round(t_probe, 3)
    results: dict[str, Any] = {
        "methods": metrics,
        "teacher": teacher_metrics,
        "mae": mae_info,
        "comparisons": comps,
        "cohort": {**data.cohort, "manifest": str(cfg.data.manifest)},
        "config": cfg.model_dump(mode="json"),
        "seed": cfg.seed,
        "folds": k,
        "reference": plan.reference_method(methods),
        "full_method": cfg.protocol.full_method,
        "correction": "holm",
        "final_model": final,
        "teacher_model": teacher_info,
        "timings": timings,
        # Processes the cross-validation fits were spread over (trainer.spread_fits under torchrun); the
        # stage timings above are sums of the fits' own times, not wall-clock time.
        "fit_processes": spread_info.processes,
    }
    if tvus is not None:
        results["tvus"] = tvus
    # --- reference baselines (endodistill.train.baselines): same folds and statistics, apart from the methods
    if cfg.baselines.enabled:
        t1 = time.perf_counter()
        reused = resume and rundir.is_done(run_dir / rundir.BASELINES)
        if spread is not None:  # another rank computed them alongside the MAE
            spread.wait("baselines", ranks=[BASELINES_RANK])
        baselines, baseline_seconds = run_baselines(
            cfg, data, splits, run_dir, resume, rows, echo, reuse=spread is not None
        )
        progress.stage("baselines", time.perf_counter() - t1, reused)
        if baselines:
            results["baselines"] = baselines
            results["timings"].update(baseline_seconds)  # in "timings": the only key reruns may change
    # --- end of reference baselines
    written = rundir.write_results(run_dir, rundir.Results.model_validate(nan_to_none(results)))
    step = sum(v.get("step", 0.0) for v in fits.values() if isinstance(v, dict))
    wall_fits = sum(v.get("wall", 0.0) for v in fits.values() if isinstance(v, dict))
    rundir.write_timings(
        run_dir,
        rundir.Timings(
            stages=timings,
            fits=fits,
            step_seconds=round(step, 3),
            fit_wall_seconds=round(wall_fits, 3),
            overhead=round(wall_fits / step, 3) if step > 0 else None,
            this_process_wall_seconds=round(time.perf_counter() - t_start, 3),
            spread=spread_info,
        ),
    )
    write_examples(cfg, data, run_dir)
    fault_point("report")  # test-only (no-op unless $ENDODISTILL_TEST_KILL_AT is set)
    html, _md = write_report(run_dir)
    echo("")
    echo(format_ablation_table(written))
    # The stages' own times add up to the run's (also across a resume); in a spread run they overlap, so its
    # total is this process's wall time.
    t_total = sum(timings.values()) if spread is None else time.perf_counter() - t_start
    echo(f"\nteacher AUC {fmt_auc(teacher_metrics.get('auc'))}; report: {html}; total {fmt_seconds(t_total)}")
    return written
