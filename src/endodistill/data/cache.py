"""On-disk cache of preprocessed tensors: decode and resample once, memory-map afterwards.

Layout: ``ROOT/{mri,clip,flow}/<k[:2]>/<k>.npy`` plus ``<k>.json`` (geometry and provenance), where the key
``k`` is the SHA-256 of the source content hash (file bytes, or a DICOM folder's files), the preprocessing
config section, the DICOM series and :func:`code_hash` (the source of every ``endodistill.data`` module,
this one and its entry layout included, and the versions of the libraries that decode and resample). A
changed file, config, reader or preprocessing step therefore gets a new key and never reads a stale entry,
without anyone remembering to bump a version. Arrays are plain ``.npy`` written with ``allow_pickle=False`` and read
with ``mmap_mode="r"``; the sidecar is JSON: nothing in the cache is unpickled.

Writes go to a temporary file and are renamed into place (``os.replace``), the array before the
sidecar, so two processes filling the same entry at once both succeed and readers never see a partial
file. MONAI's ``PersistentDataset`` does not fit: it pickles, and keys on the file name rather than
on its content and the transform settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from endodistill.config import ClipPreprocessConfig, MRIPreprocessConfig
from endodistill.data.fingerprint import clip_stats, volume_stats
from endodistill.data.mri import file_sha256, load_volume
from endodistill.data.preprocess import (
    FLOW_PARAMS,
    Geometry,
    clip_displacement,
    preprocess_clip,
    preprocess_volume,
)
from endodistill.data.video import load_clip
from endodistill.errors import InputError
from endodistill.utils import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

# Libraries whose upgrade can change decoded or resampled voxels.
_KEY_LIBRARIES = ("numpy", "scipy", "nibabel", "pydicom", "SimpleITK", "av", "pillow")
_CODE_HASH: str | None = None


def code_hash() -> str:
    """SHA-256 of the code that makes a cache entry: every module of ``endodistill.data`` (not the synthetic
    generator) and the versions of :data:`_KEY_LIBRARIES`.

    The whole package folder rather than a hand-kept list, so a new reader module is covered too; an edit
    to a module that does not change the arrays (the manifest reader, say) costs one re-preprocessing.
    """
    global _CODE_HASH
    if _CODE_HASH is None:
        h = hashlib.sha256()
        for f in sorted(Path(__file__).parent.glob("*.py")):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        for lib in _KEY_LIBRARIES:
            try:
                version = metadata.version(lib)
            except metadata.PackageNotFoundError:
                version = "absent"
            h.update(f"{lib}=={version}\0".encode())
        _CODE_HASH = h.hexdigest()
    return _CODE_HASH


_HASH_MEMO: dict[tuple[str, tuple[Any, ...]], str] = {}


def _signature(path: Path) -> tuple[Any, ...]:
    """Cheap identity of a file or folder's current content: (name, size, mtime_ns) of every file."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    sig = []
    for f in files:
        st = f.stat()
        sig.append((f.name if f == path else f.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns))
    return tuple(sig)


