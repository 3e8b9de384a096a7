"""The dataset fingerprint: what the training data looked like, and how far a new input is from it.

nnU-Net records a "dataset fingerprint" (spacings, sizes, intensity statistics) before it plans a model;
we keep the same habit for a different purpose: a deployed model should say when a scan or clip looks
nothing like what it was trained on (a male prostate MRI given to a POD model, a 0.5 mm research scan
given to a model trained at 1.5 mm). No library computes this for our inputs, so it is written here
(NumPy only, no torch).

Per input (:func:`volume_stats`, :func:`clip_stats`) we record geometry and the intensity quantiles of
the PREPROCESSED input (after percentile normalisation), because raw MRI units are arbitrary per scanner;
raw percentiles are kept for information only. :func:`build_fingerprint` summarises a training set per
modality and site; :func:`check_input` returns one readable warning per property outside the training
range (with a tolerance), never a refusal (``predict --strict`` decides that).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
FILE_NAME = "fingerprint.json"
QUANTILE_LEVELS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
_AXES = ("finest axis", "middle axis", "coarsest axis")
# Relative tolerance on spacing and frame rate, and the factor on the field of view / duration / frame
# size, beyond the training range: resampling makes small differences harmless, a factor 1.5 is not.
_SPACING_TOL = 0.10
_SIZE_FACTOR = 1.5
# Intensity: a case is far when its quantile curve is further from the training median curve than
# 1.5x the furthest training case (and at least 0.05 in normalised units, for very uniform training sets).
_INTENSITY_FACTOR = 1.5
_INTENSITY_FLOOR = 0.05


def _quantiles(arr: np.ndarray) -> list[float]:
    return [round(float(v), 5) for v in np.quantile(np.asarray(arr, dtype=np.float32), QUANTILE_LEVELS)]


def volume_stats(array: np.ndarray, spacing: Sequence[float], preprocessed: np.ndarray) -> dict[str, Any]:
    """Geometry and intensity facts of one volume.

    Args:
        array: the source voxels (file order).
        spacing: voxel size in mm along the array's axes.
        preprocessed: the model-grid input made from it (normalised intensities).

    Returns:
        ``spacing_mm`` and ``fov_mm`` sorted from the finest axis to the coarsest, ``shape`` in the same
        order, ``intensity_q`` (quantiles of the preprocessed input at :data:`QUANTILE_LEVELS`) and
        ``raw_percentiles`` (1, 50, 99 of the source voxels, in the file's units).
    """
    sp = np.asarray(spacing, dtype=np.float64)
    order = np.argsort(sp, kind="stable")
    shape = np.asarray(array.shape[:3], dtype=np.int64)
    return {
        "spacing_mm": [round(float(v), 4) for v in sp[order]],
        "shape": [int(v) for v in shape[order]],
        "fov_mm": [round(float(v), 2) for v in (sp * shape)[order]],
        "intensity_q": _quantiles(preprocessed),
        "raw_percentiles": [round(float(v), 4) for v in np.percentile(array, [1.0, 50.0, 99.0])],
    }


def clip_stats(frames: np.ndarray, fps: float, preprocessed: np.ndarray) -> dict[str, Any]:
    """Timing, size and intensity facts of one clip.

    Args:
        frames: the source frames ``(T, H, W)``.
        fps: frames per second.
        preprocessed: the teacher-grid clip made from it (intensities in [0, 1]).
    """
    n = int(frames.shape[0])
    return {
        "fps": round(float(fps), 4),
        "n_frames": n,
        "duration_s": round(n / float(fps), 4) if fps > 0 else 0.0,
        "height": int(frames.shape[1]),
        "width": int(frames.shape[2]),
        "intensity_q": _quantiles(preprocessed),
    }


def _summary(values: Iterable[float]) -> dict[str, float]:
    v = np.asarray(list(values), dtype=np.float64)
    q = np.percentile(v, [0, 5, 50, 95, 100])
    return {k: round(float(x), 4) for k, x in zip(("min", "p05", "median", "p95", "max"), q)}


def _scalars(stats: Mapping[str, Any]) -> dict[str, float]:
    """The scalar properties compared against the training range, by name."""
    if "spacing_mm" in stats:
        out = {f"spacing_mm[{i}]": float(v) for i, v in enumerate(stats["spacing_mm"])}
        out.update({f"fov_mm[{i}]": float(v) for i, v in enumerate(stats["fov_mm"])})
        return out
    return {k: float(stats[k]) for k in ("fps", "duration_s", "height", "width")}


def _distance(q: Sequence[float] | np.ndarray, ref: Sequence[float] | np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(q, dtype=np.float64) - np.asarray(ref, dtype=np.float64))))


def summarise(entries: Sequence[Mapping[str, Any]], sites: Sequence[str] | None = None) -> dict[str, Any]:
    """The fingerprint of one modality: ranges of every scalar, intensity reference, per-site summaries.

    Args:
        entries: per-input stats from :func:`volume_stats` or :func:`clip_stats`.
        sites: the site of each entry (the manifest's ``site`` column), or None.
    """
    if not entries:
        return {"n": 0}
    names = list(_scalars(entries[0]))
    scal = [_scalars(e) for e in entries]
    q = np.asarray([e["intensity_q"] for e in entries], dtype=np.float64)
    median_q = np.median(q, axis=0)
    dist = np.asarray([_distance(row, median_q) for row in q])
    out: dict[str, Any] = {
        "n": len(entries),
        "ranges": {k: _summary(s[k] for s in scal) for k in names},
        "intensity": {
            "quantile_levels": list(QUANTILE_LEVELS),
            "median": [round(float(v), 5) for v in median_q],
            "distance_max": round(float(dist.max()), 5),
            "distance_p95": round(float(np.percentile(dist, 95)), 5),
        },
    }
    if sites is not None:
        by_site: dict[str, Any] = {}
        for site in sorted({s or "" for s in sites}):
            idx = [i for i, s in enumerate(sites) if (s or "") == site]
            sub = [entries[i] for i in idx]
            rec: dict[str, Any] = {"n": len(idx)}
            for key in ("spacing_mm", "fov_mm", "raw_percentiles", "fps", "duration_s"):
                if key in sub[0]:
                    rec[f"{key}_median"] = np.round(np.median([e[key] for e in sub], axis=0), 4).tolist()
            rec["intensity_q_median"] = np.round(np.median(q[idx], axis=0), 5).tolist()
            by_site[site or "(no site)"] = rec
        out["sites"] = by_site
    return out


def build_fingerprint(modalities: Mapping[str, Mapping[str, Any]], synthetic: bool) -> dict[str, Any]:
    """The run's fingerprint (``fingerprint.json``).

    Args:
        modalities: modality name -> :func:`summarise` output.
        synthetic: whether the training data is the generated synthetic cohort.
    """
    return {"schema_version": SCHEMA_VERSION, "synthetic": bool(synthetic), "modalities": dict(modalities)}


def _axis(name: str) -> str:
    return _AXES[int(name[name.index("[") + 1])] if "[" in name else name


def check_input(fingerprint: Mapping[str, Any] | None, modality: str, stats: Mapping[str, Any]) -> list[str]:
    """Warnings for one input against the training fingerprint (empty when it looks like training data).

    Args:
        fingerprint: the model's fingerprint (``None``: nothing to compare with, no warning).
        modality: the input's modality (``mri``, ``tvus``).
        stats: the input's :func:`volume_stats` / :func:`clip_stats`.

    Returns:
        One sentence per property outside the training range, e.g. ``"voxel spacing 0.50 mm (finest axis)
        outside the training range 1.25-1.50 mm"``.
    """
    if not fingerprint:
        return []
    ref = (fingerprint.get("modalities") or {}).get(modality) or {}
    if not ref.get("n"):
        return []
    warnings: list[str] = []
    for name, v in _scalars(stats).items():
        r = ref["ranges"].get(name)
        if r is None:
            continue
        lo, hi = float(r["min"]), float(r["max"])
        base = name.split("[")[0]
        if base in ("spacing_mm", "fps"):
            if v < lo * (1 - _SPACING_TOL) or v > hi * (1 + _SPACING_TOL):
                what = "voxel spacing" if base == "spacing_mm" else "frame rate"
                unit = "mm" if base == "spacing_mm" else "fps"
                where = f" ({_axis(name)})" if base == "spacing_mm" else ""
                warnings.append(
                    f"{what} {v:.2f} {unit}{where} outside the training range {lo:.2f}-{hi:.2f} {unit}"
                )
        elif v < lo / _SIZE_FACTOR or v > hi * _SIZE_FACTOR:
            ratio = (lo / v) if v < lo else (v / hi)
            side = "smaller" if v < lo else "larger"
            label = {
                "fov_mm": f"field of view ({_axis(name)})",
                "duration_s": "clip duration",
                "height": "frame height",
                "width": "frame width",
            }[base]
            unit = {"fov_mm": " mm", "duration_s": " s", "height": " px", "width": " px"}[base]
            n = 1 if base == "duration_s" else 0
            warnings.append(
                f"{label} {ratio:.1f}x {side} than in training "
                f"({v:.{n}f}{unit} vs {lo:.{n}f}-{hi:.{n}f}{unit})"
            )
    inten = ref.get("intensity") or {}
    if inten.get("median") and "intensity_q" in stats:
        d = _distance(stats["intensity_q"], inten["median"])
        limit = max(_INTENSITY_FACTOR * float(inten["distance_max"]), _INTENSITY_FLOOR)
        if d > limit:
            warnings.append(
                f"intensity distribution far from training (distance {d:.3f} from the training median, "
                f"training cases at most {float(inten['distance_max']):.3f})"
            )
    return warnings


def synthetic_note(fingerprint: Mapping[str, Any] | None) -> str:
    """The note every prediction of a model trained on synthetic data carries ('' otherwise)."""
    if fingerprint and fingerprint.get("synthetic"):
        return "model trained on the synthetic demo cohort: not evidence about real patients"
    return ""
