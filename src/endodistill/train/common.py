"""Lightning plumbing shared by every training stage.

* :func:`make_trainer`: one ``lightning.pytorch.Trainer`` factory from ``cfg.trainer`` (CSV + TensorBoard logs
  in the stage directory, ``checkpoints/last.ckpt`` at epoch ends, at most every ``trainer.checkpoint_every_s``
  seconds, no sanity steps, no model summary).
* Seeds: every fit gets its own seed derived from ``(cfg.seed, stage, fold, method)`` (:func:`fit_seed`), and
  the global RNGs are re-seeded at the start of every epoch from ``(fit seed, epoch)``. A fit resumed from
  ``last.ckpt`` (written at an epoch end) therefore draws exactly the random numbers of an uninterrupted one.
* :class:`TimingCallback`: start-up, model-step, data (+ loop), evaluation and checkpoint seconds per fit.
* NaN/inf losses raise :class:`~endodistill.errors.TrainingDivergedError` naming stage, fold and step; the
  last good ``last.ckpt`` (previous epoch end) is kept because nothing is saved on an exception.
* :class:`AtomicCheckpointIO`: checkpoints are written atomically and always read with ``weights_only=True``.
* :class:`PlannedBatches`: in-process batches of in-memory tensors, a pure function of ``(seed, epoch, batch)``
  (identical with or without DataLoader workers, across resumes, and sharded by rank under DDP).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import os
import random
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from endodistill.config import Config
from endodistill.errors import DiskFullError, InputError, TrainingDivergedError
from endodistill.utils import NO_SPACE_ERRNOS, atomic_path, atomic_write_json, stable_hash

log = logging.getLogger("endodistill")

LAST_CKPT = "checkpoints/last.ckpt"
DONE = "done.json"


def fault_point(event: str) -> None:
    """Test-only fault injection: signal this process when ``$ENDODISTILL_TEST_KILL_AT`` names ``event``.

    ``ENDODISTILL_TEST_KILL_AT="EVENT"`` sends SIGKILL, ``"SIGINT@EVENT"`` another signal, at a well-defined
    point (``"<fit> epoch N"``: epoch N starts, the checkpoint of epoch N-1 is on disk; ``"report"``), so the
    interruption tests are deterministic. Unset (always, outside tests): one environment lookup.
    """
    at = os.environ.get("ENDODISTILL_TEST_KILL_AT")
    if at:
        sig, _, target = at.rpartition("@")
        if target == event:
            os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))


# --------------------------------------------------------------------------------------------------- seeds
def fit_seed(seed: int, stage: str, fold: int | None = None, method: str | None = None) -> int:
    """A seed of its own for one fit, stable across processes and machines.

    Args:
        seed: the run's seed (``cfg.seed``).
        stage: ``teacher``, ``mae``, ``distill``, ``final``, ...
        fold: the fold (None when the fit is not per fold).
        method: the method name (None when not per method).

    Returns:
        An int in ``[0, 2**31 - 1)``.
    """
    return int(stable_hash([int(seed), stage, fold, method]), 16) % (2**31 - 1)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch of a fit (a pure function, so a resumed fit re-seeds identically)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]) % (2**31 - 1)


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch through Lightning (``workers=True`` seeds DataLoader workers too)."""
    pl.seed_everything(seed, workers=True, verbose=False)


