"""Reading and validating the cohort manifest (``manifest.csv``).

A manifest is a UTF-8 csv with one row per image file and the columns ``subject_id,modality,path,label``
(more columns are kept in :attr:`Record.extra`, e.g. ``site`` or ``series_uid``). ``path`` is absolute or
relative to the manifest's folder (``data.restrict_paths`` confines it to that folder); ``label`` is an
integer class ``0..K-1`` or empty for an unlabelled case.

:func:`read_manifest` stops at the first structural problem (for the training code, which needs a
usable manifest); :func:`validate_manifest` reports every problem it can find at once (for the
``endodistill validate`` command), including cohort-level ones such as leakage between subjects.
Neither ever writes to the manifest or to the files it names.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from endodistill.config import Config
from endodistill.data.mri import file_sha256, load_volume
from endodistill.data.video import load_clip
from endodistill.errors import InputError

REQUIRED_COLUMNS: tuple[str, ...] = ("subject_id", "modality", "path", "label")
# A real cohort manifest is a few MB at most; anything far larger is a mistake (or hostile) and is
# refused from its size alone, before a byte is parsed.
MAX_MANIFEST_BYTES = 50 * 1024 * 1024
MAX_MANIFEST_ROWS = 1_000_000
# Voxel spacing (mm) outside this range is a broken header rather than a real pelvic MRI.
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 20.0


@dataclass
class Record:
    """One row of the manifest: one image file (or DICOM series folder) of one subject."""

    subject_id: str
    modality: str
    path: Path
    label: int | None
    extra: dict[str, str] = field(default_factory=dict)
    row: int = 0

    @property
    def series_uid(self) -> str | None:
        """The DICOM SeriesInstanceUID chosen for a folder holding several series, if any."""
        return self.extra.get("series_uid") or None


@dataclass
class Manifest:
    """A parsed manifest: its own path and its records in file order."""

    path: Path
    records: list[Record]

    def select(self, modality: str | None = None, labelled: bool | None = None) -> list[Record]:
        """Records of one modality and/or labelling state.

        Args:
            modality: keep only this modality (None keeps all).
            labelled: True keeps labelled records, False unlabelled ones, None both.

        Returns:
            The matching records, in file order.
        """
        out = []
        for r in self.records:
            if modality is not None and r.modality != modality:
                continue
            if labelled is not None and (r.label is not None) != labelled:
                continue
            out.append(r)
        return out

    def subjects(self) -> list[str]:
        """Distinct subject ids, in order of first appearance."""
        return list(dict.fromkeys(r.subject_id for r in self.records))


@dataclass
class Problem:
    """One problem found by :func:`validate_manifest`: where it is and what is wrong."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


class _RowError(Exception):
    """A problem confined to one row (the row is skipped by the lenient parser)."""

    def __init__(self, row: int, reason: str) -> None:
        super().__init__(reason)
        self.row = row
        self.reason = reason


