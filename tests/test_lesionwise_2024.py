"""Tests for the BraTS 2024 lesion-wise rules in brats_lightning.lesionwise (brats2024-gli, -ssa, -met):
hand-worked cases checked against the official scorer, a whole-volume brute force, evaluate end to end."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
from scipy import ndimage
from surface_distance import compute_robust_hausdorff, compute_surface_distances

from brats_lightning.data.datasets import DATASETS
from brats_lightning.data.labels import BRATS2023, BRATS2024_GLI, LabelConvention, region_masks
from brats_lightning.evaluate import RULE_NAMES, case_columns
from brats_lightning.lesionwise import RULES, LesionRules, LesionScore, case_lesion_metrics

GLI = RULES["brats2024-gli"]
NETC, SNFH, ET, RC = 1, 2, 3, 4


def paint(labels: np.ndarray, code: int, *ranges: tuple[int, int]) -> None:
    labels[tuple(slice(a, b) for a, b in ranges)] = code


def scores(pred: np.ndarray, gt: np.ndarray, rules: LesionRules, convention: LabelConvention = BRATS2024_GLI,
           spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict[str, LesionScore]:
    out = case_lesion_metrics(region_masks(pred, convention, rules.formed),
                              region_masks(gt, convention, rules.formed), spacing, rules)
    return {r: LesionScore(*(out[f"lw_{m}_{r}"] for m in ("dice", "hd95", "tp", "fp", "fn")))
            for r in rules.scored}


def test_hand_worked_post_treatment_glioma_case() -> None:
    """An ET bar with two NETC lesions touching it (the second not predicted), a found and a missed RC, a
    false-positive ET cube. The numbers were checked against the official metrics_GLI.py."""
    gt = np.zeros((40, 24, 24), np.uint8)
    paint(gt, ET, (4, 8), (4, 8), (2, 22))       # 320 voxels
    paint(gt, NETC, (8, 12), (4, 8), (2, 5))     # n1, 48 voxels, touches the bar
    paint(gt, NETC, (8, 12), (4, 8), (19, 22))   # n2, 48 voxels, touches the bar; 14 slices from n1
    paint(gt, RC, (4, 8), (14, 18), (4, 8))      # found cavity, 64 voxels
    paint(gt, RC, (28, 32), (14, 18), (14, 18))  # missed cavity
    pred = gt.copy()
    paint(pred, 0, (8, 12), (4, 8), (19, 22))
    paint(pred, 0, (28, 32), (14, 18), (14, 18))
    paint(pred, ET, (30, 34), (2, 6), (2, 6))    # false positive, 64 voxels (> 10: not removed)
    got = scores(pred, gt, GLI)
    # ET: the bar found exactly (1, 0) + one FP (0, 337): means over 2
    assert got["et"] == LesionScore(0.5, 168.5, 1, 1, 0)
    # NETC: n1 and n2 are two lesions by the NETC dilation (5), but both touch the one ET lesion, so the
    # cross-tissue step makes them one lesion of 96 voxels: Dice 2 x 48 / (48 + 96) = 2/3; HD95 17 mm, the
    # far face of n2 (z = 22) to n1's (z = 5). Scored per dilation group it would be (0.5, 168.5, 1, 0, 1).
    assert got["netc"].dice == pytest.approx(2 / 3) and got["netc"].hd95 == pytest.approx(17.0)
    assert (got["netc"].tp, got["netc"].fp, got["netc"].fn) == (1, 0, 0)
    # RC: one found (1, 0), one missed (0, 337)
    assert got["rc"] == LesionScore(0.5, 168.5, 1, 0, 1)
    # TC = WT (no SNFH, RC not in WT): one lesion of 416 voxels, 368 predicted (Dice 736 / 784, HD95 3 mm:
    # n2 lies 1-4 mm from the predicted bar) + the FP: ((736 / 784) / 2, (3 + 337) / 2)
    for region in ("tc", "wt"):
        assert got[region].dice == pytest.approx(736 / 784 / 2) and got[region].hd95 == pytest.approx(170.0)
        assert (got[region].tp, got[region].fp, got[region].fn) == (1, 1, 0)
    assert got["snfh"] == LesionScore(1.0, 0.0, 0, 0, 0)  # both empty


def test_cross_tissue_merge_follows_the_smallest_touched_label() -> None:
    """NETC lesion A touches ET lesions e1 and e2, NETC lesion B only e2: the scorer keys A by e1 (its
    smallest touched label: e1 comes first in scan order), B by e2, so they stay two lesions."""
    gt = np.zeros((30, 48, 12), np.uint8)
    paint(gt, ET, (2, 6), (4, 8), (4, 8))      # e1
    paint(gt, NETC, (6, 16), (4, 8), (4, 8))   # A
    paint(gt, ET, (16, 20), (4, 40), (4, 8))   # e2
    paint(gt, NETC, (16, 20), (40, 44), (4, 8))  # B
    assert scores(gt, gt, GLI)["netc"] == LesionScore(1.0, 0.0, 2, 0, 0)


def test_small_predicted_lesions_are_removed_not_false_positives() -> None:
    gt = np.zeros((30, 24, 24), np.uint8)
    paint(gt, ET, (4, 8), (4, 8), (4, 8))
    pred = gt.copy()
    paint(pred, ET, (20, 22), (15, 17), (15, 17))  # 8 voxels <= 10: removed (ET)
    paint(pred, SNFH, (20, 23), (2, 5), (15, 17))  # 18 voxels <= 20: removed (SNFH, and in WT)
    got = scores(pred, gt, GLI)
    assert got["et"] == got["wt"] == LesionScore(1.0, 0.0, 1, 0, 0)
    assert got["snfh"] == LesionScore(1.0, 0.0, 0, 0, 0)


# ---------------------------------------------------------------- brute force (the scorer's steps, whole)

STRUCTURE = ndimage.generate_binary_structure(3, 2)


def brute_lesions(mask: np.ndarray, dilation: int, min_pred_voxels: float | None) -> np.ndarray:
    """Lesion labels: the dilated mask's 26-connected components on the mask; predicted ones of at most
    ``min_pred_voxels`` voxels zeroed."""
    labels = cc3d.connected_components(ndimage.binary_dilation(mask, STRUCTURE, iterations=dilation),
                                       connectivity=26) * mask
    if min_pred_voxels is not None:
        ids, counts = np.unique(labels[labels > 0], return_counts=True)
        labels[np.isin(labels, ids[counts <= min_pred_voxels])] = 0
    return labels


def brute_relabel(labels: np.ndarray, partner: np.ndarray) -> np.ndarray:
    """Each lesion touching partner lesions takes a new label keyed by the smallest touched partner label."""
    out, new = labels.copy(), {}
    for label in np.unique(labels)[1:]:
        touched = np.unique(partner[ndimage.binary_dilation(labels == label, STRUCTURE)])
        touched = touched[touched > 0]
        if touched.size:
            out[labels == label] = new.setdefault(int(touched.min()), int(labels.max()) + 1 + len(new))
    return out


def brute_force(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float, float],
                rules: LesionRules, convention: LabelConvention) -> dict[str, LesionScore]:
    """The 2024 scorer's algorithm written plainly on whole volumes."""
    out, missed = {}, rules.missed(gt.shape)
    sides = []
    for labels, removal in ((gt, False), (pred, True)):
        masks = dict(zip(rules.formed, region_masks(labels, convention, rules.formed), strict=True))
        sides.append({r: brute_lesions(masks[r], rules.region(r).dilation,
                                       rules.region(r).min_pred_voxels if removal else None) for r in masks})
    for region in rules.scored:
        gt_lab, pred_lab = sides[0][region], sides[1][region]
        for partner in rules.region(region).merge_with:
            gt_lab = brute_relabel(gt_lab, sides[0][partner])
            pred_lab = brute_relabel(pred_lab, sides[1][partner])
        dice, hd95, matched, tp, fn = [], [], set(), 0, 0
        for k in np.unique(gt_lab)[1:]:
            lesion = gt_lab == k
            touching = ndimage.binary_dilation(lesion, STRUCTURE, iterations=rules.region(region).dilation)
            hits = set(np.unique(pred_lab[touching]).tolist()) - {0}
            matched |= hits
            if lesion.sum() * np.prod(spacing) <= rules.region(region).min_volume:
                continue
            found = np.isin(pred_lab, list(hits)) & (pred_lab > 0)
            if hits:
                tp += 1
                dice.append(2 * (found & lesion).sum() / (found.sum() + lesion.sum()))
                hd95.append(compute_robust_hausdorff(compute_surface_distances(lesion, found, spacing), 95))
            else:
                fn += 1
                dice.append(0.0)
                hd95.append(missed)
        fp = len(set(np.unique(pred_lab).tolist()) - {0} - matched)
        total = len(dice) + fp
        out[region] = (LesionScore(1.0, 0.0, tp, fp, fn) if total == 0 else LesionScore(
            sum(dice) / total, (sum(hd95) + missed * fp) / total, tp, fp, fn))
    return out


