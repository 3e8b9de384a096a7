"""MRI and clip preprocessing: oblique geometry, mapping back to the source grid, scaling, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from endodistill.config import ClipPreprocessConfig, MRIPreprocessConfig, load_config
from endodistill.data.mri import load_volume
from endodistill.data.preprocess import (
    Geometry,
    orientation_matrix,
    preprocess_clip,
    preprocess_volume,
    resample_indices,
    sample_frames,
    sector_bbox,
    to_source_grid,
)
from endodistill.data.video import Clip, load_clip
from endodistill.data.volume import Volume

PROSTATEX = "prostatex_t2_pelvis/ProstateX-0000_t2_tse_sag"


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _oblique_volume(
    shape: tuple[int, int, int] = (40, 36, 20),
    spacing: tuple[float, float, float] = (2.0, 2.0, 3.0),
    blobs: tuple[tuple[float, float, float], ...] = ((12.0, -8.0, 6.0),),
    angles: tuple[float, float, float] = (25.0, -30.0, 40.0),
    sigma: float = 4.0,
) -> Volume:
    """A volume with an oblique, flipped affine and Gaussian blobs at known world positions (mm)."""
    rot = _rotation(*angles) @ np.diag([-1.0, 1.0, 1.0])  # a reflection too: not a pure rotation
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    centre = (np.asarray(shape) - 1) / 2.0
    aff[:3, 3] = np.array([5.0, -3.0, 2.0]) - aff[:3, :3] @ centre
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ aff[:3, :3].T + aff[:3, 3]
    # A textured "body" everywhere (so the foreground is the whole grid), bright blobs on top.
    val = 300.0 + 100.0 * np.sin(world[:, 0] / 7.0) * np.cos(world[:, 1] / 9.0) + 2.0 * world[:, 2]
    for b in blobs:
        val += 1000.0 * np.exp(-np.sum((world - np.asarray(b)) ** 2, axis=1) / (2 * sigma**2))
    return Volume(array=val.reshape(shape).astype(np.float32), affine=aff, source="synthetic", format="nifti")


def _model_voxel(geom: Geometry, world: tuple[float, float, float]) -> np.ndarray:
    return (np.linalg.inv(geom.model_affine) @ np.r_[world, 1.0])[:3]


def test_oblique_blob_lands_at_its_world_position() -> None:
    blobs = ((12.0, -8.0, 6.0), (-10.0, 10.0, -4.0))
    vol = _oblique_volume(blobs=blobs)
    cfg = MRIPreprocessConfig(spacing=(2.0, 2.0, 2.0), size=(32, 32, 32), crop="center", percentiles=(0, 100))
    arr, geom = preprocess_volume(vol, cfg)
    assert arr.shape == (1, 32, 32, 32) and arr.dtype == np.float32
    # The model grid is RAS: axis 0 runs left -> right, 1 posterior -> anterior, 2 inferior -> superior.
    np.testing.assert_allclose(geom.model_affine[:3, :3], np.diag([2.0, 2.0, 2.0]))
    for b in blobs:
        expect = _model_voxel(geom, b)
        r = np.round(expect).astype(int)
        lo, hi = np.maximum(r - 4, 0), r + 5
        win = arr[0, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        peak = np.array(np.unravel_index(np.argmax(win), win.shape)) + lo
        assert np.abs(peak - expect).max() <= 1.0, (peak, expect)
        assert arr[0][tuple(peak)] > 0.8
    # The blob at +x (right) is at a larger axis-0 index than the one at -x.
    assert _model_voxel(geom, blobs[0])[0] > _model_voxel(geom, blobs[1])[0]


def test_matches_nibabel_resampling_and_other_orientations() -> None:
    vol = _oblique_volume(spacing=(3.0, 3.0, 3.0))
    cfg = MRIPreprocessConfig(spacing=(2.0, 2.0, 2.0), size=(24, 24, 24), crop="center", percentiles=(0, 100))
    arr, geom = preprocess_volume(vol, cfg)  # upsampling: no anti-alias smoothing involved
    lo, hi = geom.intensity_range
    img = nib.Nifti1Image(np.clip((vol.array - lo) / (hi - lo), 0, 1), vol.affine)
    ref = resample_from_to(img, ((24, 24, 24), geom.model_affine), order=1, cval=0.0)
    np.testing.assert_allclose(arr[0], np.asarray(ref.dataobj), atol=1e-4)
    # LPS model axes: the same world content, axes 0 and 1 reversed.
    lps, g2 = preprocess_volume(vol, cfg.model_copy(update={"orientation": "LPS"}))
    np.testing.assert_allclose(lps[0], arr[0, ::-1, ::-1, :], atol=1e-4)
    assert "".join(nib.aff2axcodes(g2.model_affine)) == "LPS"


def test_same_world_any_storage_order_gives_same_tensor() -> None:
    vol = _oblique_volume(angles=(0.0, 0.0, 0.0))  # axis aligned, stored as L->R flipped (LAS)
    img = nib.Nifti1Image(vol.array, vol.affine)
    canon = nib.as_closest_canonical(img)
    assert nib.aff2axcodes(img.affine) != nib.aff2axcodes(canon.affine)
    vol2 = Volume(np.asarray(canon.dataobj, dtype=np.float32), canon.affine, "c", "nifti")
    cfg = MRIPreprocessConfig(spacing=(3.0, 3.0, 3.0), size=(16, 16, 16), crop="foreground")
    a, _ = preprocess_volume(vol, cfg)
    b, _ = preprocess_volume(vol2, cfg)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_to_source_grid_round_trip_and_exact_affines() -> None:
    vol = _oblique_volume(sigma=8.0)  # smooth enough to survive two linear resamplings
    cfg = MRIPreprocessConfig(spacing=(2.0, 2.0, 2.0), size=(48, 48, 48), crop="center")
    arr, geom = preprocess_volume(vol, cfg)
    back = to_source_grid(arr, geom)
    assert back.shape == vol.array.shape and back.dtype == np.float32
    lo, hi = geom.intensity_range
    src = np.clip((vol.array - lo) / (hi - lo), 0, 1)
    inside = to_source_grid(np.ones(cfg.size, np.float32), geom) > 0.999  # the model's field of view
    assert inside.mean() > 0.3
    assert np.corrcoef(src[inside], back[inside])[0, 1] > 0.95
    np.testing.assert_allclose(geom.model_to_source @ geom.source_to_model, np.eye(4), atol=1e-9)
    # A one-hot map at a model voxel comes back at the source voxel with the same world position.
    onehot = np.zeros(cfg.size, np.float32)
    onehot[30, 20, 25] = 1.0
    peak = np.unravel_index(np.argmax(to_source_grid(onehot, geom, order=0)), vol.array.shape)
    w_model = geom.model_affine @ np.r_[30, 20, 25, 1.0]
    w_src = vol.affine @ np.r_[peak, 1.0]
    assert np.linalg.norm(w_model[:3] - w_src[:3]) <= np.sqrt(3) * 3.0 / 2 + 1.0
    with pytest.raises(ValueError, match="model shape"):
        to_source_grid(np.zeros((5, 5, 5)), geom)


def test_geometry_json_round_trip_is_exact() -> None:
    _, geom = preprocess_volume(_oblique_volume(), MRIPreprocessConfig())
    again = Geometry.from_dict(json.loads(json.dumps(geom.to_dict())))
    np.testing.assert_array_equal(again.model_affine, geom.model_affine)
    np.testing.assert_array_equal(again.source_affine, geom.source_affine)
    assert again.source_shape == geom.source_shape and again.model_shape == geom.model_shape


def test_robust_scaling_foreground_crop_and_constant_volume() -> None:
    rng = np.random.default_rng(0)
    shape = (60, 60, 30)
    base = rng.normal(5, 1, size=shape).astype(np.float32)
    base[35:55, 30:50, 5:25] += 200 + rng.normal(0, 10, size=(20, 20, 20)).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    cfg = MRIPreprocessConfig(spacing=(2.0, 2.0, 2.0), size=(24, 24, 24), crop="foreground")
    a, g = preprocess_volume(Volume(base, aff, "s", "nifti"), cfg)
    # The body (off-centre in the source) is centred in the model grid.
    com = np.array(np.unravel_index(np.argmax(a[0] > 0.3), a[0].shape))
    assert a[0, 11, 11, 11] > 0.3 and a[0, 0, 0, 0] == 0.0 and com.min() > 0
    np.testing.assert_allclose(g.extra["centre_world"], [89.0, 79.0, 29.0], atol=1.0)
    # A few absurdly bright voxels barely move the scaling of the rest.
    spiky = base.copy()
    spiky[40, 40, 10:13] = 1e6
    b, g2 = preprocess_volume(Volume(spiky, aff, "s", "nifti"), cfg)
    assert g2.intensity_range[1] < 1000
    assert np.median(np.abs(a - b)) < 1e-3
    # A constant volume gives zeros, not NaN.
    c, _ = preprocess_volume(Volume(np.full(shape, 7.0, np.float32), aff, "s", "nifti"), cfg)
    assert np.all(c == 0.0)
    # Deterministic: bit-identical on rerun.
    assert preprocess_volume(Volume(base, aff, "s", "nifti"), cfg)[0].tobytes() == a.tobytes()


def test_orientation_matrix() -> None:
    np.testing.assert_array_equal(orientation_matrix("RAS"), np.eye(3))
    np.testing.assert_array_equal(orientation_matrix("LPS"), np.diag([-1.0, -1.0, 1.0]))
    with pytest.raises(ValueError):
        orientation_matrix("RRS")
    with pytest.raises(ValueError):
        orientation_matrix("XY")


# ------------------------------------------------------------------------------------- clips


def _fan_clip(t: int = 24, h: int = 90, w: int = 120, fps: float = 20.0) -> Clip:
    """Moving speckle in a region, static burned-in text block and black borders."""
    rng = np.random.default_rng(0)
    frames = np.zeros((t, h, w), np.uint8)
    frames[:, 20:80, 30:100] = rng.integers(20, 200, size=(t, 60, 70))
    frames[:, 2:10, 2:40] = 230  # static text: bright but never changes
    return Clip(frames, fps, "synthetic", "npy")


def test_sector_crop_ignores_static_text_and_borders() -> None:
    clip = _fan_clip()
    y0, y1, x0, x1 = sector_bbox(clip.frames)
    assert (y0, y1, x0, x1) == (20, 80, 30, 100)
    out = preprocess_clip(clip, ClipPreprocessConfig(size=(32, 32), sector_crop=True))
    assert out.shape == (24, 32, 32) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    # Aspect kept: the 60x70 sector fills the width, thin zero bands above/below.
    assert out[:, 16, :].mean() > 0.2 and np.all(out[:, 0, :] < 0.05)
    full = preprocess_clip(clip, ClipPreprocessConfig(size=(32, 32), sector_crop=False))
    assert full[:, :10, :12].max() > 0.5  # the text is still there without the crop


def test_frame_rate_resampling() -> None:
    frames = np.stack([np.full((8, 8), k, np.uint8) for k in range(40)])
    clip = Clip(frames, 20.0, "s", "npy")
    out = preprocess_clip(clip, ClipPreprocessConfig(size=(8, 8), sector_crop=False, fps=10.0))
    assert out.shape == (20, 8, 8)
    np.testing.assert_allclose(out[:, 0, 0] * 255, np.arange(0, 40, 2), atol=1e-3)
    np.testing.assert_array_equal(resample_indices(10, 10.0, 30.0)[:6], [0, 0, 1, 1, 1, 2])
    same = preprocess_clip(clip, ClipPreprocessConfig(size=(8, 8), sector_crop=False))
    assert same.shape[0] == 40


def test_sample_frames_eval_and_train() -> None:
    arr = np.arange(50)[:, None, None] * np.ones((1, 2, 2))
    ev = sample_frames(arr, 8, train=False, rng=np.random.default_rng(0))
    assert ev.shape == (8, 2, 2) and ev[0, 0, 0] == 0 and ev[-1, 0, 0] == 49
    seen = set()
    for seed in range(20):
        tr = sample_frames(arr, 8, train=True, rng=np.random.default_rng(seed))[:, 0, 0]
        steps = np.diff(tr)
        assert np.all(steps == steps[0]) and steps[0] >= 1  # contiguous, constant stride
        seen.add(int(tr[0]))
    assert len(seen) > 3  # random starts
    a = sample_frames(arr, 8, True, np.random.default_rng(7))
    b = sample_frames(arr, 8, True, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    fixed = sample_frames(arr, 4, True, np.random.default_rng(1), stride=1)[:, 0, 0]
    np.testing.assert_array_equal(np.diff(fixed), [1, 1, 1])
    short = sample_frames(arr[:3], 8, train=True, rng=np.random.default_rng(0))
    assert short.shape == (8, 2, 2) and short[-1, 0, 0] == 2


# ----------------------------------------------------------------------------------- real data


def test_real_mri_to_model_ready_tensors(real_data: Path) -> None:
    cfg = load_config("demo").mri
    dcm = load_volume(real_data / PROSTATEX)
    a, ga = preprocess_volume(dcm, cfg)
    b, gb = preprocess_volume(load_volume(real_data / f"{PROSTATEX}.nii.gz"), cfg)
    assert a.shape == (1, *cfg.size) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0 and a.mean() > 0.1
    np.testing.assert_allclose(a, b, atol=1e-5)  # DICOM and its NIfTI: the same tensor
    np.testing.assert_allclose(ga.model_affine, gb.model_affine, atol=1e-4)
    back = to_source_grid(a, ga)
    assert back.shape == dcm.array.shape
    lo, hi = ga.intensity_range
    src = np.clip((dcm.array - lo) / (hi - lo), 0, 1)
    inside = back > 0
    assert np.corrcoef(src[inside], back[inside])[0, 1] > 0.8
    ts = load_volume(real_data / "totalsegmentator_mr_abdomen/example_mr_sm.nii.gz")
    c, _ = preprocess_volume(ts, cfg)
    assert c.shape == (1, *cfg.size) and np.isfinite(c).all()


def test_real_clips_to_model_ready_tensors(real_data: Path) -> None:
    cfg = load_config("demo").tvus
    rng = np.random.default_rng(0)
    for rel, n in (
        ("us_sonocrop_pocus/ruq-simple.mp4", 60),
        ("us_gdcm_echo_multiframe_dicom/US-PAL-8-10x-echo.dcm", 10),
    ):
        clip = load_clip(real_data / rel, max_frames=n)
        out = preprocess_clip(clip, cfg)
        assert out.shape == (n, *cfg.size) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0 and out.mean() > 0.02
        x = sample_frames(out, cfg.frames, train=False, rng=rng)
        assert x.shape == (cfg.frames, *cfg.size)
    # The fan of the abdominal clip: burned-in text on both sides is left out of the crop.
    ruq = load_clip(real_data / "us_sonocrop_pocus/ruq-simple.mp4", max_frames=60)
    _, y1, x0, x1 = sector_bbox(ruq.frames)
    assert 60 < x0 < 200 and 600 < x1 < 720 and y1 > 400


def test_real_clips_give_a_coupling_map(real_data: Path) -> None:
    # The clip baseline's statistic on real ultrasound (freehand abdominal and echo clips, no sliding sign):
    # the flow, its coupling map and percentile come out finite, in range and the same on a rerun.
    import torch

    from endodistill.data.preprocess import clip_displacement
    from endodistill.train.clip_baseline import clip_coupling_features, coupling_map

    cfg = load_config("demo")
    size = tuple(cfg.teacher.flow_size)
    for rel in ("us_sonocrop_pocus/ruq-simple.mp4", "us_gdcm_echo_multiframe_dicom/US-PAL-8-10x-echo.dcm"):
        clip = load_clip(real_data / rel, max_frames=24)
        d = clip_displacement(clip, cfg.tvus, size)
        ev = sample_frames(d, cfg.tvus.frames, train=False, rng=np.random.default_rng(0))
        x = torch.from_numpy(np.ascontiguousarray(ev.transpose(1, 0, 2, 3)))[None]
        g = coupling_map(x[:, :, 1:] - x[:, :, :-1])
        assert g.shape == (1, *size) and torch.isfinite(g).all(), rel
        assert g.abs().max() < 50, rel  # scaled by the 90th percentile of its magnitude
        f = clip_coupling_features(x)
        assert f.shape == (1, 1) and np.isfinite(f).all() and -1.0 <= f[0, 0] <= 1.5, rel
        np.testing.assert_array_equal(clip_coupling_features(x), f)
