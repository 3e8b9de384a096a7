"""Predict POD obliteration on new MRI scans or TVUS clips with a model directory.

``predict_cases`` expands the inputs into cases, then for each case: reads it, preprocesses it into the
model grid, computes the positive-class probability and the decision at the model's threshold, compares
the input with the training data's fingerprint (``warnings``; ``strict`` refuses such cases) and writes
an explanation.

- An MRI model (``RUN_DIR/model``) takes NIfTI / MetaImage / NRRD files, DICOM series folders, folders of
  such cases, or a manifest's MRI rows; its explanation is an attention-rollout heatmap on the ORIGINAL
  voxel grid (same shape and world affine as the input volume) with a PNG of central sagittal slices.
- A TVUS teacher (``RUN_DIR/teacher_model``) takes video files (mp4/avi/mov/...), DICOM cines, folders of
  PNG frames, folders of such clips, or a manifest's TVUS rows; its explanation is an occlusion map drawn
  over a few frames (:mod:`endodistill.infer.teacher_model`).
- A joint model (``kind: joint``, :mod:`endodistill.models.joint`) takes both: each case goes through the
  MRI path or the clip path by what it is (volume files and MRI DICOM series: MRI; video, ``.npy``, PNG
  frame folders and ultrasound DICOM (Modality US): clip; a manifest's rows by their modality), with that
  path's threshold and explanation; the ``modality`` column of predictions.csv says which path was used.

Outputs (each file written atomically)::

    OUT_DIR/predictions.csv              one row per case (failed cases too, with the reason)
    OUT_DIR/predictions.json             the same, plus the model identity
    OUT_DIR/heatmaps/CASE_heatmap.nii.gz
    OUT_DIR/heatmaps/CASE_heatmap.png

Case ids come from file and folder names (or the manifest's subject_id), never from DICOM tags, and no
DICOM header field is copied into outputs or logs. Outputs hold no timestamps, so predicting the same
inputs twice gives byte-identical predictions files.
"""

from __future__ import annotations

import gzip
import io
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import endodistill
from endodistill import rundir
from endodistill.config import Config, clip_input_shape
from endodistill.data.dicom import is_dicom_file
from endodistill.data.fingerprint import check_input, clip_stats, synthetic_note, volume_stats
from endodistill.data.manifest import read_manifest
from endodistill.data.mri import VOLUME_SUFFIXES, file_sha256, load_volume
from endodistill.data.video import DICOM_SUFFIXES, IMAGE_SUFFIXES, VIDEO_SUFFIXES, load_clip
from endodistill.errors import EndodistillError, InputError
from endodistill.infer.model_dir import LoadedModel, load_model_dir, model_kind, read_model_dir_config
from endodistill.infer.teacher_model import OCCLUSION_METHOD, clip_input, clip_png_bytes, occlusion_map
from endodistill.utils import atomic_write_bytes, atomic_write_csv, atomic_write_json

if TYPE_CHECKING:  # torch is imported where it is used: refused inputs and models fail fast
    import torch


# _LAZY: torch, safetensors, MONAI, ONNX, matplotlib, tqdm and the image libraries, and the modules that
# import them (data.preprocess, infer.heatmap, models, train), are imported inside the functions that use
# them. Refused inputs and model directories fail fast, before torch is imported.

log = logging.getLogger(__name__)

HEATMAP_METHOD = "attention_rollout"
CSV_COLUMNS = (
    "case_id",
    "input",
    "input_sha256",
    "status",
    "probability",
    "decision",
    "decision_label",
    "threshold",
    "warnings",
    "notes",
    "model_name",
    "model_version",
    "weights_sha256",
    "heatmap_nifti",
    "heatmap_png",
    "error",
)
# Case ids drop a volume suffix (longest first: ``.nii.gz`` before ``.gz``-less ones).
_STRIP_SUFFIXES = (*sorted(VOLUME_SUFFIXES, key=len, reverse=True), ".dcm")
_MAX_DICOM_PROBE = 64  # files looked at to decide whether a folder holds DICOM


