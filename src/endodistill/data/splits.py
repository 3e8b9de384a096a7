"""Leakage-safe cohort splits: the subject is the unit of every split.

Folds and hold-outs are drawn over unique subjects (scikit-learn's ``StratifiedGroupKFold`` and
``train_test_split``), so all files of one subject (its MRI and, when paired, its TVUS clips) always land
on the same side. Splits are saved as an editable nnU-Net-like ``splits.json``::

    [{"train": ["s01", ...], "val": [...], "test": [...]}, ...]

and :func:`load_splits` refuses a (hand-edited) file in which a subject leaks between sides of a fold or
between the test sets of two folds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from endodistill.data.manifest import Record
from endodistill.errors import InputError
from endodistill.utils import atomic_write_json

log = logging.getLogger(__name__)

SIDES: tuple[str, ...] = ("train", "val", "test")
MAX_SPLITS_BYTES = 50 * 1024 * 1024


def subject_labels(subject_ids: Sequence[str], labels: Sequence[int]) -> dict[str, int]:
    """One label per subject, from per-file (possibly repeated) subject ids and labels.

    Args:
        subject_ids: subject of each entry (a subject may repeat).
        labels: the label of each entry.

    Returns:
        ``{subject: label}`` sorted by subject id, so that results do not depend on input order.

    Raises:
        InputError: lengths differ, a label is missing, or a subject has two different labels.
    """
    if len(subject_ids) != len(labels):
        raise InputError(None, f"{len(subject_ids)} subject ids but {len(labels)} labels")
    out: dict[str, int] = {}
    for sid, lab in zip(subject_ids, labels):
        if lab is None:
            raise InputError(None, f"subject {sid!r} has no label; splits need labelled subjects")
        lab = int(lab)
        prev = out.setdefault(str(sid), lab)
        if prev != lab:
            raise InputError(None, f"subject {sid!r} has conflicting labels {prev} and {lab}")
    return dict(sorted(out.items()))


def stratified_group_folds(
    subject_ids: Sequence[str], labels: Sequence[int], k: int, seed: int
) -> list[list[str]]:
    """Split subjects into ``k`` stratified folds.

    Args:
        subject_ids: subject of each entry (repeats allowed; one subject is one unit).
        labels: label of each entry.
        k: number of folds (>= 2, <= number of subjects).
        seed: shuffling seed (same seed and cohort -> same folds, whatever the input order).

    Returns:
        The test subjects of each fold (sorted); every subject appears in exactly one fold.

    Raises:
        InputError: conflicting labels, or fewer subjects than folds.
    """
    per_subject = subject_labels(subject_ids, labels)
    subjects = list(per_subject)
    if k < 2:
        raise InputError(None, f"cross-validation needs at least 2 folds, got {k}")
    if len(subjects) < k:
        raise InputError(None, f"{k} folds need at least {k} labelled subjects, got {len(subjects)}")
    y = np.array([per_subject[s] for s in subjects])
    counts = np.bincount(y)
    if counts[counts > 0].min() < k:
        log.warning("a class has fewer than %d subjects: some folds will miss it", k)
    # Groups are the subjects themselves: after de-duplication each group is one row, and using the
    # grouped splitter keeps the "a subject never straddles folds" guarantee explicit.
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    for _, test_idx in sgkf.split(np.zeros(len(subjects)), y, groups=np.array(subjects)):
        folds.append(sorted(subjects[i] for i in test_idx))
    return folds


def holdout_split(
    subject_ids: Sequence[str], labels: Sequence[int], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Hold out a share of subjects, stratified by label when every class allows it.

    Args:
        subject_ids: subject of each entry (repeats allowed).
        labels: label of each entry.
        fraction: share of subjects held out (0 < fraction < 1; at least one subject on each side).
        seed: shuffling seed.

    Returns:
        ``(train, test)`` sorted subject lists, disjoint, covering every subject.

    Raises:
        InputError: conflicting labels, fewer than 2 subjects, or a fraction outside (0, 1).
    """
    if not 0 < fraction < 1:
        raise InputError(None, f"hold-out fraction must be between 0 and 1, got {fraction}")
    per_subject = subject_labels(subject_ids, labels)
    subjects = list(per_subject)
    n = len(subjects)
    if n < 2:
        raise InputError(None, f"a hold-out split needs at least 2 labelled subjects, got {n}")
    n_test = min(n - 1, max(1, round(fraction * n)))
    y = [per_subject[s] for s in subjects]
    try:
        train, test = train_test_split(subjects, test_size=n_test, stratify=y, random_state=seed)
    except ValueError:
        # A class with a single subject (or fewer test slots than classes) cannot be stratified.
        log.warning("hold-out split: a class is too small to stratify; splitting without stratification")
        train, test = train_test_split(subjects, test_size=n_test, random_state=seed)
    return sorted(train), sorted(test)


