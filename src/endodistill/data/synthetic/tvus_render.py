"""Render one synthetic transvaginal ultrasound clip: sagittal B-mode with the sliding-sign manoeuvre.

The probe tip (the fan's apex) sits at the top centre; the anterior pelvis (bladder) is on the left and
the rectum on the right. Tissue echogenicity, attenuation and a tissue-fixed speckle pattern are rendered
once on a fine Cartesian grid (``x`` lateral, ``z`` depth, mm). Each frame then samples them along the
beams of a fan (a polar grid) at positions moved by the probe-pressure displacement field, attenuates
along each beam (acoustic shadow behind rectal gas, enhancement behind the bladder), adds electronic
noise, log-compresses and scan-converts back to the Cartesian display, like a scanner does.

Probe pressure pushes the cervix/uterus deeper. The rectum follows with ``1 - f`` of that motion, where
``f`` is the latent sliding fraction: ``f`` near 1 is a positive sliding sign (it glides, POD open),
``f`` near 0 a negative one (it moves with the uterus, POD obliterated). No library simulates B-mode
clips of this kind, so the rendering is written here (SciPy does the interpolation and smoothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

_FINE_MM = 0.5
_X0, _Z0, _N_FINE = -60.0, -12.0, 250  # fine tissue grid covers x, z in [-60, 65) x [-12, 113) mm


@dataclass
class Clip:
    """A rendered clip: uint8 frames (T, H, W) and the landmarks a hand-made feature may use."""

    frames: np.ndarray
    fps: int
    info: dict[str, Any] = field(default_factory=dict)


def _ellipse_sd(x, z, centre, half, dir_xz) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipse with half-axes (along dir_xz, across it)."""
    # Python floats keep the float32 grids in float32 (NumPy scalars would promote to float64).
    c0, c1, e0, e1, h0, h1 = (float(v) for v in (*centre[:2], *dir_xz[:2], *half[:2]))
    dx, dz = x - c0, z - c1
    p1 = dx * e0 + dz * e1
    p2 = -dx * e1 + dz * e0
    k0 = np.sqrt((p1 / h0) ** 2 + (p2 / h1) ** 2)
    k1 = np.sqrt((p1 / h0**2) ** 2 + (p2 / h1**2) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _soft(sd: np.ndarray, edge: float = 0.8) -> np.ndarray:
    return np.clip(0.5 - sd / edge, 0.0, 1.0)


def _speckle(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float]) -> np.ndarray:
    """Fully developed speckle: the magnitude of smoothed complex Gaussian noise, unit mean."""
    re = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    im = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    mag = np.sqrt(re * re + im * im)
    return mag / np.float32(mag.mean())