def configure_torch(cfg: Config) -> None:
    """Process-wide torch settings from ``cfg.trainer``: thread count, TF32 on GPUs, quiet Lightning."""
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    if cfg.trainer.accelerator != "cpu":
        # TF32 matmuls on Ampere+ GPUs: no effect on CPU runs (which stay bit-identical).
        torch.set_float32_matmul_precision("high")
    quiet_lightning()


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (or runs alone).

    Read from the environment that torchrun (``RANK``), SLURM (``SLURM_PROCID``) and Lightning's own DDP
    launcher (``NODE_RANK`` + ``LOCAL_RANK`` in the processes it starts) set, so it is known before the
    first fit creates the process group.
    """
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and int(env.get("SLURM_PROCID", "0") or 0) != 0:
        return False
    return int(env.get("NODE_RANK", "0") or 0) == 0 and int(env.get("LOCAL_RANK", "0") or 0) == 0


@contextlib.contextmanager
def rank_run_dir(run_dir: str | Path, mirror: bool) -> Iterator[Path]:
    """The directory this process writes: the run directory on rank 0, a private scratch one elsewhere.

    Under DDP every rank runs the whole program (torchrun, SLURM and Lightning's launcher all start the same
    command once per process) and takes part in every fit; only rank 0 may write the run directory. Other
    ranks work in a sibling scratch directory, removed at the end. With ``mirror`` it starts as a hard-linked
    copy of the run directory (what a resumed run or a single stage reads: done markers, teacher outputs,
    encoder, splits), so every rank skips and runs the same units. Hard links are safe here because every
    write in a run directory is a rename onto the path (atomic writes), never an in-place update.

    Args:
        run_dir: the run directory.
        mirror: start from a copy of what the run directory holds.

    Yields:
        The directory to use as the run directory in this process.
    """
    import shutil

    run_dir = Path(run_dir)
    if is_rank_zero():
        yield run_dir
        return
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.rank-", dir=run_dir.parent))

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another file system, or no hard links: a real copy
            shutil.copy2(src, dst)

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == ".lock" or n.endswith(".tmp")}
        # A cohort still being generated by rank 0 is not copied (this rank generates its own).
        if "cohort" in names and not (Path(folder) / "cohort" / "cohort.json").is_file():
            skip.add("cohort")
        return skip

    try:
        if mirror and run_dir.is_dir():
            shutil.copytree(run_dir, scratch, copy_function=link, ignore=ignore, dirs_exist_ok=True)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def quiet_lightning() -> None:
    """Silence Lightning's per-fit info lines and hints that do not apply to in-memory training."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (
        ".*does not have many workers.*",
        ".*smaller than the logging interval.*",
        ".*Experiment logs directory .* exists and is not empty.*",
        ".*Checkpoint directory .* exists and is not empty.*",
        ".*`training_step` returned `None`.*",
        ".*You defined a `validation_step` but have no `val_dataloader`.*",
        ".*Trying to infer the `batch_size`.*",
        ".*is an invalid version and will not be supported.*",
        ".*GPU available but not used.*",
        ".*modules in eval mode.*",
        ".*isinstance.treespec, LeafSpec.*",
        ".*torch.meshgrid: in an upcoming release.*",
        ".*sync_dist=True.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


