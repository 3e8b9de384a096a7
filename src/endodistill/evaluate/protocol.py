"""The experiment: teacher, MAE, every method on the same cross-validation folds, the final model, the report.

Run directory (``RUN_DIR``)::

    config.yaml          resolved configuration (``--resume`` reads it)
    run.json             package versions, sha256 of every input file, seed
    splits.json          the folds (nnU-Net-like, editable by hand, reused when present)
    fingerprint.json     what the inputs looked like (spacings, sizes, intensities, clip timing; per site)
    teacher/             sub-fits, outputs.safetensors + outputs.json, predictions.csv, metrics.json
    mae/                 encoder.safetensors (shared by every method and fold)
    folds/fold_K/METHOD/ checkpoints, logs, history.csv, predictions.csv, model.safetensors, done.json
    final/               the full method trained on all labelled MRI
    model/               the deployable MRI model (infer.model_dir), with fingerprint.json
    teacher_model/       the deployable TVUS teacher: the CV fold teachers as one ensemble (same format)
    oof_predictions.csv  subject_id,fold,method,label,prob (one row per subject and method)
    results.json         metrics, comparisons, cohort, config, seed, timings
    timings.json         per-fit time breakdown (start-up, steps, data, eval, checkpoints)
    examples/            example MRI slices and TVUS frames (PNG)
    report.html, report.md

Every unit (teacher, mae, each fold x method, final) writes ``done.json`` last; ``resume=True`` skips finished
units and continues an interrupted fit from its ``checkpoints/last.ckpt``. Seeds are per fit (see
:func:`endodistill.train.common.fit_seed`), so a resumed run gives the same ``results.json`` (timings aside).

``trainer.spread_fits`` under torchrun spreads the fold x method fits over the processes, one fit per process
and device, into the same run directory (:mod:`endodistill.evaluate.spread`); the results are the same.

Within a fold every method uses the same seed (common random numbers: same batch order, pairing draws and
augmentations), so paired comparisons between methods measure the methods, not seed noise.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from endodistill.config import Config, ConfigError, dump_config, load_config
from endodistill.data.fingerprint import FILE_NAME as FINGERPRINT_FILE
from endodistill.errors import InputError
from endodistill.utils import RunLock, atomic_path, atomic_write_csv, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from endodistill.evaluate.spread import Spread

log = logging.getLogger("endodistill")

STAGES = ("teacher", "pretrain", "distill")


def _echo(msg: str) -> None:
    from endodistill.train.common import is_rank_zero

    if is_rank_zero():  # under DDP every rank runs the protocol; one prints
        if _FitProgress.bar is not None:  # above the progress bar, which is redrawn below it
            _FitProgress.bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)


class _FitProgress:
    """Progress over the units of this process's run, with the elapsed time and an estimate of the time left.

    A unit is a stage (teacher, MAE, final model, baselines) or one cross-validation fit, each weighted by
    its optimiser steps (epochs x batches). The estimate is the remaining steps times the seconds per step
    measured so far: per kind of unit once one of that kind has been trained, else over all trained units
    (a teacher step costs more than a student step, so the first estimate is rough and then improves).
    Units a resumed run reuses count as done, not in the rates.

    On a terminal (stdout a TTY, rank 0): a tqdm bar under the progress lines (each fit's Lightning bar,
    when shown, sits below it). Elsewhere (CI logs, pipes): no bar, each unit's line ends with ``i/N``,
    the elapsed time and the ETA.
    """

    bar: Any = None  # the active tqdm bar, if any (one at a time: _echo writes above it)

    def __init__(self, units: int | list[tuple[str, float]], what: str = "fits", bar: bool = True) -> None:
        from endodistill.train.common import is_rank_zero

        plan = [("fit", 1.0)] * units if isinstance(units, int) else list(units)
        self.left: dict[str, list[float]] = {}
        for kind, w in plan:
            self.left.setdefault(kind, []).append(max(float(w), 1.0))
        self.total, self.i = len(plan), 0
        self.rate_s: dict[str, float] = {}
        self.rate_w: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self.tty = bar and bool(self.total) and is_rank_zero() and sys.stdout.isatty()
        if self.tty:
            from tqdm import tqdm

            _FitProgress.bar = tqdm(
                total=self.total,
                desc=what,
                unit="unit",
                file=sys.stdout,
                dynamic_ncols=True,
                leave=True,
                position=0,
                bar_format=self._bar_format(),
            )

    def eta(self) -> float | None:
        """Seconds left, or None before the first trained unit (the estimate needs one)."""
        if not any(self.left.values()):
            return 0.0
        if not self.rate_w:
            return None
        overall = sum(self.rate_s.values()) / sum(self.rate_w.values())
        return sum(
            sum(ws) * (self.rate_s[k] / self.rate_w[k] if k in self.rate_w else overall)
            for k, ws in self.left.items()
        )

    def _times(self) -> str:
        from endodistill.evaluate.fmt import fmt_clock

        eta = self.eta()
        return f"elapsed {fmt_clock(time.perf_counter() - self.t0)}, ETA {'?' if eta is None else fmt_clock(eta)}"

    def _bar_format(self) -> str:
        return "{desc} {n_fmt}/{total_fmt} |{bar}| " + self._times()

    def _count(self, kind: str, seconds: float, reused: bool) -> None:
        self.i += 1
        ws = self.left.get(kind) or []
        w = ws.pop(0) if ws else 1.0
        if not reused:
            self.rate_s[kind] = self.rate_s.get(kind, 0.0) + seconds
            self.rate_w[kind] = self.rate_w.get(kind, 0.0) + w

    def done(self, line: str, seconds: float, reused: bool = False, tag: str = "", kind: str = "fit") -> None:
        """Count one unit and print its line (``line`` says what it got; ``tag`` ends the line)."""
        self._count(kind, seconds, reused)
        if _FitProgress.bar is not None and self.tty:
            _echo(f"{line}{tag}")
            _FitProgress.bar.bar_format = self._bar_format()
            _FitProgress.bar.update(1)
        else:
            _echo(f"{line}; unit {self.i}/{self.total}, {self._times()}{tag}")

    def stage(self, kind: str, seconds: float, reused: bool = False) -> None:
        """Count a stage unit whose own lines were printed by the stage (teacher, MAE, final, baselines)."""
        self.done(
            f"[run] {kind} {'reused' if reused else 'done'} ({seconds:.1f} s)", seconds, reused, kind=kind
        )

    def close(self) -> None:
        if self.tty and _FitProgress.bar is not None:
            _FitProgress.bar.bar_format = self._bar_format()
            _FitProgress.bar.close()
            _FitProgress.bar = None


def _steps(n: float, batch: int, epochs: int) -> float:
    return float(epochs) * max(1.0, np.ceil(n / max(batch, 1)))


def _run_units(cfg: Config, data: Any, k: int, methods: list[str]) -> list[tuple[str, float]]:
    """The run's units in order, each with its optimiser steps (the progress bar's plan)."""
    n_lab = len(data.labelled)
    n_train = n_lab * (k - 1) / k
    clips = int((data.tvus.labels >= 0).sum())
    t = cfg.teacher
    tk = t.folds if t.folds > 1 else 2
    units = [("teacher", tk * _steps(clips * (tk - 1) / tk, t.batch_size, t.epochs))]
    if t.targets == "in_sample":
        units[0] = ("teacher", units[0][1] + _steps(clips, t.batch_size, t.epochs))
    if _needs_mae(cfg, methods):
        pool = len(data.unlabelled) * cfg.mae.pool_fraction
        epochs = max(1, round(cfg.mae.epochs / cfg.mae.pool_fraction))
        units.append(
            ("mae", _steps(pool, cfg.mae.batch_size, epochs) * (k if cfg.mae.use_labelled_train else 1))
        )
    f = cfg.finetune
    units += [("fit", _steps(n_train, f.batch_size, f.epochs))] * (k * len(methods))
    if cfg.protocol.final_model:
        units.append(("final", _steps(n_lab, f.batch_size, f.epochs)))
    if cfg.baselines.enabled:
        c = cfg.baselines.cnn3d
        units.append(("baselines", k * _steps(n_train, c.batch_size, c.epochs)))
    return units


def _fit_result(info: dict[str, Any], seconds: float, reused: bool) -> str:
    """``val AUC 0.912, test AUC 0.873 (4.2 s)``: the validation AUC only when the fit had a validation part."""
    from endodistill.evaluate.fmt import fmt_auc, fmt_seconds, num

    parts = [] if num(info.get("val_auc")) is None else [f"val AUC {fmt_auc(info.get('val_auc'))}"]
    parts.append(f"test AUC {fmt_auc(info.get('test_auc'))}")
    return ", ".join(parts) + (" (done before, reused)" if reused else f" ({fmt_seconds(seconds)})")


# ---------------------------------------------------------------------------------------- run directory
def load_run_config(run_dir: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """The resolved configuration a run directory was started with (``RUN_DIR/config.yaml``).

    Raises:
        InputError: ``run_dir`` holds no ``config.yaml``.
    """
    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        raise InputError(run_dir, "not a run directory (no config.yaml): nothing to resume")
    return load_config(p, overrides)


def _versions() -> dict[str, str]:
    import lightning
    import monai
    import torch
    import torchvision

    import endodistill

    return {
        "python": platform.python_version(),
        "endodistill": endodistill.__version__ if hasattr(endodistill, "__version__") else "unknown",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "monai": monai.__version__,
        "lightning": lightning.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def _input_hashes(files: list[Path], base: Path) -> dict[str, str]:
    from endodistill.data.cache import content_hash

    out = {}
    for f in files:
        try:
            key = str(Path(f).relative_to(base))
        except ValueError:
            key = str(f)
        # content_hash is file_sha256 memoised in this process: the cache has just hashed these files.
        out[key] = content_hash(f)
    return out


def _comparable(cfg: Config) -> dict[str, Any]:
    # Hardware settings may change between an interrupted run and its resumption.
    d = cfg.model_dump(mode="json")
    d.pop("trainer", None)
    d.get("data", {}).pop("cache_dir", None)
    return d


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _run_relative(path: Path, run_dir: Path) -> Path:
    # A cohort generated inside the run directory is recorded relative to it (config.yaml resolves it
    # against its own folder): the run directory can move, and results.json does not depend on where it is.
    try:
        return Path(path).resolve().relative_to(Path(run_dir).resolve())
    except ValueError:
        return Path(path)


def manifest_path(cfg: Config, run_dir: str | Path) -> Path:
    """The absolute manifest of a run (``cfg.data.manifest`` may be relative to the run directory)."""
    if cfg.data.manifest is None:
        raise InputError(run_dir, "no manifest in the configuration")
    m = Path(cfg.data.manifest)
    return m if m.is_absolute() else Path(run_dir) / m


def _start_run(cfg: Config, run_dir: Path, resume: bool) -> Config:
    """Resolve the manifest, check/save config.yaml; a resumed run must have the same configuration."""
    from endodistill.train.data import ensure_manifest

    cfg = cfg.model_copy(deep=True)
    saved = run_dir / "config.yaml"
    if saved.is_file() and not resume:
        raise InputError(
            run_dir, "already holds a run: continue it with --resume, or choose another output directory"
        )
    if saved.is_file() and cfg.data.manifest is None:
        # A resumed demo: the cohort was generated into the run directory the first time.
        prev = load_config(saved)
        if prev.data.manifest is not None and Path(prev.data.manifest).is_file():
            cfg.data.manifest = prev.data.manifest
    cfg.data.manifest = _run_relative(ensure_manifest(cfg, run_dir / "cohort"), run_dir)
    if saved.is_file():
        prev = load_config(saved)
        if prev.data.manifest is not None:
            prev.data.manifest = _run_relative(prev.data.manifest, run_dir)
        diff = _diff(_comparable(prev), _comparable(cfg))
        if diff:
            raise ConfigError(
                saved,
                f"the run was started with another configuration ({', '.join(diff[:5])} differ): cannot resume",
            )
    else:
        atomic_write_text(saved, dump_config(cfg))
    return cfg


def _record_run(cfg: Config, run_dir: Path, files: list[Path]) -> None:
    """run.json: versions, seed, hashes of every input; on resume the inputs must be unchanged."""
    path = run_dir / "run.json"
    base = manifest_path(cfg, run_dir).parent
    hashes = _input_hashes(files, base)
    if path.is_file():
        try:
            prev = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            prev = {}
        old = prev.get("inputs", {})
        changed = sorted(k for k in set(old) | set(hashes) if old.get(k) != hashes.get(k))
        if old and changed:
            raise InputError(
                base / changed[0],
                f"input file changed since the run started ({len(changed)} changed): cannot resume",
            )
        return
    atomic_write_json(
        path,
        {
            "seed": cfg.seed,
            "versions": _versions(),
            "manifest": str(manifest_path(cfg, run_dir)),
            "inputs": hashes,
            "command": " ".join(sys.argv),
        },
    )


def _splits(cfg: Config, run_dir: Path, subjects: list[str], labels: list[int]) -> list[dict[str, list[str]]]:
    """Build splits.json (stratified by subject), or reuse and check the one present."""
    from endodistill.data.splits import check_splits_subjects, load_splits, make_cv_splits, save_splits

    path = run_dir / "splits.json"
    if path.is_file():
        splits = load_splits(path)
        check_splits_subjects(splits, subjects, path)
        tested = [s for fold in splits for s in fold["test"]]
        missing = sorted(set(subjects) - set(tested))
        if missing:
            raise InputError(path, f"subject {missing[0]!r} is in no test fold ({len(missing)} missing)")
        return splits
    splits = make_cv_splits(subjects, labels, cfg.protocol.folds, cfg.seed, cfg.finetune.val_fraction)
    save_splits(path, splits)
    return splits


# ------------------------------------------------------------------------------------------------ units
def _mae_encoder(
    cfg: Config,
    data: Any,
    run_dir: Path,
    fold: int | None,
    train_subjects: list[str],
    resume: bool,
    echo: Callable[[str], None],
) -> Path:
    from endodistill.train.common import fit_seed
    from endodistill.train.pretrain import mae_unit, pretrain_mae

    unit = mae_unit(cfg, fold)
    labelled = train_subjects if cfg.mae.use_labelled_train else []
    seed = fit_seed(cfg.seed, "mae", None if unit == "mae" else fold, unit)
    pretrain_mae(cfg, data, run_dir / unit, seed, resume, labelled, echo)
    return run_dir / unit / "encoder.safetensors"


def _mae_diagnostic(
    cfg: Config,
    data: Any,
    run_dir: Path,
    splits: list[dict[str, list[str]]],
    encoder: Path | None,
    resume: bool,
) -> dict[str, Any] | None:
    """The MAE's linear probe against the same encoder before pre-training (``mae/probe.json``).

    Only for the shared MAE (``mae.use_labelled_train`` trains one per fold, each seeing its fold's training
    volumes: a probe of one of them on every fold would leak); binary tasks only.
    """
    if encoder is None or cfg.task.num_classes != 2:
        return None
    from endodistill.train.common import fit_seed, read_done
    from endodistill.train.probe import mae_probe

    path = run_dir / "mae" / "probe.json"
    if resume and path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            pass
    t0 = time.perf_counter()
    lab = data.labelled
    y = (lab.labels == cfg.task.positive_class).astype(np.int64)
    folds = [lab.index(f["test"]) for f in splits]
    info = mae_probe(cfg, lab.x, y, folds, encoder, fit_seed(cfg.seed, "mae", None, "mae"))
    done = read_done(run_dir / "mae") or {}
    info.update(
        n_volumes=done.get("n_volumes"),
        loss_first=done.get("loss_first"),
        loss_last=done.get("loss_last"),
    )
    atomic_write_json(path, info)
    seconds = time.perf_counter() - t0
    lo, hi = info["probe_auc_ci95"]
    rlo, rhi = info["random_probe_auc_ci95"]
    _echo(
        f"[mae] linear probe AUC {info['probe_auc']:.3f} [{lo:.3f}, {hi:.3f}] vs the same encoder before "
        f"pre-training {info['random_probe_auc']:.3f} [{rlo:.3f}, {rhi:.3f}] ({seconds:.1f} s)"
    )
    return info


def _needs_mae(cfg: Config, methods: list[str]) -> bool:
    return cfg.mae.enabled and any(cfg.protocol.methods[m].init == "mae" for m in methods)


def _check_mae_config(cfg: Config) -> None:
    if not cfg.mae.enabled and any(m.init == "mae" for m in cfg.protocol.methods.values()):
        bad = [n for n, m in cfg.protocol.methods.items() if m.init == "mae"]
        raise ConfigError(
            "mae.enabled", f"is false but method(s) {', '.join(bad)} start from the MAE encoder"
        )


def _oof_rows(
    cfg: Config, splits: list[dict[str, list[str]]], methods: list[str], run_dir: Path
) -> list[dict[str, Any]]:
    from endodistill.train.finetune import read_predictions

    pos = cfg.task.positive_class
    rows = []
    for m in methods:
        for f in range(len(splits)):
            subjects, labels, probs = read_predictions(
                run_dir / "folds" / f"fold_{f}" / m / "predictions.csv"
            )
            for s, y, p in zip(subjects, labels, probs):
                row: dict[str, Any] = {
                    "subject_id": s,
                    "fold": f,
                    "method": m,
                    "label": int(y),
                    "prob": float(p[pos]),
                }
                if probs.shape[1] > 2:
                    row.update({f"prob_{c}": float(v) for c, v in enumerate(p)})
                rows.append(row)
    return rows


def _write_oof(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(rows[0].keys()) if rows else ["subject_id", "fold", "method", "label", "prob"]
    atomic_write_csv(path, rows, fields)


def _method_metrics(cfg: Config, rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    from endodistill.evaluate.stats import summarise_method

    out: dict[str, Any] = {}
    k = cfg.task.num_classes
    for m in methods:
        mrows = [r for r in rows if r["method"] == m]
        if k == 2:
            binary = [{**r, "label": int(r["label"] == cfg.task.positive_class)} for r in mrows]
            out[m] = summarise_method(binary, m, cfg.protocol.high_sensitivity)
        else:
            from endodistill.evaluate.metrics import multiclass_auc

            y = np.array([r["label"] for r in mrows])
            p = np.array([[r[f"prob_{c}"] for c in range(k)] for r in mrows])
            mc = multiclass_auc(y, p)
            folds = sorted({r["fold"] for r in mrows})
            fold_aucs = []
            for f in folds:
                sel = [i for i, r in enumerate(mrows) if r["fold"] == f]
                fold_aucs.append(multiclass_auc(y[sel], p[sel])["macro"])
            defined = [a for a in fold_aucs if np.isfinite(a)]
            out[m] = {
                "auc": mc["macro"],
                "per_class_auc": mc["per_class"],
                "fold_aucs": fold_aucs,
                "fold_auc_mean": float(np.mean(defined)) if defined else float("nan"),
                "fold_auc_std": float(np.std(defined, ddof=1)) if len(defined) > 1 else float("nan"),
                "n": len(mrows),
            }
    return out


def _comparisons(cfg: Config, rows: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    from endodistill.evaluate.stats import compare_methods

    if cfg.task.num_classes != 2 or len(methods) < 2:
        return []
    reference = "scratch_ce" if "scratch_ce" in methods else methods[0]
    binary = [{**r, "label": int(r["label"] == cfg.task.positive_class)} for r in rows]
    try:
        return compare_methods(binary, reference=reference, full=cfg.protocol.full_method, correction="holm")
    except ValueError as e:
        log.warning("paired comparisons skipped: %s", e)
        return []


def write_examples(cfg: Config, data: Any, run_dir: Path) -> list[Path]:
    """A central sagittal MRI slice and a middle TVUS frame of one subject of each class (preprocessed)."""
    from matplotlib.figure import Figure

    out_dir = run_dir / "examples"
    written = []
    names = cfg.task.class_names

    def save(img: np.ndarray, title: str, name: str, origin: str) -> None:
        fig = Figure(figsize=(2.6, 2.6), dpi=80)
        ax = fig.add_subplot()
        ax.imshow(img, cmap="gray", origin=origin)
        ax.set_title(title, fontsize=7)
        ax.axis("off")
        path = out_dir / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
        written.append(path)

    for k in range(cfg.task.num_classes):
        idx = np.flatnonzero(data.labelled.labels == k)
        if idx.size:
            i = int(idx[0])
            vol = data.labelled.x[i, 0].numpy()
            # Model space is RAS: axis 0 runs left -> right, so its middle index is the mid-sagittal slice;
            # transposed so that superior is up and anterior to the right.
            sl = vol[vol.shape[0] // 2].T
            s = data.labelled.subjects[i]
            save(
                sl,
                f"{cfg.task.student_modality} {s}: {names[k]}",
                f"{cfg.task.student_modality}_class{k}_{s}.png",
                "lower",
            )
        idx = np.flatnonzero(data.tvus.labels == k)
        if idx.size:
            i = int(idx[0])
            clip = data.tvus.clips[i]
            s = data.tvus.subjects[i]
            save(
                clip[clip.shape[0] // 2],
                f"{cfg.task.teacher_modality} {s}: {names[k]}",
                f"{cfg.task.teacher_modality}_class{k}_{s}.png",
                "upper",
            )
    return written


# ------------------------------------------------------------------------------------------- experiment
def run_experiment(cfg: Config, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the whole experiment into ``run_dir``; returns the content of ``results.json``.

    With ``trainer.spread_fits`` in processes started by torchrun, the cross-validation fits are spread over
    the processes (see :mod:`endodistill.evaluate.spread`): rank 0 returns ``results.json`` as usual, the
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
    from endodistill.evaluate.spread import start_spread

    spread = start_spread(cfg)  # None unless trainer.spread_fits and several torchrun processes
    if spread is not None:
        with spread:
            if spread.rank != 0:
                # Not locked (rank 0 holds the run's lock) and no scratch mirror: this rank writes only
                # the unit directories of its own fits, which no other process writes.
                return _spread_fits(cfg, Path(run_dir), resume, spread)
            return _locked_run(cfg, Path(run_dir), resume, spread)

    from endodistill.train.common import rank_run_dir

    # Under DDP only rank 0 writes run_dir; the other ranks run the same units in a scratch copy.
    with rank_run_dir(run_dir, mirror=resume) as run_dir:
        return _locked_run(cfg, run_dir, resume, None)


def _locked_run(cfg: Config, run_dir: Path, resume: bool, spread: Spread | None) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        try:
            return _run_experiment(cfg, run_dir, resume, spread)
        except KeyboardInterrupt:
            _echo(f"interrupted: continue with `endodistill run --resume {run_dir}`")
            raise


def _fit_list(splits: list[Any], methods: list[str]) -> list[tuple[int, str]]:
    """The cross-validation fits in the order of the loop (fold-major); fit ``i`` is rank ``i % N``'s."""
    return [(f, m) for f in range(len(splits)) for m in methods]


