"""The DICOM readers, by pydicom: a series folder, or one enhanced multi-frame MR/CT file, as a volume.

Also tells a DICOM file's kind (:func:`dicom_kind`: an MR/CT volume or an ultrasound clip, by SOP class
and modality) for the clip reader and ``inspect``. The affine of a series is the one nibabel reports for
the SimpleITK NIfTI conversion of the same series (LPS flipped to RAS); an enhanced file's frames are
placed exactly as the files of a series are (:mod:`endodistill.data.dicom_stack`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from endodistill.data.dicom_stack import (
    Slice,
    check_native_pixel_length,
    dicom_meta,
    ds_floats,
    rows_cols,
    stack_geometry,
)
from endodistill.data.volume import LPS_TO_RAS, Volume, check_file, check_size, one_line
from endodistill.errors import InputError

# _LAZY: the format library (pydicom) is imported inside the reader that needs it, not here.
# This module is imported (through data.mri) on the torch-free paths that must start fast (reading a
# manifest, content hashes, `predict` checking its inputs and model directory) for data.mri's suffix
# lists and checks, which need none of them.


def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` is a file with the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


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


def load_dicom_series(folder: Path, series_uid: str | None) -> Volume:
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
        return load_enhanced(f)
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
        iop = ds_floats(ds, "ImageOrientationPatient", 6, f)
        ipp = ds_floats(ds, "ImagePositionPatient", 3, f)
        ps = ds_floats(ds, "PixelSpacing", 2, f)
        rc = rows_cols(f, ds)
        check_native_pixel_length(f, ds, rc)
        slices.append(Slice(where=f, label=f.name, iop=iop, ipp=ipp, ps=ps, rc=rc, ds=ds))
    slices, lps, med = stack_geometry(folder, slices)
    rows, cols = slices[0].rc
    check_size(folder, (cols, rows, len(slices)))

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
    meta.update(dicom_meta(slices[0].ds))
    return Volume(
        array=arr,
        affine=LPS_TO_RAS @ lps,
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


def load_dicom_file(path: Path) -> Volume:
    """One DICOM file as a volume: an enhanced multi-frame MR/CT file; a classic slice or a cine is refused."""
    import pydicom  # on use: see _LAZY

    check_file(path)
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
    return load_enhanced(path, ds)


def _fg(groups: Any, item: Any, keyword: str) -> Any:
    """The first item of functional group ``keyword``: per-frame ``item`` first, else the shared ``groups``."""
    for src in (item, groups):
        seq = None if src is None else src.get(keyword)
        if seq:
            return seq[0]
    return None


def load_enhanced(path: Path, ds: Any = None) -> Volume:
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
    rc = rows_cols(path, ds)
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
    check_size(path, (rc[1], rc[0], n_frames))
    check_native_pixel_length(path, ds, rc, n_frames)

    top = (float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0))
    slices = []
    for k, item in enumerate(per_frame):
        prefix = f"frame {k + 1}: "
        # Position is per frame; orientation, spacing and rescale usually shared (legacy files: top level).
        ipp = ds_floats(_fg(shared, item, "PlanePositionSequence"), "ImagePositionPatient", 3, path, prefix)
        ori = _fg(shared, item, "PlaneOrientationSequence")
        iop = ds_floats(ds if ori is None else ori, "ImageOrientationPatient", 6, path, prefix)
        mea = _fg(shared, item, "PixelMeasuresSequence")
        ps = ds_floats(ds if mea is None else mea, "PixelSpacing", 2, path, prefix)
        pvt = _fg(shared, item, "PixelValueTransformationSequence")
        slope, intercept = top
        if pvt is not None:
            slope = float(pvt.get("RescaleSlope", slope) or slope)
            intercept = float(pvt.get("RescaleIntercept", intercept) or 0.0)
        label = f"frame {k + 1}"
        slices.append(Slice(path, label, iop, ipp, ps, rc, index=k, slope=slope, intercept=intercept))
    slices, lps, med = stack_geometry(path, slices)
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
    meta.update(dicom_meta(ds))
    meta["sop_class"] = ENHANCED_VOLUME_SOP_CLASSES.get(
        str(ds.get("SOPClassUID", "")), str(ds.get("SOPClassUID", ""))
    )
    return Volume(
        array=arr,
        affine=LPS_TO_RAS @ lps,
        source=str(path),
        format="dicom",
        meta=meta,
        reader="pydicom enhanced multi-frame",
    )
