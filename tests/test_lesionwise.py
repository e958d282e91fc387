"""Tests for brats_lightning.lesionwise: hand-worked cases, a whole-volume brute force, official numbers."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
from scipy import ndimage
from surface_distance import compute_robust_hausdorff, compute_surface_distances

from brats_lightning.data.labels import BRATS2023, labels_to_regions
from brats_lightning.lesionwise import (
    LESION_KEYS,
    MISSED_HD95,
    RULES,
    LesionRules,
    LesionScore,
    case_lesion_metrics,
    lesion_scores,
    surface_hd95,
)

GLI = RULES["brats2023-gli"]  # dilation 3, lesions <= 50 mm^3 dropped
SHAPE = (40, 24, 24)


def box(*ranges: tuple[int, int], shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A bool mask with the voxels ``[x0:x1, y0:y1, z0:z1]`` set."""
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in ranges)] = True
    return mask


CUBE = box((5, 9), (5, 9), (5, 9))  # 4 x 4 x 4 = 64 voxels


# ---------------------------------------------------------------- hand-worked cases (1 mm unless said)
#
# HD95 here is the scorer's: surface elements are the 2x2x2 cubes partly inside a mask, so a box of voxels
# [a, b) has its surface on the grid positions a..b of each axis; each direction's 95th percentile is
# area-weighted and HD95 is the larger direction.

def test_two_lesions_one_missed() -> None:
    far = box((25, 29), (5, 9), (5, 9))        # 16 voxels from CUBE: a second lesion
    score = lesion_scores(CUBE, CUBE | far, (1, 1, 1), GLI)
    # lesion 1 found exactly (Dice 1, HD95 0), lesion 2 missed (Dice 0, HD95 374): means over 2 lesions
    assert score == LesionScore(dice=0.5, hd95=187.0, tp=1, fp=0, fn=1)


def test_one_lesion_split_in_two_predicted_parts() -> None:
    gt = box((5, 9), (5, 9), (5, 15))                                 # 4 x 4 x 10 = 160 voxels
    pred = box((5, 9), (5, 9), (5, 9)) | box((5, 9), (5, 9), (11, 15))  # two 64-voxel parts, 2 slices apart
    assert cc3d.connected_components(pred, connectivity=26).max() == 2
    score = lesion_scores(pred, gt, (1, 1, 1), GLI)
    # both parts match the one lesion: Dice 2 x 128 / (128 + 160) = 8/9.
    # HD95: GT->pred, the GT ring at z = 10 (8.7 % of the GT area) is 1 mm from the parts' faces, the rest
    # 0; pred->GT, the parts' inner faces (11 % of their area) are 1 or 2 (centre) mm inside: both 1 mm.
    assert score.dice == pytest.approx(8 / 9, abs=1e-12) and score.hd95 == pytest.approx(1.0)
    assert (score.tp, score.fp, score.fn) == (1, 0, 0)


def test_gt_components_merged_by_dilation_prediction_covers_one() -> None:
    gt = CUBE | box((12, 16), (5, 9), (5, 9))  # two 26-components 3 voxels apart: one lesion after dilation 3
    score = lesion_scores(CUBE, gt, (1, 1, 1), GLI)
    # Dice 2 x 64 / (64 + 128); HD95: the uncovered cube's far face (x = 16, 11 % of the GT area) is 7 mm
    # from the covered cube's face at x = 9, and nothing is farther
    assert score.dice == pytest.approx(2 / 3, abs=1e-12) and score.hd95 == pytest.approx(7.0)
    assert (score.tp, score.fp, score.fn) == (1, 0, 0)
    # with dilation 1 (MEN) the two dilated cubes reach x = 9 and x = 11 and stay two lesions
    assert lesion_scores(CUBE, gt, (1, 1, 1), RULES["brats2023-men"]) == LesionScore(0.5, 187.0, 1, 0, 1)