def _unit_name(fold: int, method: str) -> str:
    return f"fold_{fold}/{method}"


def _fit_done(unit: Path) -> bool:
    """Whether ``finetune(..., resume=True)`` will reuse this unit instead of training it."""
    from endodistill.train.common import read_done

    return read_done(unit) is not None and (unit / "model.safetensors").is_file()


def _cv_fit(
    cfg: Config,
    data: Any,
    teacher: Any,
    splits: list[dict[str, list[str]]],
    fold: int,
    method: str,
    run_dir: Path,
    resume: bool,
    encoder: Path | None,
    progress: _FitProgress,
    tag: str = "",
) -> dict[str, Any]:
    """One fold x method fit into ``folds/fold_K/METHOD`` (same unit, seed and inputs in every mode)."""
    from endodistill.train.common import fit_seed
    from endodistill.train.finetune import finetune
    from endodistill.train.joint import clip_folds, is_joint, joint_fit

    t1 = time.perf_counter()
    unit = run_dir / "folds" / f"fold_{fold}" / method
    reused = resume and _fit_done(unit)
    seed = fit_seed(cfg.seed, "distill", fold)
    enc = encoder if cfg.protocol.methods[method].init == "mae" else None
    extra = ""
    if is_joint(cfg, method):
        from endodistill.evaluate.fmt import fmt_auc

        # The same MRI split and fold seed as every method; fold k also holds out the k-th clip fold.
        where = f"joint fold {fold} {method}"
        info = joint_fit(
            cfg, method, data, splits[fold], clip_folds(cfg, data)[fold], unit, seed, where, resume, enc
        )
        extra = f"{cfg.task.teacher_modality} test AUC {fmt_auc(info.get('tvus_test_auc'))}; "
    else:
        where = f"distill fold {fold} {method}"
        info = finetune(cfg, method, data, teacher, splits[fold], unit, seed, where, resume, enc)
    dt = time.perf_counter() - t1
    progress.done(
        f"[fold {fold + 1}/{len(splits)}] {method}: {extra}{_fit_result(info, dt, reused)}", dt, reused, tag
    )
    return info


