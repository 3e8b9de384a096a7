"""``trainer.spread_fits``: the fold x method fits of a run spread over 2 torchrun processes (CPU).

The spread run must give the one-process run's results (same units, seeds and inputs), run every fit exactly
once, on the rank the round robin gives it, and a failure on one rank must stop the other with one line each.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from endodistill.config import load_config
from endodistill.errors import ConfigError, InputError
from endodistill.experiment.spread import Spread, SpreadError, check_spread_config, start_spread

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
FIT_LINE = re.compile(r"^\[fold (\d+)/\d+\] (\w+): [^\[]* \(rank (\d+)\)$")  # one whole line
FIT_START = re.compile(r"\[fold (\d+)/\d+\] (\w+): ")


def _fits(run: Path) -> list[str]:
    """The fold x method units in the protocol's loop order (fold-major)."""
    methods = list(load_config(run / "config.yaml").protocol.methods)
    folds = len(json.loads((run / "splits.json").read_text()))
    return [f"fold_{f}/{m}" for f in range(folds) for m in methods]


def _ranks(run: Path, fits: list[str]) -> list[int]:
    """The rank ``plan.fit_ranks`` gives each of ``fits`` (the run's loop) over 2 processes."""
    from endodistill.experiment.plan import cv_fits, fit_ranks

    cfg = load_config(run / "config.yaml")
    loop = cv_fits(len(json.loads((run / "splits.json").read_text())), list(cfg.protocol.methods))
    assert [f.name for f in loop] == fits
    return fit_ranks(cfg, loop, 2)


def test_fits_are_dealt_round_robin_with_the_joint_fits_first() -> None:
    from endodistill.experiment.plan import cv_fits, fit_cost, fit_ranks

    cfg = load_config("demo")
    fits = cv_fits(5, list(cfg.protocol.methods))  # five student methods and joint: 30 fits
    students = [f for f in fits if f.method != "joint"]
    assert fit_ranks(cfg, students, 3) == [i % 3 for i in range(len(students))]
    ranks = fit_ranks(cfg, fits, 2)
    load = [sum(fit_cost(cfg, f.method) for f, r in zip(fits, ranks) if r == k) for k in (0, 1)]
    # A plain round robin puts all five joint fits on rank 1: 10 student fits + 5 joint fits (2.7 each
    # at twice the students' epochs) against 15 student fits.
    assert fit_cost(cfg, "joint") == pytest.approx(1.35 * 40 / 20)
    joint_ranks = [r for f, r in zip(fits, ranks) if f.method == "joint"]
    assert sorted(joint_ranks) == [0, 0, 0, 1, 1]
    assert max(load) - min(load) <= 1.0 and max(load) < 10 + 5 * fit_cost(cfg, "joint")


def _comparable(run: Path) -> dict:
    results = json.loads((run / "results.json").read_text())
    results.pop("timings")
    results.pop("fit_processes")  # records how many processes the fits were spread over
    results["config"]["trainer"].pop("spread_fits")
    return results


@pytest.fixture(scope="module")
def spread_run(
    tiny_run_args: list[str],
    tiny_run_env: dict[str, str],
    tiny_reference_run: Path,  # also fills the session's preprocessing cache first
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("spread") / "run"
    # `--processes 2` starts torchrun itself (what `endodistill demo` does on 2 cores); the resume test below
    # goes through torchrun's own command line.
    cmd = [sys.executable, "-m", "endodistill", "run", *tiny_run_args, "--processes", "2"]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], env=tiny_run_env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.timeout(600)
