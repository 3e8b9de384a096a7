"""Run every benchmark and gather their tables: ``python -m benchmarks [--full] [--only NAME ...]``.

Each benchmark runs in its own process (so that start-up, peak memory and thread settings are its own) and
writes JSON under ``benchmarks/results/``; this runner prints their tables as they come and writes
``benchmarks/results/all.json`` with every result and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name -> (module, quick args, full args); every module accepts --out PATH (bench_demo: --json PATH).
BENCHES: dict[str, tuple[str, list[str], list[str]]] = {
    "models": ("benchmarks.bench_models", ["--quick"], []),
    "cache": ("benchmarks.bench_cache", ["--n", "8"], ["--n", "32"]),
    "predict": ("benchmarks.bench_predict", ["--repeats", "2"], ["--repeats", "5"]),
    "scaling": ("benchmarks.bench_scaling", ["--quick"], []),
    "overhead": (
        "benchmarks.bench_overhead",
        ["--preset", "demo", "--workers", "0", "--batch", "16", "--cases", "160", "--epochs", "5"],
        ["--preset", "paper"],
    ),
    "memory": ("benchmarks.bench_memory", [], []),
    "compile": ("benchmarks.bench_compile", ["--repeats", "3"], []),
    "spread": ("benchmarks.bench_spread", [], []),
    "speedups": ("benchmarks.bench_speedups", [], []),
    "baselines": ("benchmarks.bench_baselines", [], []),
    "demo": ("benchmarks.bench_demo", [], []),
    # The quick run times the two 5-minute studies; --full all five (about 40 minutes on 2 cores).
    "studies": ("benchmarks.bench_studies", ["--studies", "alpha,kd_controls"], []),
}


def _machine() -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="larger sizes (slower)")
    ap.add_argument("--only", nargs="*", default=None, help=f"subset of {', '.join(BENCHES)}")
    ap.add_argument("--device", default="cpu", help="passed to benchmarks that take --device")
    args = ap.parse_args(argv)
    names = args.only or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    gathered: dict[str, object] = {"machine": _machine(), "results": {}, "wall_s": {}, "failed": []}
    for name in names:
        module, quick, full = BENCHES[name]
        out = RESULTS / f"{name}.json"
        flag = "--json" if name in ("demo", "studies") else "--out"
        cmd = [sys.executable, "-m", module, *(full if args.full else quick), flag, str(out)]
        if args.device != "cpu" and name in {"models", "scaling", "overhead", "compile"}:
            cmd += ["--device", args.device]
        print(f"\n=== {name}: {' '.join(cmd[2:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        gathered["wall_s"][name] = round(time.perf_counter() - t0, 1)  # type: ignore[index]
        if rc != 0 or not out.is_file():
            gathered["failed"].append(name)  # type: ignore[union-attr]
            print(f"=== {name} FAILED (exit {rc})", flush=True)
            continue
        gathered["results"][name] = json.loads(out.read_text())  # type: ignore[index]
    from endodistill.utils import atomic_write_json

    atomic_write_json(RESULTS / "all.json", gathered)
    print(f"\nwrote {RESULTS / 'all.json'}; wall seconds: {gathered['wall_s']}")
    return 1 if gathered["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
