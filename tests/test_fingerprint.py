"""The dataset fingerprint and the deployable TVUS teacher: warnings on foreign inputs, teacher predict/export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from endodistill.data.fingerprint import (
    build_fingerprint,
    check_input,
    clip_stats,
    summarise,
    synthetic_note,
    volume_stats,
)
from endodistill.data.preprocess import preprocess_clip, sample_frames
from endodistill.errors import InputError
from endodistill.infer.export import export_model
from endodistill.infer.model_dir import load_model_dir
from endodistill.infer.predict import predict_cases
from endodistill.infer.teacher_model import clip_input, occlusion_map, teacher_member_dirs
from endodistill.models.teacher import build_teacher, teacher_in_channels
from endodistill.models.weights import load_weights
from endodistill.train.teacher import predict_probs


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "predictions.csv", newline="") as fh:
        return {r["case_id"]: r for r in csv.DictReader(fh)}


def _vol_stats(rng: np.random.Generator, spacing: tuple[float, float, float]) -> dict:
    arr = rng.gamma(2.0, 50.0, size=(32, 32, 16)).astype(np.float32)
    pre = np.clip(rng.normal(0.4, 0.15, size=(1, 8, 16, 16)), 0, 1).astype(np.float32)
    return volume_stats(arr, spacing, pre)


# ------------------------------------------------------------------------------------------------ unit


def test_stats_sort_axes_and_check_warns_on_spacing_fov_and_intensity() -> None:
    rng = np.random.default_rng(0)
    train = [_vol_stats(rng, (1.0 + 0.05 * i, 1.0 + 0.05 * i, 4.0)) for i in range(5)]
    assert train[0]["spacing_mm"] == [1.0, 1.0, 4.0] and train[0]["fov_mm"] == [32.0, 32.0, 64.0]
    fp = build_fingerprint({"mri": summarise(train, ["a", "a", "b", "b", "b"])}, synthetic=False)
    assert fp["modalities"]["mri"]["sites"]["b"]["n"] == 3
    assert fp["modalities"]["mri"]["ranges"]["spacing_mm[0]"]["max"] == pytest.approx(1.2)
    # Drawn like the training cases: no warning.
    assert check_input(fp, "mri", _vol_stats(rng, (1.1, 1.1, 4.0))) == []
    # Four times finer in plane: spacing and field of view warn, with the numbers a user needs.
    fine = _vol_stats(rng, (0.25, 0.25, 4.0))
    w = check_input(fp, "mri", fine)
    assert "voxel spacing 0.25 mm (finest axis) outside the training range 1.00-1.20 mm" in w
    assert any(s.startswith("field of view (finest axis) 4.0x smaller than in training") for s in w)
    # Inverted intensities (bright background): the intensity check warns, geometry does not.
    odd = _vol_stats(rng, (1.1, 1.1, 4.0))
    odd["intensity_q"] = [1.0 - q for q in reversed(odd["intensity_q"])]
    (only,) = check_input(fp, "mri", odd)
    assert only.startswith("intensity distribution far from training")
    # No fingerprint (older model directories) or another modality: nothing to compare, no warning.
    assert check_input(None, "mri", fine) == [] and check_input(fp, "tvus", fine) == []
    assert synthetic_note(fp) == "" and "synthetic" in synthetic_note({"synthetic": True})


def test_clip_checks_frame_rate_and_duration() -> None:
    rng = np.random.default_rng(1)
    clips = [clip_stats(np.zeros((24, 96, 96), np.uint8), 10.0, rng.random((24, 32, 32))) for _ in range(4)]
    fp = build_fingerprint({"tvus": summarise(clips)}, synthetic=True)
    assert check_input(fp, "tvus", clips[0]) == []
    long = clip_stats(np.zeros((240, 96, 96), np.uint8), 30.0, rng.random((24, 32, 32)))
    w = check_input(fp, "tvus", long)
    assert "frame rate 30.00 fps outside the training range 10.00-10.00 fps" in w
    assert "clip duration 3.3x larger than in training (8.0 s vs 2.4-2.4 s)" in w


# ------------------------------------------------------------------------------ on a finished tiny run


@pytest.fixture(scope="module")
def foreign_cases(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One synthetic case as it is, and two made foreign from it (written next to nothing of the cohort)."""
    d = tmp_path_factory.mktemp("foreign")
    src = sorted((tiny_cohort / "mri").glob("*.nii.gz"))[0]
    img = nib.load(src)
    arr = np.asarray(img.dataobj, dtype=np.float32)
    scaled = img.affine.copy()
    scaled[:3, :3] *= 0.25  # same voxels, four times finer: spacing and field of view
    nib.save(nib.Nifti1Image(arr, scaled), d / "fine.nii.gz")
    # Exported with a display window that saturates everything brighter than the 60th percentile (a
    # common fault of 8-bit or windowed exports): the geometry is intact, the intensities are not.
    clipped = np.minimum(arr, np.percentile(arr, 60))
    nib.save(nib.Nifti1Image(clipped, img.affine), d / "windowed.nii.gz")
    (d / "same.nii.gz").symlink_to(src)
    return {"same": d / "same.nii.gz", "fine": d / "fine.nii.gz", "windowed": d / "windowed.nii.gz"}


