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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from endodistill import rundir
from endodistill.config import Config
from endodistill.errors import InputError
from endodistill.models.student import MAE, build_mae, mae_encoder_state
from endodistill.models.weights import save_weights
from endodistill.train.batches import PlannedBatches
from endodistill.train.data import CohortData
from endodistill.train.fit import FitPlan, FitSpec, run_fit
from endodistill.train.module import StageModule
from endodistill.train.optim import adamw, param_groups
from endodistill.train.seeding import seed_all
from endodistill.train.trainer import TimingCallback

log = logging.getLogger("endodistill")


def augment_volumes(x: Tensor, rng: np.random.Generator, translate: int = 0) -> Tensor:
    """Left-right flips (model axis 0 is L->R in RAS), per-volume intensity scale/shift, and translations.

    Only the L-R axis is flipped: the pelvis is roughly left-right symmetric, not front-back or up-down.
    Written on batched tensors (MONAI's per-sample dictionary transforms would add per-case overhead), in
    place: ``x`` must be the batch's own copy (``volumes[idx]`` is). In place it saves a fifth to two fifths of
    the time for a demo batch (16 x 16 x 32 x 32), with bit-identical values (``benchmarks/bench_speedups.py``).

    Args:
        x: ``(B, C, X, Y, Z)`` volumes (changed in place).
        rng: the random generator.
        translate: each volume moves by up to this many voxels along every axis (edge-replicated; 0: none,
            and no random draws, so configurations without it keep their batches).
    """
    b = x.shape[0]
    flip = np.flatnonzero(rng.random(b) < 0.5)
    scale = torch.from_numpy(rng.uniform(0.9, 1.1, size=b).astype(np.float32)).view(b, 1, 1, 1, 1)
    shift = torch.from_numpy(rng.uniform(-0.05, 0.05, size=b).astype(np.float32)).view(b, 1, 1, 1, 1)
    if flip.size:
        f = torch.from_numpy(flip)
        x[f] = x[f].flip(2)
    if translate > 0:
        t = translate
        d = rng.integers(0, 2 * t + 1, size=(b, 3))
        xp = torch.nn.functional.pad(x, (t,) * 6, mode="replicate")
        sx, sy, sz = x.shape[2:]
        for k in range(b):
            i, j, m = (int(v) for v in d[k])
            x[k] = xp[k, :, i : i + sx, j : j + sy, m : m + sz]
    return x.mul_(scale).add_(shift)


def volume_batch_fn(
    x: Tensor, augment: bool, translate: int = 0
) -> Callable[[np.ndarray, np.random.Generator, int], dict[str, Tensor]]:
    """Batches of volumes ``x[idx]``, augmented when asked (``translate``: see :func:`augment_volumes`)."""

    def make(idx: np.ndarray, rng: np.random.Generator, epoch: int) -> dict[str, Tensor]:
        xb = x[torch.from_numpy(idx)]
        return {"x": augment_volumes(xb, rng, translate) if augment else xb}

    return make


class MAEModule(StageModule):
    """Lightning module of MAE pre-training.

    Args:
        cfg: the run configuration.
        total_steps: optimiser steps of the fit (LR schedule).
        batches: the training batches (told the process rank at setup).
        **kw: passed to :class:`~endodistill.train.module.StageModule`.
    """

    def __init__(self, cfg: Config, total_steps: int, batches: PlannedBatches, **kw: Any) -> None:
        super().__init__(cfg=cfg, batches=batches, total_steps=total_steps, **kw)
        self.mae = build_mae(cfg)

    def network(self) -> MAE:
        return self.mae

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _, _ = self.mae(batch["x"])
        self.check_loss(loss)
        self.accumulate(int(batch["x"].shape[0]), train_loss=loss)
        return loss

    def on_train_epoch_end(self) -> None:
        self.end_epoch({**self.epoch_means(), "lr": self.lr()})

    def optimiser(self) -> torch.optim.Optimizer:
        m = self.cfg.mae
        return adamw(param_groups(self.mae, m.weight_decay), lr=m.lr, betas=(0.9, 0.95))


