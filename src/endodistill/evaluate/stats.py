"""Per-method summaries and paired comparisons of the out-of-fold predictions.

``oof_rows`` are the rows of ``oof_predictions.csv``: dicts with ``subject_id, fold, method, label,
prob`` (strings as read by :mod:`csv`, or numbers). Methods are compared on the same subjects with
DeLong's test for correlated AUCs; p-values are adjusted across the whole family of comparisons.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import roc_curve

from endodistill.errors import InputError
from endodistill.evaluate.delong import delong_test
from endodistill.evaluate.metrics import binary_metrics

CORRECTIONS = ("holm", "bonferroni", "none")
OOF_COLUMNS = ("subject_id", "fold", "method", "label", "prob")


def read_oof_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read ``oof_predictions.csv`` into typed rows (fold and label int, prob float).

    Raises:
        InputError: missing file, missing columns or unparsable values.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in OOF_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(path, f"missing columns {missing}")
        rows = []
        for i, r in enumerate(reader, start=2):
            try:
                rows.append(_typed(r))
            except (TypeError, ValueError) as e:
                raise InputError(path, f"line {i}: {e}") from None
    return rows


def _typed(r: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "subject_id": str(r["subject_id"]),
        "fold": int(float(r["fold"])),
        "method": str(r["method"]),
        "label": int(float(r["label"])),
        "prob": float(r["prob"]),
    }


def _methods_in_order(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    # First-appearance order: the protocol writes methods in the config's order.
    return list(dict.fromkeys(str(r["method"]) for r in rows))


def _by_subject(rows: Sequence[Mapping[str, Any]], method: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if str(r["method"]) != method:
            continue
        t = _typed(r)
        if t["subject_id"] in out:
            raise ValueError(f"method {method!r}: subject {t['subject_id']!r} appears twice")
        out[t["subject_id"]] = t
    if not out:
        raise ValueError(f"no predictions for method {method!r}")
    return out


def _paired(
    rows: Sequence[Mapping[str, Any]], method_a: str, method_b: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b = _by_subject(rows, method_a), _by_subject(rows, method_b)
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise ValueError(
            f"{method_a!r} and {method_b!r} were not evaluated on the same subjects "
            f"(only in {method_a}: {only_a[:3]}{'...' if len(only_a) > 3 else ''}, "
            f"only in {method_b}: {only_b[:3]}{'...' if len(only_b) > 3 else ''})"
        )
    subjects = sorted(a)
    y = np.array([a[s]["label"] for s in subjects])
    if any(a[s]["label"] != b[s]["label"] for s in subjects):
        raise ValueError(f"{method_a!r} and {method_b!r} disagree on some subjects' labels")
    pa = np.array([a[s]["prob"] for s in subjects])
    pb = np.array([b[s]["prob"] for s in subjects])
    return y, pa, pb


def adjust_pvalues(pvalues: Sequence[float], correction: str = "holm") -> list[float]:
    """Multiple-comparison adjusted p-values.

    Holm-Bonferroni (step-down) written here in a few lines because statsmodels (``multipletests``)
    is not a dependency. NaN p-values stay NaN and do not count in the family size.

    Args:
        pvalues: raw p-values.
        correction: ``"holm"``, ``"bonferroni"`` or ``"none"``.

    Returns:
        Adjusted p-values in the input order, capped at 1.

    Raises:
        ValueError: unknown correction.
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r} (choose from {CORRECTIONS})")
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if correction == "none":
        out[ok] = p[ok]
    elif correction == "bonferroni":
        out[ok] = np.minimum(1.0, p[ok] * m)
    else:
        order = ok[np.argsort(p[ok], kind="stable")]
        # The i-th smallest p (0-based) is multiplied by m - i; a running max keeps the order monotone.
        scaled = np.minimum(1.0, p[order] * (m - np.arange(m)))
        out[order] = np.maximum.accumulate(scaled)
    return out.tolist()


