"""The latent generative model of the synthetic cohort and its Bayes oracle.

Each subject has a label ``y`` (1 = POD obliterated). MRI shows ``y`` only through binary latent signs
that are conditionally independent given ``y`` (a naive-Bayes model, so the exact posterior is cheap);
each sign occurs in only some positives and in some negatives. TVUS shows ``y`` through one continuous
latent, the sliding fraction ``f`` (1 = the rectum glides freely over the uterus, 0 = it moves with it),
drawn from a Beta distribution per class. The oracle is the exact posterior ``P(y=1 | latents)``; its AUC
is the ceiling any model can reach from the images.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np
from scipy import integrate, stats

# P(sign present | y=1), P(sign present | y=0). Chosen so the population MRI ceiling is about 0.87;
# the subtle signs alone give 0.58-0.65 each.
MRI_SIGNS: dict[str, tuple[float, float]] = {
    # The one gross sign (uterine position): alone it gives AUC 0.70, what a small model can learn.
    "retroflexion": (0.55, 0.15),
    "tethered_rectum": (0.45, 0.15),
    "strands": (0.35, 0.10),
    "serosal_plaque": (0.30, 0.08),
    "no_pod_fluid": (0.80, 0.50),
    "elevated_fornix": (0.30, 0.12),
}

# Sliding fraction f ~ Beta(a, b) per class; population TVUS ceiling about 0.98.
TVUS_SLIDING_BETA: dict[int, tuple[float, float]] = {0: (4.0, 1.5), 1: (1.2, 5.0)}

_F_EPS = 1e-4


def draw_mri_signs(rng: np.random.Generator, label: int) -> dict[str, int]:
    """Draw the binary MRI signs of one subject with label ``label``."""
    u = rng.random(len(MRI_SIGNS))
    return {name: int(u[i] < p[0 if label else 1]) for i, (name, p) in enumerate(MRI_SIGNS.items())}


def mri_oracle(signs: Mapping[str, int], prevalence: float) -> float:
    """Exact posterior ``P(y=1 | signs)`` under the generative model.

    Args:
        signs: sign name -> 0/1 (every name of :data:`MRI_SIGNS`).
        prevalence: prior ``P(y=1)``.

    Returns:
        The posterior probability.
    """
    log_lr = 0.0
    for name, (p1, p0) in MRI_SIGNS.items():
        present = bool(int(signs[name]))
        log_lr += np.log(p1 / p0) if present else np.log((1 - p1) / (1 - p0))
    log_odds = log_lr + np.log(prevalence / (1 - prevalence))
    return float(1.0 / (1.0 + np.exp(-log_odds)))


def draw_tvus_sliding(rng: np.random.Generator, label: int) -> float:
    """Draw the sliding fraction of one subject (clipped away from exactly 0 and 1)."""
    a, b = TVUS_SLIDING_BETA[int(label)]
    return float(np.clip(rng.beta(a, b), _F_EPS, 1 - _F_EPS))


def tvus_oracle(sliding: float, prevalence: float) -> float:
    """Exact posterior ``P(y=1 | sliding fraction)`` under the generative model."""
    f = float(np.clip(sliding, _F_EPS, 1 - _F_EPS))
    l1 = stats.beta.logpdf(f, *TVUS_SLIDING_BETA[1])
    l0 = stats.beta.logpdf(f, *TVUS_SLIDING_BETA[0])
    log_odds = l1 - l0 + np.log(prevalence / (1 - prevalence))
    return float(1.0 / (1.0 + np.exp(-log_odds)))


def population_ceilings() -> dict[str, float]:
    """The oracle AUC over the whole population (infinite cohort), for MRI and TVUS.

    MRI: exact, by enumerating every sign pattern. TVUS: the likelihood ratio is monotone in ``f``, so
    AUC = P(f_neg > f_pos) = integral of pdf_0(f) * CDF_1(f).
    """
    names = list(MRI_SIGNS)
    p1 = np.array([MRI_SIGNS[n][0] for n in names])
    p0 = np.array([MRI_SIGNS[n][1] for n in names])
    patterns = np.array(list(itertools.product((0, 1), repeat=len(names))), dtype=bool)
    w1 = np.prod(np.where(patterns, p1, 1 - p1), axis=1)
    w0 = np.prod(np.where(patterns, p0, 1 - p0), axis=1)
    score = np.log(w1) - np.log(w0)
    # AUC of a discrete score: P(s1 > s0) + 0.5 P(s1 == s0), summed over all pattern pairs.
    diff = score[:, None] - score[None, :]
    tie = np.isclose(diff, 0.0, atol=1e-12)
    auc = float((w1[:, None] * w0[None, :] * np.where(tie, 0.5, diff > 0)).sum())
    b0, b1 = stats.beta(*TVUS_SLIDING_BETA[0]), stats.beta(*TVUS_SLIDING_BETA[1])
    tvus, _ = integrate.quad(lambda f: b0.pdf(f) * b1.cdf(f), 0.0, 1.0, limit=200)
    return {"mri": round(float(auc), 4), "tvus": round(float(tvus), 4)}
