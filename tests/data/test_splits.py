"""Deterministic k-fold splits saved to JSON, exclusion from training only (docs/method.md "Training")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from sklearn.model_selection import KFold

from brats_lightning.data.splits import (
    SplitMismatchError,
    fold_case_ids,
    load_or_create_splits,
    make_folds,
)

IDS = [f"BraTS20_Training_{k:03d}" for k in range(1, 24)]  # 23 cases: folds of 5, 5, 5, 4, 4


def test_fold_properties():
    folds = make_folds(IDS, n_folds=5, seed=42)
    assert [f["fold"] for f in folds] == [0, 1, 2, 3, 4]
    seen = []
    for fold in folds:
        train, val = set(fold["train"]), set(fold["val"])
        assert not train & val  # no case in both train and val
        assert train | val == set(IDS)
        assert fold["train"] == sorted(fold["train"]) and fold["val"] == sorted(fold["val"])
        seen += fold["val"]
    assert sorted(seen) == sorted(IDS)  # every case validated exactly once
    assert sorted(len(f["val"]) for f in folds) == [4, 4, 5, 5, 5]


def test_independent_of_input_order_and_pinned():
    assert make_folds(list(reversed(IDS)), 5, 42) == make_folds(IDS, 5, 42)
    assert make_folds(IDS, 5, 43) != make_folds(IDS, 5, 42)
    # pinned: sklearn KFold(5, shuffle=True, random_state=42) over sorted ids; this must never change,
    # or saved experiments stop being comparable across machines and versions
    ids = [f"case_{i:02d}" for i in range(10)]
    assert [f["val"] for f in make_folds(ids, 5, 42)] == [
        ["case_01", "case_08"], ["case_00", "case_05"], ["case_02", "case_07"],
        ["case_04", "case_09"], ["case_03", "case_06"]]


def test_exclusion_only_touches_train():
    folds = make_folds(IDS, 5, 42)
    val_case = folds[2]["val"][0]
    train_case = folds[2]["train"][0]
    train, val = fold_case_ids(folds, 2, exclude=[val_case, train_case, "not_a_case"])
    assert val == folds[2]["val"] and val_case in val
    assert train_case not in train and len(train) == len(folds[2]["train"]) - 1
    for k in range(5):  # in every fold, val is unchanged by any exclusion list
        assert fold_case_ids(folds, k, exclude=IDS)[1] == folds[k]["val"]
        assert fold_case_ids(folds, k, exclude=IDS)[0] == []
    with pytest.raises(ValueError, match="fold 5 does not exist"):
        fold_case_ids(folds, 5)


def test_saved_and_reused(tmp_path):
    path = tmp_path / "splits" / "folds.json"
    created = load_or_create_splits(path, IDS, n_folds=5, seed=42)
    saved = json.loads(path.read_text())
    assert saved["case_ids"] == sorted(IDS) and saved["n_folds"] == 5 and saved["seed"] == 42
    assert load_or_create_splits(path, list(reversed(IDS)), 5, 42) == created
    assert load_or_create_splits(path, None, 5, 42) == created
    # the file wins over a recomputation: edit it and it is still what we get back
    saved["folds"][0]["val"], saved["folds"][1]["val"] = saved["folds"][1]["val"], saved["folds"][0]["val"]
    path.write_text(json.dumps(saved))
    assert load_or_create_splits(path, IDS, 5, 42)[0]["val"] == created[1]["val"]


def test_mismatch_errors(tmp_path):
    path = tmp_path / "folds.json"
    load_or_create_splits(path, IDS, 5, 42)
    with pytest.raises(SplitMismatchError, match=r"lists 23 cases, the data set has 24: 1 not in the file "
                                                 r"\(e.g. \['BraTS20_Training_999'\]\)"):
        load_or_create_splits(path, IDS + ["BraTS20_Training_999"], 5, 42)
    with pytest.raises(SplitMismatchError, match="0 not in the file .* 1 in the file but not in the data"):
        load_or_create_splits(path, IDS[1:], 5, 42)
    with pytest.raises(SplitMismatchError, match="holds 5 folds with seed 42; requested 3 folds"):
        load_or_create_splits(path, IDS, 3, 42)
    with pytest.raises(SplitMismatchError, match="seed 7"):
        load_or_create_splits(path, IDS, 5, 7)
    path.write_text("{not json")
    with pytest.raises(SplitMismatchError, match="unreadable"):
        load_or_create_splits(path, IDS, 5, 42)


def test_invalid_requests(tmp_path):
    with pytest.raises(ValueError, match="cannot make 5 folds from 3 cases"):
        make_folds(IDS[:3], 5)
    with pytest.raises(ValueError, match="duplicate case ids"):
        make_folds(IDS + IDS[:1], 5)
    with pytest.raises(FileNotFoundError):
        load_or_create_splits(tmp_path / "none.json", None)


def test_authors_seed_gives_the_authors_folds():
    """experiment=paper_A_code's ``data.split_seed`` with the 369 BraTS 2020 training cases: the folds of the
    authors' code, ``KFold(5, shuffle=True, random_state=seed).split(sorted(patient dirs))``
    (src/dataset/brats.py ``get_datasets``), computed here as the code calls it."""
    with initialize_config_dir(str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=paper_A_code", "data.root=/data"])
    seed = cfg.data.split_seed
    assert seed == 16111990  # src/train.py: --seed default, "seed for train/val split"
    ids = [f"BraTS20_Training_{k:03d}" for k in range(1, 370)]
    patients_dir = sorted(Path("/data/MICCAI_BraTS2020_TrainingData") / i for i in ids)
    code = list(KFold(5, shuffle=True, random_state=seed).split(patients_dir))
    ours = make_folds(list(reversed(ids)), cfg.data.n_folds, seed)
    for fold, (train_idx, val_idx) in enumerate(code):
        assert ours[fold]["val"] == sorted(patients_dir[i].name for i in val_idx)
        assert ours[fold]["train"] == sorted(patients_dir[i].name for i in train_idx)
    # pinned: what the code's "first idx of test" print shows for each fold, and fold 0's first cases
    assert [int(val_idx[0]) for _, val_idx in code] == [0, 8, 3, 6, 1]
    assert ours[0]["val"][:4] == [f"BraTS20_Training_{k:03d}" for k in (1, 5, 10, 36)]
    assert make_folds(ids, 5, 42) != ours  # the suite's default seed gives other folds
