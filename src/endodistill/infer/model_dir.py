"""The deployable model directory: weights, resolved config and metadata, with no pickle anywhere.

Layout of ``MODEL_DIR`` (written by :func:`save_model_dir`, read by :func:`load_model_dir`)::

    model.safetensors   weights (safetensors: a JSON header and raw tensors, nothing executable)
    config.yaml         the resolved run config (``endodistill.config.dump_config``)
    metadata.json       kind (``student``: the MRI model, ``teacher``: the TVUS model, ``joint``: one model
                        of both, :mod:`endodistill.models.joint`, with ``tvus_threshold``), name, version,
                        creation time, architecture summary, preprocessing, threshold, metrics and the
                        SHA-256 of model.safetensors
    fingerprint.json    what the training data looked like (``endodistill.data.fingerprint``); optional

Loading checks, in this order, and refuses with an :class:`~endodistill.errors.InputError` naming the file
and the problem: pickle files (never opened), missing files, metadata that is not JSON, weights whose
SHA-256 differs from the one recorded in metadata.json (truncated or modified), a safetensors header that
does not parse, an architecture summary that disagrees with config.yaml (the key is named), and tensors
whose names or shapes do not fit the architecture (the tensor is named).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import endodistill
from endodistill.config import (
    Config,
    clip_input_shape,
    dump_config,
    joint_clip_frames,
    load_config,
    student_vit_spec,
)
from endodistill.errors import ConfigError, InputError
from endodistill.utils import atomic_dir, json_default, state_dict_mismatch

if TYPE_CHECKING:  # torch is imported where it is used: a refused model directory costs no torch import
    from torch import Tensor, nn


# _LAZY: torch, safetensors, MONAI, ONNX, matplotlib, tqdm and the image libraries, and the modules that
# import them (data.preprocess, infer.heatmap, models, train), are imported inside the functions that use
# them. Loading a model directory checks its files, metadata and config first: a refused one fails
# fast, without importing torch.

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
METADATA_FILE = "metadata.json"
FORMAT = "endodistill-model-dir"
FORMAT_VERSION = 1
FINGERPRINT_FILE = "fingerprint.json"
KINDS = ("student", "teacher", "joint")
_MAX_MEMBERS = 32  # networks in a teacher ensemble: a CV has 5-10 folds; refuses absurd metadata first

# Files whose loading would run the pickle machinery: refused by name, never opened.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib", ".npz", ".tar")
# Magic bytes of pickle streams (protocol 2+) and of torch.save zip archives.
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")
_MAX_WEIGHTS_BYTES = 4 << 30  # 4 GiB: far above any student; refuses absurd files before reading them


@dataclass
class LoadedModel:
    """A model directory read back: the student in eval mode and everything needed to use it.

    Attributes:
        model: the student (``StudentViT``), eval mode, on CPU.
        cfg: the resolved config it was trained with.
        threshold: decision threshold on the positive-class probability.
        metadata: the content of metadata.json.
        weights_sha256: SHA-256 of model.safetensors (checked against metadata.json).
        path: the model directory.
        kind: ``student`` (MRI volumes), ``teacher`` (TVUS clips) or ``joint`` (both).
        fingerprint: the training data's fingerprint, None for directories written without one.
    """

    model: nn.Module
    cfg: Config
    threshold: float
    metadata: dict[str, Any]
    weights_sha256: str
    path: Path = field(default_factory=Path)
    kind: str = "student"
    fingerprint: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        """Model name recorded in metadata.json."""
        return str(self.metadata.get("name", ""))

    @property
    def version(self) -> str:
        """endodistill version that wrote the model directory."""
        return str(self.metadata.get("version", ""))

    @property
    def tvus_threshold(self) -> float:
        """A joint model's decision threshold for clips (its ``threshold`` is the MRI one)."""
        return float(self.metadata.get("tvus_threshold", self.threshold))

    def identity(self) -> dict[str, str]:
        """Name, version and weights hash: what every prediction records about the model."""
        return {"model_name": self.name, "model_version": self.version, "weights_sha256": self.weights_sha256}


