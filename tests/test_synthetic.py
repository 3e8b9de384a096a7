"""The synthetic pelvic cohort: formats, geometry, labels, pairing, determinism, ceilings, difficulty."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import av
import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from endodistill.data.synthetic import (
    MRI_SIGNS,
    PRESETS,
    format_summary,
    generate_cohort,
    mri_oracle,
    plan_cohort,
    population_ceilings,
    tvus_oracle,
)
from endodistill.errors import InputError


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="gray") for f in c.decode(video=0)])


def _voxels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


# ---- hand-made features for the difficulty ordering ---------------------------------------------


def _step_shifts(frames: np.ndarray, centre: tuple[float, float], half: int, search: int) -> np.ndarray:
    """Integer frame-to-frame displacement of the patch around ``centre`` (normalised cross-correlation)."""
    f = frames.astype(np.float32)
    _, h, w = f.shape
    r = int(np.clip(round(centre[0]), half + search, h - half - search - 1))
    c = int(np.clip(round(centre[1]), half + search, w - half - search - 1))
    ref = f[:-1, r - half : r + half + 1, c - half : c + half + 1]
    ref = ref - ref.mean((1, 2), keepdims=True)
    m = half + search
    area = f[1:, r - m : r + m + 1, c - m : c + m + 1]
    # Every candidate patch of the next frame at once: (T-1, 2s+1, 2s+1, 2h+1, 2h+1).
    cand = np.lib.stride_tricks.sliding_window_view(area, (2 * half + 1, 2 * half + 1), axis=(1, 2))
    cand = cand - cand.mean((3, 4), keepdims=True)
    num = np.einsum("tijkl,tkl->tij", cand, ref)
    den = np.sqrt((cand * cand).sum((3, 4)) * (ref * ref).sum((1, 2))[:, None, None] + 1e-6)
    best = (num / den).reshape(len(ref), -1).argmax(axis=1)
    return np.stack(np.unravel_index(best, num.shape[1:]), axis=1).astype(float) - search


def tvus_motion_feature(frames: np.ndarray, uterus_px, rectum_px, mm_per_px: float) -> float:
    """Total relative motion (px) between a patch on the uterus side and one on the rectum side."""
    half = max(3, round(6 / mm_per_px))
    search = max(2, round(6 / mm_per_px))
    du = _step_shifts(frames, uterus_px, half, search)
    dr = _step_shifts(frames, rectum_px, half, search)
    return float(np.abs(du - dr).sum())


def mri_pod_intensity(path: Path, pod_world: np.ndarray, radius_mm: float = 8.0) -> float:
    """Mean intensity within ``radius_mm`` of the POD centre, relative to the body's median."""
    img = nib.load(path)
    arr = np.asarray(img.dataobj, dtype=np.float32)
    ijk = np.indices(arr.shape).reshape(3, -1).T
    world = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    near = np.linalg.norm(world - pod_world, axis=1) < radius_mm
    body = arr > 0.3 * np.percentile(arr, 50)
    return float(arr.reshape(-1)[near].mean() / np.median(arr[body]))


# ---- tests ----------------------------------------------------------------------------------------


