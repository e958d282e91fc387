"""Lesion-wise Dice and HD95, the numbers that rank the BraTS 2023 and 2024 challenges (docs/method.md
Evaluation).

Our own implementation of the official BraTS 2023 lesion-wise scorer published by the challenge organisers
(public repository rachitsaluja/BraTS-2023-Metrics, ``metrics.py``: ``get_LesionWiseScores`` and
``get_LesionWiseResults``), written to give the same numbers. Per region mask (ET, TC or WT):

1. GT lesions: the GT mask is dilated ``dilation`` times with the 18-connected structuring element
   (``generate_binary_structure(3, 2)``, clipped at the volume border); each 26-connected component of the
   dilated mask is one lesion, made of the GT voxels inside it (nearby 26-connected GT components merge).
2. Predicted lesions: the 26-connected components of the predicted mask. A predicted lesion matches a GT
   lesion when it touches that lesion's dilation (which is the dilated component). One predicted lesion can
   match several GT lesions.
3. Per GT lesion: Dice and HD95 between the lesion and the union of its matched predicted lesions (whole
   components, also their parts outside the dilation); Dice 0 and HD95 374 when none matched.
4. GT lesions of volume <= ``min_volume`` mm^3 (voxel count x voxel volume) are left out: neither TP nor FN,
   their Dice and HD95 not averaged.
5. False positives: predicted lesions that match no GT lesion (dropped small ones included), each Dice 0
   and HD95 374.
6. Case score: lesion-wise Dice = (sum of kept lesions' Dice) / (kept + FP); lesion-wise HD95 = (sum of kept
   lesions' HD95 + 374 FP) / (kept + FP); with kept + FP = 0 (e.g. both masks empty) Dice 1 and HD95 0.

HD95 (per lesion and full volume) follows the DeepMind surface-distance definition that the official scorer
ships: surface elements are the 2x2x2 cubes that are partly inside the mask, weighted by their
marching-cubes area in mm^2 (the area table comes from the ``surface-distance`` package, the same table);
each direction's 95th percentile is area-weighted (first distance whose cumulative area reaches 95 %), and
HD95 is the larger of the two directions. This differs from the BraTS 2020 HD95 in
:mod:`brats_lightning.metrics` (voxel surfaces, pooled percentile, 373.13 for an empty mask).

Quirks of the official code that change numbers, matched here:

* the volume threshold uses ``<=`` (a lesion of exactly ``min_volume`` mm^3 is dropped);
* a predicted lesion touching only a dropped GT lesion is not a false positive;
* a predicted lesion matched to two GT lesions counts whole in each lesion's Dice;
* "no lesion above the threshold and no false positive" scores Dice 1, HD95 0 (the NaN of 0/0 replaced),
  whatever the prediction inside dropped lesions;
* full-volume HD95 with exactly one empty mask is 374 (the scorer's inf replaced by 374), not 373.13;
* the official code takes the voxel size from the prediction's header; we take the ground truth's (evaluate
  refuses predictions on another grid, so both are the same).

The BraTS 2024 rules (``brats2024-gli``, ``brats2024-ssa``, ``brats2024-met``; public repository
rachitsaluja/BraTS-2024-Metrics, ``metrics_GLI.py``, ``metrics_SSA.py`` and ``metrics_MET.py``, newest
commits; GLI's and SSA's lesion-wise numbers are unchanged since July 2024, later commits only add NSD) differ
from the 2023 ones, and we match each difference:

* regions: 2024 GLI scores ET, TC = NETC | ET, WT = NETC | SNFH | ET (WT holds no cavity), NETC, SNFH and the
  resection cavity RC (label 4); SSA scores ET, TC, WT;
* per-region parameters (:class:`RegionRules`): GLI dilates NETC and RC 5 times, the others 3 (SNFH too: the
  scorer tests for the misspelt "SFNH"), and drops GT lesions <= 10 mm^3 (ET) or <= 20 mm^3; SSA 3 and 50;
* predicted lesions are merged by dilation exactly like the GT's, and those of <= 10 (GLI ET), 20 (GLI
  others) or 50 (SSA) *voxels*, whatever the voxel size, are removed before anything is scored: they are
  neither false positives nor part of a matched lesion's Dice, and the full-volume Dice (``Legacy_Dice``)
  is taken on what is left;
* cross-tissue combining (``combine_lesions_tissues``, GT and prediction alike): GLI merges NETC lesions
  through the ET then the RC lesions they touch, ET through NETC then RC, RC through ET then NETC, SNFH
  through ET, RC then NETC; SSA merges ET through NETC. "Touch" is overlap or 18-adjacency; in each step a
  group touching partner lesions is keyed by the partner lesion with the smallest label in the scorer's
  numbering (cc3d's scan order of the dilated mask), and groups with one key become one lesion
  (:func:`_combined` has the details);
* GLI's missed-lesion and false-positive HD95 is 337 mm, not 374; MET's is the volume's diagonal in voxels
  (MET also scores RC, dilation 1, thresholds 2; ET merged through NETC as in SSA);
* not matched: the scorer's full-volume ``Legacy_HD95``, ``Sensitivity`` and ``Specificity`` are computed on
  images of lesion numbers, not masks (its surface code reads the numbers as voxel values, its sensitivity
  counts voxels labelled 1 only), so they depend on the numbering; our full-volume columns use the masks.

Speed: the official script runs several whole-volume operations per lesion (seconds per case). Here the GT
dilation, the components and every per-lesion step run on bounding boxes: the GT box plus the dilation
margin, then each lesion's box united with its matched predicted lesions' boxes. The crops are exact: the
dilation cannot reach beyond ``dilation`` voxels of the GT, and the surface elements and distances only
depend on voxels of the two masks, which lie inside the box (outside it both masks are 0, as scipy's and
the scorer's zero padding assume).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage

from brats_lightning.metrics import METRIC_NAMES, REGION_NAMES, bounding_box, region_metrics, voxel_spacing

MISSED_HD95: float = 374.0
"""HD95 (mm) of a missed GT lesion, of a false-positive lesion, and of a full-volume mask with one empty."""

LESION_METRIC_NAMES: tuple[str, ...] = ("dice", "hd95", "tp", "fp", "fn")


def lesion_keys(regions: Sequence[str]) -> tuple[str, ...]:
    """The lesion-wise cases.csv columns of ``regions``: ``lw_dice_<r>...``, then hd95, tp, fp, fn."""
    return tuple(f"lw_{m}_{r}" for m in LESION_METRIC_NAMES for r in regions)


def metric_keys(regions: Sequence[str]) -> tuple[str, ...]:
    """The full-volume cases.csv columns of ``regions`` (:data:`METRIC_KEYS` for ET, TC, WT)."""
    return tuple(f"{m}_{r}" for m in METRIC_NAMES for r in regions)


LESION_KEYS: tuple[str, ...] = lesion_keys(REGION_NAMES)
"""``lw_dice_et, lw_dice_tc, lw_dice_wt, lw_hd95_et, ..., lw_fn_wt``: the lesion-wise columns of cases.csv."""

_EIGHTEEN_CONNECTED = ndimage.generate_binary_structure(3, 2)


@dataclass(frozen=True)
class RegionRules:
    """How a BraTS 2024 scorer forms and scores the lesions of one region (module docstring, 2024 rules).

    Attributes:
        region: the region as cases.csv spells it (``et``, ``tc``, ``wt``, ``netc``, ``snfh``, ``rc``).
        dilation: iterations of the 18-connected dilation that merges and matches this region's lesions.
        min_volume: GT lesions of at most this volume (mm^3) are left out.
        min_pred_voxels: predicted lesions (merged by dilation like the GT's) of at most this many voxels are
            removed before anything is scored.
        merge_with: the regions whose lesions join this region's lesions, one step each, in this order (the
            scorers' ``combine_lesions_*``).
    """

    region: str
    dilation: int
    min_volume: float
    min_pred_voxels: float
    merge_with: tuple[str, ...] = ()


@dataclass(frozen=True)
class LesionRules:
    """The lesion-wise parameters of one challenge, as the official scorer sets them.

    Attributes:
        name: the ``evaluate --rules`` name, e.g. ``brats2023-gli``.
        challenge: the official scorer's challenge name, e.g. ``BraTS-GLI``.
        dilation: iterations of the 18-connected dilation that merges and matches lesions (2024 rules: the
            scorer's default, overridden per region in ``tissues``).
        min_volume: GT lesions of at most this volume (mm^3) are left out (2024: the default, as above).
        tissues: the 2024 rules: every region the scorer forms, scored ones and merge partners; empty: the
            2023 rules (ET, TC, WT, predicted lesions are 26-connected components, none removed).
        scored: the regions scored, in cases.csv order.
        missed_hd95: HD95 (mm) of a missed GT lesion, of a false positive, of a full-volume mask with one
            empty; None: the volume's diagonal in voxels, sqrt(X^2 + Y^2 + Z^2) (the 2024 MET scorer's).
    """

    name: str
    challenge: str
    dilation: int
    min_volume: float
    tissues: tuple[RegionRules, ...] = ()
    scored: tuple[str, ...] = REGION_NAMES
    missed_hd95: float | None = MISSED_HD95

    def missed(self, shape: Sequence[int]) -> float:
        """The missed-lesion HD95 on a volume of ``shape``."""
        return self.missed_hd95 if self.missed_hd95 is not None else math.sqrt(sum(n * n for n in shape))

    @property
    def formed(self) -> tuple[str, ...]:
        """The regions whose masks the scorer needs (cases.csv spelling): scored ones, then merge partners."""
        return tuple(t.region for t in self.tissues) or self.scored

    def region(self, name: str) -> RegionRules:
        """The rules of region ``name`` (2023 rules: the challenge's dilation and threshold, no removal)."""
        return next((t for t in self.tissues if t.region == name),
                    RegionRules(name, self.dilation, self.min_volume, 0.0))

    def describe(self) -> str:
        """The parameters in words, for report.md."""
        if not self.tissues:
            return f"dilation {self.dilation}, lesions <= {self.min_volume:g} mm^3 left out"
        parts = []
        for name in self.scored:
            t = self.region(name)
            partners = "/".join(m.upper() for m in t.merge_with)
            parts.append(f"{name.upper()}: dilation {t.dilation}, GT lesions <= {t.min_volume:g} mm^3 left "
                         f"out, predicted lesions <= {t.min_pred_voxels:g} voxels removed"
                         + (f", merged through touching {partners} lesions" if partners else ""))
        missed = "the volume diagonal in voxels" if self.missed_hd95 is None else f"{self.missed_hd95:g} mm"
        return "; ".join(parts) + f"; missed lesion HD95 {missed}"


def _rules_2024(name: str, challenge: str, dilation: int, min_volume: float, missed_hd95: float | None,
                scored: tuple[str, ...], *tissues: RegionRules) -> LesionRules:
    return LesionRules(name, challenge, dilation, min_volume, tissues, scored, missed_hd95)


_GLI_2024 = ("et", "tc", "wt", "netc", "snfh", "rc")

RULES: dict[str, LesionRules] = {rules.name: rules for rules in (
    LesionRules("brats2023-gli", "BraTS-GLI", 3, 50.0),
    LesionRules("brats2023-ssa", "BraTS-SSA", 3, 50.0),
    LesionRules("brats2023-men", "BraTS-MEN", 1, 50.0),
    LesionRules("brats2023-ped", "BraTS-PED", 3, 50.0),
    LesionRules("brats2023-met", "BraTS-MET", 1, 2.0),
    # The 2024 evaluation workflow scores BraTS-MEN with the 2023 metrics.py, same parameters.
    LesionRules("brats2024-men", "BraTS-MEN", 1, 50.0),
    # BraTS 2024 post-treatment glioma (rachitsaluja/BraTS-2024-Metrics, metrics_GLI.py). Quirks kept:
    # SNFH is dilated 3 times, not 5 (the scorer tests for "SFNH"); the missed-lesion HD95 is 337, not 374.
    _rules_2024("brats2024-gli", "BraTS-GLI", 3, 20.0, 337.0, _GLI_2024,
                RegionRules("et", 3, 10.0, 10, ("netc", "rc")),
                RegionRules("tc", 3, 20.0, 20),
                RegionRules("wt", 3, 20.0, 20),
                RegionRules("netc", 5, 20.0, 20, ("et", "rc")),
                RegionRules("snfh", 3, 20.0, 20, ("et", "rc", "netc")),
                RegionRules("rc", 5, 20.0, 20, ("et", "netc"))),
    # BraTS 2024 sub-Saharan Africa glioma (metrics_SSA.py): ET lesions merged through touching NETC ones.
    _rules_2024("brats2024-ssa", "BraTS-SSA", 3, 50.0, 374.0, REGION_NAMES,
                RegionRules("et", 3, 50.0, 50, ("netc",)),
                RegionRules("tc", 3, 50.0, 50),
                RegionRules("wt", 3, 50.0, 50),
                RegionRules("netc", 3, 50.0, 50)),
    # BraTS 2024 brain metastases (metrics_MET.py, newest commit): SSA's steps with dilation 1, thresholds
    # 2 (mm^3 for GT, voxels for predicted lesions), the cavity RC scored too, and the missed-lesion HD95
    # the volume's diagonal in voxels.
    _rules_2024("brats2024-met", "BraTS-MET", 1, 2.0, None, ("et", "tc", "wt", "rc"),
                RegionRules("et", 1, 2.0, 2, ("netc",)),
                RegionRules("tc", 1, 2.0, 2),
                RegionRules("wt", 1, 2.0, 2),
                RegionRules("rc", 1, 2.0, 2),
                RegionRules("netc", 1, 2.0, 2)),
)}
"""Lesion-wise rules by ``--rules`` name (the official ``get_LesionWiseResults`` parameters)."""


@dataclass(frozen=True)
class LesionScore:
    """Lesion-wise result of one region of one case (the official ``LesionWise_Score_*`` and ``Num_*``)."""

    dice: float
    hd95: float
    tp: int
    fp: int
    fn: int


@functools.lru_cache(maxsize=16)
def _surfel_areas(spacing: tuple[float, float, float]) -> np.ndarray:
    from surface_distance.lookup_tables import create_table_neighbour_code_to_surface_area

    return create_table_neighbour_code_to_surface_area(spacing)


def _surfels(mask: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(border mask, area per border element) of a crop that has a zero layer on its high side."""
    from surface_distance.lookup_tables import ENCODE_NEIGHBOURHOOD_3D_KERNEL

    codes = ndimage.correlate(mask.astype(np.uint8), ENCODE_NEIGHBOURHOOD_3D_KERNEL, mode="constant", cval=0)
    border = (codes != 0) & (codes != 255)
    return border, _surfel_areas(spacing)[codes[border]]


def _directed_percentile(distances: np.ndarray, areas: np.ndarray) -> float:
    """Area-weighted 95th percentile: sort by (distance, area) as the scorer's ``sorted(zip(...))`` does."""
    order = np.lexsort((areas, distances))
    distances, areas = distances[order], areas[order]
    cumulative = np.cumsum(areas) / np.sum(areas)
    return float(distances[min(int(np.searchsorted(cumulative, 95 / 100.0)), len(distances) - 1)])


def _hd95_in_crop(gt: np.ndarray, pred: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Surface-element HD95 of two non-empty masks, given on a crop that holds both."""
    padded = [np.pad(m, ((0, 1),) * 3) for m in (gt, pred)]  # the scorer's one zero layer on the high side
    (border_gt, areas_gt), (border_pred, areas_pred) = (_surfels(m, spacing) for m in padded)
    to_pred = ndimage.distance_transform_edt(~border_pred, sampling=spacing)[border_gt]
    to_gt = ndimage.distance_transform_edt(~border_gt, sampling=spacing)[border_pred]
    return max(_directed_percentile(to_pred, areas_gt), _directed_percentile(to_gt, areas_pred))


def surface_hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 missed: float = MISSED_HD95) -> float:
    """Full-volume HD95 like the BraTS 2023 scorer's ``Legacy_HD95`` (surface elements, module docstring).

    Both masks empty: 0; exactly one empty: ``missed`` (374; 337 under the 2024 GLI rules).
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    box = bounding_box(pred, gt)
    if box is None:
        return 0.0
    if not pred.any() or not gt.any():
        return missed
    return _hd95_in_crop(gt[box], pred[box], voxel_spacing(spacing))


Box = tuple[tuple[int, int], ...]
"""A box in volume coordinates: (start, stop) per axis."""


def _box(slices: Sequence[slice], origin: Sequence[int] = (0, 0, 0)) -> Box:
    return tuple((int(s.start) + o, int(s.stop) + o) for s, o in zip(slices, origin, strict=True))


def _union(boxes: Sequence[Box]) -> Box:
    return tuple((min(b[a][0] for b in boxes), max(b[a][1] for b in boxes)) for a in range(3))


def _window(array: np.ndarray, origin: Sequence[int], box: Box) -> tuple[np.ndarray, tuple[slice, ...]]:
    """The part of ``array`` (placed at ``origin``) inside ``box``, and where that part lies in ``box``."""
    source, target = [], []
    for (start, stop), o, size in zip(box, origin, array.shape, strict=True):
        lo, hi = max(start, o), min(stop, o + size)
        hi = max(hi, lo)
        source.append(slice(lo - o, hi - o))
        target.append(slice(lo - start, hi - start))
    return array[tuple(source)], tuple(target)


def _in_box(array: np.ndarray, origin: Sequence[int], box: Box, keep: np.ndarray) -> np.ndarray:
    """Bool mask on ``box``: voxels of the labelled ``array`` (at ``origin``) whose label is in ``keep``."""
    out = np.zeros(tuple(hi - lo for lo, hi in box), bool)
    window, where = _window(array, origin, box)
    out[where] = np.isin(window, keep)
    return out


@dataclass(frozen=True)
class _Lesion:
    """One GT lesion: its 26-connected GT components, voxel count, box, and each component's dilation."""

    components: np.ndarray
    count: int
    box: Box
    dilations: list[tuple[Box, np.ndarray]]


def _expand(box: Box, margin: int, shape: Sequence[int]) -> Box:
    return tuple((max(lo - margin, 0), min(hi + margin, n)) for (lo, hi), n in zip(box, shape, strict=True))


def _touch(a: tuple[Box, np.ndarray], b: tuple[Box, np.ndarray], shape: Sequence[int]) -> bool:
    """Whether two dilated components overlap or are 26-neighbours (then the dilated mask joins them)."""
    (box_a, mask_a), (box_b, mask_b) = a, b
    grown = _expand(box_a, 1, shape)
    if any(hi_b <= lo or hi <= lo_b for (lo, hi), (lo_b, hi_b) in zip(grown, box_b, strict=True)):
        return False
    near_a = np.zeros(tuple(hi - lo for lo, hi in grown), bool)
    _, where = _window(mask_a, [lo for lo, _ in box_a], grown)
    near_a[where] = mask_a
    near_a = ndimage.binary_dilation(near_a, np.ones((3, 3, 3), bool))
    window, where = _window(mask_b, [lo for lo, _ in box_b], grown)
    return bool(np.any(near_a[where] & window))


def _gt_lesions(gt: np.ndarray, dilation: int) -> tuple[np.ndarray, tuple[int, ...], list[_Lesion]]:
    """GT lesions as the scorer forms them (module docstring, step 1), computed component by component.

    The whole-mask dilation is the union of the components' dilations, so its 26-connected components are
    the groups of components whose dilations overlap or touch; each dilation runs on the component's box
    plus ``dilation`` voxels (clipped at the volume border, as scipy clips the whole-volume one).

    Returns:
        (26-connected GT component labels on the GT box, the box's origin, the lesions).
    """
    gt_box = bounding_box(gt)
    if gt_box is None:
        return np.zeros((0, 0, 0), np.uint8), (0, 0, 0), []
    origin = tuple(s.start for s in gt_box)
    labels = cc3d.connected_components(gt[gt_box], connectivity=26)
    stats = cc3d.statistics(labels)
    boxes = [_box(b, origin) if b is not None else () for b in stats["bounding_boxes"]]
    dilated = []
    for c in range(1, len(boxes)):
        box = _expand(boxes[c], dilation, gt.shape)
        component = _in_box(labels, origin, box, np.array([c]))
        dilated.append((box, ndimage.binary_dilation(component, _EIGHTEEN_CONNECTED, iterations=dilation)))
    parent = list(range(len(dilated)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(dilated)):
        for j in range(i + 1, len(dilated)):
            if root(i) != root(j) and _touch(dilated[i], dilated[j], gt.shape):
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(dilated)):
        groups.setdefault(root(i), []).append(i)
    lesions = [_Lesion(np.array([i + 1 for i in members]),
                       sum(int(stats["voxel_counts"][i + 1]) for i in members),
                       _union([boxes[i + 1] for i in members]), [dilated[i] for i in members])
               for members in groups.values()]
    return labels, origin, lesions


@dataclass(frozen=True)
class _LesionSet:
    """The lesions of one mask: 26-connected component labels on a box, and the lesions made of them."""

    labels: np.ndarray
    origin: tuple[int, ...]
    lesions: list[_Lesion]

    def lookup(self) -> np.ndarray:
        """Component label -> lesion index + 1 (0: background, or a component of no kept lesion)."""
        table = np.zeros(int(self.labels.max(initial=0)) + 1, np.int64)
        for index, lesion in enumerate(self.lesions):
            table[lesion.components] = index + 1
        return table

    def mask(self, box: Box, lesions: Sequence[int]) -> np.ndarray:
        """Bool mask on ``box`` of the voxels of ``lesions`` (indices)."""
        components = [self.lesions[i].components for i in lesions]
        return _in_box(self.labels, self.origin, box, np.concatenate(components) if components else
                       np.zeros(0, np.int64))


def _grouped(mask: np.ndarray, dilation: int) -> _LesionSet:
    """GT-style lesions (module docstring, step 1): components merged where their dilations touch."""
    return _LesionSet(*_gt_lesions(mask, dilation))


def _components(mask: np.ndarray) -> _LesionSet:
    """2023 predicted lesions: each 26-connected component is one lesion."""
    box = bounding_box(mask)
    if box is None:
        return _LesionSet(np.zeros((0, 0, 0), np.uint8), (0, 0, 0), [])
    origin = tuple(s.start for s in box)
    labels = cc3d.connected_components(mask[box], connectivity=26)
    stats = cc3d.statistics(labels)
    counts, boxes = stats["voxel_counts"], stats["bounding_boxes"]
    lesions = [_Lesion(np.array([c]), int(counts[c]), _box(boxes[c], origin), [])
               for c in range(1, len(counts))]
    return _LesionSet(labels, origin, lesions)


def _score(gt: _LesionSet, pred: _LesionSet, spacing: tuple[float, float, float], min_volume: float,
           missed_hd95: float) -> LesionScore:
    """Match ``pred``'s lesions to ``gt``'s and score them (module docstring, steps 2-6)."""
    sx, sy, sz = spacing
    pred_lookup = pred.lookup()
    kept_dice, kept_hd95, matched_pred = [], [], set()
    tp = fn = 0
    for lesion in gt.lesions:
        touching = []
        for box, dilation in lesion.dilations:
            window, where = _window(pred.labels, pred.origin, box)
            touching.append(pred_lookup[window[dilation[where]]])
        matches = np.unique(np.concatenate(touching))
        matches = [int(m) - 1 for m in matches[matches != 0]]
        matched_pred.update(matches)
        volume = lesion.count * sx * sy * sz  # the scorer's np.sum(gt_tmp) * sx * sy * sz
        if volume <= min_volume:
            continue
        if not matches:
            fn += 1
            kept_dice.append(0.0)
            kept_hd95.append(missed_hd95)
            continue
        tp += 1
        box = _union([lesion.box, *(pred.lesions[m].box for m in matches)])
        gt_mask = _in_box(gt.labels, gt.origin, box, lesion.components)
        pred_mask = pred.mask(box, matches)
        pred_volume = sum(pred.lesions[m].count for m in matches)
        kept_dice.append(2.0 * int(np.count_nonzero(gt_mask & pred_mask)) / (pred_volume + lesion.count))
        kept_hd95.append(_hd95_in_crop(gt_mask, pred_mask, spacing))
    fp = len(pred.lesions) - len(matched_pred)
    total = len(kept_dice) + fp
    if total == 0:  # the scorer's 0/0 = NaN, replaced by Dice 1 and HD95 0
        return LesionScore(1.0, 0.0, tp, fp, fn)
    hd95 = (float(np.sum(kept_hd95)) + fp * missed_hd95) / total
    return LesionScore(float(np.sum(kept_dice)) / total, hd95, tp, fp, fn)


def _check_masks(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"expected prediction and ground truth masks of one 3D shape, found {pred.shape} "
                         f"and {gt.shape}")
    return pred, gt


def lesion_scores(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                  rules: LesionRules) -> LesionScore:
    """Lesion-wise Dice, HD95 and lesion counts of one region under 2023 rules (the module docstring's).

    Args:
        pred: bool (X, Y, Z) predicted region.
        gt: bool (X, Y, Z) ground truth region, same grid.
        spacing: voxel size in mm along (X, Y, Z).
        rules: the challenge's dilation and volume threshold (:data:`RULES`).
    """
    pred, gt = _check_masks(pred, gt)
    if rules.dilation < 1:
        raise ValueError(f"{rules.name}: dilation must be at least 1, found {rules.dilation}")
    return _score(_grouped(gt, rules.dilation), _components(pred), voxel_spacing(spacing), rules.min_volume,
                  rules.missed(gt.shape))


# ---------------------------------------------------------------- the 2024 rules

def _scan_rank(lesions: Sequence[_Lesion]) -> np.ndarray:
    """Each lesion's label in the scorer's numbering, from 0: cc3d numbers the dilated mask's components in
    the order of their first voxel in C order (scipy's dilation returns a C-ordered array), i.e. by the
    lexicographically smallest (x, y, z) of the lesion's dilation."""
    keys = []
    for lesion in lesions:
        firsts = []
        for box, dilated in lesion.dilations:
            first = np.unravel_index(int(np.argmax(dilated)), dilated.shape)
            firsts.append(tuple(int(f) + lo for f, (lo, _) in zip(first, box, strict=True)))
        keys.append(min(firsts))
    rank = np.empty(len(keys), np.int64)
    rank[sorted(range(len(keys)), key=keys.__getitem__)] = np.arange(len(keys))
    return rank


def _touched(lesion: _Lesion, own: _LesionSet, other: _LesionSet, other_rank: np.ndarray,
             other_lookup: np.ndarray, shape: Sequence[int]) -> set[int]:
    """Scan ranks of ``other``'s lesions that ``lesion`` (of ``own``) touches: overlap or 18-neighbours, the
    scorer's ``get_touching_labels`` (one 18-connected dilation)."""
    box = _expand(lesion.box, 1, shape)
    grown = ndimage.binary_dilation(_in_box(own.labels, own.origin, box, lesion.components),
                                    _EIGHTEEN_CONNECTED)
    window, where = _window(other.labels, other.origin, box)
    hits = other_lookup[window[grown[where]]]
    return {int(other_rank[h - 1]) for h in np.unique(hits[hits != 0])}


def _merge(lesions: Sequence[_Lesion]) -> _Lesion:
    return _Lesion(np.concatenate([x.components for x in lesions]), sum(x.count for x in lesions),
                   _union([x.box for x in lesions]), [d for x in lesions for d in x.dilations])


def _combined(name: str, sets: dict[str, _LesionSet], rules: LesionRules, shape: Sequence[int]) -> _LesionSet:
    """Region ``name``'s lesions after the scorer's cross-tissue step (``combine_lesions_tissues``).

    One step per partner region, in ``merge_with`` order, each on the previous step's groups and the partner's
    lesions before any combining (the scorer reads the partners' ``*_cc`` files, never the ``*_combined``
    ones, so its second pass repeats the first): every group touching partner lesions takes the label of the
    touched partner lesion with the smallest label, and groups with one label merge (``relabel_nifti_image``).
    Its ``len(touching_labels) > 1`` test only skips steps that merge nothing.
    """
    own = sets[name]
    groups = [[i] for i in range(len(own.lesions))]
    for partner in rules.region(name).merge_with:
        other = sets[partner]
        rank, lookup = _scan_rank(other.lesions), other.lookup()
        touches = [_touched(x, own, other, rank, lookup, shape) for x in own.lesions]
        merged: dict[int, list[int]] = {}
        kept = []
        for group in groups:
            touched = set().union(*(touches[i] for i in group))
            if touched:
                merged.setdefault(min(touched), []).extend(group)
            else:
                kept.append(group)
        groups = kept + list(merged.values())
    return _LesionSet(own.labels, own.origin, [_merge([own.lesions[i] for i in g]) for g in groups])


def _pred_kept(pred: np.ndarray, region: RegionRules) -> _LesionSet:
    """2024 predicted lesions: merged by dilation like the GT's, those of <= ``min_pred_voxels`` removed."""
    found = _grouped(pred, region.dilation)
    return _LesionSet(found.labels, found.origin,
                      [x for x in found.lesions if x.count > region.min_pred_voxels])


def _case_2024(pred_regions: np.ndarray, gt_regions: np.ndarray, spacing: tuple[float, float, float],
               rules: LesionRules) -> tuple[dict[str, LesionScore], dict[str, np.ndarray]]:
    """Per scored region: the lesion-wise score, and the predicted mask the scorer keeps."""
    formed = rules.formed
    shape = gt_regions.shape[1:]
    gt_sets = {n: _grouped(gt_regions[i], rules.region(n).dilation) for i, n in enumerate(formed)}
    pred_sets = {n: _pred_kept(pred_regions[i], rules.region(n)) for i, n in enumerate(formed)}
    scores, kept = {}, {}
    for name in rules.scored:
        gt, pred = (_combined(name, sets, rules, shape) for sets in (gt_sets, pred_sets))
        scores[name] = _score(gt, pred, spacing, rules.region(name).min_volume, rules.missed(shape))
        full = np.zeros(shape, bool)
        if pred.lesions:
            box = _union([x.box for x in pred.lesions])
            full[tuple(slice(lo, hi) for lo, hi in box)] = pred.mask(box, range(len(pred.lesions)))
        kept[name] = full
    return scores, kept


def case_lesion_metrics(pred_regions: np.ndarray, gt_regions: np.ndarray, spacing: Sequence[float],
                        rules: LesionRules) -> dict[str, float]:
    """One case under lesion-wise rules: the full-volume metrics (HD95 by :func:`surface_hd95`) then the
    lesion-wise ones, for the regions ``rules.scored`` (:data:`METRIC_KEYS`, :data:`LESION_KEYS` for ET, TC,
    WT).

    2024 rules score the full-volume metrics on the prediction the scorer keeps (small predicted lesions
    removed), as its ``Legacy_Dice``; the scorer's ``Legacy_HD95``, ``Sensitivity`` and ``Specificity``
    are computed on lesion-number images there (not masks), so ours, from the masks, differ where a region
    has several lesions.

    Args:
        pred_regions: bool (R, X, Y, Z), channels ``rules.formed`` (ET, TC, WT for the 2023 rules).
        gt_regions: same shape, the ground truth.
        spacing: voxel size in mm along (X, Y, Z).
        rules: :data:`RULES` entry.
    """
    pred_regions, gt_regions = np.asarray(pred_regions), np.asarray(gt_regions)
    formed = rules.formed
    if pred_regions.shape != gt_regions.shape or pred_regions.ndim != 4 or len(pred_regions) != len(formed):
        raise ValueError(f"expected prediction and ground truth regions of the same shape ({len(formed)}, X, "
                         f"Y, Z) ({', '.join(r.upper() for r in formed)}), found {pred_regions.shape} and "
                         f"{gt_regions.shape}")
    spacing = voxel_spacing(spacing)
    if rules.tissues:
        scores, kept = _case_2024(pred_regions, gt_regions, spacing, rules)
    else:
        scores = {r: lesion_scores(pred_regions[i], gt_regions[i], spacing, rules)
                  for i, r in enumerate(formed)}
        kept = {r: pred_regions[i] for i, r in enumerate(formed)}
    out: dict[str, float] = {}
    lesion: dict[str, float] = {}
    for region in rules.scored:
        gt = gt_regions[formed.index(region)]
        full = region_metrics(kept[region], gt, spacing, hd95=False)
        full["hd95"] = surface_hd95(kept[region], gt, spacing, rules.missed(gt.shape))
        out.update({f"{metric}_{region}": value for metric, value in full.items()})
        lesion.update({f"lw_{metric}_{region}": getattr(scores[region], metric)
                       for metric in LESION_METRIC_NAMES})
    return {**{key: out[key] for key in metric_keys(rules.scored)},
            **{key: lesion[key] for key in lesion_keys(rules.scored)}}
