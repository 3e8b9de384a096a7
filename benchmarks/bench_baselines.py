"""The ``logreg`` baseline's inner search for C against the naive scikit-learn search, on one demo fold.

Run: ``.venv/bin/python -m benchmarks.bench_baselines [--n 200] [--out results.json]``.

Issue 12 measured a naive scikit-learn inner search (``GridSearchCV`` of ``LogisticRegression`` over the
C grid, 5 inner folds, on the 16 x 32 x 32 = 16,384 standardised voxels) at 31-40 s per fold. The baseline
instead reduces the fold exactly to the training rows' span (``reduce_fold``: the representer theorem) and
searches C by warm-started Newton steps (``choose_c``). Both are timed here on the same synthetic fold (160
training, 40 test volumes of the demo grid; ``--manifest`` for a real cohort's volumes) in the same run, and their chosen C and test predictions are
compared (they solve the same problem).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> int:
    """Time both searches and print their ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="volumes (4/5 train, 1/5 test)")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    ap.add_argument(
        "--manifest", type=Path, default=None, help="time on this cohort's labelled MRI (demo preprocessing)"
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from endodistill.config import LogRegBaselineConfig
    from endodistill.train.baselines import choose_c, fit_logreg, reduce_fold

    rng = np.random.default_rng(0)
    d = 16 * 32 * 32
    if args.manifest is not None:
        from endodistill.config import load_config
        from endodistill.train.data import load_cohort

        lab = load_cohort(load_config("demo", [f"data.manifest={args.manifest}"]), args.manifest).labelled
        x = lab.x.reshape(len(lab), -1).numpy()[: args.n]
        y = lab.labels[: args.n].astype(np.int64)
        d = x.shape[1]
    else:
        # Random voxels with a weak linear signal (scikit-learn converges faster here than on real volumes).
        y = (rng.random(args.n) < 0.3).astype(np.int64)
        x = rng.normal(size=(args.n, d)).astype(np.float32)
        x += 0.02 * y[:, None] * rng.normal(size=d).astype(np.float32)
    test = np.arange(0, args.n, 5)
    train = np.setdiff1d(np.arange(args.n), test)
    cfg = LogRegBaselineConfig()
    grid = [c / d for c in cfg.c_grid]

    t0 = time.perf_counter()
    fold = reduce_fold(x, train, test)
    c_ours, _ = choose_c(fold.z_train, y[train], grid, cfg.inner_folds, seed=0)
    p_ours = fit_logreg(fold.z_train, y[train], c_ours).predict_proba(fold.z_test)[:, 1]
    ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-8
    search = GridSearchCV(
        LogisticRegression(max_iter=2000, tol=1e-6),
        {"C": grid},
        cv=StratifiedKFold(cfg.inner_folds, shuffle=True, random_state=0),
        scoring="roc_auc",
    ).fit((x[train] - mu) / sd, y[train])
    p_naive = search.predict_proba((x[test] - mu) / sd)[:, 1]
    naive = time.perf_counter() - t0

    c_naive = float(search.best_params_["C"])
    res = {
        "ours_s": round(ours, 3),
        "naive_sklearn_s": round(naive, 3),
        "ratio_ours_over_naive": round(ours / naive, 4),
        "c_ours": c_ours * d,
        "c_naive": c_naive * d,
        "max_abs_prob_diff_at_own_c": float(np.abs(p_ours - p_naive).max()),
    }
    print(f"logreg inner search for C on one fold ({train.size} train, {test.size} test, {d} voxels):")
    print(
        f"  exact row-space reduction + Newton: {ours:.2f} s   naive scikit-learn GridSearchCV: {naive:.2f} s"
    )
    print(
        f"  ratio ours / naive: {ours / naive:.4f}; chosen C (x voxels): ours {c_ours * d:g}, naive {c_naive * d:g}"
    )
    print(f"  largest test-probability difference: {res['max_abs_prob_diff_at_own_c']:.2e}")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