def arch_summary(cfg: Config, kind: str = "student", members: int = 1) -> dict[str, Any]:
    """The architecture facts a model directory must agree on (metadata vs config vs tensors).

    Args:
        cfg: the run config.
        kind: ``student`` or ``teacher``.
        members: networks in a teacher ensemble.

    Returns:
        A JSON-serialisable dict: network family, input channels and size, hyper-parameters, number and
        names of classes, positive class.
    """
    classes = {
        "num_classes": cfg.task.num_classes,
        "class_names": list(cfg.task.class_names),
        "positive_class": cfg.task.positive_class,
    }
    t = cfg.teacher
    motion = {"motion_input": t.motion_input, "motion": t.motion, "motion_norm": t.motion_norm}
    if kind == "teacher":
        return {
            "network": "endodistill.infer.teacher_model.TeacherEnsemble",
            "members": int(members),
            "arch": t.arch,
            "width": t.width,
            "in_channels": 2 if t.motion == "flow" else 1,
            "frames": cfg.tvus.frames,
            "input_size": [int(v) for v in cfg.tvus.size],
            "flow_size": None if t.flow_size is None else [int(v) for v in t.flow_size],
            **motion,
            **classes,
        }
    s = cfg.student
    # The MRI path: the student's ViT (the joint model's MRI tokenizer and shared blocks too).
    spec = student_vit_spec(cfg)
    vit = {
        **{k: [int(x) for x in v] if isinstance(v, tuple) else v for k, v in spec.items() if k != "img_size"},
        "input_size": [int(v) for v in spec["img_size"]],
        "dropout": s.dropout,
        "stem": s.stem,
        "stem_width": s.stem_width,
    }
    if kind == "joint":
        j = cfg.joint
        return {
            "network": "endodistill.models.joint.JointViT",
            **vit,
            "clip_frames": cfg.tvus.frames,
            "clip_input": [int(v) for v in clip_input_shape(cfg)],
            "clip_tubelet": [
                int(j.tubelet_frames or joint_clip_frames(cfg)),
                *[int(v) for v in j.clip_patch],
            ],
            **motion,
            "pool": j.pool,
            **classes,
        }
    plain = s.stem == "linear" and s.pool == "cls"
    return {
        "network": "monai.networks.nets.ViT" if plain else "endodistill.models.student.StudentViT",
        **vit,
        "pool": s.pool,
        **classes,
    }


def _build(cfg: Config, kind: str = "student", members: int = 1) -> nn.Module:
    if kind == "teacher":
        # imported here: teacher_model imports this module
        from endodistill.infer.teacher_model import build_teacher_ensemble

        return build_teacher_ensemble(cfg, members)
    if kind == "joint":
        from endodistill.models.joint import build_joint  # on use: see _LAZY

        return build_joint(cfg)
    from endodistill.models.student import build_student  # on use: see _LAZY

    return build_student(cfg)


def _check_tensors(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], where: Path | str) -> None:
    """Refuse a state dict whose keys or shapes differ from the architecture's, naming the first culprit."""
    bad = state_dict_mismatch(state, expected)
    if bad is not None:
        what, k, n = bad
        if what == "missing":
            raise InputError(
                where, f"tensor '{k}' is missing ({n} missing): the weights are for a different architecture"
            )
        if what == "unexpected":
            raise InputError(
                where,
                f"unexpected tensor '{k}' ({n} unexpected): the weights are for a different architecture",
            )
        raise InputError(
            where,
            f"tensor '{k}' has shape {list(state[k].shape)} but the architecture needs {list(expected[k].shape)}: "
            "the model was trained for a different input size or architecture",
        )
    for k in sorted(expected):
        if not state[k].is_floating_point():
            raise InputError(where, f"tensor '{k}' has dtype {state[k].dtype}, expected floating point")


