"""The training stages on the tiny synthetic cohort: they run, learn, resume exactly and stop on divergence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from endodistill.config import Config, load_config
from endodistill.errors import TrainingDivergedError


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_cfg(cohort: Path, cache: Path, **sections: dict) -> Config:
    over = {
        "data": {"manifest": str(cohort / "manifest.csv"), "cache_dir": str(cache)},
        "trainer": {"threads": 1},
    }
    over.update(sections)
    return load_config("tiny", over)


@pytest.fixture(scope="module")
def trained(tiny_cohort: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Teacher and MAE trained once for this module (the distillation tests reuse them)."""
    from endodistill.train.data import load_cohort
    from endodistill.train.pretrain import pretrain_mae
    from endodistill.train.seeding import configure_torch
    from endodistill.train.teacher import load_teacher_outputs, train_teacher

    run = tmp_path_factory.mktemp("stages")
    cfg = tiny_cfg(tiny_cohort, cache_dir, mae={"epochs": 6})
    configure_torch(cfg)
    data = load_cohort(cfg, cfg.data.manifest)
    metrics = train_teacher(cfg, data, run, echo=lambda s: None)
    mae = pretrain_mae(cfg, data, run / "mae", seed=1, echo=lambda s: None)
    return {
        "cfg": cfg,
        "data": data,
        "run": run,
        "metrics": metrics,
        "teacher": load_teacher_outputs(run),
        "mae": mae,
    }


def _split(data) -> dict[str, list[str]]:
    from endodistill.data.splits import make_cv_splits

    return make_cv_splits(data.labelled.subjects, data.labelled.labels.tolist(), 3, 0, 0.25)[0]


def test_teacher_learns_and_stores_outputs(trained: dict) -> None:
    import json

    from safetensors.torch import load_file
    from sklearn.metrics import roc_auc_score

    from endodistill.evaluate.metrics import auc_score

    run, t, data = trained["run"], trained["teacher"], trained["data"]
    for f in ("outputs.safetensors", "outputs.json", "predictions.csv", "metrics.json", "done.json"):
        assert (run / "teacher" / f).is_file(), f
    out = load_file(str(run / "teacher" / "outputs.safetensors"))
    n = len(data.tvus)
    assert out["logits"].shape == (n, 2) and out["probs"].shape == (n, 2) and out["features"].shape[0] == n
    assert torch.allclose(out["probs"].sum(1), torch.ones(n), atol=1e-5)
    assert t.subjects == data.tvus.subjects
    # In-sample targets: the teacher separates the TVUS classes it was trained on.
    assert auc_score(t.labels, t.probs.numpy()) > 0.8
    hist = [
        float(line.split(",")[1]) for line in (run / "teacher/full/history.csv").read_text().splitlines()[1:]
    ]
    assert hist[-1] < hist[0]
    assert 0.0 <= trained["metrics"]["auc"] <= 1.0 and trained["metrics"]["n_heldout_clips"] > 0
    # The reported held-out AUC is that of the stored held-out predictions, which are the held-out clips.
    m = trained["metrics"]
    rows = _rows(run / "teacher" / "predictions.csv")
    assert len(rows) == m["n_heldout_clips"] == len(set(r["path"] for r in rows))
    held = set(json.loads((run / "teacher" / "done.json").read_text())["fits"]["holdout"]["test_subjects"])
    assert {r["subject_id"] for r in rows} == held
    y, p = [int(r["label"]) for r in rows], [float(r["prob"]) for r in rows]
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["targets_auc"] == pytest.approx(auc_score(t.labels, t.probs.numpy()), abs=1e-12)
    assert json.loads((run / "teacher" / "metrics.json").read_text()) == json.loads(json.dumps(m))


def test_teacher_oof_targets_are_cross_fitted(tiny_cohort: Path, cache_dir: Path, tmp_path: Path) -> None:
    import json

    from endodistill.train.data import load_cohort
    from endodistill.train.teacher import load_teacher_outputs, train_teacher

    cfg = tiny_cfg(tiny_cohort, cache_dir, teacher={"targets": "oof", "epochs": 2})
    data = load_cohort(cfg, cfg.data.manifest)
    metrics = train_teacher(cfg, data, tmp_path, echo=lambda s: None)
    assert metrics["scheme"].startswith("4-fold") and metrics["targets"] == "oof"
    fits = json.loads((tmp_path / "teacher" / "done.json").read_text())["fits"]
    assert sorted(fits) == [f"fold_{k}" for k in range(4)] and "full" not in fits
    tested = [s for f in fits.values() for s in f["test_subjects"]]
    assert sorted(tested) == sorted(set(data.tvus.subjects))  # every clip scored exactly once
    for f in fits.values():
        assert not set(f["train_subjects"]) & set(f["test_subjects"])  # never by a teacher trained on it
    assert load_teacher_outputs(tmp_path).targets == "oof"