def _spread_share(
    cfg: Config,
    data: Any,
    teacher: Any,
    splits: list[dict[str, list[str]]],
    methods: list[str],
    run_dir: Path,
    resume: bool,
    encoder_of: Callable[[int], Path | None],
    spread: Spread,
) -> None:
    """Run this rank's share of the fits, then record what it trained and arrive at the ``fits`` barrier."""
    trained, skipped = [], []
    fits = _fit_list(splits, methods)
    progress = _FitProgress(sum(1 for i in range(len(fits)) if spread.owns(i)), f"rank {spread.rank} fits")
    try:
        for i, (f, m) in enumerate(fits):
            if not spread.owns(i):
                continue
            spread.check_abort()  # another rank failed: stop at this fit boundary
            unit = run_dir / "folds" / f"fold_{f}" / m
            (skipped if resume and _fit_done(unit) else trained).append(_unit_name(f, m))
            tag = f" (rank {spread.rank})"
            _cv_fit(cfg, data, teacher, splits, f, m, run_dir, resume, encoder_of(f), progress, tag)
    finally:
        progress.close()
    spread.set(f"trained/{spread.rank}", json.dumps({"trained": trained, "skipped": skipped}))
    spread.arrive("fits")


def _spread_fits(cfg: Config, run_dir: Path, resume: bool, spread: Spread) -> dict[str, Any]:
    """A rank other than 0: wait for rank 0's teacher and MAE, load them from the run directory, run its fits."""
    from endodistill.train.common import configure_torch
    from endodistill.train.data import load_cohort
    from endodistill.train.pretrain import mae_unit
    from endodistill.train.teacher import load_teacher_outputs

    _check_mae_config(cfg)
    configure_torch(cfg)
    spread.wait("ready", ranks=[0])  # as long as rank 0 is alive: the teacher may train for hours
    saved = load_config(run_dir / "config.yaml")
    # Rank 0 resolved the manifest (possibly a cohort it generated into the run directory) and checked that a
    # resumed run has the same configuration; the fits read the manifest from config.yaml.
    cfg = cfg.model_copy(deep=True)
    cfg.data.manifest = saved.data.manifest
    data = load_cohort(cfg, manifest_path(cfg, run_dir))
    lab = data.labelled
    splits = _splits(cfg, run_dir, lab.subjects, lab.labels.tolist())
    teacher = load_teacher_outputs(run_dir)
    methods = list(cfg.protocol.methods)

    def encoder_of(fold: int) -> Path | None:
        if not _needs_mae(cfg, methods):
            return None
        path = run_dir / mae_unit(cfg, fold) / "encoder.safetensors"
        if not path.is_file():
            raise InputError(path, "MAE encoder missing: rank 0 should have trained it before the fits")
        return path

    _spread_share(cfg, data, teacher, splits, methods, run_dir, resume, encoder_of, spread)
    done = json.loads(spread.get(f"trained/{spread.rank}"))
    print(
        f"[rank {spread.rank}/{spread.world}] trained {len(done['trained'])} fits, "
        f"{len(done['skipped'])} already done; rank 0 gathers the results",
        flush=True,
    )
    return {"rank": spread.rank, **done}