def test_false_positive_far_away() -> None:
    fp = box((30, 33), (15, 18), (15, 18))
    score = lesion_scores(CUBE | fp, CUBE, (1, 1, 1), GLI)
    # the lesion (Dice 1, HD95 0) and one false positive (Dice 0, HD95 374): (1 + 0) / 2, (0 + 374) / 2
    assert score == LesionScore(dice=0.5, hd95=187.0, tp=1, fp=1, fn=0)


def test_lesion_under_the_threshold_is_dropped() -> None:
    small = box((25, 28), (5, 8), (5, 8))  # 27 voxels = 27 mm^3 <= 50
    assert lesion_scores(CUBE, CUBE | small, (1, 1, 1), GLI) == LesionScore(1.0, 0.0, 1, 0, 0)
    # a prediction touching only the dropped lesion is not a false positive either
    near_small = box((29, 31), (5, 8), (5, 8))  # 1 voxel from the small lesion, inside its dilation
    assert lesion_scores(CUBE | near_small, CUBE | small, (1, 1, 1), GLI) == LesionScore(1.0, 0.0, 1, 0, 0)
    # only a small lesion and no prediction: no lesion counts, no FP: the scorer's 0/0 -> Dice 1, HD95 0
    assert lesion_scores(np.zeros(SHAPE, bool), small, (1, 1, 1), GLI) == LesionScore(1.0, 0.0, 0, 0, 0)
    # exactly at the threshold: 5 x 5 x 2 = 50 voxels = 50 mm^3 is dropped (<=); at 1.2 mm slices 60 mm^3
    slab = box((5, 10), (5, 10), (5, 7))
    empty = np.zeros(SHAPE, bool)
    assert lesion_scores(empty, slab, (1, 1, 1), GLI) == LesionScore(1.0, 0.0, 0, 0, 0)
    assert lesion_scores(empty, slab, (1, 1, 1.2), GLI) == LesionScore(0.0, MISSED_HD95, 0, 0, 1)
    # MET keeps lesions above 2 mm^3
    assert lesion_scores(empty, small, (1, 1, 1), RULES["brats2023-met"]) == LesionScore(0.0, 374.0, 0, 0, 1)


def test_empty_cases() -> None:
    empty = np.zeros(SHAPE, bool)
    assert lesion_scores(empty, empty, (1, 1, 1), GLI) == LesionScore(1.0, 0.0, 0, 0, 0)
    assert lesion_scores(CUBE, empty, (1, 1, 1), GLI) == LesionScore(0.0, MISSED_HD95, 0, 1, 0)
    assert lesion_scores(empty, CUBE, (1, 1, 1), GLI) == LesionScore(0.0, MISSED_HD95, 0, 0, 1)
    assert surface_hd95(empty, empty) == 0.0 and surface_hd95(CUBE, empty) == MISSED_HD95 == 374.0


def test_anisotropic_spacing() -> None:
    shifted = np.roll(CUBE, 1, axis=2)  # one 2 mm slice up
    score = lesion_scores(shifted, CUBE, (1, 1, 2), GLI)
    # overlap 4 x 4 x 3: Dice 2 x 48 / 128 = 0.75; the bottom face of the GT and the top face of the
    # prediction (each over 5 % of the area) are one slice = 2 mm from the other surface, nothing farther
    assert score.dice == 0.75 and score.hd95 == pytest.approx(2.0)
    assert surface_hd95(shifted, CUBE, (1, 1, 2)) == pytest.approx(2.0)
    # the same shift along x (1 mm voxels there) is 1 mm
    assert lesion_scores(np.roll(CUBE, 1, axis=0), CUBE, (1, 1, 2), GLI).hd95 == pytest.approx(1.0)


# ---------------------------------------------------------------- brute force (the scorer's steps, whole)

