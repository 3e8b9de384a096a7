"""Bad input, all of it, end to end through the CLI (issue 8).

A corpus of broken or hostile inputs is generated here (manifests, MRI files, DICOM folders, clips, configs
and model directories) and each one is given to the real command line in a subprocess. Every case must
give its exit code (2 for bad input; 3 for ``predict`` when MRI cases failed and were skipped), one clear
line naming the input and the problem, no traceback, no partial outputs, no stray file in the working
directory, and no change to any input (SHA-256 and mtime before and after). The huge-header cases run
under an address-space limit and their peak resident memory is measured.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import av
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

torch.set_num_threads(1)

EXE = [sys.executable, "-m", "endodistill"]
GIB = 1024**3
# Address-space limits: the readers alone fit in 2 GiB; predict/export also map torch + MONAI (~3.5 GiB).
AS_LIMIT_READERS = 2 * GIB
AS_LIMIT_TORCH = 5 * GIB
# Peak resident memory a refused huge header may cost: the interpreter and its libraries, no voxel buffer.
MAX_RSS_READERS = 400 * 1024**2
MAX_RSS_TORCH = 1600 * 1024**2


# ------------------------------------------------------------------------------------ running the CLI


@dataclass
class Run:
    """One finished CLI subprocess."""

    rc: int
    out: str
    err: str
    maxrss: int  # bytes

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]


# A small launcher forks the real command and reports its peak RSS. Measuring the command as our own direct
# child would be wrong: Linux carries the parent's RSS high-water mark into a forked (or vforked) child's
# ru_maxrss at exec, so inside a pytest process that has imported torch every child would look ~0.5 GB big.
# The launcher is small when it forks, so the grandchild's figure is its own.
_LAUNCHER = """
import os, resource, signal, sys
limit, report, cmd = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
pid = os.fork()
if pid == 0:
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.execv(cmd[0], cmd)
signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as fh:
    fh.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def cli(*args: str | Path, cwd: Path, as_limit: int | None = None, timeout: float = 180) -> Run:
    """Run ``python -m endodistill ARGS`` in ``cwd``; returns exit code, output and peak RSS of the command.

    The peak RSS is the command's own ``ru_maxrss`` (see ``_LAUNCHER``); ``as_limit`` caps its address space.
    """
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "ENDODISTILL_CACHE": str(cwd.parent / "cache"),
        "COLUMNS": "200",
    }
    cwd.mkdir(parents=True, exist_ok=True)
    report = cwd.parent / "maxrss.txt"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", _LAUNCHER, str(as_limit or 0), str(report), *EXE, *map(str, args)]
    with (cwd.parent / "stdout.txt").open("w+") as fo, (cwd.parent / "stderr.txt").open("w+") as fe:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fo, stderr=fe)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.terminate()
            rc = p.wait()
        fo.seek(0)
        fe.seek(0)
        maxrss_kib = int(report.read_text()) if report.is_file() else 0
        return Run(rc, fo.read(), fe.read(), maxrss_kib * 1024)


def cli_in_process(
    *args: str | Path, cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Run:
    """The same CLI entry point (``endodistill.cli.main``) in this process: saves a torch import.

    Only for errors printed by the CLI itself (log lines go to pytest's handlers here).
    """
    from endodistill.cli import main

    cwd.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["endodistill", *map(str, args)])
    capsys.readouterr()
    try:
        main()
        rc = 0
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return Run(rc, out, err, 0)


def snapshot(*roots: Path) -> dict[str, tuple[str, int]]:
    """SHA-256 and mtime of every file under ``roots`` (and the set of names: nothing added or removed)."""
    out: dict[str, tuple[str, int]] = {}
    for root in roots:
        if not root.exists() and not root.is_symlink():
            continue
        files = sorted(p for p in root.rglob("*")) if root.is_dir() else [root]
        for f in files:
            st = f.lstat()
            if f.is_file():
                out[str(f)] = (hashlib.sha256(f.read_bytes()).hexdigest(), st.st_mtime_ns)
            else:
                out[str(f)] = ("dir", 0)
    return out


def assert_clean_failure(r: Run, *, rc: int, names: str, says: str) -> str:
    """Exit code ``rc``, no traceback, exactly one non-empty stderr line naming ``names`` and saying ``says``."""
    assert r.rc == rc, f"exit {r.rc}, stderr:\n{r.err}"
    assert "Traceback" not in r.err + r.out, r.err
    assert len(r.lines) == 1, f"expected one line, got:\n{r.err}"
    line = r.lines[0]
    assert line.startswith("error: "), line
    assert names in line, f"{names!r} not named in {line!r}"
    assert says.lower() in line.lower(), f"{says!r} not in {line!r}"
    return line


# ------------------------------------------------------------------------------------------ builders


def nifti_bytes(arr: np.ndarray, affine: np.ndarray | None = None) -> bytes:
    aff = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    return nib.Nifti1Image(arr, aff).to_bytes()


