"""Unpaired, label-matched pairing of MRI cases with TVUS cases, and class-prototype KD targets.

The paper pairs every labelled MRI case with a TVUS case of the same label, drawn at random. Here the draw
is redone every epoch and is a pure function of ``(seed, epoch)`` (NumPy ``Generator``), so reruns and resumed
runs see the same pairs. Within a class the TVUS cases are used as evenly as possible: the MRI cases of the
class take the TVUS cases of the class in a random order, cycling through fresh random orders when there are
more MRI than TVUS cases (every TVUS case is used ``floor`` or ``ceil`` of ``n_mri / n_tvus`` times per epoch).
No library offers this sampler (samplers in torch/MONAI draw from one dataset), hence it is written here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

PAIRING_MODES = ("label_matched", "paired")


def _labels(values: Sequence[int | None] | np.ndarray | Tensor, name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.cpu().numpy()
    out = np.array(
        [-1 if v is None else int(v) for v in np.asarray(values, dtype=object).ravel()], dtype=np.int64
    )
    if out.size and out.min() < -1:
        raise ValueError(f"{name}: labels must be >= 0 (or None / -1 for unlabelled)")
    return out


def label_matched_pairs(
    mri_labels: Sequence[int | None] | np.ndarray | Tensor,
    tvus_labels: Sequence[int | None] | np.ndarray | Tensor,
    seed: int,
    epoch: int,
    mri_subjects: Sequence[str] | None = None,
    tvus_subjects: Sequence[str] | None = None,
    mode: str = "label_matched",
) -> np.ndarray:
    """A TVUS index for every MRI case, of the same label, drawn reproducibly from ``(seed, epoch)``.

    Args:
        mri_labels: labels of the MRI cases (None or -1: unlabelled, gets no partner).
        tvus_labels: labels of the TVUS cases (None or -1: unlabelled, never drawn).
        seed: the run's seed (>= 0).
        epoch: the epoch (>= 0); each epoch draws new pairs.
        mri_subjects: subject id of each MRI case (needed by ``paired``).
        tvus_subjects: subject id of each TVUS case (needed by ``paired``).
        mode: ``label_matched`` (the paper: any TVUS case of the same label) or ``paired`` (the subject's own
            TVUS case when it exists, label-matched otherwise).

    Returns:
        ``(n_mri,)`` int64 indices into the TVUS cases; -1 for unlabelled MRI cases.

    Raises:
        ValueError: an unknown mode, missing subject ids, mismatched lengths, a subject whose MRI and TVUS
            labels differ, or a label with MRI cases but no TVUS case (the class is named).
    """
    if mode not in PAIRING_MODES:
        raise ValueError(f"unknown pairing mode {mode!r} (known: {', '.join(PAIRING_MODES)})")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
    y_mri = _labels(mri_labels, "mri_labels")
    y_tvus = _labels(tvus_labels, "tvus_labels")
    rng = np.random.default_rng([seed, epoch])
    out = np.full(y_mri.shape, -1, dtype=np.int64)
    todo = y_mri >= 0

    if mode == "paired":
        if mri_subjects is None or tvus_subjects is None:
            raise ValueError("pairing mode 'paired' needs mri_subjects and tvus_subjects")
        if len(mri_subjects) != y_mri.size or len(tvus_subjects) != y_tvus.size:
            raise ValueError("subject lists must have one entry per case")
        own: dict[str, list[int]] = {}
        for j, s in enumerate(tvus_subjects):
            if y_tvus[j] >= 0:
                own.setdefault(str(s), []).append(j)
        for i, s in enumerate(mri_subjects):
            cands = own.get(str(s))
            if not todo[i] or not cands:
                continue
            bad = [j for j in cands if y_tvus[j] != y_mri[i]]
            if bad:
                raise ValueError(
                    f"subject {s!r}: MRI label {y_mri[i]} but TVUS label {y_tvus[bad[0]]} (inconsistent manifest)"
                )
            out[i] = cands[int(rng.integers(len(cands)))] if len(cands) > 1 else cands[0]
            todo[i] = False

    for k in np.unique(y_mri[todo]):
        who = np.flatnonzero(todo & (y_mri == k))
        pool = np.flatnonzero(y_tvus == k)
        if pool.size == 0:
            raise ValueError(
                f"class {k}: {who.size} MRI case(s) but no TVUS case with this label to pair with"
            )
        rounds = -(-who.size // pool.size)  # ceil
        order = np.concatenate([rng.permutation(pool) for _ in range(rounds)])
        out[who] = order[: who.size]
    return out


def class_prototypes(
    teacher_logits: Tensor | np.ndarray, tvus_labels: Sequence[int] | np.ndarray | Tensor, num_classes: int
) -> Tensor:
    """Mean teacher output of each class: the ``prototype`` KD targets.

    Args:
        teacher_logits: ``(n_tvus, D)`` teacher logits (D = K).
        tvus_labels: ``(n_tvus,)`` labels (negative values: unlabelled, ignored).
        num_classes: K.

    Returns:
        ``(K, D)`` float tensor; row k is the mean logit vector of the TVUS cases of class k. The target of an
        MRI case with label y is row y.

    Raises:
        ValueError: a class with no TVUS case (named), or mismatched lengths.
    """
    logits = torch.as_tensor(teacher_logits).float()
    y = torch.as_tensor(_labels(tvus_labels, "tvus_labels"))
    if logits.ndim != 2 or logits.shape[0] != y.numel():
        raise ValueError(
            f"teacher_logits {tuple(logits.shape)} must be (n_tvus, D) with n_tvus = {y.numel()}"
        )
    rows = []
    for k in range(num_classes):
        sel = y == k
        if not bool(sel.any()):
            raise ValueError(f"class {k}: no TVUS case with this label, cannot form its prototype")
        rows.append(logits[sel].mean(dim=0))
    return torch.stack(rows)


def noisy_partners(
    partners: np.ndarray,
    mri_labels: np.ndarray,
    tvus_labels: np.ndarray,
    fraction: float,
    seed: int,
    epoch: int,
) -> np.ndarray:
    """Replace a ``fraction`` of the partners by a clip of another class (label-matching noise).

    Each labelled MRI case independently gets, with probability ``fraction``, a uniformly drawn clip whose
    label differs from its own; the draw is a pure function of ``(seed, epoch)`` like the pairs themselves
    (its own stream, so ``fraction=0`` leaves the pairs exactly as they were).
    """
    out = np.asarray(partners, dtype=np.int64).copy()
    if fraction <= 0:
        return out
    y_mri = _labels(mri_labels, "mri_labels")
    y_tvus = _labels(tvus_labels, "tvus_labels")
    rng = np.random.default_rng([seed, epoch, 7919])
    flip = (rng.random(out.size) < fraction) & (y_mri >= 0)
    for i in np.flatnonzero(flip):
        others = np.flatnonzero((y_tvus >= 0) & (y_tvus != y_mri[i]))
        if others.size:
            out[i] = others[int(rng.integers(others.size))]
    return out


def control_targets(logits: Tensor, probs: Tensor, labels: np.ndarray, kind: str, seed: int) -> Tensor:
    """KD targets of the pool clips under a control of the kd_controls study (rows follow ``logits``).

    Args:
        logits: ``(n, K)`` teacher logits of the pool clips.
        probs: ``(n, K)`` their softmax probabilities.
        labels: ``(n,)`` their labels (all >= 0).
        kind: ``teacher`` (unchanged), ``class_mean`` (each clip gets its class's mean logits: in
            expectation what an unpaired, label-matched partner gives), ``smoothed_labels`` (logits of a
            label-smoothed one-hot, its true-class probability the teacher's mean probability of that class
            on its clips, shifted to the class-mean logits' mean so only the shape differs), ``permuted``
            (teacher outputs shuffled among the clips of each class, seeded).
        seed: the permutation's seed.

    Returns:
        ``(n, K)`` float targets in logit space.
    """
    logits = logits.float()
    if kind == "teacher":
        return logits
    y = torch.as_tensor(labels, dtype=torch.long)
    k = logits.shape[1]
    out = logits.clone()
    rng = np.random.default_rng([seed, 104729])
    for c in range(k):
        sel = torch.nonzero(y == c).flatten()
        if sel.numel() == 0:
            continue
        if kind == "class_mean":
            out[sel] = logits[sel].mean(0)
        elif kind == "smoothed_labels":
            conf = float(probs[sel, c].float().mean().clamp(1e-4, 1 - 1e-4))
            q = torch.full((k,), (1 - conf) / max(k - 1, 1))
            q[c] = conf
            lq = torch.log(q)
            out[sel] = lq - lq.mean() + logits[sel].mean(0).mean()
        elif kind == "permuted":
            perm = torch.from_numpy(rng.permutation(sel.numel()))
            out[sel] = logits[sel[perm]]
        else:
            raise ValueError(f"unknown KD target {kind!r}")
    return out
