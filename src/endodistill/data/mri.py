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

This module is the registry only (:data:`FORMATS`, :func:`volume_format`, :func:`load_volume`, content
hashes); the readers live by family:

- :mod:`endodistill.data.volume`: the :class:`~endodistill.data.volume.Volume` carrier and the shared input
  checks and limits (size, finite voxels, affine, gzip/stream checks);
- :mod:`endodistill.data.nibabel_io`: NIfTI, Analyze, MGH/MGZ, MINC, PAR/REC and AFNI, by nibabel;
- :mod:`endodistill.data.itk`: MetaImage, NRRD, GIPL, VTK and MINC2, by SimpleITK, with the MetaImage/NRRD
  voxel data checks;
- :mod:`endodistill.data.dicom`: DICOM series folders and single (enhanced multi-frame) files, by pydicom,
  with :mod:`endodistill.data.dicom_stack` for the geometry of a stack of slices.

No format library is imported when this module is (see ``_LAZY`` in the reader modules): manifest reading
and ``predict``'s input checks import it and must stay torch-free and fast.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from endodistill.data.dicom import is_dicom_file, load_dicom_file, load_dicom_series
from endodistill.data.itk import load_itk
from endodistill.data.nibabel_io import (
    load_afni,
    load_analyze,
    load_mgh,
    load_minc,
    load_nifti,
    load_parrec,
)
from endodistill.data.volume import Volume, check_affine, check_finite
from endodistill.errors import InputError

log = logging.getLogger(__name__)


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
        vol = load_dicom_series(p, series_uid)
    else:
        vol = load_dicom_file(p)
    check_finite(p, vol.array)
    check_affine(p, vol.affine)
    vol.meta.setdefault("shape", list(vol.array.shape))
    vol.meta.setdefault("spacing", [round(s, 6) for s in vol.spacing])
    return vol


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
    VolumeFormat("nifti", (".nii", ".nii.gz"), load_nifti),
    VolumeFormat("analyze", (".hdr",), load_analyze, data_suffixes=(".img",)),
    VolumeFormat("mgh", (".mgh", ".mgz"), load_mgh),
    VolumeFormat("minc", (".mnc",), load_minc),
    VolumeFormat("parrec", (".par",), load_parrec, data_suffixes=(".rec",)),
    VolumeFormat("afni", (".head",), load_afni, data_suffixes=(".brik", ".brik.gz")),
    VolumeFormat("metaimage", (".mha", ".mhd"), lambda p: load_itk(p, "metaimage")),
    VolumeFormat("nrrd", (".nrrd", ".nhdr"), lambda p: load_itk(p, "nrrd")),
    VolumeFormat("gipl", (".gipl", ".gipl.gz"), lambda p: load_itk(p, "gipl")),
    VolumeFormat("vtk", (".vtk",), lambda p: load_itk(p, "vtk")),
)
_FORMATS_BY_NAME = {f.name: f for f in FORMATS}
#: Suffixes of volume files that are a case of their own (headers, single files), e.g. to scan a folder.
VOLUME_SUFFIXES: tuple[str, ...] = tuple(s for f in FORMATS for s in f.suffixes)
