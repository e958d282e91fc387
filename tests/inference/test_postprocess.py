"""ET post-processing: the size rule and the choice of T on out-of-fold predictions (hand examples)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from brats_lightning.data.labels import BRATS2023
from brats_lightning.inference.postprocess import apply_et_threshold, choose_et_threshold
from brats_lightning.inference.predictor import PredictOptions, predict_folder


def test_small_et_becomes_ncr():
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[0, 0, :3] = 4  # 5 ET voxels in two blobs, next to edema and core
    labels[3, 3, 2:] = 4
    labels[1, :, :] = 2
    labels[2, 0, 0] = 1
    out = apply_et_threshold(labels, 6)
    expected = labels.copy()
    expected[labels == 4] = 1
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(apply_et_threshold(labels, 5), labels)  # 5 voxels: not fewer than 5
    np.testing.assert_array_equal(apply_et_threshold(labels, None), labels)
    np.testing.assert_array_equal(apply_et_threshold(labels, 0), labels)
    assert out is not labels and labels[0, 0, 0] == 4  # input untouched
    ours = np.where(labels == 4, 3, labels).astype(np.uint8)
    np.testing.assert_array_equal(apply_et_threshold(ours, 6, BRATS2023), expected)


def _save(volume: np.ndarray, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(volume.astype(np.uint8), np.eye(4)).to_filename(path)


def test_choose_threshold_hand_example(tmp_path):
    """case a: GT has no ET, 3 false-positive ET voxels (Dice 0 as is, 1 if removed);
    case b: 10 ET voxels, all right (Dice 1); case c: 4 ET voxels, all right (Dice 1).
    Mean ET Dice: T=0 -> 2/3; T=4 -> 1 (only a's 3 voxels go); T=5 -> 2/3 (c's go too); T=20 -> 1/3."""
    gt_root, pred_root = tmp_path / "gt", tmp_path / "pred"
    shape = (6, 6, 6)
    cases = {}
    gt = np.zeros(shape, np.uint8)
    gt[0] = 2
    pred = gt.copy()
    pred[5, 5, :3] = 4
    cases["a"] = (gt, pred)
    gt = np.zeros(shape, np.uint8)
    gt[1, :5, :2] = 4
    cases["b"] = (gt, gt.copy())
    gt = np.zeros(shape, np.uint8)
    gt[2, 2, :4] = 4
    gt[3] = 1
    cases["c"] = (gt, gt.copy())
    for case_id, (gt, pred) in cases.items():
        for modality in ("t1", "t1ce", "t2", "flair"):
            _save(np.ones(shape), gt_root / case_id / f"{case_id}_{modality}.nii.gz")
        _save(gt, gt_root / case_id / f"{case_id}_seg.nii.gz")
        _save(pred, pred_root / f"{case_id}.nii.gz")
    choice = choose_et_threshold(pred_root, gt_root, candidates=[20, 0, 4, 5])
    assert choice.threshold == 4 and choice.n_cases == 3
    assert choice.mean_dice == pytest.approx({0: 2 / 3, 4: 1.0, 5: 2 / 3, 20: 1 / 3}, abs=1e-12)
    # T=3 keeps a's 3 voxels ("fewer than T"); ties go to the smallest threshold (0 and 1 change nothing)
    assert choose_et_threshold(pred_root, gt_root, candidates=[4, 3]).mean_dice[3] == pytest.approx(2 / 3)
    assert choose_et_threshold(pred_root, gt_root, candidates=[1, 0]).threshold == 0
    (pred_root / "prediction.json").write_text(json.dumps({"et_threshold": 4}))
    with pytest.raises(ValueError, match="already post-processed"):
        choose_et_threshold(pred_root, gt_root)


def test_predictor_applies_et_threshold(tiny_run_factory, tiny_dataset, tmp_path, pointwise):
    """The same run with and without --et-threshold T: ET of fewer than T voxels becomes 1, nothing else
    changes; T sits between the cases' ET sizes, so some cases change and others don't."""
    tiny_run_factory(**pointwise.run_kwargs)
    plain, post = tmp_path / "plain", tmp_path / "post"
    predict_folder(tiny_run_factory.root, tiny_dataset, plain, options=PredictOptions(tta="none"))
    case_ids = ("case_000", "case_001", "case_002")
    before = {c: np.asanyarray(nib.load(plain / f"{c}.nii.gz").dataobj) for c in case_ids}
    sizes = sorted({int((labels == 4).sum()) for labels in before.values()})
    assert len(sizes) >= 2 and sizes[0] > 0, sizes
    threshold = sizes[-1]  # the largest ET stays, smaller ones go
    predict_folder(tiny_run_factory.root, tiny_dataset, post,
                   options=PredictOptions(tta="none", et_threshold=threshold))
    changed = 0
    for case_id, a in before.items():
        b = np.asanyarray(nib.load(post / f"{case_id}.nii.gz").dataobj)
        if (a == 4).sum() < threshold:
            np.testing.assert_array_equal(b, np.where(a == 4, 1, a))
            changed += 1
        else:
            np.testing.assert_array_equal(b, a)
    assert 1 <= changed < len(case_ids)
    assert json.loads((post / "prediction.json").read_text())["et_threshold"] == threshold