def brute_force(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float, float],
                rules: LesionRules) -> LesionScore:
    """The official scorer's algorithm written plainly: whole-volume masks per lesion, DeepMind's
    surface-distance package for HD95 (the library the official scorer ships)."""
    structure = ndimage.generate_binary_structure(3, 2)
    pred_labels = cc3d.connected_components(pred, connectivity=26)
    dilated = cc3d.connected_components(ndimage.binary_dilation(gt, structure, iterations=rules.dilation),
                                        connectivity=26)
    lesions = dilated * gt
    dice, hd95, matched = [], [], set()
    tp = fn = 0
    for k in range(1, int(lesions.max()) + 1):
        lesion = lesions == k
        touching = ndimage.binary_dilation(lesion, structure, iterations=rules.dilation)
        hits = set(np.unique(pred_labels[touching]).tolist()) - {0}
        matched |= hits
        if lesion.sum() * spacing[0] * spacing[1] * spacing[2] <= rules.min_volume:
            continue
        found = np.isin(pred_labels, list(hits))
        if hits:
            tp += 1
            dice.append(2 * (found & lesion).sum() / (found.sum() + lesion.sum()))
            hd95.append(compute_robust_hausdorff(compute_surface_distances(lesion, found, spacing), 95))
        else:
            fn += 1
            dice.append(0.0)
            hd95.append(374.0)
    fp = len(set(np.unique(pred_labels).tolist()) - {0} - matched)
    if not dice and not fp:
        return LesionScore(1.0, 0.0, tp, fp, fn)
    return LesionScore(sum(dice) / (len(dice) + fp), (sum(hd95) + 374 * fp) / (len(dice) + fp), tp, fp, fn)


def random_mask(rng: np.random.Generator, shape: tuple[int, int, int], threshold: float) -> np.ndarray:
    return ndimage.gaussian_filter(rng.random(shape), sigma=1.2) > threshold


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_the_whole_volume_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (30, 26, 22)
    gt = random_mask(rng, shape, 0.58)
    pred = random_mask(rng, shape, 0.58) if seed % 3 else np.roll(gt, 2, axis=seed % 3) | random_mask(
        rng, shape, 0.6)
    spacing = [(1.0, 1.0, 1.0), (0.9375, 0.9375, 1.5), (1.0, 1.2, 2.0)][seed % 3]
    for rules in (GLI, RULES["brats2023-men"], RULES["brats2023-met"], LesionRules("tiny", "-", 2, 5.0)):
        ours, brute = lesion_scores(pred, gt, spacing, rules), brute_force(pred, gt, spacing, rules)
        assert (ours.tp, ours.fp, ours.fn) == (brute.tp, brute.fp, brute.fn)
        assert ours.dice == pytest.approx(brute.dice, abs=1e-9)
        assert ours.hd95 == pytest.approx(brute.hd95, abs=1e-6)
        assert ours.tp + ours.fn > 1 or rules.name != "tiny"  # the random masks hold several lesions


def test_full_volume_hd95_is_deepmind_surface_distance() -> None:
    rng = np.random.default_rng(7)
    for spacing in ((1.0, 1.0, 1.0), (1.0, 1.2, 2.0)):
        a, b = random_mask(rng, (24, 20, 18), 0.55), random_mask(rng, (24, 20, 18), 0.55)
        expected = compute_robust_hausdorff(compute_surface_distances(b, a, spacing), 95)
        assert surface_hd95(a, b, spacing) == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------- the official scorer's numbers

