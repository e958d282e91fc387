"""Deterministic k-fold splits saved to JSON, exclusion from training only (docs/method.md "Training")."""

from __future__ import annotations

import json

import pytest

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
