"""Small shared helpers: atomic writes, content hashes, seeding, run-directory locks."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from endodistill.errors import DiskFullError, RunLockedError

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place, on failure remove it.

    Readers never see a half-written file, and an error (disk full, kill) leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates files 0600; give the result the permissions a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            # A write() error carries no file name: name the output the user would look for.
            raise DiskFullError(path) from e
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(path: str | Path, rows: Iterable[dict[str, Any]], fieldnames: list[str]) -> None:
    """Write dict rows as CSV atomically; floats as ``repr`` (they read back exactly)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fieldnames, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


_T = TypeVar("_T")
_R = TypeVar("_R")


def thread_map(fn: Callable[[_T], _R], items: Iterable[_T], workers: int | None, name: str) -> list[_R]:
    """``[fn(x) for x in items]`` in order, run by up to ``workers`` threads (default: the CPUs, at most 8).

    For work that spends its time in C with the GIL released (NumPy, zlib, FFmpeg/x264, hashing). With one
    worker or one item it runs in this thread. On an exception or Ctrl-C the queued items are dropped and the
    running ones finish before it propagates.
    """
    from concurrent.futures import ThreadPoolExecutor

    items = list(items)
    n = min(workers or min(8, os.cpu_count() or 1), len(items))
    if n <= 1:
        return [fn(x) for x in items]
    pool = ThreadPoolExecutor(n, thread_name_prefix=name)
    try:
        out = list(pool.map(fn, items))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return out


def stable_hash(obj: Any) -> str:
    """Short SHA-256 of a JSON-serialisable object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so that CPU reruns are identical."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


class RunLock:
    """An exclusive, advisory lock on a run directory (``RUN_DIR/.lock``) naming its holder.

    A second process that tries to take it gets :class:`RunLockedError` naming the holder's pid
    and host. The lock is released when the holder exits, even on SIGKILL (``fcntl.flock``).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fh: Any = None

    def __enter__(self) -> RunLock:
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunLockedError(f"{self.path.parent}: run directory is in use by {holder}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
