"""Volume formats beyond NIfTI/DICOM series/MHA/NRRD: nibabel's and SimpleITK's loaders, enhanced DICOM.

Geometry is checked against the library's own reading of the same file (nibabel's ``affine``, SimpleITK's
NIfTI conversion) or, for enhanced multi-frame DICOM, against an independent computation from each frame's
ImagePositionPatient/ImageOrientationPatient/PixelSpacing and the same slices as a classic series.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import locale
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from nibabel.testing import data_path
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian

from endodistill.data.inspect import format_inspection, inspect_path
from endodistill.data.mri import FORMATS, VOLUME_SUFFIXES, load_volume, volume_format
from endodistill.data.video import load_clip
from endodistill.errors import InputError
from test_readers import write_cine, write_dicom_series

NIB = Path(data_path)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _canonical(vol) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and affine reoriented to RAS axis order (compares files that store axes in different orders)."""
    img = nib.as_closest_canonical(nib.Nifti1Image(vol.array, vol.affine))
    return np.asarray(img.dataobj), img.affine


def _oblique(seed: int = 0) -> np.ndarray:
    a, b = np.radians(25.0), np.radians(-15.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]]
    )
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.5, 0.8, 3.0])
    aff[:3, 3] = [12.0, -30.0, 7.5]
    return aff


def _check_one_line(fn, path: Path, named: Path, fragment: str) -> None:
    with pytest.raises(InputError) as e:
        fn(path)
    msg = str(e.value)
    assert "\n" not in msg and named.name in msg, msg
    assert fragment.lower() in e.value.reason.lower(), msg


# ------------------------------------------------------------------------------------ the table


def test_one_table_of_formats() -> None:
    names = [f.name for f in FORMATS]
    assert len(names) == len(set(names))
    for suffix in (
        ".nii.gz",
        ".hdr",
        ".img",
        ".mgz",
        ".mgh",
        ".mnc",
        ".par",
        ".rec",
        ".head",
        ".mha",
        ".nrrd",
    ):
        assert volume_format(f"x{suffix.upper()}") is not None, suffix
    assert ".img" not in VOLUME_SUFFIXES and ".rec" not in VOLUME_SUFFIXES  # data halves: not cases
    assert volume_format("x.txt") is None


# ---------------------------------------------------------------------------------------- nibabel


def test_minc1_shipped_file_matches_nibabel() -> None:
    f = NIB / "minc1_1_scale.mnc"
    v = load_volume(f)
    ref = nib.load(str(f))
    assert v.format == "minc" and v.reader == "nibabel Minc1Image"
    np.testing.assert_allclose(v.array, np.asarray(ref.dataobj, dtype=np.float32), rtol=1e-6)
    np.testing.assert_allclose(v.affine, ref.affine)


def test_minc2_shipped_file_matches_its_minc1_twin() -> None:
    """nibabel ships one dataset as MINC1 and MINC2: SimpleITK's MINC2 equals nibabel's MINC1, voxels and world."""
    one, two = load_volume(NIB / "minc1_1_scale.mnc"), load_volume(NIB / "minc2_1_scale.mnc")
    assert two.reader == "SimpleITK MINCImageIO" and two.meta["minc_version"] == 2
    assert one.array.shape == (10, 20, 20) and two.array.shape == (20, 20, 10)  # z,y,x vs x,y,z file order
    a1, aff1 = _canonical(one)
    a2, aff2 = _canonical(two)
    np.testing.assert_allclose(aff1, aff2, atol=1e-6)
    np.testing.assert_allclose(a1, a2, rtol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("h5py") is None, reason="nibabel reads MINC2 only with h5py")
def test_minc2_oblique_matches_nibabel_minc2(tmp_path: Path) -> None:
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((5, 6, 7)).astype(np.float32))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    img.SetOrigin((10, 20, 30))
    img.SetSpacing((1.5, 2, 2.5))
    sitk.WriteImage(img, str(tmp_path / "o.mnc"))
    for f in (tmp_path / "o.mnc", NIB / "small.mnc"):
        ours, ref = load_volume(f), nib.load(str(f))
        got = _canonical(ours)
        want = nib.as_closest_canonical(ref)
        np.testing.assert_allclose(got[1], want.affine, atol=1e-5)
        np.testing.assert_allclose(got[0], want.get_fdata(), rtol=1e-5, atol=1e-6)


