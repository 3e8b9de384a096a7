"""Manifest reading and validation: every kind of bad manifest gives its problem, clean gives none."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import av
import nibabel as nib
import numpy as np
import pytest

from endodistill.data import manifest as mf
from endodistill.data.manifest import Problem, read_manifest, validate_manifest
from endodistill.errors import InputError

HEADER = ["subject_id", "modality", "path", "label", "site"]
HAVE_MRI = importlib.util.find_spec("endodistill.data.mri") is not None
HAVE_VIDEO = importlib.util.find_spec("endodistill.data.video") is not None
HAVE_READERS = HAVE_MRI and HAVE_VIDEO
needs_readers = pytest.mark.skipif(not HAVE_READERS, reason="MRI/video readers (helper C) not available yet")


# ------------------------------------------------------------------------------------------ helpers


def write_nifti(
    path: Path,
    seed: int = 0,
    shape: tuple[int, ...] = (8, 8, 4),
    spacing: tuple[float, float, float] = (1.0, 1.0, 3.0),
    fill: float | None = None,
    nan: bool = False,
) -> Path:
    """A tiny float32 NIfTI volume (random content unless ``fill``)."""
    rng = np.random.default_rng(seed)
    arr = np.full(shape, fill, np.float32) if fill is not None else rng.random(shape, dtype=np.float32) * 100
    if nan:
        arr.flat[0] = np.nan
    affine = np.diag([*spacing, 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def write_mp4(path: Path, seed: int = 0, n_frames: int = 8, size: int = 32) -> Path:
    """A tiny H.264 clip of random frames (PyAV)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(n_frames):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_manifest(folder: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    path = folder / "manifest.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


CLEAN_ROWS = [
    ["s1", "mri", "mri/s1.nii.gz", "0", "A"],
    ["s2", "mri", "mri/s2.nii.gz", "0", "B"],
    ["s3", "mri", "mri/s3.nii.gz", "1", "A"],
    ["s4", "mri", "mri/s4.nii.gz", "1", "B"],
    ["u1", "mri", "mri/u1.nii.gz", "", "A"],
    ["t1", "tvus", "tvus/t1.mp4", "0", "A"],
    ["t2", "tvus", "tvus/t2.mp4", "1", "B"],
]


@pytest.fixture(scope="module")
def _clean_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean_cohort")
    for i, row in enumerate(CLEAN_ROWS):
        if row[1] == "mri":
            write_nifti(root / row[2], seed=i)
        else:
            write_mp4(root / row[2], seed=i)
    write_manifest(root, CLEAN_ROWS)
    return root


@pytest.fixture
def cohort(_clean_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of a small clean cohort (5 MRI incl. 1 unlabelled, 2 TVUS clips)."""
    dst = tmp_path / "cohort"
    shutil.copytree(_clean_template, dst)
    return dst


def rows_copy() -> list[list[str]]:
    return [list(r) for r in CLEAN_ROWS]


def checksums(folder: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------------------------- read_manifest


def test_read_clean_manifest(cohort: Path) -> None:
    m = read_manifest(cohort / "manifest.csv")
    assert len(m.records) == len(CLEAN_ROWS)
    first = m.records[0]
    assert first.subject_id == "s1" and first.modality == "mri" and first.label == 0
    assert first.path == (cohort / "mri/s1.nii.gz").resolve() and first.path.is_absolute()
    assert first.extra == {"site": "A"}
    assert [r.row for r in m.records] == list(range(2, 2 + len(CLEAN_ROWS)))  # header is line 1
    assert m.records[4].label is None
    assert [r.subject_id for r in m.select("mri", labelled=True)] == ["s1", "s2", "s3", "s4"]
    assert [r.subject_id for r in m.select("mri", labelled=False)] == ["u1"]
    assert [r.subject_id for r in m.select("tvus")] == ["t1", "t2"]
    assert len(m.select(labelled=True)) == 6


def test_read_tolerates_bom_case_blank_lines_and_float_labels(tmp_path: Path) -> None:
    text = "subject_id,modality,path,label\n\ns1, MRI ,a.nii.gz,1.0\ns2,tvus,b.mp4,\n"
    path = tmp_path / "manifest.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    m = read_manifest(path)
    assert [(r.subject_id, r.modality, r.label, r.row) for r in m.records] == [
        ("s1", "mri", 1, 3),
        ("s2", "tvus", None, 4),
    ]


def test_series_uid_column_is_kept(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path, [["s1", "mri", "dicom/", "0", "1.2.3"]], header=[*HEADER[:4], "series_uid"]
    )
    rec = read_manifest(path).records[0]
    assert rec.series_uid == "1.2.3" and rec.extra == {"series_uid": "1.2.3"}


@pytest.mark.parametrize("raw", ["../outside.nii.gz", "mri/../../outside.nii.gz", "ABSOLUTE"])
def test_paths_outside_the_folder_work_unless_restricted(tmp_path: Path, raw: str) -> None:
    inside = tmp_path / "cohort"
    inside.mkdir()
    outside = write_nifti(tmp_path / "outside.nii.gz")
    raw = str(outside) if raw == "ABSOLUTE" else raw
    path = write_manifest(inside, [["s1", "mri", raw, "0", "A"]])
    assert read_manifest(path).records[0].path == outside.resolve()  # the default: accepted
    with pytest.raises(InputError) as e:
        read_manifest(path, restrict_paths=True)
    assert e.value.path == f"{path}:2"  # the row
    assert raw in e.value.reason and "data.restrict_paths" in e.value.reason  # the file and the setting
    assert "outside" in e.value.reason or "absolute" in e.value.reason


def test_allow_outside_paths_key_of_old_configs_is_accepted() -> None:
    from endodistill.config import load_config

    for value in (True, False):  # saved configs hold the old key, always written: both mean the default
        cfg = load_config(None, {"data": {"allow_outside_paths": value}})
        assert cfg.data.restrict_paths is False
        assert "allow_outside_paths" not in cfg.data.model_dump()
    assert load_config(None, {"data": {"restrict_paths": True}}).data.restrict_paths is True


def test_symlink_inside_the_folder_is_allowed(tmp_path: Path) -> None:
    # A data folder linked from another disk is a normal set-up; only the manifest's text is policed.
    store = tmp_path / "store"
    write_nifti(store / "s1.nii.gz")
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "data").symlink_to(store)
    path = write_manifest(cohort, [["s1", "mri", "data/s1.nii.gz", "0", "A"]])
    assert read_manifest(path).records[0].path == (store / "s1.nii.gz").resolve()


def test_read_stops_at_first_bad_row(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path, [["s1", "mri", "a.nii.gz", "0", "A"], ["s2", "mri", "b.nii.gz", "7", "A"]]
    )
    with pytest.raises(InputError) as e:
        read_manifest(path)
    assert e.value.path == f"{path}:3" and "'s2'" in e.value.reason and "label '7'" in e.value.reason
    assert read_manifest(path, num_classes=8).records[1].label == 7


# Structural problems: read_manifest raises, validate_manifest returns exactly one problem naming the file.
def _huge(folder: Path) -> Path:
    path = write_manifest(folder, [["s1", "mri", "a.nii.gz", "0", "A"]])
    with open(path, "r+b") as fh:  # sparse: large on paper, nothing allocated
        fh.truncate(mf.MAX_MANIFEST_BYTES + 1)
    return path


def _raw(data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / "m.csv").write_bytes(data)
        return folder / "m.csv"

    return make


def _folder(folder: Path) -> Path:
    (folder / "dir.csv").mkdir()
    return folder / "dir.csv"


STRUCTURAL: dict[str, tuple[Callable[[Path], Path], str]] = {
    "not_found": (lambda d: d / "nope.csv", "not found"),
    "directory": (_folder, "not a file"),
    "empty": (_raw(b""), "empty"),
    "blank_lines_only": (_raw(b"\n\n \n"), "empty"),
    "header_only": (lambda d: write_manifest(d, []), "no rows"),
    "missing_column": (
        lambda d: write_manifest(d, [["s1", "mri", "0"]], header=["subject_id", "modality", "label"]),
        "missing column(s) path",
    ),
    "non_utf8": (
        _raw(b"subject_id,modality,path,label\ns\xe9,mri,a.nii.gz,0\n"),  # latin-1 e-acute
        "not UTF-8",
    ),
    "semicolons": (
        _raw(b"subject_id;modality;path;label\ns1;mri;a.nii.gz;0\n"),
        "separated by commas",
    ),
    "duplicate_column": (
        lambda d: write_manifest(d, [["s1", "mri", "a", "0", "1"]], header=[*HEADER[:4], "label"]),
        "duplicate column",
    ),
    "huge_file": (_huge, "MB limit"),
    "giant_field": (
        lambda d: write_manifest(d, [["s1", "mri", "a" * 200_000, "0", "A"]]),
        "malformed csv",
    ),
}


@pytest.mark.parametrize("kind", sorted(STRUCTURAL))
def test_structural_problems(tmp_path: Path, kind: str) -> None:
    make, expected = STRUCTURAL[kind]
    path = make(tmp_path)
    with pytest.raises(InputError) as e:
        read_manifest(path)
    assert e.value.path == str(path) and expected in e.value.reason
    problems = validate_manifest(path, decode=False)
    assert len(problems) == 1 and problems[0].where == str(path) and expected in problems[0].reason


def test_too_many_rows_refused_while_streaming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mf, "MAX_MANIFEST_ROWS", 5)
    path = write_manifest(tmp_path, [[f"s{i}", "mri", f"{i}.nii.gz", "0", "A"] for i in range(6)])
    with pytest.raises(InputError, match="more than 5 rows"):
        read_manifest(path)
    path = write_manifest(tmp_path, [[f"s{i}", "mri", f"{i}.nii.gz", "0", "A"] for i in range(5)])
    assert len(read_manifest(path).records) == 5


# ---------------------------------------------------------------------------------- validate_manifest


def test_clean_manifest_has_no_problem(cohort: Path) -> None:
    assert validate_manifest(cohort / "manifest.csv", decode=False) == []


def _set(row: int, col: int, value: str) -> Callable[[Path, list[list[str]]], None]:
    def edit(d: Path, rows: list[list[str]]) -> None:
        rows[row][col] = value

    return edit


def _append(
    row: list[str], make: Callable[[Path], object] | None = None
) -> Callable[[Path, list[list[str]]], None]:
    def edit(d: Path, rows: list[list[str]]) -> None:
        if make is not None:
            make(d)
        rows.append(list(row))

    return edit


def _drop(subject: str) -> Callable[[Path, list[list[str]]], None]:
    def edit(d: Path, rows: list[list[str]]) -> None:
        rows[:] = [r for r in rows if r[0] != subject]

    return edit


def _drop_labels(*subjects: str) -> Callable[[Path, list[list[str]]], None]:
    def edit(d: Path, rows: list[list[str]]) -> None:
        for r in rows:
            if r[0] in subjects:
                r[3] = ""

    return edit


def _all_mri_unlabelled(d: Path, rows: list[list[str]]) -> None:
    for r in rows:
        if r[1] == "mri":
            r[3] = ""


def _outside(d: Path, rows: list[list[str]]) -> None:
    write_nifti(d.parent / "outside.nii.gz", seed=99)
    rows[4][2] = "../outside.nii.gz"


def _absolute(d: Path, rows: list[list[str]]) -> None:
    rows[4][2] = str(write_nifti(d.parent / "elsewhere.nii.gz", seed=98))


# kind -> (edit of the clean cohort, expected text of the single problem, 0-based index of the bad row or None)
BAD: dict[str, tuple[Callable[[Path, list[list[str]]], None], str, int | None]] = {
    "missing_file": (_set(4, 2, "mri/nope.nii.gz"), "mri/nope.nii.gz: file not found", 4),
    "unknown_modality": (_set(4, 1, "ct"), "unknown modality 'ct'", 4),
    "label_out_of_range": (_set(4, 3, "2"), "subject 'u1': label '2' is not one of 0..1 or empty", 4),
    "label_negative": (_set(4, 3, "-1"), "label '-1' is not one of 0..1", 4),
    "label_not_a_number": (_set(4, 3, "yes"), "label 'yes' is not one of 0..1", 4),
    "label_fraction": (_set(4, 3, "0.5"), "label '0.5' is not one of 0..1", 4),
    "duplicate_row": (_append(CLEAN_ROWS[0]), "duplicate row for subject 's1'", 0),
    "conflicting_labels": (
        _append(
            ["s1", "mri", "mri/s1b.nii.gz", "1", "A"], lambda d: write_nifti(d / "mri/s1b.nii.gz", seed=50)
        ),
        "subject 's1' has conflicting labels 0 (row 2), 1 (row 9)",
        0,
    ),
    "conflicting_labels_across_modalities": (
        _append(["s1", "tvus", "tvus/s1.mp4", "1", "A"], lambda d: write_mp4(d / "tvus/s1.mp4", seed=51)),
        "subject 's1' has conflicting labels",
        0,
    ),
    "same_file_two_subjects": (
        _append(["x9", "mri", "mri/s1.nii.gz", "0", "A"]),
        "mri/s1.nii.gz: the same file is listed under subjects 's1' (row 2) and 'x9' (row 9)",
        0,
    ),
    "same_content_two_subjects": (
        _append(
            ["x9", "mri", "mri/x9.nii.gz", "0", "A"],
            lambda d: shutil.copyfile(d / "mri/s1.nii.gz", d / "mri/x9.nii.gz"),
        ),
        "mri/x9.nii.gz has the same content as mri/s1.nii.gz, under different subjects 'x9' and 's1'",
        0,
    ),
    "tvus_class_missing": (_drop("t2"), "class(es) 1 missing from the labelled 'tvus' set", None),
    "no_tvus_at_all": (
        lambda d, rows: rows.__setitem__(slice(None), [r for r in rows if r[1] != "tvus"]),
        "no labelled 'tvus' case",
        None,
    ),
    "no_labelled_mri": (_all_mri_unlabelled, "no labelled 'mri' case", None),
    "mri_class_missing": (_drop_labels("s3", "s4"), "class(es) 1 missing from the labelled 'mri' set", None),
    "empty_file": (
        _append(["x9", "mri", "mri/x9.nii.gz", "", "A"], lambda d: (d / "mri/x9.nii.gz").write_bytes(b"")),
        "mri/x9.nii.gz: empty file (0 bytes)",
        7,
    ),
    "empty_folder": (
        _append(["x9", "mri", "mri/dicom_x9", "", "A"], lambda d: (d / "mri/dicom_x9").mkdir()),
        "mri/dicom_x9: empty folder",
        7,
    ),
    "wrong_field_count": (_set(4, 4, "A,extra"), "has 6 fields, the header has 5", 4),
    "empty_subject": (_set(4, 0, ""), "empty subject_id", 4),
    "empty_path": (_set(4, 2, ""), "empty path", 4),
    "empty_modality": (_set(4, 1, ""), "empty modality", 4),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_manifest_gives_its_problem(cohort: Path, kind: str) -> None:
    edit, expected, bad_row = BAD[kind]
    rows = rows_copy()
    edit(cohort, rows)
    if kind == "wrong_field_count":  # csv.writer would quote the comma; write the broken line by hand
        path = write_manifest(cohort, rows)
        path.write_text(path.read_text().replace('"A,extra"', "A,extra"))
    else:
        path = write_manifest(cohort, rows)
    problems = validate_manifest(path, decode=False)
    assert len(problems) == 1, [str(p) for p in problems]
    p = problems[0]
    assert expected in p.reason, str(p)
    assert str(p) == f"{p.where}: {p.reason}" and "\n" not in str(p)
    assert p.where.startswith(str(path))
    if bad_row is not None:
        assert str(bad_row + 2) in p.where.split(":")[-1]  # the csv line (header is line 1)


def test_all_problems_are_reported_at_once(cohort: Path) -> None:
    rows = rows_copy()
    rows[0][2] = "mri/gone.nii.gz"
    rows[1][1] = "pet"
    rows[4][3] = "9"
    rows.append(list(rows[3]))
    rows = [r for r in rows if r[0] != "t2"]
    path = write_manifest(cohort, rows)
    text = "\n".join(map(str, validate_manifest(path, decode=False)))
    for expected in ("file not found", "unknown modality 'pet'", "label '9'", "duplicate row", "'tvus' set"):
        assert expected in text
    assert len(text.splitlines()) == 5


def test_validate_uses_config(cohort: Path) -> None:
    from endodistill.config import load_config

    rows = rows_copy()
    rows[4][3] = "2"
    for r in rows:
        if r[1] == "mri":
            r[1] = "t2w"
    path = write_manifest(cohort, rows)
    cfg = load_config(
        None,
        {"task": {"num_classes": 3, "class_names": ["a", "b", "c"], "student_modality": "t2w"}},
    )
    problems = validate_manifest(path, cfg=cfg, decode=False)
    # 3 classes: label 2 is valid and 't2w' is the student modality, but the teacher set lacks class 2.
    assert [p.reason for p in problems] == [
        "class(es) 2 missing from the labelled 'tvus' set (label-matched distillation is impossible)"
    ]
    outside = _outside
    rows = rows_copy()
    outside(cohort, rows)
    path = write_manifest(cohort, rows)
    assert validate_manifest(path, decode=False) == []  # outside paths work by default
    restrict = load_config(None, {"data": {"restrict_paths": True}})
    problems = validate_manifest(path, cfg=restrict, decode=False)
    assert [p.reason for p in problems] == [
        "path '../outside.nii.gz' points outside the manifest's folder (data.restrict_paths is set)"
    ]
    assert problems[0].where == f"{path}:6"
    rows = rows_copy()
    _absolute(cohort, rows)
    path = write_manifest(cohort, rows)
    assert validate_manifest(path, decode=False) == []
    problems = validate_manifest(path, cfg=restrict, decode=False)
    assert len(problems) == 1 and "absolute path" in problems[0].reason and problems[0].where == f"{path}:6"


def test_reading_and_validating_never_modify_files(cohort: Path) -> None:
    rows = rows_copy()
    rows.append(["x9", "mri", "mri/bad.nii.gz", "", "A"])
    (cohort / "mri/bad.nii.gz").write_bytes(b"not a nifti at all")
    path = write_manifest(cohort, rows)
    before = checksums(cohort)
    mtimes = {p: os.stat(p).st_mtime_ns for p in before}
    read_manifest(path)
    validate_manifest(path, decode=HAVE_READERS)
    assert checksums(cohort) == before
    assert {p: os.stat(p).st_mtime_ns for p in before} == mtimes
    assert sorted(str(p) for p in cohort.rglob("*") if p.is_file()) == sorted(before)  # nothing new written


def test_problem_str() -> None:
    assert str(Problem("m.csv:3", "mri/a.nii.gz: file not found")) == "m.csv:3: mri/a.nii.gz: file not found"


# ------------------------------------------------------------------------ decode checks (helper C's readers)


def _replace_file(rel: str, make: Callable[[Path], object]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        (d / rel).unlink()
        make(d / rel)

    return edit


def _truncated_nifti(path: Path) -> None:
    full = write_nifti(path.with_name("full.nii.gz"), seed=7, shape=(16, 16, 8))
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])


DECODE_BAD: dict[str, tuple[Callable[[Path], None], str]] = {
    "mri_not_an_image": (
        _replace_file("mri/u1.nii.gz", lambda p: p.write_text("hello, I am text")),
        r"mri/u1\.nii\.gz: cannot load",
    ),
    "mri_truncated": (
        _replace_file("mri/u1.nii.gz", lambda p: _truncated_nifti(p)),
        r"mri/u1\.nii\.gz: cannot load",
    ),
    "mri_2d": (
        _replace_file("mri/u1.nii.gz", lambda p: write_nifti(p, seed=7, shape=(8, 8))),
        r"mri/u1\.nii\.gz: (cannot load.*|a 2D image.*|not a 3D volume.*)",
    ),
    "mri_single_slice": (
        _replace_file("mri/u1.nii.gz", lambda p: write_nifti(p, seed=7, shape=(8, 8, 1))),
        r"mri/u1\.nii\.gz: (cannot load.*|a 2D image.*)",
    ),
    "mri_nan": (
        _replace_file("mri/u1.nii.gz", lambda p: write_nifti(p, seed=7, nan=True)),
        r"mri/u1\.nii\.gz: (1 NaN/inf voxel|cannot load.*(NaN|finite))",
    ),
    "mri_constant": (
        _replace_file("mri/u1.nii.gz", lambda p: write_nifti(p, fill=3.0)),
        r"mri/u1\.nii\.gz: (constant volume|cannot load.*constant)",
    ),
    "mri_tiny_spacing": (
        _replace_file("mri/u1.nii.gz", lambda p: write_nifti(p, seed=7, spacing=(0.001, 1.0, 1.0))),
        r"mri/u1\.nii\.gz: (absurd voxel spacing|cannot load.*spacing)",
    ),
    "mri_huge_spacing": (
        _replace_file("mri/u1.nii.gz", lambda p: write_nifti(p, seed=7, spacing=(1.0, 1.0, 50.0))),
        r"mri/u1\.nii\.gz: (absurd voxel spacing|cannot load.*spacing)",
    ),
    "clip_not_a_video": (
        _replace_file("tvus/t1.mp4", lambda p: p.write_text("this is a text file renamed .mp4")),
        r"tvus/t1\.mp4: cannot load",
    ),
    "clip_single_frame": (
        _replace_file("tvus/t1.mp4", lambda p: write_mp4(p, seed=7, n_frames=1)),
        r"tvus/t1\.mp4: (a single frame|cannot load)",
    ),
    "clip_too_short": (
        _replace_file("tvus/t1.mp4", lambda p: write_mp4(p, seed=7, n_frames=4)),
        r"tvus/t1\.mp4: clip has 4 frames, fewer than the 8 sampled",
    ),
}


@needs_readers
def test_clean_manifest_decodes_without_problem(cohort: Path) -> None:
    assert validate_manifest(cohort / "manifest.csv", decode=True) == []


@pytest.mark.parametrize("kind", sorted(DECODE_BAD))
def test_each_undecodable_file_gives_its_problem(
    cohort: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    edit, pattern = DECODE_BAD[kind]
    if not (HAVE_MRI if kind.startswith("mri_") else HAVE_VIDEO):
        pytest.skip("reader (helper C) not available yet")
    # Only the reader under test is needed: the other modality's files are not decoded here.
    other = "tvus" if kind.startswith("mri_") else "mri"
    monkeypatch.setattr(mf, "_check_clip" if other == "tvus" else "_check_volume", lambda *a: [])
    edit(cohort)
    path = cohort / "manifest.csv"
    assert validate_manifest(path, decode=False) == []  # only decoding finds these
    problems = validate_manifest(path, decode=True)
    assert len(problems) == 1, [str(p) for p in problems]
    assert re.search(pattern, problems[0].reason), str(problems[0])
    assert "\n" not in str(problems[0])


# ------------------------------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "endodistill", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_validate_end_to_end(cohort: Path) -> None:
    decode_flag = [] if HAVE_READERS else ["--no-decode"]
    ok = _cli("validate", str(cohort / "manifest.csv"), *decode_flag)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith("OK")

    rows = rows_copy()
    rows[0][2] = "mri/gone.nii.gz"
    rows[4][3] = "5"
    path = write_manifest(cohort, rows)
    bad = _cli("validate", str(path), "--no-decode")
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert any("mri/gone.nii.gz: file not found" in ln for ln in lines)
    assert any(":6: subject 'u1': label '5'" in ln for ln in lines)
    assert lines[-1] == f"{path}: 2 problem(s) found"
    assert "Traceback" not in bad.stderr

    broken = _cli("validate", str(cohort / "missing.csv"))
    assert broken.returncode == 2 and "manifest not found" in broken.stderr
    assert "Traceback" not in broken.stderr


@pytest.mark.real
@needs_readers
def test_real_files_validate_clean(real_data: Path, tmp_path: Path) -> None:
    """A manifest over the real DICOM series, its NIfTI conversion and real mp4 clips has no problem."""
    from endodistill.config import load_config

    pelvis = real_data / "prostatex_t2_pelvis"
    clips = sorted((real_data / "us_sonocrop_pocus").glob("*.mp4"))
    rows = [
        ["a", "mri", str(pelvis / "ProstateX-0000_t2_tse_sag"), "0", "real"],
        ["b", "mri", str(pelvis / "ProstateX-0000_t2_tse_sag.nii.gz"), "1", "real"],
        ["c", "tvus", str(clips[0]), "0", "real"],
        ["d", "tvus", str(clips[1]), "1", "real"],
    ]
    path = write_manifest(tmp_path, rows)
    restrict = load_config(None, {"data": {"restrict_paths": True}})
    assert any("absolute path" in p.reason for p in validate_manifest(path, cfg=restrict, decode=False))
    assert validate_manifest(path, decode=True) == []  # absolute paths work by default
