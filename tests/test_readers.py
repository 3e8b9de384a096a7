"""MRI and ultrasound readers: real files, DICOM geometry, and a corpus of broken inputs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import av
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless, UltrasoundMultiFrameImageStorage

from endodistill.data.dicom import describe_series
from endodistill.data.mri import load_volume
from endodistill.data.video import load_clip
from endodistill.errors import InputError

PROSTATEX = "prostatex_t2_pelvis/ProstateX-0000_t2_tse_sag"

# ------------------------------------------------------------------------------------- builders


def _uid(*parts: object) -> str:
    return pydicom.uid.generate_uid(entropy_srcs=[str(p) for p in parts])


def write_dicom_series(
    folder: Path,
    vol: np.ndarray,
    row_cos: tuple[float, float, float] = (1.0, 0.0, 0.0),
    col_cos: tuple[float, float, float] = (0.0, 1.0, 0.0),
    spacing: tuple[float, float] = (0.8, 0.7),
    gap: float = 3.0,
    origin: tuple[float, float, float] = (-20.0, -30.0, 10.0),
    series: str = "s1",
    names: Callable[[int], str] = lambda k: f"slice{k:03d}.dcm",
    slope: float = 1.0,
    intercept: float = 0.0,
) -> list[Path]:
    """A synthetic MR series (LPS geometry, vol is (rows, cols, slices) uint16), one file per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(row_cos, col_cos)
    out = []
    for k in range(vol.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = _uid(series, k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = _uid(series)
        ds.StudyInstanceUID = _uid("study")
        ds.SeriesDescription = f"desc {series}"
        ds.Modality = "MR"
        ds.PatientName = "Doe^Jane"
        ds.PatientID = "SECRET-ID-123"
        ds.PatientBirthDate = "19800101"
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = int(vol.shape[0]), int(vol.shape[1])
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.ImageOrientationPatient = [*map(float, row_cos), *map(float, col_cos)]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * gap * normal]
        ds.SliceThickness = gap
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(vol[:, :, k].astype(np.uint16)).tobytes()
        p = folder / names(k)
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def write_cine(path: Path, frames: np.ndarray, pi: str = "MONOCHROME2", rle: bool = False, **tags) -> Path:
    """A multi-frame ultrasound DICOM: frames (T, H, W) or (T, H, W, 3)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = _uid(path.name)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = _uid(path.name, "series")
    ds.Modality = "US"
    ds.PatientName = "Doe^Jane"
    ds.NumberOfFrames = int(frames.shape[0])
    ds.Rows, ds.Columns = int(frames.shape[1]), int(frames.shape[2])
    ds.SamplesPerPixel = 3 if frames.ndim == 4 else 1
    if frames.ndim == 4:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = pi
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for k, v in tags.items():
        setattr(ds, k, v)
    if rle:
        ds.compress(RLELossless, np.ascontiguousarray(frames), generate_instance_uid=False)
    else:
        ds.PixelData = np.ascontiguousarray(frames.astype(np.uint8)).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_video(
    path: Path, frames: np.ndarray, fps: int = 10, codec: str = "mpeg4", faststart: bool = False
) -> Path:
    """Encode (T, H, W) uint8 frames with PyAV (``faststart``: mp4 index before the data)."""
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else None) as c:
        st = c.add_stream(codec, rate=fps)
        st.height, st.width = int(frames.shape[1]), int(frames.shape[2])
        st.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            st.options = {"qscale": "2"}
        for f in frames:
            vf = av.VideoFrame.from_ndarray(np.repeat(f[..., None], 3, axis=2), format="rgb24")
            for pkt in st.encode(vf):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    return path


def write_nifti(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return path


def _smooth_frames(t: int = 12, h: int = 48, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(128 + 100 * np.sin(xx / 6.0 + k / 2.0) * np.cos(yy / 7.0)) for k in range(t)]).astype(
        np.uint8
    )


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- real files


def test_prostatex_dicom_equals_its_nifti_conversion(real_data: Path) -> None:
    dcm = load_volume(real_data / PROSTATEX)
    nii = load_volume(real_data / f"{PROSTATEX}.nii.gz")
    assert dcm.format == "dicom" and nii.format == "nifti"
    assert dcm.array.shape == nii.array.shape == (320, 320, 19)
    assert dcm.array.dtype == np.float32
    np.testing.assert_array_equal(dcm.array, nii.array)  # same voxels in the same order
    np.testing.assert_allclose(dcm.affine, nii.affine, atol=1e-4)  # same world geometry
    assert nib.aff2axcodes(dcm.affine) == ("P", "I", "R")
    np.testing.assert_allclose(dcm.spacing, (0.5625, 0.5625, 3.6), atol=1e-5)
    # Only technical fields: no patient identifiers, whatever the header holds.
    text = json.dumps(dcm.meta)
    assert "ProstateX-0000" not in text
    assert not {"PatientName", "PatientID", "PatientBirthDate", "PatientAge"} & set(dcm.meta)
    assert dcm.meta["Modality"] == "MR" and dcm.meta["SeriesDescription"] == "t2_tse_sag"


def test_prostatex_order_does_not_depend_on_file_names(real_data: Path, tmp_path: Path) -> None:
    src = sorted((real_data / PROSTATEX).glob("*.dcm"))
    dst = tmp_path / "shuffled"
    dst.mkdir()
    rng = np.random.default_rng(0)
    for i, f in zip(rng.permutation(len(src)), src):
        shutil.copyfile(f, dst / f"img_{i:02d}.dcm")
    a, b = load_volume(dst), load_volume(real_data / PROSTATEX)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)


def test_real_clips_decode_to_expected_shapes(real_data: Path) -> None:
    ruq = load_clip(real_data / "us_sonocrop_pocus/ruq-simple.mp4")
    assert ruq.frames.shape == (201, 450, 800) and ruq.frames.dtype == np.uint8
    assert ruq.fps == pytest.approx(20.0)
    soft = load_clip(real_data / "us_sonocrop_pocus/simple-soft-tissue.mp4", max_frames=30)
    assert soft.frames.shape == (30, 600, 800) and soft.fps == pytest.approx(25.0)
    cine = load_clip(real_data / "us_gdcm_echo_multiframe_dicom/US-PAL-8-10x-echo.dcm")
    assert cine.frames.shape == (10, 430, 600) and cine.frames.dtype == np.uint8
    assert cine.fps == pytest.approx(1000.0 / 76.0)
    assert cine.meta["PhotometricInterpretation"] == "PALETTE COLOR"
    assert 0 < cine.frames.mean() < 255 and cine.frames.max() > 100


def test_real_soft_tissue_full_length(real_data: Path) -> None:
    soft = load_clip(real_data / "us_sonocrop_pocus/simple-soft-tissue.mp4")
    assert soft.frames.shape == (218, 600, 800)


def test_inspect_real_files(real_data: Path) -> None:
    from endodistill.data.inspect import format_inspection, inspect_path

    info = inspect_path(real_data / PROSTATEX)
    assert info["format"] == "dicom" and info["shape"] == [320, 320, 19]
    assert info["orientation"] == "PIR" and info["spacing"] == [0.5625, 0.5625, 3.6]
    assert info["intensity"]["max"] == 1115.0
    text = format_inspection(info)
    assert "PIR" in text and "ProstateX-0000\n" not in text.replace(str(real_data), "")
    clip = inspect_path(real_data / "us_gdcm_echo_multiframe_dicom/US-PAL-8-10x-echo.dcm")
    assert (clip["frames"], clip["height"], clip["width"]) == (10, 430, 600)
    assert clip["duration_s"] == pytest.approx(0.76)
    assert "fps:" in format_inspection(clip)


# --------------------------------------------------------------------------- synthetic formats


def test_oblique_dicom_matches_simpleitk_nifti_conversion(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 3000, size=(12, 10, 6)).astype(np.uint16)
    a, b = np.radians(20.0), np.radians(-35.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]]
    )
    folder = tmp_path / "oblique"
    # File names in reverse spatial order, so a name sort would be wrong.
    write_dicom_series(
        folder,
        vol,
        tuple(rot[:, 0]),
        tuple(rot[:, 1]),
        names=lambda k: f"z{99 - k:03d}.dcm",
        slope=2.0,
        intercept=-100.0,
    )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    nii = tmp_path / "sitk.nii.gz"
    sitk.WriteImage(reader.Execute(), str(nii))
    ref = nib.load(str(nii))
    ours = load_volume(folder)
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(ours.array, np.asarray(ref.dataobj, dtype=np.float32), atol=1e-3)
    # Rescale applied: stored value v -> 2 v - 100; voxel (i=col, j=row) of slice k.
    assert ours.array[3, 5, 0] == pytest.approx(2.0 * vol[5, 3, 0] - 100.0)
    assert "Doe" not in json.dumps(ours.meta) and "SECRET" not in json.dumps(ours.meta)


def test_metaimage_and_nrrd_match_nifti_geometry(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    arr = rng.normal(size=(7, 6, 5)).astype(np.float32)
    aff = np.array([[0, 0, 2.0, 10], [-1.5, 0, 0, 20], [0, -1.0, 0, -5], [0, 0, 0, 1]])
    nii = write_nifti(tmp_path / "v.nii.gz", arr, aff)
    img = sitk.ReadImage(str(nii))
    for name in ("v.mha", "v.nrrd"):
        sitk.WriteImage(img, str(tmp_path / name))
        v = load_volume(tmp_path / name)
        np.testing.assert_allclose(v.array, arr, atol=1e-6)
        np.testing.assert_allclose(v.affine, aff, atol=1e-5)
    assert load_volume(tmp_path / "v.nrrd").format == "nrrd"


def test_several_series_listed_then_selectable(tmp_path: Path) -> None:
    folder = tmp_path / "two"
    vol = np.arange(4 * 5 * 3, dtype=np.uint16).reshape(4, 5, 3)
    write_dicom_series(folder, vol, series="a", names=lambda k: f"a{k}.dcm")
    write_dicom_series(folder, vol + 7, series="b", names=lambda k: f"b{k}.dcm")
    with pytest.raises(InputError) as e:
        load_volume(folder)
    msg = str(e.value)
    assert "2 DICOM series" in msg and _uid("a") in msg and _uid("b") in msg and "desc b" in msg
    assert "\n" not in msg
    v = load_volume(folder, series_uid=_uid("b"))
    assert v.array[0, 0, 0] == 7.0
    assert {s["uid"] for s in describe_series(folder)} == {_uid("a"), _uid("b")}


def test_dicom_cine_photometric_variants(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, size=(4, 6, 8)).astype(np.uint8)
    # MONOCHROME2, RLE lossless: exact.
    c = load_clip(write_cine(tmp_path / "rle.dcm", gray, rle=True, FrameTime=50.0))
    np.testing.assert_array_equal(c.frames, gray)
    assert c.fps == pytest.approx(20.0)
    # MONOCHROME1: inverted so that bright means echo.
    c = load_clip(write_cine(tmp_path / "m1.dcm", gray, pi="MONOCHROME1", CineRate=15))
    np.testing.assert_array_equal(c.frames, 255 - gray)
    assert c.fps == pytest.approx(15.0)
    # YBR_FULL: grayscale is the luma plane (Cb = Cr = 128 means no colour).
    ybr = np.stack([gray, np.full_like(gray, 128), np.full_like(gray, 128)], axis=-1)
    c = load_clip(write_cine(tmp_path / "ybr.dcm", ybr, pi="YBR_FULL", RecommendedDisplayFrameRate=30))
    assert np.abs(c.frames.astype(int) - gray).max() <= 1
    assert c.fps == pytest.approx(30.0)
    # No frame-rate tag: the default, with a note.
    c = load_clip(write_cine(tmp_path / "nofps.dcm", gray))
    assert c.fps == 10.0 and "fps_note" in c.meta


def test_png_folder_natural_order_and_fps(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(12):  # frame_10 must come after frame_9
        Image.fromarray(np.full((5, 7), k * 10, dtype=np.uint8)).save(folder / f"frame_{k}.png")
    c = load_clip(folder)
    assert c.fps == 10.0 and "fps_note" in c.meta
    assert [int(f[0, 0]) for f in c.frames] == [k * 10 for k in range(12)]
    (folder / "fps.txt").write_text("24\n")
    assert load_clip(folder).fps == 24.0


def test_npy_clip_and_video_roundtrip(tmp_path: Path) -> None:
    frames = _smooth_frames()
    np.save(tmp_path / "c.npy", frames)
    c = load_clip(tmp_path / "c.npy")
    np.testing.assert_array_equal(c.frames, frames)
    np.save(tmp_path / "rgb.npy", np.repeat(frames[..., None], 3, axis=-1).astype(np.float32) / 255.0)
    (tmp_path / "rgb.json").write_text('{"fps": 12.5}')
    c = load_clip(tmp_path / "rgb.npy")
    assert np.abs(c.frames.astype(int) - frames).max() <= 1 and c.fps == 12.5
    v = load_clip(write_video(tmp_path / "c.mp4", frames, fps=12))
    assert v.frames.shape == frames.shape and v.fps == pytest.approx(12.0)
    assert np.abs(v.frames.astype(float) - frames).mean() < 6  # lossy codec, same picture
    assert load_clip(tmp_path / "c.mp4", max_frames=5).frames.shape[0] == 5


# ----------------------------------------------------------------------------- broken corpus


def _nifti_bytes(arr: np.ndarray) -> bytes:
    img = nib.Nifti1Image(arr, np.eye(4))
    bio = io.BytesIO()
    img.to_file_map({"image": nib.FileHolder(fileobj=bio), "header": nib.FileHolder(fileobj=bio)})
    return bio.getvalue()


def _good_vol() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)


def _huge_header(version: int) -> bytes:
    hdr = nib.Nifti2Header() if version == 2 else nib.Nifti1Header()
    shape = (10**6, 10**6, 10**6) if version == 2 else (32767, 32767, 32767)
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    bio = io.BytesIO()
    hdr.write_to(bio)
    return bio.getvalue() + b"\0" * 104


def _mri_cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (broken input, a fragment of the expected reason)."""
    good = _nifti_bytes(_good_vol())
    cases: dict[str, tuple[Path, str]] = {}

    def put(name: str, data: bytes, reason: str) -> None:
        (tmp / name).write_bytes(data)
        cases[name] = (tmp / name, reason)

    put("truncated.nii.gz", gzip.compress(good)[:300], "truncated or corrupt gzip")
    put("truncated_data.nii.gz", gzip.compress(good)[:-400], "truncated")
    put("truncated_raw.nii", good[:600], "truncated")
    put("wrong_magic.nii", good[:344] + b"xx\0\0" + good[348:], "wrong magic")
    put("text.nii.gz", b"this is not an image\n" * 20, "not gzip")
    put("gz_of_text.nii.gz", gzip.compress(b"hello " * 200), "wrong magic")
    put("zero.nii.gz", b"", "empty file")
    put("huge1.nii", _huge_header(1), "GiB limit")
    put("huge2.nii", _huge_header(2), "GiB limit")
    put("two_d.nii", _nifti_bytes(np.zeros((8, 8), np.float32)), "2D image")
    put("four_d.nii", _nifti_bytes(np.zeros((4, 4, 4, 3), np.float32)), "4D image")
    put("empty_dim.nii", _nifti_bytes(np.zeros((0, 4, 4), np.float32)), "empty volume")
    nan = _good_vol()
    nan[1, 2, 3] = np.nan
    put("nan.nii", _nifti_bytes(nan), "NaN/inf")
    inf = _good_vol()
    inf[0, 0, 0] = np.inf
    put("inf.nii.gz", gzip.compress(_nifti_bytes(inf)), "NaN/inf")
    zero_zoom = nib.Nifti1Image(_good_vol(), None)
    zero_zoom.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    nib.save(zero_zoom, str(tmp / "singular.nii"))
    cases["singular.nii"] = (tmp / "singular.nii", "singular")
    put("garbage.mha", b"ObjectType = Image\nNDims = banana\n", "not a readable metaimage")
    put(
        "missing_raw.mhd",
        b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_FLOAT\nElementDataFile = gone.raw\n",
        "missing data file",
    )
    put("garbage.nrrd", b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4\n\n", "not a readable nrrd")
    put("notes.txt", b"hello", "unsupported MRI format")
    return cases


def _dicom_cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    vol = np.arange(6 * 5 * 4, dtype=np.uint16).reshape(6, 5, 4)
    cases: dict[str, tuple[Path, str]] = {}
    (tmp / "empty_dir").mkdir()
    cases["empty_dir"] = (tmp / "empty_dir", "empty folder")
    (tmp / "no_dicom").mkdir()
    (tmp / "no_dicom" / "readme.txt").write_text("nothing here")
    cases["no_dicom"] = (tmp / "no_dicom", "no DICOM image files")

    files = write_dicom_series(tmp / "no_pixels", vol)
    ds = pydicom.dcmread(files[2])
    del ds.PixelData
    ds.save_as(files[2])
    cases["no_pixels"] = (files[2], "no pixel data")

    files = write_dicom_series(tmp / "no_position", vol)
    ds = pydicom.dcmread(files[1])
    del ds.ImagePositionPatient
    ds.save_as(files[1])
    cases["no_position"] = (files[1], "missing ImagePositionPatient")

    files = write_dicom_series(tmp / "no_orientation", vol)
    ds = pydicom.dcmread(files[0])
    del ds.ImageOrientationPatient
    ds.save_as(files[0])
    cases["no_orientation"] = (files[0], "missing ImageOrientationPatient")

    files = write_dicom_series(tmp / "gap", np.concatenate([vol, vol], axis=2))
    files[3].unlink()
    cases["gap"] = (tmp / "gap", "inconsistent slice spacing")

    files = write_dicom_series(tmp / "mixed_shape", vol)
    ds = pydicom.dcmread(files[3])
    ds.Rows, ds.Columns = 3, 2
    ds.PixelData = np.zeros((3, 2), np.uint16).tobytes()
    ds.save_as(files[3])
    cases["mixed_shape"] = (files[3], "differs")

    write_dicom_series(tmp / "mixed_series", vol, series="x", names=lambda k: f"x{k}.dcm")
    write_dicom_series(tmp / "mixed_series", vol, series="y", names=lambda k: f"y{k}.dcm")
    cases["mixed_series"] = (tmp / "mixed_series", "2 DICOM series")

    write_dicom_series(tmp / "one_slice", vol[:, :, :1])
    cases["one_slice"] = (tmp / "one_slice", "only one slice")

    files = write_dicom_series(tmp / "duplicate", vol)
    shutil.copyfile(files[1], files[1].with_name("copy.dcm"))
    ds = pydicom.dcmread(files[1].with_name("copy.dcm"))
    ds.SOPInstanceUID = _uid("dup")
    ds.save_as(files[1].with_name("copy.dcm"))
    cases["duplicate"] = (tmp / "duplicate", "same position")

    files = write_dicom_series(tmp / "short_pixels", vol)
    ds = pydicom.dcmread(files[0])
    ds.PixelData = ds.PixelData[:10]
    ds.save_as(files[0])
    cases["short_pixels"] = (files[0], "cannot decode pixel data")

    (tmp / "single_file.dcm").write_bytes(files[1].read_bytes())
    cases["single_file.dcm"] = (tmp / "single_file.dcm", "single DICOM file")
    return cases


def _clip_cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    from PIL import Image

    frames = _smooth_frames()
    cases: dict[str, tuple[Path, str]] = {}
    good = write_video(tmp / "good_faststart.mp4", frames).read_bytes()
    (tmp / "good_faststart.mp4").unlink()

    def put(name: str, data: bytes, reason: str) -> None:
        (tmp / name).write_bytes(data)
        cases[name] = (tmp / name, reason)

    put("truncated.mp4", good[: len(good) // 2], "not a readable video")
    fast = write_video(tmp / "fast.mp4", frames, faststart=True).read_bytes()
    (tmp / "fast.mp4").unlink()
    put("truncated_faststart.mp4", fast[: len(fast) // 2], "truncated")
    put("text.mp4", b"definitely not a video\n" * 50, "not a video")
    put("zero.mp4", b"", "empty file")
    avi = write_video(tmp / "tmp.avi", frames).read_bytes()
    (tmp / "tmp.avi").unlink()
    put("codec.avi", avi.replace(b"FMP4", b"QQQQ"), "unsupported video codec")
    # A truncated AVI keeps its index-free header: decoding stops early.
    put("truncated.avi", avi[: len(avi) // 2], "truncated")
    put("truncated_tail.avi", avi[:-3000], "truncated")
    with av.open(str(tmp / "zero_frames.avi"), "w") as c:
        st = c.add_stream("mpeg4", rate=10)
        st.width, st.height, st.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()
    cases["zero_frames.avi"] = (tmp / "zero_frames.avi", "no frames")
    write_video(tmp / "one_frame.mp4", frames[:1])
    cases["one_frame.mp4"] = (tmp / "one_frame.mp4", "only one frame")
    np.save(tmp / "pickle.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    cases["pickle.npy"] = (tmp / "pickle.npy", "pickle")
    np.save(tmp / "two_d.npy", np.zeros((5, 5), np.uint8))
    cases["two_d.npy"] = (tmp / "two_d.npy", "a clip must be")
    np.save(tmp / "one.npy", np.zeros((1, 5, 5), np.uint8))
    cases["one.npy"] = (tmp / "one.npy", "only one frame")
    np.save(tmp / "nan.npy", np.full((3, 4, 4), np.nan, np.float32))
    cases["nan.npy"] = (tmp / "nan.npy", "NaN/inf")
    put("text.npy", b"not numpy", "not a readable .npy")
    (tmp / "no_png").mkdir()
    cases["no_png"] = (tmp / "no_png", "no PNG frames")
    (tmp / "bad_png").mkdir()
    Image.fromarray(frames[0]).save(tmp / "bad_png" / "f0.png")
    (tmp / "bad_png" / "f1.png").write_bytes(b"\x89PNG broken")
    cases["bad_png"] = (tmp / "bad_png" / "f1.png", "not a readable PNG")
    (tmp / "mixed_png").mkdir()
    Image.fromarray(frames[0]).save(tmp / "mixed_png" / "f0.png")
    Image.fromarray(frames[1][:10]).save(tmp / "mixed_png" / "f1.png")
    cases["mixed_png"] = (tmp / "mixed_png" / "f1.png", "differs")
    (tmp / "bad_fps").mkdir()
    for k in range(3):
        Image.fromarray(frames[k]).save(tmp / "bad_fps" / f"f{k}.png")
    (tmp / "bad_fps" / "fps.txt").write_text("fast")
    cases["bad_fps"] = (tmp / "bad_fps" / "fps.txt", "fps.txt")
    write_cine(tmp / "cine_one.dcm", frames[:1])
    cases["cine_one.dcm"] = (tmp / "cine_one.dcm", "only one frame")
    cine = write_cine(tmp / "cine_tmp.dcm", frames).read_bytes()
    (tmp / "cine_tmp.dcm").unlink()
    put("cine_truncated.dcm", cine[: len(cine) - 5000], "")
    put("cine_text.dcm", b"hello" * 100, "not a readable DICOM")
    ds = pydicom.dcmread(io.BytesIO(cine))
    del ds.PixelData
    ds.save_as(tmp / "cine_nopix.dcm")
    cases["cine_nopix.dcm"] = (tmp / "cine_nopix.dcm", "no pixel data")
    put("clip.gif", b"GIF89a", "unsupported clip format")
    return cases


def _check_error(fn: Callable[[Path], object], target: Path, named: Path, fragment: str, tmp: Path) -> None:
    """``fn(target)`` raises a one-line InputError naming ``named`` and saying ``fragment``; no input changes."""
    before = _sha(tmp)
    with pytest.raises(InputError) as e:
        fn(target)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert named.name in msg, msg
    assert fragment.lower() in e.value.reason.lower(), msg
    assert e.value.exit_code == 2
    assert _sha(tmp) == before  # inputs never modified


def test_broken_mri_files(tmp_path: Path) -> None:
    cases = _mri_cases(tmp_path)
    for _, (path, fragment) in sorted(cases.items()):
        _check_error(load_volume, path, path, fragment, tmp_path)
    assert len(cases) >= 18


def test_broken_dicom_folders(tmp_path: Path) -> None:
    cases = _dicom_cases(tmp_path)
    for _, (path, fragment) in sorted(cases.items()):
        # The message names the offending slice file where there is one, else the folder.
        target = path if path.is_dir() or path.parent == tmp_path else path.parent
        _check_error(load_volume, target, path, fragment, tmp_path)
    assert len(cases) >= 12


def test_broken_clips(tmp_path: Path) -> None:
    cases = _clip_cases(tmp_path)
    for _, (path, fragment) in sorted(cases.items()):
        target = path if path.is_dir() or path.parent == tmp_path else path.parent
        _check_error(load_clip, target, path, fragment, tmp_path)
    assert len(cases) >= 20


def test_huge_header_fails_with_bounded_memory(tmp_path: Path) -> None:
    (tmp_path / "huge.nii").write_bytes(_huge_header(2))
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="GiB limit"):
            load_volume(tmp_path / "huge.nii")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 1024**2


def test_cli_inspect_broken_file_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_text("not a video")
    exe = Path(sys.executable).with_name("endodistill")
    res = subprocess.run([str(exe), "inspect", str(bad)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: ") and "Traceback" not in res.stderr
