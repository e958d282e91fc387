"""Case discovery for BraTS 2020, 2021 and 2023 namings (docs/method.md "Data")."""

from __future__ import annotations

from pathlib import Path

import pytest

from brats_lightning.data.labels import BRATS2020, BRATS2023
from brats_lightning.data.layout import (
    MODALITIES,
    DataLayoutError,
    find_cases,
    find_label_files,
    scan_dataset,
)
from brats_lightning.errors import UserError

SUFFIXES_2020 = ("t1", "t1ce", "t2", "flair")
SUFFIXES_2023 = ("t1n", "t1c", "t2w", "t2f")


def make_case(root: Path, case_id: str, suffixes=SUFFIXES_2020, sep="_", seg=True, ext=".nii.gz",
              folder: str | None = None) -> Path:
    """Empty files named like a BraTS case (discovery reads names only)."""
    path = root / (folder or case_id)
    path.mkdir(parents=True, exist_ok=True)
    for suffix in suffixes + (("seg",) if seg else ()):
        (path / f"{case_id}{sep}{suffix}{ext}").touch()
    return path


def test_2020_training_set(tmp_path):
    for k in (3, 1, 2):
        make_case(tmp_path, f"BraTS20_Training_{k:03d}")
    (tmp_path / "name_mapping.csv").write_text("x\n")  # BraTS ships CSVs next to the case folders
    cases = find_cases(tmp_path, require_labels=True)
    assert [c.case_id for c in cases] == [f"BraTS20_Training_{k:03d}" for k in (1, 2, 3)]
    case = cases[0]
    assert case.convention == BRATS2020 and case.has_labels
    assert [p.name for p in case.images] == [f"BraTS20_Training_001_{m}.nii.gz" for m in MODALITIES]
    assert case.seg.name == "BraTS20_Training_001_seg.nii.gz"


def test_2021_naming(tmp_path):
    make_case(tmp_path, "BraTS2021_00000")
    make_case(tmp_path, "BraTS2021_01666")
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_01666"]
    assert all(c.convention == BRATS2020 for c in cases)


def test_2023_naming_maps_channels(tmp_path):
    make_case(tmp_path, "BraTS-GLI-00000-000", SUFFIXES_2023, sep="-")
    (case,) = find_cases(tmp_path)
    assert case.case_id == "BraTS-GLI-00000-000" and case.convention == BRATS2023
    # channel order t1, t1ce, t2, flair <- t1n, t1c, t2w, t2f
    assert [p.name for p in case.images] == [
        "BraTS-GLI-00000-000-t1n.nii.gz", "BraTS-GLI-00000-000-t1c.nii.gz",
        "BraTS-GLI-00000-000-t2w.nii.gz", "BraTS-GLI-00000-000-t2f.nii.gz"]


def test_mixed_editions_and_uncompressed(tmp_path):
    make_case(tmp_path, "BraTS20_Training_010", ext=".nii")
    make_case(tmp_path, "BraTS-GLI-00002-001", SUFFIXES_2023, sep="-")
    cases = {c.case_id: c for c in find_cases(tmp_path)}
    assert cases["BraTS20_Training_010"].images[0].name == "BraTS20_Training_010_t1.nii"
    assert cases["BraTS-GLI-00002-001"].convention == BRATS2023


def test_unlabeled_validation_set(tmp_path):
    make_case(tmp_path, "BraTS20_Validation_001", seg=False)
    make_case(tmp_path, "BraTS20_Validation_002", seg=False)
    cases = find_cases(tmp_path)
    assert len(cases) == 2 and not any(c.has_labels for c in cases)
    assert all(c.seg is None and len(c.files) == 4 for c in cases)
    with pytest.raises(DataLayoutError, match=r"case BraTS20_Validation_001: seg missing \(looked for "
                                              r"BraTS20_Validation_001_seg.nii.gz"):
        find_cases(tmp_path, require_labels=True)


