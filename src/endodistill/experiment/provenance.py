"""Where a run comes from and whether it may be resumed: config.yaml, run.json, splits.json.

A run directory records the resolved configuration (``config.yaml``), the package versions and the sha256
of every input file (``run.json``) and its folds (``splits.json``). ``--resume`` continues a run only with
the same configuration (hardware settings aside) and unchanged inputs.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

import lightning
import monai
import numpy as np
import torch
import torchvision

import endodistill
from endodistill import rundir
from endodistill.config import Config, ConfigError, dump_config, load_config
from endodistill.data.cache import content_hash
from endodistill.data.splits import check_splits_subjects, load_splits, make_cv_splits, save_splits
from endodistill.errors import InputError
from endodistill.train.data import ensure_manifest
from endodistill.utils import atomic_write_text


def load_run_config(run_dir: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """The resolved configuration a run directory was started with (``RUN_DIR/config.yaml``).

    Raises:
        InputError: ``run_dir`` holds no ``config.yaml``.
    """
    p = Path(run_dir) / rundir.CONFIG
    if not p.is_file():
        raise InputError(run_dir, "not a run directory (no config.yaml): nothing to resume")
    return load_config(p, overrides)


def versions() -> dict[str, str]:
    """The versions run.json records."""
    return {
        "python": platform.python_version(),
        "endodistill": endodistill.__version__ if hasattr(endodistill, "__version__") else "unknown",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "monai": monai.__version__,
        "lightning": lightning.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def input_hashes(files: list[Path], base: Path) -> dict[str, str]:
    """sha256 of every input file, keyed by its path relative to ``base`` (the manifest's folder)."""
    out = {}
    for f in files:
        try:
            key = str(Path(f).relative_to(base))
        except ValueError:
            key = str(f)
        # content_hash is file_sha256 memoised in this process: the cache has just hashed these files.
        out[key] = content_hash(f)
    return out


def _comparable(cfg: Config) -> dict[str, Any]:
    # Hardware settings may change between an interrupted run and its resumption.
    d = cfg.model_dump(mode="json")
    d.pop("trainer", None)
    d.get("data", {}).pop("cache_dir", None)
    return d


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys in which two nested dicts differ (sorted)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def run_relative(path: Path, run_dir: Path) -> Path:
    """``path`` relative to the run directory when inside it, else as is.

    A cohort generated inside the run directory is recorded relative to it (config.yaml resolves it against
    its own folder): the run directory can move, and results.json does not depend on where it is.
    """
    try:
        return Path(path).resolve().relative_to(Path(run_dir).resolve())
    except ValueError:
        return Path(path)


def manifest_path(cfg: Config, run_dir: str | Path) -> Path:
    """The absolute manifest of a run (``cfg.data.manifest`` may be relative to the run directory)."""
    if cfg.data.manifest is None:
        raise InputError(run_dir, "no manifest in the configuration")
    m = Path(cfg.data.manifest)
    return m if m.is_absolute() else Path(run_dir) / m


def start_run(cfg: Config, run_dir: Path, resume: bool) -> Config:
    """Resolve the manifest, check/save config.yaml; a resumed run must have the same configuration."""
    cfg = cfg.model_copy(deep=True)
    saved = run_dir / rundir.CONFIG
    if saved.is_file() and not resume:
        raise InputError(
            run_dir, "already holds a run: continue it with --resume, or choose another output directory"
        )
    if saved.is_file() and cfg.data.manifest is None:
        # A resumed demo: the cohort was generated into the run directory the first time.
        prev = load_config(saved)
        if prev.data.manifest is not None and Path(prev.data.manifest).is_file():
            cfg.data.manifest = prev.data.manifest
    cfg.data.manifest = run_relative(ensure_manifest(cfg, run_dir / rundir.COHORT), run_dir)
    if saved.is_file():
        prev = load_config(saved)
        if prev.data.manifest is not None:
            prev.data.manifest = run_relative(prev.data.manifest, run_dir)
        diff = config_diff(_comparable(prev), _comparable(cfg))
        if diff:
            raise ConfigError(
                saved,
                f"the run was started with another configuration ({', '.join(diff[:5])} differ): cannot resume",
            )
    else:
        atomic_write_text(saved, dump_config(cfg))
    return cfg


def start_stage(cfg: Config, out: Path) -> Config:
    """A single stage's config: the manifest resolved (or taken from config.yaml), config.yaml saved once."""
    cfg = cfg.model_copy(deep=True)
    saved = out / rundir.CONFIG
    if cfg.data.manifest is None and saved.is_file():
        prev = load_config(saved)
        if prev.data.manifest is not None:
            cfg.data.manifest = prev.data.manifest
    cfg.data.manifest = run_relative(ensure_manifest(cfg, out / rundir.COHORT), out)
    if not saved.is_file():
        atomic_write_text(saved, dump_config(cfg))
    return cfg


def record_run(cfg: Config, run_dir: Path, files: list[Path]) -> None:
    """run.json: versions, seed, hashes of every input; on resume the inputs must be unchanged."""
    path = run_dir / rundir.RUN
    base = manifest_path(cfg, run_dir).parent
    hashes = input_hashes(files, base)
    if path.is_file():
        prev = rundir.read_run_info(run_dir)
        old = prev.inputs if prev is not None else {}
        changed = sorted(k for k in set(old) | set(hashes) if old.get(k) != hashes.get(k))
        if old and changed:
            raise InputError(
                base / changed[0],
                f"input file changed since the run started ({len(changed)} changed): cannot resume",
            )
        return
    info = rundir.RunInfo(
        seed=cfg.seed,
        versions=versions(),
        manifest=str(manifest_path(cfg, run_dir)),
        inputs=hashes,
        command=" ".join(sys.argv),
    )
    rundir.write_run_info(run_dir, info)


def load_or_make_splits(
    cfg: Config, run_dir: Path, subjects: list[str], labels: list[int]
) -> list[dict[str, list[str]]]:
    """Build splits.json (stratified by subject), or reuse and check the one present."""
    path = run_dir / rundir.SPLITS
    if path.is_file():
        splits = load_splits(path)
        check_splits_subjects(splits, subjects, path)
        tested = [s for fold in splits for s in fold["test"]]
        missing = sorted(set(subjects) - set(tested))
        if missing:
            raise InputError(path, f"subject {missing[0]!r} is in no test fold ({len(missing)} missing)")
        return splits
    splits = make_cv_splits(
        subjects,
        labels,
        cfg.protocol.folds,
        cfg.seed,
        cfg.finetune.val_fraction,
        cfg.protocol.train_fraction,
    )
    save_splits(path, splits)
    return splits
