"""MRI volume readers: NIfTI, DICOM series folders, MetaImage and NRRD.

Every reader returns a :class:`Volume` whose ``affine`` maps voxel indices (file order I, J, K) to RAS
world millimetres, in nibabel's convention. For a DICOM series that is the affine nibabel reports for
the SimpleITK NIfTI conversion of the same series, so heatmaps written on that grid overlay in Slicer.

Broken or hostile inputs become :class:`~endodistill.errors.InputError` with one short reason; sizes
are checked from the header before any voxel buffer is allocated, so an absurd header fails fast.
Inputs are only ever opened for reading.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from endodistill.errors import InputError

log = logging.getLogger(__name__)

#: Largest voxel buffer (bytes, as float32) a reader agrees to allocate. Checked against the header first.
MAX_BYTES = 2 * 1024**3
#: Compressed voxel data that claims to expand more than this many times is decompressed once, in bounded
#: memory, to check that it really holds what the header says before the voxel buffer is allocated (a 1 KB
#: file claiming gigabytes must not cost gigabytes). Real MRI compresses 2-10x.
SUSPICIOUS_RATIO = 64
_CHUNK = 1 << 20

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES

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
        format: ``nifti``, ``dicom``, ``metaimage`` or ``nrrd``.
        meta: technical facts only (no patient identifiers).
    """

    array: np.ndarray
    affine: np.ndarray
    source: str
    format: str
    meta: dict[str, Any] = field(default_factory=dict)

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


def volume_format(path: str | Path) -> str | None:
    """The reader that handles ``path`` (``nifti``, ``dicom``, ``metaimage``, ``nrrd``) or None."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith((".mha", ".mhd")):
        return "metaimage"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    return None


def load_volume(path: str | Path, series_uid: str | None = None) -> Volume:
    """Read one MRI volume.

    Args:
        path: a ``.nii``/``.nii.gz`` file, a DICOM series folder, a ``.mha``/``.mhd`` or ``.nrrd``/``.nhdr`` file.
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
        if p.name.lower().endswith(".dcm"):
            raise InputError(p, "a single DICOM file; give the folder that holds the whole series")
        raise InputError(
            p, "unsupported MRI format (use .nii, .nii.gz, a DICOM series folder, .mha/.mhd or .nrrd)"
        )
    if fmt != "dicom" and series_uid:
        log.debug("%s: series_uid ignored for a %s file", p, fmt)
    if fmt == "nifti":
        vol = _load_nifti(p)
    elif fmt == "dicom":
        vol = _load_dicom_series(p, series_uid)
    else:
        vol = _load_itk(p, fmt)
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


