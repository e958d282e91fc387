"""BraTS 2020 segmentation metrics: Dice, HD95, sensitivity, specificity (docs/method.md, Evaluation).

All functions work on boolean masks of one region (ET, TC or WT); :func:`case_metrics` applies them to
the three regions of a case (channel order ``REGIONS = ("ET", "TC", "WT")``).

Rules, as the BraTS 2020 scorer applied them (paper section 3, Tables 3-4):

* Dice = 2TP / (2TP + FP + FN); sensitivity = TP / (TP + FN); specificity = TN / (TN + FP).
* HD95: the surface of a mask is ``mask XOR binary_erosion(mask)`` with the 6-connected structuring element
  (``generate_binary_structure(3, 1)``) and ``border_value=0`` (a voxel on the volume border is a surface
  voxel). Each surface voxel of one mask gets its Euclidean distance in mm (voxel spacing) to the nearest
  surface voxel of the other mask, via ``distance_transform_edt(~other_surface, sampling=spacing)``. HD95 is
  the 95th percentile of the pooled A->B and B->A distances (``np.percentile`` with its default linear
  interpolation between order statistics), not the maximum of the two directed percentiles.
* Empty masks: both empty -> Dice 1, HD95 0, sensitivity 1, specificity 1. Exactly one empty -> Dice 0,
  HD95 :data:`EMPTY_HD95` (373.13 mm, the diagonal of a 240x240x155 volume whatever the spacing),
  sensitivity 0; specificity is computed normally.
* Specificity when the ground truth fills the whole volume (no negatives, TN + FP = 0) is 1.

Speed: everything except the bounding box search runs on the union bounding box of the two masks,
never on the whole 240x240x155 volume. The crop is exact, not an approximation: erosion with
``border_value=0`` treats voxels beyond the crop as 0, and they are 0 in the full volume too (outside the
union box both masks are empty; beyond the volume scipy's ``border_value=0`` applies), so every voxel of the
crop erodes exactly as it would in the whole volume. The distance transform only needs the other mask's
surface voxels, which all lie inside the box. Voxels outside the box are true negatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:  # torch is imported by region_dice only, so that evaluate's workers start fast
    import torch

REGION_NAMES: tuple[str, ...] = ("et", "tc", "wt")
"""Lower-case region names in network channel order (ET, TC, WT), as used in metric keys."""

EMPTY_HD95: float = 373.13
"""HD95 (mm) when exactly one of the two masks is empty: the 240x240x155 diagonal, sqrt(139225) = 373.128."""

METRIC_NAMES: tuple[str, ...] = ("dice", "hd95", "sens", "spec")
METRIC_KEYS: tuple[str, ...] = tuple(f"{m}_{r}" for m in METRIC_NAMES for r in REGION_NAMES)
"""``dice_et, dice_tc, dice_wt, hd95_et, ..., spec_wt``: the columns of evaluate's ``cases.csv``."""

_SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


def _bool(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"{name}: expected a 3D mask (X, Y, Z), found shape {mask.shape}")
    return mask if mask.dtype == bool else mask.astype(bool)


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = _bool(pred, "prediction"), _bool(gt, "ground truth")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}; "
                         "both masks must be on the same voxel grid")
    return pred, gt


