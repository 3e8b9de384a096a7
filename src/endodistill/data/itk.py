"""The SimpleITK readers (MetaImage, NRRD, GIPL, VTK, MINC2) and the MetaImage/NRRD voxel data checks.

ITK's physical space is LPS: the x and y axes are flipped into nibabel's RAS convention, except for MINC,
whose world coordinates ITK passes through unconverted. MetaImage and NRRD data is checked to be all there
before ITK allocates the buffer, as ITK zero-fills compressed data that ends early.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from endodistill.data.volume import (
    LPS_TO_RAS,
    Volume,
    check_file,
    check_size,
    check_stream,
    keep_locale,
    quiet_stderr,
    require_bytes,
    spatial_shape,
)
from endodistill.errors import InputError

# _LAZY: the format libraries (SimpleITK, pynrrd) are imported inside the reader that needs them, not here.
# This module is imported (through data.mri) on the torch-free paths that must start fast (reading a
# manifest, content hashes, `predict` checking its inputs and model directory) for data.mri's suffix
# lists and checks, which need none of them.

_ITK_IO = {
    "metaimage": "MetaImageIO",
    "nrrd": "NrrdImageIO",
    "minc": "MINCImageIO",
    "gipl": "GiplImageIO",
    "vtk": "VTKImageIO",
}


def load_itk(path: Path, fmt: str) -> Volume:
    import SimpleITK as sitk  # on use: see _LAZY

    check_file(path)
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
    spatial_shape(path, size[::-1])
    check_size(path, size)
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
    affine = world if fmt == "minc" else LPS_TO_RAS @ world
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
                check_stream(path, fh, need, size, force=True)
            else:
                require_bytes(path, size, need)
            return
    # Detached data (.mhd + .raw/.zraw): one file only; lists and patterns are left to ITK.
    target = path.parent / data_file
    if not data_file or data_file.upper() == "LIST" or "%" in data_file or not target.is_file():
        return
    with open(target, "rb") as fh:
        if compressed:
            check_stream(target, fh, need, target.stat().st_size, force=True)
        else:
            require_bytes(target, target.stat().st_size, need)


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
            require_bytes(path, size, need)
        elif encoding in ("gzip", "gz"):
            check_stream(path, fh, need, size)
