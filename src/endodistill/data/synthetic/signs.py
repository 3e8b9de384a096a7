"""The latent generative model of the synthetic cohort and its Bayes oracle.

Each subject has a label ``y`` (1 = POD obliterated). MRI shows ``y`` only through binary latent signs
that are conditionally independent given ``y`` (a naive-Bayes model, so the exact posterior is cheap);
each sign occurs in only some positives and in some negatives. TVUS shows ``y`` through one continuous
latent, the sliding fraction ``f`` (1 = the rectum glides freely over the uterus, 0 = it moves with it),
drawn from a Beta distribution per class. The oracle is the exact posterior ``P(y=1 | latents)``; its AUC
is the ceiling any model can reach from the images.

A per-subject latent severity ``z ~ N(0, 1)`` can couple the two modalities of the same subject (the
pairing study): with ``coupling`` ``c > 0`` a severe case (large ``z``) has more MRI signs and less
sliding, through a Gaussian copula that keeps every per-class marginal (``P(sign | y)`` and the Beta of
``f``) exactly as without it, so the TVUS ceiling is unchanged. The MRI signs are then dependent given
``y`` (they share ``z``); :func:`mri_oracle` integrates ``z`` out (Gauss-Hermite quadrature) and stays the
exact posterior. With ``c = 0`` (the default) nothing changes: same draws, same files.
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


# Gauss-Hermite nodes/weights for E[g(z)], z ~ N(0, 1) (probabilists' Hermite polynomials).
_GH_Z, _GH_W = np.polynomial.hermite_e.hermegauss(48)
_GH_W = _GH_W / _GH_W.sum()


def draw_severity(rng: np.random.Generator) -> float:
    """The subject's latent severity ``z ~ N(0, 1)`` (its own stream, shared by both modalities)."""
    return float(rng.standard_normal())


def draw_mri_signs(
    rng: np.random.Generator, label: int, severity: float = 0.0, coupling: float = 0.0
) -> dict[str, int]:
    """Draw the binary MRI signs of one subject with label ``label`` (and severity, when coupled)."""
    u = rng.random(len(MRI_SIGNS))
    if coupling > 0:
        # Present iff Phi(sqrt(1 - c^2) e - c z) < p: still probability p given y, more likely when z is large.
        e = stats.norm.ppf(u)
        u = stats.norm.cdf(np.sqrt(1 - coupling**2) * e - coupling * severity)
    return {name: int(u[i] < p[0 if label else 1]) for i, (name, p) in enumerate(MRI_SIGNS.items())}


def _sign_probs(label: int, coupling: float, names: list[str] | None = None) -> np.ndarray:
    """``P(sign present | y, z)`` at the quadrature nodes: ``(n_signs, n_nodes)`` (``names``: those signs)."""
    p = np.array([MRI_SIGNS[n][0 if label else 1] for n in (MRI_SIGNS if names is None else names)])
    if coupling <= 0:
        return np.repeat(p[:, None], _GH_Z.size, axis=1)
    return stats.norm.cdf((stats.norm.ppf(p)[:, None] + coupling * _GH_Z[None, :]) / np.sqrt(1 - coupling**2))


def _pattern_likelihood(
    present: np.ndarray, label: int, coupling: float, names: list[str] | None = None
) -> np.ndarray:
    """``P(signs | y)`` of sign patterns ``(n_patterns, n_signs)`` bool, severity integrated out.

    With ``names``, the patterns are of those signs only: the others, independent of them given ``(y, z)``,
    are summed out.
    """
    q = _sign_probs(label, coupling, names)  # (S, G)
    per = np.where(present[:, :, None], q[None], 1 - q[None])  # (N, S, G)
    return per.prod(axis=1) @ _GH_W