def good_volume(shape: tuple[int, int, int] = (20, 18, 12), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = ((g**2).sum(0) < 0.8).astype(np.float32)
    return (300 * body + rng.normal(0, 10, shape)).astype(np.float32)


def huge_nifti_header(version: int) -> bytes:
    """A header claiming ~140 TB (NIfTI-1, 32767^3) or ~4 EB (NIfTI-2, 10^6^3) of float32, and no voxels."""
    hdr = nib.Nifti2Header() if version == 2 else nib.Nifti1Header()
    hdr.set_data_shape((10**6,) * 3 if version == 2 else (32767,) * 3)
    hdr.set_data_dtype(np.float32)
    bio = io.BytesIO()
    hdr.write_to(bio)
    return bio.getvalue() + b"\0" * 64


def write_series(
    folder: Path,
    vol: np.ndarray,
    series: str = "s1",
    prefix: str = "im",
    patient: tuple[str, str, str] = ("Anon", "0", "19000101"),
) -> list[Path]:
    """An axial MR series, vol (rows, cols, slices) uint16, one file per slice, with patient tags."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(vol.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(folder), series, str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(folder), series])
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(folder)])
        ds.Modality = "MR"
        ds.SeriesDescription = f"t2 {series}"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = int(vol.shape[0]), int(vol.shape[1])
        ds.PixelSpacing = [1.5, 1.5]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [-20.0, -25.0, 3.0 * k]
        ds.SliceThickness = 3.0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(vol[:, :, k].astype(np.uint16)).tobytes()
        f = folder / f"{prefix}{k:03d}.dcm"
        ds.save_as(f, enforce_file_format=True)
        files.append(f)
    return files


def dicom_volume() -> np.ndarray:
    return np.clip(good_volume((16, 16, 6)) + 100, 0, 4000).astype(np.uint16)


def edit_dicom(f: Path, fn: Callable[[Dataset], None]) -> None:
    ds = pydicom.dcmread(f)
    fn(ds)
    ds.save_as(f)


def write_video(path: Path, frames: int = 10, size: int = 32, phase: float = 0.0) -> Path:
    with av.open(str(path), "w") as c:
        st = c.add_stream("mpeg4", rate=10)
        st.width = st.height = size
        st.pix_fmt = "yuv420p"
        c.start_encoding()
        for k in range(frames):
            yy, xx = np.mgrid[0:size, 0:size]
            img = (128 + 90 * np.sin(xx / 4 + k + phase) * np.cos(yy / 5)).astype(np.uint8)
            vf = av.VideoFrame.from_ndarray(np.repeat(img[..., None], 3, axis=2), format="rgb24")
            for pkt in st.encode(vf):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    return path


def mp4_unknown_codec(good: bytes) -> bytes:
    """A valid mp4 container whose video track names a codec no FFmpeg decoder knows.

    FFmpeg identifies MPEG-4 video by the esds object type as well as by the ``mp4v`` sample entry, so
    both are changed: fourcc ``qqqq`` and object type 0xC0 (user private).
    """
    b = bytearray(good)
    i = b.find(b"esds")
    # esds: version/flags (4), ES_Descriptor tag+len (1+4), ES_ID (2), flags (1), DecoderConfig tag+len (1+4).
    assert b[i + 21] == 0x20, "unexpected esds layout"
    b[i + 21] = 0xC0
    return bytes(b).replace(b"mp4v", b"qqqq")


# ----------------------------------------------------------------------------------------- the corpus


@dataclass
class Case:
    """One broken input and what the CLI must say about it."""

    argv: list[str | Path]
    names: str  # the input the error line must name
    says: str  # a fragment of the reason
    rc: int = 2
    inputs: list[Path] = field(default_factory=list)
    out: Path | None = None  # an output path that must not appear
    as_limit: int | None = None
    max_rss: int | None = None


MANIFEST_HEADER = "subject_id,modality,path,label\n"
RESTRICT = "data.restrict_paths=true"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good files that broken manifests and configs point at: 2 labelled MRI, 2 labelled clips."""
    d = tmp_path_factory.mktemp("base")
    (d / "mri").mkdir()
    (d / "tvus").mkdir()
    for k in range(2):
        (d / "mri" / f"m{k}.nii.gz").write_bytes(gzip.compress(nifti_bytes(good_volume(seed=k)), mtime=0))
        write_video(d / "tvus" / f"t{k}.mp4", phase=k)
    return d


GOOD_ROWS = "s0,mri,mri/m0.nii.gz,0\ns1,mri,mri/m1.nii.gz,1\nt0,tvus,tvus/t0.mp4,0\nt1,tvus,tvus/t1.mp4,1\n"


def manifest_cases(base: Path) -> dict[str, Case]:
    """Broken manifests (beside good files, so that each has exactly one problem)."""
    cases: dict[str, Case] = {}

    def put(name: str, data: bytes | str, says: str, line: str = "", restrict: bool = False) -> None:
        m = base / f"{name}.csv"
        if isinstance(data, str):
            m.write_text(data, encoding="utf-8")
        else:
            m.write_bytes(data)
        extra: list[str | Path] = ["--set", RESTRICT] if restrict else []
        cases[name] = Case(["validate", m, *extra], f"{m}{line}", says, inputs=[m])

    put("missing_column", "subject_id,modality,path\ns0,mri,mri/m0.nii.gz\n", "missing column(s) label")
    put("bad_label", MANIFEST_HEADER + GOOD_ROWS + "s2,mri,mri/m0.nii.gz,2\n", "label '2'", ":6")
    put("text_label", MANIFEST_HEADER + GOOD_ROWS + "s2,mri,mri/m0.nii.gz,yes\n", "label 'yes'", ":6")
    put(
        "duplicate_row",
        MANIFEST_HEADER + GOOD_ROWS + "s1,mri,mri/m1.nii.gz,1\n",
        "duplicate row for subject 's1'",
        ":3,6",
    )
    put(
        "same_file_two_subjects",
        MANIFEST_HEADER + GOOD_ROWS + "s9,mri,mri/m1.nii.gz,1\n",
        "listed under subjects 's1'",
        ":3,6",
    )
    put(
        "conflicting_labels",
        MANIFEST_HEADER + GOOD_ROWS.replace("t1,", "s0,"),
        "conflicting labels",
        ":2,5",
    )
    outside = base.parent / f"{base.name}_outside.nii.gz"
    outside.write_bytes((base / "mri" / "m0.nii.gz").read_bytes())
    # Outside paths work by default; these cases run with data.restrict_paths (a hosted deployment).
    put(
        "dotdot_path",
        MANIFEST_HEADER + GOOD_ROWS + f"s3,mri,../{outside.name},\n",
        f"path '../{outside.name}' points outside the manifest's folder",
        ":6",
        restrict=True,
    )
    put(
        "absolute_path",
        MANIFEST_HEADER + GOOD_ROWS + f"s3,mri,{outside},\n",
        f"absolute path '{outside}' refused",
        ":6",
        restrict=True,
    )
    put("missing_file", MANIFEST_HEADER + GOOD_ROWS + "s3,mri,mri/gone.nii.gz,\n", "file not found", ":6")
    put(
        "not_utf8",
        (MANIFEST_HEADER + GOOD_ROWS).encode() + "s\xe9,mri,mri/m0.nii.gz,\n".encode("latin-1"),
        "not UTF-8",
    )
    put("semicolons", MANIFEST_HEADER.replace(",", ";") + GOOD_ROWS.replace(",", ";"), "separated by commas")
    put(
        "nul_in_subject",
        MANIFEST_HEADER + GOOD_ROWS + "s\0x,mri,mri/m0.nii.gz,\n",
        "control characters",
        ":6",
    )
    put("ragged_row", MANIFEST_HEADER + GOOD_ROWS + "s3,mri,mri/m0.nii.gz\n", "has 3 fields", ":6")
    put("empty", b"", "manifest is empty")
    put("header_only", MANIFEST_HEADER, "no rows")
    huge = base / "huge.csv"
    with open(huge, "wb") as fh:  # sparse: 60 MB on paper, nothing on disk
        fh.write(MANIFEST_HEADER.encode())
        fh.truncate(60 * 1024**2)
    cases["huge"] = Case(["validate", huge], str(huge), "MB limit", inputs=[huge])
    broken = base / "mri" / "broken.nii.gz"
    broken.write_bytes((base / "mri" / "m0.nii.gz").read_bytes()[:200])
    put(
        "undecodable_file",
        MANIFEST_HEADER + GOOD_ROWS + "s3,mri,mri/broken.nii.gz,\n",
        "mri/broken.nii.gz: cannot load",
        ":6",
    )
    return cases


@pytest.fixture(scope="module")
def manifests(base: Path) -> dict[str, Case]:
    return manifest_cases(base)


MANIFEST_CASES = [
    "missing_column",
    "bad_label",
    "text_label",
    "duplicate_row",
    "same_file_two_subjects",
    "conflicting_labels",
    "dotdot_path",
    "absolute_path",
    "missing_file",
    "not_utf8",
    "semicolons",
    "ragged_row",
    "nul_in_subject",
    "empty",
    "header_only",
    "huge",
    "undecodable_file",
]


@pytest.mark.parametrize("name", MANIFEST_CASES)
def test_validate_broken_manifest(name: str, manifests: dict[str, Case], base: Path, tmp_path: Path) -> None:
    case = manifests[name]
    before = snapshot(base)
    r = cli(*case.argv, cwd=tmp_path / "cwd")
    assert r.rc == 2, r.err
    assert "Traceback" not in r.err + r.out, r.err
    # validate reports every problem, one per line, then a count: here exactly one problem.
    manifest = str(case.argv[1])
    assert r.lines[-1] == f"{manifest}: 1 problem(s) found", r.err
    assert len(r.lines) == 2, r.err
    assert r.lines[0].startswith(case.names + ": "), r.err
    assert case.says.lower() in r.lines[0].lower(), r.err
    assert snapshot(base) == before, "an input was modified"
    assert not any((tmp_path / "cwd").iterdir())


def test_validate_good_manifest_is_ok(base: Path, tmp_path: Path) -> None:
    """The control: the same files under a clean manifest validate (so each broken case has one problem)."""
    m = base / "good.csv"
    m.write_text(MANIFEST_HEADER + GOOD_ROWS)
    r = cli("validate", m, cwd=tmp_path / "cwd")
    assert r.rc == 0 and r.out.strip() == f"{m}: OK", r.err


def test_validate_outside_and_absolute_paths_by_default(base: Path, tmp_path: Path) -> None:
    """Paths leaving the manifest's folder, relative or absolute, work unless data.restrict_paths is set."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    scan = elsewhere / "e0.nii.gz"
    scan.write_bytes(gzip.compress(nifti_bytes(good_volume(seed=7)), mtime=0))
    rows = GOOD_ROWS.replace("mri/", f"{base}/mri/").replace("tvus/", f"{base}/tvus/")  # all absolute
    m = elsewhere / "sub" / "manifest.csv"
    m.parent.mkdir()
    m.write_text(MANIFEST_HEADER + rows + "e0,mri,../e0.nii.gz,\n")
    r = cli("validate", m, cwd=tmp_path / "cwd")
    assert r.rc == 0 and r.out.strip() == f"{m}: OK", r.err
    r = cli("validate", m, "--set", RESTRICT, cwd=tmp_path / "cwd")
    assert r.rc == 2 and "Traceback" not in r.err, r.err
    # The five rows are refused (then no labelled case is left: two cohort problems), each naming row and file.
    assert len(r.lines) == 8 and r.lines[-1] == f"{m}: 7 problem(s) found", r.err
    assert r.lines[0].startswith(f"{m}:2: absolute path '{base}/mri/m0.nii.gz' refused"), r.err
    assert (
        r.lines[4]
        == f"{m}:6: path '../e0.nii.gz' points outside the manifest's folder (data.restrict_paths is set)"
    )


# The run command must refuse a broken manifest before it creates the run directory.
RUN_MANIFEST_CASES = ["missing_column", "bad_label", "dotdot_path", "absolute_path", "not_utf8", "huge"]


@pytest.mark.parametrize("name", RUN_MANIFEST_CASES)
def test_run_with_broken_manifest(name: str, manifests: dict[str, Case], base: Path, tmp_path: Path) -> None:
    case = manifests[name]
    manifest = Path(case.argv[1])
    cfg = tmp_path / "config.yaml"
    restrict = "  restrict_paths: true\n" if RESTRICT in case.argv else ""
    cfg.write_text(f"data:\n  manifest: {manifest}\n{restrict}")
    out = tmp_path / "run"
    before = snapshot(base, cfg)
    r = cli("run", "--config", cfg, "--out", out, cwd=tmp_path / "cwd")
    assert_clean_failure(r, rc=2, names=str(manifest), says=case.says)
    assert not out.exists(), f"partial outputs: {sorted(p.name for p in out.rglob('*'))}"
    assert snapshot(base, cfg) == before
    assert not any((tmp_path / "cwd").iterdir())


def test_run_with_undecodable_file_leaves_no_run_dir(base: Path, tmp_path: Path) -> None:
    """A structurally fine manifest naming a broken file: found while loading the cohort, run dir removed."""
    m = base / "undecodable_file.csv"
    assert m.is_file()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"data:\n  manifest: {m}\n")
    out = tmp_path / "run"
    before = snapshot(base, cfg)
    r = cli("run", "--config", cfg, "--out", out, cwd=tmp_path / "cwd")
    assert_clean_failure(r, rc=2, names="broken.nii.gz", says="truncated")
    assert not out.exists(), f"partial outputs: {sorted(p.name for p in out.rglob('*'))}"
    assert snapshot(base, cfg) == before


# -------------------------------------------------------------------------------------------- configs

CONFIG_CASES: dict[str, tuple[str, list[str], str, str]] = {
    # name: (yaml text, --set overrides, named in the line, reason fragment)
    "unknown_key": ("seed: 1\nfoo: 2\n", [], "unknown key 'foo'", "invalid config"),
    "unknown_nested_key": ("student:\n  hiden_size: 24\n", [], "'student.hiden_size'", "unknown key"),
    "wrong_type": ("finetune:\n  epochs: many\n", [], "'finetune.epochs'", "integer"),
    "wrong_shape": ("mri:\n  size: 32\n", [], "'mri.size'", "tuple"),
    "impossible_size": ("mri:\n  size: [100000, 32, 32]\n", [], "'mri'", "between 4 and 1024"),
    "size_not_patch_multiple": ("mri:\n  size: [30, 32, 32]\n", [], "mri.size[0]=30", "patch_size"),
    "negative_lr": ("finetune:\n  lr: -1\n", [], "'finetune.lr'", "greater than 0"),
    "not_a_mapping": ("- a\n- b\n", [], "config.yaml", "YAML mapping"),
    "invalid_yaml": ("seed: [1, 2\n", [], "config.yaml", "not valid YAML"),
    "bad_override": ("seed: 1\n", ["--set", "teacher.epochs=zero"], "'teacher.epochs'", "integer"),
    "not_utf8": ("name: caf\xe9\n", [], "config.yaml", "cannot read config"),
    # "Billion laughs": 9 levels of 9 aliases (10^9 strings if expanded), as the model's name.
    "yaml_bomb": (
        "\n".join(
            ['x0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
            + [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
        )
        + "\nname: *a9\n",
        [],
        "'name'",
        "valid string",
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_run_with_broken_config(name: str, tmp_path: Path) -> None:
    text, extra, names, says = CONFIG_CASES[name]
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(text.encode("latin-1"))
    out = tmp_path / "run"
    before = snapshot(cfg)
    as_limit = AS_LIMIT_READERS if name == "yaml_bomb" else None
    r = cli("run", "--config", cfg, "--out", out, *extra, cwd=tmp_path / "cwd", as_limit=as_limit)
    assert_clean_failure(r, rc=2, names=names, says=says)
    assert str(cfg) in r.lines[0]  # the file is named as well as the key
    assert not out.exists()
    assert snapshot(cfg) == before
    assert not any((tmp_path / "cwd").iterdir())


@pytest.mark.parametrize("command", ["run", "demo"])
def test_out_that_is_a_file(command: str, tmp_path: Path) -> None:
    out = tmp_path / "results.txt"
    out.write_text("a user's file\n")
    before = snapshot(out)
    extra = ["--config", "tiny"] if command == "run" else []
    # --processes 2: refused before torchrun starts any process (else every rank would say it).
    r = cli(command, *extra, "--out", out, "--processes", "2", cwd=tmp_path / "cwd")
    assert_clean_failure(r, rc=2, names=str(out), says="not a directory")
    assert snapshot(out) == before


def test_processes_with_a_data_parallel_trainer(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = cli(
        "run", "--config", "tiny", "--out", out, "--processes", "2", "--devices", "2", cwd=tmp_path / "cwd"
    )
    assert_clean_failure(r, rc=2, names="--processes 2", says="trainer.devices=2")
    assert not out.exists()


# ------------------------------------------------------------------------------ MRI, DICOM and clips


def volume_cases(d: Path) -> dict[str, Case]:
    """Broken MRI files and DICOM folders: name -> Case whose argv is the input (the command is added later)."""
    d.mkdir(parents=True, exist_ok=True)
    good = nifti_bytes(good_volume())
    cases: dict[str, Case] = {}

    def put(name: str, data: bytes, says: str, **kw: object) -> Path:
        p = d / name
        p.write_bytes(data)
        cases[name] = Case([p], str(p), says, inputs=[p], **kw)  # type: ignore[arg-type]
        return p

    put("truncated.nii.gz", gzip.compress(good, mtime=0)[:300], "truncated or corrupt gzip")
    put("truncated_voxels.nii", good[: len(good) // 2], "truncated")
    put("wrong_magic.nii", good[:344] + b"XX\0\0" + good[348:], "wrong magic")
    put("text.nii.gz", b"this is a text file, not an image\n" * 10, "not gzip")
    put("two_d.nii", nifti_bytes(np.ones((16, 16), np.float32)), "2D image")
    put("four_d.nii", nifti_bytes(np.ones((8, 8, 8, 3), np.float32)), "4D image")
    nan = good_volume()
    nan[3, 4, 5] = np.nan
    put("nan.nii.gz", gzip.compress(nifti_bytes(nan), mtime=0), "NaN/inf")
    put("zero.nii.gz", b"", "empty file (0 bytes)")
    huge = {"as_limit": AS_LIMIT_READERS, "max_rss": MAX_RSS_READERS}
    put("huge1.nii", huge_nifti_header(1), "GiB limit", **huge)
    put("huge2.nii.gz", gzip.compress(huge_nifti_header(2), mtime=0), "GiB limit", **huge)
    put(
        "huge.mha",
        b"ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\nElementType = MET_FLOAT\n"
        b"ElementDataFile = LOCAL\n" + b"\0" * 64,
        "GiB limit",
        **huge,
    )
    put(
        "huge.nrrd",
        b"NRRD0004\ntype: float\ndimension: 3\nsizes: 100000 100000 100000\nendian: little\nencoding: raw\n\n"
        + b"\0" * 64,
        "GiB limit",
        **huge,
    )

    # Tiny files whose headers claim just under the 2 GiB limit: refused before the buffer is allocated.
    near = nib.Nifti1Header()
    near.set_data_shape((800, 800, 800))
    near.set_data_dtype(np.float32)
    bio = io.BytesIO()
    near.write_to(bio)
    near_bytes = bio.getvalue() + b"\0" * 1004
    put("near_limit.nii", near_bytes, "the header needs 2048000352 bytes", **huge)
    put("near_limit.nii.gz", gzip.compress(near_bytes, mtime=0), "compressed data expands to", **huge)
    put(
        "near_limit.nrrd",
        b"NRRD0004\ntype: float\ndimension: 3\nsizes: 800 800 800\nendian: little\nencoding: gzip\n\n"
        + gzip.compress(b"\0" * 1000, mtime=0),
        "compressed data expands to 1000",
        **huge,
    )
    z = zlib.compress(b"\0" * 1000)
    mha = b"ObjectType = Image\nNDims = 3\nDimSize = 800 800 800\nElementType = MET_FLOAT\nCompressedData = True\n"
    put(
        "short_zlib.mha",
        mha + f"CompressedDataSize = {len(z)}\nElementDataFile = LOCAL\n".encode() + z,
        "compressed data expands to 1000",
        **huge,
    )
    put(
        "no_compressed_size.mha", mha + b"ElementDataFile = LOCAL\n" + z, "without CompressedDataSize", **huge
    )

    vol = dicom_volume()
    files = write_series(d / "dicom_no_pixels", vol)
    edit_dicom(files[2], lambda ds: delattr(ds, "PixelData"))
    cases["dicom_no_pixels"] = Case([d / "dicom_no_pixels"], str(files[2]), "no pixel data")
    files = write_series(d / "dicom_no_position", vol)
    edit_dicom(files[1], lambda ds: delattr(ds, "ImagePositionPatient"))
    cases["dicom_no_position"] = Case(
        [d / "dicom_no_position"], str(files[1]), "missing ImagePositionPatient"
    )
    files = write_series(d / "dicom_no_orientation", vol)
    edit_dicom(files[0], lambda ds: delattr(ds, "ImageOrientationPatient"))
    cases["dicom_no_orientation"] = Case(
        [d / "dicom_no_orientation"], str(files[0]), "missing ImageOrientationPatient"
    )

    def absurd(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 65535  # 65535 x 65535 x 6 slices of float32: 96 GiB

    files = write_series(d / "dicom_huge", vol)
    for f in files:
        edit_dicom(f, absurd)
    cases["dicom_huge"] = Case([d / "dicom_huge"], str(files[0]), "65535x65535 pixels need", **huge)  # type: ignore[arg-type]

    def near_limit(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 8000  # 8000 x 8000 x 6 float32: 1.4 GiB, with 512 bytes of pixels per slice

    files = write_series(d / "dicom_near_limit", vol)
    for f in files:
        edit_dicom(f, near_limit)
    cases["dicom_near_limit"] = Case(
        [d / "dicom_near_limit"],
        str(files[0]),
        "it holds 512 bytes",
        **huge,  # type: ignore[arg-type]
    )
    for c in cases.values():
        if not c.inputs:
            c.inputs = [Path(c.argv[0])]
    return cases


def mixed_series(d: Path) -> Path:
    write_series(d / "dicom_mixed", dicom_volume(), series="a", prefix="a")
    write_series(d / "dicom_mixed", dicom_volume()[:, :, :4], series="b", prefix="b")
    return d / "dicom_mixed"


def clip_cases(d: Path) -> dict[str, Case]:
    d.mkdir(parents=True, exist_ok=True)
    good = write_video(d / "good.mp4").read_bytes()
    cases: dict[str, Case] = {}

    def put(name: str, data: bytes, says: str) -> None:
        p = d / name
        p.write_bytes(data)
        cases[name] = Case([p], str(p), says, inputs=[p])

    put("truncated.mp4", good[: len(good) // 2], "truncated")
    put("truncated_tail.mp4", good[:-300], "truncated")
    put("unknown_codec.mp4", mp4_unknown_codec(good), "unsupported video codec")
    put("text.mp4", b"this is a text file renamed .mp4\n" * 20, "not a video")
    put("zero.mp4", b"", "empty file (0 bytes)")
    with av.open(str(d / "no_frames.mp4"), "w") as c:
        st = c.add_stream("mpeg4", rate=10)
        st.width = st.height = 32
        st.pix_fmt = "yuv420p"
        c.start_encoding()
    cases["no_frames.mp4"] = Case([d / "no_frames.mp4"], str(d / "no_frames.mp4"), "no video stream")
    cases["no_frames.mp4"].inputs = [d / "no_frames.mp4"]
    (d / "good.mp4").unlink()
    return cases


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return volume_cases(tmp_path_factory.mktemp("volumes"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return clip_cases(tmp_path_factory.mktemp("clips"))


VOLUME_CASES = [
    "truncated.nii.gz",
    "truncated_voxels.nii",
    "wrong_magic.nii",
    "text.nii.gz",
    "two_d.nii",
    "four_d.nii",
    "nan.nii.gz",
    "zero.nii.gz",
    "huge1.nii",
    "huge2.nii.gz",
    "huge.mha",
    "huge.nrrd",
    "near_limit.nii",
    "near_limit.nii.gz",
    "near_limit.nrrd",
    "short_zlib.mha",
    "no_compressed_size.mha",
    "dicom_no_pixels",
    "dicom_no_position",
    "dicom_no_orientation",
    "dicom_huge",
    "dicom_near_limit",
]
CLIP_CASES = [
    "truncated.mp4",
    "truncated_tail.mp4",
    "unknown_codec.mp4",
    "text.mp4",
    "zero.mp4",
    "no_frames.mp4",
]


def _inspect_case(case: Case, tmp_path: Path) -> None:
    before = snapshot(*case.inputs)
    r = cli("inspect", *case.argv, cwd=tmp_path / "cwd", as_limit=case.as_limit)
    assert_clean_failure(r, rc=2, names=case.names, says=case.says)
    assert r.out == ""
    if case.max_rss is not None:
        assert r.maxrss < case.max_rss, f"peak RSS {r.maxrss / 2**20:.0f} MiB"
    assert snapshot(*case.inputs) == before, "an input was modified"
    assert not any((tmp_path / "cwd").iterdir())


@pytest.mark.parametrize("name", VOLUME_CASES)
def test_inspect_broken_volume(name: str, volumes: dict[str, Case], tmp_path: Path) -> None:
    _inspect_case(volumes[name], tmp_path)


@pytest.mark.parametrize("name", CLIP_CASES)
def test_inspect_broken_clip(name: str, clips: dict[str, Case], tmp_path: Path) -> None:
    _inspect_case(clips[name], tmp_path)


def test_inspect_mixed_series_lists_them(tmp_path: Path) -> None:
    """Several series in one folder is not an error for inspect: it lists them so the user can choose."""
    folder = mixed_series(tmp_path / "in")
    before = snapshot(folder)
    r = cli("inspect", folder, cwd=tmp_path / "cwd")
    assert r.rc == 0 and r.err == "", r.err
    assert "2 DICOM series in this folder" in r.out and "(6 files)" in r.out and "(4 files)" in r.out
    assert snapshot(folder) == before


# ------------------------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding a tiny random student."""
    from endodistill.config import load_config
    from endodistill.infer.model_dir import save_model_dir
    from endodistill.models.student import build_student

    cfg = load_config("tiny")
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model") / "model"
    return save_model_dir(out, build_student(cfg).state_dict(), cfg, threshold=0.5, metrics={})


@pytest.fixture(scope="module")
def good_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("good")
    (d / "good.nii.gz").write_bytes(gzip.compress(nifti_bytes(good_volume()), mtime=0))
    write_series(d / "good_dicom", dicom_volume())
    return {"nifti": d / "good.nii.gz", "dicom": d / "good_dicom"}


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "predictions.csv", newline="") as fh:
        return {row["input"]: row for row in csv.DictReader(fh)}


