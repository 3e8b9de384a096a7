"""Plan, render and write the synthetic cohort (MRI NIfTI, TVUS mp4, manifest.csv, latents.csv, cohort.json).

Every subject gets its own ``numpy.random.Generator`` seeded by (seed, modality, group, index), so a
subject's files do not depend on the cohort size, the order of generation or the other subjects. The
labels of a group are an exact share of positives (``round(prevalence * n)``) placed by a seeded
permutation, so small cohorts keep the intended prevalence. Subjects are rendered and written one at a
time (memory does not grow with the cohort) and every file is written atomically; cohort.json is written
last, so its presence marks a complete cohort.
"""

from __future__ import annotations

import gzip
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import nibabel as nib
import numpy as np

from endodistill.data.synthetic.mri_render import render_mri
from endodistill.data.synthetic.presets import Preset, get_preset, shifted_site
from endodistill.data.synthetic.signs import (
    MRI_SIGNS,
    TVUS_SLIDING_BETA,
    draw_mri_signs,
    draw_severity,
    draw_tvus_sliding,
    mri_oracle,
    population_ceilings,
    tvus_oracle,
)
from endodistill.data.synthetic.tvus_render import render_tvus
from endodistill.errors import InputError
from endodistill.evaluate.metrics import auc_score
from endodistill.utils import atomic_write_bytes, atomic_write_csv, atomic_write_json, thread_map

GENERATOR_VERSION = 1
_GROUPS = {"L": 0, "U": 1, "T": 2}  # labelled MRI, unlabelled MRI, TVUS-only subjects
_STREAM = {"labels": 7, "mri": 1, "tvus": 2, "severity": 11}
MANIFEST_COLUMNS = ["subject_id", "modality", "path", "label", "site"]
LATENT_COLUMNS = [
    "subject_id",
    "modality",
    "label",
    "site",
    *MRI_SIGNS,
    "sliding",
    "oracle",
    "severity",
    "pod_x",
    "pod_y",
    "pod_z",
    "uterus_row",
    "uterus_col",
    "rectum_row",
    "rectum_col",
    "pressure_mm",
    "hard_clip",
]


@dataclass(frozen=True)
class PlannedSubject:
    """One file to generate: who, which modality, which label (None = unlabelled) and where."""

    subject_id: str
    modality: str
    group: str
    index: int
    label: int | None
    latent_label: int
    path: str


def _rng(seed: int, stream: str, group: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, _STREAM[stream], _GROUPS[group], index])


