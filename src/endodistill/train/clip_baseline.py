"""A simple reference for the teacher: logistic regression on hand-made motion features of the clips.

The sliding sign is motion, so the cheapest model that can see it is a linear one on how much each part of
the image moves. Each preprocessed clip (the frames the teacher sees at evaluation) is summarised on a coarse
``grid x grid`` grid by two pooled maps: each pixel's temporal standard deviation and its mean absolute
frame-to-frame difference (log-scaled). An L2 logistic regression (scikit-learn) is fitted on the same
subject-level folds as the teacher; its C is chosen by an inner, subject-level, stratified cross-validation on
the training part of each fold only, so no choice ever sees a test clip. The pooled out-of-fold AUC with
DeLong's CI is what the teacher is reported against: a teacher below it has not learned the motion. The
cross-validation is :func:`endodistill.train.logreg_cv.cross_validated_logreg`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# Cells per side of the pooled feature maps.
GRID = 4


def features_name(grid: int) -> str:
    """A one-line description of :func:`clip_motion_features` (stored next to the results)."""
    return (
        f"log temporal std + log mean |frame difference| per pixel, average-pooled on a {grid}x{grid} grid "
        f"({2 * grid * grid} features); L2 logistic regression, C by inner CV on the training part"
    )


def clip_motion_features(clips: Tensor | np.ndarray, grid: int = 4) -> np.ndarray:
    """Motion features of clips ``(N, 1, T, H, W)`` (or ``(N, T, H, W)``), values in [0, 1].

    Args:
        clips: the preprocessed clips, at least 2 frames each.
        grid: pooled cells per side.

    Returns:
        ``(N, 2 * grid * grid)`` float64: log temporal std, then log mean absolute frame difference, each
        average-pooled per cell.
    """
    x = torch.as_tensor(np.asarray(clips) if not isinstance(clips, Tensor) else clips, dtype=torch.float32)
    if x.dim() == 4:
        x = x[:, None]
    if x.dim() != 5 or x.shape[2] < 2:
        raise ValueError(f"clips must be (N, 1, T, H, W) with T >= 2, got {tuple(x.shape)}")
    std = x.std(dim=2, unbiased=False)  # (N, C, H, W): how much each pixel changes over the clip
    diff = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=2)  # how fast it changes
    feats = [
        torch.nn.functional.adaptive_avg_pool2d(m, grid).flatten(1) for m in (std, diff)
    ]  # coarse cells: the positions of uterus and rectum vary between clips
    # log: motion energy spans orders of magnitude between clips (pressure, gain, noise).
    return torch.log(torch.cat(feats, dim=1) + 1e-4).double().numpy()
