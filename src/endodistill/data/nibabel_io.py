"""The nibabel-family readers: NIfTI-1/2 (also ``.hdr``/``.img`` pairs), Analyze 7.5, MGH/MGZ, MINC1,
PAR/REC and AFNI; MINC2 files (HDF5) are passed on to SimpleITK (:mod:`endodistill.data.itk`).

Each checks its header's magic and size before nibabel reads a voxel, and returns a
:class:`~endodistill.data.volume.Volume` whose affine is nibabel's own (RAS world). Analyze 7.5 has no
orientation field: nibabel's affine for it is a guess from the voxel sizes, noted in ``meta``.
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from endodistill.data.itk import load_itk
from endodistill.data.volume import (
    Volume,
    check_file,
    check_size,
    check_stream,
    gzip_head,
    is_gzip,
    one_line,
    require_bytes,
    spatial_shape,
)
from endodistill.errors import InputError

# _LAZY: the format library (nibabel) is imported inside the reader that needs it, not here.
# This module is imported (through data.mri) on the torch-free paths that must start fast (reading a
# manifest, content hashes, `predict` checking its inputs and model directory) for data.mri's suffix
# lists and checks, which need none of them.


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
    if is_gzip(data):
        with open(data, "rb") as fh:
            check_stream(data, fh, need, size)
    else:
        require_bytes(data, size, need)


def _nibabel_volume(path: Path, img: Any, fmt: str, meta: dict[str, Any] | None = None) -> Volume:
    """The :class:`Volume` of a loaded nibabel image: one geometry path for every nibabel format.

    The size is checked from the header, and the data file's length against it, before any voxel is read;
    the affine is nibabel's (RAS world).
    """
    hdr = img.header
    full_shape = tuple(int(v) for v in img.shape)
    shape = spatial_shape(path, full_shape)
    check_size(path, full_shape)
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


def load_nifti(path: Path) -> Volume:
    import nibabel as nib  # on use: see _LAZY

    check_file(path)
    if path.name.lower().endswith(".gz"):
        head = gzip_head(path, 540, "NIfTI")
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


def load_analyze(path: Path) -> Volume:
    """An Analyze 7.5 (or SPM99/SPM2 Analyze, or NIfTI pair) ``.hdr``/``.img`` pair, by nibabel."""
    import nibabel as nib  # on use: see _LAZY

    check_file(path)
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


def load_mgh(path: Path) -> Volume:
    """A FreeSurfer MGH (``.mgh``) or gzip-compressed MGZ (``.mgz``) volume, by nibabel."""
    import nibabel as nib  # on use: see _LAZY

    check_file(path)
    if path.name.lower().endswith((".mgz", ".gz")):
        head = gzip_head(path, 20, "MGZ")
    else:
        with open(path, "rb") as fh:
            head = fh.read(20)
    if head[:4] != b"\x00\x00\x00\x01":  # version 1, big-endian int32
        raise InputError(path, "wrong magic: not an MGH file (version field is not 1)")
    if len(head) < 20:
        raise InputError(path, f"too short for an MGH header ({len(head)} bytes; truncated?)")
    # Width, height, depth, frames: checked here, as nibabel seeks past the data to its footer on load.
    check_size(path, tuple(int(d) for d in np.frombuffer(head[4:20], dtype=">i4")))
    img = _nibabel_load(path, "MGH", nib.MGHImage.from_filename)
    return _nibabel_volume(path, img, "mgh")


def load_afni(path: Path) -> Volume:
    """An AFNI ``.HEAD``/``.BRIK`` dataset (named by either file), by nibabel (RAS affine from its header)."""
    from nibabel.brikhead import AFNIImage  # on use: see _LAZY

    check_file(path)
    img = _nibabel_load(path, "AFNI", AFNIImage.from_filename)
    return _nibabel_volume(path, img, "afni")


_NETCDF_MAGIC = (b"CDF\x01", b"CDF\x02")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def load_minc(path: Path) -> Volume:
    """MINC1 (netCDF) by nibabel; MINC2 (HDF5) by SimpleITK, as nibabel needs h5py for it."""
    import nibabel as nib  # on use: see _LAZY

    check_file(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] in _NETCDF_MAGIC:
        img = _nibabel_load(path, "MINC1", nib.Minc1Image.from_filename)
        return _nibabel_volume(path, img, "minc", {"minc_version": 1})
    if head == _HDF5_MAGIC:
        vol = load_itk(path, "minc")
        vol.meta["minc_version"] = 2
        return vol
    raise InputError(path, "wrong magic: not a MINC1 (netCDF) or MINC2 (HDF5) file")


def load_parrec(path: Path) -> Volume:
    """A Philips PAR/REC pair (named by either file), by nibabel (scanner RAS affine, display values)."""
    from nibabel.parrec import PARRECImage  # on use: see _LAZY

    check_file(path)
    img = _nibabel_load(path, "PAR/REC", PARRECImage.from_filename)
    return _nibabel_volume(path, img, "parrec")