def test_spread_run_matches_one_process_run(spread_run: tuple[Path, str], tiny_reference_run: Path) -> None:
    out, stdout = spread_run
    ref = tiny_reference_run
    assert (out / "oof_predictions.csv").read_bytes() == (ref / "oof_predictions.csv").read_bytes()
    assert _comparable(out) == _comparable(ref)
    assert json.loads((out / "results.json").read_text())["fit_processes"] == 2
    assert json.loads((ref / "results.json").read_text())["fit_processes"] == 1

    fits = _fits(out)
    ranks = _ranks(out, fits)
    expected = {str(r): [u for u, ur in zip(fits, ranks, strict=True) if ur == r] for r in (0, 1)}
    spread = json.loads((out / "timings.json").read_text())["spread"]
    assert spread["processes"] == 2 and spread["engine"] == "torchrun"
    assert spread["trained_by_rank"] == expected
    assert spread["skipped_by_rank"] == {"0": [], "1": []}
    assert spread["teacher_by_rank"] == {"0": [], "1": []}  # a hold-out teacher: rank 0 trains it
    # Each fit ran once: one Lightning log version per unit, one progress line, on the expected rank.
    # Two ranks share one stdout; on a loaded machine a line of one was seen cut by a line of the other
    # (intermittent, not understood: both write whole lines), so the lines' starts are counted, not lines.
    ran = sorted(f"fold_{int(k) - 1}/{m}" for k, m in FIT_START.findall(stdout))
    assert ran == sorted(fits), [line for line in stdout.splitlines() if "[fold " in line]
    tagged = [FIT_LINE.match(line) for line in stdout.splitlines()]
    whole = [m for m in tagged if m]
    assert len(whole) >= len(fits) - 2  # at most one pair of lines cut into each other
    assert all(int(m[3]) == ranks[fits.index(f"fold_{int(m[1]) - 1}/{m[2]}")] for m in whole)
    for u in fits:
        assert [p.name for p in (out / "folds" / u / "logs").iterdir()] == ["version_0"], u
    # The stage timings still sum every fit's own time (from the units' done.json), whichever rank ran it.
    stages = json.loads((out / "results.json").read_text())["timings"]
    fit_walls = [json.loads((out / "folds" / u / "done.json").read_text())["timing"]["wall"] for u in fits]
    assert stages["cross_validation"] == pytest.approx(sum(fit_walls), abs=1e-2)
    assert "[rank 1/2] trained 7 fits, 0 already done" in stdout
    # Rank 1 computed the baselines (while rank 0 trained the MAE); rank 0 reloaded them.
    assert spread["baselines_rank"] == 1
    assert any(line.startswith("[baselines]") and line.endswith("(rank 1)") for line in stdout.splitlines())