def _load_nifti(path: Path) -> Volume:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    if not path.is_file():
        raise InputError(path, "not a file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if path.name.lower().endswith(".gz"):
        if magic != b"\x1f\x8b":
            raise InputError(path, "not gzip-compressed although named .gz (not a NIfTI file?)")
        try:
            with gzip.open(path, "rb") as gz:
                head = gz.read(540)
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError):
            raise InputError(path, "truncated or corrupt gzip stream") from None
    else:
        with open(path, "rb") as fh:
            head = fh.read(540)
    _check_nifti_magic(path, head)
    try:
        # nib.load reads the header only; voxels stay on disk until dataobj is read below.
        img = nib.load(str(path))
    except (ImageFileError, gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise InputError(path, f"not a readable NIfTI file ({one_line(e, 100, path)})") from None
    except (OSError, ValueError) as e:
        raise InputError(path, f"not a readable NIfTI file ({one_line(e, 100, path)})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    hdr = img.header
    shape = _spatial_shape(path, tuple(hdr.get_data_shape()))
    _check_size(path, tuple(hdr.get_data_shape()))
    dtype = hdr.get_data_dtype()
    if dtype.fields is not None or dtype.kind == "c":
        raise InputError(path, f"unsupported voxel type {dtype} (RGB/complex); need scalar intensities")
    n_vox = int(np.prod([int(v) for v in hdr.get_data_shape()], dtype=object))
    # The proxy's offset is where nibabel will read (352 for a single .nii whose header says 0).
    need = int(getattr(img.dataobj, "offset", hdr.get_data_offset())) + n_vox * dtype.itemsize
    size = path.stat().st_size
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as fh:
            _check_stream(path, fh, need, size)
    else:
        _require_bytes(path, size, need)
    try:
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InputError(path, f"truncated or corrupt voxel data ({one_line(e, 80, path)})") from None
    except (OSError, ValueError) as e:
        raise InputError(path, f"truncated or corrupt voxel data ({one_line(e, 80, path)})") from None
    arr = np.ascontiguousarray(arr.reshape(shape))
    affine = np.asarray(img.affine, dtype=np.float64)
    meta: dict[str, Any] = {
        "dtype": str(dtype),
        "nifti_version": 2 if isinstance(img, nib.Nifti2Image) else 1,
        "sform_code": int(hdr["sform_code"]),
        "qform_code": int(hdr["qform_code"]),
    }
    return Volume(array=arr, affine=affine, source=str(path), format="nifti", meta=meta)


# ------------------------------------------------------------------------------ MetaImage / NRRD

_ITK_IO = {"metaimage": "MetaImageIO", "nrrd": "NrrdImageIO"}


def _load_itk(path: Path, fmt: str) -> Volume:
    import SimpleITK as sitk

    if not path.is_file():
        raise InputError(path, "not a file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    reader = sitk.ImageFileReader()
    reader.SetImageIO(_ITK_IO[fmt])
    reader.SetFileName(str(path))
    try:
        # Header first: the size check below runs before ITK allocates the pixel buffer.
        with quiet_stderr():
            reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(path, f"not a readable {fmt} file (bad or missing header)") from None
    size = tuple(int(s) for s in reader.GetSize())[::-1]  # ITK is x-fastest; report as numpy would
    if reader.GetNumberOfComponents() != 1:
        raise InputError(path, f"{reader.GetNumberOfComponents()}-component pixels; need scalar intensities")
    dims = len(size)
    _spatial_shape(path, size[::-1])
    _check_size(path, size)
    n_vox = int(np.prod(size, dtype=object))
    if fmt == "metaimage":
        _check_metaimage_data(path, n_vox)
    else:
        _check_nrrd_data(path, n_vox)
    try:
        with quiet_stderr():
            img = reader.Execute()
    except RuntimeError:
        raise InputError(path, "truncated or unreadable pixel data (or missing data file)") from None
    arr = sitk.GetArrayFromImage(img)  # (.., K, J, I)
    arr = arr.reshape(arr.shape[-3:]).transpose(2, 1, 0).astype(np.float32, copy=False)
    arr = np.ascontiguousarray(arr)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dims, dims)[:3, :3]
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)[:3]
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)[:3]
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(spacing)
    lps[:3, 3] = origin
    meta = {"dtype": img.GetPixelIDTypeAsString()}
    return Volume(array=arr, affine=_LPS_TO_RAS @ lps, source=str(path), format=fmt, meta=meta)


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
    import nrrd

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
    import pydicom
    from pydicom.errors import InvalidDicomError

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


def _ds_floats(ds: Any, keyword: str, n: int, f: Path) -> np.ndarray:
    val = ds.get(keyword)
    if val is None:
        raise InputError(f, f"missing {keyword} tag; cannot place the slice in space")
    try:
        arr = np.asarray([float(v) for v in val], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f, f"unreadable {keyword} tag") from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise InputError(f, f"malformed {keyword} tag ({n} numbers expected)")
    return arr