def _run_experiment(cfg: Config, run_dir: Path, resume: bool, spread: Spread | None = None) -> dict[str, Any]:
    from endodistill.train.common import configure_torch
    from endodistill.train.data import load_cohort

    t_start = time.perf_counter()
    _check_mae_config(cfg)
    configure_torch(cfg)
    t0 = time.perf_counter()
    cfg = _start_run(cfg, run_dir, resume)
    data = load_cohort(cfg, manifest_path(cfg, run_dir))
    _record_run(cfg, run_dir, data.files)
    atomic_write_json(run_dir / FINGERPRINT_FILE, data.fingerprint)
    lab = data.labelled
    splits = _splits(cfg, run_dir, lab.subjects, lab.labels.tolist())
    t_data = time.perf_counter() - t0
    _echo(
        f"[data] {len(lab)} labelled + {len(data.unlabelled)} unlabelled {cfg.task.student_modality}, "
        f"{len(data.tvus)} {cfg.task.teacher_modality} clips, {len(splits)} folds ({t_data:.1f} s)"
    )

    methods = list(cfg.protocol.methods)
    # One progress over the whole run (rank 0 of a spread run counts its own fits in the spread bar).
    run_progress = _FitProgress(
        [u for u in _run_units(cfg, data, len(splits), methods) if spread is None or u[0] != "fit"],
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
    progress: _FitProgress,
    t_start: float,
    t_data: float,
) -> dict[str, Any]:
    """The run after its data: teacher, MAE, the fits, the final model, baselines, results and report."""
    from endodistill.evaluate.stats import nan_to_none
    from endodistill.train.common import fault_point
    from endodistill.train.teacher import load_teacher_outputs, train_teacher

    t1 = time.perf_counter()
    reused = resume and (run_dir / "teacher" / "done.json").is_file()
    teacher_metrics = train_teacher(cfg, data, run_dir, resume, _echo)
    teacher = load_teacher_outputs(run_dir)
    teacher_model = _teacher_model(cfg, run_dir, teacher_metrics, data.fingerprint, resume)
    progress.stage("teacher", time.perf_counter() - t1, reused)

    shared_encoder: Path | None = None
    if _needs_mae(cfg, methods) and not cfg.mae.use_labelled_train:
        t1 = time.perf_counter()
        reused = resume and (run_dir / "mae" / "done.json").is_file()
        shared_encoder = _mae_encoder(cfg, data, run_dir, None, [], resume, _echo)
        progress.stage("mae", time.perf_counter() - t1, reused)
    t_probe = time.perf_counter()
    mae_info = _mae_diagnostic(cfg, data, run_dir, splits, shared_encoder, resume)
    t_probe = time.perf_counter() - t_probe
    fold_encoders: dict[int, Path | None] = {}

    def encoder_of(f: int) -> Path | None:
        # Per-fold MAE encoders (mae.use_labelled_train) are trained when their fold is first reached.
        if f not in fold_encoders:
            enc = shared_encoder
            if enc is None and _needs_mae(cfg, methods):
                enc = _mae_encoder(cfg, data, run_dir, f, splits[f]["train"], resume, _echo)
            fold_encoders[f] = enc
        return fold_encoders[f]

    k = len(splits)
    spread_info: dict[str, Any] = {"processes": 1}
    if spread is None:
        for f, m in _fit_list(splits, methods):
            _cv_fit(cfg, data, teacher, splits, f, m, run_dir, resume, encoder_of(f), progress)
    else:
        for f in range(k):  # every encoder before the others start: they only read them
            encoder_of(f)
        spread.arrive("ready")
        _echo(
            f"[spread] {k * len(methods)} fits over {spread.world} processes (fit i on rank i % {spread.world})"
        )
        _spread_share(cfg, data, teacher, splits, methods, run_dir, resume, encoder_of, spread)
        spread.wait("fits")
        by_rank = {str(r): json.loads(spread.get(f"trained/{r}")) for r in range(spread.world)}
        spread_info = {
            "processes": spread.world,
            "engine": "torchrun",
            "assignment": f"round robin: fit i of the fold x method loop on rank i % {spread.world}",
            "trained_by_rank": {r: v["trained"] for r, v in by_rank.items()},
            "skipped_by_rank": {r: v["skipped"] for r, v in by_rank.items()},
        }

    rows = _oof_rows(cfg, splits, methods, run_dir)
    _write_oof(run_dir / "oof_predictions.csv", rows)
    method_metrics = _method_metrics(cfg, rows, methods)
    comparisons = _comparisons(cfg, rows, methods)
    from endodistill.train.joint import tvus_summary

    # Joint methods: their TVUS out-of-fold predictions on the clip folds, next to the teacher's.
    tvus, tvus_rows = tvus_summary(cfg, methods, k, run_dir, teacher_metrics)
    if tvus is not None:
        fields = ["subject_id", "fold", "method", "label", "prob", "path"]
        atomic_write_csv(run_dir / "oof_tvus_predictions.csv", tvus_rows, fields)
        for m, tm in tvus["methods"].items():
            _echo(
                f"[{m}] {cfg.task.teacher_modality} out-of-fold AUC {_fmt(tm.get('auc'))} over "
                f"{tm.get('n')} clips (teacher {_fmt(tvus.get('teacher_auc'))})"
            )

    final: dict[str, Any] | None = None
    if cfg.protocol.final_model:
        t1 = time.perf_counter()
        reused = resume and (run_dir / "model" / "metadata.json").is_file()
        final = _final_model(
            cfg, data, teacher, run_dir, method_metrics, teacher_metrics, shared_encoder, resume, tvus
        )
        progress.stage("final", time.perf_counter() - t1, reused)

    timings, fits = _timings(run_dir, splits, methods, t_data)
    if mae_info is not None:
        timings["mae_probe"] = round(t_probe, 3)
    results = {
        "methods": method_metrics,
        "teacher": teacher_metrics,
        "mae": mae_info,
        "comparisons": comparisons,
        "cohort": {**data.cohort, "manifest": str(cfg.data.manifest)},
        "config": cfg.model_dump(mode="json"),
        "seed": cfg.seed,
        "folds": k,
        "reference": "scratch_ce" if "scratch_ce" in methods else methods[0],
        "full_method": cfg.protocol.full_method,
        "correction": "holm",
        "final_model": final,
        "teacher_model": teacher_model,
        "timings": timings,
        # Processes the cross-validation fits were spread over (trainer.spread_fits under torchrun); the
        # stage timings above are sums of the fits' own times, not wall-clock time.
        "fit_processes": spread_info["processes"],
    }
    if tvus is not None:
        results["tvus"] = tvus
    # --- reference baselines (endodistill.train.baselines): same folds and statistics, apart from the methods
    if cfg.baselines.enabled:
        from endodistill.train.baselines import run_baselines

        t1 = time.perf_counter()
        reused = resume and (run_dir / "baselines" / "done.json").is_file()
        baselines, baseline_seconds = run_baselines(cfg, data, splits, run_dir, resume, rows, _echo)
        progress.stage("baselines", time.perf_counter() - t1, reused)
        if baselines:
            results["baselines"] = baselines
            results["timings"].update(baseline_seconds)  # in "timings": the only key reruns may change
    # --- end of reference baselines
    results = nan_to_none(results)
    # Not key-sorted: methods keep the configuration's order (the ablation table's row order).
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2, default=_plain) + "\n")
    step = sum(v.get("step", 0.0) for v in fits.values() if isinstance(v, dict))
    wall_fits = sum(v.get("wall", 0.0) for v in fits.values() if isinstance(v, dict))
    atomic_write_json(
        run_dir / "timings.json",
        {
            "stages": timings,
            "fits": fits,
            "step_seconds": round(step, 3),
            "fit_wall_seconds": round(wall_fits, 3),
            "overhead": round(wall_fits / step, 3) if step > 0 else None,
            "this_process_wall_seconds": round(time.perf_counter() - t_start, 3),
            "spread": spread_info,
        },
    )
    write_examples(cfg, data, run_dir)
    from endodistill.evaluate.fmt import fmt_seconds
    from endodistill.report import format_ablation_table, write_report

    fault_point("report")  # test-only (no-op unless $ENDODISTILL_TEST_KILL_AT is set)
    html, _md = write_report(run_dir)
    _echo("")
    _echo(format_ablation_table(results))
    t_total = sum(timings.values())
    _echo(f"\nteacher AUC {_fmt(teacher_metrics.get('auc'))}; report: {html}; total {fmt_seconds(t_total)}")
    return results


