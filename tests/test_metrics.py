"""Binary/multi-class metrics against scikit-learn, hand-computed ECE, and single-class folds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from endodistill.evaluate.metrics import (
    binary_metrics,
    calibration_points,
    expected_calibration_error,
    multiclass_auc,
    roc_points,
)


def _data(seed: int, n: int = 150) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    p = np.clip(np.round(rng.random(n) * 0.7 + 0.3 * y, 2), 0, 1)  # rounded: ties on purpose
    return y, p


def _rates(y: np.ndarray, p: np.ndarray, t: float) -> tuple[float, float]:
    pred = p >= t
    return float(pred[y == 1].mean()), float((~pred[y == 0]).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_against_sklearn_and_brute_force(seed: int) -> None:
    y, p = _data(seed)
    m = binary_metrics(y, p, high_sensitivity=0.9)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert m["auc_ci95"][0] < m["auc"] < m["auc_ci95"][1]
    assert (m["n"], m["n_pos"]) == (y.size, int(y.sum()))
    assert m["prevalence"] == pytest.approx(y.mean())
    assert "note" not in m
    # Brute force over every candidate threshold (the distinct scores).
    cands = sorted(set(p.tolist()), reverse=True)
    js = [sum(_rates(y, p, t)) - 1 for t in cands]
    best = max(js)
    t_youden = next(t for t, j in zip(cands, js, strict=True) if j >= best - 1e-12)
    assert m["youden"]["threshold"] == pytest.approx(t_youden)
    assert m["youden"]["j"] == pytest.approx(best)
    sens, spec = _rates(y, p, t_youden)
    assert (m["youden"]["sensitivity"], m["youden"]["specificity"]) == pytest.approx((sens, spec))
    t_hs = next(t for t in cands if _rates(y, p, t)[0] >= 0.9)
    hs = m["high_sensitivity"]
    assert hs["threshold"] == pytest.approx(t_hs) and hs["target"] == 0.9
    assert hs["sensitivity"] >= 0.9
    assert (hs["sensitivity"], hs["specificity"]) == pytest.approx(_rates(y, p, t_hs))


def test_ece_hand_computed() -> None:
    # One case per bin: (0.1 + 0.2 + 0.2 + 0.1) / 4.
    assert expected_calibration_error([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(0.15)
    # One bin, observed frequency 1/4 equals the mean probability: perfectly calibrated.
    assert expected_calibration_error([0, 0, 0, 1], [0.25] * 4) == pytest.approx(0.0)
    # Bin 0: |1 - 0.05|; bin 1: 2 cases, |0.5 - 0.135|; bin 9: |0 - 0.95|.
    y, p = [1, 0, 1, 0], [0.05, 0.15, 0.12, 0.95]
    assert expected_calibration_error(y, p) == pytest.approx((0.95 + 2 * 0.365 + 0.95) / 4)
    # Two bins: [0, 0.5) holds 0.3 (y 0) and 0.4 (y 1); [0.5, 1] holds 0.5 (y 1) and 1.0 (y 1).
    assert expected_calibration_error([0, 1, 1, 1], [0.3, 0.4, 0.5, 1.0], n_bins=2) == pytest.approx(
        (2 * abs(0.5 - 0.35) + 2 * abs(1.0 - 0.75)) / 4
    )
    # Bin edges: 0.3 belongs to [0.3, 0.4), not [0.2, 0.3).
    pts = calibration_points([0, 1], [0.3, 0.29])
    assert pts["count"] == [1, 1] and pts["mean_prob"] == pytest.approx([0.29, 0.3])


def test_calibration_points_match_ece() -> None:
    y, p = _data(7)
    pts = calibration_points(y, p)
    assert sum(pts["count"]) == y.size
    ece = sum(c * abs(o - q) for c, o, q in zip(pts["count"], pts["observed"], pts["mean_prob"], strict=True))
    assert ece / y.size == pytest.approx(expected_calibration_error(y, p))


def test_single_class_fold_gives_nan_with_note() -> None:
    m = binary_metrics([1, 1, 1], [0.2, 0.7, 0.9])
    assert math.isnan(m["auc"]) and all(math.isnan(v) for v in m["auc_ci95"])
    assert math.isnan(m["youden"]["threshold"])
    assert "one class" in m["note"]
    assert m["brier"] == pytest.approx(np.mean((1 - np.array([0.2, 0.7, 0.9])) ** 2))
    assert m["prevalence"] == 1.0
    assert roc_points([0, 0], [0.1, 0.2]) == {"fpr": [], "tpr": [], "thresholds": []}


def test_roc_points() -> None:
    y, p = _data(3)
    r = roc_points(y, p)
    assert r["fpr"][0] == 0 and r["tpr"][-1] == 1 and r["fpr"][-1] == 1
    assert np.trapezoid(r["tpr"], r["fpr"]) == pytest.approx(roc_auc_score(y, p))


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="0 or 1"):
        binary_metrics([0, 3], [0.1, 0.2])
    with pytest.raises(ValueError, match="within"):
        binary_metrics([0, 1], [0.1, 1.2])
    with pytest.raises(ValueError, match="equal length"):
        binary_metrics([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        expected_calibration_error([0, 1], [0.1, float("nan")])


def test_multiclass_auc_against_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    logits = rng.normal(size=(120, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    out = multiclass_auc(y, probs)
    assert out["macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    for k in range(3):
        assert out["per_class"][k] == pytest.approx(roc_auc_score(y == k, probs[:, k]))
    # A class absent from the labels is NaN and left out of the macro mean.
    y2 = np.where(y == 2, 1, y)
    out2 = multiclass_auc(y2, probs)
    assert math.isnan(out2["per_class"][2])
    assert out2["macro"] == pytest.approx(np.mean([out2["per_class"][0], out2["per_class"][1]]))
    with pytest.raises(ValueError):
        multiclass_auc([0, 3], np.ones((2, 3)) / 3)


# --- stats: Holm, paired comparisons, per-fold summaries ---------------------------------------------

from endodistill.evaluate.stats import (  # noqa: E402
    adjust_pvalues,
    compare_methods,
    nan_to_none,
    per_fold_aucs,
    summarise_method,
)

METHODS = ["scratch_ce", "mae_ce", "scratch_kd_ce", "mae_kd", "mae_kd_ce"]


def _oof(n: int = 60, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    folds = np.arange(n) % 5
    rows = []
    for k, method in enumerate(METHODS):
        p = 1 / (1 + np.exp(-(rng.normal(size=n) + 0.6 * k * (2 * y - 1))))
        rows += [
            {
                "subject_id": f"s{i:03d}",
                "fold": int(folds[i]),
                "method": method,
                "label": int(y[i]),
                "prob": p[i],
            }
            for i in range(n)
        ]
    return rows


def test_holm_known_example() -> None:
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm") -> 0.03 0.06 0.06 0.02
    assert adjust_pvalues([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert adjust_pvalues([0.01, 0.04, 0.03, 0.005], "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert adjust_pvalues([0.5, 0.4], "holm") == pytest.approx([0.8, 0.8])  # monotone, capped
    q = adjust_pvalues([0.01, float("nan"), 0.02])
    assert q[0] == pytest.approx(0.02) and math.isnan(q[1]) and q[2] == pytest.approx(0.02)
    with pytest.raises(ValueError):
        adjust_pvalues([0.1], "fdr")


def test_compare_methods_structure() -> None:
    rows = _oof()
    comps = compare_methods(rows, reference="scratch_ce", full="mae_kd_ce")
    pairs = [(c["method_a"], c["method_b"]) for c in comps]
    expected = [(m, "scratch_ce") for m in METHODS[1:]] + [("mae_kd_ce", m) for m in METHODS[1:4]]
    assert pairs == expected  # 4 vs reference + 3 full-vs-others, the full-vs-reference pair once
    for c in comps:
        assert set(c) >= {"auc_a", "auc_b", "diff", "z", "p", "p_adjusted", "correction", "n"}
        assert c["correction"] == "holm" and c["n"] == 60
        assert c["p_adjusted"] >= c["p"] - 1e-15
        assert c["diff"] == pytest.approx(c["auc_a"] - c["auc_b"])
    assert [c["p_adjusted"] for c in comps] == pytest.approx(adjust_pvalues([c["p"] for c in comps]))
    # Row order must not matter: pairing is by subject id.
    shuffled = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    again = {(c["method_a"], c["method_b"]): c["p"] for c in compare_methods(shuffled)}
    assert [again[p] for p in pairs] == pytest.approx([c["p"] for c in comps])
    # Different subject sets are an error, not a silent inner join.
    with pytest.raises(ValueError, match="same subjects"):
        compare_methods([r for r in rows if not (r["method"] == "mae_ce" and r["subject_id"] == "s005")])
    with pytest.raises(ValueError, match="reference"):
        compare_methods(rows, reference="nope")
    # Explicit pairs replace the reference / full family; Holm over those pairs only.
    chosen = [("mae_ce", "scratch_ce"), ("mae_kd_ce", "scratch_kd_ce")]
    paired = compare_methods(rows, pairs=chosen)
    assert [(c["method_a"], c["method_b"]) for c in paired] == chosen
    by_pair = {(c["method_a"], c["method_b"]): c for c in comps}
    assert paired[0]["p"] == pytest.approx(by_pair[chosen[0]]["p"])
    assert [c["p_adjusted"] for c in paired] == pytest.approx(adjust_pvalues([c["p"] for c in paired]))
    with pytest.raises(ValueError, match="'nope' has no predictions"):
        compare_methods(rows, pairs=[("nope", "scratch_ce")])


def test_mcnemar_against_a_hand_computation() -> None:
    from endodistill.evaluate.stats import mcnemar_test, youden_threshold

    # 10 cases: A right on 8, B right on 5; discordant: A only on 4 cases, B only on 1.
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    a = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1])
    b = np.array([1, 0, 0, 0, 1, 0, 0, 1, 0, 1])
    out = mcnemar_test(y, a, b)
    assert (out["a_only"], out["b_only"]) == (4, 1)
    assert out["accuracy_a"] == pytest.approx(0.8) and out["accuracy_b"] == pytest.approx(0.5)
    # Exact two-sided binomial: 2 * P(X <= 1 | n=5, 1/2) = 2 * (1 + 5) / 32 = 0.375.
    assert out["p"] == pytest.approx(0.375)
    assert mcnemar_test(y, a, a)["p"] == 1.0  # no discordant case
    # Youden's threshold: the highest cut that maximises TPR - FPR.
    assert youden_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.8)
    comps = compare_methods(_oof(), reference="scratch_ce", full="mae_kd_ce")
    for c in comps:
        mc = c["mcnemar"]
        assert mc["a_only"] + mc["b_only"] <= c["n"] and 0 <= mc["p"] <= mc["p_adjusted"] <= 1
    assert [c["mcnemar"]["p_adjusted"] for c in comps] == pytest.approx(
        adjust_pvalues([c["mcnemar"]["p"] for c in comps])
    )


def test_per_fold_and_summary() -> None:
    rows = _oof()
    folds = per_fold_aucs(rows, "mae_kd_ce")
    assert len(folds) == 5
    sub = [r for r in rows if r["method"] == "mae_kd_ce" and r["fold"] == 2]
    assert folds[2] == pytest.approx(roc_auc_score([r["label"] for r in sub], [r["prob"] for r in sub]))
    s = summarise_method(rows, "mae_kd_ce", high_sensitivity=0.8)
    assert s["fold_aucs"] == folds
    assert s["fold_auc_mean"] == pytest.approx(np.mean(folds))
    assert s["fold_auc_std"] == pytest.approx(np.std(folds, ddof=1))
    assert s["high_sensitivity"]["target"] == 0.8 and "auc_ci95" in s
    # A fold with a single class gives NaN there, and the summary stays finite; JSON gets None.
    rows1 = [dict(r, label=1) if r["fold"] == 0 else r for r in rows if r["method"] == "scratch_ce"]
    f1 = per_fold_aucs(rows1, "scratch_ce")
    assert math.isnan(f1[0]) and all(math.isfinite(a) for a in f1[1:])
    s1 = nan_to_none(summarise_method(rows1, "scratch_ce"))
    assert s1["fold_aucs"][0] is None and s1["fold_auc_mean"] == pytest.approx(np.mean(f1[1:]))
