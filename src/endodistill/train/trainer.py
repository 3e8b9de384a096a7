"""The Lightning ``Trainer`` of one fit and its callbacks (timing, interval checkpoints, Ctrl-C, progress bar).

* :func:`make_trainer`: one ``lightning.pytorch.Trainer`` factory from ``cfg.trainer`` (CSV + TensorBoard logs
  in the stage directory, ``checkpoints/last.ckpt`` at epoch ends, at most every ``trainer.checkpoint_every_s``
  seconds, no sanity steps, no model summary).
* :class:`TimingCallback`: start-up, model-step, data (+ loop), evaluation and checkpoint seconds per fit.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from endodistill.config import Config
from endodistill.train.checkpoint_io import AtomicCheckpointIO


class TimingCallback(Callback):
    """Where a fit's time goes: start-up, model steps, data (+ loop book-keeping), evaluation, checkpoints.

    ``step`` runs from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, optimiser);
    ``data`` from the end of one step to the start of the next (fetching the batch and Lightning's loop);
    ``eval`` is what the module measures with :meth:`section`; ``startup`` from the trainer's creation to
    ``on_train_start``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.t_created = time.perf_counter()
        self.startup = 0.0
        self.step = 0.0
        self.data = 0.0
        self.eval = 0.0
        self.steps = 0
        self._last: float | None = None
        self._step_start = 0.0
        self.checkpoint_io: AtomicCheckpointIO | None = None
        self.t_end: float | None = None
        self.eval_after_end = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.startup = time.perf_counter() - self.t_created

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.data += now - self._last
        self._step_start = now

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        now = time.perf_counter()
        self.step += now - self._step_start
        self.steps += 1
        self._last = now

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t_end = time.perf_counter()

    @contextlib.contextmanager
    def section(self) -> Iterator[None]:
        """Count the enclosed time as evaluation."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.eval += dt
            if self.t_end is not None:
                self.eval_after_end += dt

    def summary(self, wall: float | None = None) -> dict[str, float]:
        """Seconds per part of a fit whose wall time (from its first line) is ``wall``.

        ``prepare``: before the Trainer (building the model, loading an encoder, planning batches);
        ``finish``: after training (weights, test predictions, files; evaluation inside it is counted in
        ``eval``); ``other``: the rest of the training loop (hooks, logging, epoch ends). ``prepare``,
        ``startup`` and ``finish`` are paid once per fit, the others grow with the epochs.
        """
        now = time.perf_counter()
        wall = now - self.t_created if wall is None else wall
        ckpt = self.checkpoint_io.save_seconds if self.checkpoint_io is not None else 0.0
        t_end, eval_after = self.t_end, self.eval_after_end
        parts = {
            "prepare": max(0.0, wall - (now - self.t_created)),
            "startup": self.startup,
            "step": self.step,
            "data": self.data,
            "eval": self.eval,
            "checkpoint": ckpt,
            "finish": max(0.0, now - t_end - eval_after) if t_end is not None else 0.0,
        }
        out = {k: round(v, 4) for k, v in parts.items()}
        out["other"] = round(max(0.0, wall - sum(parts.values())), 4)
        out["wall"] = round(wall, 4)
        out["steps"] = self.steps
        return out


class IntervalCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt`` at an epoch end, at most once every ``every_s`` seconds (0: every epoch).

    Checkpoints stay at epoch ends, the only points where a resumed fit continues exactly (each epoch is
    re-seeded from ``(fit seed, epoch)``); the interval only skips some of them. Small fits (the demo's
    3-second cross-validation fits) then write none, and a ViT-B fit does not write 1.4 GB every epoch.
    Under DDP rank 0's clock decides for every rank (Lightning's save is collective).

    Args:
        every_s: minimum seconds between two checkpoints, counted from the start of training.
        **kwargs: passed to ``ModelCheckpoint``.
    """

    def __init__(self, every_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.every_s = float(every_s)
        self._last_save = time.monotonic()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = self.every_s <= 0 or time.monotonic() - self._last_save >= self.every_s
        if trainer.world_size > 1:
            due = bool(trainer.strategy.broadcast(due, src=0))
        if due:
            super().on_train_epoch_end(trainer, pl_module)
            self._last_save = time.monotonic()


class _InterruptCallback(Callback):
    """Let Ctrl-C propagate as KeyboardInterrupt (Lightning would ``sys.exit(1)`` and ignore SIGINT)."""

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt):
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise exception


class _LeaveFalseBar(TQDMProgressBar):
    """A progress bar that disappears when the fit ends (the caller prints one summary line).

    Its line is the first free one (tqdm's automatic position) rather than Lightning's fixed line 0: below
    the protocol's overall bar over the cross-validation fits when that one is shown.
    """

    def init_train_tqdm(self) -> Any:
        return Tqdm(
            desc=self.train_description,
            position=None,
            disable=self.is_disabled,
            leave=False,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )


def make_trainer(
    cfg: Config,
    stage_dir: Path,
    max_epochs: int,
    timing: TimingCallback,
    callbacks: Sequence[Callback] = (),
    progress: bool | None = None,
) -> pl.Trainer:
    """A Trainer for one fit, writing logs and ``checkpoints/last.ckpt`` into ``stage_dir``.

    Args:
        cfg: the run configuration (``cfg.trainer`` chooses hardware, precision, determinism).
        stage_dir: the fit's directory.
        max_epochs: epochs of the fit.
        timing: the fit's timing callback (created first, so start-up includes building the Trainer).
        callbacks: more callbacks.
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        A configured ``lightning.pytorch.Trainer``.
    """
    t = cfg.trainer
    stage_dir = Path(stage_dir)
    if progress is None:
        progress = sys.stderr.isatty()
    ckpt_io = AtomicCheckpointIO()
    timing.checkpoint_io = ckpt_io
    # Lightning 2.6 writes "last" only alongside a top-k save, so the top-1 checkpoint without a monitor
    # (the latest epoch) is itself named last.ckpt and overwritten at every save.
    checkpoint = IntervalCheckpoint(
        t.checkpoint_every_s,
        dirpath=stage_dir / "checkpoints",
        filename="last",
        save_last=False,
        save_top_k=1,
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    loggers = [
        CSVLogger(save_dir=stage_dir, name="logs"),
        TensorBoardLogger(save_dir=stage_dir, name="tensorboard", default_hp_metric=False),
    ]
    all_callbacks: list[Callback] = [timing, checkpoint, _InterruptCallback(), *callbacks]
    if progress:
        all_callbacks.append(_LeaveFalseBar())
    # deterministic=True makes torch raise on non-deterministic kernels; on GPUs some (SDPA backward,
    # scatter) have none, so there it only warns. CPU runs are bit-identical either way.
    deterministic: bool | Literal["warn"] = t.deterministic
    if t.deterministic and t.accelerator != "cpu":
        deterministic = "warn"
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=t.precision,  # type: ignore[arg-type]
        deterministic=deterministic,
        max_epochs=max_epochs,
        logger=loggers,
        callbacks=all_callbacks,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        default_root_dir=stage_dir,
        use_distributed_sampler=False,  # PlannedBatches shards by rank itself
        plugins=[ckpt_io],
        benchmark=False,
        # Batch statistics over the global batch (the teacher's BatchNorm) when DDP runs on GPUs.
        sync_batchnorm=t.accelerator != "cpu" and torch.cuda.is_available(),
    )


def fit(trainer: pl.Trainer, module: pl.LightningModule, loader: DataLoader, ckpt_path: Path | None) -> None:
    """``trainer.fit``, resuming from ``ckpt_path`` (read with ``weights_only=True``) when given."""
    trainer.fit(
        module,
        train_dataloaders=loader,
        ckpt_path=str(ckpt_path) if ckpt_path is not None else None,
        weights_only=True,
    )