def mri_oracle(signs: Mapping[str, int], prevalence: float, coupling: float = 0.0) -> float:
    """Exact posterior ``P(y=1 | signs)`` under the generative model.

    Args:
        signs: sign name -> 0/1 (every name of :data:`MRI_SIGNS`).
        prevalence: prior ``P(y=1)``.
        coupling: the cohort's severity coupling (0: signs independent given ``y``).

    Returns:
        The posterior probability.
    """
    if coupling > 0:
        present = np.array([[bool(int(signs[n])) for n in MRI_SIGNS]])
        l1 = float(_pattern_likelihood(present, 1, coupling)[0])
        l0 = float(_pattern_likelihood(present, 0, coupling)[0])
        return float(prevalence * l1 / (prevalence * l1 + (1 - prevalence) * l0))
    log_lr = 0.0
    for name, (p1, p0) in MRI_SIGNS.items():
        present_k = bool(int(signs[name]))
        log_lr += np.log(p1 / p0) if present_k else np.log((1 - p1) / (1 - p0))
    log_odds = log_lr + np.log(prevalence / (1 - prevalence))
    return float(1.0 / (1.0 + np.exp(-log_odds)))


def draw_tvus_sliding(
    rng: np.random.Generator, label: int, severity: float = 0.0, coupling: float = 0.0
) -> float:
    """Draw the sliding fraction of one subject (clipped away from exactly 0 and 1)."""
    a, b = TVUS_SLIDING_BETA[int(label)]
    if coupling > 0:
        # The Beta quantile of a copula draw: same Beta given y, less sliding when z is large.
        v = stats.norm.cdf(np.sqrt(1 - coupling**2) * stats.norm.ppf(rng.random()) - coupling * severity)
        return float(np.clip(stats.beta.ppf(v, a, b), _F_EPS, 1 - _F_EPS))
    return float(np.clip(rng.beta(a, b), _F_EPS, 1 - _F_EPS))


def tvus_oracle(sliding: float, prevalence: float) -> float:
    """Exact posterior ``P(y=1 | sliding fraction)`` under the generative model."""
    f = float(np.clip(sliding, _F_EPS, 1 - _F_EPS))
    l1 = stats.beta.logpdf(f, *TVUS_SLIDING_BETA[1])
    l0 = stats.beta.logpdf(f, *TVUS_SLIDING_BETA[0])
    log_odds = l1 - l0 + np.log(prevalence / (1 - prevalence))
    return float(1.0 / (1.0 + np.exp(-log_odds)))


def population_ceilings(coupling: float = 0.0, signs: list[str] | None = None) -> dict[str, float]:
    """The oracle AUC over the whole population (infinite cohort), for MRI and TVUS.

    MRI: exact, by enumerating every sign pattern (severity integrated out when coupled). TVUS: the
    likelihood ratio is monotone in ``f``, so AUC = P(f_neg > f_pos) = integral of pdf_0(f) * CDF_1(f)
    (the coupling keeps the Beta marginals, so it does not change).

    Args:
        coupling: the cohort's severity coupling.
        signs: the MRI ceiling of the posterior from only these signs (default: all), e.g. those a
            preprocessing grid shows (``baselines.sign_visibility``): what a model that reads them perfectly,
            and sees nothing of the others, reaches.
    """
    names = list(MRI_SIGNS) if signs is None else [n for n in MRI_SIGNS if n in set(signs)]
    if signs is not None and len(names) != len(set(signs)):
        raise ValueError(f"unknown MRI signs {sorted(set(signs) - set(MRI_SIGNS))}; known: {list(MRI_SIGNS)}")
    patterns = np.array(list(itertools.product((0, 1), repeat=len(names))), dtype=bool)
    if coupling > 0:
        w1 = _pattern_likelihood(patterns, 1, coupling, names)
        w0 = _pattern_likelihood(patterns, 0, coupling, names)
    else:
        p1 = np.array([MRI_SIGNS[n][0] for n in names])
        p0 = np.array([MRI_SIGNS[n][1] for n in names])
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
