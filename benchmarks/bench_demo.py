"""The whole demo (``endodistill demo``) timed stage by stage, with the protocol's overhead.

Run: ``.venv/bin/python benchmarks/bench_demo.py [--out DIR] [--keep] [--json results.json] [--set KEY=VALUE]
[--processes N]``.

Everything a fresh ``make demo`` does is timed: synthetic cohort generation, preprocessing into an empty
cache (a temporary ``ENDODISTILL_CACHE`` unless ``--warm-cache``), teacher, MAE, 5 methods x 5 folds, the final
model and the report. The table shows, per stage, the wall time and where the fits spent it (model steps,
data + loop, evaluation, checkpoints, start-up); ``overhead`` = fit wall time / model-step time. With
``--processes N`` (default: what ``endodistill demo`` picks, 2 on a 2-core CPU machine) the protocol runs as
``endodistill demo --processes N`` does, its fits spread over N processes; the fit columns then add up the
processes' time, while ``wall s`` stays wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PARTS = ("step", "data", "eval", "checkpoint", "other", "prepare", "startup", "finish")


def _stage_of(fit: str) -> str:
    if fit.startswith("teacher"):
        return "teacher"
    if fit.startswith("mae"):
        return "mae"
    if fit.startswith("fold_"):
        return "cross_validation"
    return "final_model" if fit == "final" else fit


def table(timings: dict[str, Any], wall: float, generation: float) -> tuple[str, dict[str, Any]]:
    """The per-stage table (text) and its rows (JSON)."""
    rows: dict[str, dict[str, float]] = {"cohort generation": {"wall": generation}}
    for stage, secs in timings["stages"].items():
        rows.setdefault(stage if stage != "data" else "preprocessing + splits", {"wall": secs})
    spread = timings.get("spread") or {}
    # Stages in several processes: rank 0's wall time, not the sum of their fits' times (kept as fit_wall for
    # the overhead column).
    for stage, key in (("cross_validation", "wall_seconds"), ("teacher", "teacher_wall_seconds")):
        if spread.get(key) is not None:
            rows[stage] = {"wall": float(spread[key]), "fit_wall": 0.0}
    for fit, t in timings["fits"].items():
        row = rows.setdefault(_stage_of(fit), {"wall": 0.0})
        for p in PARTS:
            row[p] = row.get(p, 0.0) + float(t.get(p, 0.0))
        row["fits"] = row.get("fits", 0) + 1
        if "fit_wall" in row:
            row["fit_wall"] += float(t.get("wall", 0.0))
    side = spread.get("baselines_rank")
    if side is not None:  # computed by another rank while rank 0 trained the MAE: not part of rank 0's time
        for stage in [k for k in rows if k.startswith("baseline_")]:
            rows[f"{stage} (rank {side}, alongside)"] = {**rows.pop(stage), "side": 1.0}
    accounted = sum(r["wall"] for r in rows.values() if not r.get("side"))
    rows["report + examples + rest"] = {"wall": max(0.0, wall - accounted)}
    order = [
        "cohort generation",
        "preprocessing + splits",
        "teacher",
        "mae",
        "cross_validation",
        "final_model",
    ]
    rows = {k: rows[k] for k in sorted(rows, key=lambda k: order.index(k) if k in order else len(order))}
    w = max(26, *(len(k) + 2 for k in rows))
    head = (
        f"{'stage':<{w}}{'wall s':>8}{'fits':>6}" + "".join(f"{p:>11}" for p in PARTS) + f"{'overhead':>10}"
    )
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        cells = "".join(f"{r[p]:>11.1f}" if p in r else f"{'':>11}" for p in PARTS)
        # Fit wall time over model-step time (in spread fits: the fits' own wall times, added up).
        ovh = f"{r.get('fit_wall', r['wall']) / r['step']:>10.2f}" if r.get("step") else f"{'':>10}"
        fits = f"{int(r['fits']):>6d}" if "fits" in r else f"{'':>6}"
        lines.append(f"{name:<{w}}{r['wall']:>8.1f}{fits}{cells}{ovh}")
    step = timings.get("step_seconds") or 0.0
    lines.append("-" * len(head))
    lines.append(
        f"{'total':<{w}}{wall:>8.1f}   model steps {step:.1f} s; protocol overhead (fit wall / steps) "
        f"{timings.get('overhead')}; whole demo / steps {wall / step if step else float('nan'):.2f}"
    )
    return "\n".join(lines), rows


def main() -> int:
    """Run the demo into a temporary (or given) folder and print the timing table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    ap.add_argument("--warm-cache", action="store_true", help="use the normal preprocessing cache")
    ap.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument(
        "--processes", type=int, default=None, help="processes for the fits (default: the demo's)"
    )
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="endodistill-demo-")
    out = args.out or Path(tmp) / "run"
    if not args.warm_cache:
        os.environ["ENDODISTILL_CACHE"] = str(Path(tmp) / "cache")

    from endodistill.config import load_config
    from endodistill.experiment.protocol import run_experiment
    from endodistill.experiment.spread import cpu_processes, launch_local
    from endodistill.train.data import ensure_manifest

    cfg = load_config("demo", args.overrides)
    processes = cpu_processes(cfg) if args.processes is None else args.processes
    t0 = time.perf_counter()
    # Generate the cohort first (as run_experiment would) so that its time is shown on its own.
    ensure_manifest(cfg, out / "cohort")
    generation = time.perf_counter() - t0
    if processes > 1:
        sets = [a for kv in args.overrides for a in ("--set", kv)]
        rc = launch_local(processes, ["demo", "--out", str(out), *sets])
        if rc:
            return rc
    else:
        run_experiment(cfg, out)
    wall = time.perf_counter() - t0
    timings = json.loads((out / "timings.json").read_text())
    text, rows = table(timings, wall, generation)
    print()
    print(text)
    # Work done once (cache, teacher outputs, MAE encoder shared by every fold and method): what repeating the
    # teacher and the MAE inside each of the cross-validation fits would cost, from the times measured above.
    shared = sum(rows.get(k, {}).get("wall", 0.0) for k in ("teacher", "mae"))
    n_fits = int(rows.get("cross_validation", {}).get("fits", 0))
    if n_fits and shared:
        print(
            f"shared work: teacher + MAE {shared:.1f} s trained once; once per fit ({n_fits} fits) they would add "
            f"{shared * (n_fits - 1):.0f} s, {(wall + shared * (n_fits - 1)) / wall:.1f}x this demo's wall time"
        )
    import resource

    # Linux: KiB. RUSAGE_CHILDREN is the largest of the launched processes.
    peak_mib = (
        max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        / 1024
    )
    print(f"processes: {processes}; peak RSS of one process: {peak_mib:.0f} MiB (bound: 4096 MiB)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "wall": wall,
                    "rows": rows,
                    "threads": cfg.trainer.threads,
                    "processes": processes,
                    "peak_rss_mib": peak_mib,
                },
                indent=2,
            )
        )
    if args.out is None and not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    elif args.out is None:
        print(f"run directory kept: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
