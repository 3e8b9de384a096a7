"""Export a model directory to ONNX or to a MONAI bundle, validating the result before writing it.

ONNX (``fmt="onnx"``): the student, input ``image`` ``(B, 1, *cfg.mri.size)`` float32 (the output of
``preprocess_volume``), two outputs: ``logits`` ``(B, K)`` and ``probabilities`` ``(B, K)`` (softmax of the
logits), with a dynamic batch axis. A joint model (``kind: joint``) has two inputs, ``image`` and ``clip``
``(C, 1, T, H, W)`` (``preprocess_clip`` + ``sample_frames``, in [0, 1]), each with its own batch axis,
and four outputs: ``logits`` / ``probabilities`` of the images and ``clip_logits`` / ``clip_probabilities``
of the clips. Each batch must hold at least one case (MONAI's attention reshapes cannot take an empty
batch in onnxruntime): a caller with one modality passes one zero-filled case of the other and ignores its
outputs. Exported with PyTorch's TorchScript-based exporter (``dynamo=False``,
opset 17): the dynamo exporter needs ``onnxscript``, which endodistill does not depend on. The file is
kept only if onnxruntime reproduces PyTorch within 1e-4 on random batches of 1 and 3 and on a preprocessed
volume (a real one when ``sample`` is given, otherwise a synthetic phantom through the real pipeline).

MONAI bundle (``fmt="monai-bundle"``)::

    BUNDLE/LICENSE
    BUNDLE/configs/metadata.json         MONAI metadata (network_data_format, versions, task, ...)
    BUNDLE/configs/metadata_schema.json  a local JSON schema for offline `verify_metadata`
    BUNDLE/configs/inference.json        MONAI ConfigParser pipeline
    BUNDLE/models/model.pt               plain state dict (torch.save of tensors only)
    BUNDLE/docs/README.md

The network is ``monai.networks.nets.ViT`` built from our hyper-parameters (the student is a thin subclass
with identical state-dict keys; its logits are element 0 of ViT's output tuple). MONAI transforms cannot
reproduce endodistill's preprocessing exactly (foreground-centroid crop, anti-aliased resampling composed
into one affine), so inference.json calls endodistill's own ``load_volume`` and ``preprocess_volume``
through ``_target_``: the bundle needs endodistill installed, and gives the same probability as
``endodistill predict``. Before the bundle is written, it is run with MONAI's runner on a test volume and
its probability compared with ours (1e-4); its metadata is checked against the local schema.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

import endodistill
from endodistill.config import clip_input_shape, student_vit_spec
from endodistill.data.mri import load_volume
from endodistill.data.video import load_clip
from endodistill.errors import InputError
from endodistill.infer.model_dir import LoadedModel, arch_summary, load_model_dir
from endodistill.infer.predict import _joint_modality, forward_probabilities
from endodistill.infer.teacher_model import clip_input
from endodistill.utils import atomic_dir, atomic_path

if TYPE_CHECKING:  # torch is imported where it is used: a refused model directory fails fast
    from torch import nn

    from endodistill.models.joint import JointViT


# _LAZY: torch, safetensors, MONAI, ONNX, matplotlib, tqdm and the image libraries, and the modules that
# import them (data.preprocess, infer.heatmap, models, train), are imported inside the functions that use
# them. A refused model directory or sample fails fast, before torch or MONAI is imported.

log = logging.getLogger(__name__)

FORMATS = ("onnx", "monai-bundle")
OPSET = 17
TOLERANCE = 1e-4
MONAI_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)


class ExportValidationError(InputError):
    """The exported model does not reproduce the PyTorch model; nothing was written."""


def _logits_and_probs(model: nn.Module) -> nn.Module:
    """Student -> (logits, softmax probabilities): the two ONNX outputs (eval mode)."""
    import torch  # on use: see _LAZY
    from torch import nn  # on use: see _LAZY

    class _LogitsAndProbs(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.model(x)
            return logits, torch.softmax(logits, dim=1)

    return _LogitsAndProbs(model).eval()


def export_model(model_dir: str | Path, fmt: str, out: str | Path, sample: str | Path | None = None) -> str:
    """Export the model in ``model_dir`` to ``out`` and validate it.

    Args:
        model_dir: a model directory (``RUN_DIR/model``).
        fmt: ``"onnx"`` (``out`` is a file) or ``"monai-bundle"`` (``out`` is a folder).
        out: destination; replaced atomically, written only when validation passes.
        sample: an MRI volume (NIfTI file or DICOM folder, ...) used in validation besides random inputs.

    Returns:
        A one-line summary naming the written path and the largest difference found in validation.

    Raises:
        InputError: unknown format, unusable model directory or sample.
        ExportValidationError: the export does not match PyTorch within 1e-4 (nothing written).
    """
    if fmt not in FORMATS:
        raise InputError(fmt, f"unknown export format (choose {' or '.join(FORMATS)})")
    lm = load_model_dir(model_dir)
    out = Path(out)
    if lm.kind in ("teacher", "joint") and fmt != "onnx":
        what = "a TVUS teacher" if lm.kind == "teacher" else "a joint model"
        raise InputError(model_dir, f"{what} exports to onnx only (a MONAI bundle holds the MRI model)")
    with tempfile.TemporaryDirectory(prefix="endodistill-export-") as tmp:
        if sample is not None:
            volume = Path(sample)
        elif lm.kind == "teacher":
            volume = _phantom_clip(Path(tmp) / "phantom.npy")
        else:
            volume = _phantom_nifti(Path(tmp) / "phantom.nii.gz", lm)
        if fmt == "onnx" and lm.kind == "joint":
            diff = export_joint_onnx(lm, out, Path(tmp), Path(sample) if sample is not None else None)
            return f"wrote {out} (ONNX opset {OPSET}, inputs image and clip; max |onnxruntime - torch| = {diff:.2e})"
        if fmt == "onnx":
            diff = export_onnx(lm, out, volume)
            return f"wrote {out} (ONNX opset {OPSET}; max |onnxruntime - torch| = {diff:.2e})"
        diff = export_bundle(lm, out, volume)
        return f"wrote {out} (MONAI bundle; max |bundle - endodistill| probability difference = {diff:.2e})"


# ------------------------------------------------------------------------------------------ helpers


def _phantom_nifti(path: Path, lm: LoadedModel) -> Path:
    """A smooth synthetic 'pelvis' (ellipsoids, oblique-free) as NIfTI: exercises the real pipeline."""
    import nibabel as nib  # on use: see _LAZY

    shape = (48, 40, 24)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = ((g[0] / 0.9) ** 2 + (g[1] / 0.8) ** 2 + (g[2] / 0.95) ** 2 < 1).astype(np.float32)
    organ = ((g[0] / 0.3) ** 2 + ((g[1] - 0.2) / 0.25) ** 2 + (g[2] / 0.4) ** 2 < 1).astype(np.float32)
    arr = 200.0 * body + 500.0 * organ + 20.0 * np.sin(7 * g[0]) * np.cos(5 * g[1]) * body
    affine = np.diag([2.0, 2.5, 4.0, 1.0])
    affine[:3, 3] = [-48.0, -50.0, -48.0]
    nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), str(path))
    return path


def _phantom_clip(path: Path) -> Path:
    """A textured disc sliding over a still background (uint8 frames, .npy): a clip for validation."""
    rng = np.random.default_rng(0)
    bg = rng.integers(0, 120, size=(64, 64)).astype(np.float32)
    yy, xx = np.mgrid[:64, :64]
    frames = []
    for t in range(16):
        disc = ((yy - 32) ** 2 + (xx - 20 - t) ** 2) < 100
        frames.append(np.where(disc, 200.0, bg))
    np.save(path, np.stack(frames).astype(np.uint8), allow_pickle=False)
    return path


def _preprocessed(lm: LoadedModel, sample: Path) -> np.ndarray:
    """The model input ``(1, ...)`` made from a volume (MRI model) or a clip (teacher) file."""
    if lm.kind == "teacher":
        clip = load_clip(sample, max_frames=lm.cfg.tvus.max_source_frames)
        return clip_input(clip.frames, clip.fps, lm.cfg)[1][None]  # (1, C, T, H, W)
    from endodistill.data.preprocess import preprocess_volume  # on use: see _LAZY

    arr, _ = preprocess_volume(load_volume(sample), lm.cfg.mri)
    return arr[None].astype(np.float32)


def _input_shape(lm: LoadedModel) -> tuple[int, ...]:
    """One input without the batch axis: ``(1, D, H, W)`` volumes or ``(1, T, H, W)`` clips."""
    if lm.kind == "teacher":
        return clip_input_shape(lm.cfg)
    return (1, *lm.cfg.mri.size)


# --------------------------------------------------------------------------------------------- ONNX


def _checked_session(path: Path, meta: dict[str, str]) -> Any:
    """Check the ONNX file at ``path``, stamp ``meta`` and the producer into it, and open it in onnxruntime
    (one CPU thread): the validation session of both exports."""
    import onnx  # on use: see _LAZY
    import onnxruntime as ort  # on use: see _LAZY

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name, proto.producer_version = "endodistill", endodistill.__version__
    onnx.save(proto, str(path))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_onnx(lm: LoadedModel, out: Path, volume: Path) -> float:
    """Write ``lm`` as ONNX to ``out`` after checking onnxruntime against PyTorch.

    Args:
        lm: the loaded model.
        out: the .onnx file.
        volume: an MRI volume whose preprocessed array is one of the validation inputs.

    Returns:
        The largest absolute difference (logits and probabilities) over all validation inputs.

    Raises:
        ExportValidationError: a difference above 1e-4 or a batch size the file rejects.
    """
    import torch  # on use: see _LAZY

    wrapper = _logits_and_probs(lm.model)
    shape = _input_shape(lm)
    dummy = torch.zeros(1, *shape)
    gen = torch.Generator().manual_seed(0)
    # Clips are in [0, 1] (uniform noise); volumes are normalised intensities (Gaussian noise).
    draw = torch.rand if lm.kind == "teacher" else torch.randn
    inputs = {
        "random batch 1": draw(1, *shape, generator=gen),
        "random batch 3": draw(3, *shape, generator=gen),
        f"preprocessed {volume.name}": torch.from_numpy(_preprocessed(lm, volume)),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notices
            torch.onnx.export(
                wrapper,
                (dummy,),
                str(tmp),
                dynamo=False,
                opset_version=OPSET,
                input_names=["image"],
                output_names=["logits", "probabilities"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "probabilities": {0: "batch"}},
                do_constant_folding=True,
            )
        meta = {
            "name": lm.name,
            "endodistill_version": lm.version,
            "weights_sha256": lm.weights_sha256,
            "threshold": repr(lm.threshold),
            "class_names": json.dumps(list(lm.cfg.task.class_names)),
            "positive_class": str(lm.cfg.task.positive_class),
            "kind": lm.kind,
            "input": f"(B, {', '.join(map(str, shape))}) float32 from endodistill "
            + (
                "infer.teacher_model.clip_input (grey frames, or optical flow with teacher.motion flow)"
                if lm.kind == "teacher"
                else "preprocess_volume"
            ),
            "outputs": "logits (B, K); probabilities (B, K) = softmax(logits)",
        }
        sess = _checked_session(tmp, meta)
        worst = 0.0
        for name, x in inputs.items():
            with torch.inference_mode():
                ref = [t.numpy() for t in wrapper(x)]
            try:
                got = sess.run(None, {"image": x.numpy()})
            except Exception as e:  # onnxruntime raises its own exception types
                raise ExportValidationError(
                    out, f"onnxruntime failed on {name}: {type(e).__name__}"
                ) from None
            for r, g, what in zip(ref, got, ("logits", "probabilities")):
                if r.shape != g.shape:
                    raise ExportValidationError(out, f"{what} shape {g.shape} != torch {r.shape} on {name}")
                d = float(np.max(np.abs(r - g)))
                worst = max(worst, d)
                if not d <= TOLERANCE:
                    raise ExportValidationError(
                        out, f"onnxruntime {what} differ from PyTorch by {d:.2e} on {name} (> {TOLERANCE})"
                    )
    return worst


def _joint_samples(lm: LoadedModel, tmp: Path, sample: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """One preprocessed volume ``(1, 1, ...)`` and one clip ``(1, 1, T, H, W)`` for a joint model's checks.

    ``sample`` replaces the phantom of its own modality (a clip file or frame folder, else a volume).
    """
    from endodistill.data.preprocess import preprocess_volume  # on use: see _LAZY

    vol_path, clip_path = _phantom_nifti(tmp / "phantom.nii.gz", lm), _phantom_clip(tmp / "phantom.npy")
    if sample is not None:
        if _joint_modality(sample, lm.cfg) == lm.cfg.task.teacher_modality:
            clip_path = sample
        else:
            vol_path = sample
    arr, _ = preprocess_volume(load_volume(vol_path), lm.cfg.mri)
    clip = load_clip(clip_path, max_frames=lm.cfg.tvus.max_source_frames)
    return arr[None].astype(np.float32), clip_input(clip.frames, clip.fps, lm.cfg)[1][None]


def export_joint_onnx(lm: LoadedModel, out: Path, tmp: Path, sample: Path | None = None) -> float:
    """Write a joint model as one ONNX graph with inputs ``image`` and ``clip`` after checking onnxruntime.

    Validated on (image, clip) batches of (1, 1), (3, 2), (1, 4) and a preprocessed volume with a
    preprocessed clip (phantoms, or ``sample`` for its modality): every output within 1e-4 of PyTorch.

    Returns:
        The largest absolute difference over all validation inputs and outputs.
    """
    import torch  # on use: see _LAZY
    from torch import nn  # on use: see _LAZY

    class _Both(nn.Module):
        def __init__(self, net: JointViT) -> None:
            super().__init__()
            self.net = net

        def forward(self, image: torch.Tensor, clip: torch.Tensor) -> tuple[torch.Tensor, ...]:
            a = self.net(image)
            b = self.net.forward_clip(clip)
            return a, torch.softmax(a, dim=1), b, torch.softmax(b, dim=1)

    wrapper = _Both(cast("JointViT", lm.model)).eval()
    vshape = (1, *lm.cfg.mri.size)
    cshape = clip_input_shape(lm.cfg)
    gen = torch.Generator().manual_seed(0)
    vol, clip = _joint_samples(lm, tmp, sample)
    inputs = {
        f"random batches {a}+{b}": (
            torch.randn(a, *vshape, generator=gen),
            torch.rand(b, *cshape, generator=gen),
        )
        for a, b in ((1, 1), (3, 2), (1, 4))
    }
    inputs["preprocessed volume and clip"] = (torch.from_numpy(vol), torch.from_numpy(clip))
    names = ["logits", "probabilities", "clip_logits", "clip_probabilities"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp_file:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (torch.zeros(2, *vshape), torch.zeros(2, *cshape)),
                str(tmp_file),
                dynamo=False,
                opset_version=OPSET,
                input_names=["image", "clip"],
                output_names=names,
                dynamic_axes={
                    "image": {0: "batch"},
                    "logits": {0: "batch"},
                    "probabilities": {0: "batch"},
                    "clip": {0: "clip_batch"},
                    "clip_logits": {0: "clip_batch"},
                    "clip_probabilities": {0: "clip_batch"},
                },
                do_constant_folding=True,
            )
        meta = {
            "name": lm.name,
            "endodistill_version": lm.version,
            "weights_sha256": lm.weights_sha256,
            "threshold": repr(lm.threshold),
            "tvus_threshold": repr(lm.tvus_threshold),
            "class_names": json.dumps(list(lm.cfg.task.class_names)),
            "positive_class": str(lm.cfg.task.positive_class),
            "kind": lm.kind,
            "arch": json.dumps(arch_summary(lm.cfg, "joint"), sort_keys=True),
            "input": f"image (B, {', '.join(map(str, vshape))}) float32 from endodistill preprocess_volume; "
            f"clip (C, {', '.join(map(str, cshape))}) float32 from endodistill infer.teacher_model.clip_input "
            "(grey frames, or optical flow with teacher.motion flow); each batch >= 1",
            "outputs": "logits, probabilities (B, K) of the images; clip_logits, clip_probabilities (C, K)",
        }
        sess = _checked_session(tmp_file, meta)
        worst = 0.0
        for name, (xv, xc) in inputs.items():
            with torch.inference_mode():
                ref = [t.numpy() for t in wrapper(xv, xc)]
            try:
                got = sess.run(None, {"image": xv.numpy(), "clip": xc.numpy()})
            except Exception as e:  # onnxruntime raises its own exception types
                raise ExportValidationError(
                    out, f"onnxruntime failed on {name}: {type(e).__name__}"
                ) from None
            for r, g, what in zip(ref, got, names):
                if r.shape != g.shape:
                    raise ExportValidationError(out, f"{what} shape {g.shape} != torch {r.shape} on {name}")
                d = float(np.max(np.abs(r - g))) if r.size else 0.0
                worst = max(worst, d)
                if not d <= TOLERANCE:
                    raise ExportValidationError(
                        out, f"onnxruntime {what} differ from PyTorch by {d:.2e} on {name} (> {TOLERANCE})"
                    )
    return worst


# ------------------------------------------------------------------------------------- MONAI bundle


def _plain_monai_vit(lm: LoadedModel) -> bool:
    """Whether the student is exactly a MONAI ``ViT`` (linear patch embedding, cls-token head)."""
    return lm.cfg.student.stem == "linear" and lm.cfg.student.pool == "cls"


def _network_def(lm: LoadedModel) -> dict[str, Any]:
    s, cfg = lm.cfg.student, lm.cfg
    vit = {k: list(v) if isinstance(v, tuple) else v for k, v in student_vit_spec(cfg).items()}
    qkv_bias = vit.pop("qkv_bias")  # written last: inference.json's key order as before
    shared = {**vit, "num_classes": cfg.task.num_classes, "dropout_rate": s.dropout, "qkv_bias": qkv_bias}
    if not _plain_monai_vit(lm):
        # An MLP stem or a token-pooling head is our subclass of MONAI's ViT (same keys otherwise); the
        # bundle already needs endodistill for preprocessing, so it builds that class.
        extra = {"stem": s.stem, "stem_width": s.stem_width, "pool": s.pool}
        return {"_target_": "endodistill.models.student.StudentViT", **shared, **extra}
    return {
        "_target_": "monai.networks.nets.ViT",
        **shared,
        "proj_type": "conv",
        "pos_embed_type": "learnable",
        "classification": True,
        "spatial_dims": 3,
        "post_activation": "none",
    }


def inference_config(lm: LoadedModel) -> dict[str, Any]:
    """The bundle's configs/inference.json (MONAI ConfigParser syntax)."""
    cfg = lm.cfg
    return {
        "imports": ["$import json", "$import pathlib", "$import torch"],
        "bundle_root": ".",
        "input_file": "",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cpu')",
        "class_names": list(cfg.task.class_names),
        "positive_class": cfg.task.positive_class,
        "threshold": lm.threshold,
        "mri": {"_target_": "endodistill.config.MRIPreprocessConfig", **cfg.mri.model_dump(mode="json")},
        "network_def": _network_def(lm),
        "network": "$@network_def.to(@device)",
        "checkpoint": "$torch.load(@bundle_root + '/models/model.pt', map_location=@device, weights_only=True)",
        "volume": {"_target_": "endodistill.data.mri.load_volume", "path": "@input_file"},
        "preprocessing": {
            "_target_": "endodistill.data.preprocess.preprocess_volume",
            "vol": "@volume",
            "cfg": "@mri",
        },
        "image": "$torch.as_tensor(@preprocessing[0])[None].to(@device)",
        # MONAI's ViT returns (logits, hidden states); StudentViT returns the logits.
        "logits": "$@network(@image)[0].detach()" if _plain_monai_vit(lm) else "$@network(@image).detach()",
        "probabilities": "$torch.softmax(@logits.double(), dim=1)[0].cpu()",
        "probability": "$float(@probabilities[@positive_class])",
        "result": {
            "input_file": "$str(@input_file)",
            "probability": "@probability",
            "probabilities": "$dict(zip(@class_names, @probabilities.tolist()))",
            "threshold": "@threshold",
            "decision": "$int(@probability >= @threshold)",
            "positive_class": "$@class_names[@positive_class]",
            "weights_sha256": lm.weights_sha256,
        },
        "initialize": ["$@network.load_state_dict(@checkpoint, strict=True)", "$@network.eval()"],
        "run": [
            "$pathlib.Path(@output_dir).mkdir(parents=True, exist_ok=True)",
            "$pathlib.Path(@output_dir, 'prediction.json').write_text(json.dumps(@result, indent=2) + '\\n')",
        ],
        "finalize": [],
    }


