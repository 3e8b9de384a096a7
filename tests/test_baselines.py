"""Reference baselines: exact reduced logistic regression, no test-fold information, oracle and sign probes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from endodistill.config import Config, load_config
from endodistill.data.synthetic.signs import population_ceilings
from endodistill.train.baselines import (
    BASELINES,
    compute_baselines,
    fast_auc,
    fit_logreg,
    newton_logreg,
    reduce_fold,
    run_baselines,
)
from endodistill.train.data import ClipSet, CohortData, VolumeSet

SHAPE = (1, 4, 8, 8)


def _cfg(**baselines: object) -> Config:
    over: dict = {"cnn3d": {"epochs": 2, "batch_size": 8, "width": 2, "blocks": 2}, **baselines}
    return load_config(
        "tiny", {"baselines": over, "mri": {"size": list(SHAPE[1:])}, "student": {"patch_size": [4, 8, 8]}}
    )


def _fake(
    tmp: Path, n: int = 48, seed: int = 0, signs: dict[str, np.ndarray] | None = None
) -> tuple[CohortData, list[dict[str, list[str]]], np.ndarray]:
    """Volumes whose first voxel block carries the label (plus planted signs), 3 folds, optional latents."""
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * (n // 2))
    x = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    x[:, 0, :2, :4, :4] += 0.8 * y[:, None, None, None]
    subjects = [f"s{i:03d}" for i in range(n)]
    oracle = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(size=n))))
    if signs is not None:
        for k, (name, s) in enumerate(signs.items()):
            x[:, 0, 2:, 4 * (k % 2) : 4 * (k % 2) + 4, 4:] += (
                0.0 if name == "strands" else 3.0 * s[:, None, None, None]
            )
        tmp.mkdir(parents=True, exist_ok=True)
        with open(tmp / "latents.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["subject_id", "modality", "label", *signs, "oracle"])
            for i in range(n):
                w.writerow(
                    [
                        subjects[i],
                        "mri",
                        int(y[i]),
                        *(int(s[i]) for s in signs.values()),
                        repr(float(oracle[i])),
                    ]
                )
    lab = VolumeSet(x=torch.from_numpy(x), labels=y.astype(np.int64), subjects=subjects, paths=[""] * n)
    empty = VolumeSet(x=torch.zeros((0, *SHAPE)), labels=np.zeros(0, np.int64), subjects=[], paths=[])
    clips = ClipSet(clips=[], labels=np.zeros(0, np.int64), subjects=[], paths=[])
    data = CohortData(
        manifest=tmp / "manifest.csv", labelled=lab, unlabelled=empty, tvus=clips, cohort={}, files=[]
    )
    order = rng.permutation(n)
    folds = [sorted(subjects[i] for i in order[f::3]) for f in range(3)]
    splits = [
        {"train": [s for s in subjects if s not in folds[f]], "val": [], "test": folds[f]} for f in range(3)
    ]
    return data, splits, oracle


def _fold_probs(rows: list[dict], method: str, fold: int) -> dict[str, float]:
    return {r["subject_id"]: r["prob"] for r in rows if r["method"] == method and r["fold"] == fold}


def test_reduced_logreg_equals_plain_sklearn_on_the_voxels() -> None:
    rng = np.random.default_rng(1)
    n, m, d = 60, 25, 700
    x = rng.normal(size=(n + m, d)) * rng.uniform(0.2, 3.0, size=d) + rng.normal(size=d)
    y = (x[:, :5].sum(1) + rng.normal(size=n + m) > x[:, :5].sum(1).mean()).astype(np.int64)
    train, test = np.arange(n), np.arange(n, n + m)
    red = reduce_fold(x, train, test, chunk=128)  # several chunks: the accumulation is exercised
    assert red.z_train.shape[1] <= n - 1 and red.z_test.shape == (m, red.z_train.shape[1])
    mean, sd = x[train].mean(0), x[train].std(0)
    xs = (x - mean) / sd
    for c in (1e-3, 3e-2):
        plain = LogisticRegression(C=c, tol=1e-10, max_iter=20000).fit(xs[train], y[train])
        ours = fit_logreg(red.z_train, y[train], c)
        np.testing.assert_allclose(ours.predict_proba(red.z_test), plain.predict_proba(xs[test]), atol=1e-4)
        # The inner CV's Newton solver minimises the same objective (and warm starts change nothing).
        w = newton_logreg(red.z_train, y[train], c, start=np.ones(red.z_train.shape[1] + 1))
        np.testing.assert_allclose(red.z_test @ w[:-1] + w[-1], ours.decision_function(red.z_test), atol=1e-4)
    score = rng.normal(size=50).round(1)  # with ties
    lab = rng.integers(0, 2, 50)
    assert fast_auc(lab, score) == pytest.approx(roc_auc_score(lab, score), abs=1e-12)
    # An inner-CV subset of the training rows, in the same basis, is the plain fit on that subset.
    sub = np.arange(0, n, 2)
    plain = LogisticRegression(C=3e-2, tol=1e-10, max_iter=20000).fit(xs[sub], y[sub])
    ours = fit_logreg(red.z_train[sub], y[sub], 3e-2)
    np.testing.assert_allclose(ours.predict_proba(red.z_test), plain.predict_proba(xs[test]), atol=1e-4)


def test_planted_test_fold_information_changes_nothing(tmp_path: Path) -> None:
    cfg = _cfg(oracle=False, sign_visibility=False)
    data, splits, _ = _fake(tmp_path)
    ref = compute_baselines(cfg, data, splits)
    test0 = data.labelled.index(splits[0]["test"])

    # 1. The test subjects' labels of fold 0 flipped: fold 0's C and predictions are unchanged.
    flipped, _, _ = _fake(tmp_path)
    flipped.labelled.labels[test0] = 1 - flipped.labelled.labels[test0]
    got = compute_baselines(cfg, flipped, splits)
    assert got["logreg_c"][0] == ref["logreg_c"][0]
    for m in ("logreg", "cnn3d"):
        assert _fold_probs(got["rows"], m, 0) == _fold_probs(ref["rows"], m, 0), m

    # 2. One test subject's voxels replaced by a label-revealing pattern: only its own prediction moves.
    planted, _, _ = _fake(tmp_path)
    i = int(test0[0])
    planted.labelled.x[i] = 50.0 * (2 * int(planted.labelled.labels[i]) - 1)
    got = compute_baselines(cfg, planted, splits)
    assert got["logreg_c"][0] == ref["logreg_c"][0]
    who = data.labelled.subjects[i]
    for m in ("logreg", "cnn3d"):
        a, b = _fold_probs(got["rows"], m, 0), _fold_probs(ref["rows"], m, 0)
        assert a[who] != b[who], m  # the test input is used ...
        assert {k: v for k, v in a.items() if k != who} == {k: v for k, v in b.items() if k != who}, m
    # ... and the training parts of the other folds (which hold subject i) do see it: the check is live.
    assert _fold_probs(got["rows"], "logreg", 1) != _fold_probs(ref["rows"], "logreg", 1)


def test_oracle_and_sign_probes_match_the_latents(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n = 90
    visible = rng.integers(0, 2, n)
    hidden = rng.integers(0, 2, n)  # "strands" is never drawn into the voxels: a random sign
    data, splits, oracle = _fake(tmp_path, n=n, signs={"retroflexion": visible, "strands": hidden})
    cfg = _cfg(cnn3d={"enabled": False})
    got = compute_baselines(cfg, data, splits)
    assert set(got["sign_visibility"]) == {"retroflexion", "strands"}
    assert got["sign_visibility"]["retroflexion"] > 0.95
    assert abs(got["sign_visibility"]["strands"] - 0.5) < 0.2
    assert set(got["timing"]) == {"logreg", "oracle", "sign_visibility"}
    # Only the sign the voxels hold counts as shown; its ceiling is the posterior from it alone.
    assert got["visible_ceiling"] == {
        "threshold": 0.65,
        "signs": ["retroflexion"],
        "auc": population_ceilings(signs=["retroflexion"])["mri"],
        "all_signs_auc": population_ceilings()["mri"],
    }
    oracle_rows = [r for r in got["rows"] if r["method"] == "oracle"]
    assert len(oracle_rows) == n and {r["fold"] for r in oracle_rows} == {0, 1, 2}
    y = data.labelled.labels
    auc = roc_auc_score([r["label"] for r in oracle_rows], [r["prob"] for r in oracle_rows])
    assert auc == pytest.approx(roc_auc_score(y, oracle), abs=1e-12)
    # Without latents.csv (real data) oracle and signs are absent, not an error.
    (tmp_path / "latents.csv").unlink()
    got = compute_baselines(cfg, data, splits)
    assert {r["method"] for r in got["rows"]} == {"logreg"} and got["sign_visibility"] == {}


def test_switches_remove_each_baseline(tmp_path: Path) -> None:
    data, splits, _ = _fake(tmp_path, signs={"retroflexion": np.arange(48) % 3 == 0})
    for off, gone in (("logreg", "logreg"), ("cnn3d", "cnn3d")):
        cfg = _cfg(**{off: {"enabled": False}}) if off == "logreg" else _cfg(cnn3d={"enabled": False})
        got = compute_baselines(cfg, data, splits)
        assert gone not in {r["method"] for r in got["rows"]} and gone not in got["timing"]
    got = compute_baselines(_cfg(oracle=False, sign_visibility=False, cnn3d={"enabled": False}), data, splits)
    assert {r["method"] for r in got["rows"]} == {"logreg"} and not got["sign_visibility"]


def test_run_baselines_writes_then_reuses_on_resume(tmp_path: Path) -> None:
    data, splits, _ = _fake(tmp_path / "cohort", signs={"retroflexion": np.arange(48) % 2 == 0})
    cfg = _cfg()
    run = tmp_path / "run"
    first, seconds = run_baselines(cfg, data, splits, run, resume=False)
    assert set(first) >= {*BASELINES, "sign_visibility"}
    assert set(seconds) == {f"baseline_{b}" for b in (*BASELINES, "sign_visibility")}
    for m in BASELINES:
        assert {"auc", "auc_ci95", "fold_aucs", "fold_auc_mean", "youden"} <= set(first[m])
        assert len(first[m]["fold_aucs"]) == 3
    header = (run / "baselines" / "oof_predictions.csv").read_text().splitlines()[0]
    assert header == "subject_id,fold,method,label,prob"
    marker = (run / "baselines" / "done.json").stat().st_mtime_ns
    again, seconds2 = run_baselines(cfg, data, splits, run, resume=True)
    assert again == first and seconds2 == seconds
    assert (run / "baselines" / "done.json").stat().st_mtime_ns == marker


# ----------------------------------------------------------------------------------------- the tiny run
def _latent_oracle_auc(manifest: Path, subjects: set[str]) -> float:
    with open(manifest.parent / "latents.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["modality"] == "mri" and r["subject_id"] in subjects]
    assert len(rows) == len(subjects)
    return float(roc_auc_score([int(r["label"]) for r in rows], [float(r["oracle"]) for r in rows]))


@pytest.mark.slow
def test_tiny_run_has_the_baselines(tiny_reference_run: Path, tiny_cohort: Path) -> None:
    results = json.loads((tiny_reference_run / "results.json").read_text())
    b = results["baselines"]
    folds = len(json.loads((tiny_reference_run / "splits.json").read_text()))
    with open(tiny_reference_run / "baselines" / "oof_predictions.csv", newline="") as fh:
        oof = list(csv.DictReader(fh))
    for m in BASELINES:
        assert isinstance(b[m]["auc"], float) and len(b[m]["auc_ci95"]) == 2, m
        assert len(b[m]["fold_aucs"]) == folds, m
        # The pooled AUC of the baseline's stored out-of-fold predictions, one per labelled subject.
        rows = [r for r in oof if r["method"] == m]
        assert len(rows) == len({r["subject_id"] for r in rows}) == results["methods"]["mae_kd_ce"]["n"], m
        auc = roc_auc_score([int(r["label"]) for r in rows], [float(r["prob"]) for r in rows])
        assert b[m]["auc"] == pytest.approx(auc, abs=1e-12), m
    assert set(b["sign_visibility"]) == {
        "retroflexion",
        "tethered_rectum",
        "strands",
        "serosal_plaque",
        "no_pod_fluid",
        "elevated_fornix",
    }
    with open(tiny_reference_run / "oof_predictions.csv", newline="") as fh:
        subjects = {r["subject_id"] for r in csv.DictReader(fh)}
    assert b["oracle"]["auc"] == pytest.approx(_latent_oracle_auc(tiny_cohort / "manifest.csv", subjects))
    assert {"baseline_logreg", "baseline_cnn3d", "baseline_oracle"} <= set(results["timings"])
    assert [c["method_b"] for c in b["comparisons"]] == ["logreg", "cnn3d"]
    # The terminal table and the report show them apart from the methods.
    from endodistill.report import format_ablation_table

    table = format_ablation_table(results)
    assert "Reference baselines" in table and "Sign visibility" in table
    vc = b["visible_ceiling"]
    assert vc["signs"] == [s for s, v in b["sign_visibility"].items() if v is not None and v >= 0.65]
    assert vc["auc"] == population_ceilings(signs=vc["signs"])["mri"] <= vc["all_signs_auc"]
    line = f"Population AUC ceiling from the {len(vc['signs'])} of 6 signs this grid shows"
    assert line in table
    html = (tiny_reference_run / "report.html").read_text()
    assert "Reference baselines" in html and "which signs the chosen resolution can show" in html
    assert line in html and line in (tiny_reference_run / "report.md").read_text()


@pytest.mark.slow
def test_baselines_off_and_resume_reuse(
    tiny_reference_run: Path, tiny_run_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from endodistill.experiment.protocol import run_experiment
    from endodistill.experiment.provenance import load_run_config

    monkeypatch.setenv("ENDODISTILL_CACHE", tiny_run_env["ENDODISTILL_CACHE"])
    ref = json.loads((tiny_reference_run / "results.json").read_text())
    # Resumed with everything done: the saved baselines are reused, not recomputed.
    run = tmp_path / "run"
    shutil.copytree(tiny_reference_run, run)
    (run / "results.json").unlink()
    marker = (run / "baselines" / "done.json").stat().st_mtime_ns
    again = run_experiment(load_run_config(run), run, resume=True)
    assert (run / "baselines" / "done.json").stat().st_mtime_ns == marker
    assert json.loads(json.dumps(again["baselines"])) == ref["baselines"]
    # The same run with baselines.enabled false: no baselines anywhere in results.json.
    off = tmp_path / "off"
    shutil.copytree(tiny_reference_run, off)
    shutil.rmtree(off / "baselines")
    (off / "results.json").unlink()
    text = (off / "config.yaml").read_text()
    assert "baselines:\n  enabled: true\n" in text
    (off / "config.yaml").write_text(
        text.replace("baselines:\n  enabled: true\n", "baselines:\n  enabled: false\n")
    )
    results = run_experiment(load_run_config(off), off, resume=True)
    assert "baselines" not in results and not (off / "baselines").exists()
    assert not any(k.startswith("baseline_") for k in results["timings"])
    assert "Reference baselines" not in (off / "report.html").read_text()
    assert {k: v for k, v in results.items() if k not in ("timings", "config")} == {
        k: v for k, v in json.loads(json.dumps(again)).items() if k not in ("timings", "config", "baselines")
    }
