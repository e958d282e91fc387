"""Label maps <-> regions, defined once for every label convention (docs/method.md "Data").

BraTS 2020/2021 label maps use 0 background, 1 necrosis / non-enhancing core (NCR/NET), 2 edema (ED),
4 enhancing tumour (ET); BraTS 2023 and later name the same classes NETC, SNFH, ET and use 3 for ET; BraTS
2024 post-treatment glioma adds 4, the resection cavity (RC). The network predicts the nested tumour regions
ET = {et}, TC = {1, et}, WT = {1, 2, et} (paper section 2.2) and, where the convention has a cavity, RC =
{rc} as a fourth channel that is not nested in the others. Inference turns regions back into a label map
with "ET -> et; TC and not ET -> 1; WT and not TC -> 2" (paper section 2.6) and, for RC, "RC and no tumour
region -> rc": a tumour region wins over RC where both are predicted.

The rule lives in :func:`_to_regions` / :func:`_to_labels`, which only use operators that numpy arrays and
torch tensors share; the public numpy and torch functions differ only in how they allocate and stack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily so that numpy-only tools start fast
    import torch

REGIONS: tuple[str, str, str] = ("ET", "TC", "WT")
"""The nested tumour regions, channels 0-2 of every convention."""
CAVITY_REGION = "RC"
"""The resection cavity region, channel 3 where a convention has one (not nested in the tumour regions)."""


@dataclass(frozen=True)
class LabelConvention:
    """The label codes of one family of BraTS data sets (docs/method.md "Data").

    Attributes:
        name: ``"brats2020"`` (also BraTS 2021), ``"brats2023"`` (2023 and later sub-challenges) or
            ``"brats2024-gli"`` (2024 post-treatment glioma, with a resection cavity).
        et: the enhancing tumour code (4 in 2020/2021, 3 from 2023).
        class_names: names of the codes 1, 2 and et (then rc): NCR/NET, ED, ET in 2020/2021; NETC, SNFH, ET
            from 2023.
        rc: the resection cavity code, or None when the convention has no cavity.
    """

    name: str
    et: int
    class_names: tuple[str, ...] = ("NCR/NET", "ED", "ET")
    rc: int | None = None
    ncr: ClassVar[int] = 1
    ed: ClassVar[int] = 2

    @property
    def labels(self) -> tuple[int, ...]:
        """All valid codes of a label map, background first: (0, 1, 2, et) and rc when there is one."""
        return (0, self.ncr, self.ed, self.et) + (() if self.rc is None else (self.rc,))

    @property
    def regions(self) -> tuple[str, ...]:
        """The region channels the network predicts: ET, TC, WT, and RC when the convention has a cavity."""
        return REGIONS + (() if self.rc is None else (CAVITY_REGION,))

    @property
    def names(self) -> dict[int, str]:
        """Code -> class name for the non-background codes, e.g. ``{1: "NETC", 2: "SNFH", 3: "ET"}``."""
        return dict(zip(self.labels[1:], self.class_names, strict=True))


BRATS2020 = LabelConvention("brats2020", 4)
BRATS2023 = LabelConvention("brats2023", 3, ("NETC", "SNFH", "ET"))
BRATS2024_GLI = LabelConvention("brats2024-gli", 3, ("NETC", "SNFH", "ET", "RC"), rc=4)
CONVENTIONS: dict[str, LabelConvention] = {c.name: c for c in (BRATS2020, BRATS2023, BRATS2024_GLI)}


def get_convention(name: str | LabelConvention) -> LabelConvention:
    """Return the convention called ``name`` (a convention passes through unchanged)."""
    if isinstance(name, LabelConvention):
        return name
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown label convention {name!r}; expected one of {sorted(CONVENTIONS)}"
        ) from None


def convention_for_regions(n_regions: int) -> LabelConvention:
    """A convention with ``n_regions`` region channels (3: ET, TC, WT; 4: and RC), for code that holds only
    region channels and needs the region <-> label-map rule, not the codes (a round trip through the label
    map gives the same regions with every convention of that size)."""
    for convention in CONVENTIONS.values():
        if len(convention.regions) == n_regions:
            return convention
    raise ValueError(f"no label convention has {n_regions} region channels; expected 3 (ET, TC, WT) or 4 "
                     "(ET, TC, WT, RC)")


def _to_regions(label_map: Any, convention: LabelConvention, stack: Callable[[list[Any]], Any]) -> Any:
    """The one definition of label map -> (ET, TC, WT[, RC]) masks, for numpy arrays and torch tensors."""
    et = label_map == convention.et
    tc = et | (label_map == convention.ncr)
    wt = tc | (label_map == convention.ed)
    cavity = [] if convention.rc is None else [label_map == convention.rc]
    return stack([et, tc, wt, *cavity])


def _to_labels(regions: Any, convention: LabelConvention, out: Any) -> Any:
    """The one definition of (ET, TC, WT[, RC]) masks -> label map, written into the zero-filled ``out``.

    Later assignments win, so ET has priority over TC over WT over RC: ET -> et; TC and not ET -> ncr;
    WT and not TC -> ed; RC and none of the tumour regions -> rc (a tumour region wins over the cavity).
    """
    if regions.shape[0] != len(convention.regions):
        raise ValueError(
            f"regions must have {len(convention.regions)} channels {convention.regions} on the first axis "
            f"({convention.name}); got shape {tuple(regions.shape)}")
    if convention.rc is not None:
        out[regions[3]] = convention.rc
    et, tc, wt = regions[0], regions[1], regions[2]
    out[wt] = convention.ed
    out[tc] = convention.ncr
    out[et] = convention.et
    return out


def labels_to_regions(label_map: np.ndarray, convention: LabelConvention = BRATS2020) -> np.ndarray:
    """Label map -> bool regions (C, *spatial), channels ``convention.regions`` (ET, TC, WT[, RC])."""
    return _to_regions(np.asarray(label_map), convention, lambda masks: np.stack(masks, axis=0))


SCORED_CLASSES: dict[str, str] = {"NETC": "ncr", "SNFH": "ed"}
"""Single classes the BraTS 2024 lesion-wise scorers score beside the regions: name -> code attribute."""


def region_masks(label_map: np.ndarray, convention: LabelConvention, names: Sequence[str]) -> np.ndarray:
    """Bool masks (len(names), *spatial) of the named regions: ET, TC, WT, RC (empty where the convention has
    no cavity; WT never holds it) and the single classes NETC (code 1) and SNFH (code 2); case-insensitive.
    """
    label_map = np.asarray(label_map)
    regions = dict(zip(REGIONS + (CAVITY_REGION,), labels_to_regions(label_map, convention), strict=False))
    regions.setdefault(CAVITY_REGION, np.zeros(label_map.shape, bool))
    masks = []
    for name in names:
        key = name.upper()
        if key in SCORED_CLASSES:
            masks.append(label_map == getattr(convention, SCORED_CLASSES[key]))
        elif key in regions:
            masks.append(regions[key])
        else:
            raise ValueError(f"unknown region {name!r}; expected one of "
                             f"{[*REGIONS, CAVITY_REGION, *SCORED_CLASSES]}")
    return np.stack(masks) if masks else np.zeros((0, *label_map.shape), bool)


def regions_to_labels(regions: np.ndarray, convention: LabelConvention = BRATS2020) -> np.ndarray:
    """Bool regions (C, *spatial) in the order ``convention.regions`` -> uint8 label map (*spatial)."""
    regions = np.asarray(regions).astype(bool, copy=False)
    return _to_labels(regions, convention, np.zeros(regions.shape[1:], dtype=np.uint8))


def labels_to_regions_torch(label_map: torch.Tensor, convention: LabelConvention = BRATS2020) -> torch.Tensor:
    """Torch version of :func:`labels_to_regions`: (X, Y, Z) -> bool (C, X, Y, Z), same device.

    A batch (B, X, Y, Z) gives (B, C, X, Y, Z).
    """
    import torch

    axis = 1 if label_map.ndim == 4 else 0
    return _to_regions(label_map, convention, lambda masks: torch.stack(masks, dim=axis))


def regions_to_labels_torch(regions: torch.Tensor, convention: LabelConvention = BRATS2020) -> torch.Tensor:
    """Torch version of :func:`regions_to_labels`: bool (C, *spatial) -> uint8 (*spatial), same device.

    A batch (B, C, X, Y, Z) gives (B, X, Y, Z).
    """
    import torch

    regions = regions.bool()
    if regions.ndim == 5:
        return torch.stack([regions_to_labels_torch(r, convention) for r in regions])
    out = torch.zeros(regions.shape[1:], dtype=torch.uint8, device=regions.device)
    return _to_labels(regions, convention, out)


def unexpected_labels(label_map: np.ndarray, convention: LabelConvention = BRATS2020) -> list[int]:
    """Codes present in an integer ``label_map`` that ``convention`` does not define (sorted)."""
    values = np.asarray(label_map)
    if values.size == 0:
        return []
    if values.dtype.kind in "ui" and values.min() >= 0 and values.max() < 65536:
        present = np.flatnonzero(np.bincount(values.ravel()))
    else:
        present = np.unique(values)
    return [int(v) for v in present if int(v) not in convention.labels]
