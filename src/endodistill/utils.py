"""Small shared helpers: atomic file and folder writes, CSV and JSON text, hashes, state-dict checks, run locks."""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from endodistill.errors import DiskFullError, RunLockedError

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place, on failure remove it.

    Readers never see a half-written file, and an error (disk full, kill) leaves the old file intact.

    Args:
        path: the file to write.
        fsync: flush the file to disk before the rename; without it a kill still never leaves a torn
            file, but a power loss may (cheaper for files rewritten often, such as checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if fsync:
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


def repr_floats(v: Any) -> Any:
    """A CSV cell with floats as ``repr`` (they read back exactly); anything else as the csv module writes it."""
    return repr(v) if isinstance(v, float) else v


def csv_text(
    rows: Iterable[Mapping[str, Any]],
    fieldnames: Sequence[str],
    cell: Callable[[Any], Any] = repr_floats,
    extrasaction: Literal["raise", "ignore"] = "raise",
) -> str:
    """Dict rows as CSV text (``\\n`` line ends, a header line), each value through ``cell``.

    A key missing from a row is an empty cell; a key not in ``fieldnames`` raises ``ValueError``, or is
    dropped with ``extrasaction="ignore"``.
    """
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fieldnames), lineterminator="\n", extrasaction=extrasaction)
    w.writeheader()
    for r in rows:
        w.writerow({k: cell(v) for k, v in r.items()})
    return buf.getvalue()


def atomic_write_csv(
    path: str | Path,
    rows: Iterable[Mapping[str, Any]],
    fieldnames: Sequence[str],
    cell: Callable[[Any], Any] = repr_floats,
    extrasaction: Literal["raise", "ignore"] = "raise",
) -> None:
    """Write dict rows as CSV atomically (:func:`csv_text`); by default floats as ``repr``."""
    atomic_write_text(path, csv_text(rows, fieldnames, cell, extrasaction))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, mode: int = 0o755) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; on success it replaces ``path``, on failure it is removed.

    An existing ``path`` is moved aside, the staging folder renamed into place, then the old one deleted, so
    readers see the old folder or the new one, never a half-written one.

    Args:
        path: the folder to write.
        mode: the staging folder's permissions (``mkdtemp`` makes it 0700; 0755 for a folder to share).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".staging", dir=path.parent))
    os.chmod(staging, mode)
    try:
        yield staging
        _swap_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename a finished staging folder to ``target``; an existing target is moved aside, then deleted."""
    old: Path | None = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for NumPy scalars and arrays and paths; anything else raises TypeError."""
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
    blob = json.dumps(obj, sort_keys=True, default=json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def state_dict_mismatch(state: Mapping[str, Any], expected: Mapping[str, Any]) -> tuple[str, str, int] | None:
    """The first difference between a state dict and the one an architecture expects, or None.

    Compares key sets, then shapes (anything with ``.shape``: tensors, arrays), keys in sorted order.

    Returns:
        ``("missing", key, n_missing)`` or ``("unexpected", key, n_unexpected)`` for the first key (sorted)
        that is missing or extra, else ``("shape", key, 1)`` for the first key whose shape differs.
    """
    missing = sorted(expected.keys() - state.keys())
    if missing:
        return "missing", missing[0], len(missing)
    unexpected = sorted(state.keys() - expected.keys())
    if unexpected:
        return "unexpected", unexpected[0], len(unexpected)
    for k in sorted(expected):
        if tuple(state[k].shape) != tuple(expected[k].shape):
            return "shape", k, 1
    return None


class RunLock:
    """An exclusive, advisory lock on a run directory (``RUN_DIR/.lock``) naming its holder.

    A second process that tries to take it gets :class:`RunLockedError` naming the holder's pid
    and host. The lock is released when the holder exits, even on SIGKILL (``fcntl.flock``).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fh: Any = None

    def __enter__(self) -> RunLock:
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
