"""The geometry of a stack of 2D DICOM images (the files of a series, or the frames of an enhanced file).

Per-slice tags are parsed and checked (:func:`ds_floats`, :func:`rows_cols`,
:func:`check_native_pixel_length`), the slices sorted along their normal and checked to form one evenly
spaced volume (:func:`stack_geometry`, LPS voxel-to-world), and only technical header fields are kept
(:func:`dicom_meta`: no patient identifier). Works on pydicom datasets without importing pydicom.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from endodistill.errors import InputError

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


def _plain(val: Any) -> Any:
    """A pydicom value as a plain JSON-friendly Python value."""
    if isinstance(val, float):
        return float(val)
    if isinstance(val, int):
        return int(val)
    if isinstance(val, list | tuple) or type(val).__name__ == "MultiValue":
        return "\\".join(str(v) for v in val)
    return str(val)


def ds_floats(ds: Any, keyword: str, n: int, f: Path, prefix: str = "") -> np.ndarray:
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


def check_native_pixel_length(f: Path, ds: Any, rows_cols: tuple[int, int], frames: int = 1) -> None:
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
class Slice:
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


def stack_geometry(where: Path, slices: list[Slice]) -> tuple[list[Slice], np.ndarray, float]:
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


def dicom_meta(ds0: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key in _SAFE_DICOM_FIELDS:
        if key in ds0 and ds0.get(key) not in (None, ""):
            meta[key] = _plain(ds0.get(key))
    meta["dtype"] = f"{'int' if int(ds0.get('PixelRepresentation', 0) or 0) else 'uint'}{ds0.BitsAllocated}"
    return meta


def rows_cols(f: Path, ds: Any) -> tuple[int, int]:
    try:
        rc = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    except (TypeError, ValueError):
        rc = (0, 0)
    if min(rc) <= 0:
        raise InputError(f, "missing or zero Rows/Columns")
    return rc
