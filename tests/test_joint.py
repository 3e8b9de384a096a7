"""The joint method (issue 16): one network for MRI and TVUS, its folds, resume, predict and export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from endodistill.config import default_methods, load_config
from endodistill.errors import ConfigError


def _methods(**joint: object) -> dict[str, dict]:
    out = {k: v.model_dump(mode="json") for k, v in default_methods().items()}
    out["joint"] = {"kind": "joint", "init": "scratch", **joint}
    return out


def _cfg(cohort: Path | None = None, **over: object):
    ov: dict = {"protocol": {"methods": _methods()}, "trainer": {"threads": 1}}
    if cohort is not None:
        ov["data"] = {"manifest": str(cohort / "manifest.csv")}
    for k, v in over.items():
        ov[k] = {**ov.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config("tiny", ov)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="align_weight"):
        load_config("tiny", {"protocol": {"methods": {"m": {"align_weight": 0.5}}, "full_method": "m"}})
    with pytest.raises(ConfigError, match="clip_patch"):
        _cfg(joint={"clip_patch": [5, 5]})
    with pytest.raises(ConfigError, match="tubelet_frames"):
        _cfg(joint={"tubelet_frames": 3})  # tiny: 8 frames, motion 'mean'
    with pytest.raises(ConfigError, match="final_method"):
        _cfg(protocol={"final_method": "nope"})
    cfg = load_config("demo")
    assert cfg.protocol.methods["joint"].kind == "joint"
    assert all(cfg.protocol.methods[k] == v for k, v in default_methods().items())


def test_both_modalities_reach_the_shared_blocks() -> None:
    from endodistill.models.joint import build_joint

    cfg = _cfg()
    torch.manual_seed(0)
    net = build_joint(cfg)
    x = torch.randn(3, 1, *cfg.mri.size)
    c = torch.rand(3, 1, cfg.tvus.frames, *cfg.tvus.size)

    def grads(loss: torch.Tensor) -> dict[str, float]:
        net.zero_grad(set_to_none=True)
        loss.backward()
        return {
            n: float(p.grad.abs().sum()) if p.grad is not None else 0.0 for n, p in net.named_parameters()
        }

    g_mri = grads(net(x).logsumexp(1).sum())
    g_clip = grads(net.forward_clip(c).logsumexp(1).sum())
    shared = [
        n
        for n, p in net.named_parameters()
        if n.startswith(("blocks.", "norm.", "cls_token")) and p.requires_grad
    ]
    shared.append("classification_head.weight")
    assert shared and all(g_mri[n] > 0 for n in shared) and all(g_clip[n] > 0 for n in shared)
    # Each tokenizer only from its own modality.
    assert all(v == 0 for n, v in g_mri.items() if n.startswith("clip_embedding."))
    assert all(v > 0 for n, v in g_clip.items() if n.startswith("clip_embedding."))
    assert all(v == 0 for n, v in g_clip.items() if n.startswith("patch_embedding."))
    assert any(v > 0 for n, v in g_mri.items() if n.startswith("patch_embedding."))
    # The MRI path is the student's: same keys and values as a StudentViT of the same config and pool.
    from endodistill.models.student import StudentViT, _encoder_kwargs

    student = StudentViT(**_encoder_kwargs(cfg), num_classes=2, pool=cfg.joint.pool)
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("clip_embedding.")}
    student.load_state_dict(own, strict=True)
    with torch.no_grad():
        assert torch.equal(student.eval()(x), net.eval()(x))


def test_joint_reads_the_teachers_flow_input() -> None:
    """With the demo's flow teacher the joint clip tokenizer takes 2 displacement channels on the flow grid."""
    from endodistill.config import clip_input_shape
    from endodistill.models.joint import build_joint

    cfg = _cfg(teacher={"motion": "flow", "flow_size": [16, 16]})
    assert clip_input_shape(cfg) == (2, cfg.tvus.frames, 16, 16)
    net = build_joint(cfg).eval()
    assert net.clip_embedding.proj.in_channels == 2
    with torch.no_grad():
        out = net.forward_clip(torch.rand(3, *clip_input_shape(cfg)))
    assert out.shape == (3, cfg.task.num_classes) and torch.isfinite(out).all()