def test_manifest_and_files_are_readable(tiny_cohort: Path) -> None:
    summary = json.loads((tiny_cohort / "cohort.json").read_text())
    rows = _rows(tiny_cohort / "manifest.csv")
    assert list(rows[0]) == ["subject_id", "modality", "path", "label", "site"]
    c = summary["counts"]
    assert len(rows) == c["mri_labelled"] + c["mri_unlabelled"] + c["tvus"]
    sites = summary["mri"]["sites"]
    tv = summary["tvus"]
    for row in rows:
        path = tiny_cohort / row["path"]
        assert path.is_file()
        assert row["label"] in {"", "0", "1"}
        if row["modality"] == "mri":
            img = nib.load(path)
            assert img.get_data_dtype() == np.uint16
            assert img.shape == tuple(sites[row["site"]]["shape"])
            assert np.allclose(img.header.get_zooms(), sites[row["site"]]["zooms"], atol=1e-4)
            # Sagittal: thick slices along L-R, fine in-plane pixels; voxel axes A->P, S->I, L->R.
            assert nib.aff2axcodes(img.affine) == ("P", "I", "R")
            zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
            assert zooms[2] > 1.5 * zooms[0] and np.isclose(zooms[0], zooms[1])
            assert np.allclose(img.get_qform(), img.get_sform(), atol=1e-4)
            assert int(img.header["sform_code"]) == 1
            assert _voxels(path).max() > 0
        else:
            assert row["modality"] == "tvus" and row["label"] in {"0", "1"}
            with av.open(str(path)) as cont:
                st = cont.streams.video[0]
                assert st.codec_context.name == "h264"
                assert st.codec_context.pix_fmt == "yuv420p"
                assert float(st.average_rate) == tv["fps"]
            frames = _frames(path)
            assert frames.shape == (tv["frames"], *tv["size"])
            # A fan: the top corners are outside the sector (black), the centre is imaged.
            assert frames[:, :3, :3].max() < 10 and frames[:, tv["size"][0] // 2].mean() > 20


def test_pod_lies_inside_the_volume(tiny_cohort: Path) -> None:
    for row in _rows(tiny_cohort / "latents.csv"):
        if row["modality"] != "mri":
            continue
        img = nib.load(tiny_cohort / "mri" / f"{row['subject_id']}.nii.gz")
        pod = np.array([float(row[k]) for k in ("pod_x", "pod_y", "pod_z")])
        ijk = np.linalg.inv(img.affine) @ np.r_[pod, 1.0]
        # Near the centre of the field of view, so a centred 64x128x128 mm crop contains it.
        half_mm = (np.array(img.shape) - 1) / 2 * np.array(img.header.get_zooms())
        off_mm = np.abs(ijk[:3] - (np.array(img.shape) - 1) / 2) * np.array(img.header.get_zooms())
        assert np.all(off_mm < np.minimum(half_mm, [45, 45, 20]))


def test_counts_and_prevalence(tiny_cohort: Path) -> None:
    summary = json.loads((tiny_cohort / "cohort.json").read_text())
    rows = _rows(tiny_cohort / "manifest.csv")
    pre = PRESETS["tiny"]
    mri_l = [r for r in rows if r["modality"] == "mri" and r["label"] != ""]
    mri_u = [r for r in rows if r["modality"] == "mri" and r["label"] == ""]
    tvus = [r for r in rows if r["modality"] == "tvus"]
    assert (len(mri_l), len(mri_u), len(tvus)) == (pre.n_mri_labelled, pre.n_mri_unlabelled, pre.n_tvus)
    for group in (mri_l, tvus):
        prev = np.mean([int(r["label"]) for r in group])
        assert 0.2 <= prev <= 0.4
    assert summary["prevalence"]["mri_labelled"] == pytest.approx(
        np.mean([int(r["label"]) for r in mri_l]), abs=1e-4
    )
    assert {r["site"] for r in mri_l + mri_u} <= {s.name for s in pre.mri_sites}
    assert len({r["site"] for r in mri_l + mri_u}) >= 2


@pytest.mark.parametrize("preset", ["demo", "paper"])
def test_plan_sizes_and_prevalence_of_larger_presets(preset: str) -> None:
    plan = plan_cohort(preset, seed=3)
    pre = PRESETS[preset]
    mri_l = [p for p in plan if p.modality == "mri" and p.label is not None]
    mri_u = [p for p in plan if p.modality == "mri" and p.label is None]
    tvus = [p for p in plan if p.modality == "tvus"]
    assert (len(mri_l), len(mri_u), len(tvus)) == (pre.n_mri_labelled, pre.n_mri_unlabelled, pre.n_tvus)
    assert len(mri_u) >= 2 * len(mri_l)
    for group in (mri_l, tvus):
        assert 0.2 <= np.mean([p.label for p in group]) <= 0.4
    assert {p.subject_id for p in tvus}.isdisjoint({p.subject_id for p in mri_l + mri_u})


def test_mri_and_tvus_subjects_are_disjoint_by_default(tiny_cohort: Path) -> None:
    rows = _rows(tiny_cohort / "manifest.csv")
    mri = {r["subject_id"] for r in rows if r["modality"] == "mri"}
    tvus = {r["subject_id"] for r in rows if r["modality"] == "tvus"}
    assert mri.isdisjoint(tvus)
    assert len({(r["subject_id"], r["modality"]) for r in rows}) == len(rows)


def test_paired_fraction_overlaps_with_same_labels(tmp_path: Path) -> None:
    plan = plan_cohort("demo", seed=1, paired_fraction=0.25)
    mri_l = {p.subject_id: p.label for p in plan if p.modality == "mri" and p.label is not None}
    tvus = [p for p in plan if p.modality == "tvus"]
    paired = [p for p in tvus if p.subject_id in mri_l]
    assert len(paired) == round(0.25 * len(tvus))
    assert all(p.label == mri_l[p.subject_id] for p in paired)
    assert 0.2 <= np.mean([p.label for p in tvus]) <= 0.4

    # Rendered: the manifest has both files of a paired subject, and its MRI does not change by pairing.
    kw = {"preset": "tiny", "seed": 0, "n_mri_labelled": 6, "n_mri_unlabelled": 0, "n_tvus": 4}
    generate_cohort(tmp_path / "p", paired_fraction=0.5, **kw)
    generate_cohort(tmp_path / "u", preset="tiny", n_mri_labelled=6, n_mri_unlabelled=0, n_tvus=2)
    rows = _rows(tmp_path / "p" / "manifest.csv")
    by_mod = {m: {r["subject_id"]: r["label"] for r in rows if r["modality"] == m} for m in ("mri", "tvus")}
    both = set(by_mod["mri"]) & set(by_mod["tvus"])
    assert len(both) == 2
    assert all(by_mod["mri"][s] == by_mod["tvus"][s] for s in both)
    for s in both:
        assert np.array_equal(
            _voxels(tmp_path / "p" / f"mri/{s}.nii.gz"), _voxels(tmp_path / "u" / f"mri/{s}.nii.gz")
        )
    with pytest.raises(InputError):
        plan_cohort("tiny", paired_fraction=1.0, n_mri_labelled=4, n_tvus=10)


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path, tiny_cohort: Path) -> None:
    kw = {"preset": "tiny", "n_mri_labelled": 4, "n_mri_unlabelled": 1, "n_tvus": 3}
    a = generate_cohort(tmp_path / "a", seed=5, threads=1, **kw)
    b = generate_cohort(tmp_path / "b", seed=5, threads=3, **kw)  # rendered in parallel: same bytes
    c = generate_cohort(tmp_path / "c", seed=6, **kw)
    assert a == b
    rows = _rows(tmp_path / "a" / "manifest.csv")
    assert rows == _rows(tmp_path / "b" / "manifest.csv")
    assert (tmp_path / "a" / "latents.csv").read_text() == (tmp_path / "b" / "latents.csv").read_text()
    differs = 0
    for row in rows:
        pa, pb, pc = (tmp_path / d / row["path"] for d in "abc")
        load = _voxels if row["modality"] == "mri" else _frames
        assert np.array_equal(load(pa), load(pb)), row["path"]
        assert pa.read_bytes() == pb.read_bytes(), row["path"]
        differs += not (
            pc.exists() and load(pc).shape == load(pa).shape and np.array_equal(load(pa), load(pc))
        )
    assert differs == len(rows)
    assert c["ceilings"] is not None