def random_labels(rng: np.random.Generator, shape: tuple[int, int, int], count: int,
                  codes: tuple[int, ...]) -> np.ndarray:
    """``count`` random ellipsoids of random codes (later ones paint over earlier ones)."""
    labels, grid = np.zeros(shape, np.uint8), np.indices(shape)
    for _ in range(count):
        centre, radii = rng.uniform(0, shape), rng.uniform(0.6, 3.0, 3)
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1
        labels[inside] = rng.choice(codes)
    return labels


@pytest.mark.parametrize(("rules_name", "seed"), [("brats2024-gli", 0), ("brats2024-gli", 1),
                                                  ("brats2024-ssa", 5), ("brats2024-met", 4)])
def test_agrees_with_the_whole_volume_brute_force(rules_name: str, seed: int) -> None:
    rules = RULES[rules_name]
    gli = rules_name != "brats2024-ssa"  # MET's codes are GLI's (4: the cavity)
    convention, codes = (BRATS2024_GLI, (1, 2, 3, 4)) if gli else (BRATS2023, (1, 2, 3))
    rng = np.random.default_rng(seed)
    shape = (30, 26, 22) if gli else (56, 48, 24)  # SSA's 50-voxel removal wants bigger, sparser lesions
    gt = random_labels(rng, shape, 24, codes)
    pred = np.roll(gt, 1, axis=seed % 3)
    extra = random_labels(rng, shape, 10, codes)
    pred[extra > 0] = extra[extra > 0]
    spacing = [(1.0, 1.0, 1.0), (1.0, 1.0, 1.5), (0.9, 1.1, 1.2)][seed % 3]
    ours = scores(pred, gt, rules, convention, spacing)
    brute = brute_force(pred, gt, spacing, rules, convention)
    assert sum(s.tp + s.fn + s.fp for s in ours.values()) > len(ours)  # several lesions per region
    for region in rules.scored:
        a, b = ours[region], brute[region]
        assert (a.tp, a.fp, a.fn) == (b.tp, b.fp, b.fn), region
        assert a.dice == pytest.approx(b.dice, abs=1e-9) and a.hd95 == pytest.approx(b.hd95, abs=1e-6), region