def test_predict_skips_every_broken_volume(
    volumes: dict[str, Case], model_dir: Path, good_cases: dict[str, Path], tmp_path: Path
) -> None:
    """All broken volumes in one run, between two good cases: one line per failed case, exit 3.

    The run is under an address-space limit: the huge headers must be refused from the header alone.
    """
    mixed = mixed_series(tmp_path / "in")
    broken = [volumes[n] for n in VOLUME_CASES]
    inputs = [good_cases["nifti"], *(Path(c.argv[0]) for c in broken), mixed, good_cases["dicom"]]
    out = tmp_path / "out"
    all_inputs = [*inputs, model_dir]
    before = snapshot(*all_inputs)
    args = [a for p in inputs for a in ("--input", p)]
    r = cli(
        "predict", "--model", model_dir, *args, "--out", out, cwd=tmp_path / "cwd", as_limit=AS_LIMIT_TORCH
    )
    assert r.rc == 3, r.err
    assert "Traceback" not in r.err + r.out, r.err
    n_bad = len(broken) + 1
    failed = [ln for ln in r.lines if ln.startswith("failed: ")]
    assert len(failed) == n_bad and len(r.lines) == n_bad + 1, r.err
    assert r.lines[-1].startswith(f"predicted 2 case(s), {n_bad} failed"), r.err
    for case, line in zip([*broken, Case([mixed], str(mixed), "2 DICOM series")], failed):
        assert line.startswith(f"failed: {case.names}: "), (line, case.names)
        assert case.says.lower() in line.lower(), (line, case.says)
    assert r.maxrss < MAX_RSS_TORCH, f"peak RSS {r.maxrss / 2**20:.0f} MiB"
    rows = _rows(out)
    assert len(rows) == len(inputs)
    for p in inputs:
        row = rows[str(p)]
        ok = p in (good_cases["nifti"], good_cases["dicom"])
        assert row["status"] == ("ok" if ok else "failed"), row
        assert bool(row["heatmap_nifti"]) == ok and bool(row["error"]) != ok, row
    assert len(list((out / "heatmaps").glob("*.nii.gz"))) == 2
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temporary files left behind"
    assert snapshot(*all_inputs) == before, "an input or the model was modified"
    assert not any((tmp_path / "cwd").iterdir())


