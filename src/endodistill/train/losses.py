"""Losses of distillation and fine-tuning: the task loss, the KD losses and the KD weight schedule.

The total loss of epoch ``e`` is ``a_e * L_KD + (1 - a_e) * L_task`` (:func:`mixed_loss`), with ``a_e`` from
:func:`kd_weight`. All functions work for K classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

KD_KINDS = ("mse_logits", "mse_probs", "kl", "prototype")
SCHEDULES = ("exp", "constant", "linear", "cosine")


class _Schedule(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def alpha(self) -> float: ...


def task_loss(logits: Tensor, labels: Tensor, class_weights: Tensor | None = None) -> Tensor:
    """Cross-entropy of ``(B, K)`` logits against ``(B,)`` integer labels.

    Args:
        logits: student logits.
        labels: class indices in ``[0, K)``.
        class_weights: optional ``(K,)`` weights (see :func:`balanced_class_weights`); the mean is then
            normalised by the summed weights of the batch, as in ``torch.nn.functional.cross_entropy``.
    """
    if class_weights is not None:
        class_weights = class_weights.to(device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(logits, labels.long(), weight=class_weights)


def kd_loss(kind: str, student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0) -> Tensor:
    """Distillation loss between student logits and (paired) teacher targets, both ``(B, K)``.

    Args:
        kind: ``mse_logits`` (regress the teacher's logits, the paper's loss), ``mse_probs`` (MSE between
            softmax probabilities), ``kl`` (Hinton: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean),
            ``prototype`` (MSE to the class-prototype logits, which the caller passes as ``teacher_logits``;
            see :func:`endodistill.train.pairing.class_prototypes`).
        student_logits: the student's outputs.
        teacher_logits: the targets; never receive a gradient.
        temperature: T of the ``kl`` loss.

    Raises:
        ValueError: an unknown kind, mismatched shapes or a non-positive temperature.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ"
        )
    t = teacher_logits.detach().to(student_logits.dtype)
    if kind in ("mse_logits", "prototype"):
        return F.mse_loss(student_logits, t)
    if kind == "mse_probs":
        return F.mse_loss(student_logits.softmax(dim=-1), t.softmax(dim=-1))
    if kind == "kl":
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
        log_p_t = F.log_softmax(t / temperature, dim=-1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2
    raise ValueError(f"unknown kd loss {kind!r} (known: {', '.join(KD_KINDS)})")


def kd_weight(schedule: _Schedule, epoch: int, total_epochs: int) -> float:
    """The KD weight ``a_e`` of epoch ``epoch`` (0-based) out of ``total_epochs``.

    * ``exp``: ``alpha ** epoch`` (the paper, alpha = 0.85): 1 at the first epoch.
    * ``constant``: ``alpha`` (0 gives plain fine-tuning, 1 KD only).
    * ``linear``: ``1 - epoch / (E - 1)``, from 1 at the first epoch to 0 at the last (alpha is ignored).
    * ``cosine``: ``0.5 * (1 + cos(pi * epoch / (E - 1)))``, from 1 to 0 (alpha is ignored).

    With one epoch, ``linear`` and ``cosine`` give 1. Epochs past the end are clamped to the last.

    Args:
        schedule: an object with ``kind`` and ``alpha`` (``endodistill.config.ScheduleConfig``).
        epoch: the current epoch, starting at 0.
        total_epochs: E, the number of epochs.

    Raises:
        ValueError: a negative epoch, fewer than one epoch, or an unknown kind.
    """
    if epoch < 0 or total_epochs < 1:
        raise ValueError(f"need epoch >= 0 and total_epochs >= 1, got {epoch}, {total_epochs}")
    kind, alpha = schedule.kind, float(schedule.alpha)
    if kind == "exp":
        return alpha**epoch
    if kind == "constant":
        return alpha
    if kind in ("linear", "cosine"):
        if total_epochs == 1:
            return 1.0
        frac = min(epoch, total_epochs - 1) / (total_epochs - 1)
        if kind == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown schedule {kind!r} (known: {', '.join(SCHEDULES)})")


def mixed_loss(a: float, kd: Tensor | None, task: Tensor | None) -> Tensor:
    """``a * kd + (1 - a) * task``; at ``a = 1`` exactly ``kd``, at ``a = 0`` exactly ``task``.

    At the extremes the unused term may be None (it is not computed) and never contaminates the result
    (``0 * inf`` would be NaN).

    Raises:
        ValueError: ``a`` outside [0, 1], or a needed term is None.
    """
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"the KD weight must be in [0, 1], got {a}")
    if a == 1.0:
        if kd is None:
            raise ValueError("a = 1 needs the KD loss")
        return kd
    if a == 0.0:
        if task is None:
            raise ValueError("a = 0 needs the task loss")
        return task
    if kd is None or task is None:
        raise ValueError(f"a = {a} needs both the KD and the task loss")
    return a * kd + (1.0 - a) * task


def _counts(labels: Sequence[int] | np.ndarray | Tensor, num_classes: int) -> np.ndarray:
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64).ravel()
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {y.min()}..{y.max()}")
    return np.bincount(y, minlength=num_classes)


def balanced_class_weights(labels: Sequence[int] | np.ndarray | Tensor, num_classes: int) -> Tensor:
    """Class weights ``n / (K_present * n_k)`` (scikit-learn's "balanced"), for :func:`task_loss`.

    A class absent from ``labels`` gets weight 0 (it cannot occur in the loss) instead of an error, so a small
    training fold without some class still trains.

    Returns:
        ``(K,)`` float32 weights.
    """
    counts = _counts(labels, num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes, dtype=np.float64)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.as_tensor(w, dtype=torch.float32)


def balanced_sample_weights(labels: Sequence[int] | np.ndarray | Tensor, num_classes: int) -> Tensor:
    """Per-sample weights ``1 / n_{y_i}`` for ``torch.utils.data.WeightedRandomSampler`` (balanced batches).

    Returns:
        ``(n,)`` float64 weights, each class summing to 1.
    """
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64).ravel()
    counts = _counts(y, num_classes)
    return torch.as_tensor(1.0 / counts[y], dtype=torch.float64)