# ---------------------------------------------------------------- registry and evaluate

def test_every_data_set_names_rules_that_evaluate_accepts() -> None:
    for dataset in DATASETS.values():
        assert dataset.rules in RULE_NAMES, dataset.name
    columns = case_columns("brats2024-gli")
    assert columns[-6:] == tuple(f"lw_fn_{r}" for r in ("et", "tc", "wt", "netc", "snfh", "rc"))
    assert {"dice_rc", "hd95_snfh", "spec_netc"} <= set(columns) and len(columns) == 1 + 6 * (4 + 5)


def test_evaluate_scores_the_resection_cavity(synthetic_root_2024, tmp_path) -> None:
    """``evaluate --rules brats2024-gli`` on a synth --year 2024 corpus (4 mm voxels, one cavity per case):
    perfect predictions but the first case's cavity removed. The scorer removes predicted lesions of <= 20
    voxels whatever the voxel size, so a perfectly predicted cavity of 18 voxels (1152 mm^3, a GT lesion
    that counts) is missed too."""
    import nibabel as nib
    import pandas as pd

    from brats_lightning.cli import main
    from brats_lightning.data.layout import find_label_files

    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    segs = find_label_files(synthetic_root_2024)
    cavity_voxels = []
    for index, (case_id, seg) in enumerate(sorted(segs.items())):
        image = nib.load(seg)
        labels = np.asarray(image.dataobj).astype(np.uint8)
        cavity_voxels.append(int(np.count_nonzero(labels == RC)))
        assert cavity_voxels[-1] > 0, case_id
        if index == 0:
            labels[labels == RC] = 0
        nib.save(nib.Nifti1Image(labels, image.affine, image.header), pred_dir / f"{case_id}.nii.gz")
    out = tmp_path / "eval"
    assert main(["evaluate", "--rules", "brats2024-gli", "--pred", str(pred_dir), "--gt",
                 str(synthetic_root_2024), "--out", str(out), "--workers", "1"]) == 0
    cases = pd.read_csv(out / "cases.csv")
    assert tuple(cases.columns) == case_columns("brats2024-gli")
    first, *rest = cases.sort_values("case").itertuples()
    assert (first.lw_dice_rc, first.lw_hd95_rc, first.dice_rc) == (0.0, 337.0, 0.0) and first.lw_fn_rc >= 1
    assert first.lw_dice_et == 1.0  # the tumour regions stay perfect
    for row, voxels in zip(rest, cavity_voxels[1:], strict=True):
        found = voxels > GLI.region("rc").min_pred_voxels
        assert (row.lw_dice_rc, row.lw_tp_rc, row.lw_fn_rc) == ((1.0, 1, 0) if found else (0.0, 0, 1))
    assert sorted(v > 20 for v in cavity_voxels[1:]) == [False, True]  # both outcomes are exercised
    assert "LW Dice RC" in (out / "report.md").read_text()
