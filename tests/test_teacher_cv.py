"""The cross-validated teacher and its clip baseline: subject-level folds, CV AUC with CI, no test-fold leaks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from endodistill.config import Config, load_config


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _cfg(cohort: Path, cache: Path, **teacher: object) -> Config:
    # A short CV teacher: the tests check the protocol, not what the teacher learns.
    over = {
        "data": {"manifest": str(cohort / "manifest.csv"), "cache_dir": str(cache)},
        "trainer": {"threads": 1},
        "teacher": {"folds": 3, "targets": "oof", "epochs": 2, **teacher},
    }
    return load_config("tiny", over)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cv_run(tiny_cohort: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from endodistill.train.data import load_cohort
    from endodistill.train.seeding import configure_torch
    from endodistill.train.teacher import train_teacher

    cfg = _cfg(tiny_cohort, cache_dir)
    configure_torch(cfg)
    data = load_cohort(cfg, cfg.data.manifest)
    run = tmp_path_factory.mktemp("teacher_cv")
    lines: list[str] = []
    metrics = train_teacher(cfg, data, run, echo=lines.append)
    return {"cfg": cfg, "data": data, "run": run, "metrics": metrics, "lines": lines}


def test_cv_holds_out_every_labelled_clip_once_by_subject(cv_run: dict) -> None:
    run, data = cv_run["run"], cv_run["data"]
    tv = data.tvus
    fits = json.loads((run / "teacher" / "done.json").read_text())["fits"]
    assert sorted(fits) == ["fold_0", "fold_1", "fold_2"]  # oof targets: no extra in-sample fit
    labelled = {tv.subjects[i] for i in np.flatnonzero(tv.labels >= 0)}
    tested = [s for f in fits.values() for s in f["test_subjects"]]
    assert sorted(tested) == sorted(labelled)  # each labelled subject in exactly one test fold
    for f in fits.values():
        assert not set(f["train_subjects"]) & set(f["test_subjects"])
        assert set(f["train_subjects"]) | set(f["test_subjects"]) == labelled
    rows = _rows(run / "teacher" / "predictions.csv")
    assert sorted(Path(p).name for p in np.asarray(tv.paths)[tv.labels >= 0]) == sorted(
        r["path"] for r in rows
    )
    for r in rows:  # the fold that scored a clip is the one whose test part holds its subject
        assert r["subject_id"] in fits[f"fold_{r['fold']}"]["test_subjects"]


def test_cv_auc_and_ci_match_the_out_of_fold_predictions(cv_run: dict) -> None:
    from endodistill.evaluate.delong import delong_auc_ci

    m = cv_run["metrics"]
    rows = _rows(cv_run["run"] / "teacher" / "predictions.csv")
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["prob"]) for r in rows])
    auc, lo, hi = delong_auc_ci(y, p)
    assert m["cv_auc"] == pytest.approx(auc, abs=1e-6) and m["auc"] == m["cv_auc"]
    assert m["cv_auc_ci95"] == pytest.approx([lo, hi], abs=1e-6)
    assert m["n_heldout_clips"] == m["n_labelled_clips"] == len(rows)
    assert len(m["fold_aucs"]) == 3
    assert json.loads((cv_run["run"] / "teacher" / "metrics.json").read_text()) == m
    assert any("cross-validated AUC" in line and "95% CI" in line for line in cv_run["lines"])
    assert any("clip baseline" in line for line in cv_run["lines"])


def test_clip_baseline_is_reported_on_the_same_folds(cv_run: dict) -> None:
    from endodistill.evaluate.delong import delong_auc_ci

    b = cv_run["metrics"]["clip_baseline"]
    assert set(b) >= {"auc", "auc_ci95", "fold_aucs", "fold_c", "features"}
    teacher_rows = _rows(cv_run["run"] / "teacher" / "predictions.csv")
    rows = _rows(cv_run["run"] / "teacher" / "clip_baseline_predictions.csv")
    key = [(r["subject_id"], r["path"], r["fold"], r["label"]) for r in rows]
    assert key == [(r["subject_id"], r["path"], r["fold"], r["label"]) for r in teacher_rows]
    auc, lo, hi = delong_auc_ci([int(r["label"]) for r in rows], [float(r["prob"]) for r in rows])
    assert b["auc"] == pytest.approx(auc, abs=1e-6) and b["auc_ci95"] == pytest.approx([lo, hi], abs=1e-6)
    assert len(b["fold_aucs"]) == len(b["fold_c"]) == 3
    # The paired test of the teacher against the baseline, on the same held-out clips.
    from endodistill.evaluate.delong import delong_test

    t = delong_test(
        [int(r["label"]) for r in rows],
        [float(r["prob"]) for r in teacher_rows],
        [float(r["prob"]) for r in rows],
    )
    assert b["teacher_minus_baseline"] == pytest.approx(t["diff"], abs=1e-9)
    assert b["p_vs_teacher"] == pytest.approx(t["p"], abs=1e-9)


def _planted_problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 60
    subjects = [f"S{i // 2:03d}" for i in range(n)]  # two clips per subject, one label each
    y = np.repeat((rng.random(n // 2) < 0.4).astype(np.int64), 2)
    x = rng.normal(size=(n, 6)) + 1.2 * y[:, None] * np.array([1.0, -1.0, 0.5, 0, 0, 0])
    fold = np.array([(i // 2) % 3 for i in range(n)])
    return x, y, subjects, fold


def test_clip_baseline_choices_see_the_training_part_only() -> None:
    from endodistill.train.logreg_cv import cross_validated_logreg

    x, y, subjects, fold = _planted_problem()
    ref = cross_validated_logreg(x, y, subjects, fold, 2, 1, seed=0)
    te = np.flatnonzero(fold == 0)
    # Plant test-fold information: flip fold 0's test labels and make one test clip's features scream its
    # label. Fold 0's C and its model (its predictions on the untouched test clips) must not move.
    y2 = y.copy()
    y2[te] = 1 - y2[te]
    x2 = x.copy()
    x2[te[0]] += 50.0 * (2 * y2[te[0]] - 1)
    planted = cross_validated_logreg(x2, y2, subjects, fold, 2, 1, seed=0)
    assert planted["fold_c"][0] == ref["fold_c"][0]
    np.testing.assert_array_equal(planted["probs"][te[1:]], ref["probs"][te[1:]])
    # The test can see a leak: folds 1 and 2 train on fold 0's clips, so their models do change.
    others = np.flatnonzero(fold > 0)
    assert not np.array_equal(planted["probs"][others], ref["probs"][others])
    # Clips held out by no fold (a hold-out's training part, unlabelled clips) are never scored.
    fold3 = fold.copy()
    fold3[fold == 2] = -1
    held = cross_validated_logreg(x, y, subjects, fold3, 2, 1, seed=0)
    assert np.isnan(held["probs"][fold == 2]).all() and len(held["fold_aucs"]) == 2


def test_clip_baseline_is_deterministic_and_finds_planted_signal() -> None:
    from endodistill.train.logreg_cv import cross_validated_logreg

    x, y, subjects, fold = _planted_problem()
    a = cross_validated_logreg(x, y, subjects, fold, 2, 1, seed=0)
    b = cross_validated_logreg(x, y, subjects, fold, 2, 1, seed=0)
    np.testing.assert_array_equal(a["probs"], b["probs"])
    assert a["auc"] > 0.75 and a["auc_ci95"][0] < a["auc"] < a["auc_ci95"][1]


def _two_region_displacement(follow: float, amp: float, angle: float, phase: float) -> np.ndarray:
    """Displacement fields (1, 2, 8, 12, 12): the left half moves with the manoeuvre, the right half follows
    with ``follow`` of it, the bottom two rows lie outside the fan (nothing moves)."""
    t = np.arange(8)
    press = amp * 0.5 * (1 - np.cos(2 * np.pi * 1.3 * t / 8 + phase))
    direction = np.array([np.sin(angle), np.cos(angle)])
    d = np.zeros((1, 2, 8, 12, 12))
    for c in range(2):
        d[0, c, :, :10, :6] = (press * direction[c])[:, None, None]
        d[0, c, :, :10, 6:] = (follow * press * direction[c])[:, None, None]
    return d


def test_coupling_map_shows_how_much_of_the_motion_each_side_follows() -> None:
    import torch

    from endodistill.train.clip_baseline import clip_coupling_features, coupling_map

    d = _two_region_displacement(0.3, amp=8.0, angle=0.2, phase=0.5)
    motion = torch.from_numpy(d[:, :, 1:] - d[:, :, :-1])
    g = coupling_map(motion)[0].numpy()
    np.testing.assert_allclose(g[:10, :6], 1.0, atol=1e-9)
    np.testing.assert_allclose(g[:10, 6:], 0.3, atol=1e-9)
    np.testing.assert_allclose(g[10:], 0.0, atol=1e-9)
    # Independent of the pressure's amplitude, direction, phase and sign: only the share matters.
    for amp, angle, phase in ((2.0, -0.4, 2.0), (-11.0, 0.1, 4.0)):
        other = _two_region_displacement(0.3, amp, angle, phase)
        np.testing.assert_allclose(clip_coupling_features(other), clip_coupling_features(d), atol=1e-9)
    # The pixels outside the fan (still) are left out of the percentiles: 60 of 120 moving pixels follow
    # with 0.3, so the 10th and 25th percentiles are 0.3 and the median lies between the two sides.
    assert clip_coupling_features(d).shape == (1, 1)  # the default: the 25th percentile
    f = clip_coupling_features(d, (0.1, 0.25, 0.5))
    assert f.shape == (1, 3)
    np.testing.assert_allclose(f[0, :2], 0.3, atol=1e-9)
    assert 0.3 <= f[0, 2] <= 1.0
    # A gliding rectum (little follows) has lower low percentiles than a tethered one.
    glide, tether = (clip_coupling_features(_two_region_displacement(r, 8.0, 0.2, 0.5)) for r in (0.05, 0.9))
    assert glide[0, 0] < 0.1 < 0.85 < tether[0, 0]
    # A clip where nothing moves gives zeros, not NaN.
    np.testing.assert_array_equal(
        clip_coupling_features(np.zeros((1, 2, 4, 6, 6)), (0.1, 0.5)), np.zeros((1, 2))
    )
    with pytest.raises(ValueError, match="displacement"):
        clip_coupling_features(np.zeros((1, 1, 4, 6, 6)))


def test_motion_features_see_where_the_clip_moves() -> None:
    from endodistill.train.clip_baseline import clip_motion_features

    rng = np.random.default_rng(0)
    clip = np.repeat(rng.random((1, 1, 1, 16, 16)), 6, axis=2)  # static speckle
    moving = clip.copy()
    for t in range(6):  # the left half slides down one pixel per frame
        moving[0, 0, t, :, :8] = np.roll(clip[0, 0, 0, :, :8], t, axis=0)
    f = clip_motion_features(np.concatenate([clip, moving]), grid=2)
    assert f.shape == (2, 8)
    std_cells, diff_cells = f[1, :4].reshape(2, 2), f[1, 4:].reshape(2, 2)
    assert (std_cells[:, 0] > std_cells[:, 1] + 3).all() and (diff_cells[:, 0] > diff_cells[:, 1] + 3).all()
    assert np.allclose(f[0], np.log(1e-4))  # nothing moves


def test_frame_difference_input_and_clip_augmentations_train(
    tiny_cohort: Path, cache_dir: Path, tmp_path: Path
) -> None:
    from endodistill.models.teacher import normalise_clips
    from endodistill.train.data import load_cohort
    from endodistill.train.teacher import train_teacher

    cfg = _cfg(
        tiny_cohort,
        cache_dir,
        motion="diff",
        motion_norm=True,
        time_reverse=True,
        hflip=True,
        folds=2,
        epochs=1,
    )
    x = torch.rand(2, 1, 5, 8, 8)
    d = normalise_clips(x, cfg)
    raw = x[:, :, 1:] - x[:, :, :-1]
    assert d.shape == (2, 1, 4, 8, 8)
    torch.testing.assert_close(d, raw / raw.pow(2).mean(dim=(1, 2, 3, 4), keepdim=True).sqrt())
    data = load_cohort(cfg, cfg.data.manifest)
    m = train_teacher(cfg, data, tmp_path, echo=lambda s: None)
    assert m["scheme"].startswith("2-fold") and m["cv_auc"] is not None
    # Under CV the reported AUC is the pooled out-of-fold AUC of every labelled clip's stored prediction.
    assert _pooled_auc(tmp_path / "teacher" / "predictions.csv", m["n_labelled_clips"]) == pytest.approx(
        m["cv_auc"], abs=1e-12
    )
    assert m["cv_auc"] == m["auc"]


def _pooled_auc(path: Path, n: int) -> float:
    """ROC AUC of a ``predictions.csv`` (label, prob per clip), which must hold ``n`` distinct clips."""
    from sklearn.metrics import roc_auc_score

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len({r["path"] for r in rows}) == n
    return float(roc_auc_score([int(r["label"]) for r in rows], [float(r["prob"]) for r in rows]))


def test_cv_teacher_resumes_exactly(cv_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning.pytorch as pl

    import endodistill.train.fit as fit_mod
    import endodistill.train.teacher as tt
    from endodistill.train.trainer import make_trainer

    made = []

    class Crash(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if len(made) == 2 and trainer.current_epoch == 1:  # in the second fold, after one epoch
                raise RuntimeError("simulated crash")

    def crashing(*a: object, **k: object) -> pl.Trainer:
        made.append(1)
        return make_trainer(*a, callbacks=[Crash()], **k)

    monkeypatch.setattr(fit_mod, "make_trainer", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tt.train_teacher(cv_run["cfg"], cv_run["data"], tmp_path, echo=lambda s: None)
    assert (tmp_path / "teacher" / "fold_0" / "done.json").is_file()
    assert not (tmp_path / "teacher" / "fold_1" / "done.json").exists()
    monkeypatch.setattr(fit_mod, "make_trainer", make_trainer)
    resumed = tt.train_teacher(cv_run["cfg"], cv_run["data"], tmp_path, resume=True, echo=lambda s: None)
    assert resumed == cv_run["metrics"]
    for name in ("predictions.csv", "clip_baseline_predictions.csv", "outputs.safetensors"):
        assert (tmp_path / "teacher" / name).read_bytes() == (cv_run["run"] / "teacher" / name).read_bytes()


@pytest.fixture(scope="module")
def ensemble_run(tiny_cohort: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from endodistill.train.data import load_cohort
    from endodistill.train.seeding import configure_torch
    from endodistill.train.teacher import train_teacher

    cfg = _cfg(tiny_cohort, cache_dir, ensemble=2)
    configure_torch(cfg)
    data = load_cohort(cfg, cfg.data.manifest)
    run = tmp_path_factory.mktemp("teacher_ensemble")
    metrics = train_teacher(cfg, data, run, echo=lambda s: None)
    return {"cfg": cfg, "data": data, "run": run, "metrics": metrics}


def test_ensemble_members_share_folds_and_average_logits(ensemble_run: dict, cv_run: dict) -> None:
    from endodistill.infer.teacher_model import teacher_member_dirs
    from endodistill.models.teacher import build_teacher, teacher_in_channels
    from endodistill.models.weights import load_weights
    from endodistill.train.teacher import teacher_forward, teacher_inputs

    cfg, data, run = ensemble_run["cfg"], ensemble_run["data"], ensemble_run["run"]
    fits = json.loads((run / "teacher" / "done.json").read_text())["fits"]
    assert sorted(fits) == ["fold_0", "fold_0_m1", "fold_1", "fold_1_m1", "fold_2", "fold_2_m1"]
    single = json.loads((cv_run["run"] / "teacher" / "done.json").read_text())["fits"]
    for f in range(3):
        a, b = fits[f"fold_{f}"], fits[f"fold_{f}_m1"]
        assert a["test_subjects"] == b["test_subjects"] == single[f"fold_{f}"]["test_subjects"]
        assert a["seed"] == single[f"fold_{f}"]["seed"] != b["seed"]  # member 0 is the plain teacher's fit
    members = teacher_member_dirs(run)
    assert [m.name for m in members] == sorted(fits, key=lambda n: (int(n.split("_")[1]), n))
    # A held-out clip's probability is the softmax of its fold's members' mean logits.
    x = teacher_inputs(data.tvus, cfg)
    rows = _rows(run / "teacher" / "predictions.csv")
    by_path = {Path(p).name: i for i, p in enumerate(data.tvus.paths)}
    for f in range(3):
        logits = []
        for unit in (f"fold_{f}", f"fold_{f}_m1"):
            net = build_teacher(cfg.teacher, cfg.task.num_classes, teacher_in_channels(cfg))
            net.load_state_dict(load_weights(run / "teacher" / unit / "model.safetensors"))
            logits.append(teacher_forward(net.eval(), x, cfg)[0])
        probs = torch.stack(logits).mean(0).softmax(1)[:, cfg.task.positive_class]
        mine = [r for r in rows if r["fold"] == str(f)]
        assert mine
        for r in mine:
            assert float(r["prob"]) == pytest.approx(float(probs[by_path[r["path"]]]), abs=1e-5)
    assert ensemble_run["metrics"]["scheme"] == "3-fold cross-validation, 2 networks per fold"


def test_ensemble_fits_shared_out_then_gathered_equal_one_process(ensemble_run: dict, tmp_path: Path) -> None:
    from endodistill.train.teacher import train_teacher, train_teacher_share

    cfg, data = ensemble_run["cfg"], ensemble_run["data"]
    # What the two ranks of a spread run do: each trains its share (fit i on rank i % 2) into the run.
    even = train_teacher_share(cfg, data, tmp_path, lambda i: i % 2 == 0)
    odd = train_teacher_share(cfg, data, tmp_path, lambda i: i % 2 == 1)
    assert even == ["fold_0", "fold_1", "fold_2"] and odd == ["fold_0_m1", "fold_1_m1", "fold_2_m1"]
    stamps = {u: (tmp_path / "teacher" / u / "done.json").stat().st_mtime_ns for u in even + odd}
    metrics = train_teacher(cfg, data, tmp_path, echo=lambda s: None, reuse_fits=True)
    assert all((tmp_path / "teacher" / u / "done.json").stat().st_mtime_ns == t for u, t in stamps.items())
    assert {k: v for k, v in metrics.items() if k != "timing"} == {
        k: v for k, v in ensemble_run["metrics"].items() if k != "timing"
    }
    for name in ("predictions.csv", "outputs.safetensors"):
        assert (tmp_path / "teacher" / name).read_bytes() == (
            ensemble_run["run"] / "teacher" / name
        ).read_bytes()


def test_ensemble_needs_cross_validation() -> None:
    from endodistill.errors import ConfigError

    with pytest.raises(ConfigError, match="needs cross-validation"):
        load_config("tiny", {"teacher": {"ensemble": 2, "folds": 1, "targets": "in_sample"}})


def test_examples_show_the_coupling_map_with_flow(tmp_path: Path) -> None:
    import torch

    from endodistill.config import load_config
    from endodistill.experiment.aggregate import write_examples
    from endodistill.train.data import ClipSet, CohortData, VolumeSet

    cfg = load_config("tiny", {"teacher": {"motion": "flow", "flow_size": [12, 12]}, "tvus": {"frames": 8}})
    # One clip per class: the rectum side follows with 0.9 (obliterated) or 0.05 (gliding) of the motion.
    flows = [_two_region_displacement(r, 8.0, 0.2, 0.5)[0].transpose(1, 0, 2, 3) for r in (0.05, 0.9)]
    tv = ClipSet(
        clips=[np.zeros((8, 16, 16), np.float32)] * 2,
        labels=np.array([0, 1]),
        subjects=["T0", "T1"],
        paths=["a.mp4", "b.mp4"],
        flows=[f.astype(np.float32) for f in flows],
    )
    mri = VolumeSet(
        x=torch.zeros(2, 1, 4, 8, 8), labels=np.array([0, 1]), subjects=["M0", "M1"], paths=["", ""]
    )
    data = CohortData(manifest=tmp_path / "m.csv", labelled=mri, unlabelled=mri, tvus=tv, cohort={}, files=[])
    written = {p.name for p in write_examples(cfg, data, tmp_path)}
    assert {"tvus_class0_T0_coupling.png", "tvus_class1_T1_coupling.png"} <= written
    assert all((tmp_path / "examples" / n).stat().st_size > 0 for n in written)
    # Without flow: the frames only.
    grey = {p.name for p in write_examples(load_config("tiny"), data, tmp_path / "grey")}
    assert not any(n.endswith("_coupling.png") for n in grey)
