"""Label map <-> region conversion for both label conventions (docs/method.md "Data", "Inference")."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from brats_lightning.data.labels import (
    BRATS2020,
    BRATS2023,
    CONVENTIONS,
    REGIONS,
    get_convention,
    labels_to_regions,
    labels_to_regions_torch,
    regions_to_labels,
    regions_to_labels_torch,
    unexpected_labels,
)


def test_conventions():
    assert REGIONS == ("ET", "TC", "WT")
    assert BRATS2020.labels == (0, 1, 2, 4)
    assert BRATS2023.labels == (0, 1, 2, 3)
    assert CONVENTIONS == {"brats2020": BRATS2020, "brats2023": BRATS2023}
    assert get_convention("brats2023") is BRATS2023
    with pytest.raises(ValueError, match="unknown label convention 'brats2019'"):
        get_convention("brats2019")


@pytest.mark.parametrize(("convention", "expected"), [
    # label code -> (ET, TC, WT), written out by hand from docs/method.md: ET = {et}, TC = {1, et}, WT =
    # {1, 2, et}
    (BRATS2020, {0: (0, 0, 0), 1: (0, 1, 1), 2: (0, 0, 1), 4: (1, 1, 1)}),
    (BRATS2023, {0: (0, 0, 0), 1: (0, 1, 1), 2: (0, 0, 1), 3: (1, 1, 1)}),
])
def test_labels_to_regions_every_code(convention, expected):
    codes = np.array(list(expected), dtype=np.uint8).reshape(len(expected), 1, 1)
    regions = labels_to_regions(codes, convention)
    assert regions.dtype == bool and regions.shape == (3, len(expected), 1, 1)
    for i, code in enumerate(expected):
        assert tuple(int(v) for v in regions[:, i, 0, 0]) == expected[code], code


@pytest.mark.parametrize("convention", [BRATS2020, BRATS2023])
def test_round_trip_all_codes(convention):
    rng = np.random.default_rng(0)
    label_map = rng.choice(np.array(convention.labels, dtype=np.uint8), size=(7, 6, 5))
    assert set(np.unique(label_map)) == set(convention.labels)
    back = regions_to_labels(labels_to_regions(label_map, convention), convention)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, label_map)


@pytest.mark.parametrize("convention", [BRATS2020, BRATS2023])
def test_regions_to_labels_every_combination(convention):
    # ET -> et; TC and not ET -> 1; WT and not TC -> 2; nothing -> 0 (paper section 2.5), ET wins over all
    def rule(et, tc, wt):
        return convention.et if et else 1 if tc else 2 if wt else 0

    combos = list(itertools.product([False, True], repeat=3))
    regions = np.array(combos, dtype=bool).T.reshape(3, len(combos), 1, 1)
    labels = regions_to_labels(regions, convention)
    assert [int(v) for v in labels[:, 0, 0]] == [rule(*c) for c in combos]


def test_2020_map_read_with_2023_convention_flags_label_4():
    label_map = np.array([0, 1, 2, 4], dtype=np.uint8)
    assert unexpected_labels(label_map, BRATS2023) == [4]
    assert unexpected_labels(label_map, BRATS2020) == []
    assert unexpected_labels(np.array([0, 3, 3, 7]), BRATS2020) == [3, 7]
    et = labels_to_regions(label_map, BRATS2023)[0]
    assert not et.any()  # 4 is not enhancing tumour under the 2023 codes


@pytest.mark.parametrize("convention", [BRATS2020, BRATS2023])
def test_torch_matches_numpy(convention):
    rng = np.random.default_rng(1)
    label_map = rng.choice(np.array(convention.labels, dtype=np.uint8), size=(2, 5, 4, 3))
    tensor = torch.from_numpy(label_map)
    batched = labels_to_regions_torch(tensor, convention)
    assert batched.shape == (2, 3, 5, 4, 3) and batched.dtype == torch.bool
    for b in range(2):
        np.testing.assert_array_equal(batched[b].numpy(), labels_to_regions(label_map[b], convention))
        single = labels_to_regions_torch(tensor[b], convention)
        np.testing.assert_array_equal(single.numpy(), labels_to_regions(label_map[b], convention))
        back = regions_to_labels_torch(single, convention)
        assert back.dtype == torch.uint8
        np.testing.assert_array_equal(back.numpy(), label_map[b])
    np.testing.assert_array_equal(regions_to_labels_torch(batched, convention).numpy(), label_map)


def test_regions_channel_count_checked():
    with pytest.raises(ValueError, match="3 channels"):
        regions_to_labels(np.zeros((2, 4, 4, 4), dtype=bool))
