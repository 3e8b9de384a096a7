"""Latency of ``endodistill predict`` per case on the real ProstateX T2 series (DICOM folder and its NIfTI).

A model directory is created on the fly from the demo config with RANDOM weights (the timings do not depend
on the weights; no trained model is needed). For each input the steps of :func:`predict_one` are timed:

* ``hash``: SHA-256 of the input's bytes (recorded in predictions);
* ``load``: reading the volume (pydicom / nibabel);
* ``preprocess``: orientation, resampling, intensity scaling, crop (into the model grid);
* ``forward``: the student's forward pass and softmax;
* ``heatmap``: attention rollout, upsampling to the model grid and back to the source grid;
* ``write``: the heatmap NIfTI and the sagittal PNG.

Each case is run once to warm up, then ``--repeats`` times; the median is reported, with each step's ratio to
the forward pass, plus the model-directory load time and the process's peak RSS.

Usage: ``python -m benchmarks.bench_predict [--repeats N] [--threads N] [--config demo] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from endodistill.config import load_config
from endodistill.infer.model_dir import load_model_dir, save_model_dir
from endodistill.infer.predict import Case, predict_one
from endodistill.models.student import build_student
from endodistill.utils import atomic_write_json

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "prostatex_t2_pelvis"
SERIES = "ProstateX-0000_t2_tse_sag"
STEPS = ("hash", "load", "preprocess", "forward", "heatmap", "write")


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024


def run(repeats: int = 3, config: str = "demo", data: Path = REAL) -> dict[str, Any]:
    """Time every prediction step on the DICOM series and the NIfTI; return the medians (seconds)."""
    cfg = load_config(config)
    inputs = {"dicom": data / SERIES, "nifti": data / f"{SERIES}.nii.gz"}
    for p in inputs.values():
        if not p.exists():
            raise SystemExit(f"{p}: real data not found (needs ../shared/data/real)")
    result: dict[str, Any] = {
        "config": config,
        "weights": "random (seed 0): timings only",
        "model_input_size": list(cfg.mri.size),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        torch.manual_seed(0)
        model_dir = save_model_dir(Path(tmp) / "model", build_student(cfg).state_dict(), cfg, 0.5, {})
        loads = []
        for _ in range(repeats):
            t = time.perf_counter()
            lm = load_model_dir(model_dir)
            loads.append(time.perf_counter() - t)
        result["model_dir_load_s"] = statistics.median(loads)
        for name, path in inputs.items():
            case = Case(name, path)
            out = Path(tmp) / f"out_{name}"
            predict_one(lm, case, out)  # warm-up
            runs = [predict_one(lm, case, out).timings for _ in range(repeats)]
            med = {s: statistics.median(r.get(s, 0.0) for r in runs) for s in STEPS}
            med["total"] = sum(med[s] for s in STEPS)
            result["cases"][name] = {"input": str(path), "median_s": med}
    result["peak_rss_mib"] = _peak_rss_mib()
    return result


def format_table(res: dict[str, Any]) -> str:
    """The medians as a text table: milliseconds and ratio to the forward pass, one column pair per input."""
    names = list(res["cases"])
    head = f"{'step':<11}" + "".join(f"{n + ' ms':>13}{'x fwd':>8}" for n in names)
    lines = [head, "-" * len(head)]
    for step in (*STEPS, "total"):
        row = f"{step:<11}"
        for n in names:
            med = res["cases"][n]["median_s"]
            fwd = med["forward"] or float("nan")
            row += f"{1000 * med[step]:>13.1f}{med[step] / fwd:>8.1f}"
        lines.append(row)
    lines.append(
        f"model dir load: {1000 * res['model_dir_load_s']:.1f} ms; peak RSS {res['peak_rss_mib']:.0f} MiB; "
        f"config {res['config']} (input {res['model_input_size']}), {res['threads']} thread(s), "
        f"median of {res['repeats']}; weights: {res['weights']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--config", default="demo")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "predict.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(repeats=args.repeats, config=args.config)
    print(format_table(res))
    atomic_write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
