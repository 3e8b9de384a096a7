"""The run-directory contract: the models accept what the protocol writes and refuse made-up keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from pydantic import ValidationError

from endodistill import rundir
from endodistill.errors import InputError

if TYPE_CHECKING:
    from conftest import RunFiles

METHOD = {
    "n": 4,
    "n_pos": 2,
    "prevalence": 0.5,
    "auc": 0.75,
    "auc_ci95": [0.4, 1.0],
    "youden": {"threshold": 0.5, "sensitivity": 1.0, "specificity": 0.5, "j": 0.5},
    "high_sensitivity": {"target": 0.9, "threshold": 0.4, "sensitivity": 1.0, "specificity": 0.5},
    "brier": 0.2,
    "ece": 0.1,
    "fold_aucs": [0.5, None],
    "fold_auc_mean": 0.5,
    "fold_auc_std": None,
}


def test_results_round_trip_and_schema_version(tmp_path: Path, run_files: RunFiles) -> None:
    run_files.results(tmp_path, methods={"scratch_ce": METHOD}, timings={"teacher": 1.5})
    raw = json.loads((tmp_path / rundir.RESULTS).read_text())
    assert next(iter(raw)) == "schema_version" and raw["schema_version"] == rundir.SCHEMA_VERSION
    assert "tvus" not in raw and "baselines" not in raw  # optional parts the run did not write stay absent
    res = rundir.read_results(tmp_path)
    assert res.methods["scratch_ce"].auc == 0.75 and res.methods["scratch_ce"].youden is not None
    assert res.reference == "scratch_ce" and res.timings == {"teacher": 1.5}


def test_made_up_keys_fail(tmp_path: Path, run_files: RunFiles) -> None:
    with pytest.raises(ValidationError, match="versions"):
        run_files.results(tmp_path, methods={}, versions={"torch": "2"})  # versions live in run.json
    with pytest.raises(ValidationError, match="made_up"):
        run_files.results(tmp_path, methods={"m": {**METHOD, "made_up": 1}})
    with pytest.raises(ValidationError, match="extra"):
        rundir.Timings.model_validate(
            {
                "stages": {},
                "fits": {},
                "step_seconds": 0.0,
                "fit_wall_seconds": 0.0,
                "overhead": None,
                "this_process_wall_seconds": 0.0,
                "spread": {"processes": 1, "ranks": 2},
            }
        )
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / rundir.RESULTS).write_text(json.dumps({"methods": {}, "seed": 0}))
    with pytest.raises(InputError, match=r"not a valid results\.json"):
        rundir.read_results(tmp_path / "r")
    with pytest.raises(InputError, match="not found"):
        rundir.read_results(tmp_path / "nowhere")


def test_run_info_splits_and_done(tmp_path: Path, run_files: RunFiles) -> None:
    run_files.run_info(tmp_path, versions={"torch": "2.14"}, inputs={"mri/a.nii.gz": "ab" * 32})
    info = rundir.read_run_info(tmp_path)
    assert info is not None and info.versions["torch"] == "2.14" and info.schema_version == 1
    (tmp_path / rundir.RUN).write_text(json.dumps({**info.model_dump(), "extra_key": 1}))
    with pytest.raises(InputError, match="extra_key"):
        rundir.read_run_info(tmp_path)

    (tmp_path / rundir.SPLITS).write_text(json.dumps([{"train": ["a"], "val": [], "test": ["b"]}]))
    splits = rundir.read_splits(tmp_path)
    assert splits is not None and splits.root[0].test == ["b"]
    (tmp_path / rundir.SPLITS).write_text(json.dumps([{"train": ["a"], "tset": ["b"]}]))
    with pytest.raises(InputError, match="tset"):
        rundir.read_splits(tmp_path)

    unit = rundir.fit_dir(tmp_path, 1, "scratch_ce")
    assert unit == tmp_path / "folds" / "fold_1" / "scratch_ce"
    assert rundir.fit_name(1, "scratch_ce") == "fold_1/scratch_ce"
    assert rundir.read_done_info(unit) is None and not rundir.fit_reusable(unit)
    rundir.write_done_info(unit, {"seed": 3, "where": "x", "best_epoch": 2, "timing": {"wall": 1.0}})
    done = rundir.read_done_info(unit)
    assert done is not None and done.seed == 3 and done.get("best_epoch") == 2 and done.schema_version == 1
    assert not rundir.fit_reusable(unit)  # no weights yet
    (unit / rundir.WEIGHTS).write_bytes(b"")
    assert rundir.fit_reusable(unit)
    rundir.done_path(unit).write_text("{broken")
    assert rundir.read_done_info(unit) is None  # a damaged marker: the unit is redone
    assert rundir.mae_unit_name(False, 2) == "mae" and rundir.mae_unit_name(True, 2) == "mae/fold_2"
    assert rundir.mae_unit_name(True, None) == "mae/all"


def test_multiclass_method_metrics_fit_the_contract() -> None:
    import numpy as np

    from endodistill.config import load_config
    from endodistill.evaluate.stats import nan_to_none
    from endodistill.experiment.aggregate import method_metrics

    cfg = load_config(
        "tiny", {"task": {"num_classes": 3, "class_names": ["a", "b", "c"], "positive_class": 1}}
    )
    rng = np.random.default_rng(0)
    rows = []
    for i in range(18):
        p = rng.dirichlet([1, 1, 1])
        rows.append(
            {"subject_id": f"s{i}", "fold": i % 3, "method": "m", "label": i % 3, "prob": float(p[1])}
            | {f"prob_{c}": float(v) for c, v in enumerate(p)}
        )
    m = rundir.MethodMetrics.model_validate(nan_to_none(method_metrics(cfg, rows, ["m"]))["m"])
    assert m.per_class_auc is not None and sorted(m.per_class_auc) == [0, 1, 2] and len(m.fold_aucs) == 3
    assert json.loads(json.dumps(m.model_dump(exclude_unset=True)))["per_class_auc"].keys() == {"0", "1", "2"}