def bundle_metadata(lm: LoadedModel) -> dict[str, Any]:
    """The bundle's configs/metadata.json."""
    import monai  # on use: see _LAZY
    import nibabel  # on use: see _LAZY
    import scipy  # on use: see _LAZY
    import torch  # on use: see _LAZY

    cfg = lm.cfg
    size = list(cfg.mri.size)
    k = cfg.task.num_classes
    return {
        "schema": MONAI_SCHEMA_URL,
        "version": endodistill.__version__,
        "changelog": {endodistill.__version__: f"exported by endodistill {endodistill.__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {
            "endodistill": endodistill.__version__,
            "nibabel": nibabel.__version__,
            "scipy": scipy.__version__,
        },
        "optional_packages_version": {},
        "name": lm.name,
        "task": "Pouch of Douglas obliteration (deep endometriosis sign) classification from pelvic T2 MRI",
        "description": (
            "3D ViT student distilled from a transvaginal-ultrasound video teacher (arXiv 2307.02000), "
            "exported by endodistill. Input: one MRI volume (NIfTI/DICOM/MHA/NRRD) preprocessed by "
            "endodistill (RAS, resampled, robust intensity scaling, foreground crop). Output: class "
            f"probabilities; the decision threshold on '{cfg.task.class_names[cfg.task.positive_class]}' is "
            f"{lm.threshold:.4f}."
        ),
        "authors": "endodistill",
        "copyright": "Copyright (c) the endodistill authors",
        "intended_use": "Research only. Not a medical device; not for diagnostic use.",
        "data_type": "nibabel",
        "references": [
            "Distilling missing modality knowledge from ultrasound for endometriosis diagnosis with magnetic "
            "resonance images, ISBI 2023, arXiv:2307.02000"
        ],
        "image_classes": "single channel T2-weighted MRI, scaled to [0, 1] by endodistill preprocessing",
        "pred_classes": ", ".join(f"{i}: {n}" for i, n in enumerate(cfg.task.class_names)),
        "endodistill": {
            "weights_sha256": lm.weights_sha256,
            "threshold": lm.threshold,
            "positive_class": cfg.task.positive_class,
            "preprocessing": cfg.mri.model_dump(mode="json"),
            "metrics": lm.metadata.get("metrics", {}),
        },
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "MR",
                    "num_channels": 1,
                    "spatial_shape": size,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "T2-weighted MRI"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": k,
                    "spatial_shape": [k],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {str(i): n for i, n in enumerate(cfg.task.class_names)},
                }
            },
        },
    }


