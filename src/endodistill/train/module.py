"""The base Lightning module of every stage: per-epoch re-seeding, divergence check, history, DDP loss share.

NaN/inf losses raise :class:`~endodistill.errors.TrainingDivergedError` naming stage, fold and step; the last
good ``last.ckpt`` (previous epoch end) is kept because nothing is saved on an exception.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from endodistill.config import Config
from endodistill.errors import TrainingDivergedError
from endodistill.train.batches import EpochSampler, PlannedBatches, set_rank
from endodistill.train.optim import warmup_cosine
from endodistill.train.runtime import fault_point
from endodistill.train.seeding import epoch_seed
from endodistill.train.speed import compile_if_enabled
from endodistill.train.trainer import TimingCallback


class StageModule(pl.LightningModule):
    """Common behaviour of the stage modules: per-epoch re-seeding, divergence check, history, timing.

    Every stage trains :meth:`network` with :meth:`optimiser` under a linear warm-up (10 % of the steps) and
    cosine decay per optimiser step; its batches learn this process's rank at ``setup``, and the network is
    compiled (``trainer.compile``) in ``configure_model``. A stage overrides :meth:`network`,
    :meth:`optimiser`, ``training_step`` and ``on_train_epoch_end``.

    Args:
        cfg: the run configuration.
        batches: the fit's training batches.
        total_steps: optimiser steps of the whole fit (for the LR schedule).
        hparams: plain (JSON-like) hyper-parameters saved in checkpoints and logs.
        seed: the fit's seed (:func:`~endodistill.train.seeding.fit_seed`).
        where: how errors name the fit, e.g. ``"distill fold 2 mae_kd_ce"``.
        timing: the fit's timing callback.
    """

    def __init__(
        self,
        cfg: Config,
        batches: PlannedBatches,
        total_steps: int,
        hparams: dict[str, Any],
        seed: int,
        where: str,
        timing: TimingCallback,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        self.cfg = cfg
        self.batches = batches
        self.total_steps = int(total_steps)
        self.seed = int(seed)
        self.where = where
        self.timing = timing
        self.history: list[dict[str, Any]] = []
        self._sums: dict[str, float] = {}
        self._count = 0
        self._share = 1.0

    def network(self) -> nn.Module:
        """The network this stage trains (compiled in :meth:`configure_model`)."""
        raise NotImplementedError

    def optimiser(self) -> torch.optim.Optimizer:
        """The stage's optimiser over :meth:`network` (:func:`~endodistill.train.optim.adamw`)."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        set_rank(self.batches, self.trainer)

    def configure_model(self) -> None:
        compile_if_enabled(self.network(), self.cfg, self.trainer.strategy.root_device)

    def configure_optimizers(self) -> Any:
        opt = self.optimiser()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.total_steps, 0.1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Under DDP a rank's share of an uneven global batch (see shard_batch); 1 in one process.
        share = batch.pop("share", None) if isinstance(batch, dict) else None
        self._share = 1.0 if share is None else float(share)
        if batch_idx == 0:
            # Seeded again at the first batch: a fit resumed from an epoch-end checkpoint creates the epoch's
            # DataLoader iterator (which draws from the global RNG) after on_train_epoch_start, a fresh one before.
            self._seed_epoch()

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        super().backward(loss * self._share if self._share != 1.0 else loss, *args, **kwargs)

    # -- RNG: each epoch starts from a seed that depends on (fit seed, epoch) only
    def on_train_epoch_start(self) -> None:
        # Lightning numbers sampler epochs by *processed* epochs, which lags by one after resuming from an
        # epoch-end checkpoint; the batches must follow the true epoch.
        sampler = getattr(self.trainer.train_dataloader, "sampler", None)
        if isinstance(sampler, EpochSampler):
            sampler.set_epoch(self.current_epoch)
        self._seed_epoch()
        self._sums, self._count = {}, 0
        fault_point(f"{self.where} epoch {self.current_epoch}")

    def _seed_epoch(self) -> None:
        s = epoch_seed(self.seed, self.current_epoch)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def check_loss(self, loss: Tensor) -> None:
        """Stop with a clear error when the loss is NaN or infinite.

        Raises:
            TrainingDivergedError: naming the fit, epoch and step; ``last.ckpt`` stays the previous epoch's.
        """
        if not bool(torch.isfinite(loss.detach())):
            cb = self.trainer.checkpoint_callback if self._trainer is not None else None
            every_s = getattr(cb, "every_s", 0.0)
            dirpath = getattr(cb, "dirpath", None)  # a ModelCheckpoint; Lightning types it as the base class
            last = Path(dirpath) / "last.ckpt" if dirpath else None
            if self.current_epoch == 0:
                kept = "no checkpoint was written (first epoch)"
            elif every_s <= 0:
                kept = "the last good checkpoint is the previous epoch's checkpoints/last.ckpt"
            elif last is not None and last.is_file():
                kept = (
                    "the last good checkpoint is checkpoints/last.ckpt, written at an earlier epoch end "
                    f"(one at most every {every_s:g} s: trainer.checkpoint_every_s)"
                )
            else:
                kept = f"no checkpoint was written yet (trainer.checkpoint_every_s={every_s:g})"
            raise TrainingDivergedError(
                f"{self.where}: loss became {float(loss.detach())} at step {self.global_step} "
                f"(epoch {self.current_epoch}); {kept}. Lower the learning rate or check the inputs."
            )

    def accumulate(self, n: int, **values: Tensor | float) -> None:
        """Add per-batch means (weighted by batch size ``n``) to the epoch's running sums."""
        for k, v in values.items():
            val = float(v.detach()) if isinstance(v, Tensor) else float(v)
            self._sums[k] = self._sums.get(k, 0.0) + val * n
        self._count += n

    def epoch_means(self) -> dict[str, float]:
        """The epoch's means of what :meth:`accumulate` collected (over every rank under DDP)."""
        sums, count = dict(self._sums), float(self._count)
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every rank calls this at its epoch end with the same keys: one all-reduce of sums and count.
            t = torch.tensor([*sums.values(), count], dtype=torch.float64, device=self.device)
            reduced: list[float] = self.trainer.strategy.reduce(t, reduce_op="sum").cpu().tolist()
            sums, count = dict(zip(sums, reduced[:-1])), reduced[-1]
        return {k: v / max(1.0, count) for k, v in sums.items()}

    def end_epoch(self, row: dict[str, Any]) -> None:
        """Record one history row (kept in checkpoints, so it survives resume) and log it once per epoch."""
        row = {"epoch": int(self.current_epoch), **row}
        self.history.append(row)
        numeric = {k: float(v) for k, v in row.items() if isinstance(v, int | float) and k != "epoch"}
        numeric = {k: v for k, v in numeric.items() if math.isfinite(v)}
        if numeric:
            self.log_dict(numeric, on_step=False, on_epoch=True, prog_bar=False, logger=True)

    def lr(self) -> float:
        """The current learning rate of the first parameter group."""
        opt = self.optimizers()
        optimizer: Any = opt.optimizer if hasattr(opt, "optimizer") else opt  # LightningOptimizer wraps it
        return float(optimizer.param_groups[0]["lr"])

    def extra_state(self) -> dict[str, Any]:
        """More state to keep in checkpoints (tensors and primitives only); subclasses extend it."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["endodistill"] = {"history": list(self.history), **self.extra_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("endodistill", {})
        self.history = list(state.get("history", []))
        self.load_extra_state(state)
