"""The fit template (``train/fit.py``): a new stage is one FitSpec and one StageModule, nothing else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from endodistill import rundir
from endodistill.config import Config, load_config
from endodistill.models.weights import load_weights, save_weights
from endodistill.train.batches import PlannedBatches
from endodistill.train.fit import HISTORY, FitPlan, FitSpec, run_fit
from endodistill.train.module import StageModule
from endodistill.train.optim import adamw, param_groups
from endodistill.train.seeding import seed_all
from endodistill.train.trainer import TimingCallback


class LineModule(StageModule):
    """Least squares of ``y = 3 x - 1`` with one linear unit."""

    def __init__(self, net: nn.Linear, **kw: Any) -> None:
        super().__init__(**kw)
        self.net = net

    def network(self) -> nn.Module:
        return self.net

    def optimiser(self) -> torch.optim.Optimizer:
        return adamw(param_groups(self.net, 0.0), lr=0.05)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = torch.nn.functional.mse_loss(self.net(batch["x"]), batch["y"])
        self.check_loss(loss)
        self.accumulate(int(batch["x"].shape[0]), train_loss=loss)
        return loss

    def on_train_epoch_end(self) -> None:
        self.end_epoch({**self.epoch_means(), "lr": self.lr()})


class LineFit(FitSpec):
    """A whole new stage: its data, network, module and outputs."""

    artefact = "line.safetensors"

    def __init__(self, cfg: Config, seed: int, epochs: int) -> None:
        self.cfg, self.seed, self.epochs = cfg, seed, epochs
        self.reused: dict[str, Any] | None = None
        self.after_calls = 0

    def reuse(self, unit_dir: Path, done: dict[str, Any]) -> None:
        self.reused = done

    def plan(self) -> FitPlan:
        x = torch.linspace(-1, 1, 32)[:, None]
        y = 3 * x - 1

        def make(idx: np.ndarray, rng: np.random.Generator, epoch: int) -> dict[str, Tensor]:
            it = torch.from_numpy(idx)
            return {"x": x[it], "y": y[it]}

        seed_all(self.seed)
        self.net = nn.Linear(1, 1)
        return FitPlan(PlannedBatches(32, 8, self.seed, make), self.epochs)

    def module(self, plan: FitPlan, timing: TimingCallback) -> StageModule:
        return LineModule(
            self.net,
            cfg=self.cfg,
            batches=plan.batches,
            total_steps=len(plan.batches) * plan.epochs,
            hparams={"stage": "line"},
            seed=self.seed,
            where="line",
            timing=timing,
        )

    def finish(self, unit_dir: Path, module: StageModule, timing: TimingCallback) -> dict[str, Any]:
        save_weights(unit_dir / self.artefact, module.network().state_dict())
        return {"seed": self.seed, "epochs": len(module.history)}

    def after(self, info: dict[str, Any]) -> None:
        self.after_calls += 1


@pytest.fixture
def cfg() -> Config:
    return load_config("tiny", {"trainer": {"threads": 1, "checkpoint_every_s": 0.0}})


def test_run_fit_owns_history_checkpoint_timing_and_done(cfg: Config, tmp_path: Path) -> None:
    spec = LineFit(cfg, seed=4, epochs=3)
    info = run_fit(tmp_path / "unit", spec, resume=False)
    unit = tmp_path / "unit"
    # The stage's own keys first, then the template's timing; done.json holds exactly what was returned,
    # plus the run-directory contract's schema_version.
    assert list(info) == ["seed", "epochs", "timing"] and info["epochs"] == 3
    on_disk = json.loads((unit / rundir.DONE).read_text())
    assert on_disk.pop("schema_version") == rundir.SCHEMA_VERSION
    assert on_disk == json.loads(json.dumps(info))
    assert info["timing"]["steps"] == 3 * 4 and info["timing"]["wall"] > 0
    rows = (unit / HISTORY).read_text().splitlines()
    assert rows[0] == "epoch,train_loss,lr" and [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2"]
    assert float(rows[-1].split(",")[1]) < float(rows[1].split(",")[1])  # it learns
    assert torch.load(unit / rundir.LAST_CKPT, weights_only=True)["epoch"] == 2
    assert set(load_weights(unit / "line.safetensors")) == {"weight", "bias"}
    assert spec.after_calls == 1 and spec.reused is None

    # Resumed: the finished unit is taken up through reuse(), nothing refitted, the same info returned.
    again = LineFit(cfg, seed=4, epochs=3)
    assert run_fit(unit, again, resume=True) == json.loads(json.dumps(info))
    assert again.reused is not None and again.after_calls == 0 and not hasattr(again, "net")

    # Without its artefact a done unit is refitted, to the same weights (the fit's seed decides all).
    (unit / "line.safetensors").unlink()
    third = LineFit(cfg, seed=4, epochs=3)
    run_fit(unit, third, resume=True)
    fresh = tmp_path / "fresh"
    run_fit(fresh, LineFit(cfg, seed=4, epochs=3), resume=False)
    assert (unit / "line.safetensors").read_bytes() == (fresh / "line.safetensors").read_bytes()
    assert (unit / HISTORY).read_text() == (fresh / HISTORY).read_text()
