"""Normalizations A (percentile min-max) and B (z-score) on non-zero voxels (docs/method.md
"Preprocessing")."""

from __future__ import annotations

import numpy as np
import pytest

from brats_lightning.data.normalize import (
    NORMALIZATIONS,
    PIPELINE_NORMALIZATION,
    MinMaxPercentile,
    ZScoreNonzero,
    get_normalization,
)


def _ramp_with_zeros() -> np.ndarray:
    """Values 1..100 followed by 100 zeros (background), shaped (5, 5, 8)."""
    return np.concatenate([np.arange(1, 101), np.zeros(100)]).reshape(5, 5, 8)


def test_minmax_hand_computed():
    volume = _ramp_with_zeros()
    out = MinMaxPercentile()(volume)
    assert out.dtype == np.float32 and out.shape == volume.shape
    # np.percentile (linear) of 1..100: p1 sits at rank 0.99 -> 1.99, p99 at rank 98.01 -> 99.01
    p1, p99 = 1.99, 99.01
    flat = out.reshape(-1)
    assert flat[0] == 0.0  # 1 is clipped up to p1
    assert flat[99] == 1.0  # 100 is clipped down to p99
    np.testing.assert_allclose(flat[1], (2 - p1) / (p99 - p1), rtol=1e-5)
    np.testing.assert_allclose(flat[49], (50 - p1) / (p99 - p1), rtol=1e-6)
    np.testing.assert_array_equal(flat[100:], 0.0)  # background stays 0


def test_minmax_value_99_is_below_p99():
    flat = MinMaxPercentile()(_ramp_with_zeros()).reshape(-1)
    np.testing.assert_allclose(flat[98], (99 - 1.99) / (99.01 - 1.99), rtol=1e-6)
    assert flat[98] < 1.0


def test_zscore_int16_is_not_truncated():
    volume = np.array([[[0, 1, 2], [3, 4, 0]]], dtype=np.int16)
    out = ZScoreNonzero()(volume)
    assert out.dtype == np.float32
    # non-zero voxels 1, 2, 3, 4: mean 2.5, population std sqrt(1.25)
    std = np.sqrt(1.25)
    expected = np.array([[[0, -1.5 / std, -0.5 / std], [0.5 / std, 1.5 / std, 0]]], dtype=np.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # the reference code assigned into the int16 array, giving -1, 0, 0, 1: make sure we don't
    assert not np.allclose(out, np.trunc(out))


def test_per_channel_stack_and_background():
    rng = np.random.default_rng(0)
    brain = rng.uniform(10, 20, size=(6, 6, 6))
    brain[:2] = 0
    stack = np.stack([brain, 50 * brain + 3 * (brain != 0)], axis=0)  # second channel: affine copy
    for norm in (MinMaxPercentile(), ZScoreNonzero()):
        out = norm(stack)
        assert out.shape == stack.shape and out.dtype == np.float32
        np.testing.assert_allclose(out[0], out[1], atol=1e-5)  # both schemes are affine invariant
        np.testing.assert_allclose(out[0], norm(brain), atol=1e-6)
        np.testing.assert_array_equal(out[:, :2], 0.0)
        nonzero = out[0][2:]
        if isinstance(norm, ZScoreNonzero):
            assert abs(float(nonzero.mean())) < 1e-5 and abs(float(nonzero.std()) - 1) < 1e-5


def test_degenerate_inputs_give_zeros():
    assert not MinMaxPercentile()(np.zeros((3, 3, 3))).any()
    assert not ZScoreNonzero()(np.full((3, 3, 3), 7.0)).any()
    assert not MinMaxPercentile()(np.full((3, 3, 3), 7.0)).any()


def test_registry_and_pipelines():
    assert PIPELINE_NORMALIZATION == {"A": "minmax", "B": "zscore"}
    assert NORMALIZATIONS == {"minmax": MinMaxPercentile, "zscore": ZScoreNonzero}
    assert isinstance(get_normalization("A"), MinMaxPercentile)
    assert isinstance(get_normalization("zscore"), ZScoreNonzero)
    with pytest.raises(ValueError, match="unknown normalization 'robust'"):
        get_normalization("robust")
    with pytest.raises(ValueError, match="low < high"):
        MinMaxPercentile(99, 1)