def test_alignment_term() -> None:
    from endodistill.train.joint import prototype_alignment

    f = torch.randn(4, 6)
    y = torch.tensor([0, 0, 1, 1])
    assert float(prototype_alignment(f, y, f, y, 2)) == pytest.approx(0.0, abs=1e-6)
    a = prototype_alignment(f, y, -f, y, 2)
    assert float(a) == pytest.approx(2.0, abs=1e-5)
    # No class in both: zero, but still part of the graph.
    z = prototype_alignment(f.requires_grad_(), y, f, torch.tensor([2, 2, 2, 2]), 3)
    assert float(z) == 0.0 and z.requires_grad


def test_mae_initialises_the_shared_transformer(tmp_path: Path) -> None:
    from endodistill.models.joint import build_joint, load_mae_into_joint
    from endodistill.models.student import build_mae, mae_encoder_state

    cfg = _cfg()
    torch.manual_seed(1)
    enc = mae_encoder_state(build_mae(cfg))
    net = build_joint(cfg)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    load_mae_into_joint(net, enc)
    after = net.state_dict()
    for k, v in enc.items():
        assert torch.equal(after[k], v), k
    for k in after:
        if k.startswith(("clip_embedding.", "classification_head.")):
            assert torch.equal(after[k], before[k]), k


