"""How much of the sliding sign the teacher's optical flow holds (issue 12): a limit, measured without training.

Run: ``.venv/bin/python -m benchmarks.flow_signal COHORT_DIR[,COHORT_DIR...]`` on synthetic cohorts
(``endodistill synth --preset demo --seed 10 --out ...``). Per cohort, over its labelled clips, it prints:

- ``oracle``: the AUC of the latent sliding fraction itself (what a perfect reader of the sign reaches);
- ``landmarks``: the AUC of the rectum-side displacement regressed on the uterus-side displacement, both read
  from the package's flow (the demo's 16 x 16 grid, every frame) at the generator's own landmarks, which a
  model does not know: how well the flow measures the sign where it is;
- ``coupling pNN``: the AUC of one percentile of the coupling map
  (:func:`endodistill.train.clip_baseline.coupling_map`, at the teacher's evaluation frames), with no
  fitting and no landmarks: what a single number of the teacher's own input reaches;
- ``corr``: the correlation of the landmark ratio with the latent ``1 - f``.

The teacher's and the clip baseline's cross-validated AUCs on the same cohorts come from
``benchmarks/teacher_search.py``.
"""

import csv
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import map_coordinates
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from endodistill.config import load_config
from endodistill.data.preprocess import _fit_aspect, clip_displacement, sample_frames, sector_bbox
from endodistill.data.video import load_clip
from endodistill.train.clip_baseline import COUPLING_QUANTILES, clip_coupling_features


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


def main(cohorts: list[str]) -> None:
    cfg = load_config("demo", [])
    size = tuple(cfg.teacher.flow_size or cfg.tvus.size)
    for cohort in cohorts:
        root = Path(cohort)
        with open(root / "manifest.csv", newline="") as fh:
            paths = {r["subject_id"]: r["path"] for r in csv.DictReader(fh) if r["modality"] == "tvus"}
        with open(root / "latents.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["modality"] == "tvus" and r["label"] != ""]
        ratio, feats, y, f = [], [], [], []
        for r in rows:
            clip = load_clip(root / paths[r["subject_id"]])
            d = clip_displacement(clip, cfg.tvus, size)
            box = _fit_aspect(sector_bbox(np.asarray(clip.frames)), size[0] / size[1])
            up = (float(r["uterus_row"]), float(r["uterus_col"]))
            rp = (float(r["rectum_row"]), float(r["rectum_col"]))
            ratio.append(landmark_ratio(d, box, up, rp))
            ev = sample_frames(d, cfg.tvus.frames, train=False, rng=np.random.default_rng(0))
            feats.append(
                clip_coupling_features(
                    torch.from_numpy(np.ascontiguousarray(ev.transpose(1, 0, 2, 3)))[None]
                )[0]
            )
            y.append(int(r["label"]))
            f.append(float(r["sliding"]))
        y_a, f_a, ratio_a, feats_a = np.array(y), np.array(f), np.array(ratio), np.array(feats)
        cells = [f"oracle {roc_auc_score(y_a, -f_a):.3f}", f"landmarks {roc_auc_score(y_a, ratio_a):.3f}"]
        # Obliterated (y = 1): the rectum follows the uterus, so its low percentiles are high.
        cells += [
            f"coupling p{100 * q:g} {roc_auc_score(y_a, feats_a[:, j]):.3f}"
            for j, q in enumerate(COUPLING_QUANTILES)
        ]
        cells.append(f"corr {np.corrcoef(ratio_a, 1 - f_a)[0, 1]:.3f}")
        print(f"{root.name} ({len(y)} clips): " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(","))
