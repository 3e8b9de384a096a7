"""The cohort as in-memory tensors, preprocessed once through the on-disk cache and shared by every fit.

:func:`load_cohort` reads the manifest, preprocesses each file once (``TensorCache``: memory-mapped ``.npy``
keyed by content and config hashes) and returns the labelled MRI volumes, the unlabelled MRI pool and the
TVUS clips. Every stage, fold and method indexes these arrays; nothing is re-read per fit, and a second
call in the same process with the same manifest and preprocessing returns the same object.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from endodistill.config import Config
from endodistill.data.cache import TensorCache
from endodistill.data.fingerprint import build_fingerprint, summarise
from endodistill.data.manifest import read_manifest
from endodistill.data.preprocess import sample_frames
from endodistill.data.synthetic import generate_cohort
from endodistill.errors import InputError
from endodistill.utils import thread_map

log = logging.getLogger("endodistill")

_MEMO: dict[str, CohortData] = {}


@dataclass
class VolumeSet:
    """Preprocessed MRI volumes of one kind (labelled, or the unlabelled pool).

    Attributes:
        x: ``(N, 1, *cfg.mri.size)`` float32 volumes.
        labels: ``(N,)`` int64 labels (-1 when unlabelled).
        subjects: subject id of each volume.
        paths: source file of each volume.
    """

    x: Tensor
    labels: np.ndarray
    subjects: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.subjects)

    def index(self, subjects: Iterable[str]) -> np.ndarray:
        """Indices of the volumes of the given subjects (in dataset order)."""
        wanted = set(subjects)
        return np.array([i for i, s in enumerate(self.subjects) if s in wanted], dtype=np.int64)


@dataclass
class ClipSet:
    """Preprocessed teacher clips (TVUS): variable-length ``(T', H, W)`` float32 arrays in [0, 1].

    Attributes:
        clips: one array per clip.
        labels: ``(N,)`` int64 labels (-1 when unlabelled).
        subjects: subject id of each clip.
        paths: source file of each clip.
        flows: per clip its ``(T', 2, H, W)`` displacement from the first frame
            (:func:`endodistill.data.preprocess.clip_displacement`), when the teacher reads optical flow.
    """

    clips: list[np.ndarray]
    labels: np.ndarray
    subjects: list[str]
    paths: list[str]
    flows: list[np.ndarray] | None = None
    _eval: dict[int, Tensor] = field(default_factory=dict, repr=False)
    _eval_flow: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.clips)

    def eval_tensor(self, frames: int) -> Tensor:
        """All clips with ``frames`` frames spread uniformly over each clip: ``(N, 1, frames, H, W)``."""
        if frames not in self._eval:
            rng = np.random.default_rng(0)  # unused when train=False
            arr = np.stack([sample_frames(c, frames, train=False, rng=rng) for c in self.clips])
            self._eval[frames] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[:, None]
        return self._eval[frames]

    def eval_flow_tensor(self, frames: int) -> Tensor:
        """The displacement fields at the frames of :meth:`eval_tensor`: ``(N, 2, frames, H, W)``.

        Raises:
            ValueError: the clips were loaded without displacement fields.
        """
        if self.flows is None:
            raise ValueError("these clips have no displacement fields (teacher.motion is not 'flow')")
        if frames not in self._eval_flow:
            rng = np.random.default_rng(0)  # unused when train=False
            arr = np.stack([sample_frames(f, frames, train=False, rng=rng) for f in self.flows])
            # (N, T, 2, H, W) -> (N, 2, T, H, W): the flow components are the channels.
            self._eval_flow[frames] = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 2, 1, 3, 4)))
        return self._eval_flow[frames]


@dataclass
class CohortData:
    """Everything the training stages read, preprocessed and in memory.

    Attributes:
        manifest: the manifest's path.
        labelled: labelled student-modality volumes (the cross-validated set).
        unlabelled: unlabelled student-modality volumes (the MAE pool).
        tvus: teacher-modality clips (labelled ones train the teacher).
        cohort: ``cohort.json`` next to the manifest when present (synthetic data), else counts.
        files: every input file (for hashing).
        fingerprint: what the inputs looked like (:func:`endodistill.data.fingerprint.build_fingerprint`).
    """

    manifest: Path
    labelled: VolumeSet
    unlabelled: VolumeSet
    tvus: ClipSet
    cohort: dict[str, Any]
    files: list[Path]
    fingerprint: dict[str, Any] = field(default_factory=dict)


def cache_root(cfg: Config) -> Path:
    """The preprocessing cache: ``cfg.data.cache_dir``, else ``$ENDODISTILL_CACHE``, else ~/.cache/endodistill."""
    if cfg.data.cache_dir is not None:
        return Path(cfg.data.cache_dir).expanduser()
    env = os.environ.get("ENDODISTILL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "endodistill"


def ensure_manifest(cfg: Config, cohort_dir: Path) -> Path:
    """The manifest to use: ``cfg.data.manifest``, or a synthetic cohort generated into ``cohort_dir``.

    A synthetic cohort already in ``cohort_dir`` (``manifest.csv`` and ``cohort.json`` present) is reused.

    Raises:
        InputError: the configured manifest does not exist.
    """
    if cfg.data.manifest is not None:
        m = Path(cfg.data.manifest)
        if not m.is_file():
            raise InputError(m, "manifest not found")
        return m.resolve()
    cohort_dir = Path(cohort_dir)
    manifest = cohort_dir / "manifest.csv"
    if manifest.is_file() and (cohort_dir / "cohort.json").is_file():
        log.info("reusing the synthetic cohort in %s", cohort_dir)
        return manifest.resolve()
    s = cfg.data.synth
    log.info("generating the synthetic %s cohort into %s", s.preset, cohort_dir)
    generate_cohort(
        cohort_dir,
        preset=s.preset,
        seed=s.seed,
        paired_fraction=s.paired_fraction,
        n_mri_labelled=s.n_mri_labelled,
        n_mri_unlabelled=s.n_mri_unlabelled,
        n_tvus=s.n_tvus,
        pool_shift=s.pool_shift,
        severity_coupling=s.severity_coupling,
    )
    return manifest.resolve()


def _memo_key(cfg: Config, manifest: Path, root: Path) -> str:
    st = manifest.stat()
    parts = {
        "manifest": str(manifest),
        "mtime": st.st_mtime_ns,
        "size": st.st_size,
        "mri": cfg.mri.model_dump(mode="json"),
        "tvus": cfg.tvus.model_dump(mode="json"),
        "flow": [cfg.teacher.motion == "flow", cfg.teacher.flow_size],
        "task": cfg.task.model_dump(mode="json"),
        "data": {k: str(v) for k, v in cfg.data.model_dump(mode="json").items()},
        "cache": str(root),
    }
    return json.dumps(parts, sort_keys=True)


def _warm_cache(cache: Any, cfg: Config, volumes: list[tuple[Any, str | None]], clips: list[Any]) -> None:
    """Preprocess the files missing from ``cache`` in a pool of threads, before the ordered pass reads them.

    Decoding (zlib, FFmpeg), resampling and hashing run in C with the GIL released, so threads use the cores
    without the start-up and fork-safety issues of worker processes. Failures are left to the ordered pass,
    which reports the first bad file in manifest order with its usual one-line error.
    """
    jobs = [(r, uid) for r, uid in volumes] + [(r, False) for r in clips]
    if cfg.teacher.motion == "flow":
        jobs += [(r, True) for r in clips]

    def one(job: tuple[Any, str | bool | None]) -> None:
        r, uid = job
        try:
            if uid is False:
                cache.clip(r.path, cfg.tvus)
            elif uid is True:
                cache.clip_displacement(r.path, cfg.tvus, cfg.teacher.flow_size)
            else:
                cache.mri(r.path, cfg.mri, series_uid=uid)
        except Exception:  # reported by the ordered pass
            pass

    if len(jobs) > 1 and (cfg.data.preprocess_threads or os.cpu_count() or 1) > 1:
        thread_map(one, jobs, cfg.data.preprocess_threads, "endodistill-preprocess")


def load_cohort(cfg: Config, manifest: str | Path) -> CohortData:
    """Read the manifest and preprocess every file once (cached on disk, memoised in the process).

    Args:
        cfg: the run configuration (``task`` names the modalities and classes; ``mri``/``tvus`` the
            preprocessing; ``data`` the cache and DICOM series choices).
        manifest: the manifest csv.

    Returns:
        The cohort's tensors.

    Raises:
        InputError: a bad manifest or file (named), no labelled student volume, or no labelled clip.
    """
    manifest = Path(manifest).resolve()
    root = cache_root(cfg)
    key = _memo_key(cfg, manifest, root)
    if key in _MEMO:
        return _MEMO[key]
    m = read_manifest(manifest, restrict_paths=cfg.data.restrict_paths, num_classes=cfg.task.num_classes)
    student, teacher = cfg.task.student_modality, cfg.task.teacher_modality
    cache = TensorCache(root)

    def series(r: Any) -> str | None:
        return (
            r.series_uid or cfg.data.dicom_series.get(r.subject_id) or cfg.data.dicom_series.get(str(r.path))
        )

    _warm_cache(cache, cfg, [(r, series(r)) for r in m.select(student)], m.select(teacher))

    stats: dict[str, list[tuple[dict[str, Any], str]]] = {student: [], teacher: []}

    def volumes(labelled: bool) -> VolumeSet:
        recs = m.select(student, labelled=labelled)
        arrs, subjects, labels, paths = [], [], [], []
        for r in recs:
            arr, _geom, st = cache.mri_entry(r.path, cfg.mri, series_uid=series(r))
            stats[student].append((st, r.extra.get("site", "")))
            arrs.append(np.asarray(arr, dtype=np.float32))
            subjects.append(r.subject_id)
            labels.append(-1 if r.label is None else int(r.label))
            paths.append(str(r.path))
        if arrs:
            x = torch.from_numpy(np.ascontiguousarray(np.stack(arrs)))
        else:
            x = torch.zeros((0, 1, *cfg.mri.size), dtype=torch.float32)
        if x.ndim == 4:  # a cache returning (D, H, W) volumes: add the channel axis
            x = x[:, None]
        return VolumeSet(x=x, labels=np.asarray(labels, dtype=np.int64), subjects=subjects, paths=paths)

    labelled = volumes(True)
    if len(labelled) == 0:
        raise InputError(manifest, f"no labelled '{student}' rows: nothing to cross-validate")
    # One labelled volume per subject: the out-of-fold table has one row per subject and method.
    seen: dict[str, int] = {}
    for sid, row in zip(labelled.subjects, m.select(student, labelled=True)):
        if sid in seen:
            raise InputError(
                manifest,
                f"rows {seen[sid]} and {row.row}: subject {sid!r} has two labelled '{student}' volumes",
            )
        seen[sid] = row.row
    unlabelled = volumes(False)

    clips, c_labels, c_subjects, c_paths = [], [], [], []
    for r in m.select(teacher):
        arr, st = cache.clip_entry(r.path, cfg.tvus)
        stats[teacher].append((st, r.extra.get("site", "")))
        clips.append(np.asarray(arr, dtype=np.float32))
        c_labels.append(-1 if r.label is None else int(r.label))
        c_subjects.append(r.subject_id)
        c_paths.append(str(r.path))
    flows = None
    if cfg.teacher.motion == "flow":
        flows = [
            np.asarray(cache.clip_displacement(r.path, cfg.tvus, cfg.teacher.flow_size), dtype=np.float32)
            for r in m.select(teacher)
        ]
    tvus = ClipSet(
        clips=clips,
        labels=np.asarray(c_labels, dtype=np.int64),
        subjects=c_subjects,
        paths=c_paths,
        flows=flows,
    )

    cohort_json = manifest.parent / "cohort.json"
    cohort: dict[str, Any] = {}
    if cohort_json.is_file():
        try:
            cohort = json.loads(cohort_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            cohort = {}
    cohort.setdefault("n_mri_labelled", len(labelled))
    cohort.setdefault("n_mri_unlabelled", len(unlabelled))
    cohort.setdefault("n_tvus", len(tvus))
    cohort["class_counts"] = {
        student: np.bincount(labelled.labels, minlength=cfg.task.num_classes).tolist(),
        teacher: np.bincount(tvus.labels[tvus.labels >= 0], minlength=cfg.task.num_classes).tolist(),
    }
    cohort["manifest"] = str(manifest)
    files = [manifest, *(r.path for r in m.records)]
    fingerprint = build_fingerprint(
        {
            mod: summarise([e for e, _ in rows if e], [site for e, site in rows if e])
            for mod, rows in stats.items()
        },
        synthetic=cohort.get("generator") == "endodistill.data.synthetic",
    )
    data = CohortData(
        manifest=manifest,
        labelled=labelled,
        unlabelled=unlabelled,
        tvus=tvus,
        cohort=cohort,
        files=files,
        fingerprint=fingerprint,
    )
    _MEMO.clear()  # one cohort at a time: tests and runs do not pile up memory
    _MEMO[key] = data
    return data
