"""Export: ONNX (onnxruntime round trip, dynamic batch) and MONAI bundle (MONAI's own runner)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from endodistill.config import load_config
from endodistill.errors import InputError
from endodistill.infer import export as export_mod
from endodistill.infer.export import ExportValidationError, export_model
from endodistill.infer.model_dir import load_model_dir, save_model_dir
from endodistill.infer.predict import predict_cases
from endodistill.models.student import build_student

NIFTI = "prostatex_t2_pelvis/ProstateX-0000_t2_tse_sag.nii.gz"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config("tiny")
    torch.manual_seed(3)
    model = build_student(cfg)
    return save_model_dir(tmp_path_factory.mktemp("m") / "model", model.state_dict(), cfg, 0.4, {"auc": 0.5})


def _preprocessed(path: Path) -> np.ndarray:
    from endodistill.data.mri import load_volume
    from endodistill.data.preprocess import preprocess_volume

    arr, _ = preprocess_volume(load_volume(path), load_config("tiny").mri)
    return arr[None]


def test_onnx_round_trip(model_dir: Path, real_data: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    msg = export_model(model_dir, "onnx", out, sample=real_data / NIFTI)
    assert str(out) in msg and out.is_file()
    lm = load_model_dir(model_dir)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == ["logits", "probabilities"]
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["weights_sha256"] == lm.weights_sha256 and float(meta["threshold"]) == 0.4
    real = _preprocessed(real_data / NIFTI)
    x = np.concatenate([real, np.random.default_rng(0).random((4, 1, 8, 16, 16), dtype=np.float32)])
    logits, probs = sess.run(None, {"image": x})  # batch 5: the batch axis is dynamic
    with torch.no_grad():
        ref = lm.model(torch.from_numpy(x))
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4)
    np.testing.assert_allclose(probs, torch.softmax(ref, 1).numpy(), atol=1e-4)


def test_onnx_not_written_when_validation_fails(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_mod, "TOLERANCE", -1.0)  # nothing can pass
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportValidationError, match="differ from PyTorch"):
        export_model(model_dir, "onnx", out)
    assert list(tmp_path.iterdir()) == []


def test_unknown_format(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown export format"):
        export_model(model_dir, "tflite", tmp_path / "x")


def test_monai_bundle_round_trip(model_dir: Path, real_data: Path, tmp_path: Path) -> None:
    from monai.bundle import verify_metadata
    from monai.networks.nets import ViT

    bundle = tmp_path / "bundle"
    export_model(model_dir, "monai-bundle", bundle)
    for rel in (
        "LICENSE",
        "configs/metadata.json",
        "configs/inference.json",
        "models/model.pt",
        "docs/README.md",
    ):
        assert (bundle / rel).is_file(), rel
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert (
        fmt["inputs"]["image"]["spatial_shape"] == [8, 16, 16] and fmt["outputs"]["pred"]["num_channels"] == 2
    )
    verify_metadata(
        meta_file=str(bundle / "configs" / "metadata.json"),
        filepath=str(bundle / "configs" / "metadata_schema.json"),
    )
    # models/model.pt is a plain state dict that MONAI's own ViT loads with weights_only=True.
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    net_def = dict(json.loads((bundle / "configs" / "inference.json").read_text())["network_def"])
    net_def.pop("_target_")
    ViT(**net_def).load_state_dict(state, strict=True)

    # MONAI's runner, in a fresh process, on the real NIfTI: same probability as `endodistill predict`.
    nifti = real_data / NIFTI
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(bundle / "configs" / "inference.json"),
            "--meta_file",
            str(bundle / "configs" / "metadata.json"),
            "--bundle_root",
            str(bundle),
            "--input_file",
            str(nifti),
            "--output_dir",
            str(tmp_path / "bundle_out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads((tmp_path / "bundle_out" / "prediction.json").read_text())
    assert predict_cases(model_dir, [nifti], tmp_path / "pred", heatmap=False) == 0
    pred = json.loads((tmp_path / "pred" / "predictions.json").read_text())["cases"][0]
    assert abs(got["probability"] - pred["probability"]) < 1e-4
    assert got["decision"] == pred["decision"] and got["weights_sha256"] == pred["weights_sha256"]
    assert not (bundle / "eval").exists(), "the export's own check leaves nothing in the bundle"


def test_bundle_network_of_a_pooled_mlp_stem_student(tmp_path: Path) -> None:
    """A student that is not a plain MONAI ViT (MLP stem, mean pooling) is built as StudentViT in the bundle."""
    from monai.bundle import ConfigParser

    cfg = load_config("tiny", ["student.stem=mlp", "student.pool=mean"])
    torch.manual_seed(5)
    model = build_student(cfg)
    md = save_model_dir(tmp_path / "model", model.state_dict(), cfg, 0.5, {"auc": 0.5})
    lm = load_model_dir(md)
    assert lm.metadata["arch"]["network"] == "endodistill.models.student.StudentViT"
    parser = ConfigParser(export_mod.inference_config(lm))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(lm.model.state_dict(), strict=True)
    net.eval()
    x = torch.randn(2, 1, *cfg.mri.size)
    with torch.no_grad():
        torch.testing.assert_close(net(x), lm.model(x))
    assert parser.get("logits") == "$@network(@image).detach()"


def test_model_directory_written_before_stem_and_pool_still_loads(tmp_path: Path) -> None:
    """metadata.json from before student.stem/pool existed: loads when the config holds their old values."""
    cfg = load_config("tiny")
    torch.manual_seed(6)
    md = save_model_dir(tmp_path / "model", build_student(cfg).state_dict(), cfg, 0.5, {"auc": 0.5})
    meta = json.loads((md / "metadata.json").read_text())
    for key in ("stem", "stem_width", "pool"):
        meta["arch"].pop(key)
    (md / "metadata.json").write_text(json.dumps(meta))
    assert load_model_dir(md).cfg.student.pool == "cls"
    # A pooled student's directory without the key is refused: its weights need the new head.
    cfg2 = load_config("tiny", ["student.pool=mean"])
    md2 = save_model_dir(tmp_path / "model2", build_student(cfg2).state_dict(), cfg2, 0.5, {"auc": 0.5})
    meta2 = json.loads((md2 / "metadata.json").read_text())
    meta2["arch"].pop("pool")
    (md2 / "metadata.json").write_text(json.dumps(meta2))
    with pytest.raises(InputError, match=r"arch\.pool is missing"):
        load_model_dir(md2)