@dataclass
class Case:
    """One scan to predict.

    Attributes:
        case_id: file-system-safe id (file/folder name or manifest subject_id), unique in the run.
        path: the volume file (any format of ``data.mri.FORMATS``), DICOM series folder or enhanced DICOM file.
        series_uid: SeriesInstanceUID to pick in a folder with several series (manifest column).
    """

    case_id: str
    path: Path
    series_uid: str | None = None
    modality: str = ""  # a joint model's path for the case (the task's student or teacher modality)


@dataclass
class CaseResult:
    """What one case gave, plus the time each step took (seconds)."""

    case: Case
    probability: float | None = None
    probabilities: list[float] = field(default_factory=list)
    input_sha256: str = ""
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ input expansion


def _safe_id(name: str) -> str:
    """A case id usable as a file name: keep letters, digits, ``._-``; the rest becomes ``_``."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return s or "case"


def _stem(path: Path) -> str:
    name = path.name
    for suf in _STRIP_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _looks_dicom(f: Path) -> bool:
    """DICOM by name (``.dcm``) or by the ``DICM`` magic after the 128-byte preamble."""
    return f.name.lower().endswith(".dcm") or is_dicom_file(f)


def _has_dicom(folder: Path, recursive: bool) -> bool:
    it = folder.rglob("*") if recursive else folder.iterdir()
    n = 0
    for f in it:
        if f.name.startswith(".") or not f.is_file():
            continue
        if _looks_dicom(f):
            return True
        n += 1
        if n >= _MAX_DICOM_PROBE:
            break
    return False


def _is_volume_file(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)


def _manifest_cases(path: Path, cfg: Config, modality: str) -> list[Case]:
    manifest = read_manifest(path, restrict_paths=cfg.data.restrict_paths, num_classes=cfg.task.num_classes)
    records = manifest.select(modality=modality)
    if not records:
        raise InputError(path, f"no rows with modality '{modality}' to predict")
    return [Case(_safe_id(r.subject_id), r.path, r.series_uid) for r in records]


def _is_clip_file(p: Path) -> bool:
    name = p.name.lower()
    return p.is_file() and (name.endswith(VIDEO_SUFFIXES + DICOM_SUFFIXES + (".npy",)) or _looks_dicom(p))


def _is_frame_folder(p: Path) -> bool:
    return p.is_dir() and any(c.is_file() and c.suffix.lower() in IMAGE_SUFFIXES for c in p.iterdir())


def _clip_stem(p: Path) -> str:
    """A clip's case id: the file name without its clip suffix, or the frame folder's name."""
    return p.stem if p.is_file() and p.suffix else p.name


def _expand_clips(inputs: Sequence[str | Path], cfg: Config, skip: Path | None) -> list[Case]:
    """Clip cases: a video/DICOM/npy file, a folder of PNG frames, a folder of those, or a manifest."""
    cases: list[Case] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise InputError(p, "no such file or folder")
        if p.is_file() and p.suffix.lower() == ".csv":
            cases.extend(_manifest_cases(p, cfg, cfg.task.teacher_modality))
        elif p.is_file() or _is_frame_folder(p):
            cases.append(Case(_safe_id(_clip_stem(p)), p))
        else:
            found = [
                Case(_safe_id(_clip_stem(c)), c)
                for c in sorted(p.iterdir())
                if not c.name.startswith(".")
                and not (skip is not None and c.resolve() == skip)
                and (_is_clip_file(c) or _is_frame_folder(c))
            ]
            if not found:
                raise InputError(
                    p, "no clip in this folder (video files, DICOM cines or folders of PNG frames)"
                )
            cases.extend(found)
    return cases


def _dicom_is_ultrasound(f: Path) -> bool:
    """Whether a DICOM file's Modality is US (read without pixel data; the tag is not recorded anywhere)."""
    try:
        import pydicom  # on use: see _LAZY

        ds = pydicom.dcmread(str(f), stop_before_pixels=True, specific_tags=["Modality"])
    except Exception:
        return False
    return str(getattr(ds, "Modality", "")).upper() == "US"


