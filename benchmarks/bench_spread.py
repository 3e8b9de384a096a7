"""Independent fits spread over processes with torchrun (``trainer.spread_fits``) against one process.

The teacher and the MAE encoder are trained once (``endodistill train teacher`` / ``train pretrain``) into a
base run directory, which is then copied twice. Both copies are resumed: one by a single process (the 25 fold x
method fits one after another), one by ``torchrun --nproc-per-node N ... --set trainer.spread_fits=true``
(fit i on process i mod N). Both then train the final model and write the report. The table gives each
resume's wall time (process start to exit, imports included) and the speed-up. It also checks that the two
``oof_predictions.csv`` are byte-identical.

On a CPU each process uses ``trainer.threads`` threads (1 in the demo preset): N processes need N free cores.

Usage: ``python -m benchmarks.bench_spread [--config demo] [--procs 2] [--set KEY=VALUE] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from endodistill.utils import atomic_write_json


def _run(cmd: list[str], env: dict[str, str]) -> float:
    """Run ``cmd``; its wall time in seconds (raises with its output when it fails)."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Train teacher + MAE once, then time a one-process and a spread resume of the fits."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/spread.json"))
    args = ap.parse_args(argv)

    exe = [sys.executable, "-m", "endodistill"]
    sets = [x for kv in args.overrides for x in ("--set", kv)]
    with tempfile.TemporaryDirectory(prefix="endodistill-spread-") as tmp:
        env = {**os.environ, "ENDODISTILL_CACHE": str(Path(tmp) / "cache"), "OMP_NUM_THREADS": "1"}
        env.pop("ENDODISTILL_TEST_KILL_AT", None)
        base = Path(tmp) / "base"
        t_base = _run([*exe, "train", "teacher", "--config", args.config, "--out", str(base), *sets], env)
        t_base += _run([*exe, "train", "pretrain", "--config", args.config, "--out", str(base), *sets], env)
        one, spread = Path(tmp) / "one", Path(tmp) / "spread"
        shutil.copytree(base, one, symlinks=True)
        shutil.copytree(base, spread, symlinks=True)
        t_one = _run([*exe, "run", "--resume", str(one)], env)
        torchrun = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.procs}",
        ]
        t_spread = _run(
            [
                *torchrun,
                "-m",
                "endodistill",
                "run",
                "--resume",
                str(spread),
                "--set",
                "trainer.spread_fits=true",
            ],
            env,
        )
        same = (one / "oof_predictions.csv").read_bytes() == (spread / "oof_predictions.csv").read_bytes()
    ratio = t_one / t_spread
    print(f"spread fits with torchrun, config {args.config}, {os.cpu_count()} CPUs")
    print(f"{'run':<34}{'wall s':>8}{'speed-up':>10}")
    print(f"{'teacher + MAE (once, not timed below)':<34}{t_base:>8.1f}")
    print(f"{'fits + final + report, 1 process':<34}{t_one:>8.1f}{1.0:>10.2f}")
    print(f"{f'fits + final + report, {args.procs} processes':<34}{t_spread:>8.1f}{ratio:>10.2f}")
    print(f"oof_predictions.csv byte-identical: {same}")
    atomic_write_json(
        args.out,
        {
            "config": args.config,
            "procs": args.procs,
            "cpus": os.cpu_count(),
            "base_s": t_base,
            "one_process_s": t_one,
            "spread_s": t_spread,
            "speedup": ratio,
            "identical_oof": same,
        },
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
