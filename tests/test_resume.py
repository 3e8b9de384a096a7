"""Interruption and resume: SIGKILL at several points, Ctrl-C, the run lock, a full disk, divergence.

Runs are stopped at well-defined points through the test-only hook ``$ENDODISTILL_TEST_KILL_AT``
(:func:`endodistill.train.runtime.fault_point`): ``"<fit> epoch N"`` fires when epoch N of that fit starts
(the checkpoint of epoch N-1 is on disk), ``"report"`` just before the report is written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

CLI = "from endodistill.cli import main; main()"


def _cli(args: list[str], env: dict[str, str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(env)
    if kill_at is not None:
        env["ENDODISTILL_TEST_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "-c", CLI, *args], env=env, capture_output=True, text=True, timeout=600
    )


def _results(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    results.pop("timings")
    return results


def _markers(run_dir: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("done.json")}


def _steps(unit: Path) -> int:
    return json.loads((unit / "done.json").read_text())["timing"]["steps"]


def _ckpt_epoch(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["epoch"])


def _main_in_process(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """``endodistill ARGV`` in this process (so that writes can be made to fail); returns the exit code."""
    from endodistill import cli

    monkeypatch.setattr(sys, "argv", ["endodistill", *argv])
    monkeypatch.delenv("ENDODISTILL_TEST_KILL_AT", raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.main()
        raise SystemExit(0)
    return int(exc.value.code or 0)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_sigkill_at_four_points_then_resume_gives_identical_results(
    tiny_reference_run: Path, tiny_run_args: list[str], tiny_run_env: dict[str, str], tmp_path: Path
) -> None:
    ref = tiny_reference_run
    run = tmp_path / "run"
    # 1. killed in the teacher (second sub-fit, after three epoch checkpoints)
    p = _cli(["run", *tiny_run_args, "--out", str(run)], tiny_run_env, "teacher (all clips) epoch 3")
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert (run / "teacher" / "holdout" / "done.json").is_file()
    assert _ckpt_epoch(run / "teacher" / "full" / "checkpoints" / "last.ckpt") == 2
    assert not (run / "teacher" / "full" / "done.json").exists()
    assert not (run / "teacher" / "done.json").exists()

    # 2. resumed, killed in the MAE; 3. resumed, killed in fold 1 / mae_ce after two epoch checkpoints;
    # 4. resumed, killed while writing the report. Finished units are never redone (markers untouched).
    stops = [
        ("mae (mae) epoch 1", "mae", 0),
        ("distill fold 1 mae_ce epoch 2", "folds/fold_1/mae_ce", 1),
        ("report", None, None),
    ]
    for kill_at, unit, epoch in stops:
        before = _markers(run)
        p = _cli(["run", "--resume", str(run)], tiny_run_env, kill_at)
        assert p.returncode == -signal.SIGKILL, p.stderr
        after = _markers(run)
        assert {k: after.get(k) for k in before} == before, f"a finished unit was redone before {kill_at}"
        assert len(after) > len(before)  # ... and the interrupted one was finished
        if unit is not None:
            assert _ckpt_epoch(run / unit / "checkpoints" / "last.ckpt") == epoch
            assert not (run / unit / "done.json").exists()
    assert (run / "results.json").is_file() and not (run / "report.html").exists()
    assert (run / "folds" / "fold_0" / "scratch_ce" / "done.json").is_file()

    before = _markers(run)
    p = _cli(["run", "--resume", str(run)], tiny_run_env)
    assert p.returncode == 0, p.stderr
    assert _markers(run) == before
    assert (run / "report.html").is_file() and (run / "report.md").is_file()
    assert _results(run) == _results(ref)
    assert (run / "oof_predictions.csv").read_text() == (ref / "oof_predictions.csv").read_text()
    # The interrupted fits continued from their checkpoints (fewer steps in the resuming process) and
    # still ended where the uninterrupted ones did.
    for unit, done_epochs, total in (("teacher/full", 3, 6), ("mae", 1, 2), ("folds/fold_1/mae_ce", 2, 3)):
        full = _steps(ref / unit)
        assert _steps(run / unit) == full - full * done_epochs // total, unit
        assert (run / unit / "history.csv").read_text() == (ref / unit / "history.csv").read_text()
    for name in ("predictions.csv", "model.safetensors"):
        a, b = run / "folds/fold_1/mae_ce" / name, ref / "folds/fold_1/mae_ce" / name
        assert a.read_bytes() == b.read_bytes(), name


def _wait_stopped(proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Wait until ``proc`` has stopped itself (SIGSTOP through the hook)."""
    deadline = time.monotonic() + timeout
    stat = Path(f"/proc/{proc.pid}/stat")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _out, err = proc.communicate()
            pytest.fail(f"exited early ({proc.returncode}): {err[-2000:]}")
        if stat.read_text().rsplit(")", 1)[1].split()[0] == "T":
            return
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the run never reached the stop point")


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc to see a stopped process")
def test_lock_ctrl_c_full_disk_then_resume(
    tiny_reference_run: Path,
    tiny_run_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref = tiny_reference_run
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    # The state of a run interrupted before its last fold.
    shutil.rmtree(run / "folds" / "fold_2")
    for name in ("results.json", "report.html", "report.md"):
        (run / name).unlink()
    unit = run / "folds" / "fold_2" / "mae_ce"
    ckpt = unit / "checkpoints" / "last.ckpt"

    # A run that holds the lock, paused in the middle of a fit (epoch 0 checkpointed, epoch 1 starting).
    env = {**tiny_run_env, "ENDODISTILL_TEST_KILL_AT": "SIGSTOP@distill fold 2 mae_ce epoch 1"}
    first = subprocess.Popen(
        [sys.executable, "-c", CLI, "run", "--resume", str(run)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_stopped(first)
        # A second run on the same directory is refused, naming the holder.
        second = _cli(["run", "--resume", str(run)], tiny_run_env)
        assert second.returncode == 2
        lines = _error_lines(second.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), second.stderr
        assert f"pid {first.pid}" in lines[0] and "in use" in lines[0]
        # Ctrl-C (SIGINT, delivered once the process continues) stops it cleanly.
        os.kill(first.pid, signal.SIGINT)
        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err
    assert f"endodistill run --resume {run}" in out + err
    assert "Traceback" not in err
    assert _ckpt_epoch(ckpt) == 0 and not (unit / "done.json").exists()
    assert (run / "folds" / "fold_2" / "scratch_ce" / "done.json").is_file()
    capsys.readouterr()
    monkeypatch.setenv("ENDODISTILL_CACHE", tiny_run_env["ENDODISTILL_CACHE"])

    # Out of disk space while the checkpoint is written: one clear line, the previous checkpoint intact.
    good = ckpt.read_bytes()
    real_save = torch.save

    def full_disk_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk_save)
    assert _main_in_process(["run", "--resume", str(run)], monkeypatch) == 1
    lines = _error_lines(capsys.readouterr().err)
    assert lines == [f"error: {ckpt}: no space left on device (its previous version, if any, is intact)"]
    assert ckpt.read_bytes() == good
    assert not list(unit.rglob("*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)

    # Out of disk space while results.json is written: the previous results.json stays as it was. This
    # resume also finishes the interrupted fit: its checkpoint must be read with weights_only=True.
    previous = '{"previous": "results"}\n'
    (run / "results.json").write_text(previous)
    real_write = Path.write_bytes
    real_load = torch.load
    loads: list[tuple[str, object]] = []

    def failing_write(self: Path, data: bytes) -> int:
        if self.name.startswith(".results.json."):
            real_write(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    def spy_load(f, *a, **k):
        loads.append((str(f), k.get("weights_only")))
        return real_load(f, *a, **k)

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    monkeypatch.setattr(torch, "load", spy_load)
    assert _main_in_process(["run", "--resume", str(run)], monkeypatch) == 1
    lines = _error_lines(capsys.readouterr().err)
    assert lines == [
        f"error: {run / 'results.json'}: no space left on device (its previous version, if any, is intact)"
    ]
    assert (run / "results.json").read_text() == previous
    assert not list(run.glob(".*.tmp"))
    assert (str(ckpt), True) in loads
    assert all(w is True for _, w in loads), loads
    monkeypatch.setattr(Path, "write_bytes", real_write)

    # With space again, the resumed run ends exactly where the uninterrupted one did.
    full = _steps(ref / "folds" / "fold_2" / "mae_ce")
    assert _steps(unit) == full - full // 3  # continued from the epoch-0 checkpoint
    assert _main_in_process(["run", "--resume", str(run)], monkeypatch) == 0
    assert _results(run) == _results(ref)
    assert (run / "oof_predictions.csv").read_text() == (ref / "oof_predictions.csv").read_text()


def test_divergence_names_stage_fold_step_and_keeps_last_good_checkpoint(
    tiny_reference_run: Path,
    tiny_run_args: list[str],
    tiny_run_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import endodistill.train.finetune as losses  # the distillation step calls finetune.mixed_loss

    run = tmp_path / "run"
    run.mkdir()
    for name in ("teacher", "mae"):
        shutil.copytree(tiny_reference_run / name, run / name)
    shutil.copy(tiny_reference_run / "splits.json", run / "splits.json")
    monkeypatch.setenv("ENDODISTILL_CACHE", tiny_run_env["ENDODISTILL_CACHE"])
    stage = ["train", "distill", "--out", str(run), *tiny_run_args, "--method", "scratch_ce", "--fold", "0"]
    unit = run / "folds" / "fold_0" / "scratch_ce"

    # An absurd learning rate: NaN at the second step, in the first epoch (no checkpoint yet).
    assert _main_in_process([*stage, "--set", "finetune.lr=1e30"], monkeypatch) == 1
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: distill fold 0 scratch_ce: loss became nan at step 1 (epoch 0)")
    assert "no checkpoint was written" in lines[0]
    assert not (unit / "done.json").exists()

    # A NaN injected into the loss at the first step of epoch 1: the epoch-0 checkpoint is kept.
    steps_per_epoch = _steps(tiny_reference_run / "folds" / "fold_0" / "scratch_ce") // 3
    real = losses.mixed_loss
    calls = {"n": 0}

    def nan_from_epoch_1(*a, **k):
        loss = real(*a, **k)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] > steps_per_epoch else loss

    monkeypatch.setattr(losses, "mixed_loss", nan_from_epoch_1)
    assert _main_in_process(stage, monkeypatch) == 1
    lines = _error_lines(capsys.readouterr().err)
    assert lines == [
        f"error: distill fold 0 scratch_ce: loss became nan at step {steps_per_epoch} (epoch 1); the last "
        "good checkpoint is the previous epoch's checkpoints/last.ckpt. Lower the learning rate or check "
        "the inputs."
    ]
    state = torch.load(unit / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 0 and state["global_step"] == steps_per_epoch
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert not (unit / "done.json").exists()
