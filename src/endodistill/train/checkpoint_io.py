"""Lightning checkpoints written atomically and always read with ``weights_only=True``.

Model weights (safetensors) are :mod:`endodistill.models.weights`: inference reads them without train/.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from endodistill.errors import InputError
from endodistill.utils import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file renamed into place; ``torch.load`` with ``weights_only=True`` only.

    Checkpoints hold tensors and primitive containers only (hyper-parameters are plain dicts), so the
    restricted unpickler reads them; a checkpoint needing more is refused instead of executed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.save_seconds = 0.0

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` atomically (a kill or a full disk leaves the previous file intact)."""
        t0 = time.perf_counter()
        # Temporary file + rename (no fsync): a killed process never leaves a torn checkpoint, which is
        # what resuming needs; fsync-ing every epoch of 25 small fits costs more than the fits' I/O.
        # Streamed through a Python file object: its write() raises the plain OSError(ENOSPC) on a full
        # disk (named DiskFullError by atomic_path), and nothing is buffered in memory (a ViT-B checkpoint:
        # 0.5-0.9x the time of going through an in-memory buffer; benchmarks/bench_speedups.py).
        with atomic_path(Path(path), fsync=False) as tmp, open(tmp, "wb") as fh:
            torch.save(checkpoint, fh)
        self.save_seconds += time.perf_counter() - t0

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read a checkpoint with the restricted unpickler, whatever the caller asked for."""
        p = Path(path)
        if not p.is_file():
            raise InputError(p, "checkpoint not found")
        try:
            return torch.load(p, map_location=map_location or "cpu", weights_only=True)
        except Exception as e:  # a truncated file or one needing arbitrary code
            raise InputError(p, f"unreadable checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
