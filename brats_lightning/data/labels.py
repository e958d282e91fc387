"""Label maps <-> tumour regions (ET, TC, WT), defined once for every label convention.

docs/method.md "Data": BraTS 2020/2021 label maps use 0 background, 1 necrosis / non-enhancing core (NCR/NET),
2 edema (ED), 4 enhancing tumour (ET); BraTS 2023 (GLI) uses 3 for ET. The network predicts the nested
regions ET = {et}, TC = {1, et}, WT = {1, 2, et} (paper section 2.2), and inference turns regions back into a
label map with "ET -> et; TC and not ET -> 1; WT and not TC -> 2" (paper section 2.5).

The rule lives in :func:`_to_regions` / :func:`_to_labels`, which only use operators that numpy arrays and
torch tensors share; the public numpy and torch functions differ only in how they allocate and stack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily so that numpy-only tools start fast
    import torch

REGIONS: tuple[str, str, str] = ("ET", "TC", "WT")


@dataclass(frozen=True)
class LabelConvention:
    """The label codes of one BraTS edition (docs/method.md "Data").

    Attributes:
        name: ``"brats2020"`` (also BraTS 2021) or ``"brats2023"``.
        et: the enhancing tumour code (4 in 2020/2021, 3 in 2023).
    """

    name: str
    et: int
    ncr: ClassVar[int] = 1
    ed: ClassVar[int] = 2

    @property
    def labels(self) -> tuple[int, ...]:
        """All valid codes of a label map, background first: (0, 1, 2, et)."""
        return (0, self.ncr, self.ed, self.et)


BRATS2020 = LabelConvention("brats2020", 4)
BRATS2023 = LabelConvention("brats2023", 3)
CONVENTIONS: dict[str, LabelConvention] = {"brats2020": BRATS2020, "brats2023": BRATS2023}


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


def _to_regions(label_map: Any, convention: LabelConvention, stack: Callable[[list[Any]], Any]) -> Any:
    """The one definition of label map -> (ET, TC, WT) masks, for numpy arrays and torch tensors."""
    et = label_map == convention.et
    tc = et | (label_map == convention.ncr)
    wt = tc | (label_map == convention.ed)
    return stack([et, tc, wt])


def _to_labels(regions: Any, convention: LabelConvention, out: Any) -> Any:
    """The one definition of (ET, TC, WT) masks -> label map, written into the zero-filled ``out``.

    Later assignments win, so ET has priority over TC over WT: ET -> et; TC and not ET -> ncr;
    WT and not TC (and not ET) -> ed.
    """
    if regions.shape[0] != len(REGIONS):
        raise ValueError(
            f"regions must have {len(REGIONS)} channels {REGIONS} on the first axis; "
            f"got shape {tuple(regions.shape)}")
    et, tc, wt = regions[0], regions[1], regions[2]
    out[wt] = convention.ed
    out[tc] = convention.ncr
    out[et] = convention.et
    return out


def labels_to_regions(label_map: np.ndarray, convention: LabelConvention = BRATS2020) -> np.ndarray:
    """Label map (*spatial) -> bool regions (3, *spatial) in the order ET, TC, WT."""
    return _to_regions(np.asarray(label_map), convention, lambda masks: np.stack(masks, axis=0))


def regions_to_labels(regions: np.ndarray, convention: LabelConvention = BRATS2020) -> np.ndarray:
    """Bool regions (3, *spatial), order ET, TC, WT -> uint8 label map (*spatial)."""
    regions = np.asarray(regions).astype(bool, copy=False)
    return _to_labels(regions, convention, np.zeros(regions.shape[1:], dtype=np.uint8))


def labels_to_regions_torch(label_map: torch.Tensor, convention: LabelConvention = BRATS2020) -> torch.Tensor:
    """Torch version of :func:`labels_to_regions`: (X, Y, Z) -> bool (3, X, Y, Z), same device.

    A batch (B, X, Y, Z) gives (B, 3, X, Y, Z).
    """
    import torch

    axis = 1 if label_map.ndim == 4 else 0
    return _to_regions(label_map, convention, lambda masks: torch.stack(masks, dim=axis))


def regions_to_labels_torch(regions: torch.Tensor, convention: LabelConvention = BRATS2020) -> torch.Tensor:
    """Torch version of :func:`regions_to_labels`: bool (3, *spatial) -> uint8 (*spatial), same device.

    A batch (B, 3, X, Y, Z) gives (B, X, Y, Z).
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