def test_predict_one_broken_case(volumes: dict[str, Case], model_dir: Path, tmp_path: Path) -> None:
    case = volumes["truncated.nii.gz"]
    out = tmp_path / "out"
    before = snapshot(*case.inputs, model_dir)
    r = cli("predict", "--model", model_dir, "--input", case.argv[0], "--out", out, cwd=tmp_path / "cwd")
    assert r.rc == 3 and "Traceback" not in r.err, r.err
    assert len(r.lines) == 2, r.err
    assert r.lines[0].startswith(f"failed: {case.names}: ") and case.says in r.lines[0], r.err
    assert r.lines[1].startswith("predicted 0 case(s), 1 failed"), r.err
    (row,) = _rows(out).values()
    assert row["status"] == "failed" and case.says in row["error"] and row["probability"] == ""
    assert sorted(p.name for p in out.iterdir()) == ["predictions.csv", "predictions.json"]
    assert snapshot(*case.inputs, model_dir) == before


def test_predict_refuses_unusable_inputs(manifests: dict[str, Case], model_dir: Path, tmp_path: Path) -> None:
    """Inputs that are not cases at all (no case in a folder, a broken manifest, a missing path): exit 2."""
    empty = tmp_path / "no_cases"
    empty.mkdir()
    (empty / "notes.txt").write_text("no scan here")
    bad_manifest = manifests["missing_column"]
    for target, names, says in [
        (empty, str(empty), "no MRI case in this folder"),
        (bad_manifest.argv[1], bad_manifest.names, bad_manifest.says),
        (tmp_path / "absent.nii.gz", str(tmp_path / "absent.nii.gz"), "no such file"),
    ]:
        out = tmp_path / "out"
        before = snapshot(Path(target), model_dir)
        r = cli("predict", "--model", model_dir, "--input", target, "--out", out, cwd=tmp_path / "cwd")
        assert_clean_failure(r, rc=2, names=str(names), says=says)
        assert not out.exists()
        assert snapshot(Path(target), model_dir) == before


