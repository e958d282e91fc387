"""Tests for brats_lightning.metrics: hand-worked values, empty-mask rules, brute force, crop exactness."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from brats_lightning.metrics import (
    EMPTY_HD95,
    METRIC_KEYS,
    case_metrics,
    confusion_counts,
    dice,
    hd95,
    region_dice,
    region_metrics,
    sensitivity,
    specificity,
    surface,
    surface_distances,
)


def _mask(shape: tuple[int, int, int], *voxels: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for voxel in voxels:
        mask[voxel] = True
    return mask


# ---------------------------------------------------------------- brute force (independent of the module)

def brute_surface(mask: np.ndarray) -> np.ndarray:
    """A voxel is on the surface when it is set and one of its 6 neighbours is unset or outside the array."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            neighbour = np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
            interior &= neighbour
    return mask & ~interior


def brute_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """All-pairs Euclidean distances between the two surfaces, pooled 95th percentile."""
    pa = np.argwhere(brute_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(brute_surface(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


def uncropped_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """The docs/method.md recipe applied to the whole volume, no bounding box."""
    structure = ndimage.generate_binary_structure(3, 1)
    sa = a ^ ndimage.binary_erosion(a, structure=structure, border_value=0)
    sb = b ^ ndimage.binary_erosion(b, structure=structure, border_value=0)
    a_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    b_to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    return float(np.percentile(np.concatenate([a_to_b, b_to_a]), 95))


def random_blob(rng: np.random.Generator, shape: tuple[int, int, int], threshold: float) -> np.ndarray:
    return ndimage.gaussian_filter(rng.random(shape), sigma=1.5) > threshold


# ---------------------------------------------------------------- hand-worked values

def test_two_single_voxels_at_known_distance() -> None:
    # One voxel each; every voxel of a 1-voxel mask is its own surface. Offset (0, 0, 3) voxels.
    a, b = _mask((8, 8, 8), (2, 2, 2)), _mask((8, 8, 8), (2, 2, 5))
    assert hd95(a, b) == pytest.approx(3.0)                       # |(0, 0, 3)| = 3 mm
    assert hd95(a, b, spacing=(1, 1, 3)) == pytest.approx(9.0)    # 3 voxels x 3 mm
    c = _mask((8, 8, 8), (3, 4, 2))                               # offset (1, 2, 0) from a
    assert hd95(a, c, spacing=(2, 1, 3)) == pytest.approx(math.sqrt(2**2 + 2**2))  # (1*2, 2*1, 0) mm
    assert dice(a, b) == 0.0 and sensitivity(a, b) == 0.0
    assert specificity(a, b) == pytest.approx((512 - 2) / (512 - 1))  # TN = 510, FP = 1


def test_point_vs_line_pooled_percentile_with_interpolation() -> None:
    # a = one voxel at (3, 3, 3); b = a 1-voxel-thick line (3, 6, z), z = 3..6: every voxel is surface.
    a = _mask((8, 10, 10), (3, 3, 3))
    b = _mask((8, 10, 10), *[(3, 6, z) for z in range(3, 7)])
    a_to_b, b_to_a = surface_distances(a, b)
    np.testing.assert_allclose(a_to_b, [3.0])
    np.testing.assert_allclose(np.sort(b_to_a), np.sqrt([9, 10, 13, 18]))  # sqrt(3^2 + dz^2), dz = 0..3
    # pooled, sorted: 3, 3, sqrt10, sqrt13, sqrt18; 95th percentile at rank 0.95 * (5 - 1) = 3.8:
    # sqrt13 + 0.8 * (sqrt18 - sqrt13) = 4.11522...
    expected = math.sqrt(13) + 0.8 * (math.sqrt(18) - math.sqrt(13))
    assert hd95(a, b) == pytest.approx(expected, abs=1e-12)
    # Not the max of the directed percentiles: b->a alone gives rank 0.95 * 3 = 2.85 -> 4.147...
    assert abs(hd95(a, b) - (math.sqrt(13) + 0.85 * (math.sqrt(18) - math.sqrt(13)))) > 0.03
    # Anisotropic spacing (1, 1, 3): distances sqrt(9 + (3 dz)^2) = 3, sqrt18, sqrt45, sqrt90 and a->b = 3.
    expected_aniso = math.sqrt(45) + 0.8 * (math.sqrt(90) - math.sqrt(45))
    assert hd95(a, b, spacing=(1, 1, 3)) == pytest.approx(expected_aniso, abs=1e-12)
    # spacing along an axis where the masks do not differ changes nothing
    assert hd95(a, b, spacing=(7, 1, 1)) == pytest.approx(expected, abs=1e-12)


def test_cube_vs_shifted_cube() -> None:
    # A = 3x3x3 cube x, y, z in 2..4; its surface is every voxel but the centre (3, 3, 3): 26 voxels.
    # B = A shifted by +2 along x (x in 4..6), centre (5, 3, 3).
    a = np.zeros((10, 8, 8), bool)
    a[2:5, 2:5, 2:5] = True
    b = np.roll(a, 2, axis=0)
    # A->B: x=2 face (9 voxels) -> nearest B surface at x=4: 2; x=3 ring (8 voxels) -> 1;
    #       x=4 face (9 voxels) lies on B's x=4 face: 0.  B->A is the mirror image.
    expected = sorted([2.0] * 9 + [1.0] * 8 + [0.0] * 9)
    a_to_b, b_to_a = surface_distances(a, b)
    assert sorted(a_to_b) == expected and sorted(b_to_a) == expected
    # pooled: 18 zeros, 16 ones, 18 twos (52 values); rank 0.95 * 51 = 48.45 falls among the twos.
    assert hd95(a, b) == 2.0
    # with 1.5 mm along x every distance scales by 1.5
    assert hd95(a, b, spacing=(1.5, 1, 1)) == pytest.approx(3.0)
    # overlap = the x=4 slab, 9 voxels; |A| = |B| = 27: Dice = 18 / 54, sensitivity 9 / 27
    assert dice(a, b) == pytest.approx(1 / 3)
    assert sensitivity(a, b) == pytest.approx(1 / 3)
    assert specificity(a, b) == pytest.approx((640 - 45) / (640 - 27))  # TN = 640 - 45, FP = 18
    assert confusion_counts(a, b) == (9, 18, 18, 640 - 45)


def test_surface_of_cube_and_of_border_touching_mask() -> None:
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    assert surface(cube).sum() == 26 and not surface(cube)[2, 2, 2]
    full = np.ones((4, 4, 4), bool)  # every voxel on the array border is surface (border_value = 0)
    assert surface(full).sum() == 64 - 8
    assert np.array_equal(surface(full), brute_surface(full))


def test_identical_masks() -> None:
    a = np.zeros((9, 9, 9), bool)
    a[2:7, 3:6, 1:8] = True
    m = region_metrics(a, a)
    assert m == {"dice": 1.0, "sens": 1.0, "spec": 1.0, "hd95": 0.0}


# ---------------------------------------------------------------- empty masks

def test_both_empty() -> None:
    empty = np.zeros((6, 6, 6), bool)
    assert region_metrics(empty, empty) == {"dice": 1.0, "sens": 1.0, "spec": 1.0, "hd95": 0.0}


def test_prediction_empty_ground_truth_not() -> None:
    gt = _mask((10, 10, 10), (1, 1, 1), (1, 1, 2))
    m = region_metrics(np.zeros_like(gt), gt)
    # TN = 998, FP = 0 -> specificity 1 computed normally
    assert m == {"dice": 0.0, "sens": 0.0, "spec": 1.0, "hd95": EMPTY_HD95}


def test_ground_truth_empty_prediction_not() -> None:
    pred = _mask((10, 10, 10), (4, 4, 4), (4, 5, 4), (9, 9, 9), (0, 0, 0), (5, 5, 5))
    m = region_metrics(pred, np.zeros_like(pred))
    # 5 false positives among 1000 negatives: specificity 995 / 1000, computed normally
    assert m == {"dice": 0.0, "sens": 0.0, "spec": 0.995, "hd95": EMPTY_HD95}


def test_empty_hd95_is_the_brats_volume_diagonal() -> None:
    assert EMPTY_HD95 == round(math.sqrt(240**2 + 240**2 + 155**2), 2) == 373.13


def test_ground_truth_fills_the_volume() -> None:
    gt = np.ones((3, 3, 3), bool)
    assert region_metrics(gt, gt)["spec"] == 1.0  # no negatives at all


# ---------------------------------------------------------------- brute force and crop exactness

@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 3.0), (0.7, 1.3, 2.0)])
def test_hd95_matches_brute_force_on_random_masks(spacing: tuple[float, float, float]) -> None:
    rng = np.random.default_rng(7)
    shape = (14, 12, 10)
    for trial in range(12):
        a = random_blob(rng, shape, 0.52 + 0.02 * (trial % 3))
        b = random_blob(rng, shape, 0.53)
        if trial % 4 == 0:
            a[0, :, :] = True       # a whole face on the volume border
        if trial % 4 == 1:
            b[:, -1, 3:7] = True    # a patch on the opposite border
        if not a.any() or not b.any():
            continue
        assert np.array_equal(surface(a), brute_surface(a))
        expected = brute_hd95(a, b, spacing)
        assert hd95(a, b, spacing) == pytest.approx(expected, abs=1e-9)
        assert hd95(a, b, spacing) == pytest.approx(uncropped_hd95(a, b, spacing), abs=1e-9)
        tp = int((a & b).sum())
        fp, fn = int((a & ~b).sum()), int((~a & b).sum())
        tn = a.size - tp - fp - fn
        m = region_metrics(a, b, spacing)
        assert m["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert m["sens"] == pytest.approx(tp / (tp + fn))
        assert m["spec"] == pytest.approx(tn / (tn + fp))


def test_bounding_box_crop_is_exact_against_the_whole_volume() -> None:
    # Small objects far from each other in a large volume, one touching the volume border along two axes:
    # the union box ends exactly at the objects, so erosion at the box edge must behave as in the volume.
    shape = (60, 50, 40)
    a = np.zeros(shape, bool)
    a[0:4, 10:16, 5:9] = True          # touches x = 0
    a[20:23, 20:23, 20:23] = True
    b = np.zeros(shape, bool)
    b[2:7, 12:15, 35:40] = True        # touches z = 39 (the last slice)
    b[45:50, 44:50, 10:12] = True      # touches y = 49 (the last column)
    for spacing in [(1.0, 1.0, 1.0), (1.0, 1.0, 3.0), (0.5, 2.0, 1.2)]:
        assert hd95(a, b, spacing) == pytest.approx(uncropped_hd95(a, b, spacing), abs=1e-12)
        assert hd95(a, b, spacing) == pytest.approx(brute_hd95(a, b, spacing), abs=1e-9)
        d_ab, d_ba = surface_distances(a, b, spacing)
        structure = ndimage.generate_binary_structure(3, 1)
        sa = a ^ ndimage.binary_erosion(a, structure=structure, border_value=0)
        sb = b ^ ndimage.binary_erosion(b, structure=structure, border_value=0)
        assert d_ab.size == sa.sum() and d_ba.size == sb.sum()


# ---------------------------------------------------------------- case_metrics and region_dice

def test_case_metrics_keys_and_regions() -> None:
    rng = np.random.default_rng(3)
    gt = np.stack([random_blob(rng, (12, 12, 12), t) for t in (0.56, 0.53, 0.5)])
    pred = np.stack([random_blob(rng, (12, 12, 12), t) for t in (0.56, 0.53, 0.5)])
    pred[0] = False  # ET predicted empty
    m = case_metrics(pred, gt, spacing=(1, 1, 2))
    assert tuple(m) == METRIC_KEYS
    assert m["dice_et"] == 0.0 and m["hd95_et"] == EMPTY_HD95 and m["sens_et"] == 0.0
    for i, name in enumerate(("et", "tc", "wt")):
        one = region_metrics(pred[i], gt[i], spacing=(1, 1, 2))
        assert [m[f"{k}_{name}"] for k in ("dice", "hd95", "sens", "spec")] == [
            one["dice"], one["hd95"], one["sens"], one["spec"]]
    assert all(isinstance(v, float) for v in m.values())
    no_hd = case_metrics(pred, gt, hd95=False)
    assert set(no_hd) == {k for k in METRIC_KEYS if not k.startswith("hd95")}
    assert no_hd["dice_wt"] == m["dice_wt"]


def test_case_metrics_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(3, X, Y, Z\)"):
        case_metrics(np.zeros((2, 4, 4, 4), bool), np.zeros((2, 4, 4, 4), bool))
    with pytest.raises(ValueError, match="differs"):
        hd95(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool))


