"""The deployable TVUS teacher: the run's cross-validation teachers as one ensemble, and its explanations.

With ``teacher.targets: oof`` a run trains one teacher per CV fold and no teacher on all clips. The
deployable teacher averages the fold teachers' probabilities (nnU-Net's habit of predicting with its
five fold models): no sixth fit is needed, each member was validated on the clips it did not see, and the
threshold comes from the same out-of-fold predictions that give the reported CV AUC. When a run trained
a teacher on all clips (``targets: in_sample``) that single network is deployed instead.

The ensemble's input is what the teacher was trained on, ``(B, C, T, H, W)``: the preprocessed grey clip
in [0, 1] (C = 1), or with ``teacher.motion: flow`` its optical-flow displacement fields (C = 2, computed
by :func:`endodistill.data.preprocess.clip_displacement`, OpenCV, outside the network). The motion
transform of training (frame differences, per-clip normalisation) is part of ``forward``, so the ONNX
export holds it.

Saliency: occlusion (Zeiler & Fergus 2014) rather than gradients. Each square of the frame is frozen at
its temporal mean in every frame (the anatomy stays, its motion goes), and the drop in the positive-class
probability is the square's importance. The sliding sign is motion at a place, so "what if this region
did not move" is the question a sonographer would ask; gradients of a small R(2+1)D on frame differences
are dominated by speckle.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from endodistill import rundir
from endodistill.config import Config
from endodistill.data.video import Clip
from endodistill.infer.model_dir import save_model_dir

if TYPE_CHECKING:
    import torch


# _LAZY: torch, safetensors, MONAI, ONNX, matplotlib, tqdm and the image libraries, and the modules that
# import them (data.preprocess, infer.heatmap, models, train), are imported inside the functions that use
# them. predict and export import this module on their torch-free paths.

OCCLUSION_METHOD = "occlusion (each square frozen at its temporal mean; drop in P(positive))"


def _ensemble_class() -> type:
    import torch  # on use: see _LAZY
    from torch import nn  # on use: see _LAZY

    from endodistill.models.teacher import normalise_clips  # on use: see _LAZY

    class TeacherEnsemble(nn.Module):
        """Mean of the member teachers' softmax probabilities; returns log-probabilities as logits.

        Args:
            members: the teacher networks.
            cfg: the run config (its motion transform is applied inside ``forward``).
        """

        def __init__(self, members: list[nn.Module], cfg: Config) -> None:
            super().__init__()
            self.members = nn.ModuleList(members)
            self.cfg = cfg

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = normalise_clips(x, self.cfg)
            probs = torch.stack([torch.softmax(m(z), dim=1) for m in self.members]).mean(0)
            return torch.log(probs.clamp_min(1e-12))

    return TeacherEnsemble


def build_teacher_ensemble(cfg: Config, members: int) -> torch.nn.Module:
    """A freshly built ensemble of ``members`` teachers of ``cfg.teacher``'s architecture (eval mode)."""
    from endodistill.models.teacher import build_teacher, teacher_in_channels  # on use: see _LAZY

    # No Kinetics file is read: the member weights replace every parameter.
    tcfg = cfg.teacher.model_copy(update={"weights": None})
    nets = [build_teacher(tcfg, cfg.task.num_classes, teacher_in_channels(cfg)) for _ in range(members)]
    return _ensemble_class()(nets, cfg).eval()


def teacher_member_dirs(run_dir: Path) -> list[Path]:
    """The fit units whose weights make the deployable teacher (``full`` if trained, else the CV folds)."""
    tdir = Path(run_dir) / "teacher"
    if (tdir / "full" / rundir.WEIGHTS).is_file():
        return [tdir / "full"]
    folds = sorted(
        (p for p in tdir.glob("fold_*") if (p / rundir.WEIGHTS).is_file()),
        key=lambda p: rundir.teacher_member_key(p.name),
    )
    if folds:
        return folds
    if (tdir / "holdout" / rundir.WEIGHTS).is_file():
        return [tdir / "holdout"]
    return []


def save_teacher_model(
    cfg: Config,
    run_dir: Path,
    metrics: dict[str, Any],
    fingerprint: dict[str, Any] | None,
    out_dir: Path | None = None,
) -> Path | None:
    """Write ``RUN/teacher_model`` from the run's teacher fits (None when there is no teacher fit).

    The threshold is Youden's on the teacher's out-of-fold (or hold-out) predictions, 0.5 if undefined.
    """
    from endodistill.models.weights import load_weights  # on use: see _LAZY

    dirs = teacher_member_dirs(run_dir)
    if not dirs:
        return None
    state: dict[str, Any] = {}
    for i, d in enumerate(dirs):
        for k, v in load_weights(d / rundir.WEIGHTS).items():
            state[f"members.{i}.{k}"] = v
    youden = (metrics.get("youden") or {}).get("threshold")
    threshold = float(youden) if youden is not None and np.isfinite(youden) else 0.5
    info = {
        "members": [d.name for d in dirs],
        "cross_validation": {
            k: metrics.get(k) for k in ("auc", "auc_ci95", "fold_aucs", "youden", "scheme", "n_heldout_clips")
        },
        "threshold_source": "Youden on out-of-fold predictions" if youden is not None else "default 0.5",
    }
    return save_model_dir(
        out_dir or Path(run_dir) / "teacher_model",
        state,
        cfg,
        min(1.0, max(0.0, threshold)),
        info,
        name="endodistill-pod-tvus-teacher",
        kind="teacher",
        members=len(dirs),
        fingerprint=fingerprint,
    )


