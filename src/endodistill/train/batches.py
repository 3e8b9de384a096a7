"""Batches of in-memory tensors as pure functions of ``(seed, epoch, batch)``, sharded by rank under DDP.

:class:`PlannedBatches` gives the same batches with or without DataLoader workers, across resumes, and for
any number of processes; :func:`make_loader` wraps it in a DataLoader.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from endodistill.config import Config


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