def test_mae_learns_and_loads_into_student(trained: dict) -> None:
    from endodistill.models.student import build_student, load_mae_encoder
    from endodistill.models.weights import load_weights

    mae = trained["mae"]
    assert mae["loss_last"] < mae["loss_first"]
    assert mae["n_volumes"] == len(trained["data"].unlabelled)  # the unlabelled pool only
    student = build_student(trained["cfg"])
    load_mae_encoder(student, load_weights(trained["run"] / "mae" / "encoder.safetensors"))


def _rows(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _finetune(
    trained: dict, method: str, unit: Path, cfg: Config | None = None, resume: bool = False
) -> dict:
    from endodistill.train.finetune import finetune

    cfg = cfg or trained["cfg"]
    enc = trained["run"] / "mae" / "encoder.safetensors"
    return finetune(
        cfg,
        method,
        trained["data"],
        trained["teacher"],
        _split(trained["data"]),
        unit,
        7,
        method,
        resume,
        enc,
    )


def test_task_only_and_kd_only_extremes(trained: dict, tmp_path: Path) -> None:
    cfg = trained["cfg"].model_copy(deep=True)
    cfg.finetune.epochs = 8
    task = _finetune(trained, "scratch_ce", tmp_path / "ce", cfg)
    kd = _finetune(trained, "mae_kd", tmp_path / "kd", cfg)
    rows_ce = _rows(tmp_path / "ce" / "history.csv")
    rows_kd = _rows(tmp_path / "kd" / "history.csv")
    # a_e = 0: the loss is exactly the task loss; a_e = 1: exactly the KD loss.
    assert all(float(r["kd_weight"]) == 0.0 and r["train_loss"] == r["task_loss"] for r in rows_ce)
    assert all(float(r["kd_weight"]) == 1.0 and r["train_loss"] == r["kd_loss"] for r in rows_kd)
    assert float(rows_kd[-1]["kd_loss"]) < float(rows_kd[0]["kd_loss"])
    assert float(rows_ce[-1]["task_loss"]) < float(rows_ce[0]["task_loss"])
    for info in (task, kd):
        assert 0 <= info["best_epoch"] < 8
        assert not set(info["test_subjects"]) & (set(info["train_subjects"]) | set(info["val_subjects"]))


def test_mixed_schedule_and_selection_record(trained: dict, tmp_path: Path) -> None:
    info = _finetune(trained, "mae_kd_ce", tmp_path / "mix")
    rows = _rows(tmp_path / "mix" / "history.csv")
    assert [float(r["kd_weight"]) for r in rows] == pytest.approx([0.85**e for e in range(len(rows))])
    assert (tmp_path / "mix" / "model.safetensors").is_file()
    split = _split(trained["data"])
    assert info["val_subjects"] == sorted(split["val"]) and info["test_subjects"] == sorted(split["test"])
    # No TVUS clip of a test or validation subject is used as a KD partner.
    assert not set(info["tvus_subjects"]) & (set(split["test"]) | set(split["val"]))


def test_resume_continues_exactly(trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning.pytorch as pl

    import endodistill.train.fit as fit_mod
    from endodistill.train.finetune import read_predictions
    from endodistill.train.trainer import make_trainer

    cfg = trained["cfg"].model_copy(deep=True)
    cfg.finetune.epochs = 4
    full = _finetune(trained, "mae_kd_ce", tmp_path / "a", cfg)

    class Crash(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch == 2:
                raise RuntimeError("simulated crash")

    monkeypatch.setattr(fit_mod, "make_trainer", lambda *a, **k: make_trainer(*a, callbacks=[Crash()]))
    with pytest.raises(RuntimeError, match="simulated crash"):
        _finetune(trained, "mae_kd_ce", tmp_path / "b", cfg)
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)  # no unpickling
    assert ckpt["epoch"] == 1 and not (tmp_path / "b" / "done.json").exists()
    monkeypatch.setattr(fit_mod, "make_trainer", make_trainer)
    resumed = _finetune(trained, "mae_kd_ce", tmp_path / "b", cfg, resume=True)
    pa, pb = (
        read_predictions(tmp_path / "a" / "predictions.csv"),
        read_predictions(tmp_path / "b" / "predictions.csv"),
    )
    assert np.array_equal(pa[2], pb[2])
    assert resumed["best_epoch"] == full["best_epoch"]
    assert (tmp_path / "a" / "history.csv").read_text() == (tmp_path / "b" / "history.csv").read_text()
    # A finished unit is not refitted on resume.
    again = _finetune(trained, "mae_kd_ce", tmp_path / "b", cfg, resume=True)
    assert again["timing"] == resumed["timing"]


def test_divergence_names_the_fit_and_keeps_last_good_checkpoint(
    trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import endodistill.train.finetune as ft

    real = ft.task_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] > 3 else out  # epoch 0 has 2 steps, then NaN

    monkeypatch.setattr(ft, "task_loss", poisoned)
    with pytest.raises(TrainingDivergedError, match=r"scratch_ce: loss became nan at step \d+ \(epoch 1\)"):
        _finetune(trained, "scratch_ce", tmp_path / "nan")
    ckpt = torch.load(tmp_path / "nan" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_planned_batches_are_pure_and_shard_by_rank() -> None:
    from endodistill.train.batches import PlannedBatches

    def make(idx: np.ndarray, rng: np.random.Generator, epoch: int) -> tuple[list[int], float]:
        return sorted(idx.tolist()), float(rng.random())

    a = PlannedBatches(10, 4, seed=3, make_batch=make)
    b = PlannedBatches(10, 4, seed=3, make_batch=make)
    assert len(a) == 3  # 4 + 4 + 2 (a last batch of one would be dropped)
    assert [a[(1, i)] for i in range(3)] == [b[(1, i)] for i in range(3)]
    assert [a[(1, i)] for i in range(3)] != [a[(2, i)] for i in range(3)]
    assert sorted(i for b in range(3) for i in a[(0, b)][0]) == list(range(10))
    r0, r1 = PlannedBatches(10, 4, 3, make), PlannedBatches(10, 4, 3, make)
    r0.rank, r0.world, r1.rank, r1.world = 0, 2, 1, 2
    assert sorted(r0[(0, 0)][0] + r1[(0, 0)][0]) == a[(0, 0)][0]


def test_planned_batches_look_ahead_thread_changes_no_batch() -> None:
    """The in-process look-ahead thread builds batch b+1 during step b; every batch is the same as without it."""
    import threading

    from endodistill.train.batches import PlannedBatches

    threads: set[str] = set()

    def make(idx: np.ndarray, rng: np.random.Generator, epoch: int) -> tuple[list[int], float]:
        threads.add(threading.current_thread().name)
        return idx.tolist(), float(rng.random())

    ahead, inline = PlannedBatches(23, 4, 5, make), PlannedBatches(23, 4, 5, make)
    inline.prefetch = False
    keys = [(e, b) for e in range(3) for b in range(len(ahead))]
    keys += [(7, 3), (7, 0), (2, 5), (2, 1)]  # out of order: a stale look-ahead is waited for, then replaced
    assert [ahead[k] for k in keys] == [inline[k] for k in keys]
    assert any(t.startswith("endodistill-batches") for t in threads)
    assert ahead._pool is not None or ahead._pending is None
    ahead[(8, len(ahead) - 1)]  # an epoch's last batch leaves no thread behind
    assert ahead._pool is None and ahead._pending is None


def test_fit_seed_is_stable() -> None:
    from endodistill.train.seeding import fit_seed

    assert fit_seed(0, "distill", 1) == fit_seed(0, "distill", 1)
    assert fit_seed(0, "distill", 1) != fit_seed(0, "distill", 2) != fit_seed(1, "distill", 2)


def test_layer_decay_scales_lr_by_depth_and_keeps_weight_decay_split() -> None:
    from endodistill.models.student import build_student
    from endodistill.train.finetune import layer_decay_groups
    from endodistill.train.optim import param_groups

    cfg = load_config("tiny", [])
    net = build_student(cfg)
    n = len(net.blocks)
    # 1.0 is off: exactly the groups (same tensors, same order) as before the option existed.
    off, plain = layer_decay_groups(net, 0.05, 1e-3, 1.0), param_groups(net, 0.05)
    assert [[id(p) for p in g["params"]] for g in off] == [[id(p) for p in g["params"]] for g in plain]
    assert [g["weight_decay"] for g in off] == [g["weight_decay"] for g in plain]
    groups = layer_decay_groups(net, 0.05, 1e-3, 0.5)
    lr_of, wd_of = {}, {}
    for g in groups:
        for p in g["params"]:
            lr_of[id(p)], wd_of[id(p)] = g["lr"], g["weight_decay"]
    named = dict(net.named_parameters())
    trainable = {k: p for k, p in named.items() if p.requires_grad}
    assert set(lr_of) == {id(p) for p in trainable.values()}  # every trainable tensor exactly once
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert groups[0]["lr"] == pytest.approx(1e-3)  # the head first: the logged lr is the base lr
    assert lr_of[id(named["classification_head.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["norm.weight"])] == pytest.approx(1e-3)
    for i in range(n):
        assert lr_of[id(named[f"blocks.{i}.attn.qkv.weight"])] == pytest.approx(1e-3 * 0.5 ** (n - i))
    embed = 1e-3 * 0.5 ** (n + 1)
    assert lr_of[id(named["patch_embedding.patch_embeddings.weight"])] == pytest.approx(embed)
    assert lr_of[id(named["cls_token"])] == pytest.approx(embed)
    # The weight-decay split is unchanged by depth grouping.
    wd_plain = {id(p): g["weight_decay"] for g in plain for p in g["params"]}
    assert wd_of == wd_plain


def test_checkpoint_interval_skips_saves_without_changing_the_fit(trained: dict, tmp_path: Path) -> None:
    """``trainer.checkpoint_every_s`` only decides which epoch ends write last.ckpt; the fit is the same."""
    from endodistill.train.finetune import read_predictions

    every = trained["cfg"].model_copy(deep=True)
    every.trainer.checkpoint_every_s = 0.0
    rare = trained["cfg"].model_copy(deep=True)
    rare.trainer.checkpoint_every_s = 3600.0
    a = _finetune(trained, "scratch_kd_ce", tmp_path / "every", every)
    b = _finetune(trained, "scratch_kd_ce", tmp_path / "rare", rare)
    last = int(torch.load(tmp_path / "every" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"])
    assert last == every.finetune.epochs - 1
    assert not (tmp_path / "rare" / "checkpoints" / "last.ckpt").exists()
    assert a["timing"]["checkpoint"] > 0 and b["timing"]["checkpoint"] == 0
    pa, pb = (
        read_predictions(tmp_path / "every" / "predictions.csv"),
        read_predictions(tmp_path / "rare" / "predictions.csv"),
    )
    assert np.array_equal(pa[2], pb[2])
    assert (tmp_path / "every" / "history.csv").read_text() == (tmp_path / "rare" / "history.csv").read_text()


def test_save_weights_round_trips_shared_tensors_and_names_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import endodistill.models.weights as common
    from endodistill.errors import DiskFullError

    w = torch.randn(4, 3)
    state = {"a": w, "tied": w, "view": w[1:], "b": torch.arange(5.0)}
    common.save_weights(tmp_path / "w.safetensors", state, metadata={"k": "v"})
    back = common.load_weights(tmp_path / "w.safetensors")
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)

    def full(*a, **k):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(common, "save_file", full)
    with pytest.raises(DiskFullError, match=r"w\.safetensors"):
        common.save_weights(tmp_path / "w.safetensors", {"a": torch.ones(2)})
    assert torch.equal(common.load_weights(tmp_path / "w.safetensors")["b"], state["b"])  # old file intact
    assert not list(tmp_path.glob(".*.tmp"))


def test_volume_augmentation_translates_without_changing_other_draws() -> None:
    from endodistill.train.pretrain import augment_volumes

    x = torch.arange(2 * 6 * 7 * 8, dtype=torch.float32).reshape(2, 1, 6, 7, 8)
    a = augment_volumes(x.clone(), np.random.default_rng(0))
    b = augment_volumes(x.clone(), np.random.default_rng(0), translate=0)
    torch.testing.assert_close(a, b)  # translate 0: the same batch as before the option existed
    rng = np.random.default_rng(4)
    out = augment_volumes(x.clone(), rng, translate=1)
    ref_rng = np.random.default_rng(4)  # replay the draws: flips, scale, shift, then the translations
    flip = ref_rng.random(2) < 0.5
    scale = ref_rng.uniform(0.9, 1.1, size=2)
    shift = ref_rng.uniform(-0.05, 0.05, size=2)
    d = ref_rng.integers(0, 3, size=(2, 3))
    for k in range(2):
        v = x[k, 0].flip(0) if flip[k] else x[k, 0]
        padded = torch.nn.functional.pad(v[None, None], (1,) * 6, mode="replicate")[0, 0]
        i, j, m = d[k]
        moved = padded[i : i + 6, j : j + 7, m : m + 8]
        torch.testing.assert_close(out[k, 0], (moved * float(scale[k]) + float(shift[k])).float())
    assert not torch.equal(out, augment_volumes(x.clone(), np.random.default_rng(4)))