def test_run_and_model_directories_carry_the_fingerprint(tiny_reference_run: Path) -> None:
    fp = json.loads((tiny_reference_run / "fingerprint.json").read_text())
    assert fp["synthetic"] is True and fp["schema_version"] == 1
    assert fp["modalities"]["mri"]["n"] == 40 and fp["modalities"]["tvus"]["n"] == 24
    assert set(fp["modalities"]["mri"]["sites"]) >= {"siteA"}
    for model in ("model", "teacher_model"):
        assert json.loads((tiny_reference_run / model / "fingerprint.json").read_text()) == fp


def test_predict_warns_on_foreign_scans_and_strict_refuses_them(
    tiny_reference_run: Path, foreign_cases: dict[str, Path], tmp_path: Path
) -> None:
    inputs = [foreign_cases[k] for k in ("same", "fine", "windowed")]
    assert predict_cases(tiny_reference_run / "model", inputs, tmp_path / "p", heatmap=False) == 0
    rows = _rows(tmp_path / "p")
    assert rows["same"]["warnings"] == "" and rows["same"]["status"] == "ok"
    assert "voxel spacing" in rows["fine"]["warnings"] and "field of view" in rows["fine"]["warnings"]
    assert rows["windowed"]["warnings"].startswith("intensity distribution far from training")
    assert all("synthetic" in r["notes"] for r in rows.values())
    report = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert report["model"]["fingerprint"] is True and report["cases"][0]["warnings"] == []
    assert (
        predict_cases(tiny_reference_run / "model", inputs, tmp_path / "s", heatmap=False, strict=True) == 2
    )
    rows = _rows(tmp_path / "s")
    assert rows["same"]["status"] == "ok"
    assert rows["fine"]["status"] == "failed" and "refused (--strict)" in rows["fine"]["error"]


def test_teacher_model_is_the_mean_of_the_fold_teachers(tiny_reference_run: Path, tiny_cohort: Path) -> None:
    lm = load_model_dir(tiny_reference_run / "teacher_model")
    cfg = lm.cfg
    units = teacher_member_dirs(tiny_reference_run)
    # The tiny preset trains a hold-out teacher and one on all clips (in-sample targets): the latter is
    # deployed; under CV with cross-fitted targets the fold teachers are.
    assert [u.name for u in units] == (
        ["full"] if cfg.teacher.targets == "in_sample" else [f"fold_{f}" for f in range(cfg.teacher.folds)]
    )
    assert lm.kind == "teacher" and lm.metadata["arch"]["members"] == len(units)
    assert lm.metadata["metrics"]["threshold_source"] == "Youden on out-of-fold predictions"
    metrics = json.loads((tiny_reference_run / "teacher" / "metrics.json").read_text())
    assert lm.threshold == pytest.approx(metrics["youden"]["threshold"])
    from endodistill.data.video import load_clip

    clip = load_clip(sorted((tiny_cohort / "tvus").glob("*.mp4"))[0])
    _, x = clip_input(clip.frames, clip.fps, cfg)
    with torch.inference_mode():
        got = torch.softmax(lm.model(torch.from_numpy(x)[None]), dim=1)
    members = []
    for unit in units:
        net = build_teacher(cfg.teacher, cfg.task.num_classes, teacher_in_channels(cfg))
        net.load_state_dict(load_weights(unit / "model.safetensors"))
        members.append(predict_probs(net, torch.from_numpy(x)[None], cfg))
    torch.testing.assert_close(got.float(), torch.stack(members).mean(0).float(), atol=1e-5, rtol=1e-4)
    # The eval input is the same spread of frames that the CV teachers were scored on.
    assert x.shape == (1, cfg.tvus.frames, *cfg.tvus.size) and cfg.teacher.motion != "flow"
    grey = sample_frames(
        preprocess_clip(clip, cfg.tvus), cfg.tvus.frames, train=False, rng=np.random.default_rng(0)
    )
    np.testing.assert_array_equal(x[0], grey)


