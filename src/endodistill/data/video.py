"""Ultrasound clip readers: video files (PyAV), multi-frame DICOM cine (pydicom), PNG folders, ``.npy``.

Every reader returns a :class:`Clip` of uint8 grayscale frames (T, H, W) and a frame rate. Broken
inputs (truncated, not a video, unsupported codec, no or a single frame) become
:class:`~endodistill.errors.InputError` with one short reason. Sizes are checked before the frame
buffer grows past :data:`MAX_BYTES`. Inputs are only ever opened for reading.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from endodistill.data.dicom import dicom_description, dicom_kind, is_dicom_file
from endodistill.data.volume import one_line
from endodistill.errors import InputError

# _LAZY: the format libraries (PyAV, pydicom, Pillow) are imported inside the reader that needs them.
# This module is imported on the torch-free paths that must start fast (reading a manifest, content
# hashes, `predict` checking its inputs and model directory) for its suffix lists and checks, which
# need none of them.

log = logging.getLogger(__name__)

#: Largest decoded frame buffer (bytes, uint8) a reader agrees to hold.
MAX_BYTES = 2 * 1024**3
#: Frame rate assumed when a source does not say (recorded in ``Clip.meta["fps_note"]``).
DEFAULT_FPS = 10.0

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".m4v", ".mkv", ".webm")
IMAGE_SUFFIXES = (".png",)
DICOM_SUFFIXES = (".dcm", ".dicom")
_READERS = {"video": "PyAV", "dicom": "pydicom cine", "png": "PIL", "npy": "numpy"}

_SAFE_DICOM_FIELDS = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "PhotometricInterpretation",
    "StudyDescription",
    "SeriesDescription",
)


@dataclass
class Clip:
    """A grayscale ultrasound clip.

    Attributes:
        frames: uint8, shape (T, H, W).
        fps: frames per second.
        source: the path the clip was read from.
        format: ``video``, ``dicom``, ``png`` or ``npy``.
        meta: technical facts only (codec, photometric interpretation, where the fps came from).
        reader: the library that read it (``PyAV``, ``pydicom cine``, ``PIL``, ``numpy``).
    """

    frames: np.ndarray
    fps: float
    source: str
    format: str
    meta: dict[str, Any] = field(default_factory=dict)
    reader: str = ""

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return float(self.frames.shape[0]) / self.fps if self.fps > 0 else 0.0


def _one_line(text: object, limit: int = 120, path: Path | None = None) -> str:
    return one_line(text, limit, path)


def clip_format(path: str | Path) -> str | None:
    """The reader that handles ``path`` (``video``, ``dicom``, ``png``, ``npy``) or None."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "png"
    if name.endswith(VIDEO_SUFFIXES):
        return "video"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(DICOM_SUFFIXES) or (p.is_file() and is_dicom_file(p)):
        return "dicom"
    return None


def load_clip(path: str | Path, max_frames: int | None = None) -> Clip:
    """Read an ultrasound clip as uint8 grayscale frames.

    Args:
        path: ``.mp4``/``.avi``/``.mov`` (any codec PyAV's FFmpeg decodes), a multi-frame DICOM cine,
            a folder of PNG frames (natural sort order; optional ``fps.txt``), or a ``.npy`` array
            (T, H, W) or (T, H, W, 3) (optional ``<name>.json`` sidecar with ``{"fps": ...}``).
        max_frames: keep only the first ``max_frames`` frames (the rest is not decoded).

    Returns:
        The :class:`Clip`.

    Raises:
        InputError: missing/unsupported/broken input, fewer than two frames, or too large.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file or folder")
    fmt = clip_format(p)
    if fmt is None:
        raise InputError(
            p, "unsupported clip format (use .mp4/.avi/.mov, a DICOM cine, a folder of PNG frames or .npy)"
        )
    if p.is_file() and p.stat().st_size == 0:
        raise InputError(p, "empty file (0 bytes)")
    if max_frames is not None and max_frames < 1:
        raise ValueError("max_frames must be >= 1")
    if fmt == "video":
        clip = _load_video(p, max_frames)
    elif fmt == "dicom":
        clip = _load_dicom_cine(p, max_frames)
    elif fmt == "png":
        clip = _load_png_folder(p, max_frames)
    else:
        clip = _load_npy(p, max_frames)
    clip.reader = clip.reader or _READERS[fmt]
    t = clip.frames.shape[0]
    if t == 0:
        raise InputError(p, "no frames")
    if t == 1 and (max_frames is None or max_frames > 1):
        raise InputError(p, "only one frame (a still image, not a clip)")
    if not np.isfinite(clip.fps) or clip.fps <= 0:
        raise InputError(p, f"invalid frame rate {clip.fps}")
    clip.meta.setdefault("frames", int(t))
    clip.meta.setdefault("height", int(clip.frames.shape[1]))
    clip.meta.setdefault("width", int(clip.frames.shape[2]))
    return clip


def _frame_budget(path: Path, h: int, w: int, max_frames: int | None) -> int:
    """How many (H, W) uint8 frames fit in :data:`MAX_BYTES` (and ``max_frames``)."""
    if h <= 0 or w <= 0:
        raise InputError(path, f"frame size {w}x{h} is empty")
    budget = MAX_BYTES // (h * w)
    if budget < 2:
        raise InputError(path, f"frames of {w}x{h} pixels exceed the {MAX_BYTES / 1024**3:.3g} GiB limit")
    return min(budget, max_frames) if max_frames is not None else budget


def _too_long(path: Path, n: int) -> InputError:
    return InputError(
        path,
        f"clip longer than {n} frames ({MAX_BYTES / 1024**3:.3g} GiB); lower tvus.max_source_frames",
    )


def to_gray_uint8(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB (any unsigned range) -> uint8 luma with ITU-R 601 weights (as PIL's ``L`` mode)."""
    a = rgb.astype(np.float32)
    y = a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114
    return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------- PyAV


