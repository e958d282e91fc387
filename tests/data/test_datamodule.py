"""Tests of brats_lightning/data/datamodule.py on the conftest's tiny synthetic set (6 cases at 4 mm)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from brats_lightning.data.checks import DataProblems
from brats_lightning.data.datamodule import BratsDataModule, read_exclusions
from brats_lightning.data.preprocess import Box, CaseCache
from brats_lightning.data.splits import make_folds
from brats_lightning.errors import UserError


def _regions(labels: np.ndarray) -> np.ndarray:
    """ET = {4}, TC = {1, 4}, WT = {1, 2, 4} (docs/method.md "Data"), written out independently of
    labels.py."""
    labels = np.asarray(labels)
    et, ncr, ed = labels == 4, labels == 1, labels == 2
    return np.stack([et, ncr | et, ncr | ed | et])


@pytest.fixture()
def datamodule(synthetic_root: Path, tmp_path: Path) -> BratsDataModule:
    dm = BratsDataModule(synthetic_root, fold=1, normalization="minmax", batch_size=2,
                         cache_dir=tmp_path / "cache", crop_size=32, foreground_prob=0.5, num_workers=0,
                         name="tiny")
    dm.setup("fit")
    return dm


def test_split_file_fold_and_record(datamodule, synthetic_root, tmp_path):
    ids = sorted(p.name for p in synthetic_root.iterdir() if p.is_dir())
    folds = make_folds(ids, n_folds=5, seed=42)
    assert [c.case_id for c in datamodule.val_cases] == folds[1]["val"]
    assert [c.case_id for c in datamodule.train_cases] == folds[1]["train"]
    split_file = datamodule.split_file
    assert split_file.parent == (tmp_path / "cache" / "splits").resolve() and split_file.is_file()
    assert json.loads(split_file.read_text())["folds"][1]["val"] == folds[1]["val"]
    record = datamodule.record()
    assert record["split_file"] == str(split_file)
    assert record["val_cases"] == folds[1]["val"] and record["exclude"] == []
    assert record["label_convention"] == "brats2020"
    assert record["data"] == {"name": "tiny", "root": str(synthetic_root.resolve())}


def test_training_batches_are_crops_with_nested_regions(datamodule):
    loader = datamodule.train_dataloader()
    batches = list(loader)
    assert sum(len(b["case_id"]) for b in batches) == len(datamodule.train_cases)  # one pass = one epoch
    n = len(datamodule.train_cases)
    assert n == 5 and [len(b["case_id"]) for b in batches] == [2, 2, 1]  # batch 2, last one short
    seen = sorted(c for b in batches for c in b["case_id"])
    assert seen == sorted(c.case_id for c in datamodule.train_cases)
    for batch in batches:
        size = len(batch["case_id"])
        assert batch["image"].shape == (size, 4, 32, 32, 32) and batch["image"].dtype == torch.float32
        assert batch["target"].shape == (size, 3, 32, 32, 32) and batch["target"].dtype == torch.bool
        et, tc, wt = batch["target"][:, 0], batch["target"][:, 1], batch["target"][:, 2]
        assert bool((et <= tc).all()) and bool((tc <= wt).all())
        assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0  # minmax


def test_crop_larger_than_box_holds_whole_case(synthetic_root, tmp_path):
    """A 64^3 crop exceeds every brain box (~37x44x36): it holds all of the case's tumour voxels and image."""
    dm = BratsDataModule(synthetic_root, fold=0, cache_dir=tmp_path / "cache", crop_size=64, num_workers=0)
    dm.setup()
    dataset = dm.train_dataloader().dataset
    cache = CaseCache(tmp_path / "cache", "minmax")
    for index, case in enumerate(dm.train_cases):
        item = dataset[index]
        pre = cache.get(case)
        expected = _regions(pre.labels).reshape(3, -1).sum(axis=1)
        assert item["target"].reshape(3, -1).sum(dim=1).tolist() == expected.tolist()
        total = float(np.asarray(pre.images, dtype=np.float64).sum())
        assert float(item["image"].sum()) == pytest.approx(total, rel=1e-5)


