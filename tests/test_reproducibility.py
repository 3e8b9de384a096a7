"""Reproducibility: same seed -> identical run in a fresh process; run.json records versions and input hashes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from endodistill.data.mri import file_sha256

pytestmark = pytest.mark.slow


def _results(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    results.pop("timings")
    return results


def test_same_seed_in_a_fresh_process_gives_identical_outputs(
    tiny_reference_run: Path, tiny_run_args: list[str], tiny_run_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "again"
    # A fresh process with an empty preprocessing cache: preprocessing is redone, not reused.
    env = {**tiny_run_env, "ENDODISTILL_CACHE": str(tmp_path / "cache")}
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            "from endodistill.cli import main; main()",
            "run",
            *tiny_run_args,
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    ref = tiny_reference_run
    assert _results(out) == _results(ref)
    same = [
        "oof_predictions.csv",
        "splits.json",
        "teacher/outputs.safetensors",
        "teacher/predictions.csv",
        "mae/encoder.safetensors",
        "final/model.safetensors",
    ]
    same += [str(f.relative_to(ref)) for f in sorted(ref.glob("folds/fold_*/*/predictions.csv"))]
    assert len(same) > 6 + 10
    for name in same:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    # The deployable model: the same weights. Its file bytes (hence weights_sha256) may differ: safetensors
    # writes a multi-key metadata header in hash-map order, which varies between processes.
    from safetensors.torch import load_file

    a, b = load_file(out / "model/model.safetensors"), load_file(ref / "model/model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    meta_a, meta_b = (json.loads((d / "model/metadata.json").read_text()) for d in (out, ref))
    for meta in (meta_a, meta_b):
        del meta["created"], meta["weights_sha256"]
    assert meta_a == meta_b


def test_run_json_records_versions_and_every_input_hash(tiny_reference_run: Path, tiny_cohort: Path) -> None:
    import lightning
    import monai
    import numpy
    import torch
    import torchvision

    info = json.loads((tiny_reference_run / "run.json").read_text())
    assert info["seed"] == 0
    versions = info["versions"]
    assert versions["torch"] == torch.__version__ and versions["torchvision"] == torchvision.__version__
    assert versions["monai"] == monai.__version__ and versions["lightning"] == lightning.__version__
    assert versions["numpy"] == numpy.__version__
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert versions["endodistill"] == metadata.version("endodistill")

    manifest = tiny_cohort / "manifest.csv"
    with open(manifest, newline="") as fh:
        listed = {row["path"] for row in csv.DictReader(fh)}
    inputs = info["inputs"]
    # Every file the manifest names, and the manifest itself, with the sha256 of its bytes.
    assert set(inputs) == listed | {"manifest.csv"}
    for rel, digest in inputs.items():
        assert digest == file_sha256(tiny_cohort / rel), rel
    assert Path(info["manifest"]) == manifest


def test_resume_refuses_changed_inputs(
    tiny_reference_run: Path,
    tiny_run_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A later reader (or ``--resume``) can tell that the data changed since the run."""
    import shutil

    from endodistill import cli

    run = tmp_path / "run"
    shutil.copytree(tiny_reference_run, run)
    info = json.loads((run / "run.json").read_text())
    changed = sorted(k for k in info["inputs"] if k.startswith("mri/"))[0]
    info["inputs"][changed] = "0" * 64  # as if the file on disk had been edited since
    (run / "run.json").write_text(json.dumps(info))
    monkeypatch.setenv("ENDODISTILL_CACHE", tiny_run_env["ENDODISTILL_CACHE"])
    monkeypatch.setattr(sys, "argv", ["endodistill", "run", "--resume", str(run)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and changed in err[0], err
    assert "input file changed" in err[0]
