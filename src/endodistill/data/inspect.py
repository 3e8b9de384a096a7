"""``endodistill inspect PATH``: what the readers see in one MRI volume or ultrasound clip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from endodistill.data.dicom import describe_series, dicom_file_kind
from endodistill.data.mri import load_volume, supported_formats, volume_format
from endodistill.data.video import IMAGE_SUFFIXES, clip_format, load_clip
from endodistill.errors import InputError


def _kind(path: Path) -> str:
    """``volume`` or ``clip`` for a path: from its suffix, a DICOM file's header, or a folder's contents."""
    if path.is_dir():
        has_frames = any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())
        return "clip" if has_frames else "volume"
    if clip_format(path) == "dicom":
        # One DICOM file: an enhanced MR/CT volume or an ultrasound cine, by its SOP class and modality.
        return dicom_file_kind(path)
    if volume_format(path) is not None:
        return "volume"
    if clip_format(path) is not None:
        return "clip"
    raise InputError(
        path,
        f"unknown format (MRI: {supported_formats()}, or an enhanced MR/CT .dcm; clips: .mp4/.avi/.mov, "
        ".dcm cine, PNG folder, .npy)",
    )


def _range(arr: np.ndarray) -> dict[str, float]:
    p = np.percentile(arr, [0.5, 50.0, 99.5])
    return {
        "min": float(arr.min()),
        "p0.5": float(p[0]),
        "median": float(p[1]),
        "p99.5": float(p[2]),
        "max": float(arr.max()),
    }


def inspect_path(path: str | Path) -> dict[str, Any]:
    """Read one file and describe it.

    Args:
        path: an MRI volume (file or DICOM series folder) or an ultrasound clip.

    Returns:
        A JSON-serialisable dict: ``kind``, ``format``, ``reader`` (e.g. ``nibabel MGHImage``), ``path`` and, for volumes, ``shape``, ``dtype``,
        ``spacing``, ``orientation`` (nibabel axis codes), ``oblique_deg``, ``affine``,
        ``intensity``; for clips ``frames``, ``height``, ``width``, ``fps``, ``duration_s``,
        ``intensity``; plus the reader's technical ``meta``.

    Raises:
        InputError: the path is missing, of an unknown format, or unreadable.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file or folder")
    kind = _kind(p)
    info: dict[str, Any] = {"path": str(p), "kind": kind}
    if kind == "volume":
        if p.is_dir():
            series = describe_series(p)
            if len(series) > 1:
                info["format"] = "dicom"
                info["series"] = series
                return info
        vol = load_volume(p)
        obl = nib.affines.obliquity(vol.affine)
        info.update(
            format=vol.format,
            reader=vol.reader,
            shape=[int(s) for s in vol.array.shape],
            dtype=str(vol.meta.get("dtype", vol.array.dtype)),
            spacing=[round(s, 4) for s in vol.spacing],
            orientation="".join(nib.aff2axcodes(vol.affine)),
            oblique_deg=round(float(np.degrees(np.max(np.abs(obl)))), 3),
            affine=np.round(vol.affine, 4).tolist(),
            intensity=_range(vol.array),
            meta={k: v for k, v in vol.meta.items() if k not in ("shape", "spacing", "dtype")},
        )
    else:
        clip = load_clip(p)
        info.update(
            format=clip.format,
            reader=clip.reader,
            frames=int(clip.frames.shape[0]),
            height=int(clip.frames.shape[1]),
            width=int(clip.frames.shape[2]),
            fps=round(float(clip.fps), 4),
            duration_s=round(clip.duration, 3),
            dtype=str(clip.frames.dtype),
            intensity=_range(clip.frames),
            meta={k: v for k, v in clip.meta.items() if k not in ("frames", "height", "width")},
        )
    return info


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable, one fact per line, of :func:`inspect_path`'s dict."""
    lines = [f"path:        {info['path']}", f"kind:        {info['kind']} ({info.get('format', '?')})"]
    if info.get("reader"):
        lines.append(f"reader:      {info['reader']}")
    if "series" in info:
        lines.append(f"series:      {len(info['series'])} DICOM series in this folder (choose one by uid):")
        for s in info["series"]:
            desc = s["description"] or "no description"
            lines.append(f"  {s['uid']}  {s['modality'] or '?'}  {desc}  ({s['files']} files)")
        return "\n".join(lines)
    rng = info.get("intensity", {})
    rng_s = (
        f"{rng['min']:g} .. {rng['max']:g} (p0.5 {rng['p0.5']:g}, median {rng['median']:g}, "
        f"p99.5 {rng['p99.5']:g})"
        if rng
        else "?"
    )
    if info["kind"] == "volume":
        lines += [
            f"shape:       {' x '.join(str(s) for s in info['shape'])}",
            f"dtype:       {info['dtype']}",
            f"spacing:     {' x '.join(f'{s:g}' for s in info['spacing'])} mm",
            f"orientation: {info['orientation']}"
            + (f" (oblique by {info['oblique_deg']:g} deg)" if info.get("oblique_deg", 0) > 0.01 else ""),
            f"intensity:   {rng_s}",
        ]
    else:
        lines += [
            f"frames:      {info['frames']}",
            f"size:        {info['width']} x {info['height']} (W x H)",
            f"fps:         {info['fps']:g}",
            f"duration:    {info['duration_s']:g} s",
            f"intensity:   {rng_s} (grayscale {info['dtype']})",
        ]
    meta = info.get("meta", {})
    if meta:
        lines.append("header:")
        lines += [f"  {k}: {v}" for k, v in sorted(meta.items())]
    return "\n".join(lines)
