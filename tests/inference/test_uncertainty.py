"""Uncertainty maps: definitions on hand values, and the BraTS 2020 file format end to end."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_lightning.inference.predictor import PredictOptions, load_probabilities, predict_folder
from brats_lightning.inference.uncertainty import RunningStats, uncertainty_maps


def test_entropy_hand_values():
    # H(0.25) = 0.25*2 + 0.75*log2(4/3) = 0.811278 bits -> 81; H(0.1) = 0.468996 -> 47; H(0.5) = 1 -> 100
    mean = np.array([0.0, 1.0, 0.5, 0.25, 0.75, 0.1]).reshape(1, 6)
    np.testing.assert_array_equal(uncertainty_maps(mean, kind="entropy"), [[0, 0, 100, 81, 81, 47]])
    assert uncertainty_maps(mean).dtype == np.uint8


def test_std_hand_values():
    stats = RunningStats()
    members = torch.tensor([[0.0, 0.2, 0.1, 1.0], [1.0, 0.2, 0.3, 1.0]])  # two members, four voxels
    for m in members:
        stats.add(m.reshape(1, 4))
    # population std: 0.5, 0, 0.1, 0 -> 200 * std = 100, 0, 20, 0
    np.testing.assert_array_equal(uncertainty_maps(stats.mean().numpy(), stats.std().numpy(), "std"),
                                  [[100, 0, 20, 0]])
    torch.testing.assert_close(stats.mean(), torch.tensor([[0.5, 0.2, 0.2, 1.0]]))
    with pytest.raises(ValueError, match="needs"):
        uncertainty_maps(np.zeros((3, 2)), None, "std")
    with pytest.raises(ValueError, match="unknown"):
        uncertainty_maps(np.zeros((3, 2)), kind="variance")


@pytest.mark.parametrize("kind", ["entropy", "std"])
def test_uncertainty_files(tiny_run_factory, tiny_dataset, tmp_path, kind):
    tiny_run_factory(fold=0, seed=2)
    tiny_run_factory(fold=1, seed=3)
    out = tmp_path / "pred"
    predict_folder(tiny_run_factory.root, tiny_dataset / "case_001", out,
                   options=PredictOptions(tta="none", uncertainty=True, uncertainty_kind=kind))
    source = nib.load(tiny_dataset / "case_001" / "case_001_t1.nii.gz")
    probs, box, _ = load_probabilities(out / "case_001_probs.npz")
    maps = []
    for suffix in ("enhance", "core", "whole"):
        image = nib.load(out / f"case_001_unc_{suffix}.nii.gz")
        data = np.asanyarray(image.dataobj)
        assert image.get_data_dtype() == np.uint8 and data.shape == source.shape
        assert np.array_equal(image.affine, source.affine)
        assert data.max() <= 100 and data.max() > 0
        outside = np.ones(data.shape, bool)
        outside[box.slices] = False
        assert not data[outside].any()
        maps.append(data[box.slices])
    if kind == "entropy":  # recomputable from the saved (float16) probabilities, up to rounding
        expected = uncertainty_maps(probs)
        assert np.abs(np.stack(maps).astype(int) - expected).max() <= 1
