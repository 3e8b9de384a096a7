"""Leakage-safe splits: the subject is the unit; folds are disjoint, stratified, deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from endodistill.data.manifest import Record
from endodistill.data.splits import (
    assign_records,
    check_splits_subjects,
    holdout_split,
    inner_val_split,
    load_splits,
    make_cv_splits,
    save_splits,
    stratified_group_folds,
    subject_labels,
)
from endodistill.errors import InputError


def cohort(n: int = 30, positives: int = 9) -> tuple[list[str], list[int]]:
    """Per-file entries: every subject has 1-3 files (the subject, not the file, is the unit)."""
    ids, labels = [], []
    for i in range(n):
        sid = f"s{i:02d}"
        for _ in range(1 + i % 3):
            ids.append(sid)
            labels.append(1 if i < positives else 0)
    return ids, labels


def test_folds_partition_subjects_and_are_stratified() -> None:
    ids, labels = cohort()
    folds = stratified_group_folds(ids, labels, k=5, seed=0)
    assert len(folds) == 5
    flat = [s for f in folds for s in f]
    assert sorted(flat) == sorted(set(ids)) and len(flat) == len(set(flat))  # each subject exactly once
    lab = subject_labels(ids, labels)
    for f in folds:
        assert 5 <= len(f) <= 7
        pos = sum(lab[s] for s in f)
        assert 1 <= pos <= 2  # 9 positives over 5 folds
        assert len(f) - pos >= 1


def test_folds_deterministic_and_order_independent() -> None:
    ids, labels = cohort()
    a = stratified_group_folds(ids, labels, k=3, seed=7)
    assert a == stratified_group_folds(ids, labels, k=3, seed=7)
    assert a == stratified_group_folds(ids[::-1], labels[::-1], k=3, seed=7)
    assert a != stratified_group_folds(ids, labels, k=3, seed=8)


def test_fold_errors() -> None:
    with pytest.raises(InputError, match="subject 's1' has conflicting labels 0 and 1"):
        stratified_group_folds(["s1", "s2", "s1"], [0, 1, 1], k=2, seed=0)
    with pytest.raises(InputError, match="5 folds need at least 5"):
        stratified_group_folds(["a", "b", "c"], [0, 1, 0], k=5, seed=0)
    with pytest.raises(InputError, match="at least 2 folds"):
        stratified_group_folds(["a", "b"], [0, 1], k=1, seed=0)
    with pytest.raises(InputError, match="no label"):
        stratified_group_folds(["a", "b"], [0, None], k=2, seed=0)  # type: ignore[list-item]


def test_holdout_split_stratified_disjoint_deterministic() -> None:
    ids, labels = cohort(40, 12)
    train, test = holdout_split(ids, labels, 0.25, seed=3)
    assert len(test) == 10 and len(train) == 30
    assert not set(train) & set(test) and set(train) | set(test) == set(ids)
    lab = subject_labels(ids, labels)
    assert sum(lab[s] for s in test) == 3  # 12/40 of 10
    assert (train, test) == holdout_split(ids, labels, 0.25, seed=3)
    assert (train, test) != holdout_split(ids, labels, 0.25, seed=4)


def test_holdout_falls_back_when_a_class_is_too_small() -> None:
    ids = ["a", "b", "c", "d", "e"]
    train, test = holdout_split(ids, [0, 0, 0, 0, 1], 0.4, seed=0)  # one positive cannot be stratified
    assert len(test) == 2 and sorted(train + test) == ids
    with pytest.raises(InputError, match="at least 2"):
        holdout_split(["a"], [0], 0.5, seed=0)
    with pytest.raises(InputError, match="between 0 and 1"):
        holdout_split(ids, [0, 1, 0, 1, 0], 1.0, seed=0)


def test_inner_val_split() -> None:
    ids, labels = cohort(20, 6)
    train, val = inner_val_split(ids, labels, 0.2, seed=1)
    assert len(val) == 4 and not set(train) & set(val) and set(train) | set(val) == set(ids)
    lab = subject_labels(ids, labels)
    assert {lab[s] for s in val} == {0, 1}
    assert inner_val_split(ids, labels, 0.0, seed=1) == (sorted(set(ids)), [])
    assert inner_val_split(["a"], [1], 0.3, seed=1) == (["a"], [])


def test_make_cv_splits_and_roundtrip(tmp_path: Path) -> None:
    ids, labels = cohort(24, 8)
    splits = make_cv_splits(ids, labels, k=4, seed=0, val_fraction=0.2)
    assert len(splits) == 4
    for fold in splits:
        sides = [set(fold["train"]), set(fold["val"]), set(fold["test"])]
        assert sides[0] and sides[1] and sides[2]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
        assert set.union(*sides) == set(ids)
    assert sorted(s for f in splits for s in f["test"]) == sorted(set(ids))
    path = tmp_path / "splits.json"
    save_splits(path, splits)
    assert load_splits(path) == splits
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary behind
    check_splits_subjects(splits, set(ids), path)
    with pytest.raises(InputError, match="'s00' is not in the cohort"):
        check_splits_subjects(splits, set(ids) - {"s00"}, path)


def test_train_fraction_keeps_the_test_folds_and_subsamples_training_stratified() -> None:
    ids, labels = cohort(80, 24)
    full = make_cv_splits(ids, labels, k=4, seed=3)
    half = make_cv_splits(ids, labels, k=4, seed=3, train_fraction=0.5)
    lab = dict(zip(ids, labels, strict=True))
    for f, h in zip(full, half, strict=True):
        assert h["test"] == f["test"]  # runs at different shares are compared case by case
        assert set(h["train"]) < set(f["train"]) and not set(h["train"]) & set(h["test"])
        assert len(h["train"]) == round(0.5 * len(f["train"]))
        pos_full = sum(lab[s] for s in f["train"]) / len(f["train"])
        pos_half = sum(lab[s] for s in h["train"]) / len(h["train"])
        assert abs(pos_half - pos_full) < 0.05  # stratified by label
    assert make_cv_splits(ids, labels, k=4, seed=3, train_fraction=0.5) == half  # seeded
    assert make_cv_splits(ids, labels, k=4, seed=3, train_fraction=1.0) == full
    with pytest.raises(InputError, match="train fraction"):
        make_cv_splits(ids, labels, k=4, seed=3, train_fraction=0.0)


def test_load_accepts_nnunet_style_train_val_only(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    path.write_text(json.dumps([{"train": ["a", "b"], "val": ["c"]}, {"train": ["c", "b"], "val": ["a"]}]))
    assert load_splits(path) == [
        {"train": ["a", "b"], "val": ["c"], "test": []},
        {"train": ["c", "b"], "val": ["a"], "test": []},
    ]


LEAKS = {
    "train_and_test": (
        [{"train": ["a", "b"], "val": [], "test": ["b"]}],
        "fold 0: subject 'b' is in both train and test",
    ),
    "val_and_test": ([{"train": ["a"], "val": ["c"], "test": ["c"]}], "subject 'c' is in both val and test"),
    "twice_in_train": ([{"train": ["a", "a"], "test": ["b"]}], "subject 'a' is twice in train"),
    "test_in_two_folds": (
        [{"train": ["a"], "test": ["b", "c"]}, {"train": ["b"], "test": ["a", "c"]}],
        "subject 'c' is in the test set of folds 0 and 1",
    ),
    "not_a_list": ({"train": ["a"]}, "non-empty list of folds"),
    "empty": ([], "non-empty list of folds"),
    "fold_not_mapping": ([["a"]], "fold 0 is not a mapping"),
    "unknown_key": ([{"train": ["a"], "tset": ["b"]}], "unknown key(s) tset"),
    "no_train": ([{"test": ["a"]}], "no 'train' list"),
    "empty_train": ([{"train": [], "test": ["a"]}], "empty 'train' list"),
    "id_not_string": ([{"train": ["a", 3]}], "'train' must be a list of non-empty subject ids"),
}


@pytest.mark.parametrize("kind", sorted(LEAKS))
def test_load_rejects_leaks_and_bad_structure(tmp_path: Path, kind: str) -> None:
    data, expected = LEAKS[kind]
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(data))
    before = path.read_bytes()
    with pytest.raises(InputError) as e:
        load_splits(path)
    assert e.value.path == str(path) and expected in e.value.reason
    assert path.read_bytes() == before
    with pytest.raises(InputError):  # refused on save too; nothing written
        save_splits(tmp_path / "out.json", data)  # type: ignore[arg-type]
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"[{", "not valid JSON"), (b"\xff\xfe[]", "not UTF-8"), (None, "not found")],
)
def test_load_rejects_unreadable(tmp_path: Path, content: bytes | None, expected: str) -> None:
    path = tmp_path / "splits.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=expected):
        load_splits(path)


def test_assign_records_keeps_each_subjects_files_together(tmp_path: Path) -> None:
    def rec(sid: str, modality: str, label: int | None) -> Record:
        return Record(sid, modality, tmp_path / f"{sid}_{modality}", label, {}, 2)

    records = [
        rec("p1", "mri", 1),
        rec("p1", "tvus", 1),  # a paired subject: MRI and TVUS must land on the same side
        rec("p2", "mri", 0),
        rec("p2", "tvus", 0),
        rec("p3", "mri", 0),
        rec("t9", "tvus", 1),  # TVUS-only subject
        rec("u1", "mri", None),  # unlabelled pool
    ]
    split = {"train": ["p2", "p3"], "val": [], "test": ["p1"]}
    out = assign_records(records, split)
    assert [(r.subject_id, r.modality) for r in out["test"]] == [("p1", "mri"), ("p1", "tvus")]
    assert {r.subject_id for r in out["train"]} == {"p2", "p3"} and len(out["train"]) == 3
    assert {r.subject_id for r in out["unassigned"]} == {"t9", "u1"}
    assert out["val"] == []