def test_analyze_pair_geometry_is_nibabels_guess(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 1000, size=(6, 5, 4)).astype(np.int16)
    img = nib.AnalyzeImage(arr, np.diag([-2.0, 1.5, 3.0, 1.0]))
    img.to_filename(str(tmp_path / "a.hdr"))
    ref = nib.load(str(tmp_path / "a.hdr"))
    for name in ("a.hdr", "a.img"):  # either half names the pair
        v = load_volume(tmp_path / name)
        assert v.format == "analyze" and v.reader == f"nibabel {type(ref).__name__}"
        np.testing.assert_array_equal(v.array, arr.astype(np.float32))
        np.testing.assert_allclose(v.affine, ref.affine)
        assert "guessed" in v.meta["affine_note"]
    np.testing.assert_allclose(v.spacing, (2.0, 1.5, 3.0))


def test_nifti_pair_keeps_its_oblique_sform(tmp_path: Path) -> None:
    arr = np.random.default_rng(2).normal(size=(6, 5, 4)).astype(np.float32)
    nib.Nifti1Pair(arr, _oblique()).to_filename(str(tmp_path / "p.hdr"))
    v = load_volume(tmp_path / "p.img")
    assert v.format == "nifti" and v.reader == "nibabel Nifti1Pair"
    np.testing.assert_allclose(v.affine, _oblique(), atol=1e-5)
    np.testing.assert_array_equal(v.array, arr)


def test_mgh_and_mgz_match_what_nibabel_wrote(tmp_path: Path) -> None:
    arr = np.random.default_rng(3).normal(size=(7, 6, 5)).astype(np.float32)
    for name in ("v.mgh", "v.mgz"):
        nib.MGHImage(arr, _oblique()).to_filename(str(tmp_path / name))
        v = load_volume(tmp_path / name)
        assert v.format == "mgh" and v.reader == "nibabel MGHImage"
        np.testing.assert_array_equal(v.array, arr)
        np.testing.assert_allclose(v.affine, nib.load(str(tmp_path / name)).affine)
        np.testing.assert_allclose(v.affine, _oblique(), atol=1e-4)
    info = inspect_path(tmp_path / "v.mgz")
    assert info["kind"] == "volume" and info["reader"] == "nibabel MGHImage"
    assert "reader:      nibabel MGHImage" in format_inspection(info)


def test_parrec_single_dynamic_matches_nibabel(tmp_path: Path) -> None:
    """The shipped PAR/REC has 3 dynamics (4D, refused); its first dynamic as a PAR/REC of its own is a volume."""
    src = NIB / "phantom_EPI_asc_CLEAR_2_1.PAR"
    _check_one_line(load_volume, src, src, "4D image")
    ref = nib.load(str(src))
    lines = src.read_text(encoding="latin-1").splitlines(keepends=True)
    out = []
    for ln in lines:
        fields = ln.split()
        if ln.startswith(".") and "Max. number of dynamics" in ln:
            ln = ln.replace(":   3", ":   1")
        elif fields and not ln.startswith(("#", ".")) and len(fields) > 5 and fields[2] != "1":
            continue  # an image line of dynamic 2 or 3
        out.append(ln)
    (tmp_path / "one.PAR").write_text("".join(out), encoding="latin-1")
    rec = (NIB / "phantom_EPI_asc_CLEAR_2_1.REC").read_bytes()
    (tmp_path / "one.REC").write_bytes(rec[: 9 * 64 * 64 * 2])
    v = load_volume(tmp_path / "one.PAR")
    assert v.format == "parrec" and v.reader == "nibabel PARRECImage"
    assert v.array.shape == (64, 64, 9)
    np.testing.assert_allclose(v.array, np.asarray(ref.dataobj, dtype=np.float32)[..., 0], rtol=1e-6)
    np.testing.assert_allclose(v.affine, ref.affine, atol=1e-5)
    assert nib.aff2axcodes(v.affine) == nib.aff2axcodes(ref.affine)


def test_afni_shipped_file_matches_nibabel() -> None:
    f = NIB / "scaled+tlrc.HEAD"
    v, ref = load_volume(f), nib.load(str(f))
    assert v.format == "afni" and v.reader == "nibabel AFNIImage" and v.array.shape == (47, 54, 43)
    np.testing.assert_allclose(v.array, np.asarray(ref.dataobj, dtype=np.float32)[..., 0], rtol=1e-6)
    np.testing.assert_allclose(v.affine, ref.affine)


