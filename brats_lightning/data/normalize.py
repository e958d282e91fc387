"""Intensity normalization, one small class per scheme (paper section 2.3, docs/method.md "Preprocessing").

Both schemes work per modality on that modality's non-zero voxels (the brain); voxels that are zero in the
raw image (the background) stay exactly 0. Results are float32, computed in float64 statistics, so integer
inputs (BraTS files are often int16) are never truncated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

PIPELINE_NORMALIZATION: dict[str, str] = {"A": "minmax", "B": "zscore"}


class Normalization(Protocol):
    """A normalization scheme: ``(volume) -> float32 volume``; ``params`` describe it for cache keys."""

    name: str

    def __call__(self, volume: np.ndarray) -> np.ndarray: ...

    @property
    def params(self) -> dict[str, float]: ...


def _per_channel(volume: np.ndarray, one: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply ``one`` to a 3-D volume, or to each channel of a (C, X, Y, Z) stack."""
    volume = np.asarray(volume)
    if volume.ndim == 4:
        out = np.empty(volume.shape, dtype=np.float32)
        for channel in range(volume.shape[0]):
            out[channel] = one(volume[channel])
        return out
    return one(volume)


class MinMaxPercentile:
    """Pipeline A: clip to the [p_low, p_high] percentiles of the non-zero voxels, then min-max to [0, 1].

    Brain voxels at or below p_low map to 0, at or above p_high to 1; the background stays 0. A modality
    whose non-zero voxels are constant (p_low == p_high) maps to all zeros.

    Args:
        low: lower percentile (paper: 1).
        high: upper percentile (paper: 99).
    """

    name = "minmax"

    def __init__(self, low: float = 1.0, high: float = 99.0) -> None:
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100; got low={low}, high={high}")
        self.low = float(low)
        self.high = float(high)

    @property
    def params(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high}

    def _one(self, volume: np.ndarray) -> np.ndarray:
        out = np.zeros(volume.shape, dtype=np.float32)
        mask = volume != 0
        values = volume[mask].astype(np.float64)
        if values.size == 0:
            return out
        p_low, p_high = np.percentile(values, [self.low, self.high])
        if p_high > p_low:
            out[mask] = (np.clip(values, p_low, p_high) - p_low) / (p_high - p_low)
        return out

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        """Normalize one modality (3-D) or each channel of a (C, X, Y, Z) stack; returns float32."""
        return _per_channel(volume, self._one)

    def __repr__(self) -> str:
        return f"MinMaxPercentile(low={self.low}, high={self.high})"


class ZScoreNonzero:
    """Pipeline B: (x - mean) / std over the non-zero voxels, background stays 0, float32.

    A modality whose non-zero voxels are constant (std 0) maps to all zeros.
    """

    name = "zscore"

    @property
    def params(self) -> dict[str, float]:
        return {}

    def _one(self, volume: np.ndarray) -> np.ndarray:
        out = np.zeros(volume.shape, dtype=np.float32)
        mask = volume != 0
        values = volume[mask].astype(np.float64)
        if values.size == 0:
            return out
        std = values.std()
        if std > 0:
            out[mask] = (values - values.mean()) / std
        return out

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        """Normalize one modality (3-D) or each channel of a (C, X, Y, Z) stack; returns float32."""
        return _per_channel(volume, self._one)

    def __repr__(self) -> str:
        return "ZScoreNonzero()"


NORMALIZATIONS: dict[str, type] = {"minmax": MinMaxPercentile, "zscore": ZScoreNonzero}


def get_normalization(name: str) -> Normalization:
    """The normalization called ``name`` ("minmax" = pipeline A, "zscore" = pipeline B), default parameters.

    A pipeline letter ("A" / "B") is accepted too.
    """
    key = PIPELINE_NORMALIZATION.get(name, name)
    try:
        return NORMALIZATIONS[key]()
    except KeyError:
        raise ValueError(f"unknown normalization {name!r}; expected one of {sorted(NORMALIZATIONS)} "
                         f"(or a pipeline: {sorted(PIPELINE_NORMALIZATION)})") from None