def _first_dicom(folder: Path) -> Path | None:
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith(".") and _looks_dicom(f):
            return f
    return None


def _joint_modality(p: Path, cfg: Config) -> str | None:
    """Which path of a joint model takes ``p`` as one case (None: ``p`` is a folder of cases or nothing)."""
    mri, tvus = cfg.task.student_modality, cfg.task.teacher_modality
    if p.is_file():
        if p.name.lower().endswith(VOLUME_SUFFIXES):
            return mri
        if _looks_dicom(p):
            return tvus if _dicom_is_ultrasound(p) else mri
        return tvus if _is_clip_file(p) else None
    if _is_frame_folder(p):
        return tvus
    first = _first_dicom(p) if p.is_dir() else None
    if first is not None and not _dicom_is_ultrasound(first):
        return mri  # a DICOM series folder (a folder of ultrasound DICOM files is a folder of clips)
    return None


def _expand_joint(inputs: Sequence[str | Path], cfg: Config, skip: Path | None) -> list[Case]:
    """A joint model's cases: volumes, MRI series, clips, folders of any of them, manifests of both."""
    cases: list[Case] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise InputError(p, "no such file or folder")
        if p.is_file() and p.suffix.lower() == ".csv":
            for modality in (cfg.task.student_modality, cfg.task.teacher_modality):
                try:
                    found = _manifest_cases(p, cfg, modality)
                except InputError:
                    continue  # no rows of this modality
                cases.extend(Case(c.case_id, c.path, c.series_uid, modality) for c in found)
            if not any(c.path for c in cases):
                raise InputError(p, "no rows of either modality to predict")
            continue
        own = _joint_modality(p, cfg)
        if own is not None:
            stem = _stem(p) if own == cfg.task.student_modality and p.is_file() else _clip_stem(p)
            cases.append(Case(_safe_id(stem), p, modality=own))
            continue
        if not p.is_dir():
            raise InputError(p, "neither an MRI volume nor a TVUS clip")
        found = []
        for child in sorted(p.iterdir()):
            if child.name.startswith(".") or (skip is not None and child.resolve() == skip):
                continue
            if child.is_dir() and not _is_frame_folder(child):
                m = cfg.task.student_modality if _has_dicom(child, recursive=True) else None
            else:
                m = _joint_modality(child, cfg)
            if m is None:
                log.debug("%s: not a case, ignored", child)
                continue
            stem = _stem(child) if m == cfg.task.student_modality and child.is_file() else _clip_stem(child)
            found.append(Case(_safe_id(stem), child, modality=m))
        if not found:
            raise InputError(p, "no MRI volume, MRI series or TVUS clip in this folder")
        cases.extend(found)
    return cases


