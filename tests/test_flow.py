"""Optical-flow input of the teacher: displacement fields point the right way, are cached under their own
key, and the teacher trains on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from endodistill.config import ClipPreprocessConfig, load_config
from endodistill.data.cache import TensorCache
from endodistill.data.preprocess import clip_displacement
from endodistill.data.video import Clip


def _translated(dx: float, dy: float, n: int = 5, size: int = 64) -> Clip:
    """Smoothed speckle moving by (dx, dy) pixels per frame (sub-pixel, by Fourier shift)."""
    rng = np.random.default_rng(0)
    base = gaussian_filter(rng.random((size, size)), 1.5)
    base = (base - base.min()) / (base.max() - base.min())
    ky = np.fft.fftfreq(size)[:, None]
    kx = np.fft.fftfreq(size)[None, :]
    spec = np.fft.fft2(base)
    frames = []
    for t in range(n):
        f = np.fft.ifft2(spec * np.exp(-2j * np.pi * (kx * dx * t + ky * dy * t))).real
        frames.append(np.clip(f * 255, 0, 255).astype(np.uint8))
    return Clip(frames=np.stack(frames), fps=10.0, source="synthetic", format="npy")


def test_displacement_of_a_translated_pattern_points_the_right_way() -> None:
    cfg = ClipPreprocessConfig(size=(16, 16), sector_crop=False)
    d = clip_displacement(_translated(1.5, -1.0), cfg)
    assert d.shape == (5, 2, 16, 16) and d.dtype == np.float32
    assert np.all(d[0] == 0)
    # In output pixels (64 -> 16: a quarter), away from the borders where the pattern wraps.
    inner = d[:, :, 4:12, 4:12].mean(axis=(2, 3))
    np.testing.assert_allclose(inner[:, 0], 1.5 * np.arange(5) / 4, atol=0.08)
    np.testing.assert_allclose(inner[:, 1], -1.0 * np.arange(5) / 4, atol=0.08)
    # The grid can differ from the grey frames' size: the same motion, in that grid's pixels.
    d8 = clip_displacement(_translated(1.5, -1.0), cfg, (8, 8))
    assert d8.shape == (5, 2, 8, 8)
    np.testing.assert_allclose(d8[4, 0, 2:6, 2:6].mean(), 1.5 * 4 / 8, atol=0.05)


def test_flow_entries_have_their_own_key(tmp_path: Path) -> None:
    path = tmp_path / "clip.npy"
    np.save(path, _translated(1.0, 0.0).frames)
    cache = TensorCache(tmp_path / "cache")
    cfg = ClipPreprocessConfig(size=(16, 16), sector_crop=False)
    grey = cache.clip(path, cfg)
    flow = cache.clip_displacement(path, cfg)
    flow8 = cache.clip_displacement(path, cfg, (8, 8))
    assert grey.shape == (5, 16, 16) and flow.shape == (5, 2, 16, 16) and flow8.shape == (5, 2, 8, 8)
    assert cache.misses == 3
    again = cache.clip_displacement(path, cfg)
    assert cache.hits == 1 and np.array_equal(again, flow)
    keys = {
        cache.key("clip", path, cfg),
        cache.key("flow", path, {**cfg.model_dump(mode="json"), "flow": {}, "flow_size": [16, 16]}),
    }
    assert len(keys) == 2
    assert len(list((tmp_path / "cache" / "flow").rglob("*.npy"))) == 2


def test_flow_config_is_validated() -> None:
    with pytest.raises(Exception, match="motion_input"):
        load_config("tiny", {"teacher": {"motion": "flow", "motion_input": False}})
    with pytest.raises(Exception, match="flow_size"):
        load_config("tiny", {"teacher": {"motion": "flow", "flow_size": [2, 2]}})
    with pytest.raises(Exception, match="clip_features"):
        load_config("tiny", {"teacher": {"clip_features": "coupling"}})
    assert load_config("tiny", {"teacher": {"motion": "flow"}}).teacher.clip_feature_set == "coupling"
    assert load_config("tiny", {}).teacher.clip_feature_set == "grey"
    with pytest.raises(Exception, match=r"tvus\.frames >= 2"):
        load_config("tiny", {"tvus": {"frames": 1}})


def test_teacher_trains_on_flow(tiny_cohort: Path, tmp_path: Path) -> None:
    from endodistill.models.teacher import normalise_clips
    from endodistill.train.data import load_cohort
    from endodistill.train.seeding import configure_torch
    from endodistill.train.teacher import teacher_inputs, train_teacher

    cfg = load_config(
        "tiny",
        {
            "data": {"manifest": str(tiny_cohort / "manifest.csv"), "cache_dir": str(tmp_path / "cache")},
            "trainer": {"threads": 1},
            "teacher": {
                "folds": 2,
                "targets": "oof",
                "epochs": 1,
                "motion": "flow",
                "motion_norm": True,
                "flow_size": [16, 16],
                "time_reverse": True,
                "hflip": True,
            },
        },
    )
    configure_torch(cfg)
    data = load_cohort(cfg, cfg.data.manifest)
    x = teacher_inputs(data.tvus, cfg)
    assert tuple(x.shape) == (len(data.tvus), 2, cfg.tvus.frames, 16, 16)
    z = normalise_clips(x[:2], cfg)
    assert z.shape[1:3] == (2, cfg.tvus.frames - 1)
    torch.testing.assert_close(z.pow(2).mean(dim=(1, 2, 3, 4)), torch.ones(2))
    m = train_teacher(cfg, data, tmp_path / "run", echo=lambda s: None)
    assert m["scheme"].startswith("2-fold") and m["cv_auc"] is not None
    # With flow the clip baseline reads the coupling map of the same displacement fields.
    assert m["clip_baseline"]["auc"] is not None and m["clip_baseline"]["feature_set"] == "coupling"
    # Both AUCs are those of their stored out-of-fold predictions on every labelled clip.
    for name, auc in (
        ("predictions.csv", m["cv_auc"]),
        ("clip_baseline_predictions.csv", m["clip_baseline"]["auc"]),
    ):
        assert _pooled_auc(tmp_path / "run" / "teacher" / name, m["n_labelled_clips"]) == pytest.approx(
            auc, abs=1e-12
        ), name


def _pooled_auc(path: Path, n: int) -> float:
    """ROC AUC of a ``predictions.csv`` (label, prob per clip), which must hold ``n`` distinct clips."""
    import csv

    from sklearn.metrics import roc_auc_score

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len({r["path"] for r in rows}) == n
    return float(roc_auc_score([int(r["label"]) for r in rows], [float(r["prob"]) for r in rows]))
