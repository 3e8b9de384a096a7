"""Wall time of each built-in study on the demo cohort, against the issue's goals, and what each printed.

Run: ``.venv/bin/python benchmarks/bench_studies.py [--studies alpha,kd_controls,...] [--out DIR]
[--set KEY=VALUE] [--json results.json]``.

Each study runs from an empty study directory into a preprocessing cache that already holds the demo
cohort (the first study pays for generation and preprocessing once; that time is reported apart). The
figure is the study's wall time as a ratio of its goal (issue 14: ``alpha`` and ``kd_controls`` under 5
minutes, the others under 10, on 2 cores), and of one plain demo run's cross-validation of the full
method timed in the same process (``reference``: 5 fits, the unit every setting costs at least).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

GOALS_S = {"alpha": 300, "kd_controls": 300, "mask_ratio": 600, "pairing": 600, "pool": 600}


def main() -> None:
    """Run the studies and print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--studies", default="alpha,kd_controls,mask_ratio,pairing,pool")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--set", dest="set_", action="append", default=[])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from endodistill.config import load_config
    from endodistill.experiment.study import run_study
    from endodistill.train.data import ensure_manifest

    out = args.out or Path(tempfile.mkdtemp(prefix="endodistill-studies-"))
    os.environ.setdefault("ENDODISTILL_CACHE", str(out / "cache"))
    cfg = load_config("demo", args.set_)
    t0 = time.perf_counter()
    manifest = ensure_manifest(cfg, out / "cohort")
    generation = time.perf_counter() - t0
    cfg.data.manifest = manifest
    # The reference: the full method alone, 5-fold, teacher and MAE included (a one-setting study).
    t0 = time.perf_counter()
    run_study("grid", cfg, out / "reference", vary=[f"seed={cfg.seed}"], echo=lambda s: None)
    reference = time.perf_counter() - t0
    rows = []
    for name in [s.strip() for s in args.studies.split(",") if s.strip()]:
        scfg = cfg.model_copy(deep=True)
        if name in ("pairing", "pool"):
            scfg.data.manifest = None  # these studies generate the cohorts they vary
        t0 = time.perf_counter()
        lines: list[str] = []
        res = run_study(name, scfg, out / name, echo=lines.append)
        wall = time.perf_counter() - t0
        rows.append(
            {
                "study": name,
                "wall_s": round(wall, 1),
                "goal_s": GOALS_S.get(name),
                "wall_over_goal": round(wall / GOALS_S[name], 3) if name in GOALS_S else None,
                "wall_over_reference": round(wall / reference, 2),
                "settings": len(res.settings),
                "verdict": res.verdict,
                "table": lines[-1] if lines else "",
            }
        )
        print(lines[-1] if lines else "", flush=True)
    print(
        f"\ncohort generation + preprocessing {generation:.1f} s; reference (full method alone) {reference:.1f} s"
    )
    head = f"{'study':<13}{'settings':>9}{'wall s':>9}{'goal s':>8}{'wall/goal':>11}{'wall/ref':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['study']:<13}{r['settings']:>9}{r['wall_s']:>9.1f}{r['goal_s'] or 0:>8}"
            f"{r['wall_over_goal'] or 0:>11.3f}{r['wall_over_reference']:>10.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"generation_s": generation, "reference_s": reference, "studies": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