def render_tvus(
    rng: np.random.Generator, sliding: float, size: int, n_frames: int, fps: int, depth_mm: float = 90.0
) -> Clip:
    """Render one clip.

    Args:
        rng: the subject's own generator (all randomness comes from it).
        sliding: latent sliding fraction in [0, 1] (1 = rectum glides freely).
        size: frame height and width in pixels (even).
        n_frames: number of frames.
        fps: frame rate.
        depth_mm: imaging depth; the display spans ``depth_mm`` in depth and in width.

    Returns:
        The clip and its landmarks (pixel coordinates of the uterus-side and rectum-side patches).
    """
    U = rng.uniform
    # ---- tissue layout in the tissue frame (frame 0), mm
    phi = np.deg2rad(U(-25, 10))
    t_hat = np.array([np.sin(phi), np.cos(phi)])  # along the sliding plane, pointing deeper
    n_hat = np.array([np.cos(phi), -np.sin(phi)])  # across it, pointing posterior (towards the rectum)
    cerv_c = np.array([U(-10, 0), U(20, 30)])
    cerv_half = (U(13, 18), U(10, 13))
    gap = U(1.0, 5.0)
    p_int = cerv_c + (cerv_half[1] + 0.5 * gap) * n_hat  # a point of the sliding plane
    psi = np.deg2rad(U(0, 60))  # version: body tilted anteriorly from the cervical axis
    u_hat = np.array([np.sin(phi - psi), np.cos(phi - psi)])
    isthmus = cerv_c + (cerv_half[0] - 2) * t_hat
    body_half = (U(24, 34), U(14, 20))
    body_c = isthmus + (body_half[0] - 6) * u_hat
    r_out, wall = U(8, 12), U(2.5, 3.5)
    rect_c = p_int + (0.5 * gap + r_out) * n_hat

    xs = _X0 + _FINE_MM * np.arange(_N_FINE, dtype=np.float32)
    zs = _Z0 + _FINE_MM * np.arange(_N_FINE, dtype=np.float32)
    x, z = np.meshgrid(xs, zs, indexing="xy")  # arrays indexed [z, x]
    echo = np.full(x.shape, U(0.5, 0.7), dtype=np.float32)
    att = np.full(x.shape, 0.008, dtype=np.float32)  # amplitude attenuation per mm

    def paint(sd: np.ndarray, e: float, a: float | None = None) -> None:
        m = _soft(sd)
        echo[:] += m * (np.float32(e) - echo)
        if a is not None:
            att[:] += m * (np.float32(a) - att)

    # Low-frequency heterogeneity of the pelvic fat and connective tissue.
    lf = gaussian_filter(rng.standard_normal(x.shape, dtype=np.float32), 8.0)
    echo *= 1.0 + 0.25 * lf / np.float32(lf.std() + 1e-6)

    # Bladder (anechoic, little attenuation -> posterior enhancement), anterior and shallow.
    bl_c = (U(-38, -26), U(5, 15))
    paint(_ellipse_sd(x, z, bl_c, (U(14, 22), U(9, 15)), (1.0, 0.0)), 0.02, 0.001)
    # Bowel loops deep to the uterus (nuisance echoes).
    for _ in range(int(rng.integers(1, 4))):
        c = (U(-40, 30), U(65, 95))
        r = U(6, 11)
        paint(_ellipse_sd(x, z, c, (r, r), (1.0, 0.0)), U(0.7, 1.0))
        paint(_ellipse_sd(x, z, c, (r - 2, r - 2), (1.0, 0.0)), U(0.2, 0.5))
    # Free fluid in the POD: anechoic, between cervix and rectum (label-independent here).
    if rng.random() < 0.3:
        fc = p_int + U(5, 20) * t_hat
        paint(_ellipse_sd(x, z, fc, (U(5, 10), 0.5 * gap + U(2, 4)), t_hat), 0.02, 0.001)
    # Rectum: a gently curved band along the sliding plane; hypoechoic muscular wall, a mucosal line
    # whose brightness varies along it (folds), echogenic stool and gas pockets that shadow the far
    # field. The texture along the wall is what makes a tangential glide visible.
    rx, rz, tx, tz, nx, nz = (float(v) for v in (*rect_c, *t_hat, *n_hat))
    t_r = (x - rx) * tx + (z - rz) * tz
    d_r = (x - rx) * nx + (z - rz) * nz - U(0.0, 0.006) * np.maximum(t_r, 0) ** 2
    ends = np.maximum(-25 - t_r, t_r - 80)
    fold_len, fold_ph = U(5, 10), U(0, 2 * np.pi)
    fold = 0.75 + 0.5 * np.cos(2 * np.pi * t_r / fold_len + fold_ph)
    paint(np.maximum(np.abs(d_r) - r_out, ends), 0.12)
    m = _soft(np.maximum(np.abs(d_r) - (r_out - wall), ends))
    echo[:] += m * (fold.astype(np.float32) - echo)
    paint(np.maximum(np.abs(d_r) - (r_out - wall - 1.5), ends), U(0.35, 0.6), 0.03)
    for _ in range(int(rng.integers(2, 5))):
        gc = rect_c + U(-15, 60) * t_hat - U(0, 0.5) * (r_out - wall) * n_hat
        paint(_ellipse_sd(x, z, gc, (U(3, 7), U(1.5, 3)), t_hat), 1.5, 0.5)
    # Cervix, uterine body (myometrium), endometrial stripe with a hypoechoic halo.
    paint(_ellipse_sd(x, z, cerv_c, cerv_half, t_hat), U(0.22, 0.35))
    paint(_ellipse_sd(x, z, cerv_c, (cerv_half[0] - 3, 1.0), t_hat), U(0.6, 0.8))
    paint(_ellipse_sd(x, z, body_c, body_half, u_hat), U(0.18, 0.3))
    endo = (0.75 * body_half[0], U(2, 5))
    paint(_ellipse_sd(x, z, body_c, (endo[0] + 1.5, endo[1] + 1.5), u_hat), 0.15)
    paint(_ellipse_sd(x, z, body_c, endo, u_hat), U(0.7, 0.95))

    # Tissue-fixed speckle (moves with the tissue), finer axially than laterally.
    tissue = echo * _speckle(rng, x.shape, (0.8, 1.6))

    # ---- the fan: a polar grid of beams from the apex
    apex = np.array([0.0, -U(3, 6)])
    theta_max = np.deg2rad(U(48, 60))
    r_max = depth_mm - apex[1]
    n_r, n_t = size, size
    rr = np.linspace(2.0, r_max, n_r, dtype=np.float32)
    tt = np.linspace(-theta_max, theta_max, n_t, dtype=np.float32)
    px = apex[0] + rr[:, None] * np.sin(tt)[None, :]
    pz = apex[1] + rr[:, None] * np.cos(tt)[None, :]
    dr = float(rr[1] - rr[0])

    # ---- the probe-pressure manoeuvre
    amp = U(5.0, 12.0)
    cycles, phase0 = U(1.0, 1.75), U(0, 2 * np.pi)
    t = np.arange(n_frames) / fps
    dur = n_frames / fps
    press = 0.5 * (1 - np.cos(2 * np.pi * cycles * t / dur + phase0))
    s_hat = t_hat + U(-0.2, 0.2) * n_hat
    s_hat /= np.linalg.norm(s_hat)
    # Uterus side moves fully; rectum side by (1 - f); a thin transition at the sliding plane.
    d_int = (px - p_int[0]) * n_hat[0] + (pz - p_int[1]) * n_hat[1]
    w_u = 1.0 / (1.0 + np.exp(np.clip(d_int / U(0.8, 2.0), -30, 30)))
    gain_field = (w_u + (1.0 - sliding) * (1.0 - w_u)) * (1.0 - 0.25 * np.clip(pz / depth_mm, 0, 1))
    peri_amp, peri_f, peri_ph = U(0.0, 1.5), U(0.2, 0.6), U(0, 2 * np.pi)
    jitter = np.cumsum(rng.normal(0, 0.15, size=(n_frames, 2)), axis=0)

    # ---- acquisition settings of this clip (some clips are noisy or low contrast)
    hard = rng.random() < 0.25
    noise = U(0.08, 0.2) if hard else U(0.02, 0.08)
    dyn_range = U(28, 40)
    decor = U(0.05, 0.3)
    tgc = np.exp(2 * 0.007 * rr)[:, None].astype(np.float32)

    # Scan conversion indices: display pixel -> (beam angle, radius) -> polar grid index.
    mm_px = depth_mm / size
    cx = (np.arange(size) + 0.5) * mm_px - depth_mm / 2
    cz = (np.arange(size) + 0.5) * mm_px
    gx, gz = np.meshgrid(cx, cz, indexing="xy")
    rad = np.hypot(gx - apex[0], gz - apex[1])
    ang = np.arctan2(gx - apex[0], gz - apex[1])
    ri = (rad - rr[0]) / dr
    ti = (ang + theta_max) / (2 * theta_max) * (n_t - 1)
    inside = (ri >= 0) & (ri <= n_r - 1) & (np.abs(ang) <= theta_max)

    extra = _speckle(rng, (n_r, n_t), (0.7, 1.0))
    frames = np.empty((n_frames, size, size), dtype=np.uint8)
    ref_db = None
    for k in range(n_frames):
        disp = press[k] * amp * gain_field
        peri = peri_amp * np.sin(2 * np.pi * peri_f * t[k] + peri_ph) * (1.0 - w_u)
        qx = px - disp * s_hat[0] - peri * t_hat[0] - jitter[k, 0]
        qz = pz - disp * s_hat[1] - peri * t_hat[1] - jitter[k, 1]
        fi = np.stack([(qz - _Z0) / _FINE_MM, (qx - _X0) / _FINE_MM])
        e = map_coordinates(tissue, fi, order=1, mode="nearest")
        a = map_coordinates(att, fi, order=1, mode="nearest")
        # Frame-to-frame speckle decorrelation: a randomly shifted copy of one extra speckle field.
        fresh = np.roll(extra, (int(rng.integers(n_r)), int(rng.integers(n_t))), axis=(0, 1))
        e = e * ((1 - decor) + decor * fresh)
        env = e * np.exp(-2 * np.cumsum(a, axis=0) * dr) * tgc
        env = np.abs(env + noise * (rng.standard_normal(env.shape) + 1j * rng.standard_normal(env.shape)) / 2)
        db = 20 * np.log10(env + 1e-4)
        if ref_db is None:
            ref_db = float(np.percentile(db, 99.0)) + U(-2.0, 3.0)
        polar = np.clip((db - (ref_db - dyn_range)) / dyn_range, 0, 1)
        img = map_coordinates(polar, np.stack([ri, ti]), order=1, mode="constant", cval=0.0)
        img = np.where(inside, img, 0.0)
        frames[k] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)

    def to_px(p: np.ndarray) -> list[float]:
        return [round(float(p[1] / mm_px - 0.5), 2), round(float((p[0] + depth_mm / 2) / mm_px - 0.5), 2)]

    info = {
        "pressure_mm": round(float(amp), 2),
        "hard_clip": bool(hard),
        "noise": round(float(noise), 3),
        "uterus_px": to_px(p_int - (cerv_half[1] * 0.5 + 0.5 * gap) * n_hat + 8 * t_hat),
        "rectum_px": to_px(p_int + (0.5 * gap + 0.5 * wall + 1.0) * n_hat + 8 * t_hat),
    }
    return Clip(frames=frames, fps=fps, info=info)