def test_validation_batch_is_padded_brain_box(datamodule, tmp_path):
    cache = CaseCache(tmp_path / "cache", "minmax")
    batches = list(datamodule.val_dataloader())
    assert [b["case_id"] for b in batches] == [[c.case_id] for c in datamodule.val_cases]
    for batch, case in zip(batches, datamodule.val_cases, strict=True):
        pre = cache.get(case)
        image = batch["image"][0].numpy()
        assert all(s % 8 == 0 for s in image.shape[1:])
        assert all(0 <= s - b < 8 for s, b in zip(image.shape[1:], pre.box.shape, strict=True))
        box = Box.from_dict(batch["box"][0])
        assert box.shape == pre.box.shape
        np.testing.assert_array_equal(image[(slice(None), *box.slices)], np.asarray(pre.images))
        total = float(np.abs(np.asarray(pre.images)).sum())
        assert float(np.abs(image).sum()) == pytest.approx(total, rel=1e-6)  # zeros outside the box
        target = batch["target"][0].numpy()
        assert target.dtype == bool and target.shape == (3, *pre.box.shape)  # unpadded
        np.testing.assert_array_equal(target, _regions(pre.labels))
        assert batch["spacing"] == [(4.0, 4.0, 4.0)]


def test_exclusion_only_affects_training(synthetic_root, tmp_path):
    base = BratsDataModule(synthetic_root, fold=0, cache_dir=tmp_path / "cache", crop_size=32)
    base.setup()
    train_id, val_id = base.train_cases[0].case_id, base.val_cases[0].case_id
    exclude_file = tmp_path / "flagged.txt"
    exclude_file.write_text(f"# flagged cases\n{train_id}\n{val_id}\n")
    assert read_exclusions(exclude_file) == [train_id, val_id]
    dm = BratsDataModule(synthetic_root, fold=0, cache_dir=tmp_path / "cache", crop_size=32,
                         exclude=exclude_file)
    dm.setup()
    assert [c.case_id for c in dm.train_cases] == [c.case_id for c in base.train_cases[1:]]
    assert [c.case_id for c in dm.val_cases] == [c.case_id for c in base.val_cases]
    assert dm.record()["exclude"] == [train_id, val_id]
    assert len(dm.train_dataloader().dataset) == len(base.train_cases) - 1


def test_crops_reproducible_with_seed_and_workers(datamodule):
    datamodule.num_workers = 2

    def first_epoch(seed: int) -> list[torch.Tensor]:
        pl.seed_everything(seed, workers=True)
        return [b["image"] for b in datamodule.train_dataloader()]

    a, b, c = first_epoch(7), first_epoch(7), first_epoch(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_data_check_stops_before_training(synthetic_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(synthetic_root, root)
    case = sorted(p for p in root.iterdir() if p.is_dir())[2]
    t1ce = next(case.glob("*_t1ce.nii.gz"))
    t1ce.write_bytes(t1ce.read_bytes()[:100])  # truncated file
    dm = BratsDataModule(root, cache_dir=tmp_path / "cache")
    with pytest.raises(DataProblems, match=case.name) as info:
        dm.setup()
    assert "problem" in str(info.value) and "check-data" in str(info.value)
    assert not (tmp_path / "cache").exists()  # nothing cached before the check passed


def test_missing_root_explains(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        BratsDataModule(tmp_path / "nowhere", cache_dir=tmp_path / "cache").setup()


def test_float16_cache_feeds_float32_batches(synthetic_root, tmp_path):
    """data.cache_dtype=float16: the cache holds float16, the network still gets float32 (whole-brain values
    equal to the float16 entry, within float16's rounding of the float32 ones)."""
    dm = BratsDataModule(synthetic_root, fold=0, normalization="zscore", cache_dir=tmp_path / "cache",
                         crop_size=32, cache_dtype="float16")
    dm.setup("fit")
    assert dm.cache.entry_dir(dm.val_cases[0]).parts[-3] == "zscore-float16"
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].dtype == torch.float32
    compact = np.asarray(dm.cache.get(dm.val_cases[0]).images)
    full = CaseCache(tmp_path / "cache", "zscore").get(dm.val_cases[0]).images
    inside = batch["image"][0].numpy()[(slice(None), *Box.from_dict(batch["box"][0]).slices)]
    np.testing.assert_array_equal(inside, compact.astype(np.float32))
    np.testing.assert_allclose(inside, full, rtol=1e-3, atol=2.0**-25)
    assert next(iter(dm.train_dataloader()))["image"].dtype == torch.float32
