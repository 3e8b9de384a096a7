"""MRI volume readers: the 3D formats of nibabel and SimpleITK, and DICOM (series or enhanced multi-frame).

One table, :data:`FORMATS`, maps a file suffix to its reader: NIfTI-1/2 (also as ``.hdr``/``.img`` pairs),
Analyze 7.5, MGH/MGZ, MINC1, PAR/REC and AFNI are read by nibabel; MINC2 (nibabel would need h5py),
MetaImage, NRRD, GIPL and VTK by SimpleITK; a DICOM series folder, or a single enhanced multi-frame MR/CT
file, by pydicom.

Every reader returns a :class:`Volume` whose ``affine`` maps voxel indices (file order I, J, K) to RAS
world millimetres, in nibabel's convention: for nibabel's image classes it is nibabel's own ``affine``;
for SimpleITK's LPS images the x and y axes are flipped (MINC, whose world space is RAS already and which
ITK reports unconverted, is the exception); for a DICOM series it is the affine nibabel reports for the
SimpleITK NIfTI conversion of the same series, so heatmaps written on that grid overlay in Slicer. Analyze
7.5 has no orientation field: nibabel's affine for it is a guess from the voxel sizes (x flipped as for
radiological storage; origin from SPM's origin field or the volume centre), noted in ``meta``.

Broken or hostile inputs become :class:`~endodistill.errors.InputError` with one short reason; sizes
are checked from the header before any voxel buffer is allocated, so an absurd header fails fast.
Inputs are only ever opened for reading.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import locale
import logging
import os
import re
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from endodistill.errors import InputError

# _LAZY: the format libraries (nibabel, pydicom, SimpleITK, pynrrd) are imported inside the reader that
# needs them, not here.
# This module is imported on the torch-free paths that must start fast (reading a manifest, content
# hashes, `predict` checking its inputs and model directory) for its suffix lists and checks, which
# need none of them.

log = logging.getLogger(__name__)

#: Largest voxel buffer (bytes, as float32) a reader agrees to allocate. Checked against the header first.
MAX_BYTES = 2 * 1024**3
#: Compressed voxel data that claims to expand more than this many times is decompressed once, in bounded
#: memory, to check that it really holds what the header says before the voxel buffer is allocated (a 1 KB
#: file claiming gigabytes must not cost gigabytes). Real MRI compresses 2-10x.
SUSPICIOUS_RATIO = 64
_CHUNK = 1 << 20

# LPS (DICOM/ITK) <-> RAS (nibabel) world axes differ by the sign of x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# DICOM attributes that are technical and safe to keep; everything else (names, ids, dates,
# institution, UIDs) is dropped so that no patient identifier reaches logs, reports or outputs.
_SAFE_DICOM_FIELDS = (
    "Modality",
    "SeriesDescription",
    "Manufacturer",
    "ManufacturerModelName",
    "MagneticFieldStrength",
    "SliceThickness",
    "SpacingBetweenSlices",
    "RepetitionTime",
    "EchoTime",
    "FlipAngle",
    "BodyPartExamined",
    "MRAcquisitionType",
    "ScanningSequence",
    "PhotometricInterpretation",
)


@dataclass
class Volume:
    """A 3D scan in file voxel order.

    Attributes:
        array: float32 voxels, shape (I, J, K), in the order the file stores them (rescale applied).
        affine: 4x4 voxel -> RAS world (mm) matrix, nibabel convention.
        source: the path the volume was read from.
        format: a :data:`FORMATS` name (``nifti``, ``analyze``, ``mgh``, ``minc``, ``parrec``, ``afni``,
            ``metaimage``, ``nrrd``, ``gipl``, ``vtk``) or ``dicom``.
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


