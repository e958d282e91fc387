"""check-data: every kind of broken case is reported with its case id and a clear message."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_lightning.cli import main
from brats_lightning.data.checks import Problem, check_dataset

SOURCE_ID = "BraTS20_Training_001"


def clone(src: Path, root: Path, case_id: str, folder: str | None = None) -> Path:
    """Copy a case folder under a new id (files renamed)."""
    dst = root / (folder or case_id)
    dst.mkdir(parents=True)
    for path in src.iterdir():
        shutil.copy2(path, dst / path.name.replace(src.name, case_id))
    return dst


def rewrite(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    image = nib.load(path)
    new = nib.Nifti1Image(data, image.affine if affine is None else affine, image.header)
    new.set_data_dtype(data.dtype)
    new.to_filename(path)


def read(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


# one broken case per failure kind: case id -> (file suffix, key phrase of the expected message)
EXPECTED = {
    "BraTS20_Training_101": ("t1ce", "t1ce missing (looked for BraTS20_Training_101_t1ce.nii.gz"),
    "BraTS20_Training_102": ("flair", "flair shape (60, 60, 38) differs from t1's (60, 60, 39)"),
    "BraTS20_Training_103": ("t2", "t2 affine differs from t1's"),
    "BraTS20_Training_104": ("t1", "t1 holds 3 non-finite voxels"),
    "BraTS20_Training_105": ("flair", "flair is all zeros"),
    "BraTS20_Training_106": ("seg", "seg holds label(s) [3]"),
    "BraTS20_Training_107": ("seg", "seg holds non-integer labels"),
    "BraTS20_Training_108": ("t1ce", "truncated or corrupt"),
    "BraTS20_Training_109": ("t2", "could not read the header"),
    "BraTS20_Training_110": ("t1", "duplicate case id: found in 2 folders"),
}
HEADER_LEVEL = {"101", "102", "103", "109", "110"}  # found by the fast (headers only) check


@pytest.fixture(scope="module")
def broken_root(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("broken") / "data"
    root.mkdir()
    src = synthetic_root / SOURCE_ID
    clone(src, root, "BraTS20_Training_100")  # a clean copy that must not be reported
    folders = {case_id: clone(src, root, case_id) for case_id in EXPECTED}

    def file(case_id: str, suffix: str) -> Path:
        return folders[case_id] / f"{case_id}_{suffix}.nii.gz"

    file("BraTS20_Training_101", "t1ce").unlink()
    rewrite(file("BraTS20_Training_102", "flair"), read(file("BraTS20_Training_102", "flair"))[:, :, :38])
    path = file("BraTS20_Training_103", "t2")
    shifted = nib.load(path).affine.copy()
    shifted[0, 3] += 2.0
    rewrite(path, read(path), shifted)
    path = file("BraTS20_Training_104", "t1")
    data = read(path).astype(np.float32)
    data[30, 30, 20] = np.nan
    data[31, 30, 20] = np.inf
    data[32, 30, 20] = -np.inf
    rewrite(path, data)
    path = file("BraTS20_Training_105", "flair")
    rewrite(path, np.zeros_like(read(path)))
    path = file("BraTS20_Training_106", "seg")
    seg = read(path).copy()
    seg[seg == 4] = 3  # 2023 codes in 2020-named data
    rewrite(path, seg)
    path = file("BraTS20_Training_107", "seg")
    seg = read(path).astype(np.float32)
    seg[seg == 2] = 1.5  # an interpolated label map
    rewrite(path, seg)
    path = file("BraTS20_Training_108", "t1ce")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # header intact, voxel stream cut
    file("BraTS20_Training_109", "t2").write_bytes(b"\x1f\x8b garbage, not a NIfTI header")
    clone(folders["BraTS20_Training_110"], root, "BraTS20_Training_110", folder="BraTS20_Training_110_copy")
    return root


def _find(problems: list[Problem], case_id: str, phrase: str) -> Problem | None:
    return next((p for p in problems if p.case == case_id and phrase in p.message), None)


def test_clean_synthetic_set(synthetic_root, capsys, monkeypatch):
    assert check_dataset(synthetic_root) == []
    assert check_dataset(synthetic_root, fast=True) == []
    assert main(["check-data", str(synthetic_root), "--workers", "1"]) == 0
    assert "6 cases (brats2020), no problems" in capsys.readouterr().out


def test_every_failure_reported(broken_root):
    problems = check_dataset(broken_root)
    for case_id, (suffix, phrase) in EXPECTED.items():
        problem = _find(problems, case_id, phrase)
        assert problem is not None, (case_id, phrase, [p for p in problems if p.case == case_id])
        assert Path(problem.file).name == f"{case_id}_{suffix}.nii.gz"
    assert "BraTS20_Training_100" not in {p.case for p in problems}
    # messages say what was expected and what to do
    assert "set (0, 1, 2, 4)" in _find(problems, "BraTS20_Training_106", "label(s) [3]").message
    assert "relabel 3 -> 4" in _find(problems, "BraTS20_Training_106", "label(s) [3]").message
    assert "nearest-neighbour" in _find(problems, "BraTS20_Training_107", "non-integer").message
    assert "expected t1, t1ce, t2, flair" in _find(problems, "BraTS20_Training_101", "missing").message
    assert "re-register" in _find(problems, "BraTS20_Training_103", "affine").message
    duplicates = [p for p in problems if "duplicate" in p.message]
    assert len(duplicates) == 2 and {Path(p.file).parent.name for p in duplicates} == {
        "BraTS20_Training_110", "BraTS20_Training_110_copy"}


def test_fast_mode_reads_headers_only(broken_root):
    problems = check_dataset(broken_root, fast=True)
    flagged = {p.case[-3:] for p in problems}
    assert flagged == HEADER_LEVEL
    for case_id, (_, phrase) in EXPECTED.items():
        if case_id[-3:] in HEADER_LEVEL:
            assert _find(problems, case_id, phrase) is not None, case_id


def test_parallel_check_matches_serial(broken_root):
    assert check_dataset(broken_root, workers=2) == check_dataset(broken_root)


def test_cli_table_and_exit_code(broken_root, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["check-data", str(broken_root), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    for case_id in EXPECTED:
        assert case_id in out
    assert "problem(s) in 10 case(s)" in out


def test_2023_label_4(synthetic_root_2023, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root_2023, root)
    assert check_dataset(root) == []
    case_id = "BraTS-GLI-00002-000"
    path = root / case_id / f"{case_id}-seg.nii.gz"
    seg = read(path).copy()
    assert 3 in seg and 4 not in seg
    seg[seg == 3] = 4  # 2020 codes under 2023 names
    rewrite(path, seg)
    (problem,) = check_dataset(root)
    assert problem.case == case_id and "seg holds label(s) [4]" in problem.message
    assert "brats2023 set (0, 1, 2, 3)" in problem.message and "relabel 4 -> 3" in problem.message
    assert "if this is BraTS 2024 post-treatment glioma (4 = resection cavity)" in problem.message


def test_training_set_with_some_segs_missing(synthetic_root, tmp_path, capsys, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    for case_id in ("BraTS20_Training_002", "BraTS20_Training_005"):
        (root / case_id / f"{case_id}_seg.nii.gz").unlink()
    problems = check_dataset(root, fast=True)
    assert [(p.case, Path(p.file).name) for p in problems] == [
        ("BraTS20_Training_002", "BraTS20_Training_002_seg.nii.gz"),
        ("BraTS20_Training_005", "BraTS20_Training_005_seg.nii.gz")]
    assert "seg missing (looked for BraTS20_Training_002_seg.nii.gz" in problems[0].message
    assert "while 4 of the 6 cases have one" in problems[0].message
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["check-data", str(root), "--fast", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "BraTS20_Training_002" in out and "BraTS20_Training_005" in out
    for case_id in ("BraTS20_Training_001", "BraTS20_Training_003", "BraTS20_Training_004",
                    "BraTS20_Training_006"):  # no seg anywhere: a validation set, fine
        (root / case_id / f"{case_id}_seg.nii.gz").unlink()
    assert check_dataset(root, fast=True) == []