# ------------------------------------------------------------------------------------------- checkpoints
class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file renamed into place; ``torch.load`` with ``weights_only=True`` only.

    Checkpoints hold tensors and primitive containers only (hyper-parameters are plain dicts), so the
    restricted unpickler reads them; a checkpoint needing more is refused instead of executed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.save_seconds = 0.0

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` atomically (a kill or a full disk leaves the previous file intact)."""
        t0 = time.perf_counter()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Temporary file + rename (no fsync): a killed process never leaves a torn checkpoint, which is
        # what resuming needs; fsync-ing every epoch of 25 small fits costs more than the fits' I/O.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            # Streamed through a Python file object: its write() raises the plain OSError(ENOSPC) on a full
            # disk (named below), and nothing is buffered in memory (a ViT-B checkpoint: 0.5-0.9x the time of
            # going through an in-memory buffer, depending on the page cache; benchmarks/bench_speedups.py).
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
                raise DiskFullError(path) from e
            raise
        self.save_seconds += time.perf_counter() - t0

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read a checkpoint with the restricted unpickler, whatever the caller asked for."""
        p = Path(path)
        if not p.is_file():
            raise InputError(p, "checkpoint not found")
        try:
            return torch.load(p, map_location=map_location or "cpu", weights_only=True)
        except Exception as e:  # a truncated file or one needing arbitrary code
            raise InputError(p, f"unreadable checkpoint ({type(e).__name__}: {str(e)[:120]})") from None


def save_weights(path: str | Path, state: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors, atomically (tensors made contiguous, shared storage split).

    Written straight from the tensors (no copy of the state, no in-memory file): a ViT-B state (350 MB)
    takes about 0.3 s instead of 1 s. A full disk is reported as the usual one-line error naming ``path``.
    """
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors sharing storage (tied weights, views): only those are copied.
        tensors[k] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except OSError:
            raise
        except Exception as e:  # safetensors reports I/O errors as its own exception type
            if "No space left" in str(e) or "os error 28" in str(e) or "StorageFull" in str(e):
                raise OSError(errno.ENOSPC, "No space left on device") from e
            raise


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors state dict.

    Raises:
        InputError: missing or unreadable file.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "weights file not found")
    try:
        return load_file(str(p))
    except Exception as e:
        raise InputError(p, f"unreadable safetensors file ({type(e).__name__})") from None


# ------------------------------------------------------------------------------------------- done units
def read_done(unit_dir: Path) -> dict[str, Any] | None:
    """The done marker of a finished unit (teacher, mae, a fold x method fit, final), or None."""
    p = Path(unit_dir) / DONE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # a damaged marker: the unit is redone


def write_done(unit_dir: Path, info: dict[str, Any]) -> None:
    """Mark a unit finished (written last, after all its outputs, atomically)."""
    atomic_write_json(Path(unit_dir) / DONE, info)


def prepare_unit(unit_dir: Path, resume: bool) -> Path | None:
    """Get a unit directory ready: on resume return its ``last.ckpt`` (if any); otherwise clear old state.

    Args:
        unit_dir: the unit's directory.
        resume: continue an interrupted fit.

    Returns:
        The checkpoint to resume from, or None for a fresh fit.
    """
    unit_dir = Path(unit_dir)
    last = unit_dir / LAST_CKPT
    if resume and last.is_file():
        return last
    if not resume:
        # A fresh fit must not pick up a stale checkpoint or marker of an earlier attempt.
        for stale in (last, unit_dir / DONE):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    unit_dir.mkdir(parents=True, exist_ok=True)
    return None


# ------------------------------------------------------------------------------------------------ timing
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
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

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
    deterministic: bool | str = t.deterministic
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


# ------------------------------------------------------------------------------------------ base module
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, tokens and position embeddings (1-D or tokens)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or "token" in name or "position" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw(
    groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel (CPU and CUDA), the same update in one pass over the parameters.

    On the demo student the optimiser step takes about a third of the time of the default per-tensor loop
    on CPU (``benchmarks/bench_speedups.py``), with the same weights. Deterministic run to run.
    """
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def warmup_cosine(
    total_steps: int, warmup_fraction: float = 0.1, floor: float = 0.01
) -> Callable[[int], float]:
    """LR factor per optimiser step: linear warm-up, then cosine decay to ``floor``."""
    total = max(1, int(total_steps))
    warm = max(1, round(warmup_fraction * total)) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))

    return factor


class StageModule(pl.LightningModule):
    """Common behaviour of the stage modules: per-epoch re-seeding, divergence check, history, timing.

    Args:
        hparams: plain (JSON-like) hyper-parameters saved in checkpoints and logs.
        seed: the fit's seed (:func:`fit_seed`).
        where: how errors name the fit, e.g. ``"distill fold 2 mae_kd_ce"``.
        timing: the fit's timing callback.
    """

    def __init__(self, hparams: dict[str, Any], seed: int, where: str, timing: TimingCallback) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        self.seed = int(seed)
        self.where = where
        self.timing = timing
        self.history: list[dict[str, Any]] = []
        self._sums: dict[str, float] = {}
        self._count = 0
        self._share = 1.0

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
            last = Path(cb.dirpath) / "last.ckpt" if cb is not None and cb.dirpath else None
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
            t = self.trainer.strategy.reduce(t, reduce_op="sum").cpu().tolist()
            sums, count = dict(zip(sums, t[:-1])), t[-1]
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
        optimizer = opt.optimizer if hasattr(opt, "optimizer") else opt
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


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """Write a fit's per-epoch history as CSV (atomic), the training curves the report draws."""
    import csv

    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: _fmt(row.get(k)) for k in keys})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ""
    return "" if v is None else v


# --------------------------------------------------------------------------------------------- batches
class PlannedBatches(Dataset):
    """Batches of an in-memory dataset, item ``(epoch, b)`` = batch ``b`` of epoch ``epoch``.

    The order of each epoch is a pure function of ``(seed, epoch)``; each batch's augmentation draws from
    ``np.random.default_rng([seed, epoch, b])``. With ``world > 1`` every rank takes its share of each
    global batch (``idx[rank::world]``), so the global batch is the same for any number of processes.

    Args:
        n: number of cases.
        batch_size: the global batch size.
        seed: the fit's seed.
        make_batch: ``(indices, rng, epoch) -> batch`` (tensors).
        sample_weights: draw each epoch's cases with replacement from these weights (balanced sampling)
            instead of a permutation.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        make_batch: Callable[[np.ndarray, np.random.Generator, int], Any],
        sample_weights: np.ndarray | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("no training cases")
        self.n = int(n)
        self.batch_size = max(1, min(int(batch_size), self.n))
        self.seed = int(seed)
        self.make_batch = make_batch
        self.weights = None if sample_weights is None else np.asarray(sample_weights, dtype=np.float64)
        self.rank, self.world = 0, 1
        full, rest = divmod(self.n, self.batch_size)
        # A last batch of one case breaks BatchNorm and gives noisy steps: it is dropped (cases are
        # reshuffled every epoch, so nothing is left out for good).
        self.num_batches = full + (1 if rest > 1 else 0)
        self._plans: dict[int, list[np.ndarray]] = {}
        # Look-ahead thread for in-process loading (make_loader turns it off when DataLoader workers build
        # the batches).
        self.prefetch = True
        self._pool: Any = None
        self._pending: tuple[tuple[int, int], Any] | None = None

    def plan(self, epoch: int) -> list[np.ndarray]:
        """The case indices of every batch of ``epoch``."""
        if epoch not in self._plans:
            rng = np.random.default_rng([self.seed, epoch, 0])
            if self.weights is None:
                order = rng.permutation(self.n)
            else:
                order = rng.choice(self.n, size=self.n, replace=True, p=self.weights / self.weights.sum())
            batches = [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]
            self._plans = {epoch: batches[: self.num_batches]}  # keep one epoch only
        return self._plans[epoch]

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, b = int(key[0]), int(key[1])
        if not self.prefetch:
            return self._build(epoch, b)
        # In-process loading with one batch of look-ahead in a thread: batch b+1 is built (indexing and
        # augmentation release the GIL) while the model steps on batch b. Batches are pure functions of
        # (seed, epoch, b), so the thread changes no value; a key that was not prefetched is built here.
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == (epoch, b):
            batch = pending[1].result()
        else:
            if pending is not None:
                # Another key: let the stale build finish first, so that two builds never overlap.
                with contextlib.suppress(Exception):
                    pending[1].result()
            batch = self._build(epoch, b)
        if b + 1 < self.num_batches:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(1, thread_name_prefix="endodistill-batches")
            self._pending = ((epoch, b + 1), self._pool.submit(self._build, epoch, b + 1))
        elif self._pool is not None:
            # The epoch's last batch: no thread is left behind between epochs or after the fit.
            self._pool.shutdown(wait=False)
            self._pool = None
        return batch

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers (spawned) get the batches without the thread state; they build in-process.
        state = dict(self.__dict__)
        state.update(_pool=None, _pending=None, prefetch=False)
        return state

    def _build(self, epoch: int, b: int) -> Any:
        idx = self.plan(epoch)[b]
        rng = np.random.default_rng([self.seed, epoch, b + 1])
        batch = self.make_batch(idx, rng, epoch)
        if self.world > 1:
            # The whole global batch is built first, so augmentations draw exactly as in one process,
            # then this rank keeps its rows; building the rest of it costs little next to a model step.
            batch = shard_batch(batch, len(idx), self.rank, self.world)
        return batch


def shard_batch(batch: Any, n: int, rank: int, world: int) -> Any:
    """Rows ``rank::world`` of every tensor, array or list of ``n`` rows in a global batch (others kept).

    A dict batch also gets ``"share"``: this rank's rows relative to an even share (``n_rank * world / n``).
    DDP averages gradients over ranks, so :meth:`StageModule.backward` scales the loss by it: with an uneven
    split (e.g. 5 cases on 2 ranks) the gradient is still the global batch's mean, as in one process.
    """

    def take(v: Any) -> Any:
        if isinstance(v, Tensor | np.ndarray) and v.ndim > 0 and v.shape[0] == n:
            return v[rank::world]
        return v[rank::world] if isinstance(v, list) and len(v) == n else v

    if isinstance(batch, dict):
        out = {k: take(v) for k, v in batch.items()}
        out["share"] = torch.tensor(len(range(rank, n, world)) * world / n, dtype=torch.float64)
        return out
    if isinstance(batch, tuple | list):
        return type(batch)(take(v) for v in batch)
    return take(batch)


class EpochSampler(Sampler):
    """Yields ``(epoch, b)`` keys; Lightning calls :meth:`set_epoch` before every epoch."""

    def __init__(self, num_batches: int) -> None:
        self.num_batches = num_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # A generator: the epoch is read at the first batch, after on_train_epoch_start has set it.
        epoch = self.epoch
        for b in range(self.num_batches):
            yield (epoch, b)

    def __len__(self) -> int:
        return self.num_batches


def make_loader(batches: PlannedBatches, cfg: Config) -> DataLoader:
    """A DataLoader over :class:`PlannedBatches` (``batch_size=None``: items already are batches).

    With ``num_workers=0`` (the CPU default) batches are built in-process: no worker start-up per fit.
    """
    w = cfg.trainer.num_workers
    batches.prefetch = w == 0 and cfg.trainer.lookahead
    return DataLoader(
        batches,
        batch_size=None,
        sampler=EpochSampler(len(batches)),
        num_workers=w,
        persistent_workers=w > 0,
        pin_memory=cfg.trainer.accelerator not in ("cpu", "mps") and torch.cuda.is_available(),
    )


def set_rank(batches: PlannedBatches, trainer: pl.Trainer) -> None:
    """Tell the batches which share of every global batch this process takes."""
    batches.rank, batches.world = int(trainer.global_rank), int(trainer.world_size)


@torch.no_grad()
def predict_logits(
    model: Callable[[Tensor], Tensor], x: Tensor, batch_size: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Logits of ``model`` on ``x`` in batches (eval mode is the caller's job), on the CPU."""
    outs = []
    for i in range(0, x.shape[0], batch_size):
        outs.append(model(x[i : i + batch_size].to(device)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def inference_device(cfg: Config) -> torch.device:
    """Where to run post-fit inference (teacher outputs, test predictions): the GPU when training used one."""
    if cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter."""
    return next(model.parameters()).device


def auc_score(labels: np.ndarray, probs: np.ndarray, positive_class: int = 1) -> float:
    """AUC of ``(N, K)`` class probabilities: the positive class's for K = 2, macro one-vs-rest for K > 2.

    Returns:
        NaN when only one class is present.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if y.size == 0 or np.unique(y).size < 2:
        return float("nan")
    if p.shape[1] == 2:
        return float(roc_auc_score(y == positive_class, p[:, positive_class]))
    from endodistill.evaluate.metrics import multiclass_auc

    return float(multiclass_auc(y, p)["macro"])
