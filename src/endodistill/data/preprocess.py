"""Preprocessing of MRI volumes and ultrasound clips into model-ready arrays.

MRI: one resampling straight from the source voxel grid into a world-aligned model grid (canonical
orientation, target spacing, ``cfg.size`` voxels, centred on the pelvis foreground). Doing it in one
step with the exact composed affine keeps oblique acquisitions correctly oriented and lets
:func:`to_source_grid` map any model-space map (a heatmap) back onto the source grid with the inverse
of the same affine. Resampling uses :func:`scipy.ndimage.affine_transform` (deterministic).

Clips: grayscale frames, optional crop to the moving ultrasound sector (static borders and burned-in
text do not vary over time), resize, frame-rate resampling, and frame sampling for training/eval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import axcodes2ornt
from scipy import ndimage

from endodistill.config import ClipPreprocessConfig, MRIPreprocessConfig
from endodistill.data.video import Clip
from endodistill.data.volume import Volume

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass
class Geometry:
    """Where a preprocessed volume came from, enough to map model-space maps back to the source grid.

    Attributes:
        source_shape: shape of :attr:`Volume.array` (I, J, K).
        source_affine: the source voxel -> RAS world (mm) affine.
        model_shape: shape of the model-space array (``cfg.size``).
        model_affine: model voxel -> RAS world (mm) affine (canonical orientation, target spacing).
        orientation: axis codes of the model grid (e.g. ``RAS``).
        intensity_range: the (low, high) source intensities mapped to 0 and 1.
        extra: free-form, JSON-serialisable notes.
    """

    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    model_shape: tuple[int, int, int]
    model_affine: np.ndarray
    orientation: str = "RAS"
    intensity_range: tuple[float, float] = (0.0, 1.0)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_to_source(self) -> np.ndarray:
        """4x4 matrix: model voxel index -> source voxel index."""
        return np.linalg.inv(self.source_affine) @ self.model_affine

    @property
    def source_to_model(self) -> np.ndarray:
        """4x4 matrix: source voxel index -> model voxel index."""
        return np.linalg.inv(self.model_affine) @ self.source_affine

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (floats kept at full precision)."""
        return {
            "source_shape": [int(s) for s in self.source_shape],
            "source_affine": np.asarray(self.source_affine, dtype=np.float64).tolist(),
            "model_shape": [int(s) for s in self.model_shape],
            "model_affine": np.asarray(self.model_affine, dtype=np.float64).tolist(),
            "orientation": self.orientation,
            "intensity_range": [float(v) for v in self.intensity_range],
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        """Inverse of :meth:`to_dict`."""
        return cls(
            source_shape=tuple(int(s) for s in d["source_shape"]),  # type: ignore[arg-type]
            source_affine=np.asarray(d["source_affine"], dtype=np.float64),
            model_shape=tuple(int(s) for s in d["model_shape"]),  # type: ignore[arg-type]
            model_affine=np.asarray(d["model_affine"], dtype=np.float64),
            orientation=str(d.get("orientation", "RAS")),
            intensity_range=tuple(float(v) for v in d.get("intensity_range", (0.0, 1.0))),  # type: ignore[arg-type]
            extra=dict(d.get("extra", {})),
        )


# ------------------------------------------------------------------------------------------ MRI


def orientation_matrix(axcodes: str) -> np.ndarray:
    """3x3 matrix whose column ``a`` is the RAS world direction of model axis ``a`` for ``axcodes``.

    Raises:
        ValueError: ``axcodes`` is not three distinct letters from L/R, P/A, I/S.
    """
    codes = tuple(axcodes.upper())
    if len(codes) != 3:
        raise ValueError(f"orientation {axcodes!r} must have three axis codes such as 'RAS'")
    ornt = axcodes2ornt(codes, labels=_RAS_LABELS)
    if np.any(np.isnan(ornt)) or len({int(a) for a in ornt[:, 0]}) != 3:
        raise ValueError(f"orientation {axcodes!r} is not a valid combination of L/R, P/A, I/S")
    d = np.zeros((3, 3))
    for ax, (world_axis, flip) in enumerate(ornt):
        d[int(world_axis), ax] = flip
    return d


def foreground_mask(arr: np.ndarray) -> np.ndarray:
    """Body foreground: voxels above 10% of the robust (2-98 percentile) range, largest component.

    A simple, FSL-style robust threshold: MRI background is dark noise, the body is brighter.
    """
    lo, hi = np.percentile(arr, [2.0, 98.0])
    if hi <= lo:
        return np.ones(arr.shape, dtype=bool)
    mask = arr > lo + 0.1 * (hi - lo)
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.ones(arr.shape, dtype=bool)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return mask


def _antialias_sigma(src_affine: np.ndarray, model_dir: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Gaussian sigma (source voxels) per source axis before downsampling (as skimage: (factor-1)/2)."""
    cols = src_affine[:3, :3]
    src_sp = np.sqrt((cols**2).sum(axis=0))
    sig = np.zeros(3)
    for i in range(3):
        u = cols[:, i] / src_sp[i]
        # Model spacing seen along this source axis (exact for axis-aligned grids, a blend when oblique).
        eff = float(np.sqrt(np.sum((u @ model_dir) ** 2 * spacing**2)))
        factor = eff / src_sp[i]
        sig[i] = max(0.0, (factor - 1.0) / 2.0)
    return sig


def preprocess_volume(vol: Volume, cfg: MRIPreprocessConfig) -> tuple[np.ndarray, Geometry]:
    """Resample a volume into the model grid: orientation, spacing, robust scaling, crop/pad.

    Args:
        vol: the source volume (any orientation, oblique allowed).
        cfg: the ``mri`` config section.

    Returns:
        ``(array, geometry)``: array of shape ``(1, *cfg.size)``, float32 in [0, 1], axes in
        ``cfg.orientation``; the :class:`Geometry` for :func:`to_source_grid`.

    Raises:
        ValueError: ``cfg.orientation`` is not valid axis codes.
    """
    src = np.asarray(vol.array, dtype=np.float32)
    src_affine = np.asarray(vol.affine, dtype=np.float64)
    size = np.asarray(cfg.size, dtype=np.int64)
    spacing = np.asarray(cfg.spacing, dtype=np.float64)
    direction = orientation_matrix(cfg.orientation)

    mask = foreground_mask(src)
    fg = src[mask]
    lo, hi = (float(v) for v in np.percentile(fg, cfg.percentiles))
    if hi - lo > 1e-6 * max(1.0, abs(hi)):
        scaled = np.clip((src - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0).astype(np.float32)
    else:  # a constant volume carries no information: all zeros rather than a division by ~0
        scaled = np.zeros_like(src)

    # Centre of the model grid in world mm: the foreground centroid or the source grid centre.
    if cfg.crop == "foreground":
        centre_vox = np.asarray(ndimage.center_of_mass(mask), dtype=np.float64)
    else:
        centre_vox = (np.asarray(src.shape, dtype=np.float64) - 1.0) / 2.0
    centre_world = src_affine[:3, :3] @ centre_vox + src_affine[:3, 3]
    model_affine = np.eye(4)
    model_affine[:3, :3] = direction @ np.diag(spacing)
    model_affine[:3, 3] = centre_world - model_affine[:3, :3] @ ((size - 1) / 2.0)

    order = 1 if cfg.interpolation == "linear" else 0
    if order == 1:
        sigma = _antialias_sigma(src_affine, direction, spacing)
        if np.any(sigma > 0):
            scaled = ndimage.gaussian_filter(scaled, sigma=sigma, mode="nearest")
    geometry = Geometry(
        source_shape=tuple(int(s) for s in src.shape),  # type: ignore[arg-type]
        source_affine=src_affine,
        model_shape=tuple(int(s) for s in size),  # type: ignore[arg-type]
        model_affine=model_affine,
        orientation=cfg.orientation.upper(),
        intensity_range=(lo, hi),
        extra={"crop": cfg.crop, "centre_world": centre_world.tolist()},
    )
    # Output voxel -> input voxel, composed exactly; voxels outside the source FOV become 0 (background).
    out = ndimage.affine_transform(
        scaled,
        geometry.model_to_source,
        output_shape=tuple(int(s) for s in size),
        order=order,
        mode="constant",
        cval=0.0,
        prefilter=False,
    )
    out = np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)
    return out[None], geometry


def to_source_grid(arr: np.ndarray, geometry: Geometry, order: int = 1) -> np.ndarray:
    """Resample a model-space map back onto the source voxel grid (for heatmaps).

    Args:
        arr: a map of shape ``geometry.model_shape`` (a leading channel axis of size 1 is accepted).
        geometry: from :func:`preprocess_volume`.
        order: spline order (1 linear, 0 nearest for label maps).

    Returns:
        float32 array of shape ``geometry.source_shape``, 0 outside the model field of view.

    Raises:
        ValueError: ``arr`` does not have the model shape.
    """
    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if tuple(a.shape) != tuple(geometry.model_shape):
        raise ValueError(f"map shape {a.shape} does not match the model shape {geometry.model_shape}")
    out = ndimage.affine_transform(
        a,
        geometry.source_to_model,
        output_shape=tuple(geometry.source_shape),
        order=order,
        mode="constant",
        cval=0.0,
        prefilter=False,
    )
    return out.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------- clips


def _temporal_stats(frames: np.ndarray, max_frames: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and std over (at most ``max_frames`` evenly spaced) frames, float64 accumulation."""
    t = frames.shape[0]
    idx = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    s = np.zeros(frames.shape[1:], dtype=np.float64)
    s2 = np.zeros(frames.shape[1:], dtype=np.float64)
    for i in idx:
        f = frames[i].astype(np.float64)
        s += f
        s2 += f * f
    mean = s / len(idx)
    var = np.maximum(s2 / len(idx) - mean**2, 0.0)
    return mean, np.sqrt(var)


def _largest_component_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    sl = ndimage.find_objects((labels == int(np.argmax(sizes))).astype(np.int32))[0]
    return sl[0].start, sl[0].stop, sl[1].start, sl[1].stop


def sector_bbox(frames: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box ``(y0, y1, x0, x1)`` of the ultrasound sector in a (T, H, W) clip.

    The sector is the largest connected region whose pixels change over time (burned-in text, logos
    and borders are static). If nothing moves, the largest non-black region is used; if that is tiny
    too, the whole frame.
    """
    _, h, w = frames.shape
    mean, std = _temporal_stats(frames)
    full = (0, h, 0, w)
    boxes = []
    if frames.shape[0] > 1 and std.max() > 0:
        thr = max(1.0, 0.1 * float(np.percentile(std, 99)))
        moving = ndimage.binary_closing(std > thr, structure=np.ones((5, 5)), iterations=2)
        boxes.append(_largest_component_bbox(moving))
    boxes.append(_largest_component_bbox(ndimage.binary_opening(mean > 10.0, iterations=2)))
    for b in boxes:
        if b is not None and (b[1] - b[0]) * (b[3] - b[2]) >= 0.02 * h * w:
            return b
    return full


def _fit_aspect(box: tuple[int, int, int, int], aspect: float) -> tuple[int, int, int, int]:
    """Grow ``box`` (y0, y1, x0, x1) around its centre to height/width = ``aspect`` (may leave the frame)."""
    y0, y1, x0, x1 = box
    bh, bw = y1 - y0, x1 - x0
    if bh / bw < aspect:
        nh = max(1, round(bw * aspect))
        y0 -= (nh - bh) // 2
        y1 = y0 + nh
    else:
        nw = max(1, round(bh / aspect))
        x0 -= (nw - bw) // 2
        x1 = x0 + nw
    return y0, y1, x0, x1


def resample_indices(n_frames: int, src_fps: float, dst_fps: float | None) -> np.ndarray:
    """Source frame index for each output frame when changing the frame rate (nearest frame in time)."""
    if dst_fps is None or src_fps <= 0 or abs(dst_fps - src_fps) < 1e-6:
        return np.arange(n_frames)
    n_out = max(1, int(np.floor(n_frames * dst_fps / src_fps + 1e-9)))
    t = np.arange(n_out) / dst_fps
    return np.clip(np.floor(t * src_fps + 0.5).astype(np.int64), 0, n_frames - 1)


_CLIP_CHUNK = 32


def preprocess_clip(clip: Clip, cfg: ClipPreprocessConfig) -> np.ndarray:
    """Grayscale clip -> (T', H, W) float32 in [0, 1] at ``cfg.size`` (and ``cfg.fps`` when set).

    Args:
        clip: decoded clip (uint8 grayscale frames).
        cfg: the ``tvus`` config section.

    Returns:
        All frames (after frame-rate resampling), cropped to the sector when ``cfg.sector_crop``,
        resized to ``cfg.size`` with the sector's aspect ratio kept (zero padding).
    """
    frames = np.asarray(clip.frames)
    if frames.ndim != 3:
        raise ValueError(f"clip frames must be (T, H, W), got {frames.shape}")
    frames = frames[: cfg.max_source_frames]
    _, h, w = frames.shape
    out_h, out_w = (int(s) for s in cfg.size)
    box = sector_bbox(frames) if cfg.sector_crop else (0, h, 0, w)
    y0, y1, x0, x1 = _fit_aspect(box, out_h / out_w)
    idx = resample_indices(frames.shape[0], float(clip.fps), cfg.fps)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    out = np.empty((len(idx), out_h, out_w), dtype=np.float32)
    # In chunks of frames: the float copy of a long full-resolution clip would not fit in memory.
    for start in range(0, len(idx), _CLIP_CHUNK):
        sel = idx[start : start + _CLIP_CHUNK]
        # Crop with zero padding where the aspect-corrected box leaves the frame.
        crop = np.zeros((len(sel), y1 - y0, x1 - x0), dtype=np.uint8)
        crop[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = frames[sel, sy0:sy1, sx0:sx1]
        t = torch.from_numpy(crop).to(torch.float32).div_(255.0)[:, None]
        # Bilinear with antialias works for shrinking (area-like) and enlarging, deterministically on CPU.
        t = F.interpolate(t, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + len(sel)] = t[:, 0].clamp_(0.0, 1.0).numpy()
    return out


def sample_frames(
    arr: np.ndarray,
    n: int,
    train: bool,
    rng: np.random.Generator,
    stride: int | None = None,
) -> np.ndarray:
    """Pick ``n`` frames from a (T, H, W) clip.

    Eval: ``n`` frames spread uniformly over the whole clip. Train: a random contiguous window of ``n``
    frames taken every ``stride`` frames; by default the stride is drawn between 3/4 of and the eval
    spacing (so training sees the eval temporal scale, with mild speed jitter and a random start).
    Clips shorter than ``n`` repeat their last frame.

    Args:
        arr: frames, first axis time.
        n: number of frames to return.
        train: random window (True) or uniform (False).
        rng: the random generator (only used when ``train``).
        stride: fixed frame step for the training window (overrides the default draw).

    Returns:
        Array of shape ``(n, *arr.shape[1:])``.
    """
    t = int(arr.shape[0])
    if t == 0:
        raise ValueError("cannot sample frames from an empty clip")
    if n <= 0:
        raise ValueError("n must be positive")
    if not train:
        idx = np.floor(np.linspace(0, t - 1, n) + 0.5).astype(np.int64)
        return np.asarray(arr[idx])
    eval_step = max(1, (t - 1) // max(n - 1, 1))
    if stride is None:
        lo = max(1, int(np.ceil(0.75 * eval_step)))
        stride = int(rng.integers(lo, eval_step + 1))
    span = (n - 1) * stride + 1
    start = int(rng.integers(0, max(t - span, 0) + 1))
    idx = np.minimum(start + stride * np.arange(n), t - 1)
    return np.asarray(arr[idx])


# Farneback settings of :func:`clip_displacement` (OpenCV's defaults for pyramid scale and polynomial
# expansion; a 2-level pyramid with a 9 px window suits 5-15 px motions on ~100 px clips).
FLOW_PARAMS: dict[str, float] = {
    "pyr_scale": 0.5,
    "levels": 2,
    "winsize": 9,
    "iterations": 3,
    "poly_n": 5,
    "poly_sigma": 1.1,
}


def clip_displacement(
    clip: Clip, cfg: ClipPreprocessConfig, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Dense displacement of every frame from the first one, ``(T', 2, H, W)`` float32 at ``size``.

    Optical flow (OpenCV's Farneback) is computed at the clip's native resolution inside the same sector
    crop as :func:`preprocess_clip`, from the first (resampled) frame to each frame, warm-started from the
    previous frame's field. It is then area-averaged onto the ``size`` grid and expressed in output
    pixels (channel 0: x, to the right; channel 1: y, downwards), so frame ``t`` minus frame ``s`` is the
    motion between them. Why: at 32 px frame differences are a weak, confounded proxy of displacement
    (they scale with local contrast), while the sliding sign is a displacement (how much of the uterus'
    motion reaches the rectum side); tissue-fixed speckle makes it measurable at the native resolution.

    Args:
        clip: decoded clip (uint8 grayscale frames).
        cfg: the ``tvus`` config section (crop, frame rate as for :func:`preprocess_clip`).
        size: the output grid ``(H, W)``; ``cfg.size`` when None. The crop box has the grid's aspect ratio.

    Returns:
        Displacement fields, frame 0 all zeros.
    """
    frames = np.asarray(clip.frames)
    if frames.ndim != 3:
        raise ValueError(f"clip frames must be (T, H, W), got {frames.shape}")
    frames = frames[: cfg.max_source_frames]
    _, h, w = frames.shape
    out_h, out_w = (int(s) for s in (size or cfg.size))
    box = sector_bbox(frames) if cfg.sector_crop else (0, h, 0, w)
    y0, y1, x0, x1 = _fit_aspect(box, out_h / out_w)
    idx = resample_indices(frames.shape[0], float(clip.fps), cfg.fps)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    ch, cw = y1 - y0, x1 - x0

    def crop(i: int) -> np.ndarray:
        c = np.zeros((ch, cw), dtype=np.uint8)
        c[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = frames[i, sy0:sy1, sx0:sx1]
        return c

    p = FLOW_PARAMS
    ref = crop(int(idx[0]))
    flow: np.ndarray = np.zeros((ch, cw, 2), dtype=np.float32)
    out = np.zeros((len(idx), 2, out_h, out_w), dtype=np.float32)
    scale = torch.tensor([out_w / cw, out_h / ch], dtype=torch.float32)[:, None, None]
    for k in range(1, len(idx)):
        flow = cv2.calcOpticalFlowFarneback(
            ref,
            crop(int(idx[k])),
            flow,
            p["pyr_scale"],
            int(p["levels"]),
            int(p["winsize"]),
            int(p["iterations"]),
            int(p["poly_n"]),
            p["poly_sigma"],
            cv2.OPTFLOW_USE_INITIAL_FLOW,
        )
        t = torch.from_numpy(np.ascontiguousarray(flow.transpose(2, 0, 1)))[None]
        t = F.interpolate(t, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)[0]
        out[k] = (t * scale).numpy()
    return out
