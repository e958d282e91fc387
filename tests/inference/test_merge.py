"""Merge of pipeline A and B label maps: SPEC.md's table, written out literally."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from brats_lightning.data.labels import BRATS2020, BRATS2023
from brats_lightning.inference.merge import merge_labels

# SPEC.md "Inference": rows are A's label, columns B's label (0, 1, 2, 4).
SPEC_TABLE = {
    0: {0: 0, 1: 0, 2: 2, 4: 0},
    1: {0: 1, 1: 1, 2: 1, 4: 1},
    2: {0: 0, 1: 2, 2: 2, 4: 2},
    4: {0: 4, 1: 4, 2: 4, 4: 4},
}


@pytest.mark.parametrize("convention", [BRATS2020, BRATS2023])
def test_all_sixteen_label_pairs(convention):
    code = {0: 0, 1: 1, 2: 2, 4: convention.et}  # the table's codes in this convention
    pairs = list(itertools.product(SPEC_TABLE, repeat=2))
    assert len(pairs) == 16
    a = np.array([code[x] for x, _ in pairs], dtype=np.uint8).reshape(2, 2, 4)
    b = np.array([code[y] for _, y in pairs], dtype=np.uint8).reshape(2, 2, 4)
    merged = merge_labels(a, b, convention)
    assert merged.dtype == np.uint8 and merged.shape == (2, 2, 4)
    expected = np.array([code[SPEC_TABLE[x][y]] for x, y in pairs], dtype=np.uint8).reshape(2, 2, 4)
    np.testing.assert_array_equal(merged, expected)


def test_merge_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        merge_labels(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
