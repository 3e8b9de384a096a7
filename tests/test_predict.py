"""Prediction with a model directory: real DICOM vs NIfTI, heatmap geometry, broken cases, safety."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from endodistill.config import load_config
from endodistill.data.mri import file_sha256
from endodistill.errors import InputError
from endodistill.infer.model_dir import load_model_dir, save_model_dir
from endodistill.infer.predict import predict_cases
from endodistill.models.student import build_student

PROSTATEX = "prostatex_t2_pelvis"
SERIES = "ProstateX-0000_t2_tse_sag"


def _make_model_dir(out: Path, overrides: list[str] | None = None, seed: int = 0) -> Path:
    cfg = load_config("tiny", overrides)
    torch.manual_seed(seed)
    model = build_student(cfg)
    return save_model_dir(out, model.state_dict(), cfg, threshold=0.5, metrics={"auc": 0.5, "note": "random"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with random weights and the tiny config."""
    return _make_model_dir(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def cases(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real ProstateX series and its NIfTI, linked under neutral case names (no copy)."""
    d = tmp_path_factory.mktemp("cases")
    (d / "caseA").symlink_to(real_data / PROSTATEX / SERIES, target_is_directory=True)
    (d / "caseB.nii.gz").symlink_to(real_data / PROSTATEX / f"{SERIES}.nii.gz")
    return {"dicom": d / "caseA", "nifti": d / "caseB.nii.gz"}


@pytest.fixture(scope="module")
def predicted(model_dir: Path, cases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pred")
    assert predict_cases(model_dir, [cases["dicom"], cases["nifti"]], out) == 0
    return out


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_model_dir_round_trip(model_dir: Path) -> None:
    assert {p.name for p in model_dir.iterdir()} == {"model.safetensors", "config.yaml", "metadata.json"}
    lm = load_model_dir(model_dir)
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert (
        meta["weights_sha256"] == hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    )
    assert meta["arch"]["input_size"] == [8, 16, 16] and meta["arch"]["num_classes"] == 2
    assert meta["preprocessing"]["spacing"] == [8.0, 8.0, 8.0] and meta["threshold"] == 0.5
    assert not lm.model.training
    torch.manual_seed(0)
    ref = build_student(lm.cfg).eval()
    x = torch.randn(2, 1, 8, 16, 16)
    with torch.no_grad():
        assert torch.equal(ref(x), lm.model(x))


def test_dicom_and_nifti_same_probability_and_geometry(predicted: Path, cases: dict[str, Path]) -> None:
    from endodistill.data.mri import load_volume

    rows = {r["case_id"]: r for r in _rows(predicted)}
    assert set(rows) == {"caseA", "caseB"}
    pa, pb = float(rows["caseA"]["probability"]), float(rows["caseB"]["probability"])
    assert 0.0 < pa < 1.0 and abs(pa - pb) < 1e-5
    heat = {}
    for cid, key in (("caseA", "dicom"), ("caseB", "nifti")):
        vol = load_volume(cases[key])
        img = nib.load(str(predicted / rows[cid]["heatmap_nifti"]))
        assert img.shape == vol.array.shape == (320, 320, 19)
        np.testing.assert_allclose(img.affine, vol.affine, atol=1e-4)
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        heat[cid] = np.asarray(img.dataobj)
        assert heat[cid].min() >= 0.0 and heat[cid].max() <= 1.0 and heat[cid].max() > 0.5
        png = predicted / rows[cid]["heatmap_png"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Same world geometry: the two heatmaps overlay, and they agree voxel by voxel.
    np.testing.assert_allclose(
        nib.load(str(predicted / rows["caseA"]["heatmap_nifti"])).affine,
        nib.load(str(predicted / rows["caseB"]["heatmap_nifti"])).affine,
        atol=1e-4,
    )
    assert np.abs(heat["caseA"] - heat["caseB"]).max() < 1e-3


def test_outputs_record_model_and_input_identity(
    predicted: Path, model_dir: Path, cases: dict[str, Path]
) -> None:
    meta = json.loads((model_dir / "metadata.json").read_text())
    rows = {r["case_id"]: r for r in _rows(predicted)}
    for cid, key in (("caseA", "dicom"), ("caseB", "nifti")):
        r = rows[cid]
        assert r["status"] == "ok" and r["error"] == ""
        assert r["input_sha256"] == file_sha256(cases[key])
        assert r["weights_sha256"] == meta["weights_sha256"]
        assert r["model_name"] == "endodistill-pod" and r["model_version"] == meta["version"]
        p = float(r["probability"])
        assert int(r["decision"]) == int(p >= 0.5)
        assert r["decision_label"] == ("obliterated" if p >= 0.5 else "not_obliterated")
    report = json.loads((predicted / "predictions.json").read_text())
    assert report["n_cases"] == 2 and report["n_failed"] == 0
    assert report["model"]["weights_sha256"] == meta["weights_sha256"]
    case = report["cases"][0]
    assert abs(sum(case["probabilities"].values()) - 1.0) < 1e-9


def test_no_patient_identifiers_in_outputs(predicted: Path, cases: dict[str, Path]) -> None:
    import pydicom

    first = sorted(cases["dicom"].iterdir())[0]
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    secrets = {
        str(ds.get(k))
        for k in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "StudyDate",
            "AccessionNumber",
            "StudyInstanceUID",
        )
        if ds.get(k)
    }
    assert "ProstateX-0000" in secrets
    blobs = []
    for f in predicted.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            blobs.append(gzip.decompress(data) if f.name.endswith(".gz") else data)
    text = b"\n".join(blobs)
    for s in secrets:
        assert s.encode() not in text, f"identifier {s!r} leaked into outputs"


def test_same_input_twice_is_identical(model_dir: Path, cases: dict[str, Path], tmp_path: Path) -> None:
    outs = [tmp_path / "a", tmp_path / "b"]
    for o in outs:
        assert predict_cases(model_dir, [cases["nifti"]], o) == 0
    for rel in ("predictions.json", "predictions.csv", "heatmaps/caseB_heatmap.nii.gz"):
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel


def test_manifest_input(model_dir: Path, cases: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "scan.nii.gz").symlink_to(cases["nifti"].resolve())
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("subject_id,modality,path,label\ns01,mri,scan.nii.gz,\n")
    out = tmp_path / "out"
    assert predict_cases(model_dir, [manifest], out, heatmap=False) == 0
    rows = _rows(out)
    assert [r["case_id"] for r in rows] == ["s01"] and rows[0]["heatmap_nifti"] == ""


def test_folder_with_one_broken_case_cli(model_dir: Path, cases: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "good.nii.gz").symlink_to(cases["nifti"].resolve())
    data = cases["nifti"].read_bytes()
    (folder / "broken.nii.gz").write_bytes(data[: len(data) // 3])  # truncated gzip stream
    (folder / "notes.txt").write_text("not a case")
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "endodistill",
            "predict",
            "--model",
            str(model_dir),
            "--input",
            str(folder),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    failed_lines = [ln for ln in r.stderr.splitlines() if "broken.nii.gz" in ln]
    assert len(failed_lines) == 1, r.stderr
    rows = {row["case_id"]: row for row in _rows(out)}
    assert set(rows) == {"broken", "good"}
    assert rows["broken"]["status"] == "failed" and "broken.nii.gz" in rows["broken"]["error"]
    assert rows["good"]["status"] == "ok" and float(rows["good"]["probability"]) > 0
    assert (out / "heatmaps" / "good_heatmap.nii.gz").is_file()
    assert not (out / "heatmaps" / "broken_heatmap.nii.gz").exists()


# ---------------------------------------------------------------------------------- bad model dirs


class _Payload:
    """Unpickling this would create a marker file: proves a pickle is never loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _cli(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    from endodistill.cli import main

    monkeypatch.setattr(sys, "argv", ["endodistill", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    return int(exc.value.code or 0), capsys.readouterr().err


def _tamper(d: Path) -> str:
    w = d / "model.safetensors"
    b = bytearray(w.read_bytes())
    b[-5] ^= 0xFF
    w.write_bytes(bytes(b))
    return "does not match metadata.json"


def _truncate(d: Path) -> str:
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    return "truncated or was modified"


def _bad_header(d: Path) -> str:
    # Truncated, with metadata.json "fixed" to match: the safetensors header itself must be refused.
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    meta = json.loads((d / "metadata.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    (d / "metadata.json").write_text(json.dumps(meta))
    return "not a valid safetensors file"


def _pickle_instead(d: Path) -> str:
    (d / "model.safetensors").unlink()
    (d / "model.pt").write_bytes(pickle.dumps(_Payload(d / "PWNED")))
    return "refusing to unpickle"


def _pickle_renamed(d: Path) -> str:
    w = d / "model.safetensors"
    w.write_bytes(pickle.dumps(_Payload(d / "PWNED"), protocol=4))
    meta = json.loads((d / "metadata.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    (d / "metadata.json").write_text(json.dumps(meta))
    return "refusing to unpickle"


def _other_input_size(d: Path) -> str:
    text = (d / "config.yaml").read_text()
    (d / "config.yaml").write_text(text.replace("  - 8\n  - 16\n  - 16\n", "  - 16\n  - 16\n  - 16\n", 1))
    return "arch.input_size"


def _other_arch_everywhere(d: Path) -> str:
    # Config and metadata both say 16x16x16, the tensors were trained for 8x16x16: caught by shape.
    _other_input_size(d)
    meta = json.loads((d / "metadata.json").read_text())
    meta["arch"]["input_size"] = [16, 16, 16]
    (d / "metadata.json").write_text(json.dumps(meta))
    return "patch_embedding.position_embeddings"


@pytest.mark.parametrize(
    "breaker",
    [
        _tamper,
        _truncate,
        _bad_header,
        _pickle_instead,
        _pickle_renamed,
        _other_input_size,
        _other_arch_everywhere,
    ],
)
def test_bad_model_dir_is_refused(
    breaker,
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    expected = breaker(d)
    with pytest.raises(InputError, match=expected.replace(".", r"\.")):
        load_model_dir(d)
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"unused")
    code, err = _cli(
        ["predict", "--model", str(d), "--input", str(scan), "--out", str(tmp_path / "o")],
        monkeypatch,
        capsys,
    )
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0] and "Traceback" not in err
    assert not (d / "PWNED").exists(), "a pickle was loaded"
    assert not (tmp_path / "o").exists(), "no outputs on a refused model"


def test_run_directory_as_model_names_its_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text("name: x\n")
    with pytest.raises(InputError, match=r"run directory, not a model: give --model .*run/model"):
        predict_cases(run, [tmp_path], tmp_path / "out")


def test_pickle_file_as_model(tmp_path: Path) -> None:
    f = tmp_path / "model.pt"
    f.write_bytes(pickle.dumps(_Payload(tmp_path / "PWNED")))
    with pytest.raises(InputError, match="refusing to unpickle"):
        load_model_dir(f)
    assert not (tmp_path / "PWNED").exists()


def test_missing_input_is_exit_2(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _cli(
        [
            "predict",
            "--model",
            str(model_dir),
            "--input",
            str(tmp_path / "nope.nii.gz"),
            "--out",
            str(tmp_path / "o"),
        ],
        monkeypatch,
        capsys,
    )
    assert code == 2 and "nope.nii.gz" in err and "no such file" in err


def test_rollout_attention_matches_monai() -> None:
    """The hand-written attention equals MONAI's own (save_attn on the einsum path)."""
    from endodistill.infer.heatmap import block_attention, heatmap_model_space
    from endodistill.models.student import enable_sdpa

    cfg = load_config("tiny", ["student.num_layers=2"])
    torch.manual_seed(1)
    model = build_student(cfg).eval()
    x = torch.randn(1, 1, *cfg.mri.size)
    h1 = heatmap_model_space(model, x)
    assert h1.shape == tuple(cfg.mri.size) and h1.min() == 0.0 and h1.max() == 1.0
    assert np.array_equal(h1, heatmap_model_space(model, x))
    enable_sdpa(model, False)
    for blk in model.blocks:
        blk.attn.save_attn = True
    tokens = torch.cat((model.cls_token, model.patch_embedding(x)), dim=1)
    with torch.no_grad():
        model(x)
        for blk in model.blocks:
            torch.testing.assert_close(block_attention(blk, tokens), blk.attn.att_mat)
            tokens = blk(tokens)


def test_mha_and_nrrd_folder(
    model_dir: Path, cases: dict[str, Path], predicted: Path, tmp_path: Path
) -> None:
    import SimpleITK as sitk

    folder = tmp_path / "itk"
    folder.mkdir()
    img = sitk.ReadImage(str(cases["nifti"]))
    sitk.WriteImage(img, str(folder / "scan.mha"))
    sitk.WriteImage(img, str(folder / "scan2.nrrd"))
    out = tmp_path / "out"
    assert predict_cases(model_dir, [folder], out) == 0
    rows = {r["case_id"]: r for r in _rows(out)}
    ref = {r["case_id"]: r for r in _rows(predicted)}["caseB"]
    assert set(rows) == {"scan", "scan2"}
    nifti_affine = nib.load(str(predicted / ref["heatmap_nifti"])).affine
    for r in rows.values():
        assert abs(float(r["probability"]) - float(ref["probability"])) < 1e-5
        hm = nib.load(str(out / r["heatmap_nifti"]))
        assert hm.shape == (320, 320, 19)
        np.testing.assert_allclose(hm.affine, nifti_affine, atol=1e-4)