def _open_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line, fields)`` for every non-blank csv row, header included, streaming the file.

    Raises:
        InputError: not a file, too large, not UTF-8, malformed csv or too many rows.
    """
    if not path.exists():
        raise InputError(path, "manifest not found")
    if not path.is_file():
        raise InputError(path, "manifest is not a file")
    size = path.stat().st_size
    if size == 0:
        raise InputError(path, "manifest is empty")
    if size > MAX_MANIFEST_BYTES:
        raise InputError(
            path, f"manifest is {size / 2**20:.0f} MB, more than the {MAX_MANIFEST_BYTES // 2**20} MB limit"
        )
    # utf-8-sig: spreadsheet programs often prepend a byte-order mark that would corrupt the first column.
    try:
        fh = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - closed in finally
    except OSError as e:
        raise InputError(path, f"cannot open manifest ({e.strerror or type(e).__name__})") from None
    reader = csv.reader(fh)
    line = 0
    n = 0
    try:
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise InputError(path, f"not UTF-8 text (near line {reader.line_num + 1})") from None
            except csv.Error as e:
                raise InputError(path, f"line {reader.line_num}: malformed csv ({e})") from None
            line = reader.line_num
            if not fields or all(not f.strip() for f in fields):
                continue
            n += 1
            if n > MAX_MANIFEST_ROWS + 1:
                raise InputError(path, f"manifest has more than {MAX_MANIFEST_ROWS} rows")
            yield line, fields
    finally:
        fh.close()


def _parse_header(path: Path, fields: list[str]) -> list[str]:
    names = [f.strip() for f in fields]
    if len(names) == 1 and any(sep in names[0] for sep in (";", "\t", "|")):
        raise InputError(path, "columns must be separated by commas (found ';', tab or '|' in the header)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(path, f"duplicate column(s) in header: {', '.join(dup)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise InputError(
            path,
            f"missing column(s) {', '.join(missing)} (header has: {', '.join(names) or 'nothing'}; "
            f"expected {','.join(REQUIRED_COLUMNS)})",
        )
    return names


def _parse_label(raw: str, num_classes: int, row: int) -> int | None:
    raw = raw.strip()
    if raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        # Spreadsheets and pandas often write integers as "1.0"; accept exact integers only.
        try:
            f = float(raw)
        except ValueError:
            f = math.nan
        if not (math.isfinite(f) and f == int(f)):
            raise _RowError(row, f"label {raw!r} is not one of 0..{num_classes - 1} or empty") from None
        value = int(f)
    if not 0 <= value < num_classes:
        raise _RowError(row, f"label {raw!r} is not one of 0..{num_classes - 1} or empty")
    return value


def _resolve_path(base: Path, raw: str, restrict: bool, row: int) -> Path:
    raw = raw.strip()
    if not raw:
        raise _RowError(row, "empty path")
    if any(ord(c) < 32 for c in raw):
        raise _RowError(row, f"path {raw!r} contains control characters")
    p = Path(raw)
    if restrict:
        # Checked on the text, not on the resolved path: a restricted manifest must not reach files outside
        # its folder, while a symbolic link the user placed inside the folder (e.g. to a data disk) is fine.
        if p.is_absolute():
            raise _RowError(row, f"absolute path {raw!r} refused (data.restrict_paths is set)")
        norm = os.path.normpath(raw)
        if norm == ".." or norm.startswith(".." + os.sep):
            raise _RowError(
                row, f"path {raw!r} points outside the manifest's folder (data.restrict_paths is set)"
            )
    return (base / p).resolve()


def _parse_row(
    base: Path, names: list[str], fields: list[str], line: int, restrict: bool, num_classes: int
) -> Record:
    if len(fields) != len(names):
        raise _RowError(line, f"has {len(fields)} fields, the header has {len(names)}")
    values = dict(zip(names, (f.strip() for f in fields)))
    sid = values["subject_id"]
    if not sid:
        raise _RowError(line, "empty subject_id")
    if any(ord(c) < 32 or ord(c) == 127 for c in sid):
        # A NUL or newline in an id ends up in file names, csv rows and reports.
        raise _RowError(line, f"subject_id {sid!r} contains control characters")
    modality = values["modality"].lower()
    if not modality:
        raise _RowError(line, "empty modality")
    try:
        label = _parse_label(values["label"], num_classes, line)
    except _RowError as e:
        raise _RowError(line, f"subject {sid!r}: {e.reason}") from None
    path = _resolve_path(base, values["path"], restrict, line)
    extra = {k: v for k, v in values.items() if k not in REQUIRED_COLUMNS}
    return Record(subject_id=sid, modality=modality, path=path, label=label, extra=extra, row=line)


def _parse(
    path: str | Path, restrict: bool, num_classes: int, row_problems: list[_RowError] | None
) -> Manifest:
    """Parse a manifest; row errors raise unless ``row_problems`` collects them (lenient mode)."""
    path = Path(path)
    # The base folder is the manifest's folder as the user named it (absolute, symlinks kept), so that
    # relative paths mean what they look like.
    base = path.absolute().parent
    rows = _open_rows(path)
    try:
        _, header = next(rows)
    except StopIteration:
        raise InputError(path, "manifest is empty (no header)") from None
    names = _parse_header(path, header)
    records: list[Record] = []
    for line, fields in rows:
        try:
            records.append(_parse_row(base, names, fields, line, restrict, num_classes))
        except _RowError as e:
            if row_problems is None:
                raise InputError(f"{path}:{e.row}", e.reason) from None
            row_problems.append(e)
    if not records and not row_problems:
        raise InputError(path, "manifest has a header but no rows")
    return Manifest(path=path, records=records)


def read_manifest(path: str | Path, restrict_paths: bool = False, num_classes: int = 2) -> Manifest:
    """Read a manifest, stopping at the first structural problem.

    Args:
        path: the manifest csv.
        restrict_paths: refuse absolute paths and paths leaving the manifest's folder
            (config ``data.restrict_paths``; by default both are accepted).
        num_classes: labels must be integers in ``0..num_classes-1`` (or empty).

    Returns:
        The manifest with absolute, resolved record paths.

    Raises:
        InputError: missing or unreadable file, non-UTF-8 text, missing columns, too large, or a bad row
            (named as ``MANIFEST:LINE``).
    """
    return _parse(path, restrict_paths, num_classes, None)


# ----------------------------------------------------------------------------------------- validation


def _where(manifest: Path, *rows: int) -> str:
    return f"{manifest}:{','.join(str(r) for r in sorted(set(rows)))}" if rows else str(manifest)


def _rel(rec: Record, base: Path) -> str:
    try:
        return rec.path.relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(rec.path)


def _check_volume(rec: Record) -> list[str]:
    """Decode one MRI and return what is wrong with it (empty when usable)."""
    vol = load_volume(rec.path, series_uid=rec.series_uid)
    arr = vol.array
    reasons: list[str] = []
    shape = tuple(int(s) for s in arr.shape)
    if arr.ndim != 3:
        return [f"not a 3D volume (shape {shape})"]
    if min(shape) < 2:
        return [f"a 2D image, not a volume (shape {shape})"]
    finite = np.isfinite(arr)
    n_bad = int(arr.size - np.count_nonzero(finite))
    if n_bad:
        reasons.append(f"{n_bad} NaN/inf voxel(s)")
    if n_bad < arr.size:
        vals = arr[finite] if n_bad else arr
        lo, hi = float(vals.min()), float(vals.max())
        if lo == hi:
            reasons.append(f"constant volume (every voxel is {lo:g})")
    affine = np.asarray(vol.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        reasons.append("invalid affine (not a finite 4x4 matrix)")
    else:
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        if (spacing < MIN_SPACING_MM).any() or (spacing > MAX_SPACING_MM).any():
            sp = " x ".join(f"{s:g}" for s in spacing)
            reasons.append(
                f"absurd voxel spacing {sp} mm (expected {MIN_SPACING_MM:g}..{MAX_SPACING_MM:g} mm)"
            )
    return reasons


def _check_clip(rec: Record, cfg: Config) -> list[str]:
    """Decode one ultrasound clip and return what is wrong with it (empty when usable)."""
    # The pipeline itself never decodes more than max_source_frames, so neither does the check.
    clip = load_clip(rec.path, max_frames=cfg.tvus.max_source_frames)
    frames = clip.frames
    shape = tuple(int(s) for s in frames.shape)
    if frames.ndim != 3:
        return [f"not a clip of grayscale frames (shape {shape})"]
    t = shape[0]
    if t == 0:
        return ["clip has no frames"]
    if t == 1:
        return ["a single frame, not a clip"]
    reasons: list[str] = []
    if t < cfg.tvus.frames:
        reasons.append(f"clip has {t} frames, fewer than the {cfg.tvus.frames} sampled (tvus.frames)")
    if int(frames.min()) == int(frames.max()):
        reasons.append(f"blank clip (every pixel is {int(frames.min())})")
    if cfg.tvus.fps is not None and not (math.isfinite(clip.fps) and clip.fps > 0):
        reasons.append(f"no usable frame rate ({clip.fps}) but tvus.fps={cfg.tvus.fps:g} resampling is set")
    return reasons


def _decode_problems(rec: Record, cfg: Config, student: str, teacher: str) -> list[str]:
    try:
        if rec.modality == student:
            return _check_volume(rec)
        if rec.modality == teacher:
            return _check_clip(rec, cfg)
    except InputError as e:
        # A DICOM folder's error may name one file inside it: keep that name.
        inner = f" ({Path(e.path).name})" if e.path and Path(e.path) != rec.path else ""
        return [f"cannot load{inner}: {e.reason}"]
    except MemoryError:
        return ["cannot load: too large to fit in memory"]
    except Exception as e:  # a reader bug or an exotic file must not hide the other problems
        first_line = next(iter(str(e).splitlines()), "")
        return [f"cannot load: unexpected {type(e).__name__} ({first_line[:160]})"]
    return []


def validate_manifest(path: str | Path, cfg: Config | None = None, decode: bool = True) -> list[Problem]:
    """Check a manifest and the files it names, reporting every problem at once.

    Checks rows (columns, labels, paths inside the manifest's folder with ``data.restrict_paths``), files (present, non-empty),
    leakage (duplicate rows, a subject with conflicting labels, one file or identical content under
    several subjects), the cohort (labelled student cases, every class in the teacher's labelled set)
    and, with ``decode``, each file's content (decodes, dimensionality, NaN/inf, constant, spacing,
    clip length). Files are decoded one at a time so memory stays bounded.

    Args:
        path: the manifest csv.
        cfg: gives the modalities (task.student_modality/teacher_modality), the number of classes,
            ``data.restrict_paths`` and ``tvus.frames``; defaults when None.
        decode: also decode every file (slower; catches broken files).

    Returns:
        The problems, each naming the manifest and row(s) and the file or subject; empty when clean.
    """
    cfg = cfg or Config()
    path = Path(path)
    k = cfg.task.num_classes
    student, teacher = cfg.task.student_modality.lower(), cfg.task.teacher_modality.lower()
    row_errors: list[_RowError] = []
    try:
        manifest = _parse(path, cfg.data.restrict_paths, k, row_errors)
    except InputError as e:
        return [Problem(e.path or str(path), e.reason)]
    problems = [Problem(_where(path, e.row), e.reason) for e in row_errors]
    base = path.absolute().parent

    # Per-row checks on the file itself.
    usable: list[Record] = []
    for rec in manifest.records:
        rel = _rel(rec, base)
        if rec.modality not in (student, teacher):
            problems.append(
                Problem(
                    _where(path, rec.row),
                    f"{rel}: unknown modality {rec.modality!r} (known: {student}, {teacher})",
                )
            )
        if not rec.path.exists():
            problems.append(Problem(_where(path, rec.row), f"{rel}: file not found"))
            continue
        if rec.path.is_file() and rec.path.stat().st_size == 0:
            problems.append(Problem(_where(path, rec.row), f"{rel}: empty file (0 bytes)"))
            continue
        if rec.path.is_dir() and next(rec.path.iterdir(), None) is None:
            problems.append(Problem(_where(path, rec.row), f"{rel}: empty folder"))
            continue
        usable.append(rec)

    # Leakage: the same row twice, one file under two subjects, and identical content under two subjects.
    first_row: dict[tuple[Path, str | None], Record] = {}
    for rec in manifest.records:
        key = (rec.path, rec.series_uid)
        prev = first_row.setdefault(key, rec)
        if prev is rec:
            continue
        rel = _rel(rec, base)
        if prev.subject_id == rec.subject_id:
            problems.append(
                Problem(
                    _where(path, prev.row, rec.row),
                    f"{rel}: duplicate row for subject {rec.subject_id!r} (rows {prev.row} and {rec.row})",
                )
            )
        else:
            problems.append(
                Problem(
                    _where(path, prev.row, rec.row),
                    f"{rel}: the same file is listed under subjects {prev.subject_id!r} (row {prev.row}) "
                    f"and {rec.subject_id!r} (row {rec.row})",
                )
            )
    by_hash: dict[str, Record] = {}
    hashed: set[Path] = set()
    for rec in usable:
        if rec.path in hashed:  # the same path was already compared above
            continue
        hashed.add(rec.path)
        try:
            digest = file_sha256(rec.path)
        except OSError as e:
            problems.append(
                Problem(_where(path, rec.row), f"{_rel(rec, base)}: cannot read ({e.strerror or e})")
            )
            continue
        prev = by_hash.setdefault(digest, rec)
        if prev is not rec and prev.subject_id != rec.subject_id:
            problems.append(
                Problem(
                    _where(path, prev.row, rec.row),
                    f"{_rel(rec, base)} has the same content as {_rel(prev, base)}, under different subjects "
                    f"{rec.subject_id!r} and {prev.subject_id!r} (a leaked or mislabelled copy)",
                )
            )

    # Subjects: one ground truth per subject, across all its files and modalities.
    labels: dict[str, dict[int, int]] = defaultdict(dict)
    for rec in manifest.records:
        if rec.label is not None:
            labels[rec.subject_id].setdefault(rec.label, rec.row)
    for sid, seen in labels.items():
        if len(seen) > 1:
            desc = ", ".join(f"{lab} (row {row})" for lab, row in sorted(seen.items()))
            problems.append(
                Problem(_where(path, *seen.values()), f"subject {sid!r} has conflicting labels {desc}")
            )

    # Cohort: the student needs labelled cases of every class; label-matched distillation needs a
    # teacher case of every class.
    for modality, role in ((student, "student"), (teacher, "teacher")):
        present = {r.label for r in manifest.select(modality, labelled=True)}
        if not present:
            problems.append(
                Problem(str(path), f"no labelled {modality!r} case ({role} modality; every class is needed)")
            )
            continue
        missing = [c for c in range(k) if c not in present]
        if missing:
            why = (
                "label-matched distillation is impossible"
                if role == "teacher"
                else "the classifier cannot be trained or evaluated"
            )
            problems.append(
                Problem(
                    str(path),
                    f"class(es) {', '.join(map(str, missing))} missing from the labelled {modality!r} set "
                    f"({why})",
                )
            )

    if decode:
        for rec in usable:
            for reason in _decode_problems(rec, cfg, student, teacher):
                problems.append(Problem(_where(path, rec.row), f"{_rel(rec, base)}: {reason}"))
    return problems