def _exact_labels(n: int, prevalence: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels with exactly ``round(prevalence * n)`` positives (at least one of each when n >= 2)."""
    n_pos = round(prevalence * n)
    if n >= 2:
        n_pos = min(max(n_pos, 1), n - 1)
    labels = np.zeros(n, dtype=int)
    labels[:n_pos] = 1
    return rng.permutation(labels)


def _counts(preset: Preset, n_mri_labelled: int | None, n_mri_unlabelled: int | None, n_tvus: int | None):
    n_l = preset.n_mri_labelled if n_mri_labelled is None else int(n_mri_labelled)
    n_u = preset.n_mri_unlabelled if n_mri_unlabelled is None else int(n_mri_unlabelled)
    n_t = preset.n_tvus if n_tvus is None else int(n_tvus)
    if n_l < 2:
        raise InputError("n_mri_labelled", f"needs at least 2 labelled MRI subjects, got {n_l}")
    if n_u < 0:
        raise InputError("n_mri_unlabelled", f"must be >= 0, got {n_u}")
    if n_t < 2:
        raise InputError("n_tvus", f"needs at least 2 TVUS subjects, got {n_t}")
    return n_l, n_u, n_t


def plan_cohort(
    preset: str = "demo",
    seed: int = 0,
    paired_fraction: float = 0.0,
    n_mri_labelled: int | None = None,
    n_mri_unlabelled: int | None = None,
    n_tvus: int | None = None,
) -> list[PlannedSubject]:
    """Who is in the cohort and with which label, without rendering anything (cheap).

    Args:
        preset: ``tiny``, ``demo`` or ``paper``.
        seed: generator seed.
        paired_fraction: share of TVUS subjects that are also labelled MRI subjects (same id and label).
        n_mri_labelled, n_mri_unlabelled, n_tvus: override the preset's counts.
        threads: subjects rendered at once (default: the CPUs, at most 8); the files do not depend on it.

    Returns:
        One entry per file: labelled MRI, unlabelled MRI, then TVUS.

    Raises:
        InputError: unknown preset, impossible counts or paired fraction.
    """
    pre = get_preset(preset)
    n_l, n_u, n_t = _counts(pre, n_mri_labelled, n_mri_unlabelled, n_tvus)
    if not 0.0 <= float(paired_fraction) <= 1.0:
        raise InputError("paired_fraction", f"must be in [0, 1], got {paired_fraction}")
    n_paired = round(float(paired_fraction) * n_t)
    if n_paired > n_l:
        raise InputError(
            "paired_fraction",
            f"{n_paired} paired TVUS subjects need at least as many labelled MRI subjects (have {n_l})",
        )
    lab_l = _exact_labels(n_l, pre.prevalence, np.random.default_rng([seed & 0xFFFFFFFF, 7, 0]))
    lab_u = _exact_labels(n_u, pre.prevalence, np.random.default_rng([seed & 0xFFFFFFFF, 7, 1]))
    out: list[PlannedSubject] = []
    for i, y in enumerate(lab_l):
        sid = f"L{i + 1:04d}"
        out.append(PlannedSubject(sid, "mri", "L", i, int(y), int(y), f"mri/{sid}.nii.gz"))
    for i, y in enumerate(lab_u):
        sid = f"U{i + 1:04d}"
        out.append(PlannedSubject(sid, "mri", "U", i, None, int(y), f"mri/{sid}.nii.gz"))

    # Paired subjects: drawn from the labelled MRI set, stratified so the TVUS prevalence stays put.
    pos = np.flatnonzero(lab_l == 1)
    neg = np.flatnonzero(lab_l == 0)
    k1 = round(n_paired * len(pos) / n_l)
    k1 = min(max(k1, n_paired - len(neg)), len(pos), n_paired)
    prng = np.random.default_rng([seed & 0xFFFFFFFF, 7, 3])
    paired = sorted([*prng.permutation(pos)[:k1].tolist(), *prng.permutation(neg)[: n_paired - k1].tolist()])
    n_only = n_t - n_paired
    target_pos = round(pre.prevalence * n_t) - k1
    target_pos = min(max(target_pos, 0), n_only)
    lab_t = np.zeros(n_only, dtype=int)
    lab_t[:target_pos] = 1
    lab_t = np.random.default_rng([seed & 0xFFFFFFFF, 7, 2]).permutation(lab_t)
    for i in paired:
        sid = f"L{i + 1:04d}"
        y = int(lab_l[i])
        out.append(PlannedSubject(sid, "tvus", "L", i, y, y, f"tvus/{sid}.mp4"))
    for i, y in enumerate(lab_t):
        sid = f"T{i + 1:04d}"
        out.append(PlannedSubject(sid, "tvus", "T", i, int(y), int(y), f"tvus/{sid}.mp4"))
    return out


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    # gzip with mtime=0 so identical voxels give identical file bytes; nibabel would pick the format from
    # the suffix of the temporary name, so serialise to bytes and write those atomically instead.
    atomic_write_bytes(path, gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def _yuv_frame(gray: np.ndarray) -> av.VideoFrame:
    """A yuv420p frame whose luma is ``gray`` in limited (video) range and whose chroma is neutral.

    Every byte of the frame's buffers, padding included, is written, so the encoder never sees
    uninitialised memory.
    """
    h, w = gray.shape
    frame = av.VideoFrame(w, h, "yuv420p")
    luma = np.rint(16.0 + gray.astype(np.float32) * (219.0 / 255.0)).astype(np.uint8)
    for i, plane in enumerate(frame.planes):
        buf = np.frombuffer(plane, dtype=np.uint8)  # type: ignore[call-overload]  # a VideoPlane has the buffer protocol; av's stubs do not say so
        buf[:] = 128 if i else 16
        if i == 0:
            buf[: plane.line_size * h].reshape(h, plane.line_size)[:, :w] = luma
    return frame


def _write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    t, h, w = frames.shape
    if h % 2 or w % 2:
        raise ValueError("H.264 yuv420p needs even frame sizes")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        # One encoder thread and no macroblock-tree/lookahead rate control: with those, x264's output for
        # identical frames was seen to vary between runs; without them it is bit-identical.
        stream = container.add_stream(
            "libx264",
            rate=fps,
            options={
                "crf": "18",
                "preset": "veryfast",
                "threads": "1",
                "x264-params": "mbtree=0:rc-lookahead=0",
            },
        )
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        for k in range(t):
            for packet in stream.encode(_yuv_frame(frames[k])):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    atomic_write_bytes(path, buf.getvalue())


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.10g}"
    return str(v)


def _auc(labels: list[int], scores: list[float]) -> float | None:
    auc = auc_score(labels, scores)
    return None if np.isnan(auc) else round(auc, 6)


def generate_cohort(
    out: str | Path,
    preset: str = "demo",
    seed: int = 0,
    paired_fraction: float = 0.0,
    n_mri_labelled: int | None = None,
    n_mri_unlabelled: int | None = None,
    n_tvus: int | None = None,
    threads: int | None = None,
    pool_shift: bool = False,
    severity_coupling: float = 0.0,
) -> dict[str, Any]:
    """Generate the synthetic pelvic cohort into ``out``.

    Writes ``out/mri/*.nii.gz`` (sagittal T2-like volumes), ``out/tvus/*.mp4`` (B-mode sliding-sign
    clips), ``out/manifest.csv`` (subject_id,modality,path,label,site), ``out/latents.csv`` (the latent
    signs and the oracle score of every labelled file) and ``out/cohort.json`` (settings, counts,
    prevalence and the oracle ceilings). Same arguments -> identical voxels, frames and file bytes.

    Args:
        out: output folder (created; existing files of the same names are replaced).
        preset: ``tiny`` (tests), ``demo`` (2-core CPU) or ``paper`` (GPU scale).
        seed: generator seed.
        paired_fraction: share of TVUS subjects that also have a labelled MRI (same subject_id).
        n_mri_labelled, n_mri_unlabelled, n_tvus: override the preset's counts.
        threads: rendering threads.
        pool_shift: scan the unlabelled pool at :func:`~endodistill.data.synthetic.presets.shifted_site`
            (other contrast and geometry) instead of the labelled subjects' sites; everything else,
            including every labelled volume and clip, is unchanged.
        severity_coupling: how strongly the subject's latent severity drives its MRI signs and its
            sliding fraction (0: independent given the label, the default; per-class marginals are kept at
            any value, see :mod:`endodistill.data.synthetic.signs`). A paired subject's MRI and clip share
            the severity, so real pairing then carries instance-level knowledge.

    Returns:
        The content of cohort.json.

    Raises:
        InputError: unknown preset, impossible counts, or ``out`` is not a folder.
    """
    pre = get_preset(preset)
    if not 0.0 <= float(severity_coupling) < 1.0:
        raise InputError("severity_coupling", f"must be in [0, 1), got {severity_coupling}")
    c = float(severity_coupling)
    plan = plan_cohort(preset, seed, paired_fraction, n_mri_labelled, n_mri_unlabelled, n_tvus)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "output exists and is not a folder")
    # cohort.json marks a complete cohort: drop a previous one first so an interrupted run never looks
    # complete.
    (out / "cohort.json").unlink(missing_ok=True)
    (out / "mri").mkdir(parents=True, exist_ok=True)
    (out / "tvus").mkdir(parents=True, exist_ok=True)
    site_names = [s.name for s in pre.mri_sites]
    shift_site = shifted_site(pre)
    site_p = np.array([s.weight for s in pre.mri_sites])
    site_p = site_p / site_p.sum()

    def make(subj: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        # One subject's file, manifest row and latent row: a pure function of (seed, subject), so subjects
        # can be rendered in any order and in parallel with identical files.
        row: dict[str, Any] = {"subject_id": subj.subject_id, "modality": subj.modality, "label": subj.label}
        if subj.modality == "mri":
            severity = draw_severity(_rng(seed, "severity", subj.group, subj.index))
            rng = _rng(seed, "mri", subj.group, subj.index)
            signs = draw_mri_signs(rng, subj.latent_label, severity, c)
            site = pre.mri_sites[int(rng.choice(len(site_names), p=site_p))]
            if pool_shift and subj.group == "U":
                site = shift_site  # after the draw: the subject's other random numbers stay the same
            oblique = bool(rng.random() < pre.oblique_fraction)
            vol = render_mri(rng, site, signs, oblique)
            _write_nifti(out / subj.path, vol.array, vol.affine)
            row["site"] = site.name
            latent = None
            if subj.label is not None:
                latent = {
                    **row,
                    **signs,
                    "oracle": mri_oracle(signs, pre.prevalence, c),
                    "severity": round(severity, 6),
                    "pod_x": float(vol.pod_world[0]),
                    "pod_y": float(vol.pod_world[1]),
                    "pod_z": float(vol.pod_world[2]),
                }
        else:
            severity = draw_severity(_rng(seed, "severity", subj.group, subj.index))
            rng = _rng(seed, "tvus", subj.group, subj.index)
            sliding = draw_tvus_sliding(rng, subj.latent_label, severity, c)
            clip = render_tvus(rng, sliding, pre.tvus_size, pre.tvus_frames, pre.tvus_fps, pre.tvus_depth_mm)
            _write_mp4(out / subj.path, clip.frames, clip.fps)
            row["site"] = "tvus"
            latent = {
                **row,
                "sliding": sliding,
                "oracle": tvus_oracle(sliding, pre.prevalence),
                "severity": round(severity, 6),
                "uterus_row": clip.info["uterus_px"][0],
                "uterus_col": clip.info["uterus_px"][1],
                "rectum_row": clip.info["rectum_px"][0],
                "rectum_col": clip.info["rectum_px"][1],
                "pressure_mm": clip.info["pressure_mm"],
                "hard_clip": clip.info["hard_clip"],
            }
        return {**row, "path": subj.path}, latent

    # Rendering (NumPy), gzip and x264 (one encoder thread each) release the GIL for most of their time:
    # a thread per core renders a demo cohort in 60-70 % of the single-thread time (bench_speedups).
    made = thread_map(make, plan, threads, "endodistill-synth")
    manifest_rows = [m for m, _ in made]
    latent_rows = [lat for _, lat in made if lat is not None]
    site_counts: Counter[str] = Counter(m["site"] for m in manifest_rows if m["modality"] == "mri")

    atomic_write_csv(out / "manifest.csv", manifest_rows, MANIFEST_COLUMNS, cell=_fmt, extrasaction="ignore")
    atomic_write_csv(out / "latents.csv", latent_rows, LATENT_COLUMNS, cell=_fmt, extrasaction="ignore")

    def labelled(modality: str) -> tuple[list[int], list[float]]:
        rows = [r for r in latent_rows if r["modality"] == modality]
        return [int(r["label"]) for r in rows], [float(r["oracle"]) for r in rows]

    y_m, s_m = labelled("mri")
    y_t, s_t = labelled("tvus")
    n_u = sum(1 for p in plan if p.group == "U")
    n_paired = sum(1 for p in plan if p.modality == "tvus" and p.group == "L")
    settings = pre.to_dict()
    settings.update(n_mri_labelled=len(y_m), n_mri_unlabelled=n_u, n_tvus=len(y_t))
    summary: dict[str, Any] = {
        "generator": "endodistill.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "preset": pre.name,
        "seed": int(seed),
        "paired_fraction": float(paired_fraction),
        "pool_shift": bool(pool_shift),
        "severity_coupling": c,
        "settings": settings,
        "counts": {
            "mri_labelled": len(y_m),
            "mri_labelled_positive": int(sum(y_m)),
            "mri_unlabelled": n_u,
            "tvus": len(y_t),
            "tvus_positive": int(sum(y_t)),
            "tvus_paired": n_paired,
            "mri_sites": {
                name: site_counts.get(name, 0)
                for name in site_names + ([shift_site.name] if pool_shift else [])
            },
        },
        "prevalence": {
            "generative": pre.prevalence,
            "mri_labelled": round(sum(y_m) / len(y_m), 4),
            "tvus": round(sum(y_t) / len(y_t), 4),
        },
        "ceilings": {"mri": _auc(y_m, s_m), "tvus": _auc(y_t, s_t)},
        "population_ceilings": population_ceilings(c),
        "latent_model": {
            "mri_signs": {k: {"p_if_obliterated": v[0], "p_if_not": v[1]} for k, v in MRI_SIGNS.items()},
            "tvus_sliding_beta": {str(k): list(v) for k, v in TVUS_SLIDING_BETA.items()},
            "oracle": "exact posterior P(y=1 | latent signs) under the generative model, prior = generative prevalence",
        },
        "mri": {
            "format": "nifti-gz",
            "dtype": "uint16",
            "axcodes": ["P", "I", "R"],
            "oblique_fraction": pre.oblique_fraction,
            "sites": {
                s.name: {"shape": list(s.shape), "zooms": list(s.zooms)}
                for s in (*pre.mri_sites, *([shift_site] if pool_shift else []))
            },
        },
        "tvus": {
            "format": "mp4",
            "codec": "h264",
            "pix_fmt": "yuv420p",
            "size": [pre.tvus_size, pre.tvus_size],
            "frames": pre.tvus_frames,
            "fps": pre.tvus_fps,
            "depth_mm": pre.tvus_depth_mm,
        },
        "files": {"manifest": "manifest.csv", "latents": "latents.csv", "mri": "mri/", "tvus": "tvus/"},
    }
    atomic_write_json(out / "cohort.json", summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines about a generated cohort (what ``endodistill synth`` prints)."""
    c, p, ceil = summary["counts"], summary["prevalence"], summary["ceilings"]
    pop = summary.get("population_ceilings", {})
    sites = ", ".join(f"{k} {v}" for k, v in c.get("mri_sites", {}).items())

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines = [
        f"synthetic cohort: preset {summary['preset']}, seed {summary['seed']}",
        f"  MRI labelled    {c['mri_labelled']:5d}  ({c['mri_labelled_positive']} obliterated, {100 * p['mri_labelled']:.1f}%)",
        f"  MRI unlabelled  {c['mri_unlabelled']:5d}  (all MRI by site: {sites})",
        f"  TVUS labelled   {c['tvus']:5d}  ({c['tvus_positive']} obliterated, {100 * p['tvus']:.1f}%; "
        f"{c['tvus_paired']} also in the MRI set)",
        f"  oracle ceiling (AUC from the latent signs): MRI {f(ceil['mri'])}, TVUS {f(ceil['tvus'])}"
        f"  (population: MRI {f(pop.get('mri'))}, TVUS {f(pop.get('tvus'))})",
        "  files: manifest.csv, latents.csv, cohort.json, mri/*.nii.gz, tvus/*.mp4",
    ]
    return "\n".join(lines)


__all__ = ["PlannedSubject", "format_summary", "generate_cohort", "plan_cohort"]