def youden_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The highest threshold maximising sensitivity + specificity - 1 (a case is positive at ``p >= t``)."""
    fpr, tpr, thr = roc_curve(labels, probs, drop_intermediate=False)
    finite = np.isfinite(thr)
    j = tpr[finite] - fpr[finite]
    return float(thr[finite][int(np.argmax(j))])


def mcnemar_test(labels: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> dict[str, Any]:
    """Exact McNemar test of two classifiers' decisions on the same cases.

    Only the discordant cases count: ``a_only`` (A right, B wrong) and ``b_only``; under the null each
    discordant case is a fair coin, so the two-sided p is the exact binomial one (SciPy's ``binomtest``;
    exact rather than the chi-square approximation, because the demo's discordant counts are small).

    Returns:
        ``{"a_only": int, "b_only": int, "accuracy_a", "accuracy_b", "p"}`` (p = 1 with no discordance).
    """
    y = np.asarray(labels).astype(bool)
    ra = np.asarray(pred_a).astype(bool) == y
    rb = np.asarray(pred_b).astype(bool) == y
    a_only, b_only = int(np.sum(ra & ~rb)), int(np.sum(~ra & rb))
    n = a_only + b_only
    p = float(binomtest(min(a_only, b_only), n, 0.5).pvalue) if n else 1.0
    return {
        "a_only": a_only,
        "b_only": b_only,
        "accuracy_a": float(ra.mean()),
        "accuracy_b": float(rb.mean()),
        "p": p,
    }


def compare_methods(
    oof_rows: Sequence[Mapping[str, Any]],
    reference: str = "scratch_ce",
    full: str = "mae_kd_ce",
    correction: str = "holm",
    pairs: Sequence[tuple[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """DeLong tests of every method against ``reference`` and of ``full`` against every other method.

    Args:
        oof_rows: out-of-fold prediction rows.
        reference: the baseline every method is compared with.
        full: the full method, compared with every other method (the full-vs-reference pair once).
        correction: multiple-comparison correction over the whole family (see :func:`adjust_pvalues`).
        pairs: ``(a, b)`` pairs to test instead of the reference / full family (b is a's reference).

    Returns:
        One dict per comparison: ``method_a, method_b, n, n_pos, auc_a, auc_b, diff (a - b), se, z, p,
        p_adjusted, correction`` and ``mcnemar``: McNemar's test of the two methods' decisions at the
        Youden threshold of B, the pair's reference (the seed paper's check), with its own Holm-adjusted
        p over the family. One threshold for both, as asked of it; a method calibrated very differently
        from B is judged at B's operating point, which the DeLong test (threshold-free) is not.

    Raises:
        ValueError: unknown reference, different subject sets or labels between methods, a single class.
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r} (choose from {CORRECTIONS})")
    methods = _methods_in_order(oof_rows)
    if pairs is not None:
        unknown = sorted({m for pair in pairs for m in pair} - set(methods))
        if unknown:
            raise ValueError(f"compared method {unknown[0]!r} has no predictions (methods: {methods})")
        family = list(pairs)
    else:
        if reference not in methods:
            raise ValueError(f"reference method {reference!r} has no predictions (methods: {methods})")
        family = [(m, reference) for m in methods if m != reference]
        if full in methods:
            family += [(full, m) for m in methods if m not in (full, reference)]
    results: list[dict[str, Any]] = []
    for a, b in family:
        y, pa, pb = _paired(oof_rows, a, b)
        t = delong_test(y, pa, pb)
        mc: dict[str, Any] | None = None
        if 0 < y.sum() < y.size:
            thr = youden_threshold(y, pb)
            mc = {"threshold": thr, **mcnemar_test(y, pa >= thr, pb >= thr)}
        results.append(
            {
                "method_a": a,
                "method_b": b,
                "n": int(y.size),
                "n_pos": int(y.sum()),
                **t,
                "mcnemar": mc,
            }
        )
    adjusted = adjust_pvalues([r["p"] for r in results], correction)
    mc_adjusted = adjust_pvalues(
        [r["mcnemar"]["p"] if r["mcnemar"] else float("nan") for r in results], correction
    )
    for r, q, qm in zip(results, adjusted, mc_adjusted, strict=True):
        r["p_adjusted"] = q
        r["correction"] = correction
        if r["mcnemar"]:
            r["mcnemar"]["p_adjusted"] = qm
    return results


def per_fold_aucs(oof_rows: Sequence[Mapping[str, Any]], method: str) -> list[float]:
    """AUC of ``method`` within each fold, in fold order (NaN for a fold with a single class)."""
    by_fold: dict[int, list[dict[str, Any]]] = {}
    for t in _by_subject(oof_rows, method).values():
        by_fold.setdefault(t["fold"], []).append(t)
    out = []
    for fold in sorted(by_fold):
        rs = by_fold[fold]
        m = binary_metrics([r["label"] for r in rs], [r["prob"] for r in rs])
        out.append(float(m["auc"]))
    return out


def summarise_method(
    oof_rows: Sequence[Mapping[str, Any]], method: str, high_sensitivity: float = 0.9
) -> dict[str, Any]:
    """Pooled out-of-fold metrics (:func:`binary_metrics`) plus the per-fold AUCs.

    Returns:
        The pooled metrics plus ``fold_aucs``, ``fold_auc_mean`` and ``fold_auc_std`` (sample std,
        ddof=1, over folds with a defined AUC; NaN when none / fewer than two).
    """
    rows = list(_by_subject(oof_rows, method).values())
    out = binary_metrics([r["label"] for r in rows], [r["prob"] for r in rows], high_sensitivity)
    folds = per_fold_aucs(oof_rows, method)
    out["fold_aucs"] = folds
    out.update(fold_spread(folds))
    return out


def fold_spread(fold_aucs: Sequence[float]) -> dict[str, float]:
    """``fold_auc_mean`` and ``fold_auc_std`` (sample std, ddof=1) over the folds with a defined AUC.

    NaN for the mean when no fold has one, for the std when fewer than two do.
    """
    defined = [a for a in fold_aucs if math.isfinite(a)]
    return {
        "fold_auc_mean": float(np.mean(defined)) if defined else float("nan"),
        "fold_auc_std": float(np.std(defined, ddof=1)) if len(defined) > 1 else float("nan"),
    }


def summarise_methods(
    oof_rows: Sequence[Mapping[str, Any]], high_sensitivity: float = 0.9
) -> dict[str, dict[str, Any]]:
    """:func:`summarise_method` for every method in ``oof_rows`` (first-appearance order)."""
    return {m: summarise_method(oof_rows, m, high_sensitivity) for m in _methods_in_order(oof_rows)}


def nan_to_none(obj: Any) -> Any:
    """Replace NaN/inf floats by None recursively, so results.json stays strict JSON."""
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return nan_to_none(obj.tolist())
    return obj