def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` is a file with the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def volume_format(path: str | Path) -> str | None:
    """The :data:`FORMATS` reader that handles ``path``, ``dicom`` (a folder or a DICOM file), or None."""
    p = Path(path)
    if p.is_dir():
        return "dicom"
    name = p.name.lower()
    for fmt in FORMATS:
        if name.endswith(fmt.suffixes + fmt.data_suffixes):
            return fmt.name
    if p.is_file() and is_dicom_file(p):
        return "dicom"
    return None


_HASH_CHUNK = 1 << 20

_PAIRS = ((".hdr", (".img", ".img.gz")), (".par", (".rec",)), (".head", (".brik", ".brik.gz")))


def companion_files(path: str | Path) -> list[Path]:
    """The other existing files of a header/data pair (``x.hdr`` -> ``x.img``, ``x.PAR`` -> ``x.REC``, ...).

    A volume's content is all of its files: hashes (cache keys, duplicate detection) must cover them too.
    """
    p = Path(path)
    name = p.name
    low = name.lower()
    out: list[Path] = []
    for head, datas in _PAIRS:
        for a, others in ((head, datas), *((d, (head,)) for d in datas)):
            if low.endswith(a):
                stem = name[: -len(a)]
                for o in others:
                    for cand in (o, o.upper()):
                        c = p.with_name(stem + cand)
                        if c.is_file() and c not in out and c != p:
                            out.append(c)
                return out
    return out


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (sorted by name) for DICOM series folders.

    A header of a header/data pair (Analyze ``.hdr``/``.img``, PAR/REC, AFNI) is hashed with its data file,
    so that two volumes with identical headers differ; a single file's hash is that of its bytes alone.
    """
    path = Path(path)
    h = hashlib.sha256()
    files = (
        sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path, *companion_files(path)]
    )
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
                h.update(chunk)
    return h.hexdigest()


def supported_formats() -> str:
    """The readable volume formats, for messages (``.nii/.nii.gz, .hdr/.img, ...``)."""
    return ", ".join("/".join(f.suffixes + f.data_suffixes) for f in FORMATS) + " or a DICOM series folder"


def load_volume(path: str | Path, series_uid: str | None = None) -> Volume:
    """Read one MRI volume.

    Args:
        path: a file of a :data:`FORMATS` format (NIfTI, Analyze, MGH/MGZ, MINC, PAR/REC, MetaImage, NRRD),
            a DICOM series folder, or one enhanced multi-frame MR/CT DICOM file.
        series_uid: for a folder holding several DICOM series, the SeriesInstanceUID to read.

    Returns:
        The :class:`Volume` (float32 voxels in file order, RAS affine).

    Raises:
        InputError: the path is missing, of an unknown format, or the file is broken, not 3D, too
            large, or holds NaN/inf voxels. The reason is one line.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file or folder")
    fmt = volume_format(p)
    if fmt is None:
        raise InputError(p, f"unsupported MRI format (use {supported_formats()})")
    if fmt != "dicom" and series_uid:
        log.debug("%s: series_uid ignored for a %s file", p, fmt)
    if fmt != "dicom":
        vol = _FORMATS_BY_NAME[fmt].load(p)
    elif p.is_dir():
        vol = _load_dicom_series(p, series_uid)
    else:
        vol = _load_dicom_file(p)
    _check_finite(p, vol.array)
    _check_affine(p, vol.affine)
    vol.meta.setdefault("shape", list(vol.array.shape))
    vol.meta.setdefault("spacing", [round(s, 6) for s in vol.spacing])
    return vol


# --------------------------------------------------------------------------------------- checks


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


def _check_size(path: Path, shape: tuple[int, ...], what: str = "volume") -> None:
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


def _spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Keep three spatial axes: trailing singleton axes are dropped, anything else is refused."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise InputError(path, f"{len(shape)}D image (shape {shape}); an MRI volume must be 3D")
    extra = shape[3:]
    if any(s != 1 for s in extra):
        raise InputError(path, f"{len(shape)}D image (shape {shape}); give a single 3D volume")
    return shape[0], shape[1], shape[2]


def _check_finite(path: Path, arr: np.ndarray) -> None:
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise InputError(path, f"{bad} NaN/inf voxel(s)")


def _check_affine(path: Path, affine: np.ndarray) -> None:
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


def _require_bytes(path: Path, have: int, need: int, compressed: bool = False) -> None:
    if have < need:
        got = f"the compressed data expands to {have}" if compressed else f"the file holds {have}"
        raise InputError(
            path,
            f"truncated or corrupt voxel data: the header needs {need} bytes, {got} "
            "(refused before allocating the volume)",
        )


def _check_stream(path: Path, fh: Any, need: int, compressed_bytes: int, force: bool = False) -> None:
    """Refuse compressed voxel data that expands to fewer than ``need`` bytes.

    Checked only when the claimed expansion is suspicious (or ``force``): ordinary files pay nothing.
    """
    if not force and need <= SUSPICIOUS_RATIO * max(compressed_bytes, 1):
        return
    try:
        have = _decompressed_size(fh, need)
    except zlib.error:
        raise InputError(path, "corrupt compressed voxel data") from None
    _require_bytes(path, have, need, compressed=True)


# ---------------------------------------------------------------------------------------- NIfTI


def _check_nifti_magic(path: Path, head: bytes) -> None:
    """NIfTI-1 (sizeof_hdr 348, magic n+1/ni1 at 344) or NIfTI-2 (540, n+2/ni2 at 4), either endianness."""
    if len(head) >= 348 and head[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c"):
        if head[344:348] in (b"n+1\0", b"ni1\0"):
            return
        raise InputError(path, "wrong magic: NIfTI-1 header without the n+1/ni1 signature")
    if len(head) >= 540 and head[:4] in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c"):
        if head[4:8] in (b"n+2\0", b"ni2\0"):
            return
        raise InputError(path, "wrong magic: NIfTI-2 header without the n+2/ni2 signature")
    if len(head) < 348:
        raise InputError(path, f"too short for a NIfTI header ({len(head)} bytes; truncated?)")
    raise InputError(path, "wrong magic: not a NIfTI-1/NIfTI-2 file")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise InputError(path, "not a file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _gzip_head(path: Path, n: int, what: str) -> bytes:
    """The first ``n`` decompressed bytes of a file named ``.gz``/``.mgz`` (refused when not gzip)."""
    if not _is_gzip(path):
        raise InputError(path, f"not gzip-compressed although named {path.suffix} (not a {what} file?)")
    try:
        with gzip.open(path, "rb") as gz:
            return gz.read(n)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError):
        raise InputError(path, "truncated or corrupt gzip stream") from None


def _nibabel_load(path: Path, what: str, loader: Callable[[str], Any] | None = None) -> Any:
    """``nib.load`` (or ``loader``) with its errors as one line; voxels stay on disk until read."""
    import nibabel as nib  # on use: see _LAZY

    try:
        with warnings.catch_warnings():  # PAR/REC and Analyze headers warn about every odd field
            warnings.simplefilter("ignore")
            return (loader or nib.load)(str(path))
    except FileNotFoundError as e:
        missing = Path(e.filename).name if e.filename else "its data file"
        raise InputError(path, f"not a readable {what} file (missing data file {missing})") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise InputError(path, f"truncated or corrupt compressed data ({one_line(e, 80, path)})") from None
    except Exception as e:  # nibabel's parsers raise many types (ImageFileError, HeaderDataError, ...)
        raise InputError(path, f"not a readable {what} file ({one_line(e, 100, path)})") from None


def _check_proxy_data(path: Path, proxy: Any, n_vox: int, itemsize: int) -> None:
    """Check that the data file behind a nibabel array proxy holds what the header needs, before reading it.

    Plain ``ArrayProxy`` (NIfTI, Analyze, MGH) gives its file and offset; PAR/REC's proxy its REC file. Other
    proxies (MINC1's netCDF variable) are left to the read, whose errors are caught.
    """
    target = getattr(proxy, "file_like", None) or getattr(proxy, "_file_like", None)
    if not isinstance(target, str):
        return
    data = Path(target)
    if not data.is_file():
        raise InputError(path, f"missing data file {data.name}")
    offset = getattr(proxy, "offset", 0) if type(proxy).__name__ == "ArrayProxy" else 0
    need = int(offset) + n_vox * itemsize
    size = data.stat().st_size
    if _is_gzip(data):
        with open(data, "rb") as fh:
            _check_stream(data, fh, need, size)
    else:
        _require_bytes(data, size, need)


def _nibabel_volume(path: Path, img: Any, fmt: str, meta: dict[str, Any] | None = None) -> Volume:
    """The :class:`Volume` of a loaded nibabel image: one geometry path for every nibabel format.

    The size is checked from the header, and the data file's length against it, before any voxel is read;
    the affine is nibabel's (RAS world).
    """
    hdr = img.header
    full_shape = tuple(int(v) for v in img.shape)
    shape = _spatial_shape(path, full_shape)
    _check_size(path, full_shape)
    dtype = np.dtype(hdr.get_data_dtype())
    if dtype.fields is not None or dtype.kind == "c":
        raise InputError(path, f"unsupported voxel type {dtype} (RGB/complex); need scalar intensities")
    n_vox = int(np.prod(full_shape, dtype=object))
    _check_proxy_data(path, img.dataobj, n_vox, dtype.itemsize)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = np.asarray(img.dataobj, dtype=np.float32)
    except (
        Exception
    ) as e:  # zlib, EOF, OSError, ValueError, scipy's netCDF errors: all mean a broken data part
        raise InputError(path, f"truncated or corrupt voxel data ({one_line(e, 80, path)})") from None
    arr = np.ascontiguousarray(arr.reshape(shape))
    affine = np.asarray(img.affine, dtype=np.float64)
    out: dict[str, Any] = {"dtype": str(dtype)}
    out.update(meta or {})
    return Volume(
        array=arr,
        affine=affine,
        source=str(path),
        format=fmt,
        meta=out,
        reader=f"nibabel {type(img).__name__}",
    )


def _nifti_meta(img: Any) -> dict[str, Any]:
    import nibabel as nib  # on use: see _LAZY

    version = 2 if isinstance(img, nib.Nifti2Image | nib.Nifti2Pair) else 1
    hdr = img.header
    return {
        "nifti_version": version,
        "sform_code": int(hdr["sform_code"]),
        "qform_code": int(hdr["qform_code"]),
    }


def _load_nifti(path: Path) -> Volume:
    import nibabel as nib  # on use: see _LAZY

    _check_file(path)
    if path.name.lower().endswith(".gz"):
        head = _gzip_head(path, 540, "NIfTI")
    else:
        with open(path, "rb") as fh:
            head = fh.read(540)
    _check_nifti_magic(path, head)
    img = _nibabel_load(path, "NIfTI")
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    # The proxy's offset is where nibabel reads (352 for a single .nii whose header says 0); checked below.
    return _nibabel_volume(path, img, "nifti", _nifti_meta(img))


def _pair_header(path: Path) -> Path:
    """The ``.hdr`` of an Analyze/NIfTI pair named by either of its files (suffix case kept)."""
    if path.suffix.lower() == ".hdr":
        return path
    return path.with_suffix(".HDR" if path.suffix.isupper() else ".hdr")


def _load_analyze(path: Path) -> Volume:
    """An Analyze 7.5 (or SPM99/SPM2 Analyze, or NIfTI pair) ``.hdr``/``.img`` pair, by nibabel."""
    import nibabel as nib  # on use: see _LAZY

    _check_file(path)
    hdr_path = _pair_header(path)
    if not hdr_path.is_file():
        raise InputError(path, f"missing header file {hdr_path.name} of the .hdr/.img pair")
    with open(hdr_path, "rb") as fh:
        head = fh.read(348)
    if len(head) < 348 or head[:4] not in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c"):
        if len(head) >= 4 and head[:4] in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c"):
            pass  # a NIfTI-2 pair header (540 bytes)
        else:
            raise InputError(hdr_path, "not an Analyze/NIfTI header (sizeof_hdr is not 348; truncated?)")
    img = _nibabel_load(path, "Analyze")
    if isinstance(img, nib.Nifti1Pair | nib.Nifti2Pair):  # NIfTI header in a pair: its real sform/qform
        return _nibabel_volume(path, img, "nifti", _nifti_meta(img))
    if not isinstance(img, nib.AnalyzeImage):
        raise InputError(path, f"not an Analyze image (nibabel read it as {type(img).__name__})")
    note = "Analyze has no orientation field: affine guessed by nibabel from the voxel sizes (x flipped)"
    return _nibabel_volume(path, img, "analyze", {"affine_note": note})


def _load_mgh(path: Path) -> Volume:
    """A FreeSurfer MGH (``.mgh``) or gzip-compressed MGZ (``.mgz``) volume, by nibabel."""
    import nibabel as nib  # on use: see _LAZY

    _check_file(path)
    if path.name.lower().endswith((".mgz", ".gz")):
        head = _gzip_head(path, 20, "MGZ")
    else:
        with open(path, "rb") as fh:
            head = fh.read(20)
    if head[:4] != b"\x00\x00\x00\x01":  # version 1, big-endian int32
        raise InputError(path, "wrong magic: not an MGH file (version field is not 1)")
    if len(head) < 20:
        raise InputError(path, f"too short for an MGH header ({len(head)} bytes; truncated?)")
    # Width, height, depth, frames: checked here, as nibabel seeks past the data to its footer on load.
    _check_size(path, tuple(int(d) for d in np.frombuffer(head[4:20], dtype=">i4")))
    img = _nibabel_load(path, "MGH", nib.MGHImage.from_filename)
    return _nibabel_volume(path, img, "mgh")


def _load_afni(path: Path) -> Volume:
    """An AFNI ``.HEAD``/``.BRIK`` dataset (named by either file), by nibabel (RAS affine from its header)."""
    from nibabel.brikhead import AFNIImage  # on use: see _LAZY

    _check_file(path)
    img = _nibabel_load(path, "AFNI", AFNIImage.from_filename)
    return _nibabel_volume(path, img, "afni")


_NETCDF_MAGIC = (b"CDF\x01", b"CDF\x02")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _load_minc(path: Path) -> Volume:
    """MINC1 (netCDF) by nibabel; MINC2 (HDF5) by SimpleITK, as nibabel needs h5py for it."""
    import nibabel as nib  # on use: see _LAZY

    _check_file(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] in _NETCDF_MAGIC:
        img = _nibabel_load(path, "MINC1", nib.Minc1Image.from_filename)
        return _nibabel_volume(path, img, "minc", {"minc_version": 1})
    if head == _HDF5_MAGIC:
        vol = _load_itk(path, "minc")
        vol.meta["minc_version"] = 2
        return vol
    raise InputError(path, "wrong magic: not a MINC1 (netCDF) or MINC2 (HDF5) file")


def _load_parrec(path: Path) -> Volume:
    """A Philips PAR/REC pair (named by either file), by nibabel (scanner RAS affine, display values)."""
    from nibabel.parrec import PARRECImage  # on use: see _LAZY

    _check_file(path)
    img = _nibabel_load(path, "PAR/REC", PARRECImage.from_filename)
    return _nibabel_volume(path, img, "parrec")


# ------------------------------------------------------------------------------ MetaImage / NRRD

_ITK_IO = {
    "metaimage": "MetaImageIO",
    "nrrd": "NrrdImageIO",
    "minc": "MINCImageIO",
    "gipl": "GiplImageIO",
    "vtk": "VTKImageIO",
}


def _load_itk(path: Path, fmt: str) -> Volume:
    import SimpleITK as sitk  # on use: see _LAZY

    _check_file(path)
    reader = sitk.ImageFileReader()
    reader.SetImageIO(_ITK_IO[fmt])
    reader.SetFileName(str(path))
    what = "MINC2" if fmt == "minc" else fmt
    try:
        # Header first: the size check below runs before ITK allocates the pixel buffer.
        with quiet_stderr(), keep_locale():
            reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(path, f"not a readable {what} file (bad or missing header)") from None
    size = tuple(int(s) for s in reader.GetSize())[::-1]  # ITK is x-fastest; report as numpy would
    if reader.GetNumberOfComponents() != 1:
        n = reader.GetNumberOfComponents()
        if fmt == "minc":  # ITK reads a MINC2 time (or vector) dimension as pixel components
            raise InputError(
                path, f"{n} values per voxel (a 4D or vector MINC2 image); give a single 3D volume"
            )
        raise InputError(path, f"{n}-component pixels; need scalar intensities")
    dims = len(size)
    _spatial_shape(path, size[::-1])
    _check_size(path, size)
    n_vox = int(np.prod(size, dtype=object))
    if fmt == "metaimage":
        _check_metaimage_data(path, n_vox)
    elif fmt == "nrrd":
        _check_nrrd_data(path, n_vox)
    try:
        with quiet_stderr(), keep_locale():
            img = reader.Execute()
    except RuntimeError:
        raise InputError(path, "truncated or unreadable pixel data (or missing data file)") from None
    arr = sitk.GetArrayFromImage(img)  # (.., K, J, I)
    arr = arr.reshape(arr.shape[-3:]).transpose(2, 1, 0).astype(np.float32, copy=False)
    arr = np.ascontiguousarray(arr)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dims, dims)[:3, :3]
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)[:3]
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)[:3]
    world = np.eye(4)
    world[:3, :3] = direction @ np.diag(spacing)
    world[:3, 3] = origin
    # ITK's physical space is LPS, except that its MINC reader passes MINC's own world coordinates (RAS)
    # through unconverted (checked against nibabel's reading of the same files, MINC1 and MINC2).
    affine = world if fmt == "minc" else _LPS_TO_RAS @ world
    meta = {"dtype": img.GetPixelIDTypeAsString()}
    return Volume(
        array=arr, affine=affine, source=str(path), format=fmt, meta=meta, reader=f"SimpleITK {_ITK_IO[fmt]}"
    )


# MetaIO element types -> bytes (MET_LONG/ULONG: at least 4).
_MET_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_FLOAT": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_DOUBLE": 8,
}


def _nrrd_itemsize(kind: str) -> int:
    """Bytes per value of a NRRD ``type`` (every spelling the NRRD spec allows)."""
    k = kind.strip().lower().removesuffix("_t")
    if "char" in k or k.endswith("int8") or k == "block":
        return 1
    if "short" in k or k.endswith("16"):
        return 2
    if "long" in k or "double" in k or k.endswith("64"):
        return 8
    return 4  # int, int32, uint32, float


def _text_header(fh: Any, last: Callable[[bytes], bool], max_bytes: int = 1 << 20) -> list[bytes]:
    """Header lines read from ``fh`` up to and including the one ``last`` accepts (``fh`` then at the data)."""
    lines: list[bytes] = []
    n = 0
    while n < max_bytes:
        line = fh.readline(max_bytes - n)
        if not line:
            break
        n += len(line)
        lines.append(line)
        if last(line):
            break
    return lines


def _check_metaimage_data(path: Path, n_vox: int) -> None:
    """Check that a MetaImage's voxel data is all there before ITK allocates the buffer.

    ITK's MetaIO zero-fills compressed data that ends early (truncated, or a tiny hostile file whose
    header claims gigabytes) instead of failing, so the decompressed length is checked here; it is
    written by hand because no maintained Python library reads MetaImage headers besides ITK itself.
    """
    with open(path, "rb") as fh:
        lines = _text_header(fh, lambda ln: ln.split(b"=")[0].strip().lower() == b"elementdatafile")
        fields = {}
        for ln in lines:
            key, _, value = ln.decode("latin-1").partition("=")
            fields[key.strip().lower()] = value.strip()
        ch = fields.get("elementnumberofchannels", "1")
        channels = int(ch) if ch.isdigit() and int(ch) > 0 else 1
        need = n_vox * channels * _MET_BYTES.get(fields.get("elementtype", "").upper(), 1)
        compressed = fields.get("compresseddata", "false").lower() == "true"
        if compressed and "compresseddatasize" not in fields:
            # Without it, ITK's MetaIO returns zeros instead of the voxels (checked with SimpleITK 2.5).
            raise InputError(
                path, "compressed MetaImage without CompressedDataSize: ITK cannot decode it reliably"
            )
        data_file = fields.get("elementdatafile", "")
        if data_file.upper() == "LOCAL":
            start = fh.tell()
            size = path.stat().st_size - start
            if compressed:
                _check_stream(path, fh, need, size, force=True)
            else:
                _require_bytes(path, size, need)
            return
    # Detached data (.mhd + .raw/.zraw): one file only; lists and patterns are left to ITK.
    target = path.parent / data_file
    if not data_file or data_file.upper() == "LIST" or "%" in data_file or not target.is_file():
        return
    with open(target, "rb") as fh:
        if compressed:
            _check_stream(target, fh, need, target.stat().st_size, force=True)
        else:
            _require_bytes(target, target.stat().st_size, need)


def _check_nrrd_data(path: Path, n_vox: int) -> None:
    """Check that a NRRD file's attached raw or gzip data is all there before ITK allocates the buffer."""
    import nrrd  # on use: see _LAZY

    with open(path, "rb") as fh:
        lines = _text_header(fh, lambda ln: ln.strip() == b"")
        start = fh.tell()
        try:
            header = nrrd.read_header([ln.decode("latin-1") for ln in lines])
        except Exception:  # ITK parsed it already; pynrrd is only asked for a few fields
            return
        if any(
            k in header for k in ("data file", "datafile", "byte skip", "byteskip", "line skip", "lineskip")
        ):
            return  # detached or offset data: left to ITK
        need = n_vox * _nrrd_itemsize(str(header.get("type", "")))
        encoding = str(header.get("encoding", "raw")).lower()
        size = path.stat().st_size - start
        if encoding == "raw":
            _require_bytes(path, size, need)
        elif encoding in ("gzip", "gz"):
            _check_stream(path, fh, need, size)


# ---------------------------------------------------------------------------------------- DICOM


def _dicom_headers(folder: Path) -> list[tuple[Path, Any]]:
    """Headers of every DICOM file under ``folder`` (large values such as pixel data left on disk)."""
    import pydicom  # on use: see _LAZY
    from pydicom.errors import InvalidDicomError  # on use: see _LAZY

    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts[-1:])
    )
    out = []
    for f in files:
        try:
            # defer_size keeps pixel data unread (bounded memory) while "PixelData" in ds still works.
            ds = pydicom.dcmread(f, defer_size=4096)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not a DICOM file (README, DICOMDIR fragments, ...): ignored
        if "SeriesInstanceUID" not in ds or "SOPClassUID" not in ds:
            continue  # DICOMDIR and other non-image objects
        out.append((f, ds))
    return out


def describe_series(folder: str | Path) -> list[dict[str, Any]]:
    """The DICOM series in a folder: uid, description, modality, number of files (for messages/inspect)."""
    by_uid: dict[str, dict[str, Any]] = {}
    for _, ds in _dicom_headers(Path(folder)):
        uid = str(ds.SeriesInstanceUID)
        d = by_uid.setdefault(
            uid,
            {
                "uid": uid,
                "description": str(ds.get("SeriesDescription", "") or ""),
                "modality": str(ds.get("Modality", "") or ""),
                "files": 0,
            },
        )
        d["files"] += 1
    return sorted(by_uid.values(), key=lambda d: d["uid"])


def _plain(val: Any) -> Any:
    """A pydicom value as a plain JSON-friendly Python value."""
    if isinstance(val, float):
        return float(val)
    if isinstance(val, int):
        return int(val)
    if isinstance(val, list | tuple) or type(val).__name__ == "MultiValue":
        return "\\".join(str(v) for v in val)
    return str(val)


def _ds_floats(ds: Any, keyword: str, n: int, f: Path, prefix: str = "") -> np.ndarray:
    val = None if ds is None else ds.get(keyword)
    if val is None:
        raise InputError(f, f"{prefix}missing {keyword} tag; cannot place the slice in space")
    try:
        arr = np.asarray([float(v) for v in val], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f, f"{prefix}unreadable {keyword} tag") from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise InputError(f, f"{prefix}malformed {keyword} tag ({n} numbers expected)")
    return arr


def _check_native_pixel_length(f: Path, ds: Any, rows_cols: tuple[int, int], frames: int = 1) -> None:
    """Uncompressed pixel data must hold frames x Rows x Columns values: checked from the header, before decoding."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None or tsyntax.is_compressed:
        return
    elem = ds.get_item("PixelData")
    have = getattr(elem, "length", None)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    need = frames * rows_cols[0] * rows_cols[1] * int(ds.get("SamplesPerPixel", 1) or 1) * bits // 8
    if isinstance(have, int) and 0 <= have < need and have != 0xFFFFFFFF:
        what = f"{frames} frames of " if frames > 1 else ""
        raise InputError(
            f,
            f"cannot decode pixel data: it holds {have} bytes, {what}{rows_cols[0]}x{rows_cols[1]} pixels need "
            f"{need} (truncated?)",
        )


@dataclass
class _Slice:
    """One 2D image of a stack: a file of a series, or a frame of a multi-frame file."""

    where: Path  # the file errors name
    label: str  # the file's name, or "frame N"
    iop: np.ndarray
    ipp: np.ndarray
    ps: np.ndarray
    rc: tuple[int, int]
    index: int = 0  # frame index in its file
    slope: float = 1.0
    intercept: float = 0.0
    ds: Any = None

    @property
    def prefix(self) -> str:
        return "" if self.label == self.where.name else f"{self.label}: "


def _stack_geometry(where: Path, slices: list[_Slice]) -> tuple[list[_Slice], np.ndarray, float]:
    """Sort 2D images into a volume by position along their normal, checking that they form one.

    Returns:
        The slices in spatial order, the LPS voxel-to-world matrix (I along a row, J along a column, K the
        measured step between slices) and the median slice gap.
    """
    first = slices[0]
    for sl in slices[1:]:
        if sl.rc != first.rc:
            raise InputError(
                sl.where,
                f"{sl.prefix}slice size {sl.rc[0]}x{sl.rc[1]} differs from {first.rc[0]}x{first.rc[1]}",
            )
        if not np.allclose(sl.iop, first.iop, atol=1e-4):
            raise InputError(sl.where, f"{sl.prefix}slice orientation differs from the rest of the series")
        if not np.allclose(sl.ps, first.ps, rtol=1e-4):
            raise InputError(sl.where, f"{sl.prefix}pixel spacing differs from the rest of the series")
    row_cos, col_cos = first.iop[:3], first.iop[3:]
    normal = np.cross(row_cos, col_cos)
    if np.linalg.norm(normal) < 0.5:
        raise InputError(
            first.where, f"{first.prefix}degenerate ImageOrientationPatient (row and column not orthogonal)"
        )
    normal /= np.linalg.norm(normal)
    if len(slices) < 2:
        raise InputError(where, "only one slice in the series (2D image); an MRI volume must be 3D")
    # Sort by position along the slice normal (file names, InstanceNumber and frame order are not reliable).
    slices = sorted(slices, key=lambda e: float(np.dot(e.ipp, normal)))
    pos = np.asarray([float(np.dot(e.ipp, normal)) for e in slices])
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        i = int(np.argmin(gaps))
        a, b = slices[i], slices[i + 1]
        raise InputError(
            b.where,
            f"two slices at the same position ({a.label}, {b.label}): several echoes/time points in one series?",
        )
    med = float(np.median(gaps))
    if not np.allclose(gaps, med, rtol=0.01, atol=1e-3):
        raise InputError(
            where,
            f"inconsistent slice spacing ({gaps.min():.3g} to {gaps.max():.3g} mm): missing or extra slices",
        )
    lps = np.eye(4)
    lps[:3, 0] = row_cos * first.ps[1]  # PixelSpacing = (between rows, between columns)
    lps[:3, 1] = col_cos * first.ps[0]
    # The measured step between sorted slices (equals normal * spacing unless the stack is sheared).
    lps[:3, 2] = (slices[-1].ipp - slices[0].ipp) / (len(slices) - 1)
    lps[:3, 3] = slices[0].ipp
    return slices, lps, med


def _dicom_meta(ds0: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key in _SAFE_DICOM_FIELDS:
        if key in ds0 and ds0.get(key) not in (None, ""):
            meta[key] = _plain(ds0.get(key))
    meta["dtype"] = f"{'int' if int(ds0.get('PixelRepresentation', 0) or 0) else 'uint'}{ds0.BitsAllocated}"
    return meta


def _rows_cols(f: Path, ds: Any) -> tuple[int, int]:
    try:
        rc = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    except (TypeError, ValueError):
        rc = (0, 0)
    if min(rc) <= 0:
        raise InputError(f, "missing or zero Rows/Columns")
    return rc


def _load_dicom_series(folder: Path, series_uid: str | None) -> Volume:
    import pydicom  # on use: see _LAZY

    headers = _dicom_headers(folder)
    if not headers:
        n_files = sum(1 for p in folder.rglob("*") if p.is_file())
        if n_files == 0:
            raise InputError(folder, "empty folder (no DICOM files)")
        raise InputError(folder, f"no DICOM image files among the {n_files} file(s) in this folder")
    series: dict[str, list[tuple[Path, Any]]] = {}
    for f, ds in headers:
        series.setdefault(str(ds.SeriesInstanceUID), []).append((f, ds))

    def listing() -> str:
        return "; ".join(
            f"{uid} ({items[0][1].get('SeriesDescription', '') or 'no description'}, {len(items)} files)"
            for uid, items in sorted(series.items())
        )

    if series_uid:
        if series_uid not in series:
            raise InputError(folder, f"no series with SeriesInstanceUID {series_uid}; found: {listing()}")
        items = series[series_uid]
    elif len(series) > 1:
        raise InputError(
            folder,
            f"{len(series)} DICOM series in one folder; choose one with the manifest's series_uid column: "
            f"{listing()}",
        )
    else:
        items = next(iter(series.values()))

    multi = [(f, ds) for f, ds in items if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi and len(items) == 1:  # a folder holding one multi-frame file: that file is the volume
        f, ds = multi[0]
        if dicom_kind(ds) != "volume":
            raise InputError(f, f"{dicom_description(ds)}, not an MRI volume")
        return _load_enhanced(f)
    if multi:
        raise InputError(
            multi[0][0],
            f"multi-frame DICOM among the {len(items)} files of the series; give the multi-frame file "
            "itself (an enhanced MR/CT file holds the whole volume)",
        )

    # Geometry of every slice; every check names the offending file.
    slices = []
    for f, ds in items:
        if "PixelData" not in ds:
            raise InputError(f, "no pixel data in this DICOM file")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise InputError(f, "colour DICOM image; an MRI series must be grayscale")
        iop = _ds_floats(ds, "ImageOrientationPatient", 6, f)
        ipp = _ds_floats(ds, "ImagePositionPatient", 3, f)
        ps = _ds_floats(ds, "PixelSpacing", 2, f)
        rc = _rows_cols(f, ds)
        _check_native_pixel_length(f, ds, rc)
        slices.append(_Slice(where=f, label=f.name, iop=iop, ipp=ipp, ps=ps, rc=rc, ds=ds))
    slices, lps, med = _stack_geometry(folder, slices)
    rows, cols = slices[0].rc
    _check_size(folder, (cols, rows, len(slices)))

    arr: np.ndarray | None = None
    for k, sl in enumerate(slices):
        f = sl.where
        try:
            ds = pydicom.dcmread(f)
            px = ds.pixel_array
        except Exception as e:  # decoders raise many types (ValueError, RuntimeError, NotImplementedError)
            raise InputError(f, f"cannot decode pixel data ({one_line(e, 100, f)})") from None
        if px.shape != (rows, cols):
            raise InputError(f, f"pixel data shape {px.shape} does not match Rows/Columns {rows}x{cols}")
        if arr is None:  # allocated once a slice decodes: a series of broken slices costs no volume buffer
            arr = np.empty((cols, rows, len(slices)), dtype=np.float32)
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        # DICOM pixel (row r, column c) is voxel (i=c, j=r): the I axis runs along a row, as in ITK.
        arr[:, :, k] = (px.astype(np.float32) * np.float32(slope) + np.float32(intercept)).T

    assert arr is not None  # len(slices) >= 2
    meta: dict[str, Any] = {"n_files": len(slices), "slice_gap_mm": round(med, 6)}
    meta.update(_dicom_meta(slices[0].ds))
    return Volume(
        array=arr,
        affine=_LPS_TO_RAS @ lps,
        source=str(folder),
        format="dicom",
        meta=meta,
        reader="pydicom series",
    )


# ------------------------------------------------------------------------- single DICOM files

#: Storage SOP classes whose one file holds a whole MR/CT volume, with per-frame geometry in functional groups.
ENHANCED_VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
_VOLUME_MODALITIES = ("MR", "CT")


def _has_plane_positions(ds: Any) -> bool:
    pf = ds.get("PerFrameFunctionalGroupsSequence")
    return bool(pf) and "PlanePositionSequence" in pf[0]


def dicom_kind(ds: Any) -> str:
    """``volume`` or ``clip`` for one DICOM file's header: by SOP class, modality and content, not file count.

    Enhanced MR/CT storage, an MR/CT modality, or per-frame plane positions (outside ultrasound) make a
    volume; anything else (ultrasound, secondary capture, unknown) is read as a cine clip.
    """
    sop = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "").upper()
    if sop in ENHANCED_VOLUME_SOP_CLASSES or modality in _VOLUME_MODALITIES:
        return "volume"
    if modality != "US" and _has_plane_positions(ds):
        return "volume"
    return "clip"


def dicom_file_kind(path: str | Path) -> str:
    """:func:`dicom_kind` of a DICOM file; ``clip`` when the header cannot be read (the clip reader says why)."""
    import pydicom  # on use: see _LAZY

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # unreadable: left to the reader, which reports it as one line
        return "clip"
    return dicom_kind(ds)


def dicom_description(ds: Any) -> str:
    """A few words for what a DICOM file is, e.g. ``an ultrasound cine (Ultrasound Multi-frame Image Storage)``."""
    sop = str(ds.get("SOPClassUID", "") or "")
    name = ENHANCED_VOLUME_SOP_CLASSES.get(sop) or getattr(ds.get("SOPClassUID"), "name", "") or sop or "?"
    modality = str(ds.get("Modality", "") or "").upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if modality == "US" or dicom_kind(ds) == "clip":
        return f"an ultrasound {'cine' if frames > 1 else 'image'} (Modality {modality or '?'}, {name})"
    return f"an {modality or 'MR/CT'} volume ({name})"


def _load_dicom_file(path: Path) -> Volume:
    """One DICOM file as a volume: an enhanced multi-frame MR/CT file; a classic slice or a cine is refused."""
    import pydicom  # on use: see _LAZY

    _check_file(path)
    try:
        ds = pydicom.dcmread(path, defer_size=4096)
    except Exception as e:  # InvalidDicomError, EOFError, OSError, ValueError, ...
        raise InputError(path, f"not a readable DICOM file ({one_line(e, 80, path)})") from None
    if dicom_kind(ds) != "volume":
        raise InputError(path, f"{dicom_description(ds)}, not an MRI volume")
    if int(ds.get("NumberOfFrames", 1) or 1) < 2:
        raise InputError(
            path, "a single DICOM file of one slice; give the folder that holds the whole series"
        )
    return _load_enhanced(path, ds)


def _fg(groups: Any, item: Any, keyword: str) -> Any:
    """The first item of functional group ``keyword``: per-frame ``item`` first, else the shared ``groups``."""
    for src in (item, groups):
        seq = None if src is None else src.get(keyword)
        if seq:
            return seq[0]
    return None


def _load_enhanced(path: Path, ds: Any = None) -> Volume:
    """An enhanced multi-frame MR/CT DICOM file (one file, the whole volume), geometry from its functional groups.

    Each frame's ImagePositionPatient, ImageOrientationPatient and PixelSpacing come from the per-frame
    functional groups, else the shared ones (else the top-level tags of legacy files); frames are sorted along
    the slice normal exactly as the files of a series are, so both give the same affine for the same slices.
    """
    import pydicom  # on use: see _LAZY

    if ds is None:
        try:
            ds = pydicom.dcmread(path, defer_size=4096)
        except Exception as e:
            raise InputError(path, f"not a readable DICOM file ({one_line(e, 80, path)})") from None
    if "PixelData" not in ds:
        raise InputError(path, "no pixel data in this DICOM file")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputError(path, "colour DICOM image; an MRI volume must be grayscale")
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise InputError(path, "malformed NumberOfFrames") from None
    rc = _rows_cols(path, ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared_seq = ds.get("SharedFunctionalGroupsSequence") or []
    shared = shared_seq[0] if len(shared_seq) else None
    if per_frame and len(per_frame) != n_frames:
        raise InputError(
            path, f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for {n_frames} frames"
        )
    if not per_frame:
        raise InputError(
            path,
            f"multi-frame DICOM ({n_frames} frames) without PerFrameFunctionalGroupsSequence: "
            "no per-frame positions to place the frames in space",
        )
    _check_size(path, (rc[1], rc[0], n_frames))
    _check_native_pixel_length(path, ds, rc, n_frames)

    top = (float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0))
    slices = []
    for k, item in enumerate(per_frame):
        prefix = f"frame {k + 1}: "
        # Position is per frame; orientation, spacing and rescale usually shared (legacy files: top level).
        ipp = _ds_floats(_fg(shared, item, "PlanePositionSequence"), "ImagePositionPatient", 3, path, prefix)
        ori = _fg(shared, item, "PlaneOrientationSequence")
        iop = _ds_floats(ds if ori is None else ori, "ImageOrientationPatient", 6, path, prefix)
        mea = _fg(shared, item, "PixelMeasuresSequence")
        ps = _ds_floats(ds if mea is None else mea, "PixelSpacing", 2, path, prefix)
        pvt = _fg(shared, item, "PixelValueTransformationSequence")
        slope, intercept = top
        if pvt is not None:
            slope = float(pvt.get("RescaleSlope", slope) or slope)
            intercept = float(pvt.get("RescaleIntercept", intercept) or 0.0)
        label = f"frame {k + 1}"
        slices.append(_Slice(path, label, iop, ipp, ps, rc, index=k, slope=slope, intercept=intercept))
    slices, lps, med = _stack_geometry(path, slices)
    rows, cols = rc
    try:
        full = pydicom.dcmread(path)
        px = pydicom.pixels.pixel_array(full)
    except Exception as e:  # decoders raise many types (ValueError, RuntimeError, NotImplementedError)
        raise InputError(path, f"cannot decode pixel data ({one_line(e, 100, path)})") from None
    if px.shape != (n_frames, rows, cols):
        raise InputError(
            path, f"pixel data shape {px.shape} does not match {n_frames} frames of {rows}x{cols}"
        )
    arr = np.empty((cols, rows, n_frames), dtype=np.float32)
    for k, sl in enumerate(slices):
        arr[:, :, k] = (px[sl.index].astype(np.float32) * np.float32(sl.slope) + np.float32(sl.intercept)).T
    meta: dict[str, Any] = {"n_frames": n_frames, "slice_gap_mm": round(med, 6)}
    meta.update(_dicom_meta(ds))
    meta["sop_class"] = ENHANCED_VOLUME_SOP_CLASSES.get(
        str(ds.get("SOPClassUID", "")), str(ds.get("SOPClassUID", ""))
    )
    return Volume(
        array=arr,
        affine=_LPS_TO_RAS @ lps,
        source=str(path),
        format="dicom",
        meta=meta,
        reader="pydicom enhanced multi-frame",
    )


# --------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class VolumeFormat:
    """One row of :data:`FORMATS`: a volume format, the suffixes that name it and its reader.

    ``data_suffixes`` name the data half of a header/data pair (Analyze ``.img``, PAR/REC ``.rec``): read
    like the header, but not a case of its own when a folder is scanned for volumes.
    """

    name: str
    suffixes: tuple[str, ...]
    load: Callable[[Path], Volume]
    data_suffixes: tuple[str, ...] = ()


#: Every volume file format, by suffix (lower case). DICOM is not here: a folder, or a file with the DICOM
#: preamble whatever its name (``.dcm`` included), goes to the DICOM readers.
FORMATS: tuple[VolumeFormat, ...] = (
    VolumeFormat("nifti", (".nii", ".nii.gz"), _load_nifti),
    VolumeFormat("analyze", (".hdr",), _load_analyze, data_suffixes=(".img",)),
    VolumeFormat("mgh", (".mgh", ".mgz"), _load_mgh),
    VolumeFormat("minc", (".mnc",), _load_minc),
    VolumeFormat("parrec", (".par",), _load_parrec, data_suffixes=(".rec",)),
    VolumeFormat("afni", (".head",), _load_afni, data_suffixes=(".brik", ".brik.gz")),
    VolumeFormat("metaimage", (".mha", ".mhd"), lambda p: _load_itk(p, "metaimage")),
    VolumeFormat("nrrd", (".nrrd", ".nhdr"), lambda p: _load_itk(p, "nrrd")),
    VolumeFormat("gipl", (".gipl", ".gipl.gz"), lambda p: _load_itk(p, "gipl")),
    VolumeFormat("vtk", (".vtk",), lambda p: _load_itk(p, "vtk")),
)
_FORMATS_BY_NAME = {f.name: f for f in FORMATS}
#: Suffixes of volume files that are a case of their own (headers, single files), e.g. to scan a folder.
VOLUME_SUFFIXES: tuple[str, ...] = tuple(s for f in FORMATS for s in f.suffixes)
