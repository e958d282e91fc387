"""Per-region uncertainty maps from the spread of the ensemble members (beyond the paper; off by default).

BraTS 2020 uncertainty task format: one map per region, uint8 0-100 on the case's grid, 0 = certain and
100 = most uncertain, files ``<CASE>_unc_enhance.nii.gz`` (ET), ``<CASE>_unc_core.nii.gz`` (TC),
``<CASE>_unc_whole.nii.gz`` (WT).

The members are every (model, TTA view) pair of the ensemble; for a voxel and region let p_1..p_M be
their sigmoid probabilities and p the mean (the ensemble's probability). Definitions:

- ``"entropy"`` (default): ``u = 100 * H(p)`` with ``H(p) = -p log2 p - (1-p) log2(1-p)`` the binary entropy
  in bits of the ensemble probability. 0 when the ensemble is sure (p = 0 or 1), 100 at p = 0.5, the
  threshold, where disagreement between members (or their own doubt) leaves the decision balanced.
- ``"std"``: ``u = 200 * std(p_1..p_M)`` (population standard deviation). The spread of values in [0, 1] is
  at most 0.5 (half the members at 0, half at 1), so u is in [0, 100]; 0 when all members agree.

Values are rounded to the nearest integer. Voxels outside the brain box (never seen by the network,
background by construction) get 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

UNCERTAINTY_KINDS = ("entropy", "std")
UNCERTAINTY_FILES: dict[str, str] = {"ET": "unc_enhance", "TC": "unc_core", "WT": "unc_whole"}
"""Region (network channel order) -> file suffix of the BraTS 2020 uncertainty task."""


class RunningStats:
    """Running mean and spread of member probabilities (float64 sums, so means of equal members are exact)."""

    def __init__(self) -> None:
        self.count = 0
        self._sum: torch.Tensor | None = None
        self._sum_sq: torch.Tensor | None = None

    def add(self, probs: torch.Tensor, track_spread: bool = True) -> None:
        """Add one member's probabilities (3, X, Y, Z)."""
        p = probs.double()
        if self._sum is None:
            self._sum = p.clone()
            self._sum_sq = p * p if track_spread else None
        else:
            if self._sum.shape != p.shape:
                raise ValueError(
                    f"RunningStats: member of shape {tuple(p.shape)}, expected {tuple(self._sum.shape)}")
            self._sum += p
            if self._sum_sq is not None:
                self._sum_sq += p * p
        self.count += 1

    def mean(self) -> torch.Tensor:
        """Mean probability over the members, float32."""
        if self._sum is None:
            raise ValueError("RunningStats: no members added")
        return (self._sum / self.count).float()

    def std(self) -> torch.Tensor:
        """Population standard deviation over the members, float32."""
        if self._sum is None or self._sum_sq is None:
            raise ValueError("RunningStats: spread not tracked (add(..., track_spread=True))")
        mean = self._sum / self.count
        var = (self._sum_sq / self.count - mean * mean).clamp_min_(0.0)
        return var.sqrt_().float()


def uncertainty_maps(mean: np.ndarray, std: np.ndarray | None = None, kind: str = "entropy") -> np.ndarray:
    """Uncertainty in the BraTS 2020 format (see module docstring for the definitions).

    Args:
        mean: ensemble probabilities (3, ...) in [0, 1].
        std: member standard deviation (3, ...), needed for ``kind="std"``.
        kind: "entropy" or "std".

    Returns:
        uint8 array (3, ...) in 0..100, 0 = certain.
    """
    if kind == "entropy":
        p = np.clip(np.asarray(mean, dtype=np.float64), 0.0, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -(np.where(p > 0, p * np.log2(p), 0.0) + np.where(p < 1, (1 - p) * np.log2(1 - p), 0.0))
        u = 100.0 * h
    elif kind == "std":
        if std is None:
            raise ValueError("uncertainty kind 'std' needs the members' standard deviation")
        u = 200.0 * np.asarray(std, dtype=np.float64)
    else:
        raise ValueError(f"unknown uncertainty kind {kind!r}; expected one of {UNCERTAINTY_KINDS}")
    return np.clip(np.rint(u), 0, 100).astype(np.uint8)


def uncertainty_paths(out_dir: str | Path, case_id: str) -> dict[str, Path]:
    """``{region: <out_dir>/<CASE>_unc_<enhance|core|whole>.nii.gz}`` in ET, TC, WT order."""
    out_dir = Path(out_dir)
    return {region: out_dir / f"{case_id}_{suffix}.nii.gz" for region, suffix in UNCERTAINTY_FILES.items()}
