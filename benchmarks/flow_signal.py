"""How much of the sliding sign the teacher's optical flow holds (issue 12): a limit, measured without training.

Run: ``.venv/bin/python -m benchmarks.flow_signal COHORT_DIR[,COHORT_DIR...] ['{"winsize": 13}']`` on
synthetic cohorts (``endodistill synth --preset demo --seed 10 --out ...``); the optional JSON overrides the
Farneback settings (``endodistill.data.preprocess.FLOW_PARAMS``; ``"_blur": sigma`` smooths each frame first).
Per cohort, over its labelled clips, it prints:

- ``oracle``: the AUC of the latent sliding fraction itself (what a perfect reader of the sign reaches);
- ``landmarks``: the AUC of the rectum-side displacement regressed on the uterus-side displacement, both read
  from the package's flow (the demo's 16 x 16 grid, every frame) at the generator's own landmarks, which a
  model does not know: how well the flow measures the sign where it is;
- ``coupling pNN``: the AUC of one percentile of the coupling map (10th, 25th, 50th)
  (:func:`endodistill.train.clip_baseline.coupling_map`, at the teacher's evaluation frames), with no
  fitting and no landmarks: what a single number of the teacher's own input reaches;
- ``corr``: the correlation of the landmark ratio with the latent ``1 - f``;
- ``CV``: the cross-validated AUC (5 stratified folds of the clips, ``cross_validated_logreg``, C by inner
  CV) of logistic regressions on candidate percentile sets of the coupling map and on the grey-frame motion
  features: how the clip baseline's percentile was chosen (on seeds 10-12; kept: COUPLING_QUANTILES).

The teacher's and the clip baseline's cross-validated AUCs on the same cohorts come from
``benchmarks/teacher_search.py``.
"""

import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from endodistill.config import load_config
from endodistill.data import preprocess
from endodistill.data.preprocess import (
    _fit_aspect,
    clip_displacement,
    preprocess_clip,
    sample_frames,
    sector_bbox,
)
from endodistill.data.video import load_clip
from endodistill.train.clip_baseline import (
    GRID,
    clip_motion_features,
    coupling_map,
    coupling_percentiles,
    displacement_motion,
)
from endodistill.train.logreg_cv import cross_validated_logreg

# Percentiles whose AUC is printed alone, unfitted.
SINGLE = (0.10, 0.25, 0.50)
# Candidate percentile sets of the coupling map for the clip baseline (the kept one: clip_baseline.COUPLING_QUANTILES).
CANDIDATES = {
    "p25": (0.25,),
    "p10,25,50": (0.10, 0.25, 0.50),
    "p20,25,30": (0.20, 0.25, 0.30),
    "p10..90": tuple(np.linspace(0.1, 0.9, 9)),
    "p5..50": tuple(np.linspace(0.05, 0.5, 10)),
}


def landmark_ratio(
    d: np.ndarray, box: tuple[int, int, int, int], up: tuple[float, float], rp: tuple[float, float]
) -> float:
    """Least-squares share of the uterus-side displacement found on the rectum side, ``d`` (T, 2, n, n)."""
    y0, y1, x0, x1 = box
    n = d.shape[-1]

    def at(row: float, col: float) -> np.ndarray:
        gy = (row - y0) / (y1 - y0) * n - 0.5
        gx = (col - x0) / (x1 - x0) * n - 0.5
        return np.array(
            [[map_coordinates(d[t, c], [[gy], [gx]], order=1)[0] for c in range(2)] for t in range(len(d))]
        )

    u, q = at(*up), at(*rp)
    return float((q * u).sum() / max(float((u * u).sum()), 1e-12))


def main(cohorts: list[str], flow_overrides: dict) -> None:
    cfg = load_config("demo", [])
    blur = float(flow_overrides.pop("_blur", 0.0))
    preprocess.FLOW_PARAMS.update(flow_overrides)
    size = tuple(cfg.teacher.flow_size or cfg.tvus.size)
    for cohort in cohorts:
        root = Path(cohort)
        with open(root / "manifest.csv", newline="") as fh:
            paths = {r["subject_id"]: r["path"] for r in csv.DictReader(fh) if r["modality"] == "tvus"}
        with open(root / "latents.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["modality"] == "tvus" and r["label"] != ""]
        ratio, feats, grey, y, f = [], [], [], [], []
        cands: dict[str, list[np.ndarray]] = {k: [] for k in CANDIDATES}
        for r in rows:
            clip = load_clip(root / paths[r["subject_id"]])
            if blur:
                sm = [np.clip(gaussian_filter(fr.astype(np.float32), blur), 0, 255) for fr in clip.frames]
                clip = dataclasses.replace(clip, frames=np.stack(sm).astype(np.uint8))
            d = clip_displacement(clip, cfg.tvus, size)
            box = _fit_aspect(sector_bbox(np.asarray(clip.frames)), size[0] / size[1])
            up = (float(r["uterus_row"]), float(r["uterus_col"]))
            rp = (float(r["rectum_row"]), float(r["rectum_col"]))
            ratio.append(landmark_ratio(d, box, up, rp))
            ev = sample_frames(d, cfg.tvus.frames, train=False, rng=np.random.default_rng(0))
            # The map once per clip; every percentile set is read from it.
            motion = displacement_motion(np.ascontiguousarray(ev.transpose(1, 0, 2, 3))[None])
            g = coupling_map(motion)
            for k, qs in CANDIDATES.items():
                cands[k].append(coupling_percentiles(motion, g, qs)[0])
            frames = sample_frames(
                preprocess_clip(clip, cfg.tvus), cfg.tvus.frames, train=False, rng=np.random.default_rng(0)
            )
            grey.append(clip_motion_features(frames[None, None], GRID)[0])
            feats.append(coupling_percentiles(motion, g, SINGLE)[0])
            y.append(int(r["label"]))
            f.append(float(r["sliding"]))
        y_a, f_a, ratio_a, feats_a = np.array(y), np.array(f), np.array(ratio), np.array(feats)
        cells = [f"oracle {roc_auc_score(y_a, -f_a):.3f}", f"landmarks {roc_auc_score(y_a, ratio_a):.3f}"]
        # Obliterated (y = 1): the rectum follows the uterus, so its low percentiles are high.
        cells += [
            f"coupling p{100 * q:g} {roc_auc_score(y_a, feats_a[:, j]):.3f}" for j, q in enumerate(SINGLE)
        ]
        cells.append(f"corr {np.corrcoef(ratio_a, 1 - f_a)[0, 1]:.3f}")
        fold = np.zeros(len(y_a), dtype=int)
        for k, (_, te) in enumerate(StratifiedKFold(5, shuffle=True, random_state=0).split(y_a, y_a)):
            fold[te] = k
        subjects = [r["subject_id"] for r in rows]
        sets = {**{k: np.array(v) for k, v in cands.items()}, "grey": np.array(grey)}
        cv = [
            f"{k} {cross_validated_logreg(x, y_a, subjects, fold, 2, 1, 0)['auc']:.3f}"
            for k, x in sets.items()
        ]
        cells.append("CV " + " / ".join(cv))
        print(f"{root.name} ({len(y)} clips): " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(","), json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