def clip_input(frames: np.ndarray, fps: float, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's input of one clip, as in training: ``(grey frames (T, H, W), model input (C, T, h, w))``.

    The grey frames are the preprocessed clip at the sampled times (what the saliency image shows); the
    model input is the same frames (C = 1) or, with ``teacher.motion: flow``, their displacement fields
    (C = 2) on the flow grid.
    """
    # on use: see _LAZY
    from endodistill.data.preprocess import clip_displacement, preprocess_clip, sample_frames

    clip = Clip(frames=frames, fps=fps, source="", format="")
    rng = np.random.default_rng(0)  # unused: evaluation sampling is deterministic
    grey = sample_frames(preprocess_clip(clip, cfg.tvus), cfg.tvus.frames, train=False, rng=rng)
    if cfg.teacher.motion == "flow":
        disp = clip_displacement(clip, cfg.tvus, cfg.teacher.flow_size)
        x = sample_frames(disp, cfg.tvus.frames, train=False, rng=rng).transpose(1, 0, 2, 3)
    else:
        x = grey[None]
    return grey, np.ascontiguousarray(x, dtype=np.float32)


def occlusion_map(model: torch.nn.Module, x: np.ndarray, positive: int, grid: int = 8) -> np.ndarray:
    """Occlusion saliency of one clip input ``(C, T, H, W)``: ``(H, W)`` drop in P(positive), >= 0.

    Squares of ``H/grid x W/grid`` pixels, stride half a square, each frozen at its temporal mean in
    every channel (grey level or displacement: either way the square stops moving).
    """
    import torch  # on use: see _LAZY

    _, _t, h, w = x.shape
    ph, pw = max(1, h // grid), max(1, w // grid)
    sh, sw = max(1, ph // 2), max(1, pw // 2)
    base = torch.from_numpy(x)[None]  # (1, C, T, H, W)
    mean = base.mean(dim=2, keepdim=True)
    boxes = [(r, c) for r in range(0, h - ph + 1, sh) for c in range(0, w - pw + 1, sw)]
    heat = np.zeros((h, w), dtype=np.float64)
    count = np.zeros((h, w), dtype=np.float64)
    with torch.inference_mode():
        p0 = float(torch.softmax(model(base), dim=1)[0, positive])
        for i in range(0, len(boxes), 32):
            chunk = boxes[i : i + 32]
            xb = base.repeat(len(chunk), 1, 1, 1, 1)
            for j, (r, c) in enumerate(chunk):
                xb[j, :, :, r : r + ph, c : c + pw] = mean[0, :, :, r : r + ph, c : c + pw]
            p = torch.softmax(model(xb), dim=1)[:, positive].numpy()
            for (r, c), pj in zip(chunk, p):
                heat[r : r + ph, c : c + pw] += abs(p0 - float(pj))
                count[r : r + ph, c : c + pw] += 1
    return (heat / np.maximum(count, 1)).astype(np.float32)


def clip_png_bytes(clip: np.ndarray, heat: np.ndarray, title: str, n_frames: int = 3) -> bytes:
    """PNG of a few frames of the preprocessed clip with the occlusion map (any grid) overlaid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # on use: see _LAZY
    from matplotlib.figure import Figure  # on use: see _LAZY

    t = clip.shape[0]
    idx = sorted({round(float(f) * (t - 1)) for f in np.linspace(0.0, 1.0, n_frames)})
    hm = heat / heat.max() if float(heat.max()) > 0 else heat
    fig = Figure(figsize=(3.0 * len(idx), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.82, bottom=0.08, wspace=0.05)
    for j, i in enumerate(idx):
        ax = fig.add_subplot(1, len(idx), j + 1)
        extent = (0.0, float(clip.shape[2]), float(clip.shape[1]), 0.0)  # the map may be on a coarser grid
        ax.imshow(clip[i], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", extent=extent)
        ax.imshow(np.ma.masked_less_equal(hm, 0.1), cmap="jet", vmin=0.0, vmax=1.0, alpha=0.4, extent=extent)
        ax.set_title(f"frame {i + 1}/{t}", fontsize=8)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.text(0.5, 0.01, "occlusion map; research use only, not for diagnosis", ha="center", fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