def planted_case(index: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A 2023-style (label codes 1 NETC, 2 SNFH, 3 ET) ground truth and prediction built from ellipsoids."""
    shape = (48, 44, 36)
    grid = np.indices(shape).astype(float)

    def tumour(labels: np.ndarray, centre: tuple[float, ...], radii: tuple[float, ...]) -> None:
        d = sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
        labels[(d <= 1) & (labels == 0)] = 2
        labels[d <= 0.45] = 1
        labels[(d <= 0.45) & (d > 0.15)] = 3

    tumours = [  # (centre, radii) of the GT tumours; the prediction shifts, shrinks, misses and adds some
        [((14, 14, 12), (8, 7, 6)), ((34, 30, 22), (6, 5, 5)), ((38, 10, 28), (2, 2, 2))],
        [((20, 20, 18), (10, 9, 7)), ((40, 36, 8), (3, 3, 2))],
        [((12, 30, 10), (5, 6, 4)), ((16, 36, 14), (4, 4, 4)), ((36, 12, 26), (7, 6, 6))],
        [],
    ][index]
    predicted = [
        [((15, 14, 12), (8, 6, 6)), ((36, 30, 23), (5, 5, 4)), ((6, 38, 30), (3, 3, 2))],
        [((20, 21, 18), (9, 9, 8))],
        [((12, 31, 10), (5, 5, 4)), ((36, 13, 26), (6, 6, 5)), ((37, 12, 16), (2, 2, 2))],
        [((24, 22, 18), (3, 3, 3))],
    ][index]
    gt, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    for centre, radii in tumours:
        tumour(gt, centre, radii)
    for centre, radii in predicted:
        tumour(pred, centre, radii)
    spacing = [(1.0, 1.0, 1.0), (1.0, 1.2, 2.0), (0.9375, 0.9375, 1.5), (1.0, 1.0, 1.0)][index]
    return gt, pred, spacing


# Produced by running the official scorer (rachitsaluja/BraTS-2023-Metrics, metrics.py, unchanged, with its
# surface_distance copy, numpy 1.24.3, pandas 1.3.4, scipy 1.11.1, cc3d 3.12.1, nibabel 5.1.0, Python 3.9)
# once, outside this repository, on the four planted_case() label maps saved as NIfTI with those voxel
# sizes: get_LesionWiseResults(pred, gt, "BraTS-GLI" / "BraTS-MET"). Per (case, challenge), per region
# ET, TC, WT: (LesionWise_Score_Dice, LesionWise_Score_HD95, Num_TP, Num_FP, Num_FN, Legacy_Dice,
# Legacy_HD95).
OFFICIAL: dict[tuple[int, str], tuple[tuple[float, ...], ...]] = {
    (0, 'brats2023-gli'): (
        (0.341355915, 125.745356, 2, 1, 0, 0.584245077, 25.039968),
        (0.442847421, 125.745356, 2, 1, 0, 0.715044248, 25.337719),
        (0.511600775, 125.816497, 2, 1, 0, 0.789587852, 23.151674),
    ),
    (0, 'brats2023-met'): (
        (0.256016937, 187.809017, 2, 1, 1, 0.584245077, 25.039968),
        (0.332135566, 187.809017, 2, 1, 1, 0.715044248, 25.337719),
        (0.383700581, 187.862372, 2, 1, 1, 0.789587852, 23.151674),
    ),
    (1, 'brats2023-gli'): (
        (0.763076923, 1.56205, 1, 0, 0, 0.752655539, 23.026941),
        (0.424317618, 188.0, 1, 0, 1, 0.836697248, 23.846174),
        (0.440408627, 188.0, 1, 0, 1, 0.868818809, 20.313543),
    ),
    (1, 'brats2023-met'): (
        (0.381538462, 187.781025, 1, 0, 1, 0.752655539, 23.026941),
        (0.424317618, 188.0, 1, 0, 1, 0.836697248, 23.846174),
        (0.440408627, 188.0, 1, 0, 1, 0.868818809, 20.313543),
    ),
    (2, 'brats2023-gli'): (
        (0.363069544, 127.216108, 2, 1, 0, 0.552486188, 6.005857),
        (0.450751264, 127.427013, 2, 1, 0, 0.688053097, 6.150457),
        (0.724507837, 6.285348, 2, 0, 0, 0.734680135, 5.511352),
    ),
    (2, 'brats2023-met'): (
        (0.363069544, 127.216108, 2, 1, 0, 0.552486188, 6.005857),
        (0.450751264, 127.427013, 2, 1, 0, 0.688053097, 6.150457),
        (0.487774231, 127.422256, 2, 1, 0, 0.734680135, 5.511352),
    ),
    (3, 'brats2023-gli'): (
        (0.0, 374.0, 0, 1, 0, 0.0, 374.0),
        (0.0, 374.0, 0, 1, 0, 0.0, 374.0),
        (0.0, 374.0, 0, 1, 0, 0.0, 374.0),
    ),
    (3, 'brats2023-met'): (
        (0.0, 374.0, 0, 1, 0, 0.0, 374.0),
        (0.0, 374.0, 0, 1, 0, 0.0, 374.0),
        (0.0, 374.0, 0, 1, 0, 0.0, 374.0),
    ),
}


@pytest.mark.parametrize("key", sorted(OFFICIAL))
def test_equals_the_official_scorer(key: tuple[int, str]) -> None:
    index, rules_name = key
    gt, pred, spacing = planted_case(index)
    ours = case_lesion_metrics(labels_to_regions(pred, BRATS2023), labels_to_regions(gt, BRATS2023), spacing,
                               RULES[rules_name])
    for region, expected in zip(("et", "tc", "wt"), OFFICIAL[key], strict=True):
        dice, hd95, tp, fp, fn, full_dice, full_hd95 = expected
        assert ours[f"lw_dice_{region}"] == pytest.approx(dice, abs=1e-6)
        assert ours[f"lw_hd95_{region}"] == pytest.approx(hd95, abs=1e-3)
        assert (ours[f"lw_tp_{region}"], ours[f"lw_fp_{region}"], ours[f"lw_fn_{region}"]) == (tp, fp, fn)
        assert ours[f"dice_{region}"] == pytest.approx(full_dice, abs=1e-6)
        assert ours[f"hd95_{region}"] == pytest.approx(full_hd95, abs=1e-3)


def test_case_keys() -> None:
    gt, pred, spacing = planted_case(0)
    out = case_lesion_metrics(labels_to_regions(pred, BRATS2023), labels_to_regions(gt, BRATS2023), spacing,
                              GLI)
    assert list(out)[-len(LESION_KEYS):] == list(LESION_KEYS)
    assert LESION_KEYS[:4] == ("lw_dice_et", "lw_dice_tc", "lw_dice_wt", "lw_hd95_et")


@pytest.mark.slow
def test_evaluate_rules_on_the_planted_corpus_equals_the_official_scorer(tmp_path) -> None:
    """``brats-lightning evaluate --rules`` end to end: label-only 2023 ground truth, the official numbers."""
    import nibabel as nib
    import pandas as pd

    from brats_lightning.cli import main

    gt_dir, pred_dir = tmp_path / "labels", tmp_path / "pred"
    for folder in (gt_dir, pred_dir):
        folder.mkdir()
    for index in range(4):
        gt, pred, spacing = planted_case(index)
        case_id = f"BraTS-GLI-{index:05d}-000"
        files = ((gt, gt_dir / case_id / f"{case_id}-seg.nii.gz"), (pred, pred_dir / f"{case_id}.nii.gz"))
        for data, path in files:
            path.parent.mkdir(exist_ok=True)
            image = nib.Nifti1Image(data, np.diag([*spacing, 1.0]))
            image.header.set_zooms(spacing)
            nib.save(image, path)
    for rules in ("brats2023-gli", "brats2023-met"):
        out = tmp_path / rules
        assert main(["evaluate", "--rules", rules, "--pred", str(pred_dir), "--gt", str(gt_dir),
                     "--out", str(out), "--workers", "1"]) == 0
        cases = pd.read_csv(out / "cases.csv").set_index("case")
        for index in range(4):
            row = cases.loc[f"BraTS-GLI-{index:05d}-000"]
            for region, expected in zip(("et", "tc", "wt"), OFFICIAL[(index, rules)], strict=True):
                dice, hd95, tp, fp, fn, full_dice, full_hd95 = expected
                assert row[f"lw_dice_{region}"] == pytest.approx(dice, abs=1e-6)  # cases.csv keeps 6 decimals
                assert row[f"lw_hd95_{region}"] == pytest.approx(hd95, abs=1e-3)
                assert [row[f"lw_{k}_{region}"] for k in ("tp", "fp", "fn")] == [tp, fp, fn]
                assert row[f"dice_{region}"] == pytest.approx(full_dice, abs=1e-6)
                assert row[f"hd95_{region}"] == pytest.approx(full_hd95, abs=1e-3)