def _plain(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray | Path):
        return obj.tolist() if isinstance(obj, np.ndarray) else str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _fmt(v: Any) -> str:
    from endodistill.evaluate.fmt import fmt_auc

    return fmt_auc(v)


def _teacher_model(
    cfg: Config, run_dir: Path, metrics: dict[str, Any], fingerprint: dict[str, Any], resume: bool
) -> dict[str, Any] | None:
    """Write the deployable TVUS teacher ``RUN_DIR/teacher_model`` (with the final model's switch)."""
    from endodistill.infer.model_dir import METADATA_FILE
    from endodistill.infer.teacher_model import save_teacher_model, teacher_member_dirs

    if not cfg.protocol.final_model:
        return None
    out = run_dir / "teacher_model"
    members = teacher_member_dirs(run_dir)
    fresh = not (resume and (out / METADATA_FILE).is_file())
    if fresh and save_teacher_model(cfg, run_dir, metrics, fingerprint, out) is None:
        return None
    meta = json.loads((out / METADATA_FILE).read_text(encoding="utf-8"))
    _echo(
        f"[teacher model] {len(members)} network(s) ({', '.join(m.name for m in members)}), "
        f"threshold {meta['threshold']:.3f} -> {out.name}/"
    )
    return {"path": out.name, "members": [m.name for m in members], "threshold": meta["threshold"]}