def test_ceilings_are_what_the_latents_give(tiny_cohort: Path) -> None:
    summary = json.loads((tiny_cohort / "cohort.json").read_text())
    prevalence = summary["prevalence"]["generative"]
    rows = _rows(tiny_cohort / "latents.csv")
    for modality in ("mri", "tvus"):
        sub = [r for r in rows if r["modality"] == modality]
        labels = [int(r["label"]) for r in sub]
        stored = np.array([float(r["oracle"]) for r in sub])
        if modality == "mri":
            recomputed = np.array([mri_oracle({k: int(r[k]) for k in MRI_SIGNS}, prevalence) for r in sub])
        else:
            recomputed = np.array([tvus_oracle(float(r["sliding"]), prevalence) for r in sub])
        assert np.allclose(stored, recomputed, atol=1e-8)
        assert summary["ceilings"][modality] == pytest.approx(roc_auc_score(labels, stored), abs=1e-6)
    pop = population_ceilings()
    assert summary["population_ceilings"] == pop
    assert 0.8 <= pop["mri"] <= 0.92 and pop["tvus"] >= 0.97
    # Each MRI sign occurs in only some positives and also in some negatives.
    assert all(0 < p_neg < p_pos < 1 for p_pos, p_neg in MRI_SIGNS.values())


@pytest.mark.parametrize("coupling", [0.0, 0.6])
def test_ceiling_of_a_subset_of_signs(coupling: float) -> None:
    full = population_ceilings(coupling)
    assert population_ceilings(coupling, signs=list(MRI_SIGNS)) == full
    if coupling == 0:
        assert population_ceilings(signs=["retroflexion"])["mri"] == pytest.approx(0.70)  # 0.55 vs 0.15
    # Each sign taken away can only lower the ceiling (the posterior of fewer signs is a coarser score).
    names = list(MRI_SIGNS)
    ceilings = [population_ceilings(coupling, signs=names[:k])["mri"] for k in range(len(names) + 1)]
    assert ceilings[0] == 0.5 and ceilings[-1] == full["mri"]
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(ceilings))
    with pytest.raises(ValueError, match="unknown MRI signs"):
        population_ceilings(coupling, signs=["retroflexion", "tilt"])


