"""The whole protocol on the tiny synthetic cohort: outputs, schema, leakage, resume and determinism."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from endodistill.config import Config, load_config
from endodistill.errors import ConfigError, InputError
from endodistill.evaluate.metrics import auc_score

METHODS = ("scratch_ce", "mae_ce", "scratch_kd_ce", "mae_kd", "mae_kd_ce")


def _overrides(cohort: Path, cache: Path) -> dict:
    return {
        "data": {"manifest": str(cohort / "manifest.csv"), "cache_dir": str(cache)},
        "trainer": {"threads": 1},
    }


def tiny(cohort: Path, cache: Path) -> Config:
    return load_config("tiny", _overrides(cohort, cache))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def run(tiny_cohort: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from endodistill.experiment.protocol import run_experiment

    out = tmp_path_factory.mktemp("run")
    results = run_experiment(tiny(tiny_cohort, cache), out)
    return out, results


def _strip(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "timings"}


@pytest.mark.slow
def test_all_outputs_present_and_schema(run: tuple[Path, dict]) -> None:
    out, results = run
    for f in (
        "config.yaml",
        "run.json",
        "splits.json",
        "oof_predictions.csv",
        "results.json",
        "timings.json",
        "report.html",
        "report.md",
        "teacher/outputs.safetensors",
        "teacher/outputs.json",
        "teacher/predictions.csv",
        "teacher/metrics.json",
        "mae/encoder.safetensors",
        "model/metadata.json",
    ):
        assert (out / f).is_file(), f
    assert len(list((out / "examples").glob("*.png"))) >= 2
    for f in range(3):
        for m in METHODS:
            unit = out / "folds" / f"fold_{f}" / m
            assert (unit / "predictions.csv").is_file() and (unit / "checkpoints" / "last.ckpt").is_file()
            assert list(unit.glob("logs/version_*/metrics.csv"))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert list(on_disk["methods"]) == list(METHODS)  # the configuration's order, not sorted
    assert list(results["methods"]) == list(METHODS)
    for m in results["methods"].values():
        for key in (
            "auc",
            "auc_ci95",
            "fold_aucs",
            "fold_auc_mean",
            "fold_auc_std",
            "youden",
            "high_sensitivity",
            "brier",
            "ece",
        ):
            assert key in m, key
        assert len(m["fold_aucs"]) == 3 and len(m["auc_ci95"]) == 2
    assert isinstance(results["teacher"]["auc"], float)
    # The teacher's reported AUC is that of its stored predictions (out-of-fold over the labelled clips).
    with open(out / "teacher" / "predictions.csv", newline="") as fh:
        t_rows = list(csv.DictReader(fh))
    t_auc = auc_score([int(r["label"]) for r in t_rows], [float(r["prob"]) for r in t_rows])
    assert results["teacher"]["auc"] == pytest.approx(t_auc, abs=1e-12)
    assert results["comparisons"] and all(c["correction"] == "holm" for c in results["comparisons"])
    assert {"ceilings", "manifest"} <= set(results["cohort"])
    assert results["seed"] == 0 and results["config"]["name"] == "tiny"
    assert set(results["timings"]) >= {"data", "teacher", "mae", "cross_validation", "final_model"}
    run_json = json.loads((out / "run.json").read_text())
    assert {"torch", "torchvision", "monai", "lightning", "numpy", "python"} <= set(run_json["versions"])
    assert "manifest.csv" in run_json["inputs"] and len(run_json["inputs"]) > 40
    timings = json.loads((out / "timings.json").read_text())
    assert timings["fits"]["fold_0/mae_kd_ce"]["step"] > 0
    # Every file the run wrote fits the run-directory contract (extra="forbid": no key outside it).
    from endodistill import rundir

    assert rundir.read_results(out).model_dump(mode="json", exclude_unset=True) == on_disk
    assert on_disk["schema_version"] == rundir.SCHEMA_VERSION
    assert rundir.read_timings(out) is not None and rundir.read_run_info(out) is not None
    assert rundir.read_splits(out) is not None
    assert all(rundir.read_done_info(p.parent) is not None for p in out.rglob("done.json"))


@pytest.mark.slow
def test_folds_disjoint_identical_across_methods_and_no_leak(run: tuple[Path, dict]) -> None:
    out, _ = run
    splits = json.loads((out / "splits.json").read_text())
    tests = [set(s["test"]) for s in splits]
    assert sum(len(t) for t in tests) == len(set().union(*tests)) == 24  # every subject tested exactly once
    with open(out / "oof_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 24 * len(METHODS)
    fold_of = {m: {r["subject_id"]: r["fold"] for r in rows if r["method"] == m} for m in METHODS}
    assert all(fold_of[m] == fold_of["scratch_ce"] for m in METHODS)
    for f, split in enumerate(splits):
        for m in METHODS:
            info = json.loads((out / "folds" / f"fold_{f}" / m / "done.json").read_text())
            test = set(split["test"])
            assert set(info["test_subjects"]) == test
            assert not test & set(info["train_subjects"]), "test subject trained on"
            assert not test & set(info["val_subjects"]), "test subject used for model selection"
            assert not test & set(info["tvus_subjects"])
            assert {s for s, fo in fold_of[m].items() if int(fo) == f} == test
    mae = json.loads((out / "mae" / "done.json").read_text())
    assert mae["n_labelled_added"] == 0  # MAE saw the unlabelled pool only


@pytest.mark.slow
def test_resume_skips_finished_units(run: tuple[Path, dict], tiny_cohort: Path, cache: Path) -> None:
    from endodistill.experiment.protocol import run_experiment
    from endodistill.experiment.provenance import load_run_config

    out, results = run
    markers = {p: p.stat().st_mtime_ns for p in out.rglob("done.json")}
    again = run_experiment(load_run_config(out), out, resume=True)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("done.json")} == markers
    assert _strip(again) == _strip(json.loads(json.dumps(results)))
    with pytest.raises(InputError, match="already holds a run"):
        run_experiment(tiny(tiny_cohort, cache), out)
    other = tiny(tiny_cohort, cache)
    other.finetune.lr = 0.5
    with pytest.raises(ConfigError, match=r"finetune\.lr"):
        run_experiment(other, out, resume=True)


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_results(
    run: tuple[Path, dict], tiny_cohort: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning.pytorch as pl

    import endodistill.train.fit as fit_mod
    from endodistill.experiment.protocol import run_experiment
    from endodistill.train.trainer import make_trainer

    class Crash(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch == 1:
                raise KeyboardInterrupt

    def crashing(*a, **k):
        crash = Path(a[1]).parts[-3:] == ("folds", "fold_1", "mae_ce")  # fold 1, second method
        return make_trainer(*a, callbacks=[Crash()] if crash else [])

    monkeypatch.setattr(fit_mod, "make_trainer", crashing)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny(tiny_cohort, cache), out)
    assert (out / "folds" / "fold_1" / "mae_ce" / "checkpoints" / "last.ckpt").is_file()
    assert not (out / "folds" / "fold_1" / "mae_ce" / "done.json").exists()
    assert (out / "folds" / "fold_1" / "scratch_ce" / "done.json").is_file()
    monkeypatch.setattr(fit_mod, "make_trainer", make_trainer)
    resumed = run_experiment(tiny(tiny_cohort, cache), out, resume=True)
    assert _strip(resumed) == _strip(json.loads(json.dumps(run[1])))
    assert (out / "oof_predictions.csv").read_text() == (run[0] / "oof_predictions.csv").read_text()


@pytest.mark.slow
def test_same_seed_fresh_process_identical(
    run: tuple[Path, dict], tiny_cohort: Path, cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "again"
    code = (
        "import json, sys, torch; torch.set_num_threads(1)\n"
        "from endodistill.config import load_config\n"
        "from endodistill.experiment.protocol import run_experiment\n"
        f"run_experiment(load_config('tiny', json.loads(sys.argv[1])), {str(out)!r})\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, json.dumps(_overrides(tiny_cohort, cache))],
        check=True,
        capture_output=True,
    )
    a = json.loads((run[0] / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert _strip(a) == _strip(b)


def test_stage_errors(tiny_cohort: Path, cache: Path, tmp_path: Path) -> None:
    from endodistill.experiment.provenance import load_run_config
    from endodistill.experiment.stage import run_stage

    cfg = tiny(tiny_cohort, cache)
    with pytest.raises(InputError, match="teacher"):
        run_stage(cfg, tmp_path / "r", "distill", "scratch_ce", 0)
    with pytest.raises(ConfigError, match="unknown stage"):
        run_stage(cfg, tmp_path / "r", "evaluate")
    with pytest.raises(ConfigError, match="unknown method"):
        run_stage(cfg, tmp_path / "r", "distill", "nope")
    with pytest.raises(InputError, match=r"config\.yaml"):
        load_run_config(tmp_path / "nowhere")


@pytest.mark.slow
def test_stages_alone(run: tuple[Path, dict], tiny_cohort: Path, cache: Path, tmp_path: Path) -> None:
    from endodistill.experiment.stage import run_stage

    out = tmp_path / "stages"
    shutil.copytree(run[0] / "teacher", out / "teacher")
    cfg = tiny(tiny_cohort, cache)
    with pytest.raises(InputError, match="pretrain"):
        run_stage(cfg, out, "distill", "mae_kd_ce", 0)
    info = run_stage(cfg, out, "distill", "scratch_kd_ce", 0)
    # The same fit as inside the protocol: same split, same seed, same predictions.
    assert (out / "folds/fold_0/scratch_kd_ce/predictions.csv").read_text() == (
        run[0] / "folds/fold_0/scratch_kd_ce/predictions.csv"
    ).read_text()
    assert info["test_subjects"]


@pytest.mark.slow
def test_demo_generates_its_cohort_and_the_run_directory_can_move(cache: Path, tmp_path: Path) -> None:
    from endodistill.experiment.protocol import run_experiment
    from endodistill.experiment.provenance import load_run_config

    cfg = load_config("tiny", {"data": {"cache_dir": str(cache)}, "trainer": {"threads": 1}})
    cfg.finetune.epochs = 1
    cfg.teacher.epochs = 1
    results = run_experiment(cfg, tmp_path / "demo")
    assert (tmp_path / "demo" / "cohort" / "manifest.csv").is_file()
    assert results["cohort"]["manifest"] == "cohort/manifest.csv" and "ceilings" in results["cohort"]
    shutil.move(tmp_path / "demo", tmp_path / "moved")
    again = run_experiment(load_run_config(tmp_path / "moved"), tmp_path / "moved", resume=True)
    assert _strip(again) == _strip(json.loads(json.dumps(results)))
