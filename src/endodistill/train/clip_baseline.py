"""A simple reference for the teacher: logistic regression on hand-made motion features of the clips.

The sliding sign is motion, so the cheapest model that can see it is a linear one on how much each part of
the image moves. Two feature sets (``teacher.clip_features``):

- ``grey``: each preprocessed clip (the frames the teacher sees at evaluation) summarised on a coarse
  ``grid x grid`` grid by two pooled maps, each pixel's temporal standard deviation and its mean absolute
  frame-to-frame difference (log-scaled);
- ``coupling`` (when the teacher reads optical flow): the 25th percentile of the clip's *coupling map*, each
  moving pixel's share of the clip's dominant motion (:func:`coupling_map`). Under probe pressure the uterus
  moves fully; the rectum follows with ``1 - f`` of that motion where it is tethered, and stays where it
  glides. A low percentile of the map is how much of the field stays behind: a statistic of the sign
  alone, whatever the positions of uterus and rectum in the clip.

An L2 logistic regression (scikit-learn) is fitted on the same subject-level folds as the teacher; its C is
chosen by an inner, subject-level, stratified cross-validation on the training part of each fold only, so no
choice ever sees a test clip. The pooled out-of-fold AUC with DeLong's CI is what the teacher is reported
against: a teacher below it has not learned what its input shows. The cross-validation is
:func:`endodistill.train.logreg_cv.cross_validated_logreg`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# Cells per side of the pooled feature maps.
GRID = 4
# Percentile(s) of the coupling map. Session 11, demo cohorts of seeds 10-12, 5 stratified folds of their
# clips (`python -m benchmarks.flow_signal`): the 25th alone 0.958, the 10th, 25th and 50th 0.949, nine from
# the 10th to the 90th 0.940, ten from the 5th to the 50th 0.942; the grey-frame features 0.855. One number.
COUPLING_QUANTILES: tuple[float, ...] = (0.25,)
# Pixels whose motion energy over the clip is below this are outside the fan (no echo, no flow).
_STILL = 1e-8


def features_name(grid: int) -> str:
    """A one-line description of :func:`clip_motion_features` (stored next to the results)."""
    return (
        f"log temporal std + log mean |frame difference| per pixel, average-pooled on a {grid}x{grid} grid "
        f"({2 * grid * grid} features); L2 logistic regression, C by inner CV on the training part"
    )


def coupling_name(quantiles: tuple[float, ...] = COUPLING_QUANTILES) -> str:
    """A one-line description of :func:`clip_coupling_features` (stored next to the results)."""
    pct = ", ".join(f"{100 * q:g}" for q in quantiles)
    return (
        f"percentile(s) {pct} of the coupling map (each moving pixel's share of the clip's dominant motion, "
        f"from the teacher's optical flow); L2 logistic regression, C by inner CV on the training part"
    )


def coupling_map(motion: Tensor) -> Tensor:
    """Each pixel's share of its clip's dominant motion: ``(B, H, W)`` from motion ``(B, 2, T, H, W)``.

    The pixels' trajectories (their x, y motion over the T steps) form an ``(H W, 2 T)`` matrix per clip. Its
    first singular direction, without centring (the motion itself is the signal, not its deviation), is the
    manoeuvre's trajectory, and each pixel's projection on it is how far that pixel follows it: 1 where tissue
    moves with the uterus, near 0 where it stays. Scaled so that the 90th percentile of its magnitude is 1
    and signed so that most of the field moves positively, which makes it independent of the pressure's
    amplitude, direction and phase. Written here: a rank-1 SVD of the motion field, which no video library
    offers as a transform.

    Args:
        motion: motion between consecutive frames, channels (x, y).

    Returns:
        The coupling map of each clip (0 where nothing moves).
    """
    if motion.dim() != 5 or motion.shape[1] != 2:
        raise ValueError(f"motion must be (B, 2, T, H, W), got {tuple(motion.shape)}")
    b, c, t, h, w = motion.shape
    traj = motion.permute(0, 3, 4, 1, 2).reshape(b, h * w, c * t).double()
    u, s, _ = torch.linalg.svd(traj, full_matrices=False)
    g = u[:, :, 0] * s[:, :1]
    g = g * torch.where(g.sum(dim=1, keepdim=True) < 0, -1.0, 1.0).to(g)
    scale = torch.quantile(g.abs(), 0.9, dim=1, keepdim=True).clamp_min(1e-12)
    return (g / scale).reshape(b, h, w)


def displacement_motion(displacement: Tensor | np.ndarray) -> Tensor:
    """Motion between consecutive frames ``(N, 2, T - 1, H, W)`` (float64) of displacement fields ``(N, 2, T, H, W)``.

    Raises:
        ValueError: not ``(N, 2, T, H, W)`` with T >= 2.
    """
    d = torch.as_tensor(displacement)
    if d.dim() != 5 or d.shape[1] != 2 or d.shape[2] < 2:
        raise ValueError(f"displacement must be (N, 2, T, H, W) with T >= 2, got {tuple(d.shape)}")
    return (d[:, :, 1:] - d[:, :, :-1]).double()


def coupling_percentiles(
    motion: Tensor, g: Tensor, quantiles: tuple[float, ...] = COUPLING_QUANTILES
) -> np.ndarray:
    """Percentiles ``(N, len(quantiles))`` of coupling maps ``g`` (N, H, W) over the pixels that move.

    Args:
        motion: the motion the maps were computed from, ``(N, 2, T, H, W)`` (which pixels move).
        g: :func:`coupling_map` of ``motion``.
        quantiles: fractions in [0, 1]; a clip where nothing moves gives zeros.
    """
    flat = g.flatten(1)
    moving = motion.pow(2).sum(dim=(1, 2)).flatten(1) > _STILL
    q = torch.tensor(quantiles, dtype=flat.dtype)
    rows = [
        torch.quantile(gi[mi], q) if bool(mi.any()) else torch.zeros_like(q) for gi, mi in zip(flat, moving)
    ]
    return torch.stack(rows).double().numpy()


def clip_coupling_features(
    displacement: Tensor | np.ndarray, quantiles: tuple[float, ...] = COUPLING_QUANTILES
) -> np.ndarray:
    """Percentiles of the coupling map of clips given as displacement fields ``(N, 2, T, H, W)``.

    Args:
        displacement: each frame's displacement from the first (the teacher's flow input), T >= 2.
        quantiles: which percentiles (fractions in [0, 1]) of the map over the pixels that move.

    Returns:
        ``(N, len(quantiles))`` float64.
    """
    motion = displacement_motion(displacement)
    return coupling_percentiles(motion, coupling_map(motion), quantiles)


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
