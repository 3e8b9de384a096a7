"""Errors that the CLI turns into one clear line and an exit code (no traceback unless ``--debug``)."""

from __future__ import annotations

from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_PARTIAL_FAILURE = 3
EXIT_INTERRUPTED = 130


class EndodistillError(Exception):
    """Base class of every error the CLI reports as one line."""

    exit_code = 1


class InputError(EndodistillError):
    """A user-supplied file, manifest, config or model directory is unusable.

    Args:
        path: the offending input (file, folder, or config key); shown first in the message.
        reason: what is wrong with it, in a few words.
    """

    exit_code = EXIT_BAD_INPUT

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class ConfigError(InputError):
    """A configuration value is unknown, of the wrong type, or impossible."""


class TrainingDivergedError(EndodistillError):
    """The loss became NaN or infinite."""

    exit_code = 1


class DiskFullError(EndodistillError):
    """Writing an output failed for lack of space (the file's previous version, if any, is intact)."""

    exit_code = 1

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        super().__init__(f"{path}: no space left on device (its previous version, if any, is intact)")


class RunLockedError(EndodistillError):
    """Another process holds the run directory."""

    exit_code = EXIT_BAD_INPUT
