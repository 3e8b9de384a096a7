"""The MAE linear-probe diagnostic: same-shape untrained encoders, training-part-only choices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from endodistill.config import load_config
from endodistill.evaluate.delong import delong_auc_ci
from endodistill.models.student import build_mae, mae_encoder_state
from endodistill.models.weights import save_weights
from endodistill.train.probe import encoder_features, mae_probe, probe_oof, untrained_seed
from endodistill.train.seeding import seed_all


def _folds(n: int, k: int = 4) -> list[np.ndarray]:
    # Labels alternate 0, 1 in these tests: pairs of neighbours go to the same fold, so folds are balanced.
    order = np.random.default_rng(0).permutation(n // 2)
    return [np.sort(np.r_[2 * order[f::k], 2 * order[f::k] + 1]) for f in range(k)]


def test_probe_reads_a_planted_feature_and_ignores_noise() -> None:
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 40)
    noise = rng.normal(size=(80, 5))
    signal = np.c_[y + 0.3 * rng.normal(size=80), noise]
    from sklearn.metrics import roc_auc_score

    # Close to the AUC of the planted feature itself (the best any probe can do here).
    assert roc_auc_score(y, probe_oof(signal, y, _folds(80))) > roc_auc_score(y, signal[:, 0]) - 0.06
    assert abs(roc_auc_score(y, probe_oof(noise, y, _folds(80))) - 0.5) < 0.2


def test_probe_test_predictions_do_not_depend_on_test_labels() -> None:
    rng = np.random.default_rng(1)
    y = np.tile([0, 1], 30)
    x = np.c_[y + rng.normal(size=60), rng.normal(size=(60, 3))]
    folds = _folds(60, 3)
    a = probe_oof(x, y, folds)
    # Planting: flip the labels of one fold's test subjects. Its own predictions must not change (they come
    # from a probe fitted, and its C chosen, without them); other folds train on them, so theirs may.
    y2 = y.copy()
    y2[folds[0]] = 1 - y2[folds[0]]
    b = probe_oof(x, y2, folds)
    np.testing.assert_array_equal(a[folds[0]], b[folds[0]])


def test_probe_trains_only_on_the_given_training_parts() -> None:
    rng = np.random.default_rng(2)
    y = np.tile([0, 1], 30)
    x = np.c_[y + rng.normal(size=60), rng.normal(size=(60, 3))]
    folds = _folds(60, 3)
    rest = [np.setdiff1d(np.arange(60), f) for f in folds]
    np.testing.assert_array_equal(probe_oof(x, y, folds, trains=rest), probe_oof(x, y, folds))
    # Fewer training cases (protocol.train_fraction): cases in no training part cannot change a prediction
    # of another case, however their features change.
    dropped = np.arange(0, 60, 3)
    trains = [np.setdiff1d(r, dropped) for r in rest]
    a = probe_oof(x, y, folds, trains=trains)
    x2 = x.copy()
    x2[dropped] = rng.normal(size=(len(dropped), 4)) * 100
    kept = np.setdiff1d(np.arange(60), dropped)
    np.testing.assert_array_equal(a[kept], probe_oof(x2, y, folds, trains=trains)[kept])
    assert not np.array_equal(a, probe_oof(x, y, folds))  # and it did train on fewer cases


def test_mae_probe_compares_against_the_same_shaped_untrained_encoders(tmp_path: Path) -> None:
    cfg = load_config("tiny", ["mae.probe_draws=3"])
    seed = 123
    seed_all(seed)
    untrained = build_mae(cfg)
    trained = build_mae(cfg)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1 * torch.randn_like(p))
    enc = tmp_path / "encoder.safetensors"
    save_weights(enc, mae_encoder_state(trained))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, *cfg.mri.size, generator=g)
    y = np.tile([0, 1], 12)
    folds = _folds(24, 3)
    out = mae_probe(cfg, x, y, folds, enc, seed)
    assert {"flat_probe_auc", "flat_random_probe_auc"} <= out.keys()
    assert {
        "probe_auc",
        "probe_auc_ci95",
        "random_probe_auc",
        "random_probe_auc_ci95",
        "gain_ci95",
    } <= out.keys()
    # The first untrained encoder is the MAE's own initialisation (same shapes, same seed): its features
    # equal those of a freshly seeded build, and the probe on them is the first draw.
    seed_all(seed)
    again = build_mae(cfg)
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in trained.state_dict().items()
    }
    f_untrained = encoder_features(untrained, x, "mean")
    np.testing.assert_array_equal(f_untrained, encoder_features(again, x, "mean"))
    # Every draw is an encoder of the MAE's shape from its own seed; the reference is their mean.
    draws = []
    for k in range(3):
        seed_all(untrained_seed(seed, k))
        draw = build_mae(cfg)
        assert {n: v.shape for n, v in draw.state_dict().items()} == {
            n: v.shape for n, v in trained.state_dict().items()
        }
        draws.append(delong_auc_ci(y, probe_oof(encoder_features(draw, x, "mean"), y, folds, seed=seed))[0])
    assert untrained_seed(seed, 0) == seed and len({untrained_seed(seed, k) for k in range(3)}) == 3
    assert out["random_probe_aucs"] == draws
    assert out["random_probe_auc"] == np.mean(draws)
    assert out["random_probe_sd"] == np.std(draws, ddof=1)
    assert out["gain"] == out["probe_auc"] - out["random_probe_auc"]
    lo, hi = out["gain_ci95"]
    assert lo < out["gain"] < hi
    lo, hi = out["random_probe_auc_ci95"]
    assert lo < out["random_probe_auc"] < hi


def test_one_untrained_draw_is_the_maes_initialisation_with_its_delong_interval(tmp_path: Path) -> None:
    cfg = load_config("tiny", ["mae.probe_draws=1"])
    seed = 7
    seed_all(seed)
    untrained = build_mae(cfg)
    enc = tmp_path / "encoder.safetensors"
    save_weights(enc, mae_encoder_state(untrained))
    x = torch.randn(24, 1, *cfg.mri.size, generator=torch.Generator().manual_seed(1))
    y = np.tile([0, 1], 12)
    out = mae_probe(cfg, x, y, _folds(24, 3), enc, seed)
    auc, lo, hi = delong_auc_ci(
        y, probe_oof(encoder_features(untrained, x, "mean"), y, _folds(24, 3), seed=seed)
    )
    # One draw: no spread between initialisations, so the interval is the draw's own DeLong interval, and an
    # "MAE" that is its own initialisation gains exactly nothing.
    assert out["random_probe_auc"] == auc and out["random_probe_sd"] == 0.0
    np.testing.assert_allclose(out["random_probe_auc_ci95"], [lo, hi], atol=1e-12)
    assert out["gain"] == 0.0


def test_the_probes_newton_solver_finds_the_fit_lbfgs_finds() -> None:
    # The narrow (mean-of-tokens) probe solves by Newton-Cholesky, the wide one by L-BFGS: same model.
    rng = np.random.default_rng(3)
    y = np.tile([0, 1], 40)
    z = rng.normal(size=(80, 4)) + 0.8 * y[:, None] * (np.arange(4) < 1)
    x = z @ rng.normal(size=(4, 16)) + 0.05 * rng.normal(size=(80, 16))
    newton = probe_oof(x, y, _folds(80))
    np.testing.assert_allclose(newton, probe_oof(x, y, _folds(80), solver="newton-cholesky"))
    np.testing.assert_allclose(newton, probe_oof(x, y, _folds(80), solver="lbfgs"), atol=0.02)
