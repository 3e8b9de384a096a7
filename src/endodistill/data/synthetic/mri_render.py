"""Render one synthetic sagittal T2-weighted female pelvis as a voxel volume with its affine.

The anatomy is a set of signed-distance fields (ellipsoids, tubes, slabs) in a patient-local frame
(u = left->right, a = posterior->anterior, s = inferior->superior, mm) placed in world RAS by a random
pose. Every voxel centre is mapped through the acquisition affine to world, then to the local frame, so
the affine written to the file is correct by construction. Tissues are painted in anatomical order with a
soft (one-voxel) edge, then scanner effects are applied: contrast exponent, smooth bias field, Rician
noise and a site-specific intensity scale. No library renders anatomy phantoms of this kind, so the
field code is written here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter1d

from endodistill.data.synthetic.presets import MRISite

# T2 signal of the tissues (site-independent ones; fat, fluid and muscle come from the site).
_T2 = {
    "air": 0.0,
    "cortex": 0.08,
    "marrow": 0.42,
    "myometrium": 0.48,
    "junctional": 0.22,
    "endometrium": 0.85,
    "cervix": 0.18,
    "vagina_wall": 0.24,
    "vagina_lumen": 0.5,
    "bladder_wall": 0.26,
    "rectum_wall": 0.2,
    "gas": 0.03,
    "bowel_wall": 0.27,
    "strand": 0.1,
    "plaque": 0.12,
}

# Local frame axes of the file's voxel axes before any oblique tilt: axis 0 runs A->P, axis 1 S->I and
# axis 2 L->R (nibabel axcodes P, I, R), like a real sagittal TSE series converted to NIfTI.
_SAGITTAL_AXES = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


@dataclass
class MRIVolume:
    """A rendered volume: uint16 voxels in file order, its affine and where the POD lies."""

    array: np.ndarray
    affine: np.ndarray
    pod_world: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def _rot(axis: int, deg: float) -> np.ndarray:
    """Rotation matrix about world axis ``axis`` (0=x, 1=y, 2=z) by ``deg`` degrees."""
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _soft(sd: np.ndarray, edge: float) -> np.ndarray:
    """Membership in [0, 1] from a signed distance (negative inside), ramping over ``edge`` mm."""
    return np.clip(0.5 - sd / float(edge), 0.0, 1.0).astype(np.float32, copy=False)


def _ellipsoid_sd(u, a, s, centre, half_axes, beta_deg: float = 0.0) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipsoid.

    Args:
        u, a, s: local coordinates (arrays).
        centre: (u, a, s) centre.
        half_axes: (along u, along the in-plane direction beta, across it in the a-s plane).
        beta_deg: in-plane direction of the second axis, degrees from superior towards anterior.
    """
    # Python floats keep the float32 voxel arrays in float32 (NumPy scalars would promote to float64).
    b = np.deg2rad(float(beta_deg))
    sb, cb = float(np.sin(b)), float(np.cos(b))
    du, da, ds = u - float(centre[0]), a - float(centre[1]), s - float(centre[2])
    p1 = da * sb + ds * cb
    p2 = da * cb - ds * sb
    ru, r1, r2 = (float(h) for h in half_axes)
    k0 = np.sqrt((du / ru) ** 2 + (p1 / r1) ** 2 + (p2 / r2) ** 2)
    k1 = np.sqrt((du / ru**2) ** 2 + (p1 / r1**2) ** 2 + (p2 / r2**2) ** 2)
    # Quilez's first-order distance estimate: exact on the surface, good within a few mm of it.
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _sheet_sd(u, a, s, p0, p1, radius: float, u_centre: float, u_half: float) -> np.ndarray:
    """Signed distance to a band: a segment p0->p1 in the (a, s) plane of thickness 2*radius, extruded in u."""
    d0, d1 = float(p1[0]) - float(p0[0]), float(p1[1]) - float(p0[1])
    da, ds = a - float(p0[0]), s - float(p0[1])
    t = np.clip((da * d0 + ds * d1) / max(d0 * d0 + d1 * d1, 1e-6), 0.0, 1.0)
    dist = np.sqrt((da - t * d0) ** 2 + (ds - t * d1) ** 2) - float(radius)
    return np.maximum(dist, np.abs(u - float(u_centre)) - float(u_half))


