"""The teacher recipe search of issue 12: the demo teacher's 5-fold CV on a cohort's clips, outside the protocol.

Run: ``.venv/bin/python -m benchmarks.teacher_search '{"teacher.motion": "flow"}' COHORT_DIR[,COHORT_DIR...]``
where the JSON holds ``--set``-style overrides of the demo preset (``"_clips": N``: only the cohort's first N
clips, for the clip-count curve; ``"_rank": K``: the teacher on its flow's rank-K reconstruction) and each
cohort is a synthetic cohort
directory (``endodistill synth --preset demo --seed 10 --out ...``): choose on seeds you do not report.
It reads only the TVUS rows (through the package's cache, so flow fields are computed and timed as in a run),
calls the package's own :func:`endodistill.train.teacher.train_teacher` (the demo's folds, fits, clip
baseline) and prints per cohort the teacher's pooled out-of-fold AUC, the clip baseline's, the time to
preprocess the clips (cold cache) and the teacher stage's wall time, both AUCs in thirds of the clips by
probe pressure, then the mean AUC.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from endodistill.config import load_config
from endodistill.data.cache import TensorCache
from endodistill.data.manifest import read_manifest
from endodistill.train.data import ClipSet, CohortData, VolumeSet
from endodistill.train.seeding import configure_torch
from endodistill.train.teacher import train_teacher


def load_clips(cfg, cohort, cache_dir):
    """The cohort's TVUS clips (and displacement fields for motion 'flow') through a cache at ``cache_dir``."""
    manifest = Path(cohort, "manifest.csv").resolve()
    m = read_manifest(manifest, num_classes=cfg.task.num_classes)
    cache = TensorCache(cache_dir)
    recs = m.select(cfg.task.teacher_modality)
    clips = [np.asarray(cache.clip(r.path, cfg.tvus), dtype=np.float32) for r in recs]
    flows = None
    if cfg.teacher.motion == "flow":
        flows = [
            np.asarray(cache.clip_displacement(r.path, cfg.tvus, cfg.teacher.flow_size), dtype=np.float32)
            for r in recs
        ]
    tv = ClipSet(
        clips=clips,
        labels=np.array([-1 if r.label is None else int(r.label) for r in recs], dtype=np.int64),
        subjects=[r.subject_id for r in recs],
        paths=[str(r.path) for r in recs],
        flows=flows,
    )
    empty = VolumeSet(x=torch.zeros(0, 1, 1, 1, 1), labels=np.zeros(0, np.int64), subjects=[], paths=[])
    return CohortData(manifest=manifest, labelled=empty, unlabelled=empty, tvus=tv, cohort={}, files=[])


def first_clips(data: CohortData, n: int) -> CohortData:
    """The cohort's first ``n`` clips (subjects are independent draws): the clip-count curve."""
    tv = data.tvus
    k = slice(0, n)
    flows = None if tv.flows is None else tv.flows[k]
    sub = ClipSet(
        clips=tv.clips[k], labels=tv.labels[k], subjects=tv.subjects[k], paths=tv.paths[k], flows=flows
    )
    return CohortData(
        manifest=data.manifest,
        labelled=data.labelled,
        unlabelled=data.unlabelled,
        tvus=sub,
        cohort={},
        files=[],
    )


def by_pressure(run: Path, cohort: str) -> str:
    """The teacher's and the clip baseline's out-of-fold AUCs in thirds of the clips by the generator's probe
    pressure (``latents.csv``): whether the teacher loses to its baseline on the weak manoeuvres."""
    import csv

    from sklearn.metrics import roc_auc_score

    from endodistill.train.finetune import read_predictions

    with open(Path(cohort, "latents.csv"), newline="") as fh:
        pressure = {
            r["subject_id"]: float(r["pressure_mm"]) for r in csv.DictReader(fh) if r["modality"] == "tvus"
        }
    ids, y, pt = read_predictions(next(run.rglob("predictions.csv")))
    b_ids, _, pb = read_predictions(next(run.rglob("clip_baseline_predictions.csv")))
    pt, pb = pt[:, 1], pb[:, 1][[b_ids.index(i) for i in ids]]
    pr = np.array([pressure[i] for i in ids])
    out = []
    for part in np.array_split(np.argsort(pr, kind="stable"), 3):
        out.append(
            f"{pr[part].min():.1f}-{pr[part].max():.1f} mm teacher {roc_auc_score(y[part], pt[part]):.3f} "
            f"baseline {roc_auc_score(y[part], pb[part]):.3f}"
        )
    return "; ".join(out)


def use_low_rank_flow(k: int) -> None:
    """Train and score the teacher on a rank-``k`` reconstruction of its input (each clip's pixels x (2 T)
    motion trajectories, truncated SVD, back to unit RMS): the flow denoised to its ``k`` main motions. Patches
    the function where it is defined (the deployable teacher that scores held-out clips imports it on use) and
    where the training module holds it; an experiment of this script, not a package option."""
    import endodistill.models.teacher as mt
    import endodistill.train.teacher as tt

    plain = mt.normalise_clips

    def low_rank(x: torch.Tensor, cfg) -> torch.Tensor:
        x = plain(x, cfg)
        b, c, t, h, w = x.shape
        m = x.permute(0, 3, 4, 1, 2).reshape(b, h * w, c * t)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        x = (
            ((u[..., :k] * s[:, None, :k]) @ vh[:, :k])
            .reshape(b, h, w, c, t)
            .permute(0, 3, 4, 1, 2)
            .contiguous()
        )
        return x / x.pow(2).mean(dim=(1, 2, 3, 4), keepdim=True).sqrt().clamp_min(1e-6)

    mt.normalise_clips = tt.normalise_clips = low_rank


def main(overrides: dict, cohorts: list[str]) -> None:
    # "_clips": N trains and scores on the first N clips of each cohort (generate cohorts with more clips
    # than the demo's 120 to see whether the clip count limits the teacher).
    n_clips = overrides.pop("_clips", None)
    # "_rank": K trains and scores the teacher on the rank-K reconstruction of its flow (use_low_rank_flow).
    rank = overrides.pop("_rank", None)
    if rank:
        use_low_rank_flow(int(rank))
    cfg = load_config("demo", [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    configure_torch(cfg)
    rows = []
    for cohort in cohorts:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            data = load_clips(cfg, cohort, Path(tmp) / "cache")
            t_pre = time.perf_counter() - t0
            if n_clips:
                data = first_clips(data, int(n_clips))
            t0 = time.perf_counter()
            m = train_teacher(cfg, data, Path(tmp) / "run", echo=lambda s: None)
            t_fit = time.perf_counter() - t0
            thirds = by_pressure(Path(tmp) / "run", cohort)
        base = m.get("clip_baseline", {}).get("auc")
        rows.append((m["cv_auc"], base))
        print(
            f"{Path(cohort).name}: teacher cv_auc {m['cv_auc']:.3f} ci {m['cv_auc_ci95']} "
            f"clip_baseline {base:.3f} preprocess {t_pre:.1f} s teacher {t_fit:.1f} s",
            flush=True,
        )
        print(f"  by probe pressure, weakest third first: {thirds}", flush=True)
    a = np.array(rows, dtype=float)
    if n_clips:
        overrides["_clips"] = n_clips
    if rank:
        overrides["_rank"] = rank
    print(
        f"{json.dumps(overrides)} mean teacher {a[:, 0].mean():.3f} baseline {a[:, 1].mean():.3f}", flush=True
    )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), sys.argv[2].split(","))