def _load_video(path: Path, max_frames: int | None) -> Clip:
    import av  # on use: see _LAZY

    try:
        container = av.open(str(path), mode="r")
    except av.error.FFmpegError as e:
        raise InputError(
            path, f"not a readable video file (truncated, or not a video: {_one_line(e.strerror or e)})"
        ) from None
    except (OSError, ValueError) as e:
        raise InputError(path, f"not a readable video file ({_one_line(e)})") from None
    with container:
        if not container.streams.video:
            # An mp4 cut before its index (moov, written last) or one never given a frame looks like this.
            raise InputError(path, "no video stream in the file (truncated, empty, or not a video)")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise InputError(path, "unsupported video codec: FFmpeg has no decoder for this stream")
        codec = stream.codec_context.name
        # The header's size may be unknown (0) when the file is damaged: then the first frame decides.
        h, w = int(stream.codec_context.height), int(stream.codec_context.width)
        budget = _frame_budget(path, h, w, max_frames) if h > 0 and w > 0 else None
        declared = int(stream.frames or 0)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        meta: dict[str, Any] = {"codec": codec, "container": container.format.name}
        fps = float(rate) if rate else 0.0
        if not fps or not np.isfinite(fps):
            fps = DEFAULT_FPS
            meta["fps_note"] = f"no frame rate in the file; assumed {DEFAULT_FPS:g} fps"
        else:
            meta["fps_source"] = "stream average_rate"
        frames: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                if budget is None:
                    h, w = int(frame.height), int(frame.width)
                    budget = _frame_budget(path, h, w, max_frames)
                if len(frames) >= budget:
                    if max_frames is not None and len(frames) >= max_frames:
                        break
                    raise _too_long(path, budget)
                g = frame.to_ndarray(format="gray")
                if g.shape != (h, w):
                    raise InputError(path, f"frame size changes mid-clip ({g.shape[1]}x{g.shape[0]})")
                frames.append(g)
        except av.error.FFmpegError as e:
            raise InputError(
                path,
                f"truncated or corrupt video: decoding failed after {len(frames)} frame(s) "
                f"({_one_line(e.strerror or e, 60)})",
            ) from None
    limited = max_frames is not None and len(frames) >= max_frames
    if declared and not limited and len(frames) < declared:
        raise InputError(path, f"truncated video: decoded {len(frames)} of {declared} frames")
    arr = np.stack(frames) if frames else np.zeros((0, max(h, 0), max(w, 0)), dtype=np.uint8)
    return Clip(frames=arr, fps=fps, source=str(path), format="video", meta=meta)


# ---------------------------------------------------------------------------------------- DICOM


def _dicom_fps(ds: Any) -> tuple[float | None, str]:
    for key in ("FrameTime",):
        v = ds.get(key)
        if v not in (None, "") and float(v) > 0:
            return 1000.0 / float(v), f"{key} {float(v):g} ms"
    v = ds.get("FrameTimeVector")
    if v not in (None, ""):
        vals = [float(x) for x in (v if isinstance(v, list | tuple) or hasattr(v, "__iter__") else [v])]
        vals = [x for x in vals[1:] if x > 0]  # the first entry is 0 by definition
        if vals:
            return 1000.0 / float(np.mean(vals)), "FrameTimeVector"
    for key in ("CineRate", "RecommendedDisplayFrameRate"):
        v = ds.get(key)
        if v not in (None, "") and float(v) > 0:
            return float(v), key
    return None, ""