@pytest.fixture(scope="module")
def paired_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny cohort where half the MRI subjects also have TVUS clips (a leak would be possible)."""
    from endodistill.data.synthetic import generate_cohort

    out = tmp_path_factory.mktemp("paired_cohort")
    generate_cohort(out, preset="tiny", seed=3, paired_fraction=0.5)
    return out


def _data(cfg, cohort: Path, tmp: Path):
    from endodistill.train.data import load_cohort

    cfg = cfg.model_copy(deep=True)
    cfg.data.cache_dir = tmp / "cache"
    return cfg, load_cohort(cfg, cohort / "manifest.csv")


def test_a_folds_test_subjects_never_enter_its_training(
    paired_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import endodistill.train.joint as joint
    from endodistill.data.splits import make_cv_splits
    from endodistill.train.seeding import fit_seed

    cfg, data = _data(_cfg(paired_cohort, finetune={"epochs": 1}), paired_cohort, tmp_path)
    lab, tv = data.labelled, data.tvus
    assert set(lab.subjects) & set(tv.subjects)  # some subjects have both modalities
    splits = make_cv_splits(lab.subjects, lab.labels.tolist(), cfg.protocol.folds, cfg.seed, 0.2)
    folds = joint.clip_folds(cfg, data)
    seen: dict[str, list[str]] = {}
    orig = joint.joint_batch_fn

    def spy(x, y, data_, clip_idx, cfg_):
        # Every training volume is one of these rows; every training clip one of these clips.
        seen["mri"] = [
            lab.subjects[int(i)] for i in np.flatnonzero((lab.x[:, None] == x[None]).flatten(2).all(2).any(1))
        ]
        seen["clips"] = [tv.subjects[int(i)] for i in clip_idx]
        return orig(x, y, data_, clip_idx, cfg_)

    monkeypatch.setattr(joint, "joint_batch_fn", spy)
    all_clips = 0
    for f in range(cfg.protocol.folds):
        unit = tmp_path / f"fold_{f}"
        info = joint.joint_fit(
            cfg, "joint", data, splits[f], folds[f], unit, fit_seed(cfg.seed, "distill", f), f"fold {f}"
        )
        held = set(splits[f]["test"]) | set(folds[f])
        assert not held & set(seen["mri"]) and not held & set(seen["clips"])
        assert not set(splits[f]["val"]) & set(seen["clips"])
        assert not held & set(info["train_subjects"]) and not held & set(info["tvus_subjects"])
        with open(unit / "predictions.csv") as fh:
            assert sorted(r["subject_id"] for r in csv.DictReader(fh)) == sorted(splits[f]["test"])
        clip_rows = joint.read_clip_predictions(unit / joint.CLIP_PREDICTIONS)
        assert {r["subject_id"] for r in clip_rows} == set(folds[f])
        all_clips += len(clip_rows)
    assert all_clips == int((tv.labels >= 0).sum())  # every labelled clip predicted once


@pytest.mark.usefixtures("sigint_raises")
def test_resume_is_exact(tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from endodistill.data.splits import make_cv_splits
    from endodistill.train.joint import clip_folds, joint_fit

    cfg, data = _data(
        _cfg(tiny_cohort, protocol={"methods": _methods(align_weight=0.5)}), tiny_cohort, tmp_path
    )
    lab = data.labelled
    split = make_cv_splits(lab.subjects, lab.labels.tolist(), cfg.protocol.folds, cfg.seed, 0.2)[0]
    clips = clip_folds(cfg, data)[0]

    def run(unit: Path, resume: bool = False) -> dict:
        return joint_fit(cfg, "joint", data, split, clips, unit, 7, "joint resume", resume)

    ref = run(tmp_path / "ref")
    monkeypatch.setenv("ENDODISTILL_TEST_KILL_AT", "SIGINT@joint resume epoch 2")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    assert (tmp_path / "cut" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "cut" / "done.json").exists()
    monkeypatch.delenv("ENDODISTILL_TEST_KILL_AT")
    again = run(tmp_path / "cut", resume=True)
    for name in ("model.safetensors", "predictions.csv", "clip_predictions.csv", "history.csv"):
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name
    assert again["best_epoch"] == ref["best_epoch"]


def _joint_model_dir(cfg, out: Path) -> Path:
    from endodistill.infer.model_dir import save_model_dir
    from endodistill.models.joint import build_joint

    torch.manual_seed(0)
    net = build_joint(cfg)
    return save_model_dir(
        out, net.state_dict(), cfg, 0.4, {"method": "joint"}, kind="joint", tvus_threshold=0.6
    )


def test_predict_a_volume_and_a_clip_and_export(tiny_cohort: Path, tmp_path: Path) -> None:
    from endodistill.infer.export import export_model
    from endodistill.infer.model_dir import load_model_dir
    from endodistill.infer.predict import predict_cases

    cfg = _cfg(tiny_cohort, protocol={"final_method": "joint"})
    model = _joint_model_dir(cfg, tmp_path / "model")
    lm = load_model_dir(model)
    assert lm.kind == "joint" and lm.threshold == 0.4 and lm.tvus_threshold == 0.6
    vol = sorted((tiny_cohort / "mri").glob("L*.nii.gz"))[0]
    clip = sorted((tiny_cohort / "tvus").iterdir())[0]
    out = tmp_path / "pred"
    assert predict_cases(model, [vol, clip], out) == 0
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["modality"] for r in rows] == ["mri", "tvus"]
    assert [float(r["threshold"]) for r in rows] == [0.4, 0.6]
    assert rows[0]["heatmap_nifti"] and rows[1]["heatmap_png"]
    # The probabilities are the two paths of the one network.
    from endodistill.data.mri import load_volume
    from endodistill.data.preprocess import preprocess_volume
    from endodistill.data.video import load_clip
    from endodistill.infer.teacher_model import clip_input

    arr, _ = preprocess_volume(load_volume(vol), cfg.mri)
    c = load_clip(clip)
    x = clip_input(c.frames, c.fps, cfg)[1]
    with torch.no_grad():
        p_mri = float(lm.model(torch.from_numpy(arr)[None]).double().softmax(1)[0, 1])
        p_clip = float(lm.model.forward_clip(torch.from_numpy(x)[None]).double().softmax(1)[0, 1])
    assert float(rows[0]["probability"]) == pytest.approx(p_mri, abs=1e-6)
    assert float(rows[1]["probability"]) == pytest.approx(p_clip, abs=1e-6)
    report = json.loads((out / "predictions.json").read_text())
    assert report["model"]["kind"] == "joint" and report["model"]["tvus_threshold"] == 0.6

    msg = export_model(model, "onnx", tmp_path / "joint.onnx")
    assert "image and clip" in msg
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "joint.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image", "clip"]
    got = sess.run(None, {"image": arr[None].astype(np.float32), "clip": x[None]})
    assert float(got[1][0, 1]) == pytest.approx(p_mri, abs=1e-4)
    assert float(got[3][0, 1]) == pytest.approx(p_clip, abs=1e-4)
    from endodistill.errors import InputError

    with pytest.raises(InputError, match="onnx only"):
        export_model(model, "monai-bundle", tmp_path / "bundle")


@pytest.mark.timeout(400)
def test_protocol_with_joint_keeps_the_five_methods(
    tiny_cohort: Path, tiny_reference_run: Path, tmp_path: Path
) -> None:
    """Adding the joint method changes nothing of the five methods (the reference run has only them)."""
    from endodistill.experiment.protocol import run_experiment

    cfg = _cfg(tiny_cohort, teacher={"epochs": 6}, protocol={"final_method": "joint"})
    cfg.protocol.methods["joint"] = cfg.protocol.methods["joint"].model_copy(update={"init": "mae"})
    cfg.data.cache_dir = tmp_path / "cache"
    cfg.trainer.threads = 1
    results = run_experiment(cfg, tmp_path / "run")
    run = tmp_path / "run"
    mine = [ln for ln in (run / "oof_predictions.csv").read_text().splitlines() if ",joint," not in ln]
    assert mine == (tiny_reference_run / "oof_predictions.csv").read_text().splitlines()
    assert results["methods"]["joint"]["n"] == results["methods"]["mae_kd_ce"]["n"]
    assert any(c["method_a"] == "mae_kd_ce" and c["method_b"] == "joint" for c in results["comparisons"])
    tv = results["tvus"]
    assert tv["methods"]["joint"]["n"] == results["teacher"]["n_labelled_clips"]
    with open(run / "oof_tvus_predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len({(r["subject_id"], r["path"]) for r in rows}) == len(rows) == tv["methods"]["joint"]["n"]
    meta = json.loads((run / "model" / "metadata.json").read_text())
    assert meta["kind"] == "joint" and 0 <= meta["tvus_threshold"] <= 1
    assert "Joint model joint on TVUS clips" in (run / "report.md").read_text()


def test_joint_lr_sets_the_joint_fits_peak_rate_only(tiny_cohort: Path, tmp_path: Path, monkeypatch) -> None:
    import endodistill.train.finetune as finetune
    import endodistill.train.joint as joint
    from endodistill.data.splits import make_cv_splits

    peaks: list[float] = []
    orig = finetune.layer_decay_groups

    def spy(net, weight_decay, lr, layer_decay):
        peaks.append(lr)
        return orig(net, weight_decay, lr, layer_decay)

    monkeypatch.setattr(finetune, "layer_decay_groups", spy)
    cfg, data = _data(
        _cfg(tiny_cohort, finetune={"epochs": 1, "lr": 1e-3}, joint={"lr": 0.0123}), tiny_cohort, tmp_path
    )
    assert load_config("tiny").joint.lr is None  # unset: the student's rate
    split = make_cv_splits(
        data.labelled.subjects, data.labelled.labels.tolist(), cfg.protocol.folds, cfg.seed, 0.2
    )[0]
    joint.joint_fit(
        cfg, "joint", data, split, joint.clip_folds(cfg, data)[0], tmp_path / "joint", 1, "fold 0"
    )
    assert peaks == [0.0123]  # not finetune.lr (1e-3)