def test_gipl_and_vtk_match_simpleitk(tmp_path: Path) -> None:
    """GIPL and legacy VTK store no direction: an axis-aligned volume round-trips exactly."""
    arr = np.random.default_rng(4).normal(size=(7, 6, 5)).astype(np.float32)
    aff = np.diag([-1.5, -0.8, 3.0, 1.0])
    aff[:3, 3] = [12.0, 30.0, 7.5]
    nib.save(nib.Nifti1Image(arr, aff), str(tmp_path / "v.nii.gz"))
    img = sitk.ReadImage(str(tmp_path / "v.nii.gz"))
    for name, io in (("v.gipl", "GiplImageIO"), ("v.vtk", "VTKImageIO")):
        sitk.WriteImage(img, str(tmp_path / name))
        before = locale.setlocale(locale.LC_ALL)
        v = load_volume(tmp_path / name)
        assert locale.setlocale(locale.LC_ALL) == before  # ITK's VTK reader resets it to "C" otherwise
        assert v.reader == f"SimpleITK {io}"
        np.testing.assert_allclose(v.array, arr, atol=1e-6)
        np.testing.assert_allclose(v.affine, aff, atol=1e-5)


def test_shipped_4d_files_are_refused_in_one_line() -> None:
    for name, fragment in (
        ("test.mgz", "4D image"),
        ("minc1_4d.mnc", "4D image"),
        ("minc2_4d.mnc", "4D or vector MINC2"),
        ("example4d+orig.HEAD", "4D image"),
        ("example4d.nii.gz", "4D image"),
    ):
        _check_one_line(load_volume, NIB / name, NIB / name, fragment)


def test_broken_files_of_the_new_formats(tmp_path: Path) -> None:
    arr = np.random.default_rng(5).normal(size=(8, 8, 8)).astype(np.float32)
    nib.MGHImage(arr, np.eye(4)).to_filename(str(tmp_path / "good.mgz"))
    good = gzip.decompress((tmp_path / "good.mgz").read_bytes())
    cases: dict[str, tuple[bytes, str]] = {
        "truncated.mgz": (gzip.compress(good)[:200], "truncated"),
        "short_data.mgz": (gzip.compress(good[:1000]), "truncated"),
        "text.mgz": (b"hello" * 50, "not gzip"),
        "wrong_magic.mgh": (b"\x00\x00\x00\x07" + good[4:], "wrong magic"),
        "short.mgh": (good[:600], "truncated"),
        "garbage.mnc": (b"not a minc file at all", "wrong magic"),
        "hdf5_garbage.mnc": (b"\x89HDF\r\n\x1a\n" + b"\0" * 100, "not a readable MINC2"),
        "netcdf_garbage.mnc": (b"CDF\x01" + b"\xff" * 60, "not a readable MINC1"),
        "garbage.PAR": (b"this is not a PAR file\n", "not a readable PAR/REC"),
        "zero.mgz": (b"", "empty file"),
    }
    # An MGH header claiming 10^6 x 10^6 x 10^6 voxels.
    huge = bytearray(good[:284])
    huge[4:16] = np.array([10**6, 10**6, 10**6], dtype=">i4").tobytes()
    cases["huge.mgh"] = (bytes(huge), "GiB limit")
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    nib.AnalyzeImage(arr, np.eye(4)).to_filename(str(tmp_path / "lone.hdr"))
    (tmp_path / "lone.img").unlink()
    cases["lone.hdr"] = (b"", "missing data file lone.img")
    nib.AnalyzeImage(arr, np.eye(4)).to_filename(str(tmp_path / "cut.hdr"))
    (tmp_path / "cut.img").write_bytes((tmp_path / "cut.img").read_bytes()[:100])
    cases["cut.hdr"] = (b"", "truncated")
    shutil.copyfile(NIB / "scaled+tlrc.HEAD", tmp_path / "nobrik+tlrc.HEAD")
    cases["nobrik+tlrc.HEAD"] = (b"", "missing data file nobrik+tlrc.BRIK")
    for name, (_, fragment) in sorted(cases.items()):
        named = tmp_path / ("cut.img" if name == "cut.hdr" else name)
        _check_one_line(load_volume, tmp_path / name, named, fragment)


# ------------------------------------------------------------------------- enhanced multi-frame DICOM


def _seq(**tags) -> Sequence:
    item = Dataset()
    for k, v in tags.items():
        setattr(item, k, v)
    return Sequence([item])