def _check_native_pixel_length(f: Path, ds: Any, rows_cols: tuple[int, int]) -> None:
    """Uncompressed pixel data must hold Rows x Columns values: checked from the header, before any decoding."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None or tsyntax.is_compressed:
        return
    elem = ds.get_item("PixelData")
    have = getattr(elem, "length", None)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    need = rows_cols[0] * rows_cols[1] * int(ds.get("SamplesPerPixel", 1) or 1) * bits // 8
    if isinstance(have, int) and 0 <= have < need and have != 0xFFFFFFFF:
        raise InputError(
            f,
            f"cannot decode pixel data: it holds {have} bytes, {rows_cols[0]}x{rows_cols[1]} pixels need "
            f"{need} (truncated?)",
        )


def _load_dicom_series(folder: Path, series_uid: str | None) -> Volume:
    import pydicom

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

    # Geometry of every slice; every check names the offending file.
    iop0 = None
    rows_cols = None
    entries = []
    for f, ds in items:
        if "PixelData" not in ds:
            raise InputError(f, "no pixel data in this DICOM file")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(
                f,
                "multi-frame DICOM (enhanced MR or a cine) is not supported as an MRI volume; convert it to NIfTI",
            )
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise InputError(f, "colour DICOM image; an MRI series must be grayscale")
        iop = _ds_floats(ds, "ImageOrientationPatient", 6, f)
        ipp = _ds_floats(ds, "ImagePositionPatient", 3, f)
        ps = _ds_floats(ds, "PixelSpacing", 2, f)
        rc = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        if min(rc) <= 0:
            raise InputError(f, "missing or zero Rows/Columns")
        _check_native_pixel_length(f, ds, rc)
        if iop0 is None:
            iop0, rows_cols, ps0 = iop, rc, ps
        else:
            if rc != rows_cols:
                raise InputError(f, f"slice size {rc[0]}x{rc[1]} differs from {rows_cols[0]}x{rows_cols[1]}")
            if not np.allclose(iop, iop0, atol=1e-4):
                raise InputError(f, "slice orientation differs from the rest of the series")
            if not np.allclose(ps, ps0, rtol=1e-4):
                raise InputError(f, "pixel spacing differs from the rest of the series")
        entries.append((f, ds, ipp))
    assert iop0 is not None and rows_cols is not None
    row_cos, col_cos = iop0[:3], iop0[3:]
    normal = np.cross(row_cos, col_cos)
    if np.linalg.norm(normal) < 0.5:
        raise InputError(items[0][0], "degenerate ImageOrientationPatient (row and column not orthogonal)")
    normal /= np.linalg.norm(normal)
    if len(entries) < 2:
        raise InputError(folder, "only one slice in the series (2D image); an MRI volume must be 3D")

    # Sort by position along the slice normal (file names and InstanceNumber are not reliable).
    entries.sort(key=lambda e: float(np.dot(e[2], normal)))
    pos = np.asarray([float(np.dot(e[2], normal)) for e in entries])
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        i = int(np.argmin(gaps))
        raise InputError(
            entries[i + 1][0],
            f"two slices at the same position ({entries[i][0].name}, {entries[i + 1][0].name}): "
            "several echoes/time points in one series?",
        )
    med = float(np.median(gaps))
    if not np.allclose(gaps, med, rtol=0.01, atol=1e-3):
        raise InputError(
            folder,
            f"inconsistent slice spacing ({gaps.min():.3g} to {gaps.max():.3g} mm): missing or extra slices",
        )
    rows, cols = rows_cols
    _check_size(folder, (cols, rows, len(entries)))

    arr: np.ndarray | None = None
    for k, (f, _, _) in enumerate(entries):
        try:
            ds = pydicom.dcmread(f)
            px = ds.pixel_array
        except Exception as e:  # decoders raise many types (ValueError, RuntimeError, NotImplementedError)
            raise InputError(f, f"cannot decode pixel data ({one_line(e, 100, f)})") from None
        if px.shape != (rows, cols):
            raise InputError(f, f"pixel data shape {px.shape} does not match Rows/Columns {rows}x{cols}")
        if arr is None:  # allocated once a slice decodes: a series of broken slices costs no volume buffer
            arr = np.empty((cols, rows, len(entries)), dtype=np.float32)
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        # DICOM pixel (row r, column c) is voxel (i=c, j=r): the I axis runs along a row, as in ITK.
        arr[:, :, k] = (px.astype(np.float32) * np.float32(slope) + np.float32(intercept)).T

    assert arr is not None  # len(entries) >= 2
    ds0 = entries[0][1]
    lps = np.eye(4)
    lps[:3, 0] = row_cos * ps0[1]  # PixelSpacing = (between rows, between columns)
    lps[:3, 1] = col_cos * ps0[0]
    # The measured step between sorted slices (equals normal * spacing unless the stack is sheared).
    lps[:3, 2] = (entries[-1][2] - entries[0][2]) / (len(entries) - 1)
    lps[:3, 3] = entries[0][2]
    meta: dict[str, Any] = {"n_files": len(entries), "slice_gap_mm": round(med, 6)}
    for key in _SAFE_DICOM_FIELDS:
        if key in ds0 and ds0.get(key) not in (None, ""):
            meta[key] = _plain(ds0.get(key))
    meta["dtype"] = f"{'int' if int(ds0.get('PixelRepresentation', 0) or 0) else 'uint'}{ds0.BitsAllocated}"
    return Volume(array=arr, affine=_LPS_TO_RAS @ lps, source=str(folder), format="dicom", meta=meta)
