"""The fit template every Lightning stage shares: done/resume, checkpoints, timing, history and ``done.json``.

A stage describes one fit as a :class:`FitSpec` (its inputs, network, batches, module and outputs);
:func:`run_fit` runs it in its unit directory::

    done.json + artefact on resume?  -> spec.reuse(unit_dir, done), return done
    spec.plan()                      -> check inputs, seed, build the network, plan the batches
    prepare_unit                     -> last.ckpt to resume from, or a clean directory
    spec.module(plan, timing)        -> the stage's StageModule
    make_trainer + fit               -> logs, checkpoints/last.ckpt, timing
    spec.finish(unit_dir, module, timing) -> weights, predictions; the done.json info
    history.csv, info["timing"], done.json (last), spec.after(info)

Adding a stage is one module: a :class:`~endodistill.train.module.StageModule` subclass and a
:class:`FitSpec` subclass.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from endodistill import rundir
from endodistill.config import Config
from endodistill.train.batches import PlannedBatches, make_loader
from endodistill.train.module import StageModule
from endodistill.train.trainer import TimingCallback, fit, make_trainer
from endodistill.train.units import prepare_unit, read_done, write_done
from endodistill.utils import atomic_write_csv

HISTORY = "history.csv"


@dataclass
class FitPlan:
    """What a stage prepared before its Trainer exists.

    Attributes:
        batches: the training batches.
        epochs: epochs of the fit.
    """

    batches: PlannedBatches
    epochs: int


class FitSpec(ABC):
    """One fit of a stage: the hooks :func:`run_fit` calls (see the module docstring for their order).

    Attributes:
        cfg: the run configuration (``cfg.trainer`` chooses the Trainer and the DataLoader).
        artefact: the file which, with ``done.json``, marks a finished unit that ``--resume`` reuses.
    """

    cfg: Config
    artefact: ClassVar[str] = rundir.WEIGHTS

    def reuse(self, unit_dir: Path, done: dict[str, Any]) -> None:
        """Take up a finished unit (e.g. load its weights); :func:`run_fit` then returns ``done``."""
        return None

    @abstractmethod
    def plan(self) -> FitPlan:
        """Check the inputs, seed, build the network and plan the batches (counted as ``prepare`` time)."""

    @abstractmethod
    def module(self, plan: FitPlan, timing: TimingCallback) -> StageModule:
        """The stage's Lightning module for ``plan``."""

    @abstractmethod
    def finish(self, unit_dir: Path, module: StageModule, timing: TimingCallback) -> dict[str, Any]:
        """Write the fit's outputs (weights, predictions) and return its ``done.json`` info (timing is added)."""

    def after(self, info: dict[str, Any]) -> None:
        """Called once the unit is marked done (a summary line, say)."""
        return None


def run_fit(unit_dir: str | Path, spec: FitSpec, resume: bool) -> dict[str, Any]:
    """Run one fit of ``spec`` in ``unit_dir`` (or take up the finished one on resume).

    Args:
        unit_dir: the fit's directory (checkpoints, logs, ``history.csv``, outputs, ``done.json``).
        spec: the stage's description of the fit.
        resume: reuse a finished unit / continue from ``checkpoints/last.ckpt``.

    Returns:
        The unit's ``done.json`` info, with ``timing`` (:meth:`TimingCallback.summary`) last.
    """
    unit_dir = Path(unit_dir)
    done = read_done(unit_dir) if resume else None
    if done is not None and (unit_dir / spec.artefact).is_file():
        spec.reuse(unit_dir, done)
        return done
    t0 = time.perf_counter()
    plan = spec.plan()
    ckpt = prepare_unit(unit_dir, resume)
    timing = TimingCallback()
    module = spec.module(plan, timing)
    trainer = make_trainer(spec.cfg, unit_dir, plan.epochs, timing)
    fit(trainer, module, make_loader(plan.batches, spec.cfg), ckpt)
    info = spec.finish(unit_dir, module, timing)
    write_history(unit_dir / HISTORY, module.history)
    info["timing"] = timing.summary(time.perf_counter() - t0)
    write_done(unit_dir, info)
    spec.after(info)
    return info


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """Write a fit's per-epoch history as CSV (atomic), the training curves the report draws."""
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    atomic_write_csv(path, history, keys, cell=_fmt)


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ""
    return "" if v is None else v
