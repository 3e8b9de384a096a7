"""Stage 2: 3D masked auto-encoder pre-training of the student's encoder (MONAI ``MaskedAutoEncoderViT``).

By default the MAE sees only the unlabelled MRI pool, never a labelled (test-fold) volume, so it runs once per
run and every method and fold shares ``RUN_DIR/mae/encoder.safetensors``. With ``mae.use_labelled_train`` the
labelled volumes of a fold's training subjects are added; the MAE then runs per fold (``mae/fold_K``) and
once for the final model (``mae/all``), so a test-fold image is still never seen.

Recipe (MAE, He et al. 2022): AdamW (0.9, 0.95), linear warm-up then cosine decay, left-right flips and
intensity jitter; loss = MSE over the masked patches only (``MAE.loss``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from endodistill.config import Config
from endodistill.errors import InputError
from endodistill.train.common import (
    PlannedBatches,
    StageModule,
    TimingCallback,
    adamw,
    fit,
    make_loader,
    make_trainer,
    param_groups,
    prepare_unit,
    read_done,
    save_weights,
    seed_all,
    set_rank,
    warmup_cosine,
    write_done,
    write_history,
)
from endodistill.train.data import CohortData
from endodistill.train.speed import compile_if_enabled

log = logging.getLogger("endodistill")


def augment_volumes(x: Tensor, rng: np.random.Generator) -> Tensor:
    """Left-right flips (model axis 0 is L->R in RAS) and per-volume intensity scale/shift.

    Only the L-R axis is flipped: the pelvis is roughly left-right symmetric, not front-back or up-down.
    Written on batched tensors (MONAI's per-sample dictionary transforms would add per-case overhead), in
    place: ``x`` must be the batch's own copy (``volumes[idx]`` is). In place it saves a fifth to two fifths of
    the time for a demo batch (16 x 16 x 32 x 32), with bit-identical values (``benchmarks/bench_speedups.py``).
    """
    b = x.shape[0]
    flip = np.flatnonzero(rng.random(b) < 0.5)
    scale = torch.from_numpy(rng.uniform(0.9, 1.1, size=b).astype(np.float32)).view(b, 1, 1, 1, 1)
    shift = torch.from_numpy(rng.uniform(-0.05, 0.05, size=b).astype(np.float32)).view(b, 1, 1, 1, 1)
    if flip.size:
        f = torch.from_numpy(flip)
        x[f] = x[f].flip(2)
    return x.mul_(scale).add_(shift)


def volume_batch_fn(
    x: Tensor, augment: bool
) -> Callable[[np.ndarray, np.random.Generator, int], dict[str, Tensor]]:
    """Batches of volumes ``x[idx]``, augmented when asked."""

    def make(idx: np.ndarray, rng: np.random.Generator, epoch: int) -> dict[str, Tensor]:
        xb = x[torch.from_numpy(idx)]
        return {"x": augment_volumes(xb, rng) if augment else xb}

    return make


class MAEModule(StageModule):
    """Lightning module of MAE pre-training.

    Args:
        cfg: the run configuration.
        total_steps: optimiser steps of the fit (LR schedule).
        batches: the training batches (told the process rank at setup).
        **kw: passed to :class:`StageModule`.
    """

    def __init__(self, cfg: Config, total_steps: int, batches: PlannedBatches, **kw: Any) -> None:
        super().__init__(**kw)
        from endodistill.models.student import build_mae

        self.cfg = cfg
        self.mae = build_mae(cfg)
        self.total_steps = total_steps
        self.batches = batches

    def setup(self, stage: str) -> None:
        set_rank(self.batches, self.trainer)

    def configure_model(self) -> None:
        compile_if_enabled(self.mae, self.cfg, self.trainer.strategy.root_device)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _, _ = self.mae(batch["x"])
        self.check_loss(loss)
        self.accumulate(int(batch["x"].shape[0]), train_loss=loss)
        return loss

    def on_train_epoch_end(self) -> None:
        self.end_epoch({**self.epoch_means(), "lr": self.lr()})

    def configure_optimizers(self) -> Any:
        m = self.cfg.mae
        opt = adamw(param_groups(self.mae, m.weight_decay), lr=m.lr, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.total_steps, 0.1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def mae_unit(cfg: Config, fold: int | None) -> str:
    """The MAE unit a fit uses: ``mae`` (shared), or ``mae/fold_K`` / ``mae/all`` with labelled training data."""
    if not cfg.mae.use_labelled_train:
        return "mae"
    return "mae/all" if fold is None else f"mae/fold_{fold}"


def pretrain_mae(
    cfg: Config,
    data: CohortData,
    unit_dir: Path,
    seed: int,
    resume: bool = False,
    labelled_subjects: Sequence[str] = (),
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Pre-train the MAE and save its encoder as ``unit_dir/encoder.safetensors`` (ViT key names).

    Args:
        cfg: the run configuration.
        data: the cohort.
        unit_dir: the unit directory (``RUN_DIR/mae`` or a per-fold one).
        seed: the fit's seed.
        resume: reuse a finished unit / continue from ``last.ckpt``.
        labelled_subjects: labelled subjects whose volumes join the pool (training subjects only; used with
            ``mae.use_labelled_train``).
        echo: where the progress line goes.

    Returns:
        The unit's info (``done.json``): pool size, first/last loss, timing.

    Raises:
        InputError: the pool is empty.
    """
    unit_dir = Path(unit_dir)
    done = read_done(unit_dir) if resume else None
    if done is not None and (unit_dir / "encoder.safetensors").is_file():
        return done
    t0 = time.perf_counter()
    ckpt = prepare_unit(unit_dir, resume)
    pool = [data.unlabelled.x]
    epochs = cfg.mae.epochs
    if cfg.mae.pool_fraction < 1.0 and len(data.unlabelled):
        n = max(2, round(cfg.mae.pool_fraction * len(data.unlabelled)))
        keep = np.sort(np.random.default_rng([seed, 2750159]).permutation(len(data.unlabelled))[:n])
        pool = [data.unlabelled.x[torch.from_numpy(keep)]]
        epochs = max(1, round(cfg.mae.epochs / cfg.mae.pool_fraction))
    if labelled_subjects:
        pool.append(data.labelled.x[torch.from_numpy(data.labelled.index(list(labelled_subjects)))])
    x = torch.cat(pool) if len(pool) > 1 else pool[0]
    if x.shape[0] < 2:
        raise InputError(
            data.manifest,
            f"MAE pre-training needs unlabelled '{cfg.task.student_modality}' rows (empty label); found "
            f"{x.shape[0]}. Add them, set mae.use_labelled_train: true, or use scratch-only methods.",
        )
    m = cfg.mae
    batches = PlannedBatches(x.shape[0], m.batch_size, seed, volume_batch_fn(x, augment=True))
    timing = TimingCallback()
    seed_all(seed)  # the initial weights depend on the fit's seed only
    where = f"mae ({unit_dir.name})"
    hp = {"stage": "mae", "seed": seed, "n_volumes": int(x.shape[0]), "mae": m.model_dump(mode="json")}
    module = MAEModule(
        cfg,
        total_steps=len(batches) * epochs,
        batches=batches,
        hparams=hp,
        seed=seed,
        where=where,
        timing=timing,
    )
    trainer = make_trainer(cfg, unit_dir, epochs, timing)
    fit(trainer, module, make_loader(batches, cfg), ckpt)
    from endodistill.models.student import mae_encoder_state

    mae = module.mae.cpu().eval()
    save_weights(
        unit_dir / "encoder.safetensors", mae_encoder_state(mae), metadata={"format": "monai-vit-encoder"}
    )
    save_weights(unit_dir / "mae.safetensors", mae.state_dict())
    write_history(unit_dir / "history.csv", module.history)
    losses = [h.get("train_loss") for h in module.history]
    info = {
        "seed": seed,
        "n_volumes": int(x.shape[0]),
        "n_labelled_added": len(labelled_subjects),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "history": module.history,
        "timing": timing.summary(time.perf_counter() - t0),
    }
    write_done(unit_dir, info)
    echo(
        f"[mae] {x.shape[0]} volumes, {epochs} epochs: loss {info['loss_first']:.4f} -> {info['loss_last']:.4f} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return info
