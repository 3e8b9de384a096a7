"""The :class:`Volume` every MRI reader returns, and the input checks and limits the readers share.

Sizes are checked from the header (:func:`check_size`, :data:`MAX_BYTES`) before any voxel buffer is
allocated; compressed voxel data that claims a suspicious expansion is decompressed once in bounded memory
(:func:`check_stream`, :data:`SUSPICIOUS_RATIO`); every failure is an
:class:`~endodistill.errors.InputError` with one short reason (:func:`one_line`).
:func:`quiet_stderr` and :func:`keep_locale` wrap library calls that print to C stderr or change the locale.
No format library is imported here.
"""

from __future__ import annotations

import contextlib
import gzip
import locale
import os
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from endodistill.errors import InputError

#: Largest voxel buffer (bytes, as float32) a reader agrees to allocate. Checked against the header first.
MAX_BYTES = 2 * 1024**3
#: Compressed voxel data that claims to expand more than this many times is decompressed once, in bounded
#: memory, to check that it really holds what the header says before the voxel buffer is allocated (a 1 KB
#: file claiming gigabytes must not cost gigabytes). Real MRI compresses 2-10x.
SUSPICIOUS_RATIO = 64
_CHUNK = 1 << 20

# LPS (DICOM/ITK) <-> RAS (nibabel) world axes differ by the sign of x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D scan in file voxel order.

    Attributes:
        array: float32 voxels, shape (I, J, K), in the order the file stores them (rescale applied).
        affine: 4x4 voxel -> RAS world (mm) matrix, nibabel convention.
        source: the path the volume was read from.
        format: a :data:`~endodistill.data.mri.FORMATS` name (``nifti``, ``analyze``, ``mgh``, ``minc``,
            ``parrec``, ``afni``, ``metaimage``, ``nrrd``, ``gipl``, ``vtk``) or ``dicom``.
        meta: technical facts only (no patient identifiers).
        reader: the library and loader that read it, e.g. ``nibabel MGHImage``, ``SimpleITK MINCImageIO``,
            ``pydicom enhanced multi-frame`` (shown by ``endodistill inspect``).
    """

    array: np.ndarray
    affine: np.ndarray
    source: str
    format: str
    meta: dict[str, Any] = field(default_factory=dict)
    reader: str = ""

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along I, J, K (column norms of the affine)."""
        s = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return (float(s[0]), float(s[1]), float(s[2]))


def one_line(text: object, limit: int = 160, path: str | Path | None = None) -> str:
    """Collapse a library's (often multi-line) message into one short line.

    Args:
        text: the message.
        limit: maximum length (longer messages end in ``...``).
        path: a path to shorten to its name (the error already starts with the full path).
    """
    s = str(text)
    if path is not None:
        s = s.replace(str(path), Path(path).name)
    s = re.sub(r"\s+", " ", s).strip()
    return s if len(s) <= limit else s[: limit - 3] + "..."


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence C-level stderr (ITK's MetaIO prints parse errors there) so a bad file stays one line."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured): nothing to silence
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


@contextlib.contextmanager
def keep_locale() -> Iterator[None]:
    """Restore the process locale after a library call that changes it.

    ITK's VTK reader (SimpleITK 2.5) leaves the C locale at ``C``, which turns Python's default text encoding
    into ASCII for the rest of the process; every SimpleITK read is wrapped in this.
    """
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        if locale.setlocale(locale.LC_ALL) != saved:
            locale.setlocale(locale.LC_ALL, saved)


def check_size(path: Path, shape: tuple[int, ...], what: str = "volume") -> None:
    """Refuse a header whose voxel buffer (as float32) would exceed :data:`MAX_BYTES`."""
    if any(int(s) <= 0 for s in shape):
        raise InputError(path, f"empty {what} (shape {tuple(int(s) for s in shape)})")
    n = 1
    for s in shape:
        n *= int(s)  # Python ints: no overflow for absurd headers
    if n * 4 > MAX_BYTES:
        raise InputError(
            path,
            f"header claims {'x'.join(str(int(s)) for s in shape)} voxels "
            f"({n * 4 / 1024**3:.3g} GiB as float32), more than the {MAX_BYTES / 1024**3:.3g} GiB limit",
        )


def spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Keep three spatial axes: trailing singleton axes are dropped, anything else is refused."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise InputError(path, f"{len(shape)}D image (shape {shape}); an MRI volume must be 3D")
    extra = shape[3:]
    if any(s != 1 for s in extra):
        raise InputError(path, f"{len(shape)}D image (shape {shape}); give a single 3D volume")
    return shape[0], shape[1], shape[2]


def check_finite(path: Path, arr: np.ndarray) -> None:
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise InputError(path, f"{bad} NaN/inf voxel(s)")


def check_affine(path: Path, affine: np.ndarray) -> None:
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(path, "voxel-to-world affine is missing or not finite")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "voxel-to-world affine is singular (zero spacing or degenerate direction)")


def _decompressed_size(fh: Any, limit: int) -> int:
    """Bytes the zlib/gzip stream at ``fh``'s position expands to, counted up to ``limit`` in bounded memory.

    Concatenated gzip members are followed. Raises ``zlib.error`` on a corrupt stream.
    """
    d = zlib.decompressobj(zlib.MAX_WBITS | 32)  # | 32: zlib or gzip header, detected
    total = 0
    while total < limit:
        data = fh.read(_CHUNK)
        if not data:
            break
        while data and total < limit:
            total += len(d.decompress(data, _CHUNK))  # at most 1 MiB of output at a time
            data = d.unconsumed_tail
            if d.eof:  # the next gzip member, if any
                data = d.unused_data + data
                d = zlib.decompressobj(zlib.MAX_WBITS | 32)
                if not data.strip(b"\0"):  # trailing padding, not another member
                    return total
    return total


def require_bytes(path: Path, have: int, need: int, compressed: bool = False) -> None:
    if have < need:
        got = f"the compressed data expands to {have}" if compressed else f"the file holds {have}"
        raise InputError(
            path,
            f"truncated or corrupt voxel data: the header needs {need} bytes, {got} "
            "(refused before allocating the volume)",
        )


def check_stream(path: Path, fh: Any, need: int, compressed_bytes: int, force: bool = False) -> None:
    """Refuse compressed voxel data that expands to fewer than ``need`` bytes.

    Checked only when the claimed expansion is suspicious (or ``force``): ordinary files pay nothing.
    """
    if not force and need <= SUSPICIOUS_RATIO * max(compressed_bytes, 1):
        return
    try:
        have = _decompressed_size(fh, need)
    except zlib.error:
        raise InputError(path, "corrupt compressed voxel data") from None
    require_bytes(path, have, need, compressed=True)


def check_file(path: Path) -> None:
    if not path.is_file():
        raise InputError(path, "not a file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def gzip_head(path: Path, n: int, what: str) -> bytes:
    """The first ``n`` decompressed bytes of a file named ``.gz``/``.mgz`` (refused when not gzip)."""
    if not is_gzip(path):
        raise InputError(path, f"not gzip-compressed although named {path.suffix} (not a {what} file?)")
    try:
        with gzip.open(path, "rb") as gz:
            return gz.read(n)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError):
        raise InputError(path, "truncated or corrupt gzip stream") from None
