"""Studies: plans, the KD controls' targets, label-matching noise, shared units, outputs, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from endodistill.config import load_config
from endodistill.data.synthetic.cohort import plan_cohort
from endodistill.errors import ConfigError, InputError
from endodistill.experiment.study import parse_shard, plan_study, run_study, run_study_shard
from endodistill.train.pairing import control_targets, label_matched_pairs, noisy_partners


def test_plans_of_the_built_in_studies() -> None:
    cfg = load_config("demo")
    alpha = plan_study("alpha", cfg)
    assert [s.name for s in alpha.settings] == [
        "exp_0.5",
        "exp_0.7",
        "exp_0.85",
        "exp_0.95",
        "exp_0.99",
        "constant_0.5",
        "linear",
        "cosine",
    ]
    assert alpha.reference == "exp_0.85" and all(not s.overrides for s in alpha.settings)
    assert alpha.settings[0].method.schedule.alpha == 0.5 and alpha.settings[0].method.init == "mae"
    masks = plan_study("mask_ratio", cfg)
    assert [s.overrides["mae"]["mask_ratio"] for s in masks.settings] == [0.3, 0.5, 0.75, 0.9]
    assert masks.reference == "mask_0.75"  # the demo's own mask ratio
    kd = plan_study("kd_controls", cfg)
    assert [s.method.kd_target for s in kd.settings] == [
        "teacher",
        "class_mean",
        "smoothed_labels",
        "permuted",
        "teacher",
    ]
    assert kd.settings[-1].overrides == {"teacher": {"shuffle_labels": True}}
    pairing = plan_study("pairing", cfg)
    assert [s.method.pairing_noise for s in pairing.settings[:3]] == [0.0, 0.1, 0.3]
    # The demo's 240 clips are capped at its 200 labelled volumes in every setting (full pairing exists).
    assert pairing.settings[-1].overrides == {
        "data": {"synth": {"severity_coupling": 0.5, "n_tvus": 200, "paired_fraction": 1.0}}
    }
    assert pairing.settings[0].overrides == {"data": {"synth": {"severity_coupling": 0.5, "n_tvus": 200}}}
    assert pairing.settings[-1].method.pairing == "paired"
    pool = plan_study("pool", cfg)
    assert pool.reference == "pool_1" and pool.settings[-1].overrides == {
        "data": {"synth": {"pool_shift": True}}
    }
    labels = plan_study("labels", cfg)
    assert [s.name for s in labels.settings] == [
        "mae_0.25",
        "scratch_0.25",
        "mae_0.5",
        "scratch_0.5",
        "mae_1",
        "scratch_1",
    ]
    assert labels.pairs == [("mae_0.25", "scratch_0.25"), ("mae_0.5", "scratch_0.5"), ("mae_1", "scratch_1")]
    for s in labels.settings:  # the task loss alone, the init the name says, the share as a run override
        assert s.method.init == s.name.split("_")[0] and s.method.schedule.alpha == 0.0
        assert s.overrides == {"protocol": {"train_fraction": float(s.name.split("_")[1])}}
    grid = plan_study("grid", cfg, ["method.schedule.alpha=0.7,0.9", "finetune.lr=1e-3,3e-3"])
    assert len(grid.settings) == 4 and grid.reference == grid.settings[0].name
    assert grid.settings[1].method.schedule.alpha == 0.7 and grid.settings[1].overrides == {
        "finetune": {"lr": 0.003}
    }
    with pytest.raises(ConfigError, match="unknown study"):
        plan_study("nope", cfg)
    with pytest.raises(ConfigError, match="--vary"):
        plan_study("grid", cfg)


def test_pairing_study_caps_the_clips_at_the_labelled_volumes_so_full_pairing_exists() -> None:
    # The paper preset has 300 clips and 200 labelled volumes: 300 paired clips cannot exist.
    cfg = load_config("paper")
    plan = plan_study("pairing", cfg)
    assert {s.overrides["data"]["synth"]["n_tvus"] for s in plan.settings} == {200}
    full = plan.settings[-1].overrides["data"]["synth"]
    cohort = plan_cohort("paper", paired_fraction=full["paired_fraction"], n_tvus=full["n_tvus"])
    clips = [p for p in cohort if p.modality == "tvus"]
    assert len(clips) == 200 and all(p.subject_id.startswith("L") for p in clips)
    with pytest.raises(InputError, match="paired_fraction"):
        plan_cohort("paper", paired_fraction=1.0)


def test_control_targets_are_what_they_claim() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    logits = torch.from_numpy(rng.normal(size=(7, 2))).float()
    probs = logits.softmax(1)
    assert torch.equal(control_targets(logits, probs, labels, "teacher", 0), logits)
    mean = control_targets(logits, probs, labels, "class_mean", 0)
    for c in (0, 1):
        sel = labels == c
        torch.testing.assert_close(mean[sel], logits[sel].mean(0).expand(int(sel.sum()), 2))
    perm = control_targets(logits, probs, labels, "permuted", 3)
    for c in (0, 1):  # the same outputs, only reassigned among the clips of the class
        sel = labels == c
        got = sorted(map(tuple, perm[sel].tolist()))
        assert got == sorted(map(tuple, logits[sel].tolist()))
    assert not torch.equal(perm, logits)
    smooth = control_targets(logits, probs, labels, "smoothed_labels", 0).softmax(1)
    for c in (0, 1):
        sel = labels == c
        # Every clip of class c gets the same smoothed one-hot, its confidence the teacher's mean one.
        torch.testing.assert_close(
            smooth[sel, c], probs[sel, c].mean().expand(int(sel.sum())), atol=1e-5, rtol=0
        )
    with pytest.raises(ValueError, match="unknown KD target"):
        control_targets(logits, probs, labels, "nope", 0)


def test_label_matching_noise_draws_partners_of_the_other_class() -> None:
    y_mri = np.array([0, 1] * 200)
    y_tvus = np.array([0] * 30 + [1] * 20)
    p = label_matched_pairs(y_mri, y_tvus, seed=1, epoch=0)
    assert np.array_equal(noisy_partners(p, y_mri, y_tvus, 0.0, 1, 0), p)
    flipped = noisy_partners(p, y_mri, y_tvus, 1.0, 1, 0)
    assert np.all(y_tvus[flipped] != y_mri)
    some = noisy_partners(p, y_mri, y_tvus, 0.3, 1, 0)
    wrong = np.mean(y_tvus[some] != y_mri)
    assert 0.22 < wrong < 0.38
    assert np.array_equal(some, noisy_partners(p, y_mri, y_tvus, 0.3, 1, 0))  # a function of (seed, epoch)


def test_shuffled_label_teacher_trains_on_permuted_labels() -> None:
    from endodistill.train.data import ClipSet, CohortData, VolumeSet
    from endodistill.train.teacher import _shuffled_labels

    labels = np.array([0, 0, 0, 0, 1, 1, 1, -1])
    tv = ClipSet(
        clips=[np.zeros((2, 2, 2))] * 8, labels=labels, subjects=[f"s{i}" for i in range(8)], paths=[]
    )
    empty = VolumeSet(x=torch.zeros(0, 1, 2, 2, 2), labels=np.zeros(0, np.int64), subjects=[], paths=[])
    data = CohortData(manifest=Path("m"), labelled=empty, unlabelled=empty, tvus=tv, cohort={}, files=[])
    shuffled = _shuffled_labels(data, 0).tvus.labels
    assert shuffled[-1] == -1 and sorted(shuffled[:-1]) == sorted(labels[:-1])
    assert not np.array_equal(shuffled, labels) and np.array_equal(data.tvus.labels, labels)


@pytest.fixture(scope="module")
def grid_study(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny grid over the MAE pool size: two MAEs, one teacher shared by both runs."""
    cfg = load_config(
        "tiny",
        [
            f"data.manifest={tiny_cohort / 'manifest.csv'}",
            "teacher.epochs=2",
            f"data.cache_dir={tmp_path_factory.mktemp('c')}",
        ],
    )
    out = tmp_path_factory.mktemp("study") / "grid"
    lines: list[str] = []
    result = run_study("grid", cfg, out, vary=["mae.pool_fraction=1.0,0.5"], echo=lines.append)
    return out, {"result": result, "lines": lines, "cfg": cfg}


