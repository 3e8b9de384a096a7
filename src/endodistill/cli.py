"""The ``endodistill`` command line (Typer).

Every command turns an :class:`~endodistill.errors.EndodistillError` into one line on stderr and its
exit code (2 for bad input); ``--debug`` shows the traceback instead. Ctrl-C exits with 130.

Each command imports what it runs inside its function, on purpose (start-up time): ``--help``, ``validate``,
``inspect`` and a bad config or manifest answer in well under a second, without importing torch.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from endodistill.errors import EXIT_INTERRUPTED, EndodistillError, InputError

if TYPE_CHECKING:
    from endodistill.config import Config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distil ultrasound knowledge into an MRI classifier (POD obliteration, arXiv 2307.02000).",
)
_STATE = {"debug": False}
log = logging.getLogger("endodistill")

ConfigOpt = Annotated[
    str | None, typer.Option("--config", "-c", help="YAML config file or preset name (demo, paper, tiny).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: --set finetune.epochs=3 (repeatable)."),
]

AcceleratorOpt = Annotated[
    str | None,
    typer.Option("--accelerator", help="cpu, gpu, cuda, mps or auto (= --set trainer.accelerator=...)."),
]
DevicesOpt = Annotated[
    str | None, typer.Option("--devices", help="Devices per node, e.g. 4 (= --set trainer.devices=...).")
]
StrategyOpt = Annotated[
    str | None,
    typer.Option("--strategy", help="Lightning strategy, e.g. ddp (= --set trainer.strategy=...)."),
]
NodesOpt = Annotated[int | None, typer.Option("--num-nodes", help="Nodes (= --set trainer.num_nodes=...).")]
ProcessesOpt = Annotated[
    int | None,
    typer.Option(
        "--processes",
        min=1,
        help="Spread the cross-validation fits over N processes on this machine (torchrun; same results). "
        "Default: 1; for demo, 2 on a CPU run with at least 2 cores.",
    ),
]


def _with_hardware(
    set_: list[str] | None,
    accelerator: str | None,
    devices: str | None,
    strategy: str | None,
    num_nodes: int | None,
) -> list[str]:
    """``--set`` overrides plus the hardware options (given last, so they win over a ``--set`` of the same key)."""
    out = list(set_ or [])
    for key, value in (
        ("accelerator", accelerator),
        ("devices", devices),
        ("strategy", strategy),
        ("num_nodes", num_nodes),
    ):
        if value is not None:
            out.append(f"trainer.{key}={value}")
    return out


def _argv_without(option: str) -> list[str]:
    """This command line's arguments without ``option`` and its value (``--opt N`` or ``--opt=N``)."""
    out: list[str] = []
    skip = False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def _spread_here(cfg: Config, out: Path, processes: int | None, default: int) -> None:
    """Re-run this command in ``processes`` local processes (fits spread), unless it is one of them already.

    What every rank would refuse (an output path that is a file, a data-parallel trainer) is refused here
    first, in one line, before any process starts.

    Raises:
        typer.Exit: with the launched processes' exit code, once they are done.
    """
    from endodistill.rundir import check_out_dir

    check_out_dir(out)
    n = default if processes is None else processes
    if n <= 1:
        return
    from endodistill.errors import ConfigError
    from endodistill.experiment.spread import launch_local, launched, spread_conflict

    if launched():
        return
    conflict = spread_conflict(cfg)
    if conflict:
        raise ConfigError(f"--processes {n} (trainer.spread_fits)", conflict)
    raise typer.Exit(launch_local(n, _argv_without("--processes")))


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More log output.")] = False,
) -> None:
    _STATE["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the cohort into.")],
    preset: Annotated[str, typer.Option(help="Cohort size: demo, paper or tiny.")] = "demo",
    seed: Annotated[int, typer.Option(help="Generator seed (same seed -> identical files).")] = 0,
    paired_fraction: Annotated[
        float, typer.Option(help="Share of TVUS subjects that also have an MRI (same subject_id).")
    ] = 0.0,
) -> None:
    """Write the synthetic pelvic cohort (MRI NIfTI, TVUS mp4, manifest.csv, cohort.json)."""
    from endodistill.data.synthetic import format_summary, generate_cohort

    summary = generate_cohort(out, preset=preset, seed=seed, paired_fraction=paired_fraction)
    typer.echo(format_summary(summary))