def write_enhanced(
    path: Path,
    vol: np.ndarray,
    row_cos: np.ndarray,
    col_cos: np.ndarray,
    spacing: tuple[float, float],
    gap: float,
    origin: np.ndarray,
    order: np.ndarray,
    slope: float = 1.0,
    intercept: float = 0.0,
    modality: str = "MR",
    edit=None,
) -> list[np.ndarray]:
    """An Enhanced MR Image Storage file: vol (rows, cols, slices) stored as frames in ``order``.

    Orientation, spacing and rescale are in the shared functional groups, positions per frame (as scanners
    write them). Returns the per-frame ImagePositionPatient, in frame order.
    """
    normal = np.cross(row_cos, col_cos)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = modality
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-ID-123"
    ds.SeriesDescription = "t2_tse_sag enhanced"
    ds.NumberOfFrames = len(order)
    ds.Rows, ds.Columns = int(vol.shape[0]), int(vol.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    shared.PixelMeasuresSequence = _seq(PixelSpacing=list(spacing), SliceThickness=gap)
    shared.PlaneOrientationSequence = _seq(
        ImageOrientationPatient=[*map(float, row_cos), *map(float, col_cos)]
    )
    shared.PixelValueTransformationSequence = _seq(
        RescaleSlope=slope, RescaleIntercept=intercept, RescaleType="US"
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame, ipps = [], []
    for k in order:
        item = Dataset()
        ipp = np.asarray(origin, dtype=float) + k * gap * normal
        ipps.append(ipp)
        item.PlanePositionSequence = _seq(ImagePositionPatient=[float(x) for x in ipp])
        item.FrameContentSequence = _seq(InStackPositionNumber=int(k) + 1, StackID="1")
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    frames = np.stack([vol[:, :, k] for k in order]).astype(np.uint16)
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    if edit is not None:
        edit(ds)
    ds.save_as(path, enforce_file_format=True)
    return ipps


def _geometry():
    a = np.radians(20.0)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([0.0, 0.0, -1.0])  # sagittal-ish, oblique
    return row, col, (0.7, 0.9), 3.5, np.array([-40.0, 25.0, 60.0])


def test_enhanced_mr_affine_from_functional_groups(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    vol = rng.integers(0, 3000, size=(12, 10, 7)).astype(np.uint16)
    row, col, ps, gap, origin = _geometry()
    order = rng.permutation(7)  # frames stored out of spatial order
    f = tmp_path / "enhanced.dcm"
    ipps = write_enhanced(f, vol, row, col, ps, gap, origin, order, slope=2.0, intercept=-100.0)
    v = load_volume(f)
    assert v.format == "dicom" and v.reader == "pydicom enhanced multi-frame"
    assert v.array.shape == (10, 12, 7)  # (columns, rows, frames): I along a row, as for a series

    # Independent check, frame by frame: voxel (i, j, k) of the frame at sorted position k sits at
    # IPP + i * PixelSpacing[1] * row + j * PixelSpacing[0] * col (LPS), and holds its rescaled pixel (j, i).
    normal = np.cross(row, col)
    ks = np.argsort([float(np.dot(p, normal)) for p in ipps])
    for k, frame in enumerate(ks):
        for i, j in ((0, 0), (9, 0), (0, 11), (4, 7)):
            lps = ipps[frame] + i * ps[1] * row + j * ps[0] * col
            want = LPS_TO_RAS @ np.r_[lps, 1.0]
            np.testing.assert_allclose(v.affine @ np.array([i, j, k, 1.0]), want, atol=1e-6)
            assert v.array[i, j, k] == pytest.approx(2.0 * vol[j, i, order[frame]] - 100.0)

    # The same slices as a classic single-frame series, read by the series reader: same voxels, same affine.
    files = write_dicom_series(
        tmp_path / "classic", vol, tuple(row), tuple(col), ps, gap, tuple(origin), slope=2.0, intercept=-100.0
    )
    assert len(files) == 7
    classic = load_volume(tmp_path / "classic")
    assert classic.reader == "pydicom series"
    np.testing.assert_array_equal(v.array, classic.array)
    np.testing.assert_allclose(v.affine, classic.affine, atol=1e-6)

    # No identifiers in meta; a folder holding only this file reads the same; inspect names the reader.
    assert "Doe" not in json.dumps(v.meta) and "SECRET" not in json.dumps(v.meta)
    assert v.meta["sop_class"] == "Enhanced MR Image Storage" and v.meta["n_frames"] == 7
    (tmp_path / "folder").mkdir()
    shutil.copyfile(f, tmp_path / "folder" / "IM0001")
    np.testing.assert_array_equal(load_volume(tmp_path / "folder").array, v.array)
    info = inspect_path(f)
    assert info["kind"] == "volume" and info["reader"] == "pydicom enhanced multi-frame"
    assert info["shape"] == [10, 12, 7]


def test_single_dicom_file_is_volume_or_cine_by_content(tmp_path: Path) -> None:
    vol = np.arange(6 * 5 * 4, dtype=np.uint16).reshape(6, 5, 4)
    row, col, ps, gap, origin = _geometry()
    mr = tmp_path / "mr.dcm"
    write_enhanced(mr, vol, row, col, ps, gap, origin, np.arange(4))
    cine = write_cine(tmp_path / "us.dcm", np.zeros((5, 6, 8), np.uint8), FrameTime=40.0)
    # An enhanced MR is a volume, not a clip; an ultrasound cine is a clip, not a volume.
    _check_one_line(load_clip, mr, mr, "not an ultrasound cine clip")
    _check_one_line(load_volume, cine, cine, "an ultrasound cine (Modality US")
    assert inspect_path(cine)["kind"] == "clip" and inspect_path(cine)["reader"] == "pydicom cine"
    assert load_clip(cine).frames.shape == (5, 6, 8)
    # A classic single-slice MR file (pydicom's own test file) is a slice of a series.
    from pydicom.data import get_testdata_file

    one = Path(get_testdata_file("MR_small.dcm"))
    _check_one_line(load_volume, one, one, "single DICOM file of one slice")
    assert inspect_path(tmp_path / "mr.dcm")["kind"] == "volume"


def test_broken_enhanced_files(tmp_path: Path) -> None:
    vol = np.arange(6 * 5 * 4, dtype=np.uint16).reshape(6, 5, 4)
    row, col, ps, gap, origin = _geometry()

    def make(name: str, edit=None, order=None) -> Path:
        f = tmp_path / name
        write_enhanced(f, vol, row, col, ps, gap, origin, np.arange(4) if order is None else order, edit=edit)
        return f

    def drop_position(ds):
        del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence

    def drop_per_frame(ds):
        del ds.PerFrameFunctionalGroupsSequence

    def short_pixels(ds):
        ds.PixelData = ds.PixelData[:100]

    def huge(ds):
        ds.Rows = ds.Columns = 65535
        ds.NumberOfFrames = 4

    def drop_orientation(ds):
        del ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence

    cases = {
        "echoes.dcm": (make("echoes.dcm", order=np.array([0, 1, 1, 2])), "same position (frame 2, frame 3)"),
        "no_position.dcm": (make("no_position.dcm", drop_position), "frame 3: missing ImagePositionPatient"),
        "no_per_frame.dcm": (
            make("no_per_frame.dcm", drop_per_frame),
            "without PerFrameFunctionalGroupsSequence",
        ),
        "short.dcm": (make("short.dcm", short_pixels), "cannot decode pixel data"),
        "huge.dcm": (make("huge.dcm", huge), "GiB limit"),
        "no_orientation.dcm": (
            make("no_orientation.dcm", drop_orientation),
            "missing ImageOrientationPatient",
        ),
        "gap.dcm": (make("gap.dcm", order=np.array([0, 1, 3])), "inconsistent slice spacing"),
    }
    for _, (f, fragment) in sorted(cases.items()):
        _check_one_line(load_volume, f, f, fragment)


def test_cli_inspect_names_the_reader(tmp_path: Path) -> None:
    vol = np.arange(6 * 5 * 4, dtype=np.uint16).reshape(6, 5, 4)
    row, col, ps, gap, origin = _geometry()
    f = tmp_path / "IM0001"  # no suffix: DICOM by its preamble
    write_enhanced(f, vol, row, col, ps, gap, origin, np.arange(4))
    code = "from endodistill.cli import main; main()"
    res = subprocess.run(
        [sys.executable, "-c", code, "inspect", str(f)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "reader:      pydicom enhanced multi-frame" in res.stdout
    assert "kind:        volume (dicom)" in res.stdout


def test_header_data_pairs_are_hashed_with_their_data(tmp_path: Path) -> None:
    """Two Analyze pairs of one protocol share identical header bytes: not a leaked copy of each other."""
    from endodistill.data.manifest import validate_manifest
    from endodistill.data.mri import file_sha256

    for k in range(2):
        nib.AnalyzeImage(np.full((4, 4, 4), k, np.int16), np.eye(4)).to_filename(str(tmp_path / f"a{k}.hdr"))
    assert (tmp_path / "a0.hdr").read_bytes() == (tmp_path / "a1.hdr").read_bytes()
    assert file_sha256(tmp_path / "a0.hdr") != file_sha256(tmp_path / "a1.hdr")
    (tmp_path / "m.csv").write_text("subject_id,modality,path,label\ns0,mri,a0.hdr,0\ns1,mri,a1.hdr,1\n")
    assert not [p for p in validate_manifest(tmp_path / "m.csv", decode=False) if "same content" in p.reason]
    shutil.copyfile(tmp_path / "a0.img", tmp_path / "a1.img")  # now a real copy: caught
    assert [p for p in validate_manifest(tmp_path / "m.csv", decode=False) if "same content" in p.reason]