def test_grid_study_end_to_end_shares_the_teacher(grid_study: tuple[Path, dict]) -> None:
    out, info = grid_study
    study = json.loads((out / "study.json").read_text())
    assert study["schema_version"] == 1 and study["study"] == "grid"
    assert [s["name"] for s in study["settings"]] == ["pool_fraction-1.0", "pool_fraction-0.5"]
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 2
    # One teacher for both runs (its inputs did not change), one MAE per pool size.
    shared = sorted(p.name for p in (out / "shared").iterdir())
    assert (
        sum(n.startswith("teacher-") for n in shared) == 1 and sum(n.startswith("mae-") for n in shared) == 2
    )
    for r in runs:
        assert (out / "runs" / r / "teacher").is_symlink() and (out / "runs" / r / "mae").is_symlink()
    teacher = next(out / "shared" / n for n in shared if n.startswith("teacher-"))
    assert {(out / "runs" / r / "teacher").resolve() for r in runs} == {teacher.resolve()}
    assert study["shared_units"][teacher.name] == {"trained_by": runs[0], "used_by": runs}
    n_volumes = sorted(
        json.loads((out / "shared" / n / "done.json").read_text())["n_volumes"]
        for n in shared
        if n.startswith("mae-")
    )
    assert n_volumes == [8, 16]  # half of the 16-volume pool, and all of it
    # The comparison is paired on the same subjects, against the first setting.
    (comp,) = study["comparisons"]
    assert comp["method_a"] == "pool_fraction-0.5" and comp["method_b"] == "pool_fraction-1.0"
    assert comp["n"] == study["n_subjects"] == 24 and "mcnemar" in comp
    lo, hi = comp["diff_ci95"]
    assert lo == pytest.approx(comp["diff"] - 1.96 * comp["se"]) and hi == pytest.approx(
        comp["diff"] + 1.96 * comp["se"]
    )
    html = (out / "study.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html and 'src="http' not in html
    assert "pool_fraction-0.5" in (out / "study.md").read_text()
    assert any(line.startswith("study grid") for line in info["lines"])


def test_study_resume_skips_everything_and_refuses_a_second_start(grid_study: tuple[Path, dict]) -> None:
    out, info = grid_study
    done = sorted(out.rglob("done.json"))
    stamps = {p: p.stat().st_mtime_ns for p in done}
    before = json.loads((out / "study.json").read_text())
    again = run_study(
        "grid", info["cfg"], out, resume=True, vary=["mae.pool_fraction=1.0,0.5"], echo=lambda s: None
    )
    assert {p: p.stat().st_mtime_ns for p in sorted(out.rglob("done.json"))} == stamps  # nothing retrained
    after = json.loads((out / "study.json").read_text())
    before.pop("wall_seconds"), after.pop("wall_seconds")
    assert after == before and again.settings[0].auc == before["settings"][0]["auc"]
    with pytest.raises(InputError, match="already holds a study"):
        run_study("grid", info["cfg"], out, vary=["mae.pool_fraction=1.0,0.5"])
    with pytest.raises(InputError, match="other settings"):
        run_study("grid", info["cfg"], out, resume=True, vary=["mae.pool_fraction=1.0,0.25"])


def test_sharded_study_then_resume_gives_the_same_study(
    grid_study: tuple[Path, dict], tmp_path: Path
) -> None:
    """Two shards (run one after the other here; concurrently on a SLURM array), then a resume aggregates."""
    ref, info = grid_study
    out = tmp_path / "sharded"
    vary = ["mae.pool_fraction=1.0,0.5"]
    for i in range(2):
        run_study_shard("grid", info["cfg"], out, (i, 2), vary=vary, echo=lambda s: None)
        assert not (out / "study.json").exists()  # a shard writes no results
    fits = sorted(p.parent for p in out.glob("runs/*/folds/*/*/done.json"))
    assert len(fits) == 6  # 2 runs x 3 folds x 1 method: every fit of the study, by one shard or the other
    shared = sorted(p.name for p in (out / "shared").iterdir() if p.is_dir())
    assert shared == sorted(p.name for p in (ref / "shared").iterdir() if p.is_dir())  # trained once each
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("done.json")}
    run_study("grid", info["cfg"], out, resume=True, vary=vary, echo=lambda s: None)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("done.json")} == stamps  # nothing retrained
    a = json.loads((ref / "study.json").read_text())
    b = json.loads((out / "study.json").read_text())
    a.pop("wall_seconds"), b.pop("wall_seconds")
    assert a == b


