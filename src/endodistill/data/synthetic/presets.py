"""Preset table of the synthetic cohort: cohort sizes, MRI acquisition geometry per site, clip format."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from endodistill.errors import InputError


@dataclass(frozen=True)
class MRISite:
    """One simulated scanner: sagittal T2 geometry and its contrast/noise character.

    Args:
        name: site name written to the manifest's ``site`` column.
        inplane_mm: in-plane pixel size (A-P and S-I), mm.
        inplane_n: in-plane matrix (square), voxels.
        slice_mm: slice spacing along L-R (thick slices), mm.
        n_slices: number of sagittal slices.
        scale: stored intensity of a unit-signal tissue (files are uint16, like real DICOM-derived NIfTI).
        noise: Rician noise sigma relative to unit signal.
        bias: strength of the smooth multiplicative bias field (log scale).
        fat: T2 signal of fat (partial fat suppression differs between sites).
        fluid: T2 signal of free fluid and urine.
        muscle: T2 signal of muscle.
        gamma: global contrast exponent applied to the noiseless image.
        weight: relative share of subjects scanned at this site.
    """

    name: str
    inplane_mm: float
    inplane_n: int
    slice_mm: float
    n_slices: int
    scale: float
    noise: float
    bias: float
    fat: float
    fluid: float
    muscle: float
    gamma: float
    weight: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel shape in file order (A->P, S->I, L->R)."""
        return (self.inplane_n, self.inplane_n, self.n_slices)

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel size in file order, mm."""
        return (self.inplane_mm, self.inplane_mm, self.slice_mm)


@dataclass(frozen=True)
class Preset:
    """Sizes and formats of one synthetic cohort preset."""

    name: str
    n_mri_labelled: int
    n_mri_unlabelled: int
    n_tvus: int
    prevalence: float
    mri_sites: tuple[MRISite, ...]
    tvus_size: int
    tvus_frames: int
    tvus_fps: int
    tvus_depth_mm: float = 90.0
    oblique_fraction: float = 0.3
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (written to cohort.json)."""
        d = asdict(self)
        d["mri_sites"] = [
            {**asdict(s), "shape": list(s.shape), "zooms": list(s.zooms)} for s in self.mri_sites
        ]
        return d


def _sites(
    inplane: tuple[float, float, float],
    n: tuple[int, int, int],
    slc: tuple[float, float, float],
    ns: tuple[int, int, int],
    k: int,
) -> tuple[MRISite, ...]:
    # Site A: high SNR, bright fat; site B: partial fat suppression, noisier, stronger bias, other scale;
    # site C (paper only): a third vendor-like contrast.
    all_sites = (
        MRISite("siteA", inplane[0], n[0], slc[0], ns[0], 2000.0, 0.025, 0.20, 0.62, 1.00, 0.22, 1.00, 0.55),
        MRISite("siteB", inplane[1], n[1], slc[1], ns[1], 700.0, 0.040, 0.32, 0.42, 0.88, 0.28, 0.85, 0.45),
        MRISite("siteC", inplane[2], n[2], slc[2], ns[2], 1200.0, 0.032, 0.25, 0.55, 0.95, 0.18, 1.15, 0.30),
    )
    return all_sites[:k]


def shifted_site(pre: Preset) -> MRISite:
    """A site unlike any of the preset's: other vendor contrast (darker fat, stronger bias, steeper
    gamma) and geometry (1.3x coarser in-plane pixels, 15% smaller field of view, 0.8x thinner slices).

    The unlabelled pool of a ``pool_shift`` cohort is scanned here (the pool study's domain question).
    """
    a = pre.mri_sites[0]
    inplane = round(a.inplane_mm * 1.3, 3)
    n = max(8, round(a.inplane_n * a.inplane_mm * 0.85 / inplane))
    slc = round(a.slice_mm * 0.8, 3)
    ns = max(4, round(a.n_slices * a.slice_mm / slc))
    return MRISite("siteShift", inplane, n, slc, ns, 900.0, 0.05, 0.38, 0.30, 0.80, 0.36, 1.35, 0.0)


PRESETS: dict[str, Preset] = {
    # Test-suite size: coarse grids, tiny clips; generates in a couple of seconds.
    "tiny": Preset(
        name="tiny",
        n_mri_labelled=24,
        n_mri_unlabelled=16,
        n_tvus=24,
        prevalence=0.3,
        mri_sites=_sites((3.0, 3.2, 3.0), (48, 46, 48), (6.0, 6.6, 6.0), (12, 11, 12), 2),
        tvus_size=64,
        tvus_frames=16,
        tvus_fps=8,
    ),
    # CPU demo: 25 small fits of the whole protocol in minutes on 2 cores. 200 labelled MRI: with 120 a
    # linear probe on the 4 mm model input stayed near 0.64 AUC, with 200 it reaches about 0.70.
    # 240 clips: with 120 the teacher was short of data, not of capacity or steps (session 13, the first N
    # clips of 360-clip cohorts, benchmarks/teacher_search.py "_clips"; seeds 10-12, then 13 / 14): teacher
    # 0.930 at 120, 0.932 at 180, 0.941 at 200, 0.951 at 240, 0.950 at 360, its clip baseline 0.953-0.963
    # throughout; over the five cohorts teacher minus baseline -0.050 at 120, -0.008 at 240. The MRI side is
    # drawn from its own streams, so it does not change with the clip count.
    "demo": Preset(
        name="demo",
        n_mri_labelled=200,
        n_mri_unlabelled=400,
        n_tvus=240,
        prevalence=0.3,
        mri_sites=_sites((1.5, 1.25, 1.5), (96, 116, 96), (4.5, 5.0, 4.5), (16, 14, 16), 2),
        tvus_size=96,
        tvus_frames=24,
        tvus_fps=10,
    ),
    # The paper's scale (private cohort of the paper: a few hundred labelled, a larger unlabelled pool).
    "paper": Preset(
        name="paper",
        n_mri_labelled=200,
        n_mri_unlabelled=1000,
        n_tvus=300,
        prevalence=0.3,
        mri_sites=_sites((0.75, 0.9, 0.8), (208, 176, 196), (3.6, 4.0, 3.0), (42, 38, 50), 3),
        tvus_size=160,
        tvus_frames=48,
        tvus_fps=16,
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        InputError: unknown preset name.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(
            "preset", f"unknown synthetic preset {name!r} (known: {', '.join(PRESETS)})"
        ) from None