@app.command()
def validate(
    manifest: Annotated[Path, typer.Argument(help="manifest.csv to check.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    decode: Annotated[
        bool, typer.Option(help="Also decode every file (slower, catches broken files).")
    ] = True,
) -> None:
    """Check a manifest and the files it names; report every problem at once (exit 2 if any)."""
    from endodistill.config import load_config
    from endodistill.data.manifest import validate_manifest

    cfg = load_config(config, set_)
    problems = validate_manifest(manifest, cfg=cfg, decode=decode)
    if problems:
        for p in problems:
            typer.echo(str(p), err=True)
        typer.echo(f"{manifest}: {len(problems)} problem(s) found", err=True)
        raise typer.Exit(2)
    typer.echo(f"{manifest}: OK")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="An MRI volume, DICOM folder or ultrasound clip.")],
) -> None:
    """Print what endodistill sees in one file: format, shape, spacing, orientation, range, frames."""
    from endodistill.data.inspect import format_inspection, inspect_path

    typer.echo(format_inspection(inspect_path(path)))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("demo_run"),
    config: ConfigOpt = "demo",
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted demo run.")] = False,
    accelerator: AcceleratorOpt = None,
    devices: DevicesOpt = None,
    strategy: StrategyOpt = None,
    num_nodes: NodesOpt = None,
    processes: ProcessesOpt = None,
) -> None:
    """Generate the synthetic demo cohort (when absent) and run the whole protocol on it."""
    from endodistill.config import load_config
    from endodistill.experiment.spread import cpu_processes

    set_ = _with_hardware(set_, accelerator, devices, strategy, num_nodes)
    cfg = load_config(config, set_)
    _spread_here(cfg, out, processes, cpu_processes(cfg))
    from endodistill.experiment.protocol import run_experiment

    run_experiment(cfg, out, resume=resume)


@app.command()
def run(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the interrupted run in this directory.")
    ] = None,
    accelerator: AcceleratorOpt = None,
    devices: DevicesOpt = None,
    strategy: StrategyOpt = None,
    num_nodes: NodesOpt = None,
    processes: ProcessesOpt = None,
) -> None:
    """Run the whole experiment: teacher, MAE, 5-fold ablation, final model, report."""
    from endodistill.config import load_config

    set_ = _with_hardware(set_, accelerator, devices, strategy, num_nodes)
    if resume is not None:
        from endodistill.experiment.protocol import run_experiment
        from endodistill.experiment.provenance import load_run_config

        cfg = load_run_config(resume, set_)
        _spread_here(cfg, resume, processes, 1)
        run_experiment(cfg, resume, resume=True)
        return
    if out is None or config is None:
        raise typer.BadParameter("give --config and --out (or --resume RUN_DIR)")
    cfg = load_config(config, set_)  # a bad config fails before any heavy import or output
    if cfg.data.manifest is not None:
        from endodistill.data.manifest import read_manifest

        # A structurally broken manifest fails here too: before torch is imported and RUN_DIR exists.
        read_manifest(cfg.data.manifest, cfg.data.restrict_paths, cfg.task.num_classes)
    _spread_here(cfg, out, processes, 1)
    from endodistill.experiment.protocol import run_experiment

    fresh = not out.exists()
    try:
        run_experiment(cfg, out, resume=False)
    except InputError:
        if fresh:
            _remove_unstarted_run(out)
        raise


@app.command()
def study(
    # The names as a literal: importing experiment.study_plan here would load pydantic for every command.
    name: Annotated[
        str, typer.Argument(help="alpha, mask_ratio, kd_controls, pairing, pool, labels or grid.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Study directory.")],
    config: ConfigOpt = "demo",
    set_: SetOpt = None,
    vary: Annotated[
        list[str] | None,
        typer.Option(
            "--vary",
            help="grid only: KEY=V1,V2,... (repeatable; the cartesian product is the grid). Keys starting "
            "with method. change the fine-tuned method, e.g. method.schedule.alpha=0.7,0.9; others the "
            "config, e.g. finetune.lr=1e-3,3e-3.",
        ),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the study in --out.")] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="I/N: run only share I (0-based) of N of the study's fits, so that N processes run at once; "
            "then a call without --shard (--resume) writes the results. Default: a SLURM array's "
            "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT when set (run the final call outside the array).",
        ),
    ] = None,
    accelerator: AcceleratorOpt = None,
    devices: DevicesOpt = None,
    strategy: StrategyOpt = None,
    num_nodes: NodesOpt = None,
) -> None:
    """Answer one of the paper's open questions: every setting on the same folds, paired tests, a report."""
    from endodistill.config import load_config

    cfg = load_config(config, _with_hardware(set_, accelerator, devices, strategy, num_nodes))
    # Here, not at the top: the study (torch, Lightning) is imported only by the command that needs it.
    from endodistill.experiment.study import parse_shard, plan_study, run_study, run_study_shard

    plan_study(name, cfg, vary or [])  # an unknown study or a bad --vary fails before any work
    share = parse_shard(shard)
    if share is not None:
        run_study_shard(name, cfg, out, share, vary=vary or [], echo=typer.echo)
        return
    run_study(name, cfg, out, resume=resume, vary=vary or [], echo=typer.echo)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (the --out of run or demo).")],
) -> None:
    """Rebuild report.html and report.md (figures embedded) from a finished run directory, without training.

    Reads results.json as it is now (edit a method's name or a number there and rebuild), the saved
    predictions and training logs; each file is replaced atomically.
    """
    from endodistill.report import rebuild_report

    html, md = rebuild_report(run_dir)
    typer.echo(f"report: {html} and {md}")


