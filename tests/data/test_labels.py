"""Label map <-> region conversion for every label convention (docs/method.md "Data", "Inference")."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from brats_lightning.data.labels import (
    BRATS2020,
    BRATS2023,
    BRATS2024_GLI,
    CONVENTIONS,
    REGIONS,
    convention_for_regions,
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
    assert BRATS2024_GLI.labels == (0, 1, 2, 3, 4)
    assert CONVENTIONS == {"brats2020": BRATS2020, "brats2023": BRATS2023, "brats2024-gli": BRATS2024_GLI}
    assert get_convention("brats2023") is BRATS2023
    assert [c.regions for c in CONVENTIONS.values()] == [REGIONS, REGIONS, ("ET", "TC", "WT", "RC")]
    assert BRATS2020.names == {1: "NCR/NET", 2: "ED", 4: "ET"}
    assert BRATS2024_GLI.names == {1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"}
    assert convention_for_regions(3) is BRATS2020 and convention_for_regions(4) is BRATS2024_GLI
    with pytest.raises(ValueError, match="no label convention has 5 region channels"):
        convention_for_regions(5)
    with pytest.raises(ValueError, match="unknown label convention 'brats2019'"):
        get_convention("brats2019")


@pytest.mark.parametrize(("convention", "expected"), [
    # label code -> (ET, TC, WT), written out by hand from docs/method.md: ET = {et}, TC = {1, et}, WT =
    # {1, 2, et}
    (BRATS2020, {0: (0, 0, 0), 1: (0, 1, 1), 2: (0, 0, 1), 4: (1, 1, 1)}),
    (BRATS2023, {0: (0, 0, 0), 1: (0, 1, 1), 2: (0, 0, 1), 3: (1, 1, 1)}),
    # (ET, TC, WT, RC): the cavity is its own channel, outside every tumour region
    (BRATS2024_GLI, {0: (0, 0, 0, 0), 1: (0, 1, 1, 0), 2: (0, 0, 1, 0), 3: (1, 1, 1, 0), 4: (0, 0, 0, 1)}),
])
def test_labels_to_regions_every_code(convention, expected):
    codes = np.array(list(expected), dtype=np.uint8).reshape(len(expected), 1, 1)
    regions = labels_to_regions(codes, convention)
    assert regions.dtype == bool and regions.shape == (len(convention.regions), len(expected), 1, 1)
    for i, code in enumerate(expected):
        assert tuple(int(v) for v in regions[:, i, 0, 0]) == expected[code], code


ALL = list(CONVENTIONS.values())


@pytest.mark.parametrize("convention", ALL)
def test_round_trip_all_codes(convention):
    rng = np.random.default_rng(0)
    label_map = rng.choice(np.array(convention.labels, dtype=np.uint8), size=(7, 6, 5))
    assert set(np.unique(label_map)) == set(convention.labels)
    back = regions_to_labels(labels_to_regions(label_map, convention), convention)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, label_map)


@pytest.mark.parametrize("convention", ALL)
def test_regions_to_labels_every_combination(convention):
    # ET -> et; TC and not ET -> 1; WT and not TC -> 2; nothing -> 0 (paper section 2.6), ET wins over all
    # and, with a cavity channel, RC -> rc only where no tumour region is set (tumour wins over RC)
    def rule(et, tc, wt, rc=False):
        return convention.et if et else 1 if tc else 2 if wt else convention.rc if rc else 0

    n = len(convention.regions)
    combos = list(itertools.product([False, True], repeat=n))
    regions = np.array(combos, dtype=bool).T.reshape(n, len(combos), 1, 1)
    labels = regions_to_labels(regions, convention)
    assert [int(v) for v in labels[:, 0, 0]] == [rule(*c) for c in combos]
    torch_labels = regions_to_labels_torch(torch.from_numpy(regions), convention)
    np.testing.assert_array_equal(torch_labels.numpy(), labels)


def test_cavity_rule_brute_force_per_voxel():
    """Random (ET, TC, WT, RC) masks, not necessarily nested, decoded voxel by voxel by a plain loop."""
    rng = np.random.default_rng(3)
    regions = rng.random((4, 6, 5, 4)) < 0.4
    labels = regions_to_labels(regions, BRATS2024_GLI)
    names = {0: "background", 1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"}
    for index in np.ndindex(labels.shape):
        et, tc, wt, rc = (bool(regions[(c, *index)]) for c in range(4))
        expected = "ET" if et else "NETC" if tc else "SNFH" if wt else "RC" if rc else "background"
        assert names[int(labels[index])] == expected, index
    # regions -> labels -> regions keeps every nested tumour region and RC where no tumour is predicted
    again = labels_to_regions(labels, BRATS2024_GLI)
    np.testing.assert_array_equal(again[0], regions[0])
    np.testing.assert_array_equal(again[1], regions[0] | regions[1])
    np.testing.assert_array_equal(again[2], regions[0] | regions[1] | regions[2])
    np.testing.assert_array_equal(again[3], regions[3] & ~(regions[0] | regions[1] | regions[2]))


def test_2020_map_read_with_2023_convention_flags_label_4():
    label_map = np.array([0, 1, 2, 4], dtype=np.uint8)
    assert unexpected_labels(label_map, BRATS2023) == [4]
    assert unexpected_labels(label_map, BRATS2020) == []
    assert unexpected_labels(np.array([0, 3, 3, 7]), BRATS2020) == [3, 7]
    et = labels_to_regions(label_map, BRATS2023)[0]
    assert not et.any()  # 4 is not enhancing tumour under the 2023 codes


@pytest.mark.parametrize("convention", ALL)
def test_torch_matches_numpy(convention):
    rng = np.random.default_rng(1)
    label_map = rng.choice(np.array(convention.labels, dtype=np.uint8), size=(2, 5, 4, 3))
    tensor = torch.from_numpy(label_map)
    batched = labels_to_regions_torch(tensor, convention)
    assert batched.shape == (2, len(convention.regions), 5, 4, 3) and batched.dtype == torch.bool
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
    with pytest.raises(ValueError, match=r"4 channels \('ET', 'TC', 'WT', 'RC'\).*brats2024-gli"):
        regions_to_labels(np.zeros((3, 4, 4, 4), dtype=bool), BRATS2024_GLI)
    assert unexpected_labels(np.array([0, 3, 4]), BRATS2024_GLI) == []
    assert unexpected_labels(np.array([0, 3, 4]), BRATS2023) == [4]