def _load_dicom_cine(path: Path, max_frames: int | None) -> Clip:
    import pydicom  # on use: see _LAZY
    from pydicom.errors import InvalidDicomError  # on use: see _LAZY
    from pydicom.pixels import apply_color_lut, convert_color_space  # on use: see _LAZY

    try:
        ds = pydicom.dcmread(path, defer_size=4096)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(path, f"not a readable DICOM file ({_one_line(e, 80, path)})") from None
    if dicom_kind(ds) == "volume":
        raise InputError(
            path, f"{dicom_description(ds)}, not an ultrasound cine clip (read it as an MRI volume)"
        )
    if "PixelData" not in ds:
        raise InputError(path, "no pixel data in this DICOM file")
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    except (AttributeError, TypeError, ValueError):
        raise InputError(path, "missing or malformed Rows/Columns/NumberOfFrames") from None
    if n_frames < 2:
        raise InputError(path, "only one frame (a still image, not a cine clip)")
    budget = _frame_budget(path, rows, cols * max(spp, 1), max_frames)
    if n_frames > budget and max_frames is None:
        raise _too_long(path, budget)
    keep = min(n_frames, budget)
    try:
        # raw=True: we do the colour-space conversion ourselves, explicitly, per photometric interpretation.
        if keep < n_frames:
            arr = np.stack([pydicom.pixels.pixel_array(ds, index=i, raw=True) for i in range(keep)])
        else:
            arr = pydicom.pixels.pixel_array(ds, raw=True)
    except Exception as e:  # decoders raise many types; all mean "this pixel data cannot be decoded"
        raise InputError(path, f"truncated or undecodable pixel data ({_one_line(e, 100, path)})") from None
    if arr.ndim == (2 if spp == 1 else 3):  # a single frame came back without its frame axis
        arr = arr[None]
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        bits = int(np.ceil(np.log2(float(rgb.max()) + 1))) if rgb.size and rgb.max() > 0 else 8
        # The LUT entries may be 8- or 16-bit; bring them to 0..255 before the luma weights.
        gray = to_gray_uint8(rgb.astype(np.float32) / 256.0) if bits > 8 else to_gray_uint8(rgb)
    elif pi in ("YBR_FULL", "YBR_FULL_422"):
        gray = to_gray_uint8(convert_color_space(arr, pi, "RGB", per_frame=True))
    elif pi.startswith("YBR"):  # YBR_ICT/RCT/PARTIAL: the first plane is luma already
        gray = np.clip(arr[..., 0], 0, 255).astype(np.uint8)
    elif spp == 3:
        gray = to_gray_uint8(arr)
    else:
        bits_stored = int(ds.get("BitsStored", 8) or 8)
        a = arr.astype(np.float32)
        if int(ds.get("PixelRepresentation", 0) or 0):
            a = a + 2 ** (bits_stored - 1)  # signed -> 0-based
        if bits_stored > 8:
            a = a * (255.0 / (2**bits_stored - 1))
        if pi == "MONOCHROME1":  # low values are bright: invert so that bright means echo
            a = 255.0 - a
        gray = np.clip(np.floor(a + 0.5), 0, 255).astype(np.uint8)
    if gray.shape[1:] != (rows, cols):
        raise InputError(path, f"decoded frames {gray.shape[1:]} do not match Rows/Columns {rows}x{cols}")
    fps, fps_src = _dicom_fps(ds)
    meta: dict[str, Any] = {"transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", ""))}
    for key in _SAFE_DICOM_FIELDS:
        if ds.get(key) not in (None, ""):
            meta[key] = str(ds.get(key))
    if fps is None:
        fps = DEFAULT_FPS
        meta["fps_note"] = f"no FrameTime/CineRate/RecommendedDisplayFrameRate; assumed {DEFAULT_FPS:g} fps"
    else:
        meta["fps_source"] = fps_src
    return Clip(
        frames=np.ascontiguousarray(gray), fps=float(fps), source=str(path), format="dicom", meta=meta
    )