def test_shard_option_and_slurm_array() -> None:
    assert parse_shard("1/4", env={}) == (1, 4) and parse_shard(None, env={}) is None
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}
    assert parse_shard(None, env=env) == (2, 3)
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad, env={})


def test_a_study_in_pairs_tests_each_setting_against_its_partner() -> None:
    from endodistill.experiment.study_results import summarise_study
    from endodistill.report.study import format_study_table, render_study

    cfg = load_config("tiny")
    plan = plan_study("labels", cfg)
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 30)
    rows = [
        {"subject_id": f"s{i:02d}", "fold": i % 3, "method": s.name, "label": int(y[i]), "prob": float(p)}
        for k, s in enumerate(plan.settings)
        for i, p in enumerate(1 / (1 + np.exp(-(rng.normal(size=60) + 0.3 * k * (2 * y - 1)))))
    ]
    r = summarise_study(plan, rows, {}, cfg, {}, 1.0)
    assert [(c["method_a"], c["method_b"]) for c in r.comparisons] == plan.pairs
    assert r.verdict.startswith("Each setting against its pair: mae_0.25")
    html, md = render_study(r)
    assert "against its pair" in html and "vs scratch_0.25" in html and "against its pair" in md
    assert "vs scratch_0.5" in format_study_table(r)