def test_flow_teacher_model_reads_displacements_and_exports(tmp_path: Path, tiny_cohort: Path) -> None:
    """The demo's teacher reads optical flow: the deployable one computes it from the clip, ONNX too."""
    from endodistill.config import load_config
    from endodistill.data.preprocess import clip_displacement
    from endodistill.data.video import load_clip
    from endodistill.infer.model_dir import save_model_dir
    from endodistill.infer.teacher_model import build_teacher_ensemble

    cfg = load_config("tiny", ["teacher.motion=flow", "teacher.flow_size=[8,8]", "teacher.motion_norm=true"])
    clip = load_clip(sorted((tiny_cohort / "tvus").glob("*.mp4"))[0])
    grey, x = clip_input(clip.frames, clip.fps, cfg)
    assert grey.shape == (cfg.tvus.frames, *cfg.tvus.size) and x.shape == (2, cfg.tvus.frames, 8, 8)
    disp = clip_displacement(clip, cfg.tvus, (8, 8))
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(
        x, sample_frames(disp, cfg.tvus.frames, train=False, rng=rng).transpose(1, 0, 2, 3)
    )
    torch.manual_seed(0)
    net = build_teacher_ensemble(cfg, 2)
    d = save_model_dir(tmp_path / "tm", net.state_dict(), cfg, 0.5, {}, kind="teacher", members=2)
    lm = load_model_dir(d)
    assert lm.metadata["arch"]["in_channels"] == 2 and lm.metadata["arch"]["flow_size"] == [8, 8]
    heat = occlusion_map(lm.model, x, 1)
    assert heat.shape == (8, 8) and np.isfinite(heat).all()
    msg = export_model(d, "onnx", tmp_path / "f.onnx")  # validated on random fields and a phantom clip
    assert "max |onnxruntime - torch|" in msg


def test_teacher_predicts_clips_with_occlusion_maps_and_exports(
    tiny_reference_run: Path, tiny_cohort: Path, real_data: Path, tmp_path: Path
) -> None:
    clips = sorted((tiny_cohort / "tvus").glob("*.mp4"))[:2]
    real = real_data / "us_sonocrop_pocus" / "ruq-simple.mp4"
    out = tmp_path / "p"
    assert predict_cases(tiny_reference_run / "teacher_model", [*clips, real], out) == 0
    rows = _rows(out)
    assert set(rows) == {clips[0].stem, clips[1].stem, "ruq-simple"}
    for cid in (clips[0].stem, clips[1].stem):
        assert rows[cid]["status"] == "ok" and rows[cid]["warnings"] == ""
        assert (out / rows[cid]["heatmap_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "frame rate" in rows["ruq-simple"]["warnings"] and "frame width" in rows["ruq-simple"]["warnings"]
    report = json.loads((out / "predictions.json").read_text())
    assert report["model"]["kind"] == "teacher" and report["heatmap_method"].startswith("occlusion")
    # Occlusion: a model that only looks at the top-left quarter has its saliency there and nowhere else.
    lm = load_model_dir(tiny_reference_run / "teacher_model")

    class Corner(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x[:, :, :, :8, :8].std(dim=2).mean(dim=(1, 2, 3))
            return torch.stack([-m, m], dim=1) * 10

    x = np.random.default_rng(0).random((1, 8, 32, 32)).astype(np.float32)
    heat = occlusion_map(Corner(), x, lm.cfg.task.positive_class)
    assert heat[:8, :8].min() > 0 and heat[12:, :].max() == 0 and heat[:, 12:].max() == 0
    # ONNX export of the ensemble, validated against PyTorch on random clips and a real clip.
    msg = export_model(tiny_reference_run / "teacher_model", "onnx", tmp_path / "t.onnx", sample=real)
    assert (tmp_path / "t.onnx").is_file() and "max |onnxruntime - torch|" in msg
    with pytest.raises(InputError, match="onnx only"):
        export_model(tiny_reference_run / "teacher_model", "monai-bundle", tmp_path / "b")


def test_teacher_model_with_absurd_member_count_is_refused(tiny_reference_run: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "tm"
    shutil.copytree(tiny_reference_run / "teacher_model", d)
    meta = json.loads((d / "metadata.json").read_text())
    meta["arch"]["members"] = 10**6
    (d / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"arch\.members"):
        load_model_dir(d)


def test_teacher_predicts_a_folder_of_png_frames_like_its_video(
    tiny_reference_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    """A clip given as PNG frames (+ fps.txt) is the same clip as its video: the same probability."""
    from PIL import Image

    from endodistill.data.video import load_clip

    video = sorted((tiny_cohort / "tvus").glob("*.mp4"))[0]
    clip = load_clip(video)
    frames = tmp_path / "cases" / "clipA"
    frames.mkdir(parents=True)
    for i, f in enumerate(clip.frames):
        Image.fromarray(f).save(frames / f"{i:03d}.png")
    (frames / "fps.txt").write_text(str(clip.fps))
    assert (
        predict_cases(
            tiny_reference_run / "teacher_model", [tmp_path / "cases", video], tmp_path / "p", heatmap=False
        )
        == 0
    )
    rows = _rows(tmp_path / "p")
    assert float(rows["clipA"]["probability"]) == pytest.approx(
        float(rows[video.stem]["probability"]), abs=1e-9
    )
