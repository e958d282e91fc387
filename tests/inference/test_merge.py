"""Merge of pipeline A and B label maps: docs/method.md's table, written out literally."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_lightning.cli import main as cli_main
from brats_lightning.data.checks import DataProblems
from brats_lightning.data.labels import BRATS2020, BRATS2023
from brats_lightning.errors import UserError
from brats_lightning.inference.merge import merge_folders, merge_labels
from brats_lightning.predictions import mark_incomplete, read_manifest, require_complete, write_manifest

# docs/method.md "Inference": rows are A's label, columns B's label (0, 1, 2, 4).
SPEC_TABLE = {
    0: {0: 0, 1: 0, 2: 2, 4: 0},
    1: {0: 1, 1: 1, 2: 1, 4: 1},
    2: {0: 0, 1: 2, 2: 2, 4: 2},
    4: {0: 4, 1: 4, 2: 4, 4: 4},
}


@pytest.mark.parametrize("convention", [BRATS2020, BRATS2023])
def test_all_sixteen_label_pairs(convention):
    code = {0: 0, 1: 1, 2: 2, 4: convention.et}  # the table's codes in this convention
    pairs = list(itertools.product(SPEC_TABLE, repeat=2))
    assert len(pairs) == 16
    a = np.array([code[x] for x, _ in pairs], dtype=np.uint8).reshape(2, 2, 4)
    b = np.array([code[y] for _, y in pairs], dtype=np.uint8).reshape(2, 2, 4)
    merged = merge_labels(a, b, convention)
    assert merged.dtype == np.uint8 and merged.shape == (2, 2, 4)
    expected = np.array([code[SPEC_TABLE[x][y]] for x, y in pairs], dtype=np.uint8).reshape(2, 2, 4)
    np.testing.assert_array_equal(merged, expected)


def test_merge_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        merge_labels(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def _write(path: Path, labels: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(labels.astype(np.uint8), np.diag([-2.0, 2.0, 2.5, 1.0]) if affine is None else affine
                    ).to_filename(path)


def _random_labels(seed: int, codes=(0, 1, 2, 4), shape=(5, 6, 7)) -> np.ndarray:
    return np.random.default_rng(seed).choice(codes, size=shape).astype(np.uint8)


def test_merge_command(tmp_path):
    for i in range(2):
        _write(tmp_path / "a" / f"c{i}.nii.gz", _random_labels(i))
        _write(tmp_path / "b" / f"c{i}.nii.gz", _random_labels(10 + i))
    _write(tmp_path / "a" / "c0_unc_whole.nii.gz", np.zeros((5, 6, 7)))  # not a label map: ignored
    assert cli_main(["merge", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"),
                     "--out", str(tmp_path / "m")]) == 0
    assert sorted(p.name for p in (tmp_path / "m").glob("*.nii.gz")) == ["c0.nii.gz", "c1.nii.gz"]
    for i in range(2):
        image = nib.load(tmp_path / "m" / f"c{i}.nii.gz")
        assert image.get_data_dtype() == np.uint8
        assert np.array_equal(image.affine, np.diag([-2.0, 2.0, 2.5, 1.0]))
        np.testing.assert_array_equal(np.asanyarray(image.dataobj),
                                      merge_labels(_random_labels(i), _random_labels(10 + i)))
    assert json.loads((tmp_path / "m" / "prediction.json").read_text())["label_convention"] == "brats2020"


def test_merge_infers_brats2023_codes(tmp_path):
    _write(tmp_path / "a" / "c.nii.gz", _random_labels(0, (0, 1, 2, 3)))
    _write(tmp_path / "b" / "c.nii.gz", _random_labels(1, (0, 1, 2, 3)))
    merge_folders(tmp_path / "a", tmp_path / "b", tmp_path / "m")
    merged = np.asanyarray(nib.load(tmp_path / "m" / "c.nii.gz").dataobj)
    np.testing.assert_array_equal(merged, merge_labels(_random_labels(0, (0, 1, 2, 3)),
                                                       _random_labels(1, (0, 1, 2, 3)), BRATS2023))
    assert read_manifest(tmp_path / "m")["label_convention"] == "brats2023"


def test_merge_refuses_mismatches(tmp_path):
    labels = _random_labels(0)
    _write(tmp_path / "a" / "c1.nii.gz", labels)
    _write(tmp_path / "a" / "c2.nii.gz", labels)
    _write(tmp_path / "b" / "c1.nii.gz", labels)
    with pytest.raises(UserError, match=r"only in A .*\['c2'\]"):
        merge_folders(tmp_path / "a", tmp_path / "b", tmp_path / "m")
    _write(tmp_path / "b" / "c2.nii.gz", labels[:, :, :6])
    with pytest.raises(DataProblems, match="c2  .*b/c2.nii.gz: B has shape"):
        merge_folders(tmp_path / "a", tmp_path / "b", tmp_path / "m")
    _write(tmp_path / "b" / "c2.nii.gz", labels, affine=np.diag([2.0, 2.0, 2.5, 1.0]))
    with pytest.raises(DataProblems, match="c2  .*B's affine differs"):
        merge_folders(tmp_path / "a", tmp_path / "b", tmp_path / "m")
    _write(tmp_path / "b" / "c2.nii.gz", np.where(labels == 4, 3, labels))
    with pytest.raises(DataProblems, match="B label maps contain both 3 and 4"):
        merge_folders(tmp_path / "a", tmp_path / "b", tmp_path / "m")
    _write(tmp_path / "b" / "c1.nii.gz", np.where(labels == 4, 3, labels))
    with pytest.raises(DataProblems, match="ET code 4, B uses 3"):
        merge_folders(tmp_path / "a", tmp_path / "b", tmp_path / "m")
    _write(tmp_path / "b" / "c1.nii.gz", labels)
    _write(tmp_path / "b" / "c2.nii.gz", np.where(labels == 4, 7, labels))
    nib.Nifti1Image(labels.astype(np.float32) + 0.5, np.diag([-2.0, 2.0, 2.5, 1.0])).to_filename(
        tmp_path / "a" / "c1.nii.gz")
    with pytest.raises(DataProblems) as info:  # every bad file of every case, in one table
        merge_folders(tmp_path / "a", tmp_path / "b", tmp_path / "m")
    assert "2 problem(s) in 2 case(s)" in str(info.value)
    assert "c1  " in str(info.value) and "non-integer values" in str(info.value)
    assert "c2  " in str(info.value) and "B label map holds codes [7]" in str(info.value)
    _write(tmp_path / "a" / "c1.nii.gz", labels)
    _write(tmp_path / "b" / "c2.nii.gz", labels)
    write_manifest(tmp_path / "a", {"label_convention": "brats2020"})
    write_manifest(tmp_path / "b", {"label_convention": "brats2023"})
    with pytest.raises(UserError, match="label convention brats2020, B .* brats2023"):
        merge_folders(tmp_path / "a", tmp_path / "b", tmp_path / "m")
    mark_incomplete(tmp_path / "b", "predict")
    with pytest.raises(UserError, match="incomplete: rerun predict"):
        merge_folders(tmp_path / "a", tmp_path / "b", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_rerun_finishes_only_the_missing_cases(tmp_path):
    for i in range(4):
        _write(tmp_path / "a" / f"c{i}.nii.gz", _random_labels(i))
        _write(tmp_path / "b" / f"c{i}.nii.gz", _random_labels(10 + i))
    merge_folders(tmp_path / "a", tmp_path / "b", tmp_path / "m")
    manifest = read_manifest(tmp_path / "m")
    assert manifest["complete"] is True and manifest["cases"] == ["c0", "c1", "c2", "c3"]
    # as a merge killed after two cases leaves it: two maps, an incomplete manifest listing them
    (tmp_path / "m" / "c2.nii.gz").unlink()
    (tmp_path / "m" / "c3.nii.gz").unlink()
    mark_incomplete(tmp_path / "m", "merge", **{k: manifest[k] for k in ("label_convention", "a", "b")},
                    cases=["c0", "c1"])
    with pytest.raises(UserError, match="incomplete: rerun predict"):
        require_complete(tmp_path / "m")
    kept = {c: (tmp_path / "m" / f"c{c}.nii.gz").stat().st_ino for c in (0, 1)}
    merge_folders(tmp_path / "a", tmp_path / "b", tmp_path / "m")
    assert {c: (tmp_path / "m" / f"c{c}.nii.gz").stat().st_ino for c in (0, 1)} == kept  # not rewritten
    assert require_complete(tmp_path / "m")["cases"] == ["c0", "c1", "c2", "c3"]
    for i in range(4):
        np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "m" / f"c{i}.nii.gz").dataobj),
                                      merge_labels(_random_labels(i), _random_labels(10 + i)))
    # another merge into the same folder (other inputs) rewrites every case
    merge_folders(tmp_path / "b", tmp_path / "a", tmp_path / "m")
    assert (tmp_path / "m" / "c0.nii.gz").stat().st_ino != kept[0]
