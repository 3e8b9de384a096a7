"""CLI behaviour: one-line errors, exit codes, no traceback unless --debug."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXE = [sys.executable, "-m", "endodistill"]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_lists_commands() -> None:
    r = _run("--help")
    assert r.returncode == 0
    for cmd in ("synth", "validate", "inspect", "demo", "run", "train", "report", "predict", "export"):
        assert cmd in r.stdout


def test_study_help_names_every_study() -> None:
    from endodistill.experiment.study_plan import STUDIES

    r = _run("study", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # rich wraps the help over lines and boxes
    names = set(re.findall(r"[a-z_]+", text.split("Arguments")[1].split("Options")[0]))
    assert set(STUDIES) <= names, set(STUDIES) - names


def test_bad_config_is_one_line_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("finetune:\n  epochz: 3\n")
    r = _run("run", "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "finetune.epochz" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists(), "no partial outputs on bad input"


def test_debug_shows_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("seed: [1, 2]\n")
    r = _run("--debug", "run", "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert r.returncode != 0
    assert "Traceback" in r.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    r = _run("run", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    assert "nope.yaml" in r.stderr and "not found" in r.stderr


def test_hardware_options_map_to_trainer_settings_and_win_over_set(tmp_path: Path) -> None:
    from endodistill.cli import _with_hardware

    assert _with_hardware(["trainer.devices=3"], "gpu", "2", "ddp", 2) == [
        "trainer.devices=3",
        "trainer.accelerator=gpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.num_nodes=2",
    ]
    # Through the real command: the option reaches the validated config (and wins over --set).
    r = _run("run", "--config", "tiny", "--out", str(tmp_path / "run"), "--accelerator", "nonsense")
    assert r.returncode == 2 and "trainer.accelerator" in r.stderr, r.stderr
    r = _run(
        "run", "--config", "tiny", "--out", str(tmp_path / "run2"),
        "--set", "trainer.devices=3", "--devices", "2", "--set", "trainer.spread_fits=true",
    )  # fmt: skip
    assert r.returncode == 2 and "trainer.devices=2" in r.stderr, r.stderr
    r = _run("run", "--help")
    assert all(opt in r.stdout for opt in ("--devices", "--strategy", "--accelerator", "--num-nodes"))


def _one_error_line(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert all(w in lines[0] for w in words) and "Traceback" not in r.stderr


def test_report_command_rejects_what_is_not_a_finished_run(tmp_path: Path) -> None:
    _one_error_line(_run("report", str(tmp_path / "nope")), "nope", "not a run directory")
    assert not (tmp_path / "nope").exists()
    started = tmp_path / "started"  # a run that never finished: config, no results.json
    started.mkdir()
    (started / "config.yaml").write_text("seed: 0\n")
    _one_error_line(_run("report", str(started)), "not a finished run directory")
    (started / "results.json").write_text("{broken")
    _one_error_line(_run("report", str(started)), "results.json", "not valid JSON")
    (started / "results.json").write_text('{"seed": 0}')
    _one_error_line(_run("report", str(started)), "results.json", "'methods'")
    assert not (started / "report.html").exists()
    r = _run("--debug", "report", str(tmp_path / "nope"))
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.slow
def test_report_command_rebuilds_from_an_edited_results_json_without_training(
    tiny_reference_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_reference_run, run)
    trained = sorted(run.rglob("*.safetensors")) + sorted(run.rglob("done.json")) + [run / "timings.json"]
    stamps = {p: p.stat().st_mtime_ns for p in trained}
    logs = sorted(run.rglob("metrics.csv"))
    results = json.loads((run / "results.json").read_text())
    results["methods"]["scratch_ce"]["brier"] = 0.123456789
    results["display_names"] = {"mae_kd_ce": "MAE + KD + CE (ours)"}
    (run / "results.json").write_text(json.dumps(results))
    for f in ("report.html", "report.md"):
        (run / f).unlink()

    r = _run("report", str(run))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"report: {run / 'report.html'} and {run / 'report.md'}"
    text = (run / "report.html").read_text()
    ablation = text.split('<h2 id="ablation">')[1].split("</section>")[0]
    assert '<tr class="full"><td>MAE + KD + CE (ours)</td>' in ablation  # still the highlighted full method
    assert "<td>mae_kd_ce</td>" not in ablation and "<td>0.906</td>" in ablation  # the paper's AUC follows
    assert re.search(r"<tr><td>scratch_ce</td>(<td>[^<]*</td>){4}<td>0\.123</td>", ablation)
    comps = text.split('<h2 id="comparisons">')[1].split("</section>")[0]
    assert "<td>MAE + KD + CE (ours)</td>" in comps and "<td>mae_kd_ce</td>" not in comps
    md = (run / "report.md").read_text()
    assert "| MAE + KD + CE (ours) |" in md and "| mae_kd_ce |" not in md
    assert 'src="data:image/png;base64,' in text and not re.search(r'src="(?!data:)', text)
    # Nothing trained: weights, done markers and timings untouched, no new Lightning log.
    assert {p: p.stat().st_mtime_ns for p in trained} == stamps
    assert sorted(run.rglob("metrics.csv")) == logs
    assert not list(run.glob("*.tmp*")) and not list(run.glob(".*.tmp*"))