# ----------------------------------------------------------------------------------- PNG folder


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _load_png_folder(folder: Path, max_frames: int | None) -> Clip:
    from PIL import Image, UnidentifiedImageError  # on use: see _LAZY

    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: _natural_key(p.name),
    )
    if not files:
        raise InputError(folder, "no PNG frames in this folder")
    meta: dict[str, Any] = {"n_files": len(files)}
    fps_file = folder / "fps.txt"
    if fps_file.is_file():
        try:
            fps = float(fps_file.read_text(encoding="utf-8").strip())
        except (ValueError, UnicodeDecodeError):
            raise InputError(fps_file, "fps.txt must hold one positive number") from None
        if not np.isfinite(fps) or fps <= 0:
            raise InputError(fps_file, "fps.txt must hold one positive number")
        meta["fps_source"] = "fps.txt"
    else:
        fps = DEFAULT_FPS
        meta["fps_note"] = f"no fps.txt; assumed {DEFAULT_FPS:g} fps"
    frames: list[np.ndarray] = []
    budget: int | None = None
    for f in files:
        if max_frames is not None and len(frames) >= max_frames:
            break
        try:
            with Image.open(f) as im:
                # Header first: size known before the pixels are decoded.
                if budget is None:
                    budget = _frame_budget(f, im.height, im.width, max_frames)
                if len(frames) >= budget:
                    raise _too_long(folder, budget)
                g = np.asarray(im.convert("L"), dtype=np.uint8)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
            raise InputError(f, f"not a readable PNG frame ({_one_line(e, 80, f)})") from None
        if frames and g.shape != frames[0].shape:
            raise InputError(
                f,
                f"frame size {g.shape[1]}x{g.shape[0]} differs from {frames[0].shape[1]}x{frames[0].shape[0]}",
            )
        frames.append(g)
    return Clip(frames=np.stack(frames), fps=fps, source=str(folder), format="png", meta=meta)


# ------------------------------------------------------------------------------------------ npy


def _load_npy(path: Path, max_frames: int | None) -> Clip:
    with open(path, "rb") as fh:
        if fh.read(6) != b"\x93NUMPY":
            raise InputError(path, "not a readable .npy file (no NumPy magic header)")
    try:
        # mmap: the header (shape, dtype) is checked before anything is read into memory.
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        low = str(e).lower()
        pickled = "pickle" in low or "python objects" in low
        msg = "holds Python objects that need pickle; refused" if pickled else _one_line(e, 80, path)
        raise InputError(path, f"not a usable .npy array ({msg})") from None
    except (OSError, EOFError) as e:
        raise InputError(path, f"not a readable .npy file ({_one_line(e, 80, path)})") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(path, "not a single .npy array")
    if arr.ndim == 4 and arr.shape[-1] in (3, 4):
        rgb = True
    elif arr.ndim == 3:
        rgb = False
    else:
        raise InputError(path, f"array shape {arr.shape}; a clip must be (T, H, W) or (T, H, W, 3)")
    if arr.dtype.kind not in "uifb":
        raise InputError(path, f"unsupported dtype {arr.dtype}")
    t, h, w = (int(s) for s in arr.shape[:3])
    budget = _frame_budget(path, h, w * (3 if rgb else 1), max_frames)
    if t > budget and max_frames is None:
        raise _too_long(path, budget)
    a = np.asarray(arr[: min(t, budget)])
    meta: dict[str, Any] = {"dtype": str(arr.dtype)}
    if a.dtype != np.uint8:
        f = a.astype(np.float32)
        if not np.all(np.isfinite(f)):
            raise InputError(path, "NaN/inf values in the array")
        if a.dtype.kind == "f" and f.size and f.min() >= 0.0 and f.max() <= 1.0:
            f = f * 255.0
        elif f.size and (f.min() < 0 or f.max() > 255):
            lo, hi = float(f.min()), float(f.max())
            f = (f - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(f)
            meta["intensity_note"] = f"values {lo:g}..{hi:g} rescaled to 0..255"
        a = np.clip(np.floor(f + 0.5), 0, 255).astype(np.uint8)
    gray = to_gray_uint8(a[..., :3]) if rgb else a
    sidecar = path.with_suffix(".json")
    fps = DEFAULT_FPS
    if sidecar.is_file():
        try:
            fps = float(json.loads(sidecar.read_text(encoding="utf-8"))["fps"])
            meta["fps_source"] = sidecar.name
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise InputError(sidecar, 'sidecar must be JSON like {"fps": 10}') from None
    else:
        meta["fps_note"] = f"no {sidecar.name} sidecar; assumed {DEFAULT_FPS:g} fps"
    return Clip(frames=np.ascontiguousarray(gray), fps=fps, source=str(path), format="npy", meta=meta)