def mae_unit(cfg: Config, fold: int | None) -> str:
    """The MAE unit a fit uses: ``mae`` (shared), or ``mae/fold_K`` / ``mae/all`` with labelled training data."""
    return rundir.mae_unit_name(cfg.mae.use_labelled_train, fold)


class MAEFit(FitSpec):
    """One MAE pre-training fit (see :func:`pretrain_mae`)."""

    artefact = rundir.ENCODER

    def __init__(
        self,
        cfg: Config,
        data: CohortData,
        seed: int,
        where: str,
        labelled_subjects: Sequence[str],
        echo: Callable[[str], None],
    ) -> None:
        self.cfg, self.data, self.seed, self.where = cfg, data, seed, where
        self.labelled_subjects, self.echo = labelled_subjects, echo

    def plan(self) -> FitPlan:
        cfg, data, seed = self.cfg, self.data, self.seed
        pool = [data.unlabelled.x]
        epochs = cfg.mae.epochs
        if cfg.mae.pool_fraction < 1.0 and len(data.unlabelled):
            n = max(2, round(cfg.mae.pool_fraction * len(data.unlabelled)))
            keep = np.sort(np.random.default_rng([seed, 2750159]).permutation(len(data.unlabelled))[:n])
            pool = [data.unlabelled.x[torch.from_numpy(keep)]]
            epochs = max(1, round(cfg.mae.epochs / cfg.mae.pool_fraction))
        if self.labelled_subjects:
            pool.append(data.labelled.x[torch.from_numpy(data.labelled.index(list(self.labelled_subjects)))])
        x = torch.cat(pool) if len(pool) > 1 else pool[0]
        if x.shape[0] < 2:
            raise InputError(
                data.manifest,
                f"MAE pre-training needs unlabelled '{cfg.task.student_modality}' rows (empty label); found "
                f"{x.shape[0]}. Add them, set mae.use_labelled_train: true, or use scratch-only methods.",
            )
        self.n_volumes, self.epochs = int(x.shape[0]), epochs
        return FitPlan(
            PlannedBatches(
                x.shape[0],
                cfg.mae.batch_size,
                seed,
                volume_batch_fn(x, augment=True, translate=cfg.mae.translate),
            ),
            epochs,
        )

    def module(self, plan: FitPlan, timing: TimingCallback) -> MAEModule:
        seed_all(self.seed)  # the initial weights depend on the fit's seed only
        hp = {
            "stage": "mae",
            "seed": self.seed,
            "n_volumes": self.n_volumes,
            "mae": self.cfg.mae.model_dump(mode="json"),
        }
        return MAEModule(
            self.cfg,
            total_steps=len(plan.batches) * plan.epochs,
            batches=plan.batches,
            hparams=hp,
            seed=self.seed,
            where=self.where,
            timing=timing,
        )

    def finish(self, unit_dir: Path, module: StageModule, timing: TimingCallback) -> dict[str, Any]:
        assert isinstance(module, MAEModule)
        mae = module.mae.cpu().eval()
        save_weights(
            unit_dir / self.artefact, mae_encoder_state(mae), metadata={"format": "monai-vit-encoder"}
        )
        save_weights(unit_dir / "mae.safetensors", mae.state_dict())
        losses = [h.get("train_loss") for h in module.history]
        return {
            "seed": self.seed,
            "n_volumes": self.n_volumes,
            "n_labelled_added": len(self.labelled_subjects),
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "history": module.history,
        }

    def after(self, info: dict[str, Any]) -> None:
        self.echo(
            f"[mae] {info['n_volumes']} volumes, {self.epochs} epochs: loss {info['loss_first']:.4f} -> "
            f"{info['loss_last']:.4f} ({info['timing']['wall']:.1f} s)"
        )


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
    spec = MAEFit(cfg, data, seed, f"mae ({unit_dir.name})", labelled_subjects, echo)
    return run_fit(unit_dir, spec, resume)
