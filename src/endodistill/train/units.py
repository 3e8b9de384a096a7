"""The state of one unit directory (a fit or a stage): its ``done.json`` marker and its resume checkpoint."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from endodistill.utils import atomic_write_json

LAST_CKPT = "checkpoints/last.ckpt"
DONE = "done.json"


def read_done(unit_dir: Path) -> dict[str, Any] | None:
    """The done marker of a finished unit (teacher, mae, a fold x method fit, final), or None."""
    p = Path(unit_dir) / DONE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # a damaged marker: the unit is redone


def write_done(unit_dir: Path, info: dict[str, Any]) -> None:
    """Mark a unit finished (written last, after all its outputs, atomically)."""
    atomic_write_json(Path(unit_dir) / DONE, info)


def prepare_unit(unit_dir: Path, resume: bool) -> Path | None:
    """Get a unit directory ready: on resume return its ``last.ckpt`` (if any); otherwise clear old state.

    Args:
        unit_dir: the unit's directory.
        resume: continue an interrupted fit.

    Returns:
        The checkpoint to resume from, or None for a fresh fit.
    """
    unit_dir = Path(unit_dir)
    last = unit_dir / LAST_CKPT
    if resume and last.is_file():
        return last
    if not resume:
        # A fresh fit must not pick up a stale checkpoint or marker of an earlier attempt.
        for stale in (last, unit_dir / DONE):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    unit_dir.mkdir(parents=True, exist_ok=True)
    return None