def test_single_case_folder(tmp_path):
    folder = make_case(tmp_path, "BraTS20_Training_005")
    (case,) = find_cases(folder)
    assert case.case_id == "BraTS20_Training_005" and case.folder == folder


def test_missing_modality_message(tmp_path):
    make_case(tmp_path, "BraTS20_Training_001")
    folder = make_case(tmp_path, "BraTS20_Training_007")
    (folder / "BraTS20_Training_007_t1ce.nii.gz").unlink()
    with pytest.raises(DataLayoutError) as err:
        find_cases(tmp_path)
    message = str(err.value)
    assert ("case BraTS20_Training_007: t1ce missing (looked for BraTS20_Training_007_t1ce.nii.gz in "
            in message)
    assert "expected t1, t1ce, t2, flair" in message
    cases, issues = scan_dataset(tmp_path)  # the non-raising scan keeps the good case
    assert [c.case_id for c in cases] == ["BraTS20_Training_001"]
    assert [(i.case, Path(i.file).name) for i in issues] == [
        ("BraTS20_Training_007", "BraTS20_Training_007_t1ce.nii.gz")]


def test_duplicate_case_ids(tmp_path):
    make_case(tmp_path, "BraTS20_Training_001")
    make_case(tmp_path, "BraTS20_Training_001", folder="BraTS20_Training_001_copy")
    make_case(tmp_path, "BraTS20_Training_002")
    cases, issues = scan_dataset(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS20_Training_002"]
    assert len(issues) == 2 and all(i.case == "BraTS20_Training_001" for i in issues)
    assert "duplicate case id: found in 2 folders" in issues[0].message
    with pytest.raises(DataLayoutError, match="duplicate case id"):
        find_cases(tmp_path)


def test_nothing_found(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataLayoutError, match=f"no BraTS cases found in {tmp_path}"):
        find_cases(tmp_path)
    with pytest.raises(DataLayoutError, match="does not exist"):
        find_cases(tmp_path / "nope")


# ------------------------------------------------------------------------------- label-only ground truth
def test_label_files_per_case_folders_and_flat(tmp_path):
    for case_id, sep in (("BraTS20_Validation_001", "_"), ("BraTS-GLI-00002-000", "-")):
        (tmp_path / case_id).mkdir()
        (tmp_path / case_id / f"{case_id}{sep}seg.nii.gz").touch()
    for name in ("BraTS-MEN-00003-000.nii.gz", "BraTS20_Training_004_seg.nii",
                 "BraTS-PED-00005-000-seg.nii.gz"):
        (tmp_path / name).touch()
    (tmp_path / "prediction.json").write_text("{}")  # non-NIfTI files are ignored
    (tmp_path / "BraTS20_Validation_001" / "notes.txt").touch()
    found = find_label_files(tmp_path)
    assert {k: v.relative_to(tmp_path).as_posix() for k, v in found.items()} == {
        "BraTS-GLI-00002-000": "BraTS-GLI-00002-000/BraTS-GLI-00002-000-seg.nii.gz",
        "BraTS-MEN-00003-000": "BraTS-MEN-00003-000.nii.gz",
        "BraTS-PED-00005-000": "BraTS-PED-00005-000-seg.nii.gz",
        "BraTS20_Training_004": "BraTS20_Training_004_seg.nii",
        "BraTS20_Validation_001": "BraTS20_Validation_001/BraTS20_Validation_001_seg.nii.gz",
    }
    assert list(found) == sorted(found)


def test_label_files_of_a_full_data_set(tmp_path):
    make_case(tmp_path, "BraTS20_Training_001")
    make_case(tmp_path, "BraTS-GLI-00000-000", SUFFIXES_2023, sep="-")
    found = find_label_files(tmp_path)
    assert {k: v.name for k, v in found.items()} == {
        "BraTS-GLI-00000-000": "BraTS-GLI-00000-000-seg.nii.gz",
        "BraTS20_Training_001": "BraTS20_Training_001_seg.nii.gz"}
    folder = make_case(tmp_path / "one", "BraTS20_Training_009")  # a single case folder
    assert {k: v.name for k, v in find_label_files(folder).items()} == {
        "BraTS20_Training_009": "BraTS20_Training_009_seg.nii.gz"}


@pytest.mark.parametrize("names", [
    ("X.nii.gz", "X_seg.nii.gz"),  # flat bare name and flat seg name
    ("X_seg.nii", "X_seg.nii.gz"),  # both extensions
    ("X-seg.nii.gz", "sub/X-seg.nii.gz"),  # flat and in a folder
    ("a/X_seg.nii.gz", "b/X_seg.nii.gz"),  # two folders
])
def test_label_files_duplicates_are_refused(tmp_path, names):
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    (tmp_path / "Y_seg.nii.gz").touch()
    with pytest.raises(UserError, match=r"case X: 2 label files \(.*\); expected one") as err:
        find_label_files(tmp_path)
    for name in names:
        assert str(tmp_path / name) in str(err.value)


def test_label_files_missing_seg_and_nothing_found(tmp_path):
    make_case(tmp_path, "BraTS20_Training_001")
    make_case(tmp_path, "BraTS20_Training_002", seg=False)
    with pytest.raises(UserError, match=r"case BraTS20_Training_002 in .*BraTS20_Training_002: images but no "
                                        r"seg file"):
        find_label_files(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"no label files found in {tmp_path / 'empty'}"):
        find_label_files(tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        find_label_files(tmp_path / "nope")


# ------------------------------------------------------------------- discovery bugs (issue 14) and data sets
def test_stray_root_file_does_not_stop_the_scan(tmp_path):
    make_case(tmp_path, "BraTS20_Training_001")
    make_case(tmp_path, "BraTS20_Training_002")
    (tmp_path / "BraTS20_Training_001_t1.nii.gz").touch()  # a copy left at the root
    cases, issues = scan_dataset(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS20_Training_001", "BraTS20_Training_002"]
    (issue,) = issues
    assert issue.file == str(tmp_path / "BraTS20_Training_001_t1.nii.gz")
    assert "stray file BraTS20_Training_001_t1.nii.gz at the data set root" in issue.message
    with pytest.raises(DataLayoutError, match="stray file"):
        find_cases(tmp_path)


def test_nii_beside_nii_gz_is_a_problem(tmp_path):
    folder = make_case(tmp_path, "BraTS-GLI-00001-000", SUFFIXES_2023, sep="-")
    make_case(tmp_path, "BraTS-GLI-00002-000", SUFFIXES_2023, sep="-")
    (folder / "BraTS-GLI-00001-000-t2f.nii").touch()
    cases, issues = scan_dataset(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS-GLI-00002-000"]  # no silent pick
    (issue,) = issues
    assert issue.case == "BraTS-GLI-00001-000"
    assert ("flair found twice (BraTS-GLI-00001-000-t2f.nii and BraTS-GLI-00001-000-t2f.nii.gz in "
            in issue.message) and "expected one file per modality" in issue.message


def test_cases_carry_their_data_set(tmp_path):
    make_case(tmp_path, "BraTS-MEN-00004-000", SUFFIXES_2023, sep="-")
    make_case(tmp_path, "BraTS2021_00010")
    cases = {c.case_id: c for c in find_cases(tmp_path)}
    assert cases["BraTS-MEN-00004-000"].dataset.name == "brats2023-men"
    assert cases["BraTS2021_00010"].dataset.name == "brats2021"
    assert cases["BraTS2021_00010"].convention == BRATS2020
    (tmp_path / "dataset.json").write_text('{"dataset": "brats2024-gli"}')
    cases, issues = scan_dataset(tmp_path)  # declared: the 2020-style case does not fit
    assert [c.dataset.name for c in cases] == ["brats2024-gli"]
    assert [i.case for i in issues] == ["BraTS2021_00010"]
