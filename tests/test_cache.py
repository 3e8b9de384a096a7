"""TensorCache: content + config keys, memory-mapped hits, atomic concurrent fills, no pickle."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from endodistill.config import ClipPreprocessConfig, MRIPreprocessConfig
from endodistill.data import cache as cache_mod
from endodistill.data.cache import TensorCache, content_hash
from endodistill.data.mri import load_volume
from endodistill.data.preprocess import preprocess_volume
from endodistill.errors import InputError

CFG = MRIPreprocessConfig(spacing=(4.0, 4.0, 4.0), size=(8, 8, 8))


def _nifti(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.normal(100, 20, size=(12, 11, 10)).astype(np.float32)
    arr[3:9, 3:8, 2:8] += 300
    nib.save(nib.Nifti1Image(arr, np.diag([3.0, 3.0, 3.0, 1.0])), str(path))
    return path


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_miss_then_memory_mapped_hit(tmp_path: Path) -> None:
    src = _nifti(tmp_path / "a.nii.gz")
    cache = TensorCache(tmp_path / "cache")
    a, _ = cache.mri(src, CFG)
    assert (cache.hits, cache.misses) == (0, 1)
    b, gb = TensorCache(tmp_path / "cache").mri(src, CFG)  # a fresh instance reads the disk
    assert isinstance(b, np.memmap) and not b.flags.writeable
    np.testing.assert_array_equal(a, b)
    ref, gref = preprocess_volume(load_volume(src), CFG)
    np.testing.assert_array_equal(b, ref)
    np.testing.assert_array_equal(gb.model_affine, gref.model_affine)
    np.testing.assert_array_equal(gb.source_affine, gref.source_affine)
    assert gb.source_shape == gref.source_shape
    cache.mri(src, CFG)
    assert (cache.hits, cache.misses) == (1, 1)


def test_changed_content_or_config_never_served_stale(tmp_path: Path) -> None:
    src = _nifti(tmp_path / "a.nii.gz", seed=0)
    cache = TensorCache(tmp_path / "cache")
    first, _ = cache.mri(src, CFG)
    first = np.array(first)
    # Same path, new content (even with the old mtime restored): a new key, a recomputed tensor.
    st = src.stat()
    _nifti(src, seed=1)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    second, _ = cache.mri(src, CFG)
    assert cache.misses == 2
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(second, preprocess_volume(load_volume(src), CFG)[0])
    # Another config section: another entry.
    other = CFG.model_copy(update={"percentiles": (1.0, 99.0)})
    cache.mri(src, other)
    assert cache.misses == 3
    # Touching the file without changing it keeps the entry (the key is the content, not the mtime).
    os.utime(src, None)
    cache.mri(src, CFG)
    assert cache.misses == 3 and cache.hits == 1
    assert len([p for p in _entries(tmp_path / "cache") if p.suffix == ".npy"]) == 3


def test_cache_files_are_plain_npy_and_json(tmp_path: Path) -> None:
    src = _nifti(tmp_path / "a.nii.gz")
    frames = (np.random.default_rng(0).random((6, 20, 24)) * 255).astype(np.uint8)
    np.save(tmp_path / "clip.npy", frames)
    cache = TensorCache(tmp_path / "cache")
    cache.mri(src, CFG)
    clip = cache.clip(tmp_path / "clip.npy", ClipPreprocessConfig(size=(16, 16), sector_crop=False))
    assert clip.shape == (6, 16, 16) and isinstance(clip, np.memmap)
    files = _entries(tmp_path / "cache")
    assert {p.suffix for p in files} == {".npy", ".json"}  # no temporary leftovers, nothing else
    for p in files:
        if p.suffix == ".npy":
            np.load(p, allow_pickle=False)  # would raise on pickled content
            assert b"\x80\x04" not in p.read_bytes()[:128]  # no pickle protocol header
        else:
            info = json.loads(p.read_text())
            assert info["code"] == cache_mod.code_hash() and "content_sha256" in info


def test_corrupt_entry_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = _nifti(tmp_path / "a.nii.gz")
    cache = TensorCache(tmp_path / "cache")
    good, _ = cache.mri(src, CFG)
    good = np.array(good)
    npy = next(p for p in _entries(tmp_path / "cache") if p.suffix == ".npy")
    npy.write_bytes(npy.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        again, _ = TensorCache(tmp_path / "cache").mri(src, CFG)
    np.testing.assert_array_equal(again, good)
    assert "rebuilding" in caplog.text


def test_bad_input_is_not_cached(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not an image")
    cache = TensorCache(tmp_path / "cache")
    with pytest.raises(InputError, match=r"bad\.nii\.gz"):
        cache.mri(bad, CFG)
    with pytest.raises(InputError, match="no such file"):
        cache.mri(tmp_path / "missing.nii", CFG)
    assert _entries(tmp_path / "cache") == []


def test_content_hash_memoised_and_folder_aware(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _nifti(tmp_path / "a.nii.gz")
    calls = []
    real = cache_mod.file_sha256
    monkeypatch.setattr(cache_mod, "file_sha256", lambda p: calls.append(p) or real(p))
    h1 = content_hash(src)
    h2 = content_hash(src)
    assert h1 == h2 and len(calls) == 1  # the second call is served from the memo
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "1.dcm").write_bytes(b"one")
    h_dir = content_hash(folder)
    (folder / "2.dcm").write_bytes(b"two")
    assert content_hash(folder) != h_dir  # a slice added to a DICOM folder changes the key


def _fill(args: tuple[str, list[str]]) -> list[float]:
    import torch

    torch.set_num_threads(1)
    root, paths = args
    cache = TensorCache(root)
    return [float(np.asarray(cache.mri(p, CFG)[0]).sum()) for p in paths]


def test_two_processes_fill_the_same_cache(tmp_path: Path) -> None:
    paths = [str(_nifti(tmp_path / f"v{i}.nii.gz", seed=i)) for i in range(3)]
    root = str(tmp_path / "cache")
    with mp.get_context("fork").Pool(2) as pool:
        sums = pool.map(_fill, [(root, paths), (root, paths[::-1])])
    assert sums[0] == sums[1][::-1]
    files = _entries(tmp_path / "cache")
    assert len(files) == 6 and all(not p.name.startswith(".") for p in files)
    cache = TensorCache(root)
    for p, s in zip(paths, sums[0]):
        assert float(np.asarray(cache.mri(p, CFG)[0]).sum()) == s
    assert cache.hits == 3 and cache.misses == 0


def test_dicom_folder_entries_keyed_by_series_and_content(tmp_path: Path) -> None:
    from test_readers import _uid, write_dicom_series

    folder = tmp_path / "dicom"
    vol = (np.arange(10 * 12 * 5, dtype=np.uint16).reshape(10, 12, 5) % 97) * 10
    write_dicom_series(folder, vol, series="a", names=lambda k: f"a{k}.dcm")
    files_b = write_dicom_series(folder, vol[::-1], series="b", names=lambda k: f"b{k}.dcm")
    cache = TensorCache(tmp_path / "cache")
    a, _ = cache.mri(folder, CFG, series_uid=_uid("a"))
    b, _ = cache.mri(folder, CFG, series_uid=_uid("b"))
    assert cache.misses == 2 and not np.array_equal(a, b)
    cache.mri(folder, CFG, series_uid=_uid("a"))
    assert cache.hits == 1
    # Rewriting one slice of the folder changes the key of every series stored there.
    write_dicom_series(folder, vol[::-1] + 1, series="b", names=lambda k: f"b{k}.dcm")
    assert files_b[0].exists()
    cache.mri(folder, CFG, series_uid=_uid("a"))
    assert cache.misses == 3


def test_threaded_preprocessing_gives_the_same_cohort_and_the_same_first_error(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    """``data.preprocess_threads`` fills the cache in parallel; tensors and the bad-file error do not change."""
    import csv
    import shutil

    import torch

    from endodistill.config import load_config
    from endodistill.train.data import load_cohort

    def load(manifest: Path, threads: int, cache: str):
        cfg = load_config(
            "tiny", {"data": {"cache_dir": str(tmp_path / cache), "preprocess_threads": threads}}
        )
        return load_cohort(cfg, manifest)

    one = load(tiny_cohort / "manifest.csv", 1, "c1")
    three = load(tiny_cohort / "manifest.csv", 3, "c3")
    for a, b in ((one.labelled, three.labelled), (one.unlabelled, three.unlabelled)):
        assert torch.equal(a.x, b.x) and a.subjects == b.subjects
    assert all(np.array_equal(x, y) for x, y in zip(one.tvus.clips, three.tvus.clips))
    assert any((tmp_path / "c3").rglob("*.npy"))

    # Two broken files: the error names the first in manifest order, as without threads.
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    rows = list(csv.DictReader((cohort / "manifest.csv").open()))
    mri = [r for r in rows if r["modality"] == "mri"]
    for r in (mri[3], mri[1]):
        (cohort / r["path"]).write_bytes(b"not a nifti")
    errors = []
    for threads in (1, 4):
        with pytest.raises(InputError) as e:
            load(cohort / "manifest.csv", threads, f"bad{threads}")
        errors.append(str(e.value))
    assert errors[0] == errors[1] and mri[1]["path"] in errors[0]


def test_key_follows_the_preprocessing_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An edit to a data module (or a library upgrade) gives new keys: no stale tensors, no manual bump."""
    src = _nifti(tmp_path / "a.nii.gz")
    cache = TensorCache(tmp_path / "cache")
    arr, _ = cache.mri(src, CFG)
    key = cache.key("mri", src, CFG)
    assert (
        json.loads(next(p for p in _entries(tmp_path / "cache") if p.suffix == ".json").read_text())["code"]
        == cache_mod.code_hash()
    )
    # The hash covers every module of endodistill.data: a new one changes it.
    monkeypatch.setattr(cache_mod, "_CODE_HASH", None)
    before = cache_mod.code_hash()
    data_dir = Path(cache_mod.__file__).parent
    extra = data_dir / "_test_extra_module.py"
    try:
        extra.write_text("X = 1\n")
        monkeypatch.setattr(cache_mod, "_CODE_HASH", None)
        changed = cache_mod.code_hash()
    finally:
        extra.unlink()
    monkeypatch.setattr(cache_mod, "_CODE_HASH", None)
    assert changed != before and cache_mod.code_hash() == before
    monkeypatch.setattr(cache_mod, "_CODE_HASH", "0" * 64)
    assert cache.key("mri", src, CFG) != key
    misses = cache.misses
    cache.mri(src, CFG)
    assert cache.misses == misses + 1  # recomputed under the new code, not served stale
    monkeypatch.setattr(cache_mod, "_CODE_HASH", None)
    np.testing.assert_array_equal(cache.mri(src, CFG)[0], arr)
