"""Shared fixtures. Real files come from ../shared/data/real through ``real_data`` only."""

from __future__ import annotations

import os
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