def expand_inputs(
    inputs: Sequence[str | Path], cfg: Config, out_dir: Path | None = None, kind: str = "student"
) -> list[Case]:
    """Turn the ``--input`` paths into cases.

    For an MRI model (``kind="student"``): a ``.csv`` is a manifest (its rows of the student modality); a
    folder that directly holds DICOM files is one series; any other folder is a folder of cases (each
    volume file, e.g. NIfTI/MGZ/MINC/NRRD, and each subfolder holding DICOM is a case; other files are
    ignored); any other file is one case. For a TVUS teacher (``kind="teacher"``): a manifest's
    teacher-modality rows, a clip file, a folder of PNG frames (one clip), or a folder of those. For a
    joint model (``kind="joint"``) any of these, each case tagged with its modality (``Case.modality``).

    Args:
        inputs: paths given by the user.
        cfg: the model's config (it names the modalities and the number of classes).
        out_dir: the output folder, never taken as a case.
        kind: the model directory's kind.

    Returns:
        Cases with unique ids, in input order (folders sorted by name).

    Raises:
        InputError: an input that does not exist, a folder with no case, or a bad manifest.
    """
    skip = out_dir.resolve() if out_dir is not None else None
    if kind == "joint":
        cases = _expand_joint(inputs, cfg, skip)
    else:
        cases = _expand_clips(inputs, cfg, skip) if kind == "teacher" else []
    for raw in inputs if kind == "student" else []:
        p = Path(raw)
        if not p.exists():
            raise InputError(p, "no such file or folder")
        if p.is_file() and p.suffix.lower() == ".csv":
            cases.extend(_manifest_cases(p, cfg, cfg.task.student_modality))
        elif p.is_file():
            cases.append(Case(_safe_id(_stem(p)), p))
        elif _has_dicom(p, recursive=False):
            cases.append(Case(_safe_id(p.name), p))
        else:
            found = []
            for child in sorted(p.iterdir()):
                if child.name.startswith(".") or (skip is not None and child.resolve() == skip):
                    continue
                if _is_volume_file(child):
                    found.append(Case(_safe_id(_stem(child)), child))
                elif child.is_dir() and _has_dicom(child, recursive=True):
                    found.append(Case(_safe_id(child.name), child))
                else:
                    log.debug("%s: not an MRI case, ignored", child)
            if not found:
                raise InputError(
                    p,
                    "no MRI case in this folder (volume files such as NIfTI/MGZ/MINC/NRRD, or DICOM series folders)",
                )
            cases.extend(found)
    seen: dict[str, int] = {}
    for c in cases:
        n = seen.get(c.case_id, 0) + 1
        seen[c.case_id] = n
        if n > 1:
            c.case_id = f"{c.case_id}_{n}"
    return cases


# ---------------------------------------------------------------------------------------- one case


def forward_probabilities(model: torch.nn.Module, arr: np.ndarray) -> np.ndarray:
    """Class probabilities of one preprocessed volume.

    Args:
        model: the student or teacher in eval mode.
        arr: ``(1, *size)`` float32 (``preprocess_volume`` output, or a teacher's clip input).

    Returns:
        ``(K,)`` float64 softmax of the logits.
    """
    import torch  # on use: see _LAZY

    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
    with torch.inference_mode():
        logits = model(x)
    return torch.softmax(logits.to(torch.float64), dim=1)[0].numpy()


