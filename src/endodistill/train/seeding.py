"""Seeds of the fits and process-wide torch settings.

Every fit gets its own seed derived from ``(cfg.seed, stage, fold, method)`` (:func:`fit_seed`), and the global
RNGs are re-seeded at the start of every epoch from ``(fit seed, epoch)`` (:func:`epoch_seed`). A fit resumed
from ``last.ckpt`` (written at an epoch end) therefore draws exactly the random numbers of an uninterrupted one.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch

from endodistill.config import Config
from endodistill.train.runtime import quiet_lightning
from endodistill.utils import stable_hash


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