def test_region_dice_agrees_with_case_metrics() -> None:
    rng = np.random.default_rng(11)
    pred = np.stack([np.stack([random_blob(rng, (10, 12, 8), t) for t in (0.55, 0.52, 0.5)])
                     for _ in range(4)])
    gt = np.stack([np.stack([random_blob(rng, (10, 12, 8), t) for t in (0.55, 0.52, 0.5)])
                   for _ in range(4)])
    pred[1, 0] = False                            # both empty -> 1
    gt[1, 0] = False
    pred[2, 1] = False                            # prediction empty -> 0
    gt[3, 2] = False                              # ground truth empty -> 0
    scores = region_dice(torch.from_numpy(pred), torch.from_numpy(gt))
    assert scores.shape == (4, 3) and scores.dtype == torch.float32
    for b in range(4):
        m = case_metrics(pred[b], gt[b], hd95=False)
        expected = [m["dice_et"], m["dice_tc"], m["dice_wt"]]
        np.testing.assert_allclose(scores[b].numpy(), expected, rtol=1e-7)
    assert scores[1, 0] == 1.0 and scores[2, 1] == 0.0 and scores[3, 2] == 0.0


def test_region_dice_hand_worked() -> None:
    pred = torch.zeros(1, 3, 4, 4, 4, dtype=torch.bool)
    target = torch.zeros_like(pred)
    pred[0, 0, :2] = True    # 32 voxels
    target[0, 0, 1:3] = True  # 32 voxels, 16 shared -> 2*16 / 64 = 0.5
    target[0, 1, 0, 0, 0] = True  # TC: prediction empty -> 0; WT: both empty -> 1
    assert region_dice(pred, target).tolist() == [[0.5, 0.0, 1.0]]