def heatmap_nifti_bytes(heat: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzip-compressed NIfTI-1 of ``heat`` with ``affine`` as sform and qform (scanner space).

    gzip's timestamp is fixed so that the same heatmap gives the same bytes.
    """
    import nibabel as nib  # on use: see _LAZY

    img = nib.Nifti1Image(np.asarray(heat, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header["descrip"] = b"endodistill attention rollout"
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)  # level 1: 3x faster, ~same size


def sagittal_png_bytes(
    volume: np.ndarray, heat: np.ndarray, affine: np.ndarray, title: str, n_slices: int = 3
) -> bytes:
    """PNG of central sagittal slices (RAS-reoriented) with the heatmap overlaid.

    Args:
        volume: source voxels (file order).
        heat: heatmap on the same grid, in [0, 1].
        affine: voxel -> RAS world affine of both.
        title: figure title (case id, probability, decision; no patient identifiers).
        n_slices: slices shown around the centre of the left-right axis.

    Returns:
        The PNG file content.
    """
    import nibabel as nib  # on use: see _LAZY
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # on use: see _LAZY
    from matplotlib.figure import Figure  # on use: see _LAZY

    ornt = nib.orientations.io_orientation(affine)
    vol = nib.orientations.apply_orientation(volume, ornt)
    hm = nib.orientations.apply_orientation(heat, ornt)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    ras_zooms = np.empty(3)
    for i in range(3):
        ras_zooms[int(ornt[i, 0])] = zooms[i]
    nx = vol.shape[0]
    if n_slices == 1 or nx < 3:
        idx = [nx // 2]
    else:
        idx = sorted({round(float(f) * (nx - 1)) for f in np.linspace(0.35, 0.65, n_slices)})
    lo, hi = (float(v) for v in np.percentile(vol, [1.0, 99.0]))
    hi = hi if hi > lo else lo + 1.0
    fig = Figure(figsize=(3.2 * len(idx), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.84, bottom=0.07, wspace=0.05)
    for j, i in enumerate(idx):
        ax = fig.add_subplot(1, len(idx), j + 1)
        # Sagittal plane of a RAS array: axis 1 (P->A) horizontal, axis 2 (I->S) vertical, superior up.
        extent = (0.0, vol.shape[1] * ras_zooms[1], 0.0, vol.shape[2] * ras_zooms[2])
        ax.imshow(vol[i].T, cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent)
        overlay = np.ma.masked_less_equal(hm[i].T, 0.05)
        ax.imshow(overlay, cmap="jet", vmin=0.0, vmax=1.0, alpha=0.4, origin="lower", extent=extent)
        ax.set_title(f"sagittal slice {i + 1}/{nx}", fontsize=8)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.text(
        0.5, 0.01, "attention rollout heatmap; research use only, not for diagnosis", ha="center", fontsize=7
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _decision_label(lm: LoadedModel, positive: bool) -> str:
    names = lm.cfg.task.class_names
    pos = lm.cfg.task.positive_class
    if positive:
        return names[pos]
    return names[1 - pos] if len(names) == 2 else f"not_{names[pos]}"


def _one_line(text: object, limit: int = 240) -> str:
    s = re.sub(r"\s+", " ", str(text)).strip()
    return s if len(s) <= limit else s[: limit - 3] + "..."


def predict_one(
    lm: LoadedModel, case: Case, out_dir: Path | None, heatmap: bool = True, hash_input: bool = True
) -> CaseResult:
    """Predict one case and write its heatmap files (errors propagate to the caller).

    Args:
        lm: the loaded model.
        case: the case.
        out_dir: output folder for heatmaps (None: compute the heatmap but write nothing).
        heatmap: compute and write the heatmap.
        hash_input: compute the SHA-256 of the input's bytes.

    Returns:
        The :class:`CaseResult` with per-step timings (``load``, ``preprocess``, ``forward``, ``heatmap``,
        ``write``).
    """
    import torch  # on use: see _LAZY

    from endodistill.data.preprocess import preprocess_volume, to_source_grid  # on use: see _LAZY
    from endodistill.infer.heatmap import heatmap_model_space  # on use: see _LAZY

    res = CaseResult(case)
    t = time.perf_counter()
    if hash_input:
        res.input_sha256 = file_sha256(case.path)
    res.timings["hash"] = time.perf_counter() - t
    t = time.perf_counter()
    vol = load_volume(case.path, series_uid=case.series_uid)
    res.timings["load"] = time.perf_counter() - t
    t = time.perf_counter()
    arr, geometry = preprocess_volume(vol, lm.cfg.mri)
    res.timings["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    res.warnings = check_input(
        lm.fingerprint, lm.cfg.task.student_modality, volume_stats(vol.array, vol.spacing, arr)
    )
    res.timings["fingerprint"] = time.perf_counter() - t
    t = time.perf_counter()
    probs = forward_probabilities(lm.model, arr)
    res.timings["forward"] = time.perf_counter() - t
    pos = lm.cfg.task.positive_class
    res.probabilities = [float(p) for p in probs]
    res.probability = float(probs[pos])
    res.info = {
        "format": vol.format,
        "shape": [int(s) for s in vol.array.shape],
        "spacing_mm": [round(float(s), 6) for s in vol.spacing],
    }
    if heatmap:
        t = time.perf_counter()
        hm_model = heatmap_model_space(lm.model, torch.from_numpy(arr)[None])
        hm = np.clip(to_source_grid(hm_model, geometry), 0.0, 1.0).astype(np.float32)
        res.timings["heatmap"] = time.perf_counter() - t
        if (
            hm.shape != vol.array.shape
        ):  # to_source_grid guarantees this; a wrong overlay must never be written
            raise RuntimeError(f"heatmap shape {hm.shape} differs from the input {vol.array.shape}")
        if out_dir is not None:
            t = time.perf_counter()
            positive = res.probability >= lm.threshold
            title = (
                f"{case.case_id}: P({lm.cfg.task.class_names[pos]}) = {res.probability:.3f} -> "
                f"{_decision_label(lm, positive)} (threshold {lm.threshold:.3f})"
            )
            hdir = out_dir / "heatmaps"
            nii = hdir / f"{case.case_id}_heatmap.nii.gz"
            png = hdir / f"{case.case_id}_heatmap.png"
            atomic_write_bytes(nii, heatmap_nifti_bytes(hm, vol.affine))
            atomic_write_bytes(png, sagittal_png_bytes(vol.array, hm, vol.affine, title))
            res.info["heatmap_nifti"] = nii.relative_to(out_dir).as_posix()
            res.info["heatmap_png"] = png.relative_to(out_dir).as_posix()
            res.timings["write"] = time.perf_counter() - t
    return res


def predict_clip(
    lm: LoadedModel, case: Case, out_dir: Path | None, heatmap: bool = True, hash_input: bool = True
) -> CaseResult:
    """Predict one TVUS clip with a teacher model and write its occlusion PNG (errors propagate).

    Args:
        lm: the loaded teacher model (``kind == "teacher"``).
        case: the clip.
        out_dir: output folder for the saliency PNG (None: compute nothing to write).
        heatmap: compute and write the occlusion map.
        hash_input: compute the SHA-256 of the input's bytes.
    """

    res = CaseResult(case)
    t = time.perf_counter()
    if hash_input and case.path.is_file():
        res.input_sha256 = file_sha256(case.path)
    res.timings["hash"] = time.perf_counter() - t
    t = time.perf_counter()
    clip = load_clip(case.path, max_frames=lm.cfg.tvus.max_source_frames)
    res.timings["load"] = time.perf_counter() - t
    t = time.perf_counter()
    grey, x = clip_input(clip.frames, clip.fps, lm.cfg)
    res.timings["preprocess"] = time.perf_counter() - t
    res.warnings = check_input(
        lm.fingerprint, lm.cfg.task.teacher_modality, clip_stats(clip.frames, clip.fps, grey)
    )
    t = time.perf_counter()
    model = _clip_model(lm)
    probs = forward_probabilities(model, x)
    res.timings["forward"] = time.perf_counter() - t
    pos = lm.cfg.task.positive_class
    res.probabilities = [float(p) for p in probs]
    res.probability = float(probs[pos])
    res.info = {
        "format": clip.format,
        "frames": int(clip.frames.shape[0]),
        "fps": round(float(clip.fps), 4),
        "size": [int(clip.frames.shape[1]), int(clip.frames.shape[2])],
    }
    threshold = _threshold(lm, res)
    if heatmap:
        t = time.perf_counter()
        heat = occlusion_map(model, x, pos)
        res.timings["heatmap"] = time.perf_counter() - t
        if out_dir is not None:
            t = time.perf_counter()
            positive = res.probability >= threshold
            title = (
                f"{case.case_id}: P({lm.cfg.task.class_names[pos]}) = {res.probability:.3f} -> "
                f"{_decision_label(lm, positive)} (threshold {threshold:.3f})"
            )
            png = out_dir / "heatmaps" / f"{case.case_id}_occlusion.png"
            atomic_write_bytes(png, clip_png_bytes(grey, heat, title))
            res.info["heatmap_png"] = png.relative_to(out_dir).as_posix()
            res.timings["write"] = time.perf_counter() - t
    return res


def _clip_model(lm: LoadedModel) -> torch.nn.Module:
    """The network that maps a clip to logits: the teacher itself, or a joint model's clip path."""
    if lm.kind == "joint":
        from endodistill.models.joint import ClipPath  # on use: see _LAZY

        return ClipPath(lm.model).eval()  # type: ignore[arg-type]
    return lm.model


def _threshold(lm: LoadedModel, r: CaseResult) -> float:
    """The decision threshold of a case (a joint model has one per modality)."""
    if lm.kind == "joint" and r.case.modality == lm.cfg.task.teacher_modality:
        return lm.tvus_threshold
    return lm.threshold


def _predict_joint(
    lm: LoadedModel, case: Case, out_dir: Path | None, heatmap: bool = True, hash_input: bool = True
) -> CaseResult:
    """A joint model's case through its MRI path (:func:`predict_one`) or its clip path (:func:`predict_clip`)."""
    if case.modality == lm.cfg.task.teacher_modality:
        return predict_clip(lm, case, out_dir, heatmap, hash_input)
    return predict_one(lm, case, out_dir, heatmap, hash_input)


# ------------------------------------------------------------------------------------------- runs


def _row(lm: LoadedModel, r: CaseResult) -> dict[str, Any]:
    ok = not r.error
    threshold = _threshold(lm, r)
    positive = ok and r.probability is not None and r.probability >= threshold
    row: dict[str, Any] = {
        "case_id": r.case.case_id,
        "input": str(r.case.path),
        "input_sha256": r.input_sha256,
        "status": "ok" if ok else "failed",
        "probability": r.probability if ok else None,
        "decision": (1 if positive else 0) if ok else None,
        "decision_label": _decision_label(lm, positive) if ok else None,
        "threshold": threshold,
        "warnings": "; ".join(r.warnings) or None,
        "notes": synthetic_note(lm.fingerprint) or None,
        **lm.identity(),
        "heatmap_nifti": r.info.get("heatmap_nifti"),
        "heatmap_png": r.info.get("heatmap_png"),
        "error": r.error or None,
    }
    if lm.kind == "joint":
        row["modality"] = r.case.modality
    return row


def _blank_none(v: Any) -> Any:
    return "" if v is None else v


def predict_cases(
    model_dir: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    heatmap: bool = True,
    progress: bool | None = None,
    on_result: Callable[[CaseResult], None] | None = None,
    strict: bool = False,
) -> int:
    """Predict every case in ``inputs`` with the model in ``model_dir``; write results to ``out_dir``.

    A case that fails (unreadable file, broken DICOM, ...) is reported in one log line naming its input,
    recorded with ``status=failed`` and skipped; the others still run.

    Args:
        model_dir: a model directory (``RUN_DIR/model`` or ``RUN_DIR/teacher_model``).
        inputs: for an MRI model volume files (NIfTI, MGZ, MINC, NRRD, ...), DICOM series folders, folders
            of cases, or manifest csv files; for a teacher clips, frame folders, folders of clips, or
            manifests.
        out_dir: output folder (created).
        heatmap: write explanations (MRI: attention-rollout NIfTI on the input grid and a PNG; clips: an
            occlusion PNG).
        progress: show a progress bar (default: when there are several cases and stderr is a terminal).
        on_result: called with each :class:`CaseResult` (benchmarks use it for timings).
        strict: refuse (``status=failed``) a case whose input is outside the training fingerprint.

    Returns:
        The number of failed cases (the CLI exits with 3 when it is not 0).

    Raises:
        InputError: an unusable model directory, a missing input path, an empty folder or a bad manifest
            (nothing is predicted then).
    """
    from tqdm import tqdm  # on use: see _LAZY
    from tqdm.contrib.logging import logging_redirect_tqdm  # on use: see _LAZY

    out = Path(out_dir)
    # Model metadata and inputs are checked before the weights are read and torch is imported, so that
    # a refused model or input fails in a fraction of a second.
    if rundir.is_run_dir(Path(model_dir)):
        raise InputError(
            model_dir,
            f"is a run directory, not a model: give --model {Path(model_dir) / rundir.MODEL} (MRI) or "
            f"{Path(model_dir) / rundir.TEACHER_MODEL} (TVUS)",
        )
    meta, cfg = read_model_dir_config(model_dir)
    kind = model_kind(meta)
    cases = expand_inputs(inputs, cfg, out_dir=out, kind=kind)
    lm = load_model_dir(model_dir)
    one = {"teacher": predict_clip, "joint": _predict_joint}.get(kind, predict_one)
    if out.exists() and not out.is_dir():
        raise InputError(out, "output path exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = len(cases) > 1 and sys.stderr.isatty()
    results: list[CaseResult] = []
    with logging_redirect_tqdm():
        for case in tqdm(cases, desc="predict", unit="case", disable=not progress, file=sys.stderr):
            try:
                res = one(lm, case, out, heatmap=heatmap)
                if strict and res.warnings:
                    res = CaseResult(
                        case,
                        input_sha256=res.input_sha256,
                        warnings=res.warnings,
                        error=_one_line(f"{case.path}: refused (--strict): {'; '.join(res.warnings)}"),
                    )
            except (KeyboardInterrupt, SystemExit):
                raise
            except EndodistillError as e:
                res = CaseResult(case, error=_one_line(e))
            except Exception as e:  # one broken case must not stop the others
                res = CaseResult(case, error=_one_line(f"{case.path}: {type(e).__name__}: {e}"))
            if res.warnings and not res.error:
                log.warning("%s: %s", case.case_id, "; ".join(res.warnings))
            if res.error:
                log.error("failed: %s", res.error)
                if not res.input_sha256:
                    try:
                        res.input_sha256 = file_sha256(case.path)
                    except OSError:
                        res.input_sha256 = ""
            results.append(res)
            if on_result is not None:
                on_result(res)
    rows = [_row(lm, r) for r in results]
    n_failed = sum(1 for r in results if r.error)
    report = {
        "endodistill_version": endodistill.__version__,
        "model": {
            **lm.identity(),
            "kind": kind,
            "modality": {"teacher": lm.cfg.task.teacher_modality, "joint": "both"}.get(
                kind, lm.cfg.task.student_modality
            ),
            "threshold": lm.threshold,
            **({"tvus_threshold": lm.tvus_threshold} if kind == "joint" else {}),
            "positive_class": lm.cfg.task.class_names[lm.cfg.task.positive_class],
            "class_names": list(lm.cfg.task.class_names),
            "input_size": list(lm.cfg.tvus.size if kind == "teacher" else lm.cfg.mri.size),
            **({"clip_input": list(clip_input_shape(lm.cfg))} if kind == "joint" else {}),
            "fingerprint": lm.fingerprint is not None,
        },
        "strict": strict,
        "heatmap_method": (
            {"teacher": OCCLUSION_METHOD, "joint": f"MRI: {HEATMAP_METHOD}; clips: {OCCLUSION_METHOD}"}.get(
                kind, HEATMAP_METHOD
            )
            if heatmap
            else None
        ),
        "n_cases": len(results),
        "n_failed": n_failed,
        "cases": [
            {
                **row,
                "warnings": r.warnings,
                "probabilities": dict(zip(lm.cfg.task.class_names, r.probabilities)) if not r.error else None,
                "input_info": r.info or None,
            }
            for row, r in zip(rows, results)
        ],
    }
    columns = (*CSV_COLUMNS, "modality") if kind == "joint" else CSV_COLUMNS
    atomic_write_csv(out / "predictions.csv", rows, columns, cell=_blank_none, extrasaction="ignore")
    atomic_write_json(out / "predictions.json", report)
    log.info(
        "predicted %d case(s), %d failed -> %s", len(results) - n_failed, n_failed, out / "predictions.csv"
    )
    return n_failed