class _Canvas:
    """Voxel grid with local coordinates; paints tissues inside per-structure bounding boxes."""

    def __init__(self, shape: tuple[int, int, int], vox2local: np.ndarray, edge: float, background: float):
        self.shape = shape
        self.vox2local = vox2local
        self.local2vox = np.linalg.inv(vox2local)
        self.edge = edge
        idx = [np.arange(n, dtype=np.float32) for n in shape]
        m = vox2local.astype(np.float32)
        # Local coordinates of every voxel centre, by broadcasting the affine over the three index axes.
        self.coords = [
            m[r, 0] * idx[0][:, None, None]
            + m[r, 1] * idx[1][None, :, None]
            + m[r, 2] * idx[2][None, None, :]
            + m[r, 3]
            for r in range(3)
        ]
        self.img = np.full(shape, background, dtype=np.float32)

    def box(self, lo, hi) -> tuple[slice, ...]:
        """Voxel slices covering the local-frame box [lo, hi] (plus a margin)."""
        lo = np.asarray(lo, float) - 2 * self.edge
        hi = np.asarray(hi, float) + 2 * self.edge
        corners = np.array(
            [[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        )
        vox = (self.local2vox @ corners.T)[:3]
        out = []
        for ax in range(3):
            a0 = int(np.floor(vox[ax].min())) - 1
            a1 = int(np.ceil(vox[ax].max())) + 2
            out.append(slice(max(a0, 0), min(max(a1, 0), self.shape[ax])))
        return tuple(out)

    def paint(self, sd_fn, value: float, lo=None, hi=None) -> None:
        """Blend ``value`` into the image where ``sd_fn(u, a, s) < 0`` (soft edge)."""
        sl = (slice(None),) * 3 if lo is None else self.box(lo, hi)
        if any(s.start >= s.stop for s in sl if s.start is not None):
            return
        u, a, s = (c[sl] for c in self.coords)
        if u.size == 0:
            return
        m = _soft(sd_fn(u, a, s), self.edge)
        view = self.img[sl]
        view += m * (np.float32(value) - view)


def _ellipsoid_box(centre, half_axes) -> tuple[np.ndarray, np.ndarray]:
    r = max(half_axes[1], half_axes[2])
    c = np.asarray(centre, float)
    h = np.array([half_axes[0], r, r])
    return c - h, c + h


def render_mri(rng: np.random.Generator, site: MRISite, signs: dict[str, int], oblique: bool) -> MRIVolume:
    """Render one subject.

    Args:
        rng: the subject's own generator (all randomness comes from it).
        site: acquisition geometry and contrast of the simulated scanner.
        signs: the subject's latent MRI signs (see :data:`signs.MRI_SIGNS`).
        oblique: tilt the slice stack by a few degrees (an oblique sagittal acquisition).

    Returns:
        The rendered volume.
    """
    U = rng.uniform
    # ---- pose: anatomy frame in world RAS, field-of-view centre, acquisition orientation
    pose = _rot(0, U(-6, 6)) @ _rot(1, U(-3, 3)) @ _rot(2, U(-4, 4))
    anat_origin = np.array([U(-15, 15), U(-30, 10), U(-40, 20)])
    fov_centre = anat_origin + pose @ np.array([U(-3, 3), U(-6, 6), U(-6, 6)])
    acq = _rot(2, U(-8, 8)) @ _rot(1, U(-5, 5)) if oblique else np.eye(3)
    shape = site.shape
    lin = acq @ _SAGITTAL_AXES @ np.diag(site.zooms)
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = fov_centre - lin @ ((np.array(shape) - 1) / 2.0)
    world2local = np.eye(4)
    world2local[:3, :3] = pose.T
    world2local[:3, 3] = -pose.T @ anat_origin
    vox2local = world2local @ affine

    # ---- tissue contrast of this subject: site table with a per-subject jitter
    t2 = dict(_T2)
    t2.update(fat=site.fat, fluid=site.fluid, muscle=site.muscle)
    t2 = {k: v * float(np.exp(rng.normal(0, 0.06))) for k, v in t2.items()}
    t2["myometrium"] = float(np.clip(t2["myometrium"] * U(0.85, 1.2), 0.3, 0.7))
    t2["air"] = 0.0

    cv = _Canvas(shape, vox2local, edge=max(site.inplane_mm, 1.0), background=t2["fat"])
    uc = U(-5, 5)  # midline of the pelvic organs

    # ---- cervix and uterine body (sagittal-plane geometry decides the POD)
    cerv_c = np.array([uc, U(2, 8), U(-22, -14)])
    cerv_beta = U(5, 30)
    cerv_h = (U(13, 17), U(12, 17), U(10, 13))  # (u, along axis, across)
    d_c = np.array([np.sin(np.deg2rad(cerv_beta)), np.cos(np.deg2rad(cerv_beta))])
    isthmus = cerv_c[1:] + (cerv_h[1] - 2) * d_c
    body_beta = U(-75, -35) if signs["retroflexion"] else U(10, 85)
    d_u = np.array([np.sin(np.deg2rad(body_beta)), np.cos(np.deg2rad(body_beta))])
    body_h = (U(20, 27), U(24, 36), U(15, 21))
    body_c = np.array([uc, *(isthmus + (body_h[1] - 6) * d_u)])

    # Posterior uterine/cervical boundary post(s) along the midline, from a 1 mm raster of the a-s plane.
    s_grid = np.arange(-90.0, 111.0, 1.0)
    a_grid = np.arange(-100.0, 101.0, 1.0)
    ag, sg = np.meshgrid(a_grid, s_grid)
    ug = np.full_like(ag, uc)
    inside = (_ellipsoid_sd(ug, ag, sg, cerv_c, cerv_h, cerv_beta) < 0) | (
        _ellipsoid_sd(ug, ag, sg, body_c, body_h, body_beta) < 0
    )
    post = np.where(inside.any(axis=1), np.where(inside, ag, np.inf).min(axis=1), np.nan)

    # ---- rectum centre-line a_r(s): follows the sacral curve, kept behind the uterus with a fat gap
    s_ref = cerv_c[2]
    s_pod = s_ref + U(0, 8)
    r_a, r_u, wall = U(9, 13), U(12, 17), U(2.5, 3.5)
    a0 = U(-30, -22)
    s1 = isthmus[1] + U(5, 15)
    a_r = a0 - U(0.004, 0.01) * np.maximum(s_grid - s1, 0) ** 2 - 0.15 * np.maximum(s_ref - s_grid, 0)
    s_top = s1 + U(25, 40)  # the rectosigmoid leaves the midline above this level
    # The normal pouch: a fat gap of 2-4 voxels at the demo's 4 mm working resolution, so closing it
    # (tethering, strands) is visible there.
    gap = np.full_like(s_grid, U(9, 16))
    min_gap = np.full_like(s_grid, 0.5)
    fluid = not signs["no_pod_fluid"]
    if fluid:
        fluid_t, fluid_hs, s_f = U(10, 16), U(10, 15), s_pod + U(-2, 4)
        bump = fluid_t * np.exp(-(((s_grid - s_f) / fluid_hs) ** 2))
        gap = np.maximum(gap, bump)
        min_gap = np.maximum(min_gap, bump)  # fluid keeps the pouch open even where the rectum is tethered
    has_post = np.isfinite(post)
    post_f = np.where(has_post, post, np.interp(s_grid, s_grid[has_post], post[has_post]))
    a_r = np.where(has_post, np.minimum(a_r, post - gap - r_a), a_r)
    if signs["tethered_rectum"]:
        # The anterior rectal wall is pulled onto the posterior serosa over 2-3 cm: the pouch is closed.
        s_t, w_t = s_pod + U(-2, 8), U(10, 16)
        pull = np.exp(-(((s_grid - s_t) / w_t) ** 2))
        target = post_f - r_a - U(0.0, 2.0)
        a_r = a_r + pull * np.maximum(target - a_r, 0.0)
    a_r = gaussian_filter1d(a_r, 2.0)
    a_r = np.where(has_post, np.minimum(a_r, post - min_gap - r_a), a_r)
    # The sacrum is concave anteriorly and lies behind the rectum with presacral fat: its curve is moved
    # back where the rectum (pushed back by a retroflexed uterus or fluid) would otherwise reach it.
    sac_k, sac_s = U(0.002, 0.005), U(0, 20)
    span = (s_grid >= -45) & (s_grid <= s_top)
    room = a_r - r_a - U(6, 12) - sac_k * (s_grid - sac_s) ** 2
    sac_mid = min(a0 - U(24, 32), float(room[span].min()))
    ant = a_r + r_a

    def at(arr: np.ndarray, s: float) -> float:
        return float(np.interp(s, s_grid, arr))

    pod = np.array([uc, 0.5 * (at(post_f, s_pod) + at(ant, s_pod)), s_pod])

    # ---- body wall, bones, muscles (painted first, organs override them)
    a_w = U(54, 64)
    a_skin = a_w + 9 + U(8, 30)
    cv.paint(
        lambda u, a, s: np.abs(a - a_w - 4.5) - 4.5,
        t2["muscle"],
        lo=(-200, a_w - 2, -200),
        hi=(200, a_w + 11, 200),
    )
    cv.paint(lambda u, a, s: a_skin - a, t2["air"], lo=(-200, a_skin - 2, -200), hi=(200, 300, 200))

    def sacrum(half: float):
        return lambda u, a, s: np.maximum(
            np.abs(a - (sac_mid + sac_k * (s - sac_s) ** 2)) - half, np.maximum(-50 - s, np.abs(u) - 45)
        )

    cv.paint(lambda u, a, s: a - (sac_mid + sac_k * (s - sac_s) ** 2 - 7), t2["muscle"])
    cv.paint(sacrum(7.0), t2["cortex"])
    cv.paint(sacrum(4.5), t2["marrow"])
    pub_c = (uc, U(48, 56), s_ref - U(22, 30))
    cv.paint(
        lambda u, a, s: _ellipsoid_sd(u, a, s, pub_c, (30, 20, 9), 30),
        t2["cortex"],
        *_ellipsoid_box(pub_c, (30, 20, 9)),
    )
    cv.paint(
        lambda u, a, s: _ellipsoid_sd(u, a, s, pub_c, (27, 17, 6), 30),
        t2["marrow"],
        *_ellipsoid_box(pub_c, (27, 17, 6)),
    )
    lev_s0, lev_k = s_ref - U(34, 42), U(0.15, 0.35)
    cv.paint(
        lambda u, a, s: np.maximum(np.abs(s - (lev_s0 + lev_k * a)) - 4, np.abs(a) - 40),
        t2["muscle"],
    )
    side = U(48, 58)
    cv.paint(lambda u, a, s: side - np.abs(u - uc), t2["muscle"])
    cv.paint(lambda u, a, s: side + 12 - np.abs(u - uc), t2["marrow"])

    # ---- small bowel loops above the uterus (nuisance structures, independent of the label)
    for _ in range(int(rng.integers(3, 7))):
        c = (U(-25, 25), U(-25, 45), U(isthmus[1] + 25, 90))
        r = U(8, 13)
        h_out, h_in = (1.5 * r, r, r), (1.5 * r - 2.5, r - 2.5, r - 2.5)
        cv.paint(
            lambda u, a, s, c=c, h=h_out: _ellipsoid_sd(u, a, s, c, h),
            t2["bowel_wall"],
            *_ellipsoid_box(c, h_out),
        )
        cv.paint(
            lambda u, a, s, c=c, h=h_in: _ellipsoid_sd(u, a, s, c, h), U(0.4, 0.8), *_ellipsoid_box(c, h_in)
        )

    # ---- bladder (urine is the brightest T2 signal)
    bl_c = (uc + U(-3, 3), cerv_c[1] + U(26, 36), s_ref + U(-2, 12))
    bl_h = (U(22, 34), U(13, 24), U(14, 26))
    bl_in = (bl_h[0] - 2.5, bl_h[1] - 2.5, bl_h[2] - 2.5)
    bl_beta = U(-20, 20)
    cv.paint(
        lambda u, a, s: _ellipsoid_sd(u, a, s, bl_c, bl_h, bl_beta),
        t2["bladder_wall"],
        *_ellipsoid_box(bl_c, bl_h),
    )
    cv.paint(
        lambda u, a, s: _ellipsoid_sd(u, a, s, bl_c, bl_in, bl_beta),
        t2["fluid"],
        *_ellipsoid_box(bl_c, bl_in),
    )

    # ---- free fluid in the POD (mostly in negatives): organs painted later shape it to the gap
    if fluid:
        fl_c = (uc + U(-4, 4), at(post_f, s_f) - 0.5 * at(gap, s_f), s_f)
        fl_h = (U(16, 24), fluid_hs, 0.5 * fluid_t + 2)
        cv.paint(lambda u, a, s: _ellipsoid_sd(u, a, s, fl_c, fl_h), t2["fluid"], *_ellipsoid_box(fl_c, fl_h))

    # ---- a small-bowel loop dipping into the upper POD in some subjects of both classes (a nuisance
    # that changes the POD's look without carrying label information)
    if rng.random() < 0.25:
        sb_s = s_pod + U(8, 22)
        sb_c = (uc + U(-8, 8), 0.5 * (at(post_f, sb_s) + at(ant, sb_s)), sb_s)
        r = U(6, 9)
        h_out, h_in = (1.5 * r, r, r), (1.5 * r - 2.5, r - 2.5, r - 2.5)
        cv.paint(
            lambda u, a, s: _ellipsoid_sd(u, a, s, sb_c, h_out),
            t2["bowel_wall"],
            *_ellipsoid_box(sb_c, h_out),
        )
        cv.paint(lambda u, a, s: _ellipsoid_sd(u, a, s, sb_c, h_in), U(0.3, 0.7), *_ellipsoid_box(sb_c, h_in))

    # ---- rectum: dark muscular wall, lumen with gas or mucus
    lumen = t2["gas"] if rng.random() < 0.5 else U(0.3, 0.6) * t2["fluid"]
    # Above s_top the tube turns to the left: the sigmoid leaving the midline.
    rect_lo = (uc - r_u, float(a_r.min()) - r_a, -200.0)
    rect_hi = (uc + r_u + 1.2 * max(110.0 - s_top, 0.0), float(a_r.max()) + r_a, 200.0)

    def rectum_sd(u, a, s, half_a: float, half_u: float):
        du = (u - (uc + 1.2 * np.maximum(s - s_top, 0))) / half_u
        da = (a - np.interp(s, s_grid, a_r).astype(np.float32)) / half_a
        return np.maximum((np.sqrt(du * du + da * da) - 1) * min(half_a, half_u), -75 - s)

    for half_a, half_u, val in ((r_a, r_u, t2["rectum_wall"]), (r_a - wall, r_u - wall, lumen)):
        cv.paint(lambda u, a, s, ha=half_a, hu=half_u: rectum_sd(u, a, s, ha, hu), val, rect_lo, rect_hi)

    # ---- vagina and posterior fornix (an elevated fornix is one of the signs)
    ext_os = cerv_c[1:] - cerv_h[1] * d_c
    introitus = np.array([ext_os[0] + U(8, 16), -90.0])
    cv.paint(
        lambda u, a, s: _sheet_sd(u, a, s, ext_os, introitus, 6.0, uc, 16.0),
        t2["vagina_wall"],
        lo=(-100, -100, -100),
        hi=(100, 100, ext_os[1] + 8),
    )
    cv.paint(
        lambda u, a, s: _sheet_sd(u, a, s, ext_os, introitus, 2.0, uc, 12.0),
        t2["vagina_lumen"],
        lo=(-100, -100, -100),
        hi=(100, 100, ext_os[1] + 4),
    )
    s_fx = s_ref - 0.35 * cerv_h[1] + (U(10, 15) if signs["elevated_fornix"] else U(-2, 2))
    fx_c = (uc, at(post_f, s_fx) - 3.0, s_fx - 4.0)
    cv.paint(
        lambda u, a, s: _ellipsoid_sd(u, a, s, fx_c, (14, 9, 3.5), cerv_beta),
        t2["vagina_wall"],
        *_ellipsoid_box(fx_c, (14, 9, 3.5)),
    )
    cv.paint(
        lambda u, a, s: _ellipsoid_sd(u, a, s, fx_c, (10, 7, 1.3), cerv_beta),
        t2["vagina_lumen"],
        *_ellipsoid_box(fx_c, (10, 7, 1.3)),
    )

    # ---- cervix (dark stroma, bright canal) and uterus (myometrium, junctional zone, endometrium)
    cv.paint(
        lambda u, a, s: _ellipsoid_sd(u, a, s, cerv_c, cerv_h, cerv_beta),
        t2["cervix"],
        *_ellipsoid_box(cerv_c, cerv_h),
    )
    canal = (4.0, cerv_h[1] - 2, 1.2)
    cv.paint(
        lambda u, a, s: _ellipsoid_sd(u, a, s, cerv_c, canal, cerv_beta),
        t2["vagina_lumen"],
        *_ellipsoid_box(cerv_c, canal),
    )
    cv.paint(
        lambda u, a, s: _ellipsoid_sd(u, a, s, body_c, body_h, body_beta),
        t2["myometrium"],
        *_ellipsoid_box(body_c, body_h),
    )
    endo = (0.6 * body_h[0], 0.75 * body_h[1], U(1.5, 4.5))
    jz_t = U(2, 5)
    jz = (endo[0] + jz_t, endo[1] + jz_t, endo[2] + jz_t)
    cv.paint(
        lambda u, a, s: _ellipsoid_sd(u, a, s, body_c, jz, body_beta),
        t2["junctional"],
        *_ellipsoid_box(body_c, jz),
    )
    cv.paint(
        lambda u, a, s: _ellipsoid_sd(u, a, s, body_c, endo, body_beta),
        t2["endometrium"],
        *_ellipsoid_box(body_c, endo),
    )

    # ---- obliteration signs on the posterior serosa and across the POD
    if signs["serosal_plaque"]:
        # A dark fibrotic plate, 9-14 mm thick and 2-3 cm long, on the posterior serosa of the lower
        # uterine body (above the dark cervical stroma, against which it would not show).
        s_p = max(s_pod + U(4, 12), isthmus[1] + U(0, 10))
        half_t = U(4.5, 7.0)
        pl_c = (uc + U(-4, 4), at(post_f, s_p) - half_t + 2.0, s_p)
        pl_h = (U(16, 22), U(12, 17), half_t)
        cv.paint(
            lambda u, a, s: _ellipsoid_sd(u, a, s, pl_c, pl_h), t2["plaque"], *_ellipsoid_box(pl_c, pl_h)
        )
    if signs["strands"]:
        # Thick dark fibrous bands bridging the pouch from the serosa to the rectal wall.
        for _ in range(int(rng.integers(2, 5))):
            sa = s_pod + U(-4, 20)
            sb = sa + U(-6, 6)
            p0, p1 = (at(post_f, sa) + 2.0, sa), (at(ant, sb) - 2.0, sb)
            rad, su, hw = U(3.0, 4.5), uc + U(-6, 6), U(16, 28)
            lo = (su - hw, min(p0[0], p1[0]) - rad, min(sa, sb) - rad)
            hi = (su + hw, max(p0[0], p1[0]) + rad, max(sa, sb) + rad)
            cv.paint(
                lambda u, a, s, p0=p0, p1=p1, r=rad, su=su, hw=hw: _sheet_sd(u, a, s, p0, p1, r, su, hw),
                t2["strand"],
                lo,
                hi,
            )

    # ---- tissue heterogeneity (a few plane waves), then the scanner: contrast exponent, smooth bias
    # field, Rician noise, site scale
    u, a, s = (c / np.float32(100.0) for c in cv.coords)
    texture = np.ones(shape, dtype=np.float32)
    for _ in range(3):
        k = [float(v) for v in rng.normal(size=3) * (2 * np.pi / (U(0.15, 0.4) * np.sqrt(3)))]
        texture += np.float32(U(0.02, 0.05)) * np.cos(k[0] * u + k[1] * a + k[2] * s + float(U(0, 2 * np.pi)))
    img = np.clip(cv.img * texture, 0, None) ** np.float32(site.gamma)
    coef = rng.normal(0, site.bias, size=6).astype(np.float32)
    img *= np.exp(
        coef[0] * u + coef[1] * a + coef[2] * s + coef[3] * u * a + coef[4] * a * s + coef[5] * s * s
    )
    sigma = np.float32(site.noise * U(0.8, 1.25))
    n1 = rng.standard_normal(shape, dtype=np.float32)
    n2 = rng.standard_normal(shape, dtype=np.float32)
    img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)
    gain = np.float32(site.scale * np.exp(rng.normal(0, 0.15)))
    arr = np.clip(np.rint(img * gain), 0, 65535).astype(np.uint16)

    pod_world = pose @ pod + anat_origin
    info = {
        "uterus_version_deg": round(float(body_beta), 1),
        "pod_gap_mm": round(float(at(post_f, s_pod) - at(ant, s_pod)), 1),
        "oblique": bool(oblique),
    }
    return MRIVolume(array=arr, affine=affine, pod_world=pod_world, info=info)
