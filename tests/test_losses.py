"""Task and KD losses, the KD weight schedules and the mixed loss extremes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from endodistill.config import ScheduleConfig
from endodistill.train.losses import (
    balanced_class_weights,
    balanced_sample_weights,
    kd_loss,
    kd_weight,
    mixed_loss,
    task_loss,
)


def _logits(k: int = 3, b: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g), torch.randn(b, k, generator=g) * 2


def test_task_loss_weighted_cross_entropy() -> None:
    s, _ = _logits()
    y = torch.tensor([0, 1, 2, 2, 2])
    torch.testing.assert_close(task_loss(s, y), F.cross_entropy(s, y))
    w = balanced_class_weights(y, 3)
    torch.testing.assert_close(w, torch.tensor([5 / 3, 5 / 3, 5 / 9]))
    manual = -(w[y] * F.log_softmax(s, -1)[torch.arange(5), y]).sum() / w[y].sum()
    torch.testing.assert_close(task_loss(s, y, w), manual)


def test_balanced_weights_absent_class_and_sampler() -> None:
    w = balanced_class_weights([0, 0, 0, 2], 3)
    torch.testing.assert_close(w, torch.tensor([4 / 6, 0.0, 4 / 2]))
    sw = balanced_sample_weights(np.array([0, 0, 0, 1]), 2)
    torch.testing.assert_close(sw, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        balanced_class_weights([0, 2], 2)


def test_kd_losses_by_hand() -> None:
    s, t = _logits()
    torch.testing.assert_close(kd_loss("mse_logits", s, t), ((s - t) ** 2).mean())
    torch.testing.assert_close(kd_loss("prototype", s, t), ((s - t) ** 2).mean())
    torch.testing.assert_close(kd_loss("mse_probs", s, t), ((s.softmax(-1) - t.softmax(-1)) ** 2).mean())
    temp = 3.0
    p_t = (t / temp).softmax(-1)
    kl = (p_t * (p_t.log() - (s / temp).log_softmax(-1))).sum(-1).mean() * temp**2
    torch.testing.assert_close(kd_loss("kl", s, t, temperature=temp), kl)
    assert kd_loss("kl", t, t).abs() < 1e-6
    with pytest.raises(ValueError, match="unknown kd loss"):
        kd_loss("l1", s, t)
    with pytest.raises(ValueError, match="differ"):
        kd_loss("mse_logits", s, t[:, :2])


def test_kd_loss_does_not_backprop_into_teacher() -> None:
    s, t = _logits()
    s.requires_grad_(True)
    t.requires_grad_(True)
    kd_loss("kl", s, t).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize(
    ("kind", "alpha", "expected"),
    [
        ("exp", 0.85, [1.0, 0.85, 0.85**2, 0.85**3, 0.85**4]),
        ("constant", 0.3, [0.3] * 5),
        ("constant", 0.0, [0.0] * 5),
        ("constant", 1.0, [1.0] * 5),
        ("linear", 0.85, [1.0, 0.75, 0.5, 0.25, 0.0]),
        (
            "cosine",
            0.85,
            [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0],
        ),
    ],
)
def test_schedule_values(kind: str, alpha: float, expected: list[float]) -> None:
    sched = ScheduleConfig(kind=kind, alpha=alpha)
    got = [kd_weight(sched, e, 5) for e in range(5)]
    assert got == pytest.approx(expected, abs=1e-12)


def test_schedule_edges() -> None:
    assert kd_weight(ScheduleConfig(kind="linear"), 0, 1) == 1.0
    assert kd_weight(ScheduleConfig(kind="cosine"), 9, 5) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        kd_weight(ScheduleConfig(kind="exp"), -1, 5)


def test_mixed_loss_extremes_are_exact() -> None:
    kd, task = torch.tensor(0.123456789), torch.tensor(2.718281828)
    assert torch.equal(mixed_loss(1.0, kd, task), kd)
    assert torch.equal(mixed_loss(0.0, kd, task), task)
    assert torch.equal(mixed_loss(1.0, kd, torch.tensor(float("inf"))), kd)
    assert torch.equal(mixed_loss(0.0, None, task), task)
    torch.testing.assert_close(mixed_loss(0.25, kd, task), 0.25 * kd + 0.75 * task)
    # The schedule's a = 1 (exp at epoch 0) and constant 0 give the pure losses in a real computation.
    s, t = _logits(k=2)
    y = torch.tensor([0, 1, 1, 0, 1])
    a0 = kd_weight(ScheduleConfig(kind="exp", alpha=0.85), 0, 10)
    assert torch.equal(
        mixed_loss(a0, kd_loss("mse_logits", s, t), task_loss(s, y)), kd_loss("mse_logits", s, t)
    )
    with pytest.raises(ValueError):
        mixed_loss(0.5, None, task)
    with pytest.raises(ValueError):
        mixed_loss(1.5, kd, task)
