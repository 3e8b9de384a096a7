"""Peak memory bounds (issue 7): prediction on one 512x512x40 volume, against the 2 GB bound on CPU.

The reference is the same process importing torch and endodistill and doing nothing else, so the table shows
what prediction itself adds. Each measurement is a fresh ``endodistill predict`` process whose peak RSS is
read from ``os.wait4`` (the kernel's own accounting, children included). The model directory uses the demo
preset with random weights (memory does not depend on the weights). The demo's own peak is measured by
``benchmarks/bench_demo.py``.

Usage: ``python -m benchmarks.bench_memory [--shape 512 512 40] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

BOUND_MIB = 2048.0


def _peak_mib(cmd: list[str]) -> tuple[int, float]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024  # KiB -> MiB on Linux


def run(shape: tuple[int, int, int]) -> dict[str, Any]:
    """Measure the peak RSS of predicting one volume of ``shape`` (with heatmap) in a fresh process."""
    import torch

    from endodistill.config import load_config
    from endodistill.infer.model_dir import save_model_dir
    from endodistill.models.student import build_student

    with tempfile.TemporaryDirectory(prefix="endodistill-mem-") as tmp:
        tmp_path = Path(tmp)
        cfg = load_config("demo")
        torch.manual_seed(0)
        model_dir = save_model_dir(tmp_path / "model", build_student(cfg).state_dict(), cfg, 0.5, {})
        rng = np.random.default_rng(0)
        vol = rng.normal(300.0, 60.0, size=shape).astype(np.int16)
        affine = np.diag([0.4, 0.4, 4.0, 1.0])  # fine in-plane, thick slices, like a clinical T2
        nib.save(nib.Nifti1Image(vol, affine), tmp_path / "big.nii.gz")
        baseline = [sys.executable, "-c", "import torch, endodistill.infer.predict"]
        predict = [
            sys.executable, "-m", "endodistill", "predict", "--model", str(model_dir),
            "--input", str(tmp_path / "big.nii.gz"), "--out", str(tmp_path / "out"),
        ]  # fmt: skip
        rc0, base = _peak_mib(baseline)
        rc1, peak = _peak_mib(predict)
        if rc0 or rc1:
            raise SystemExit(f"a measurement failed (exit codes {rc0}, {rc1})")
    return {
        "shape": list(shape),
        "baseline_import_mib": round(base, 1),
        "predict_peak_mib": round(peak, 1),
        "predict_over_baseline": round(peak / base, 2),
        "bound_mib": BOUND_MIB,
        "within_bound": peak < BOUND_MIB,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 40])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    args = ap.parse_args(argv)
    res = run(tuple(args.shape))
    print(f"{'what':<34}{'peak RSS MiB':>14}")
    print(f"{'import torch + endodistill':<34}{res['baseline_import_mib']:>14.1f}")
    label = "predict " + "x".join(map(str, res["shape"])) + " + heatmap"
    print(f"{label:<34}{res['predict_peak_mib']:>14.1f}")
    print(
        f"ratio to import-only baseline: {res['predict_over_baseline']:.2f}; bound {BOUND_MIB:.0f} MiB: "
        f"{'OK' if res['within_bound'] else 'EXCEEDED'}"
    )
    from endodistill.utils import atomic_write_json

    atomic_write_json(args.out, res)
    return 0 if res["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
