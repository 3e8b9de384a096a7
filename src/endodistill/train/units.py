"""The state of one unit directory (a fit or a stage): its ``done.json`` marker and its resume checkpoint."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from endodistill import rundir


def read_done(unit_dir: Path) -> dict[str, Any] | None:
    """The done marker of a finished unit (teacher, mae, a fold x method fit, final), or None.

    Read through the run-directory contract (:class:`endodistill.rundir.DoneInfo`); a damaged marker reads as
    None, so the unit is redone. The contract's ``schema_version`` is not part of the returned info.
    """
    info = rundir.read_done_info(Path(unit_dir))
    return None if info is None else info.model_dump(exclude={"schema_version"}, exclude_unset=True)


def write_done(unit_dir: Path, info: dict[str, Any]) -> None:
    """Mark a unit finished (written last, after all its outputs, atomically), through the contract."""
    rundir.write_done_info(Path(unit_dir), info)


def prepare_unit(unit_dir: Path, resume: bool) -> Path | None:
    """Get a unit directory ready: on resume return its ``last.ckpt`` (if any); otherwise clear old state.

    Args:
        unit_dir: the unit's directory.
        resume: continue an interrupted fit.

    Returns:
        The checkpoint to resume from, or None for a fresh fit.
    """
    unit_dir = Path(unit_dir)
    last = unit_dir / rundir.LAST_CKPT
    if resume and last.is_file():
        return last
    if not resume:
        # A fresh fit must not pick up a stale checkpoint or marker of an earlier attempt.
        for stale in (last, rundir.done_path(unit_dir)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    unit_dir.mkdir(parents=True, exist_ok=True)
    return None