def _final_model(
    cfg: Config,
    data: Any,
    teacher: Any,
    run_dir: Path,
    method_metrics: dict[str, Any],
    teacher_metrics: dict[str, Any],
    shared_encoder: Path | None,
    resume: bool,
    tvus: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the deployed method (``protocol.final_method``, else the full method) on all labelled MRI
    (inner validation split for selection; a joint method also on all labelled clips) and save RUN_DIR/model."""
    from endodistill.data.splits import inner_val_split
    from endodistill.infer.model_dir import save_model_dir
    from endodistill.train.common import fit_seed, load_weights
    from endodistill.train.finetune import finetune
    from endodistill.train.joint import is_joint, joint_fit

    m = cfg.protocol.deployed_method
    joint = is_joint(cfg, m)
    lab = data.labelled
    train, val = inner_val_split(lab.subjects, lab.labels.tolist(), cfg.finetune.val_fraction, cfg.seed)
    encoder = shared_encoder
    if cfg.protocol.methods[m].init == "mae" and encoder is None:
        encoder = _mae_encoder(cfg, data, run_dir, None, train, resume, _echo)
    t1 = time.perf_counter()
    split = {"train": train, "val": val, "test": []}
    encoder = encoder if cfg.protocol.methods[m].init == "mae" else None
    seed = fit_seed(cfg.seed, "final")
    if joint:
        info = joint_fit(
            cfg, m, data, split, [], run_dir / "final", seed, f"final model {m}", resume, encoder
        )
    else:
        info = finetune(
            cfg, m, data, teacher, split, run_dir / "final", seed, f"final model {m}", resume, encoder
        )
    summary = method_metrics.get(m, {})
    threshold = _youden_or_half(summary)
    extra: dict[str, Any] = {}
    if joint:
        tsum = ((tvus or {}).get("methods") or {}).get(m, {})
        extra["tvus_threshold"] = _youden_or_half(tsum)
    model_dir = run_dir / "model"
    if not (resume and model_dir.is_dir() and (model_dir / "metadata.json").is_file()):
        metrics = {
            "method": m,
            "cross_validation": {
                k: summary.get(k)
                for k in (
                    "auc",
                    "auc_ci95",
                    "fold_auc_mean",
                    "fold_auc_std",
                    "youden",
                    "high_sensitivity",
                    "brier",
                    "ece",
                )
            },
            "teacher_auc": teacher_metrics.get("auc"),
            "threshold_source": "Youden on out-of-fold predictions"
            if (summary.get("youden") or {}).get("threshold") is not None
            else "default 0.5",
            "final_val_auc": info.get("val_auc"),
        }
        if joint:
            tsum = ((tvus or {}).get("methods") or {}).get(m, {})
            metrics["tvus_cross_validation"] = {
                k: tsum.get(k) for k in ("auc", "auc_ci95", "fold_aucs", "youden", "n")
            }
            metrics["tvus_threshold_source"] = "Youden on the clips' out-of-fold predictions"
        save_model_dir(
            model_dir,
            load_weights(run_dir / "final" / "model.safetensors"),
            cfg,
            threshold,
            metrics,
            fingerprint=data.fingerprint,
            kind="joint" if joint else "student",
            **extra,
        )
    _echo(
        f"[final] {m} on {len(train)} + {len(val)} subjects, threshold {threshold:.3f} ({time.perf_counter() - t1:.1f} s)"
    )
    return {
        "method": m,
        "threshold": threshold,
        "val_auc": info.get("val_auc"),
        "best_epoch": info.get("best_epoch"),
        "path": "model",
    }


def _youden_or_half(summary: dict[str, Any]) -> float:
    youden = (summary.get("youden") or {}).get("threshold")
    threshold = float(youden) if youden is not None and np.isfinite(youden) else 0.5
    return min(1.0, max(0.0, threshold))


def _timings(
    run_dir: Path, splits: list[Any], methods: list[str], t_data: float
) -> tuple[dict[str, float], dict[str, Any]]:
    """Stage seconds and per-fit breakdowns from the units' done markers (also right after a resume)."""
    from endodistill.train.common import read_done

    fits: dict[str, Any] = {}

    def add(name: str, d: Path) -> float:
        info = read_done(d) or {}
        t = info.get("timing") or {}
        if "fits" in t:  # the teacher: several sub-fits
            for sub, st in (t["fits"] or {}).items():
                if st:
                    fits[f"{name}/{sub}"] = st
        elif t:
            fits[name] = t
        return float(t.get("wall", 0.0))

    stages = {"data": round(t_data, 3), "teacher": round(add("teacher", run_dir / "teacher"), 3)}
    mae = sum(
        add(str(p.parent.relative_to(run_dir)), p.parent) for p in sorted(run_dir.glob("mae/**/done.json"))
    )
    stages["mae"] = round(mae, 3)
    cv = 0.0
    for f in range(len(splits)):
        for m in methods:
            cv += add(f"fold_{f}/{m}", run_dir / "folds" / f"fold_{f}" / m)
    stages["cross_validation"] = round(cv, 3)
    if (run_dir / "final" / "done.json").is_file():
        stages["final_model"] = round(add("final", run_dir / "final"), 3)
    return stages, fits


# ------------------------------------------------------------------------------------------------ demo
def run_demo(cfg: Config, out: str | Path, resume: bool = False) -> dict[str, Any]:
    """Generate the demo cohort into ``OUT/cohort`` (or reuse it) and run the experiment into ``OUT``.

    Args:
        cfg: the demo configuration (``configs/demo.yaml``); a ``data.manifest`` in it is used as is.
        out: the run directory.
        resume: continue an interrupted demo.

    Returns:
        The content of ``results.json``.
    """
    return run_experiment(cfg, out, resume=resume)


# ------------------------------------------------------------------------------------------ one stage
def run_stage(
    cfg: Config,
    out: str | Path,
    stage: str,
    method: str = "mae_kd_ce",
    fold: int | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run one training stage on its own, writing into the run directory ``out``.

    Args:
        cfg: the configuration.
        out: the run directory (distill reads the teacher outputs and MAE encoder found there).
        stage: ``teacher``, ``pretrain`` or ``distill``.
        method: the method for ``distill``.
        fold: the fold for ``distill`` (0-based, as in ``splits.json`` and ``folds/fold_K``); None trains on all
            labelled subjects (with the inner validation split) into ``distill/METHOD``.
        resume: reuse a finished unit / continue from its last checkpoint.

    Returns:
        The stage's info.

    Raises:
        ConfigError: an unknown stage, method or fold.
        InputError: distill without teacher outputs, or without the MAE encoder for an MAE-initialised method.
    """
    if stage not in STAGES:
        raise ConfigError(stage, f"unknown stage (choose from {', '.join(STAGES)})")
    if stage == "distill" and method not in cfg.protocol.methods:
        raise ConfigError(method, f"unknown method (known: {', '.join(cfg.protocol.methods)})")
    from endodistill.train.common import rank_run_dir

    # Under DDP only rank 0 writes `out`; the other ranks work in a scratch copy of it (what they read).
    with rank_run_dir(out, mirror=True) as out:
        out.mkdir(parents=True, exist_ok=True)
        # A distill fit locks only its own unit, so fits of other folds/methods can run at the same time
        # (one per device, e.g. a SLURM array); `endodistill run --resume` then gathers them.
        with RunLock(_stage_lock_dir(out, stage, method, fold)):
            return _run_stage(cfg, out, stage, method, fold, resume)


def _stage_lock_dir(out: Path, stage: str, method: str, fold: int | None) -> Path:
    if stage != "distill":
        return out
    return out / "distill" / method if fold is None else out / "folds" / f"fold_{fold}" / method


def _run_stage(
    cfg: Config, out: Path, stage: str, method: str, fold: int | None, resume: bool
) -> dict[str, Any]:
    from endodistill.train.common import configure_torch, fit_seed
    from endodistill.train.data import load_cohort

    configure_torch(cfg)
    cfg = cfg.model_copy(deep=True)
    from endodistill.train.data import ensure_manifest

    saved = out / "config.yaml"
    if cfg.data.manifest is None and saved.is_file():
        prev = load_config(saved)
        if prev.data.manifest is not None:
            cfg.data.manifest = prev.data.manifest
    cfg.data.manifest = _run_relative(ensure_manifest(cfg, out / "cohort"), out)
    if not saved.is_file():
        atomic_write_text(saved, dump_config(cfg))
    data = load_cohort(cfg, manifest_path(cfg, out))
    if stage == "teacher":
        from endodistill.train.teacher import train_teacher

        return train_teacher(cfg, data, out, resume, _echo)
    if stage == "pretrain":
        from endodistill.train.pretrain import mae_unit, pretrain_mae

        train_subjects: list[str] = []
        if cfg.mae.use_labelled_train:
            splits = _splits(cfg, out, data.labelled.subjects, data.labelled.labels.tolist())
            if fold is not None:
                _check_fold(fold, splits)
                train_subjects = splits[fold]["train"]
            else:
                train_subjects = list(data.labelled.subjects)
        unit = mae_unit(cfg, fold)
        seed = fit_seed(cfg.seed, "mae", None if unit == "mae" else fold, unit)
        return pretrain_mae(cfg, data, out / unit, seed, resume, train_subjects, _echo)
    from endodistill.data.splits import inner_val_split
    from endodistill.train.finetune import finetune
    from endodistill.train.pretrain import mae_unit
    from endodistill.train.teacher import load_teacher_outputs

    teacher = load_teacher_outputs(out)
    if fold is None:
        lab = data.labelled
        train, val = inner_val_split(lab.subjects, lab.labels.tolist(), cfg.finetune.val_fraction, cfg.seed)
        split = {"train": train, "val": val, "test": []}
        unit, seed, where = out / "distill" / method, fit_seed(cfg.seed, "final"), f"distill {method}"
    else:
        splits = _splits(cfg, out, data.labelled.subjects, data.labelled.labels.tolist())
        _check_fold(fold, splits)
        split = splits[fold]
        unit, seed = out / "folds" / f"fold_{fold}" / method, fit_seed(cfg.seed, "distill", fold)
        where = f"distill fold {fold} {method}"
    encoder = None
    if cfg.protocol.methods[method].init == "mae":
        encoder = out / mae_unit(cfg, fold) / "encoder.safetensors"
        if not encoder.is_file():
            raise InputError(
                encoder,
                f"method '{method}' starts from the MAE encoder: run `endodistill train pretrain` first",
            )
    t1 = time.perf_counter()
    from endodistill.train.joint import clip_folds, is_joint, joint_fit

    reused = resume and _fit_done(unit)
    if is_joint(cfg, method):
        clip_test = [] if fold is None else clip_folds(cfg, data)[fold]
        info = joint_fit(cfg, method, data, split, clip_test, unit, seed, where, resume, encoder)
    else:
        info = finetune(cfg, method, data, teacher, split, unit, seed, where, resume, encoder)
    _echo(f"[{where}] {_fit_result(info, time.perf_counter() - t1, reused)}")
    return info


def _check_fold(fold: int, splits: list[Any]) -> None:
    if not 0 <= fold < len(splits):
        raise ConfigError("--fold", f"{fold} is not a fold of this run (0..{len(splits) - 1})")
