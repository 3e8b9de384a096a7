"""Shared fixtures. Real files come from ../shared/data/real through ``real_data`` only."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_REAL = REPO.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The folder of real MRI/ultrasound files; skips (with the reason) where ../shared is absent."""
    if not SHARED_REAL.is_dir():
        pytest.skip(f"real data folder {SHARED_REAL} not present (a clone without ../shared)")
    return SHARED_REAL


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic cohort generated once per test session."""
    from endodistill.data.synthetic import generate_cohort

    out = tmp_path_factory.mktemp("tiny_cohort")
    generate_cohort(out, preset="tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_run_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of ``endodistill`` subprocesses: one thread, a session-wide preprocessing cache, no hooks."""
    env = {k: v for k, v in os.environ.items() if k != "ENDODISTILL_TEST_KILL_AT"}
    env.update(OMP_NUM_THREADS="1", ENDODISTILL_CACHE=str(tmp_path_factory.mktemp("cli_cache")))
    return env


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in this process, however pytest was started.

    A command started with ``&`` by a non-interactive shell inherits SIGINT as ignored, and Python then
    installs no handler: a test that signals itself would see nothing happen.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def tiny_run_args(tiny_cohort: Path) -> list[str]:
    """``endodistill run`` options of the tiny protocol on ``tiny_cohort`` (a short teacher keeps it quick)."""
    return [
        "--config",
        "tiny",
        "--set",
        f"data.manifest={tiny_cohort / 'manifest.csv'}",
        "--set",
        "teacher.epochs=6",
    ]


@pytest.fixture(scope="session")
def tiny_reference_run(
    tiny_run_args: list[str], tiny_run_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """One uninterrupted ``endodistill run`` (fresh process) of the tiny protocol, shared as a reference."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("reference") / "run"
    code = "from endodistill.cli import main; main()"
    subprocess.run(
        [sys.executable, "-c", code, "run", *tiny_run_args, "--out", str(out)],
        env=tiny_run_env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


class RunFiles:
    """Builds the JSON files of a run directory FROM the run-directory contract (:mod:`endodistill.rundir`).

    Every file goes through its pydantic model, so a fabricated run can only hold keys the protocol writes:
    a made-up key fails at ``Results(...)`` / ``RunInfo(...)`` as it would for a real run.
    """

    def results(self, run_dir: Path, **fields: object) -> Path:
        """``results.json``: the given fields, with the protocol's defaults for the rest."""
        from endodistill import rundir

        methods = list(fields.get("methods") or {})  # type: ignore[call-overload]
        defaults: dict[str, object] = {
            "teacher": {},
            "mae": None,
            "comparisons": [],
            "cohort": {},
            "config": {},
            "seed": 0,
            "folds": 5,
            "reference": "scratch_ce" if "scratch_ce" in methods else (methods[0] if methods else ""),
            "full_method": methods[-1] if methods else "",
            "correction": "holm",
            "final_model": None,
            "teacher_model": None,
            "timings": {},
            "fit_processes": 1,
        }
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        rundir.write_results(run_dir, rundir.Results.model_validate({**defaults, **fields}))
        return Path(run_dir) / rundir.RESULTS

    def run_info(self, run_dir: Path, **fields: object) -> Path:
        """``run.json`` (versions, seed, inputs, command)."""
        from endodistill import rundir

        defaults: dict[str, object] = {
            "seed": 0,
            "versions": {},
            "manifest": "manifest.csv",
            "inputs": {},
            "command": "endodistill run",
        }
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        rundir.write_run_info(run_dir, rundir.RunInfo.model_validate({**defaults, **fields}))
        return Path(run_dir) / rundir.RUN


@pytest.fixture
def run_files() -> RunFiles:
    """Write run-directory JSON files through the contract's models (see :class:`RunFiles`)."""
    return RunFiles()