def metadata_schema() -> dict[str, Any]:
    """A JSON schema (draft 7) of the mandatory metadata keys of the MONAI bundle specification.

    MONAI's published schema is fetched from the network by ``verify_metadata``; this local one lets the
    check run offline (``--filepath configs/metadata_schema.json``: an existing file is not downloaded).
    It is written from the specification's list of mandatory keys and tensor-format fields.
    """
    tensor = {
        "type": "object",
        "required": [
            "type",
            "format",
            "num_channels",
            "spatial_shape",
            "dtype",
            "value_range",
            "is_patch_data",
            "channel_def",
        ],
        "properties": {
            "type": {"type": "string"},
            "format": {"type": "string"},
            "modality": {"type": "string"},
            "num_channels": {"type": "integer", "minimum": 1},
            "spatial_shape": {"type": "array", "items": {"type": ["integer", "string"]}},
            "dtype": {"type": "string"},
            "value_range": {"type": "array", "items": {"type": "number"}},
            "is_patch_data": {"type": "boolean"},
            "channel_def": {"type": "object"},
        },
    }
    tensors = {"type": "object", "minProperties": 1, "additionalProperties": tensor}
    version = {"type": "string", "pattern": r"^\d+(\.\d+)*"}
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "MONAI bundle metadata (mandatory keys, offline check by endodistill)",
        "type": "object",
        "required": [
            "schema",
            "version",
            "monai_version",
            "pytorch_version",
            "numpy_version",
            "task",
            "description",
            "authors",
            "copyright",
            "network_data_format",
        ],
        "properties": {
            "schema": {"type": "string"},
            "version": version,
            "changelog": {"type": "object"},
            "monai_version": version,
            "pytorch_version": version,
            "numpy_version": version,
            "required_packages_version": {"type": "object", "additionalProperties": {"type": "string"}},
            "optional_packages_version": {"type": "object", "additionalProperties": {"type": "string"}},
            "task": {"type": "string", "minLength": 1},
            "description": {"type": "string", "minLength": 1},
            "authors": {"type": ["string", "array"]},
            "copyright": {"type": "string"},
            "network_data_format": {
                "type": "object",
                "required": ["inputs", "outputs"],
                "properties": {"inputs": tensors, "outputs": tensors},
            },
        },
    }


