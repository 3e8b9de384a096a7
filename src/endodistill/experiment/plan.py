"""The plan of a run: which fits it makes, their unit directories and their seeds, in one place.

Seeds are per fit (:func:`endodistill.train.seeding.fit_seed`), so a resumed or spread run gives the same
results. Within a fold every method uses the same seed (common random numbers: same batch order, pairing
draws and augmentations), so paired comparisons between methods measure the methods, not seed noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from endodistill import rundir
from endodistill.config import Config, ConfigError
from endodistill.train.joint import joint_epochs
from endodistill.train.seeding import fit_seed


@dataclass(frozen=True)
class CVFit:
    """One fold x method fit of the cross-validation."""

    index: int  # position in the fold-major loop (a spread run gives it to the rank fit_ranks names)
    fold: int
    method: str

    @property
    def name(self) -> str:
        """``fold_K/METHOD``."""
        return rundir.fit_name(self.fold, self.method)

    def unit(self, run_dir: Path) -> Path:
        """``RUN_DIR/folds/fold_K/METHOD``."""
        return rundir.fit_dir(run_dir, self.fold, self.method)


def cv_fits(n_folds: int, methods: list[str]) -> list[CVFit]:
    """The cross-validation fits in the order of the loop (fold-major)."""
    pairs = [(f, m) for f in range(n_folds) for m in methods]
    return [CVFit(i, f, m) for i, (f, m) in enumerate(pairs)]


# A joint epoch's time over a student epoch's: 6.1-6.3 s against 4.6 s per fit at the same epochs on the
# 2-core demo (session 7, bench_demo); it also trains on the fold's clips.
JOINT_EPOCH_COST = 1.35


def fit_cost(cfg: Config, method: str) -> float:
    """A fit's time in student fits: the joint model's by its epoch cost and ``joint.epochs``, else 1."""
    if cfg.protocol.methods[method].kind != "joint":
        return 1.0
    return JOINT_EPOCH_COST * joint_epochs(cfg) / cfg.finetune.epochs


def fit_ranks(cfg: Config, fits: list[CVFit], world: int) -> list[int]:
    """The rank of each fit of a spread run: longest first, each to the rank with the least work so far.

    Fits of equal cost get ``index % world`` (round robin); the joint model's fits are dealt out first, so
    they no longer all fall on one rank whenever the method count is a multiple of the world (six methods,
    two ranks). Fixed by the config alone, so every rank computes the same assignment.
    """
    costs = [fit_cost(cfg, f.method) for f in fits]
    load = [0.0] * world
    ranks = [0] * len(fits)
    for i in sorted(range(len(fits)), key=lambda i: -costs[i]):  # stable: equal costs keep their order
        r = min(range(world), key=lambda r: (load[r], r))
        ranks[i] = r
        load[r] += costs[i]
    return ranks


# -------------------------------------------------------------------------------------------------- seeds
def cv_seed(cfg: Config, fold: int) -> int:
    """The seed of every method's fit on fold ``fold`` (common random numbers within a fold)."""
    return fit_seed(cfg.seed, "distill", fold)


def final_seed(cfg: Config) -> int:
    """The seed of a fit on all labelled subjects (the final model, ``train distill`` without a fold)."""
    return fit_seed(cfg.seed, "final")


def mae_unit(cfg: Config, fold: int | None) -> str:
    """The MAE unit a fit uses: ``mae`` (shared), or ``mae/fold_K`` / ``mae/all`` with labelled training data."""
    return rundir.mae_unit_name(cfg.mae.use_labelled_train, fold)


def mae_seed(cfg: Config, fold: int | None) -> int:
    """The seed of the MAE unit that fold ``fold`` uses."""
    unit = mae_unit(cfg, fold)
    return fit_seed(cfg.seed, "mae", None if unit == rundir.MAE else fold, unit)


def probe_seed(cfg: Config) -> int:
    """The seed of the shared MAE's linear probe."""
    return fit_seed(cfg.seed, "mae", None, rundir.MAE)


# ------------------------------------------------------------------------------------------------ methods
def reference_method(methods: list[str]) -> str:
    """The method the others are compared with: ``scratch_ce`` when present, else the first."""
    return "scratch_ce" if "scratch_ce" in methods else methods[0]


def needs_mae(cfg: Config, methods: list[str]) -> bool:
    """Whether some method starts from the MAE encoder."""
    return cfg.mae.enabled and any(cfg.protocol.methods[m].init == "mae" for m in methods)


def check_mae_config(cfg: Config) -> None:
    """Refuse MAE-initialised methods with ``mae.enabled`` false.

    Raises:
        ConfigError: naming the methods.
    """
    if not cfg.mae.enabled and any(m.init == "mae" for m in cfg.protocol.methods.values()):
        bad = [n for n, m in cfg.protocol.methods.items() if m.init == "mae"]
        raise ConfigError(
            "mae.enabled", f"is false but method(s) {', '.join(bad)} start from the MAE encoder"
        )


def check_fold(fold: int, splits: list[Any]) -> None:
    """Raises ConfigError when ``fold`` is not a fold of ``splits``."""
    if not 0 <= fold < len(splits):
        raise ConfigError("--fold", f"{fold} is not a fold of this run (0..{len(splits) - 1})")


# ------------------------------------------------------------------------------------- progress weights
def _steps(n: float, batch: int, epochs: int) -> float:
    return float(epochs) * max(1.0, np.ceil(n / max(batch, 1)))


def run_units(cfg: Config, data: Any, k: int, methods: list[str]) -> list[tuple[str, float]]:
    """The run's units in order, each with its optimiser steps (the progress bar's plan)."""
    n_lab = len(data.labelled)
    n_train = n_lab * (k - 1) / k
    clips = int((data.tvus.labels >= 0).sum())
    t = cfg.teacher
    tk = t.folds if t.folds > 1 else 2
    units = [("teacher", tk * t.ensemble * _steps(clips * (tk - 1) / tk, t.batch_size, t.epochs))]
    if t.targets == "in_sample":
        units[0] = ("teacher", units[0][1] + _steps(clips, t.batch_size, t.epochs))
    if needs_mae(cfg, methods):
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