@pytest.mark.timeout(300)
def test_failure_on_one_rank_stops_both_with_one_line(
    spread_run: tuple[Path, str], tiny_run_env: dict[str, str], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(spread_run[0], run, ignore=shutil.ignore_patterns(".lock"))
    (run / "results.json").unlink()
    # fold_0/mae_ce is fit 1 of the loop: rank 1's. A damaged checkpoint makes that fit, and only it, fail.
    unit = run / "folds" / "fold_0" / "mae_ce"
    (unit / "done.json").unlink()
    (unit / "model.safetensors").unlink()
    (unit / "checkpoints").mkdir(exist_ok=True)
    (unit / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    others = {
        u: (run / "folds" / u / "done.json").stat().st_mtime_ns for u in _fits(run) if u != "fold_0/mae_ce"
    }

    proc = subprocess.run(
        [*TORCHRUN, "-m", "endodistill", "run", "--resume", str(run), "--set", "trainer.spread_fits=true"],
        env=tiny_run_env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode != 0  # and within the timeout: nobody waits for the failed rank
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    ckpt = str(unit / "checkpoints" / "last.ckpt")
    # rank 1: its own error; rank 0 (waiting for rank 1's fits): why it stops.
    assert any(line.startswith(f"error: {ckpt}: unreadable checkpoint") for line in errors), proc.stderr[
        -3000:
    ]
    assert any(line.startswith(f"error: stopping: rank 1 failed: {ckpt}:") for line in errors), errors
    assert len(errors) == 2, errors
    assert not re.search(r'File ".*endodistill/', proc.stderr)  # no traceback from the package itself
    # The resumed ranks skipped every finished fit (rank 0 all 8 of its own) and wrote no results.
    assert all((run / "folds" / u / "done.json").stat().st_mtime_ns == t for u, t in others.items())
    assert not (run / "results.json").exists()


@pytest.mark.timeout(30)
def test_barriers_abort_and_heartbeat_in_one_process() -> None:
    from torch.distributed import HashStore

    store = HashStore()
    rank0 = Spread(store, 0, 2, poll_s=0.01, heartbeat_s=0, grace_s=0)
    rank1 = Spread(store, 1, 2, poll_s=0.01, heartbeat_s=0, grace_s=0)
    rank0.arrive("ready")
    rank1.wait("ready", ranks=[0])
    assert [i for i in range(5) if rank1.owns(i)] == [1, 3]
    with pytest.raises(InputError), rank1:
        raise InputError("encoder.safetensors", "weights file not found")
    with pytest.raises(
        SpreadError, match=r"^stopping: rank 1 failed: encoder.safetensors: weights file not found$"
    ):
        rank0.wait("fits")

    # A rank killed outright (no abort key) is found by its silent heartbeat instead of waited for forever.
    alive = Spread(HashStore(), 0, 2, poll_s=0.01, heartbeat_s=0.02, stale_s=0.3)
    with pytest.raises(SpreadError, match="rank 1 stopped answering"), alive:
        alive.wait("fits")


@pytest.mark.timeout(30)
def test_sigterm_while_acknowledging_an_abort_stops_with_the_line() -> None:
    # The failing rank exits once acknowledged, and torchrun then SIGTERMs the rest of the node: a rank in
    # its short wait after the acknowledgement must still leave with its own error, not die without a line.
    import os
    import signal
    import threading
    import time

    from torch.distributed import HashStore

    store = HashStore()
    rank0 = Spread(store, 0, 2, poll_s=0.01, heartbeat_s=0, grace_s=5.0)
    rank1 = Spread(store, 1, 2, poll_s=0.01, heartbeat_s=0, grace_s=0)
    with pytest.raises(InputError), rank1:
        raise InputError("encoder.safetensors", "weights file not found")
    late: list[int] = []

    def record(signum: int, frame: object) -> None:  # a signal outside the wait must not kill pytest
        late.append(signum)

    original = signal.signal(signal.SIGTERM, record)
    try:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        t0 = time.monotonic()
        with pytest.raises(SpreadError, match=r"^stopping: rank 1 failed: encoder.safetensors"):
            rank0.check_abort()
        assert time.monotonic() - t0 < 0.9  # the signal cut the 1 s wait short
        assert store.check(["ack/0"]) and not late
        assert signal.getsignal(signal.SIGTERM) is record  # the handler before the wait is back
    finally:
        signal.signal(signal.SIGTERM, original)


def test_spread_config_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    ddp = load_config("tiny", {"trainer": {"spread_fits": True, "devices": 2, "strategy": "ddp"}})
    with pytest.raises(ConfigError, match=r"trainer\.spread_fits: .*trainer\.devices=2"):
        check_spread_config(ddp)
    with pytest.raises(ConfigError, match=r"trainer\.strategy=ddp"):
        check_spread_config(load_config("tiny", {"trainer": {"spread_fits": True, "strategy": "ddp"}}))
    # Without torchrun (WORLD_SIZE unset or 1) the option changes nothing.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert start_spread(load_config("tiny", {"trainer": {"spread_fits": True}})) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert start_spread(load_config("tiny", {"trainer": {"spread_fits": True}})) is None


@pytest.mark.timeout(400)
def test_spread_teacher_ensemble_matches_one_process(
    tiny_run_args: list[str], tiny_run_env: dict[str, str], tmp_path: Path
) -> None:
    # A cross-validated teacher of 2 folds x 2 networks: its 4 fits are spread too (fit i on rank i % 2).
    short = [
        *("--set", "teacher.folds=2", "--set", "teacher.targets=oof", "--set", "teacher.ensemble=2"),
        # One method that learns from the teacher's outputs (KD), so its fits read the gathered teacher.
        *("--set", "protocol.methods={scratch_kd_ce: {init: scratch, schedule: {kind: exp, alpha: 0.85}}}"),
        *("--set", "protocol.full_method=scratch_kd_ce"),
        *("--set", "protocol.final_model=false", "--set", "baselines.enabled=false"),
    ]
    cmd = [sys.executable, "-m", "endodistill", "run", *tiny_run_args, *short]
    runs = {}
    for n in (1, 2):
        runs[n] = tmp_path / f"run{n}"
        proc = subprocess.run(
            [*cmd, "--processes", str(n), "--out", str(runs[n])],
            env=tiny_run_env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("teacher/predictions.csv", "teacher/outputs.safetensors", "oof_predictions.csv"):
        assert (runs[2] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    spread = json.loads((runs[2] / "timings.json").read_text())["spread"]
    assert spread["teacher_by_rank"] == {"0": ["fold_0", "fold_1"], "1": ["fold_0_m1", "fold_1_m1"]}
    for unit in ("fold_0", "fold_0_m1", "fold_1", "fold_1_m1"):  # each trained once
        assert [p.name for p in (runs[2] / "teacher" / unit / "logs").iterdir()] == ["version_0"], unit