_LICENSE = """endodistill model export

The exported weights were trained with endodistill (Apache-2.0). Their licence is the one of the data
they were trained on: check it before sharing this bundle. This model is for research only; it is not a
medical device and must not be used for diagnosis.
"""


def _readme(lm: LoadedModel) -> str:
    cfg = lm.cfg
    size = " x ".join(map(str, cfg.mri.size))
    if _plain_monai_vit(lm):
        net, head = "`monai.networks.nets.ViT`", "cls-token head"
    else:
        net = (
            f"`endodistill.models.student.StudentViT` (MONAI's ViT with a {cfg.student.stem} patch embedding)"
        )
        head = {
            "cls": "cls-token head",
            "mean": "head on the mean patch token",
            "flat": "head on all patch tokens",
        }[cfg.student.pool]
    names = ", ".join(cfg.task.class_names)
    return f"""# {lm.name}: POD obliteration from pelvic MRI (MONAI bundle)

Exported by endodistill {endodistill.__version__}. Research use only; not for diagnosis.

- Network: {net} (3D, patch {list(cfg.student.patch_size)}, hidden {cfg.student.hidden_size},
  {cfg.student.num_layers} layers, {cfg.student.num_heads} heads), {head}, no final activation.
- Input: one MRI volume (NIfTI, DICOM series folder, MHA or NRRD), preprocessed by endodistill to
  {size} voxels of {list(cfg.mri.spacing)} mm in {cfg.mri.orientation} orientation, intensities scaled to [0, 1].
- Output: `eval/prediction.json` with the probabilities of ({names}), the probability of
  `{cfg.task.class_names[cfg.task.positive_class]}` and the decision at threshold {lm.threshold:.4f}.
- Weights: `models/model.pt`, a plain state dict (load it with `torch.load(..., weights_only=True)`);
  SHA-256 of the endodistill weights: `{lm.weights_sha256}`.

## Run

```bash
python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
    --bundle_root . --input_file /path/to/scan.nii.gz --output_dir /path/to/out
```

The preprocessing is endodistill's own (`endodistill.data.preprocess.preprocess_volume`, referenced by
`_target_` in `configs/inference.json`): MONAI transforms do not reproduce its foreground-centred crop and
anti-aliased resampling exactly, and the probability must equal `endodistill predict`'s. So endodistill
must be installed where the bundle runs.

## Verify the metadata (offline)

```bash
python -m monai.bundle verify_metadata --meta_file configs/metadata.json \\
    --filepath configs/metadata_schema.json
```

`metadata_schema.json` encodes the mandatory keys of the MONAI bundle specification; because the file
exists, MONAI does not download its published schema (`schema` in metadata.json). Online, leave
`--filepath` pointing to a new file name to check against MONAI's published schema instead.
"""