# ----------------------------------------------------------------------------------- model directories


class _Payload:
    """Unpickling this creates a marker file: proves that no pickle is ever loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (self.marker,))


def _rehash(d: Path) -> None:
    meta = json.loads((d / "metadata.json").read_text())
    meta["weights_sha256"] = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    (d / "metadata.json").write_text(json.dumps(meta))


def _truncated(d: Path) -> tuple[Path, str, str]:
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return d, str(w), "truncated or was modified"


def _truncated_rehashed(d: Path) -> tuple[Path, str, str]:
    _truncated(d)
    _rehash(d)
    return d, str(d / "model.safetensors"), "not a valid safetensors file"


def _hostile_header(d: Path) -> tuple[Path, str, str]:
    # A safetensors header that claims to be 4 EiB long.
    (d / "model.safetensors").write_bytes((1 << 62).to_bytes(8, "little") + b'{"a": 1}' + b"\0" * 64)
    _rehash(d)
    return d, str(d / "model.safetensors"), "not a valid safetensors file"


def _other_shapes(d: Path) -> tuple[Path, str, str]:
    # Weights of a narrower MLP (one hidden unit fewer), with a matching hash: refused by shape.
    from safetensors.torch import load_file, save_file

    w = d / "model.safetensors"
    state = load_file(str(w))
    key = next(k for k in sorted(state) if k.endswith("mlp.linear1.weight"))
    state[key] = state[key][:-1].contiguous()
    save_file(state, str(w))
    _rehash(d)
    return d, str(w), f"tensor '{key}' has shape"


def _pickle_in_place(d: Path) -> tuple[Path, str, str]:
    (d / "model.safetensors").unlink()
    (d / "model.pt").write_bytes(pickle.dumps(_Payload(d / "PWNED")))
    return d, str(d / "model.pt"), "refusing to unpickle"


def _pickle_as_model(d: Path) -> tuple[Path, str, str]:
    f = d / "checkpoint.ckpt"
    f.write_bytes(pickle.dumps(_Payload(d / "PWNED")))
    return f, str(f), "refusing to unpickle"


def _bad_metadata(d: Path) -> tuple[Path, str, str]:
    (d / "metadata.json").write_text("{not json")
    return d, str(d / "metadata.json"), "not valid JSON"


def _bad_config(d: Path) -> tuple[Path, str, str]:
    (d / "config.yaml").write_text((d / "config.yaml").read_text() + "surprise: 1\n")
    return d, str(d / "config.yaml"), "unknown key 'surprise'"


def _missing(d: Path) -> tuple[Path, str, str]:
    return d / "nope", str(d / "nope"), "model directory not found"


MODEL_BREAKERS: dict[str, Callable[[Path], tuple[Path, str, str]]] = {
    "truncated": _truncated,
    "truncated_rehashed": _truncated_rehashed,
    "hostile_header": _hostile_header,
    "other_shapes": _other_shapes,
    "pickle_in_place": _pickle_in_place,
    "pickle_as_model": _pickle_as_model,
    "bad_metadata": _bad_metadata,
    "bad_config": _bad_config,
    "missing": _missing,
}
EXPORTED = ("truncated", "other_shapes", "pickle_in_place")
NEED_TORCH = ("truncated_rehashed", "hostile_header", "other_shapes")  # parsing weights, building the model


@pytest.mark.parametrize("name", sorted(MODEL_BREAKERS))
def test_broken_model_dir(
    name: str,
    model_dir: Path,
    good_cases: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Refused by predict and export. Cases found before torch is imported run as subprocesses (fast);
    those that need the model built run in this process, through the same ``cli.main``."""
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    target, names, says = MODEL_BREAKERS[name](d)
    scan = good_cases["nifti"]
    before = snapshot(d, scan)
    out = tmp_path / "out"

    def run(*args: str | Path) -> Run:
        if name in NEED_TORCH:
            return cli_in_process(*args, cwd=tmp_path / "cwd", monkeypatch=monkeypatch, capsys=capsys)
        return cli(*args, cwd=tmp_path / "cwd")

    r = run("predict", "--model", target, "--input", scan, "--out", out)
    assert_clean_failure(r, rc=2, names=names, says=says)
    assert not out.exists()
    if name in EXPORTED:
        onnx = tmp_path / "model.onnx"
        r = run("export", "--model", target, "--format", "onnx", "--out", onnx)
        assert_clean_failure(r, rc=2, names=names, says=says)
        assert not onnx.exists() and r.out == ""
    assert not (d / "PWNED").exists(), "a pickle was loaded"
    assert snapshot(d, scan) == before
    assert not any((tmp_path / "cwd").iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_with_broken_sample(
    volumes: dict[str, Case],
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``export --sample`` with a broken volume: refused before anything is exported or written."""
    case = volumes["nan.nii.gz"]
    before = snapshot(*case.inputs, model_dir)
    for fmt, out in (("onnx", tmp_path / "m.onnx"), ("monai-bundle", tmp_path / "bundle")):
        args = ("export", "--model", model_dir, "--format", fmt, "--out", out, "--sample", case.argv[0])
        r = cli_in_process(*args, cwd=tmp_path / "cwd", monkeypatch=monkeypatch, capsys=capsys)
        assert_clean_failure(r, rc=2, names=case.names, says=case.says)
        assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "staging files left"
    assert snapshot(*case.inputs, model_dir) == before


# -------------------------------------------------------------------------------------------- privacy

PHI = ("ZZSENTINEL^Patricia", "PHI-ID-48151623", "19421123")
PHI_STRINGS = ("ZZSENTINEL", "Patricia", "PHI-ID-48151623", "19421123")


def _all_bytes(folder: Path) -> dict[str, bytes]:
    """Every output file's bytes, gzip members decompressed (NIfTI headers hold the descrip field)."""
    out = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        out[str(f)] = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return out


def test_dicom_patient_identifiers_never_reach_outputs_or_logs(model_dir: Path, tmp_path: Path) -> None:
    case = tmp_path / "in" / "case01"
    write_series(case, dicom_volume(), patient=PHI)
    assert any(s.encode() in (case / "im000.dcm").read_bytes() for s in PHI_STRINGS)  # the tags are there
    (tmp_path / "in" / "manifest.csv").write_text(MANIFEST_HEADER + "s1,mri,case01,1\n")
    before = snapshot(tmp_path / "in")
    out = tmp_path / "out"
    runs = [
        cli("-v", "inspect", case, cwd=tmp_path / "cwd"),
        cli("-v", "validate", tmp_path / "in" / "manifest.csv", cwd=tmp_path / "cwd"),
        cli("-v", "predict", "--model", model_dir, "--input", case, "--out", out, cwd=tmp_path / "cwd"),
    ]
    assert runs[0].rc == 0 and "dicom" in runs[0].out, runs[0].err
    assert runs[1].rc == 2  # the manifest lacks ultrasound cases: problems are listed, not the patient
    assert runs[2].rc == 0, runs[2].err
    files = _all_bytes(out)
    assert {Path(f).name for f in files} >= {
        "predictions.csv",
        "predictions.json",
        "case01_heatmap.nii.gz",
        "case01_heatmap.png",
    }
    descrip = nib.load(out / "heatmaps" / "case01_heatmap.nii.gz").header["descrip"].tobytes()
    assert descrip.rstrip(b"\0") == b"endodistill attention rollout"
    for s in PHI_STRINGS:
        for r in runs:
            assert s not in r.out and s not in r.err, (s, r.out, r.err)
        for name, data in files.items():
            assert s.encode() not in data, (s, name)
    assert snapshot(tmp_path / "in") == before