def _remove_unstarted_run(run_dir: Path) -> None:
    """Remove a run directory this command created when bad input stopped it before any result.

    Only the files a run writes before it reads its data (lock, resolved config) may be there; anything
    else (a generated cohort, checkpoints) is kept.
    """
    import shutil

    names = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else {"?"}
    if names <= {".lock", "config.yaml"}:
        shutil.rmtree(run_dir, ignore_errors=True)


@app.command()
def train(
    stage: Annotated[str, typer.Argument(help="teacher, pretrain or distill.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    method: Annotated[str, typer.Option(help="Method name for distill.")] = "mae_kd_ce",
    fold: Annotated[int | None, typer.Option(help="Fold for distill (default: train on all).")] = None,
    resume: Annotated[bool, typer.Option(help="Resume from the stage's last checkpoint.")] = False,
    accelerator: AcceleratorOpt = None,
    devices: DevicesOpt = None,
    strategy: StrategyOpt = None,
    num_nodes: NodesOpt = None,
) -> None:
    """Run one training stage on its own, writing into a run directory."""
    from endodistill.config import load_config
    from endodistill.experiment.stage import run_stage

    set_ = _with_hardware(set_, accelerator, devices, strategy, num_nodes)
    run_stage(load_config(config, set_), out, stage=stage, method=method, fold=fold, resume=resume)


@app.command()
def predict(
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            "-m",
            help="Model directory: RUN_DIR/model (MRI; a joint model takes MRI and TVUS) or "
            "RUN_DIR/teacher_model (TVUS).",
        ),
    ],
    input_: Annotated[
        list[Path],
        typer.Option(
            "--input",
            "-i",
            help="MRI: NIfTI, DICOM folder, MHA/NRRD, folder or manifest. TVUS: mp4/avi/mov, DICOM cine, "
            "folder of PNG frames, folder of clips or manifest. A joint model: any of these (the modality "
            "column says which path was used).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    heatmap: Annotated[bool, typer.Option(help="Write explanation heatmaps.")] = True,
    strict: Annotated[
        bool,
        typer.Option(
            help="Refuse cases outside the training data's fingerprint (spacing, field of view, intensity, "
            "frame rate...) instead of predicting them with a warning."
        ),
    ] = False,
) -> None:
    """Predict POD obliteration on new MRI scans or TVUS clips (exit 3 when some cases failed)."""
    from endodistill.infer.predict import predict_cases

    n_failed = predict_cases(model, input_, out, heatmap=heatmap, strict=strict)
    if n_failed:
        raise typer.Exit(3)


@app.command()
def export(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model directory (RUN_DIR/model).")],
    format_: Annotated[str, typer.Option("--format", "-f", help="onnx or monai-bundle.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (onnx) or folder (bundle).")],
    sample: Annotated[
        Path | None,
        typer.Option(help="A real volume to validate the export on (default: a synthetic phantom)."),
    ] = None,
) -> None:
    """Export the deployable model to ONNX or a MONAI bundle (validated against PyTorch before writing)."""
    from endodistill.infer.export import export_model

    typer.echo(export_model(model, format_, out, sample=sample))


def main() -> None:
    """Console-script entry point with one-line errors."""
    t0 = time.perf_counter()
    try:
        rc = app(standalone_mode=False)  # returns typer.Exit's code instead of raising it
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except EndodistillError as e:
        if _STATE["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # a click usage error or an unexpected failure
        import errno

        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) and not _STATE["debug"]:
            # A full disk in a write that is not ours (e.g. Lightning's log files): still one clear line.
            typer.echo(f"error: {e.filename or 'writing output'}: no space left on device", err=True)
            sys.exit(1)

        # Typer >= 0.2x vendors click (no `click` package to import): click's exceptions are recognised by
        # their API (Abort by name, usage errors by show() + exit_code), which both variants share.
        if isinstance(e, typer.Abort) or type(e).__name__ == "Abort":
            typer.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()  # type: ignore[attr-defined]
            sys.exit(2)
        if _STATE["debug"]:
            raise
        typer.echo(
            f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True
        )
        sys.exit(1)
    finally:
        log.debug("done in %.1fs", time.perf_counter() - t0)