@contextlib.contextmanager
def _quiet_monai() -> Iterator[None]:
    """MONAI's bundle scripts log their input summary at INFO: keep the export's own output to one line."""
    # MONAI's get_logger gives each module its own level and handler: set them one by one.
    for mod in ("monai.bundle.scripts", "monai.bundle.workflows"):  # importing creates the loggers
        importlib.import_module(mod)

    names = [n for n in logging.root.manager.loggerDict if n.startswith("monai")]
    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, old):
            lg.setLevel(lvl)


def _run_bundle(bundle: Path, volume: Path, out_dir: Path) -> float:
    """Run the bundle in this process with MONAI's runner and return its positive-class probability."""
    from monai.bundle import run  # on use: see _LAZY

    with _quiet_monai(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's "config can run code" notice: we wrote this config
        run(
            config_file=str(bundle / "configs" / "inference.json"),
            meta_file=str(bundle / "configs" / "metadata.json"),
            bundle_root=str(bundle),
            input_file=str(volume),
            output_dir=str(out_dir),
            workflow_type=None,
        )
    return float(json.loads((out_dir / "prediction.json").read_text())["probability"])


def _verify_metadata(bundle: Path) -> None:
    from monai.bundle import verify_metadata  # on use: see _LAZY

    try:
        with _quiet_monai(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no hash value provided" for the local schema file
            verify_metadata(
                meta_file=str(bundle / "configs" / "metadata.json"),
                filepath=str(bundle / "configs" / "metadata_schema.json"),
            )
    except ValueError as e:
        raise ExportValidationError(
            bundle, f"metadata.json fails the schema: {str(e).splitlines()[0]}"
        ) from None


def export_bundle(lm: LoadedModel, out: Path, volume: Path) -> float:
    """Write ``lm`` as a MONAI bundle folder after running it with MONAI's runner on ``volume``.

    Args:
        lm: the loaded model.
        out: the bundle folder (replaced if it exists).
        volume: the MRI volume the bundle is run on for validation.

    Returns:
        The absolute difference between the bundle's and endodistill's positive-class probability.

    Raises:
        ExportValidationError: the bundle's probability differs by more than 1e-4, or its metadata fails.
    """
    import torch  # on use: see _LAZY

    with atomic_dir(out, mode=0o755) as staging:
        for sub in ("configs", "models", "docs"):
            (staging / sub).mkdir()
        # A plain state dict of tensors (what MONAI bundles hold); loadable with weights_only=True.
        state = {k: v.detach().clone().contiguous() for k, v in lm.model.state_dict().items()}
        torch.save(state, staging / "models" / "model.pt")
        _write_json(staging / "configs" / "inference.json", inference_config(lm))
        _write_json(staging / "configs" / "metadata.json", bundle_metadata(lm))
        _write_json(staging / "configs" / "metadata_schema.json", metadata_schema())
        (staging / "LICENSE").write_text(_LICENSE, encoding="utf-8")
        (staging / "docs" / "README.md").write_text(_readme(lm), encoding="utf-8")

        _verify_metadata(staging)
        ref = float(forward_probabilities(lm.model, _preprocessed(lm, volume)[0])[lm.cfg.task.positive_class])
        with tempfile.TemporaryDirectory(prefix="endodistill-bundle-check-") as tmp:
            got = _run_bundle(staging, volume, Path(tmp))
        diff = abs(got - ref)
        if not diff <= TOLERANCE:
            raise ExportValidationError(
                out, f"bundle probability {got:.6f} differs from endodistill's {ref:.6f} by {diff:.2e}"
            )
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging / "eval")
    return diff


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
