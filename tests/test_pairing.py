"""Label-matched MRI -> TVUS pairing and class prototypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from endodistill.train.pairing import class_prototypes, label_matched_pairs

MRI = np.array([0, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0])
TVUS = np.array([1, 0, 0, 1, 0, 0, 0, 1])


def test_pairs_match_labels_and_are_reproducible() -> None:
    p = label_matched_pairs(MRI, TVUS, seed=3, epoch=0)
    assert p.shape == MRI.shape and p.dtype == np.int64
    assert np.array_equal(TVUS[p], MRI)
    assert np.array_equal(p, label_matched_pairs(list(MRI), torch.as_tensor(TVUS), seed=3, epoch=0))
    epochs = [label_matched_pairs(MRI, TVUS, seed=3, epoch=e) for e in range(5)]
    assert any(not np.array_equal(epochs[0], q) for q in epochs[1:])
    assert not np.array_equal(p, label_matched_pairs(MRI, TVUS, seed=4, epoch=0))


def test_tvus_cases_are_used_evenly() -> None:
    p = label_matched_pairs(MRI, TVUS, seed=0, epoch=2)
    # 8 MRI of class 0 over 5 TVUS of class 0: each used once or twice; 4 MRI of class 1 over 3 TVUS: 1 or 2.
    counts = np.bincount(p, minlength=TVUS.size)
    assert set(counts[TVUS == 0]) <= {1, 2} and set(counts[TVUS == 1]) <= {1, 2}
    assert counts.sum() == MRI.size


def test_three_classes_and_unlabelled() -> None:
    mri = [2, 0, None, 1, 2, -1, 2]
    tvus = [1, 2, 0, None, 2, -1]
    p = label_matched_pairs(mri, tvus, seed=1, epoch=0)
    assert p[2] == -1 and p[5] == -1
    for i, y in enumerate(mri):
        if y is not None and y >= 0:
            assert tvus[p[i]] == y


def test_missing_class_is_named() -> None:
    with pytest.raises(ValueError, match="class 2"):
        label_matched_pairs([0, 2], [0, 1], seed=0, epoch=0)
    # A class that no MRI case needs may be absent from TVUS.
    assert label_matched_pairs([0, 0], [0, 1], seed=0, epoch=0).tolist() == [0, 0]


def test_paired_mode_uses_own_tvus() -> None:
    mri_sub = ["a", "b", "c", "d"]
    tvus_sub = ["x", "c", "a", "y", "z"]
    mri = [1, 0, 0, 1]
    tvus = [0, 0, 1, 1, 0]
    for epoch in range(3):
        p = label_matched_pairs(mri, tvus, 0, epoch, mri_sub, tvus_sub, mode="paired")
        assert p[0] == 2 and p[2] == 1  # subjects a and c have their own TVUS
        assert tvus[p[1]] == 0 and tvus[p[3]] == 1
    with pytest.raises(ValueError, match="needs mri_subjects"):
        label_matched_pairs(mri, tvus, 0, 0, mode="paired")
    with pytest.raises(ValueError, match="subject 'a'"):
        label_matched_pairs([0, 0, 0, 1], tvus, 0, 0, mri_sub, tvus_sub, mode="paired")
    with pytest.raises(ValueError, match="unknown pairing mode"):
        label_matched_pairs(mri, tvus, 0, 0, mode="random")


def test_class_prototypes() -> None:
    logits = torch.tensor(
        [[1.0, 0.0, 0.0], [3.0, 0.0, 2.0], [0.0, 5.0, 1.0], [0.0, 0.0, 4.0], [9.0, 9.0, 9.0]]
    )
    labels = [0, 0, 1, 2, -1]
    proto = class_prototypes(logits, labels, 3)
    torch.testing.assert_close(proto, torch.tensor([[2.0, 0.0, 1.0], [0.0, 5.0, 1.0], [0.0, 0.0, 4.0]]))
    with pytest.raises(ValueError, match="class 1"):
        class_prototypes(logits[[0, 1, 3]], [0, 0, 2], 3)