def content_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes (or a folder's files), memoised per (path, size, mtime_ns) in this process.

    Raises:
        FileNotFoundError: the path does not exist.
    """
    p = Path(path).resolve()
    key = (str(p), _signature(p))
    h = _HASH_MEMO.get(key)
    if h is None:
        h = file_sha256(p)
        _HASH_MEMO[key] = h
    return h


def _config_dict(cfg: MRIPreprocessConfig | ClipPreprocessConfig | dict[str, Any]) -> dict[str, Any]:
    return dict(cfg) if isinstance(cfg, dict) else cfg.model_dump(mode="json")


class TensorCache:
    """Content- and config-keyed cache of preprocessed MRI volumes and ultrasound clips.

    Args:
        root: the cache folder (created on first write).

    Attributes:
        hits: entries served from disk since creation.
        misses: entries computed (and written) since creation.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self._warned = False

    # ------------------------------------------------------------------------------- keys/files
    def key(self, kind: str, path: str | Path, cfg: Any, series_uid: str | None = None) -> str:
        """The entry key for ``path`` preprocessed with ``cfg`` (``kind`` is ``mri`` or ``clip``)."""
        blob = {
            "kind": kind,
            "content": content_hash(path),
            "config": _config_dict(cfg),
            "series_uid": series_uid or "",
            "code": code_hash(),
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()

    def _paths(self, kind: str, key: str) -> tuple[Path, Path]:
        d = self.root / kind / key[:2]
        return d / f"{key}.npy", d / f"{key}.json"

    def _read(self, kind: str, key: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        npy, side = self._paths(kind, key)
        if not (npy.is_file() and side.is_file()):
            return None
        try:
            info = json.loads(side.read_text(encoding="utf-8"))
            arr = np.load(npy, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, UnicodeDecodeError):
            log.warning("cache entry %s is unreadable; rebuilding it", npy)
            return None
        if list(arr.shape) != info.get("shape") or str(arr.dtype) != info.get("dtype"):
            log.warning("cache entry %s does not match its sidecar; rebuilding it", npy)
            return None
        return arr, info

    def _write(self, kind: str, key: str, arr: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        npy, side = self._paths(kind, key)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        info = {
            **info,
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "code": code_hash(),
        }
        try:
            with atomic_path(npy) as tmp, open(tmp, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
            atomic_write_json(side, info)  # written last: its presence marks a complete entry
        except OSError as e:
            if not self._warned:
                log.warning("cannot write to the cache %s (%s); continuing without caching", self.root, e)
                self._warned = True
            return arr
        return np.load(npy, mmap_mode="r", allow_pickle=False)

    # ------------------------------------------------------------------------------------ entries
    def mri(
        self, path: str | Path, cfg: MRIPreprocessConfig, series_uid: str | None = None
    ) -> tuple[np.ndarray, Geometry]:
        """The preprocessed volume ``(1, *cfg.size)`` (read-only memory map) and its geometry.

        Raises:
            InputError: the source cannot be read (nothing is cached then).
        """
        arr, geom, _stats = self.mri_entry(path, cfg, series_uid)
        return arr, geom

    def mri_entry(
        self, path: str | Path, cfg: MRIPreprocessConfig, series_uid: str | None = None
    ) -> tuple[np.ndarray, Geometry, dict[str, Any]]:
        """Like :meth:`mri`, plus the source's fingerprint stats (:func:`~endodistill.data.fingerprint.volume_stats`).

        Raises:
            InputError: the source cannot be read (nothing is cached then).
        """
        if not Path(path).exists():
            raise InputError(path, "no such file or folder")
        key = self.key("mri", path, cfg, series_uid)
        hit = self._read("mri", key)
        if hit is not None:
            self.hits += 1
            return hit[0], Geometry.from_dict(hit[1]["geometry"]), dict(hit[1].get("stats") or {})
        self.misses += 1
        vol = load_volume(path, series_uid=series_uid)
        arr, geom = preprocess_volume(vol, cfg)
        stats = volume_stats(vol.array, vol.spacing, arr)
        info = {
            "source": str(path),
            "content_sha256": content_hash(path),
            "geometry": geom.to_dict(),
            "stats": stats,
        }
        return self._write("mri", key, arr, info), geom, stats

    def clip(self, path: str | Path, cfg: ClipPreprocessConfig) -> np.ndarray:
        """The preprocessed clip ``(T', *cfg.size)`` float32 in [0, 1] (read-only memory map).

        Raises:
            InputError: the source cannot be read (nothing is cached then).
        """
        return self.clip_entry(path, cfg)[0]

    def clip_entry(self, path: str | Path, cfg: ClipPreprocessConfig) -> tuple[np.ndarray, dict[str, Any]]:
        """Like :meth:`clip`, plus the source's fingerprint stats (:func:`~endodistill.data.fingerprint.clip_stats`).

        Raises:
            InputError: the source cannot be read (nothing is cached then).
        """
        if not Path(path).exists():
            raise InputError(path, "no such file or folder")
        key = self.key("clip", path, cfg)
        hit = self._read("clip", key)
        if hit is not None:
            self.hits += 1
            return hit[0], dict(hit[1].get("stats") or {})
        self.misses += 1
        clip = load_clip(path, max_frames=cfg.max_source_frames)
        arr = preprocess_clip(clip, cfg)
        stats = clip_stats(clip.frames, clip.fps, arr)
        info = {"source": str(path), "content_sha256": content_hash(path), "fps": clip.fps, "stats": stats}
        return self._write("clip", key, arr, info), stats

    def clip_displacement(
        self, path: str | Path, cfg: ClipPreprocessConfig, size: tuple[int, int] | None = None
    ) -> np.ndarray:
        """The clip's dense displacement fields ``(T', 2, *size)`` (read-only memory map).

        Keyed like :meth:`clip` but as its own kind (``flow``) with the grid and the flow settings in the
        key, so the grey clip's entry is shared and a changed flow setting never reads a stale field.

        Args:
            path: the clip file.
            cfg: the ``tvus`` section.
            size: the flow grid (``cfg.size`` when None), see
                :func:`endodistill.data.preprocess.clip_displacement`.

        Raises:
            InputError: the source cannot be read (nothing is cached then).
        """
        if not Path(path).exists():
            raise InputError(path, "no such file or folder")
        grid = [int(v) for v in (size or cfg.size)]
        key = self.key("flow", path, {**_config_dict(cfg), "flow": dict(FLOW_PARAMS), "flow_size": grid})
        hit = self._read("flow", key)
        if hit is not None:
            self.hits += 1
            return hit[0]
        self.misses += 1
        clip = load_clip(path, max_frames=cfg.max_source_frames)
        arr = clip_displacement(clip, cfg, (grid[0], grid[1]))
        info = {"source": str(path), "content_sha256": content_hash(path), "fps": clip.fps}
        return self._write("flow", key, arr, info)

    def clear(self) -> None:
        """Remove every cached entry (the folder itself is kept)."""
        for kind in ("mri", "clip", "flow"):
            for f in sorted((self.root / kind).rglob("*")) if (self.root / kind).is_dir() else []:
                if f.is_file():
                    os.unlink(f)