def save_model_dir(
    out_dir: str | Path,
    state_dict: Mapping[str, Tensor],
    cfg: Config,
    threshold: float,
    metrics: Mapping[str, Any],
    name: str = "endodistill-pod",
    kind: str = "student",
    members: int = 1,
    fingerprint: Mapping[str, Any] | None = None,
    tvus_threshold: float | None = None,
) -> Path:
    """Write a deployable model directory atomically (a staging folder renamed into place).

    The weights are checked against the architecture the config describes first, so a directory that
    would not load is never written.

    Args:
        out_dir: the model directory (e.g. ``RUN_DIR/model``); replaced if it exists.
        state_dict: the student's weights.
        cfg: the resolved config the student was trained with.
        threshold: decision threshold on the positive-class probability, in [0, 1].
        metrics: evaluation figures to record (JSON-serialisable).
        name: model name recorded in metadata.json and in every prediction.
        kind: ``student`` (the MRI student), ``teacher`` (a TVUS teacher ensemble) or ``joint`` (the joint
            model of MRI and TVUS; ``threshold`` is its MRI threshold).
        members: networks in a teacher ensemble (state keys ``members.<i>.``).
        fingerprint: the training data's fingerprint, written as fingerprint.json.
        tvus_threshold: a joint model's threshold for clips (default: ``threshold``).

    Returns:
        The model directory.

    Raises:
        ValueError: a threshold outside [0, 1] or weights that do not fit the architecture.
    """
    out_dir = Path(out_dir)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    import torch  # on use: see _LAZY
    from safetensors.torch import save as st_save  # on use: see _LAZY

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state_dict.items()}
    try:
        _check_tensors(tensors, _build(cfg, kind, members).state_dict(), "state_dict")
    except InputError as e:
        raise ValueError(str(e)) from None
    # One metadata key only: safetensors writes a dict of several keys in an order that varies between
    # processes, which would make identical weights hash differently.
    blob = st_save(tensors, metadata={"format": "pt"})
    digest = hashlib.sha256(blob).hexdigest()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "name": name,
        "version": endodistill.__version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "task": "pouch of Douglas obliteration from "
        + {
            "student": "pelvic MRI",
            "teacher": "transvaginal ultrasound clips",
            "joint": "pelvic MRI or transvaginal ultrasound clips (one model)",
        }[kind]
        + " (arXiv 2307.02000)",
        "arch": arch_summary(cfg, kind, members),
        "preprocessing": (
            {"mri": cfg.mri.model_dump(mode="json"), "tvus": cfg.tvus.model_dump(mode="json")}
            if kind == "joint"
            else (cfg.mri if kind == "student" else cfg.tvus).model_dump(mode="json")
        ),
        "threshold": threshold,
        "metrics": json.loads(json.dumps(dict(metrics), default=json_default)),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": digest,
        "torch_version": torch.__version__,
    }
    if kind == "joint":
        t2 = threshold if tvus_threshold is None else float(tvus_threshold)
        if not 0.0 <= t2 <= 1.0:
            raise ValueError(f"tvus_threshold must be in [0, 1], got {t2}")
        metadata["tvus_threshold"] = t2
    with atomic_dir(out_dir, mode=0o755) as staging:  # a model directory is meant to be shared
        files = {
            WEIGHTS_FILE: blob,
            CONFIG_FILE: dump_config(cfg).encode("utf-8"),
            METADATA_FILE: (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode("utf-8"),
        }
        if fingerprint is not None:
            files[FINGERPRINT_FILE] = (json.dumps(fingerprint, indent=2, sort_keys=True) + "\n").encode()
        for fname, data in files.items():
            with open(staging / fname, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
    return out_dir


def _refuse_pickles(path: Path) -> None:
    """Raise on a pickle file given as the model, or found in place of model.safetensors."""
    if path.is_file():
        if path.name.endswith(PICKLE_SUFFIXES):
            raise InputError(
                path, "is a pickle-based checkpoint: refusing to unpickle it (a model directory is needed)"
            )
        raise InputError(
            path,
            f"not a model directory (expected a folder with {WEIGHTS_FILE}, {CONFIG_FILE}, {METADATA_FILE})",
        )
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise InputError(
                path / pickles[0],
                f"pickle-based checkpoint in place of {WEIGHTS_FILE}: refusing to unpickle it "
                "(endodistill loads safetensors only)",
            )
        raise InputError(path, f"not a model directory: {WEIGHTS_FILE} is missing")


def _read_json_object(f: Path) -> dict[str, Any]:
    """A JSON object file of a model directory; one-line InputError naming it otherwise."""
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f, f"not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise InputError(f, "must be a JSON object")
    return obj


def _read_metadata(path: Path) -> dict[str, Any]:
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise InputError(path, f"not a model directory: {METADATA_FILE} is missing")
    meta = _read_json_object(meta_path)
    for key in ("name", "version", "arch", "threshold", "weights_sha256"):
        if key not in meta:
            raise InputError(meta_path, f"missing key '{key}'")
    if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise InputError(
            meta_path, f"format_version {meta['format_version']} is newer than this endodistill understands"
        )
    thr = meta["threshold"]
    if not isinstance(thr, int | float) or isinstance(thr, bool) or not 0.0 <= float(thr) <= 1.0:
        raise InputError(meta_path, f"'threshold' must be a number in [0, 1], got {thr!r}")
    t2 = meta.get("tvus_threshold", 0.5)
    if not isinstance(t2, int | float) or isinstance(t2, bool) or not 0.0 <= float(t2) <= 1.0:
        raise InputError(meta_path, f"'tvus_threshold' must be a number in [0, 1], got {t2!r}")
    if not isinstance(meta["arch"], dict):
        raise InputError(meta_path, "'arch' must be an object")
    if model_kind(meta) not in KINDS:
        raise InputError(meta_path, f"'kind' must be one of {', '.join(KINDS)}, got {meta['kind']!r}")
    members = meta["arch"].get("members", 1)
    if not isinstance(members, int) or isinstance(members, bool) or not 1 <= members <= _MAX_MEMBERS:
        raise InputError(
            meta_path, f"'arch.members' must be an integer in [1, {_MAX_MEMBERS}], got {members!r}"
        )
    return meta


# Architecture keys added after model directories were first written, with the value they had before.
_LATER_ARCH_KEYS: dict[str, Any] = {"stem": "linear", "stem_width": 96, "pool": "cls"}


def model_kind(meta: Mapping[str, Any]) -> str:
    """``student`` or ``teacher`` (directories written before kinds existed hold a student)."""
    return str(meta.get("kind", "student"))


def _read_fingerprint(path: Path) -> dict[str, Any] | None:
    f = path / FINGERPRINT_FILE
    return _read_json_object(f) if f.is_file() else None


def _check_arch(meta: dict[str, Any], cfg: Config, meta_path: Path) -> None:
    """metadata.json's architecture summary must equal the one derived from config.yaml."""
    got = meta["arch"]
    want = arch_summary(cfg, model_kind(meta), int(got.get("members", 1)))
    for key, value in want.items():
        if key not in got and key in _LATER_ARCH_KEYS and value == _LATER_ARCH_KEYS[key]:
            continue  # written before the key existed, and the config holds its only value then
        if key not in got:
            raise InputError(meta_path, f"arch.{key} is missing")
        a = json.loads(json.dumps(got[key]))
        b = json.loads(json.dumps(value))
        if a != b:
            raise InputError(
                meta_path,
                f"arch.{key} is {a} but config.yaml gives {b}: the model was trained for a different "
                "input size or architecture than its config describes",
            )


def _read_weights(weights: Path, expected_sha: str) -> dict[str, Tensor]:
    size = weights.stat().st_size
    if size > _MAX_WEIGHTS_BYTES:
        raise InputError(weights, f"is {size} bytes: implausibly large for a model")
    blob = weights.read_bytes()
    if blob[:2] in _PICKLE_MAGIC or blob[:4] in _PICKLE_MAGIC:
        raise InputError(weights, "is a pickle / torch.save file, not safetensors: refusing to unpickle it")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != expected_sha:
        raise InputError(
            weights,
            f"SHA-256 {digest[:12]}... does not match metadata.json ({str(expected_sha)[:12]}...): "
            "the weights file is truncated or was modified",
        )
    from safetensors import SafetensorError  # on use: see _LAZY
    from safetensors.torch import load as st_load  # on use: see _LAZY

    try:
        return st_load(blob)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise InputError(weights, f"not a valid safetensors file ({reason})") from None


def read_model_dir_config(path: str | Path) -> tuple[dict[str, Any], Config]:
    """Check a model directory's layout, metadata and config without reading the weights (no torch).

    Args:
        path: the model directory.

    Returns:
        The content of metadata.json and the config.

    Raises:
        InputError: not a model directory, a pickle file, unreadable metadata or config, or an
            architecture summary that disagrees with the config.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "model directory not found")
    _refuse_pickles(path)
    meta = _read_metadata(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise InputError(path, f"not a model directory: {CONFIG_FILE} is missing")
    try:
        cfg = load_config(cfg_path)
    except ConfigError as e:
        raise InputError(cfg_path, e.reason) from None
    _check_arch(meta, cfg, path / METADATA_FILE)
    return meta, cfg


def load_model_dir(path: str | Path) -> LoadedModel:
    """Read a model directory safely (safetensors, JSON, YAML only) and rebuild the student.

    Args:
        path: the model directory written by :func:`save_model_dir`.

    Returns:
        A :class:`LoadedModel` with the student in eval mode.

    Raises:
        InputError: not a model directory, a pickle file, a truncated or tampered weights file, or an
            architecture / input size that does not match (the key or tensor is named).
    """
    path = Path(path)
    meta, cfg = read_model_dir_config(path)
    weights = path / WEIGHTS_FILE
    state = _read_weights(weights, str(meta["weights_sha256"]))
    kind = model_kind(meta)
    model = _build(cfg, kind, int(meta["arch"].get("members", 1)))
    _check_tensors(state, model.state_dict(), weights)
    model.load_state_dict(state, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(
        model=model,
        cfg=cfg,
        threshold=float(meta["threshold"]),
        metadata=meta,
        weights_sha256=str(meta["weights_sha256"]),
        path=path,
        kind=kind,
        fingerprint=_read_fingerprint(path),
    )
