"""Enhancing-tumour post-processing (beyond the paper; off by default).

BraTS scores a case whose ground truth has no enhancing tumour with ET Dice 1 only when the prediction
has none either (docs/method.md Evaluation, empty rules), so a few false-positive ET voxels cost a full
point of
Dice on that case. The usual remedy: when the predicted ET holds fewer than ``T`` voxels, relabel those
voxels NCR/NET (label 1). That keeps TC and WT unchanged (ET and NCR/NET are both tumour core).
``T`` is chosen on out-of-fold predictions of the training set (:func:`choose_et_threshold`) and applied
by ``brats-lightning predict --et-threshold T``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brats_lightning.data.labels import BRATS2020, LabelConvention

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES: tuple[int, ...] = (0, 10, 25, 50, 100, 200, 300, 500, 750, 1000)
"""Thresholds tried by default, in voxels (at 1 mm, voxels = mm^3)."""


def apply_et_threshold(labels: np.ndarray, threshold: int | None, convention: LabelConvention = BRATS2020
                       ) -> np.ndarray:
    """Relabel the whole predicted ET as NCR/NET when it has fewer than ``threshold`` voxels.

    Args:
        labels: label map (integer codes of ``convention``).
        threshold: minimum ET size in voxels; None or 0 leaves the map unchanged.
        convention: label codes.

    Returns:
        A new uint8 label map.
    """
    out = np.array(labels, dtype=np.uint8, copy=True)
    if not threshold:
        return out
    et = out == convention.et
    count = int(et.sum())
    if 0 < count < threshold:
        out[et] = convention.ncr
    return out


@dataclass(frozen=True)
class ThresholdChoice:
    """Result of :func:`choose_et_threshold`.

    Attributes:
        threshold: the chosen T (the smallest among those with the highest mean ET Dice).
        mean_dice: mean ET Dice over the cases for each candidate T.
        n_cases: number of cases scored.
    """

    threshold: int
    mean_dice: dict[int, float]
    n_cases: int


def choose_et_threshold(
    pred_dir: str | Path,
    gt_dir: str | Path,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
) -> ThresholdChoice:
    """Pick the ET size threshold that maximizes the mean ET Dice of out-of-fold predictions.

    Dice follows the BraTS rules of :func:`brats_lightning.metrics.case_metrics` (both empty = 1).

    Args:
        pred_dir: label maps ``<CASE>.nii.gz`` predicted out-of-fold (``predict --oof``), not post-processed.
        gt_dir: the labeled data set those cases come from.
        candidates: thresholds to try (voxels).

    Returns:
        The chosen threshold and the mean ET Dice of every candidate.
    """
    from brats_lightning.data.io import load_case, load_volume, to_label_map
    from brats_lightning.data.labels import get_convention, labels_to_regions
    from brats_lightning.data.layout import find_cases
    from brats_lightning.metrics import case_metrics
    from brats_lightning.predictions import label_map_paths, read_manifest

    if not candidates:
        raise ValueError("choose_et_threshold: no candidate thresholds given")
    manifest = read_manifest(pred_dir) or {}
    if manifest.get("et_threshold"):
        raise ValueError(
            f"{pred_dir}: these predictions were already post-processed (et_threshold="
            f"{manifest['et_threshold']}); choose T on predictions made without --et-threshold"
        )
    preds = label_map_paths(pred_dir)
    cases = {c.case_id: c for c in find_cases(gt_dir, require_labels=True)}
    missing = sorted(set(preds) - set(cases))
    if missing:
        raise ValueError(f"{pred_dir}: predictions for cases not in {gt_dir}: {missing}")
    if not preds:
        raise FileNotFoundError(f"{pred_dir}: no <CASE>.nii.gz predictions to choose an ET threshold on")
    kept: list[tuple[int, float, float]] = []  # (ET voxels, Dice as is, Dice with the ET relabelled)
    for case_id, path in preds.items():
        case = cases[case_id]
        _, gt, reference = load_case(case)
        pred_raw, _ = load_volume(path, dtype=None)
        pred = to_label_map(pred_raw, path)
        if pred.shape != gt.shape:
            raise ValueError(
                f"case {case_id}: prediction {path} has shape {pred.shape}, ground truth {gt.shape}")
        convention = get_convention(manifest.get("label_convention") or case.convention)
        spacing = tuple(float(s) for s in reference.header.get_zooms()[:3])
        gt_regions = labels_to_regions(gt, convention)
        count = int((pred == convention.et).sum())
        as_is = case_metrics(labels_to_regions(pred, convention), gt_regions, spacing, hd95=False)["dice_et"]
        removed = apply_et_threshold(pred, count + 1, convention)
        relabelled = case_metrics(labels_to_regions(removed, convention), gt_regions, spacing, hd95=False)
        kept.append((count, float(as_is), float(relabelled["dice_et"])))
    mean_dice = {}
    for t in sorted(set(int(c) for c in candidates)):
        scores = [relabelled if 0 < count < t else as_is for count, as_is, relabelled in kept]
        mean_dice[t] = float(np.mean(scores))
    best = max(mean_dice.values())
    threshold = min(t for t, v in mean_dice.items() if v == best)
    log.info("ET threshold: chose %d voxels (mean ET Dice %.4f on %d cases; T=0 gives %s)", threshold, best,
             len(kept), f"{mean_dice[0]:.4f}" if 0 in mean_dice else "n/a")
    return ThresholdChoice(threshold=threshold, mean_dice=mean_dice, n_cases=len(kept))
