"""One epoch over N NIfTI volumes: TensorCache cold vs warm vs MONAI's PersistentDataset.

Run: ``.venv/bin/python benchmarks/bench_cache.py [--n 16] [--preset paper] [--out results.json]``.

The volumes are simple synthetic sagittal T2-like scans (160x160x24 at 0.9x0.9x4 mm, stored PIR like a
sagittal DICOM conversion) written with nibabel into a temporary folder. "Epoch" = fetch every
preprocessed tensor once and touch its voxels. The MONAI pipeline is LoadImage -> EnsureChannelFirst
-> Orientation(RAS) -> Spacing -> ScaleIntensityRangePercentiles -> ResizeWithPadOrCrop with the same
target orientation/spacing/percentiles/size (MONAI's percentiles use all voxels and it crops at the
centre, so the tensors are close, not identical).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from endodistill.config import MRIPreprocessConfig, load_config
from endodistill.data import cache as cache_mod
from endodistill.data.cache import TensorCache


def make_volumes(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """N sagittal volumes (160x160x24, 0.9x0.9x4 mm, PIR) with a bright ellipsoid body and noise."""
    rng = np.random.default_rng(seed)
    shape = (160, 160, 24)
    aff = np.array(
        [[0, 0, 4.0, -48.0], [-0.9, 0, 0, 72.0], [0, -0.9, 0, 72.0], [0, 0, 0, 1.0]]
    )  # i -> posterior, j -> inferior, k -> right: a sagittal stack
    ii, jj, kk = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    paths = []
    for i in range(n):
        c = rng.uniform(-0.15, 0.15, size=3).astype(np.float32)
        body = ((ii - c[0]) / 0.7) ** 2 + ((jj - c[1]) / 0.8) ** 2 + ((kk - c[2]) / 0.9) ** 2 < 1
        vol = rng.normal(20, 5, size=shape).astype(np.float32) + 400 * body
        vol += 150 * np.sin(6 * ii + i) * np.cos(5 * jj) * body
        p = folder / f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(np.clip(vol, 0, None).astype(np.int16), aff), str(p))
        paths.append(p)
    return paths


def _epoch(fetch: Any, paths: list[Path]) -> float:
    t0 = time.perf_counter()
    total = 0.0
    for p in paths:
        arr = fetch(p)
        total += float(np.asarray(arr, dtype=np.float32).sum())  # touch every voxel (memory maps too)
    assert np.isfinite(total)
    return time.perf_counter() - t0


def monai_transform(cfg: MRIPreprocessConfig) -> Any:
    """The MONAI dictionary pipeline equivalent to :func:`endodistill.data.preprocess.preprocess_volume`."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ResizeWithPadOrCropd,
        ScaleIntensityRangePercentilesd,
        Spacingd,
    )

    lo, hi = cfg.percentiles
    return Compose(
        [
            LoadImaged(keys="image", image_only=True),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes=cfg.orientation),
            Spacingd(keys="image", pixdim=cfg.spacing, mode="bilinear"),
            ScaleIntensityRangePercentilesd(
                keys="image", lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True
            ),
            ResizeWithPadOrCropd(keys="image", spatial_size=cfg.size),
        ]
    )


def run(n: int, preset: str) -> list[dict[str, Any]]:
    """Time the pipelines; returns one row per pipeline."""
    from monai.data import Dataset, PersistentDataset

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)  # MONAI: optional GPU codecs, default changes
    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = load_config(preset).mri
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        tmp_p = Path(tmp)
        (tmp_p / "data").mkdir()
        paths = make_volumes(tmp_p / "data", n)

        ours = TensorCache(tmp_p / "ours")
        rows.append(
            {"pipeline": "endodistill TensorCache, cold", "s": _epoch(lambda p: ours.mri(p, cfg)[0], paths)}
        )
        warm = TensorCache(tmp_p / "ours")
        rows.append(
            {"pipeline": "endodistill TensorCache, warm", "s": _epoch(lambda p: warm.mri(p, cfg)[0], paths)}
        )
        cache_mod._HASH_MEMO.clear()  # a new process: every file is hashed again
        fresh = TensorCache(tmp_p / "ours")
        rows.append(
            {
                "pipeline": "endodistill TensorCache, warm (new process, rehash)",
                "s": _epoch(lambda p: fresh.mri(p, cfg)[0], paths),
            }
        )
        assert warm.hits == n and fresh.hits == n

        xform = monai_transform(cfg)
        index = {p: i for i, p in enumerate(paths)}
        plain = Dataset([{"image": str(p)} for p in paths], transform=xform)
        rows.append(
            {"pipeline": "MONAI Dataset (no cache)", "s": _epoch(lambda p: plain[index[p]]["image"], paths)}
        )
        data = [{"image": str(p)} for p in paths]
        pers = PersistentDataset(data, transform=xform, cache_dir=tmp_p / "monai")
        rows.append(
            {
                "pipeline": "MONAI PersistentDataset, cold",
                "s": _epoch(lambda p: pers[index[p]]["image"], paths),
            }
        )
        pers2 = PersistentDataset(data, transform=xform, cache_dir=tmp_p / "monai")
        rows.append(
            {
                "pipeline": "MONAI PersistentDataset, warm",
                "s": _epoch(lambda p: pers2[index[p]]["image"], paths),
            }
        )
        size_ours = sum(f.stat().st_size for f in (tmp_p / "ours").rglob("*") if f.is_file())
        size_monai = sum(f.stat().st_size for f in (tmp_p / "monai").rglob("*") if f.is_file())
    ref = rows[0]["s"]
    for r in rows:
        r["ratio_vs_cold"] = r["s"] / ref
        r["s_per_volume"] = r["s"] / n
    rows.append({"pipeline": "_sizes_MiB", "ours": size_ours / 2**20, "monai": size_monai / 2**20})
    return rows


def format_table(rows: list[dict[str, Any]], n: int, preset: str, cfg: MRIPreprocessConfig) -> str:
    """A plain-text table of :func:`run`'s rows."""
    lines = [
        f"one epoch over N={n} NIfTI volumes (160x160x24 @ 0.9x0.9x4 mm) -> {preset} preset "
        f"{tuple(cfg.size)} @ {tuple(cfg.spacing)} mm",
        f"{'pipeline':<52} {'epoch s':>9} {'s/vol':>8} {'vs cold':>8}",
    ]
    for r in rows:
        if r["pipeline"].startswith("_"):
            continue
        lines.append(
            f"{r['pipeline']:<52} {r['s']:>9.3f} {r['s_per_volume']:>8.4f} {r['ratio_vs_cold']:>7.3f}x"
        )
    sizes = next(r for r in rows if r["pipeline"] == "_sizes_MiB")
    lines.append(f"cache size on disk: endodistill {sizes['ours']:.1f} MiB, MONAI {sizes['monai']:.1f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="number of volumes")
    ap.add_argument("--preset", default="paper", help="config preset whose mri section is used")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = run(args.n, args.preset)
    print(format_table(rows, args.n, args.preset, load_config(args.preset).mri))
    if args.out is not None:
        from endodistill.utils import atomic_write_json

        atomic_write_json(args.out, {"n": args.n, "preset": args.preset, "rows": rows})


if __name__ == "__main__":
    main()