def inner_val_split(
    train_ids: Sequence[str], labels: Sequence[int], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Carve a validation set (for model selection) out of the training subjects of a fold.

    Args:
        train_ids: training subjects of the fold (repeats allowed).
        labels: their labels.
        fraction: share of subjects for validation; 0 gives no validation set.
        seed: shuffling seed.

    Returns:
        ``(train, val)`` sorted subject lists; ``val`` is empty when fraction is 0 or there are fewer
        than 2 subjects.
    """
    per_subject = subject_labels(train_ids, labels)
    if fraction <= 0 or len(per_subject) < 2:
        return list(per_subject), []
    return holdout_split(list(per_subject), list(per_subject.values()), fraction, seed)


def make_cv_splits(
    subject_ids: Sequence[str],
    labels: Sequence[int],
    k: int,
    seed: int,
    val_fraction: float = 0.0,
    train_fraction: float = 1.0,
) -> list[dict[str, list[str]]]:
    """Full cross-validation splits: test folds, and a stratified validation set inside each training part.

    Args:
        subject_ids: subject of each entry (repeats allowed).
        labels: label of each entry.
        k: number of folds.
        seed: seed of the folds; fold ``f``'s validation split uses ``seed + f``.
        val_fraction: share of each training part kept for validation (0: none).
        train_fraction: share of each training part kept at all (stratified, seed ``seed + k + f``); the
            others are in no list of that fold. The test folds do not depend on it.

    Returns:
        ``[{"train": [...], "val": [...], "test": [...]}, ...]``, one dict per fold (checked leak-free).
    """
    if not 0 < train_fraction <= 1:
        raise InputError(None, f"train fraction must be in (0, 1], got {train_fraction}")
    per_subject = subject_labels(subject_ids, labels)
    folds = stratified_group_folds(list(per_subject), list(per_subject.values()), k, seed)
    splits = []
    for f, test in enumerate(folds):
        held = set(test)
        rest = [s for s in per_subject if s not in held]
        if train_fraction < 1 and len(rest) > 1:
            # A seed apart from the validation split's, so the kept subjects do not follow its draw.
            _, rest = holdout_split(rest, [per_subject[s] for s in rest], train_fraction, seed + k + f)
        train, val = inner_val_split(rest, [per_subject[s] for s in rest], val_fraction, seed + f)
        splits.append({"train": train, "val": val, "test": list(test)})
    check_splits(splits)
    return splits


def check_splits(splits: Any, where: str | Path | None = None) -> list[dict[str, list[str]]]:
    """Check the structure of splits and that no subject leaks.

    Every fold is a mapping with a ``train`` list and optional ``val``/``test`` lists of non-empty
    subject-id strings; within a fold the three sides are disjoint, and no subject is in the test set of
    two folds.

    Args:
        splits: the parsed splits.
        where: the file the splits come from (named in errors).

    Returns:
        The splits normalised to dicts with all three keys.

    Raises:
        InputError: naming the fold and the leaking subject.
    """
    if not isinstance(splits, list) or not splits:
        raise InputError(where, "splits must be a non-empty list of folds")
    out: list[dict[str, list[str]]] = []
    test_fold: dict[str, int] = {}
    for f, fold in enumerate(splits):
        if not isinstance(fold, Mapping):
            raise InputError(where, f"fold {f} is not a mapping of train/val/test lists")
        unknown = sorted(set(fold) - set(SIDES))
        if unknown:
            raise InputError(
                where, f"fold {f}: unknown key(s) {', '.join(map(str, unknown))} (use train, val, test)"
            )
        if "train" not in fold:
            raise InputError(where, f"fold {f}: no 'train' list")
        norm: dict[str, list[str]] = {}
        side_of: dict[str, str] = {}
        for side in SIDES:
            ids = fold.get(side, [])
            if not isinstance(ids, list) or not all(isinstance(s, str) and s.strip() for s in ids):
                raise InputError(where, f"fold {f}: '{side}' must be a list of non-empty subject ids")
            for sid in ids:
                if sid in side_of:
                    what = "twice in" if side_of[sid] == side else f"in both {side_of[sid]} and"
                    raise InputError(where, f"fold {f}: subject {sid!r} is {what} {side}")
                side_of[sid] = side
            norm[side] = list(ids)
        if not norm["train"]:
            raise InputError(where, f"fold {f}: empty 'train' list")
        for sid in norm["test"]:
            prev = test_fold.setdefault(sid, f)
            if prev != f:
                raise InputError(where, f"subject {sid!r} is in the test set of folds {prev} and {f}")
        out.append(norm)
    return out


def check_splits_subjects(
    splits: list[dict[str, list[str]]], known: Iterable[str], where: str | Path | None = None
) -> None:
    """Check that splits only name subjects of the cohort (e.g. a splits.json against the manifest).

    Raises:
        InputError: naming the first unknown subject and its fold.
    """
    known_set = set(known)
    for f, fold in enumerate(splits):
        for side in SIDES:
            for sid in fold.get(side, []):
                if sid not in known_set:
                    raise InputError(where, f"fold {f}: {side} subject {sid!r} is not in the cohort")


def save_splits(path: str | Path, splits: list[dict[str, list[str]]]) -> None:
    """Write splits as JSON, atomically, after checking them for leaks.

    Args:
        path: the splits.json to write.
        splits: ``[{"train": [...], "val": [...], "test": [...]}, ...]``.

    Raises:
        InputError: the splits are malformed or leak a subject (nothing is written).
    """
    atomic_write_json(path, check_splits(splits, path))


def load_splits(path: str | Path) -> list[dict[str, list[str]]]:
    """Read a (possibly hand-edited) splits.json and check it for leaks.

    Args:
        path: the splits.json.

    Returns:
        One dict per fold with ``train``, ``val`` and ``test`` lists.

    Raises:
        InputError: unreadable, not JSON, malformed, or a subject leaking within a fold or between the
            test sets of two folds (the message names the subject).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "splits file not found" if not path.exists() else "splits path is not a file")
    if path.stat().st_size > MAX_SPLITS_BYTES:
        raise InputError(path, f"splits file is larger than {MAX_SPLITS_BYTES // 2**20} MB")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON (line {e.lineno}: {e.msg})") from None
    return check_splits(data, path)


def assign_records(records: Iterable[Record], split: Mapping[str, Sequence[str]]) -> dict[str, list[Record]]:
    """Put every record on the side of its subject, so that all files of a subject stay together.

    Args:
        records: manifest records (any modality).
        split: one fold, ``{"train": [...], "val": [...], "test": [...]}``.

    Returns:
        ``{"train", "val", "test", "unassigned"}`` -> records; ``unassigned`` holds the records of
        subjects the split does not name (e.g. unpaired TVUS subjects or the unlabelled MRI pool).
    """
    side_of = {sid: side for side in SIDES for sid in split.get(side, [])}
    out: dict[str, list[Record]] = {side: [] for side in (*SIDES, "unassigned")}
    for rec in records:
        out[side_of.get(rec.subject_id, "unassigned")].append(rec)
    return out