def bounding_box(*masks: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest box (one slice per axis) holding every True voxel of the given masks; None when all are empty.

    Works on per-axis projections (``any`` over the other axes), cheaper than building the union mask.
    """
    box = []
    for axis in range(masks[0].ndim):
        other = tuple(a for a in range(masks[0].ndim) if a != axis)
        hits = np.flatnonzero(np.logical_or.reduce([mask.any(axis=other) for mask in masks]))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: ``mask XOR erosion(mask)``, 6-connectivity; voxels on the array border are surface."""
    return _surface(_bool(mask, "mask"))


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask ^ ndimage.binary_erosion(mask, structure=_SIX_CONNECTED, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray,
                      spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (each surface voxel of ``a`` to ``b``'s surface, and ``b`` to ``a``).

    Computed on the union bounding box of the two masks (exact, see the module docstring). Both masks must
    be non-empty.

    Args:
        a: boolean mask (X, Y, Z).
        b: boolean mask on the same grid.
        spacing: voxel size in mm along (X, Y, Z) (the NIfTI header zooms).
    """
    a, b = _check_pair(a, b)
    if not a.any() or not b.any():
        raise ValueError("surface_distances needs two non-empty masks; empty masks follow the BraTS "
                         "conventions in hd95()")
    box = bounding_box(a, b)
    return _surface_distances_in_box(a[box], b[box], voxel_spacing(spacing))


def voxel_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    """``spacing`` as three positive floats (mm), or a ValueError."""
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive voxel sizes in mm, found {spacing}")
    return spacing  # type: ignore[return-value]


def _surface_distances_in_box(a: np.ndarray, b: np.ndarray,
                              spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    surface_a, surface_b = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)
    return to_b[surface_a], to_a[surface_b]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm with the BraTS empty-mask conventions."""
    return region_metrics(pred, gt, spacing, hd95=True)["hd95"]


def confusion_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) voxel counts of two boolean masks."""
    pred, gt = _check_pair(pred, gt)
    box = bounding_box(pred, gt)
    if box is None:
        return 0, 0, 0, pred.size
    return _counts_in_box(pred[box], gt[box], pred.size)


def _counts_in_box(pred: np.ndarray, gt: np.ndarray, total: int) -> tuple[int, int, int, int]:
    tp = int(np.count_nonzero(pred & gt))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(gt)) - tp
    return tp, fp, fn, total - tp - fp - fn


def _rates(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    pred_empty, gt_empty = tp + fp == 0, tp + fn == 0
    if pred_empty and gt_empty:
        return {"dice": 1.0, "sens": 1.0, "spec": 1.0}
    return {
        "dice": 2 * tp / (2 * tp + fp + fn),
        "sens": 0.0 if gt_empty else tp / (tp + fn),
        "spec": tn / (tn + fp) if tn + fp else 1.0,
    }


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice = 2TP / (2TP + FP + FN); 1 when both masks are empty."""
    return _rates(*confusion_counts(pred, gt))["dice"]


def sensitivity(pred: np.ndarray, gt: np.ndarray) -> float:
    """TP / (TP + FN); 1 when both masks are empty, 0 when only the ground truth is empty."""
    return _rates(*confusion_counts(pred, gt))["sens"]


def specificity(pred: np.ndarray, gt: np.ndarray) -> float:
    """TN / (TN + FP); 1 when both masks are empty or when there are no negatives."""
    return _rates(*confusion_counts(pred, gt))["spec"]


def region_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                   hd95: bool = True) -> dict[str, float]:
    """All metrics of one region: ``{"dice", "sens", "spec"}`` plus ``"hd95"`` (mm) when ``hd95``.

    One bounding box search, then everything on the crop (see the module docstring).
    """
    pred, gt = _check_pair(pred, gt)
    spacing = voxel_spacing(spacing)
    box = bounding_box(pred, gt)
    if box is None:
        out = _rates(0, 0, 0, pred.size)
        return {**out, "hd95": 0.0} if hd95 else out
    pred_box, gt_box = pred[box], gt[box]
    counts = _counts_in_box(pred_box, gt_box, pred.size)
    out = _rates(*counts)
    if hd95:
        tp, fp, fn, _ = counts
        if tp + fp == 0 or tp + fn == 0:
            out["hd95"] = EMPTY_HD95
        else:
            pooled = np.concatenate(_surface_distances_in_box(pred_box, gt_box, spacing))
            out["hd95"] = float(np.percentile(pooled, 95))  # linear interpolation between order statistics
    return out


def case_metrics(pred_regions: np.ndarray, gt_regions: np.ndarray,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), hd95: bool = True) -> dict[str, float]:
    """BraTS metrics of one case, all three regions.

    Args:
        pred_regions: bool (3, X, Y, Z), channels ET, TC, WT (``data.labels.labels_to_regions``).
        gt_regions: same shape, the ground truth.
        spacing: voxel size in mm along (X, Y, Z).
        hd95: compute the HD95 keys (the costly part); absent from the result when False.

    Returns:
        ``{"dice_et", "dice_tc", "dice_wt", "hd95_et", ..., "spec_wt"}`` in :data:`METRIC_KEYS` order
        (the hd95 keys only when ``hd95``), plain floats.
    """
    pred_regions, gt_regions = np.asarray(pred_regions), np.asarray(gt_regions)
    if pred_regions.shape != gt_regions.shape or pred_regions.ndim != 4 or len(pred_regions) != 3:
        raise ValueError(f"expected prediction and ground truth regions of the same shape (3, X, Y, Z) "
                         f"(ET, TC, WT), found {pred_regions.shape} and {gt_regions.shape}")
    per_region = {name: region_metrics(pred_regions[i], gt_regions[i], spacing, hd95=hd95)
                  for i, name in enumerate(REGION_NAMES)}
    return {f"{metric}_{name}": per_region[name][metric]
            for metric in METRIC_NAMES if hd95 or metric != "hd95" for name in REGION_NAMES}


def region_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-region Dice on torch tensors (any device), BraTS empty rule (both empty -> 1).

    Used every validation step during training; agrees with :func:`case_metrics`' Dice on the same masks.

    Args:
        pred: bool (B, 3, ...) predicted regions (ET, TC, WT).
        target: bool (B, 3, ...) ground truth regions, same shape.

    Returns:
        float32 (B, 3) Dice.
    """
    import torch

    if pred.shape != target.shape or pred.ndim < 3:
        raise ValueError(f"expected prediction and target of the same shape (B, 3, ...), found "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    pred, target = pred.bool().flatten(2), target.bool().flatten(2)
    intersection = (pred & target).sum(-1)
    total = pred.sum(-1) + target.sum(-1)
    # Counts are exact int64; the division runs in float64 where the device has it (as numpy does).
    dtype = torch.float32 if pred.device.type == "mps" else torch.float64
    score = (2 * intersection).to(dtype) / total.clamp(min=1).to(dtype)
    return torch.where(total == 0, torch.ones_like(score), score).float()