def test_motion_separates_tvus_better_than_intensity_separates_mri(tmp_path: Path) -> None:
    out = tmp_path / "difficulty"
    # The demo preset's resolution, 60 labelled subjects per modality (no unlabelled pool needed).
    summary = generate_cohort(out, preset="demo", seed=0, n_mri_labelled=60, n_mri_unlabelled=0, n_tvus=60)
    mm_per_px = summary["tvus"]["depth_mm"] / summary["tvus"]["size"][1]
    y_m, f_m, y_t, f_t = [], [], [], []
    for r in _rows(out / "latents.csv"):
        if r["modality"] == "mri":
            pod = np.array([float(r["pod_x"]), float(r["pod_y"]), float(r["pod_z"])])
            y_m.append(int(r["label"]))
            f_m.append(mri_pod_intensity(out / "mri" / f"{r['subject_id']}.nii.gz", pod))
        else:
            frames = _frames(out / "tvus" / f"{r['subject_id']}.mp4")
            up = (float(r["uterus_row"]), float(r["uterus_col"]))
            rp = (float(r["rectum_row"]), float(r["rectum_col"]))
            y_t.append(int(r["label"]))
            f_t.append(tvus_motion_feature(frames, up, rp, mm_per_px))
    # Obliterated: less relative motion (negative sliding sign); darker POD (no fluid, fibrosis).
    # (Measured for seeds 0-3 at this size: TVUS 0.92-0.98, MRI 0.63-0.82, margin 0.15-0.29.)
    auc_tvus = roc_auc_score(y_t, -np.array(f_t))
    auc_mri = roc_auc_score(y_m, -np.array(f_m))
    assert auc_tvus >= 0.8
    assert auc_tvus >= auc_mri + 0.1
    assert summary["ceilings"]["tvus"] > summary["ceilings"]["mri"]


def test_bad_arguments_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown synthetic preset"):
        generate_cohort(tmp_path / "x", preset="huge")
    with pytest.raises(InputError):
        plan_cohort("tiny", paired_fraction=1.5)
    with pytest.raises(InputError):
        plan_cohort("tiny", n_mri_labelled=1)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        generate_cohort(a_file, preset="tiny", n_mri_labelled=2, n_mri_unlabelled=0, n_tvus=2)


def test_format_summary_names_counts_and_ceilings(tiny_cohort: Path) -> None:
    summary = json.loads((tiny_cohort / "cohort.json").read_text())
    text = format_summary(summary)
    assert f"{summary['counts']['mri_labelled']}" in text and "TVUS" in text
    assert f"{summary['ceilings']['mri']:.3f}" in text and f"{summary['ceilings']['tvus']:.3f}" in text


def test_severity_coupling_keeps_marginals_and_pairs_the_modalities(tmp_path: Path) -> None:
    """The planted severity: per-class marginals unchanged, shared by a paired subject's MRI and clip."""
    from scipy import stats as st

    from endodistill.data.synthetic.signs import (
        TVUS_SLIDING_BETA,
        _pattern_likelihood,
        draw_mri_signs,
        draw_tvus_sliding,
    )

    rng = np.random.default_rng(0)
    z = rng.standard_normal(20000)
    signs = np.array([[draw_mri_signs(rng, 1, zi, 0.5)[n] for n in MRI_SIGNS] for zi in z[:6000]])
    p1 = np.array([v[0] for v in MRI_SIGNS.values()])
    assert np.allclose(signs.mean(0), p1, atol=0.025)  # P(sign | y=1) unchanged
    assert np.corrcoef(signs.sum(1), z[:6000])[0, 1] > 0.3  # more signs when severe
    f = np.array([draw_tvus_sliding(rng, 0, zi, 0.5) for zi in z[:4000]])
    assert st.kstest(f, st.beta(*TVUS_SLIDING_BETA[0]).cdf).pvalue > 0.01  # the Beta marginal kept
    assert np.corrcoef(f, z[:4000])[0, 1] < -0.3  # less sliding when severe
    # The exact likelihood integrates the severity out: a distribution over the 64 sign patterns.
    import itertools

    pats = np.array(list(itertools.product((0, 1), repeat=len(MRI_SIGNS))), dtype=bool)
    for y in (0, 1):
        assert _pattern_likelihood(pats, y, 0.5).sum() == pytest.approx(1.0, abs=1e-9)
    assert population_ceilings(0.5)["tvus"] == population_ceilings()["tvus"]
    assert 0.78 < population_ceilings(0.5)["mri"] < population_ceilings()["mri"]
    # A cohort: paired subjects share their severity; the recorded oracle is recomputable from the latents.
    from endodistill.data.synthetic import generate_cohort

    summary = generate_cohort(tmp_path, preset="tiny", seed=3, paired_fraction=0.5, severity_coupling=0.5)
    assert summary["severity_coupling"] == 0.5
    rows = _rows(tmp_path / "latents.csv")
    mri = {r["subject_id"]: r for r in rows if r["modality"] == "mri"}
    tv = {r["subject_id"]: r for r in rows if r["modality"] == "tvus"}
    both = sorted(mri.keys() & tv.keys())
    assert both and all(mri[s]["severity"] == tv[s]["severity"] for s in both)
    prev = summary["prevalence"]["generative"]
    for r in list(mri.values())[:5]:
        assert float(r["oracle"]) == pytest.approx(
            mri_oracle({k: int(r[k]) for k in MRI_SIGNS}, float(prev), 0.5), abs=1e-6
        )
