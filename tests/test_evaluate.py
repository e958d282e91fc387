"""Tests for brats_lightning.evaluate: file formats, hand-worked scores, empty/missing predictions, CLI."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brats_lightning.cli import main
from brats_lightning.evaluate import evaluate_folder
from brats_lightning.metrics import EMPTY_HD95

SHAPE = (12, 12, 10)
EXPECTED_COLUMNS = ["case", "dice_et", "dice_tc", "dice_wt", "hd95_et", "hd95_tc", "hd95_wt",
                    "sens_et", "sens_tc", "sens_wt", "spec_et", "spec_tc", "spec_wt"]


def _save(data: np.ndarray, path: Path, zooms: tuple[float, float, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    image.header.set_zooms(zooms)
    nib.save(image, path)


def write_gt_case(root: Path, case_id: str, labels: np.ndarray, zooms: tuple[float, float, float],
                  year: int = 2020) -> None:
    """One BraTS case folder (random images, the given seg), 2020 or 2023 naming, written with nibabel."""
    rng = np.random.default_rng(0)
    suffixes = ("t1", "t1ce", "t2", "flair") if year == 2020 else ("t1n", "t1c", "t2w", "t2f")
    sep = "_" if year == 2020 else "-"
    for suffix in suffixes:
        image = rng.random(labels.shape).astype(np.float32) + 0.1
        _save(image, root / case_id / f"{case_id}{sep}{suffix}.nii.gz", zooms)
    _save(labels.astype(np.uint8), root / case_id / f"{case_id}{sep}seg.nii.gz", zooms)


def base_labels() -> np.ndarray:
    """A 6x6x6 edema block around a 3-voxel NCR line (5, 5, 5..7); callers turn core voxels into ET."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[3:9, 3:9, 3:9] = 2
    labels[5, 5, 5:8] = 1
    return labels


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    # case A (2020 codes, 1 mm): prediction identical to the ground truth
    a = base_labels()
    a[5, 5, 6] = 4
    write_gt_case(gt_dir, "BraTS20_Training_001", a, (1.0, 1.0, 1.0))
    _save(a, pred_dir / "BraTS20_Training_001.nii.gz", (1.0, 1.0, 1.0))
    # case B (2020 codes, 1 x 1 x 2 mm): ET is one voxel at z=5 in the ground truth, one voxel at z=7 in the
    # prediction; the other voxel is NCR in each, so TC and WT are identical.
    b_gt, b_pred = base_labels(), base_labels()
    b_gt[5, 5, 5] = 4
    b_pred[5, 5, 7] = 4
    write_gt_case(gt_dir, "BraTS20_Training_002", b_gt, (1.0, 1.0, 2.0))
    _save(b_pred, pred_dir / "BraTS20_Training_002.nii.gz", (1.0, 1.0, 2.0))
    # case C (2023 codes: ET = 3): prediction drops ET (labels it NCR), so TC and WT stay identical
    c_gt = base_labels()
    c_gt[5, 5, 6] = 3
    c_pred = c_gt.copy()
    c_pred[c_pred == 3] = 1
    write_gt_case(gt_dir, "BraTS-GLI-00003-000", c_gt, (1.0, 1.0, 1.0), year=2023)
    _save(c_pred, pred_dir / "BraTS-GLI-00003-000.nii.gz", (1.0, 1.0, 1.0))
    # case D: no prediction at all (scored as empty)
    write_gt_case(gt_dir, "BraTS20_Training_004", a, (1.0, 1.0, 1.0))
    return gt_dir, pred_dir


def test_evaluate_folder_scores_and_files(dataset: tuple[Path, Path], tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    gt_dir, pred_dir = dataset
    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING):
        table = evaluate_folder(pred_dir, gt_dir, out, label="synthetic / merged")
    assert "BraTS20_Training_004" in caplog.text and "scored as empty" in caplog.text

    cases = pd.read_csv(out / "cases.csv")
    assert list(cases.columns) == EXPECTED_COLUMNS == list(table.columns)
    assert cases["case"].tolist() == ["BraTS-GLI-00003-000", "BraTS20_Training_001", "BraTS20_Training_002",
                                      "BraTS20_Training_004"]
    row = cases.set_index("case")
    n = 12 * 12 * 10
    # A: identical -> perfect scores
    assert row.loc["BraTS20_Training_001"].tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    # B: ET voxels 2 slices apart at 2 mm per slice -> HD95 4 mm; Dice 0; spec = (N - 2) / (N - 1)
    b = row.loc["BraTS20_Training_002"]
    assert b["dice_et"] == 0 and b["hd95_et"] == pytest.approx(4.0) and b["sens_et"] == 0
    assert b["spec_et"] == pytest.approx((n - 2) / (n - 1), abs=1e-6)
    assert [b["dice_tc"], b["dice_wt"], b["hd95_tc"], b["hd95_wt"]] == [1, 1, 0, 0]
    # C (2023 codes): ET missed -> Dice 0, HD95 373.13, sens 0, spec 1 (no false positive); TC, WT perfect
    c = row.loc["BraTS-GLI-00003-000"]
    assert [c["dice_et"], c["hd95_et"], c["sens_et"], c["spec_et"]] == [0, EMPTY_HD95, 0, 1]
    assert [c["dice_tc"], c["dice_wt"], c["sens_wt"]] == [1, 1, 1]
    # D: missing prediction = empty -> every region Dice 0, HD95 373.13, sens 0, spec 1
    d = row.loc["BraTS20_Training_004"]
    assert d.tolist() == [0, 0, 0, EMPTY_HD95, EMPTY_HD95, EMPTY_HD95, 0, 0, 0, 1, 1, 1]

    summary = pd.read_csv(out / "summary.csv", index_col="Label")
    assert summary.index.tolist() == ["Mean", "StdDev", "Median", "25quantile", "75quantile"]
    assert summary.columns.tolist() == EXPECTED_COLUMNS[1:]
    dice_wt = [1.0, 1.0, 1.0, 0.0]
    assert summary.loc["Mean", "dice_wt"] == pytest.approx(0.75)
    assert summary.loc["StdDev", "dice_wt"] == pytest.approx(statistics.stdev(dice_wt), abs=1e-6)  # 0.5
    assert summary.loc["Median", "hd95_et"] == pytest.approx((4.0 + EMPTY_HD95) / 2, abs=1e-6)
    # quantiles with linear interpolation over hd95_et = [0, 4, 373.13, 373.13]: rank 0.75 and 2.25
    assert summary.loc["25quantile", "hd95_et"] == pytest.approx(3.0, abs=1e-6)
    assert summary.loc["75quantile", "hd95_et"] == pytest.approx(EMPTY_HD95, abs=1e-6)

    report = (out / "report.md").read_text()
    assert "| Metric (mean) | Dice ET | Dice WT | Dice TC | HD95 ET | HD95 WT | HD95 TC |" in report
    # Dice ET mean (0 + 1 + 0 + 0) / 4; HD95 ET mean (0 + 4 + 2 x 373.13) / 4 = 187.565 (binary: 187.5649..);
    # HD95 WT and TC: 373.13 / 4 = 93.2825
    assert "| synthetic / merged | 0.2500 | 0.7500 | 0.7500 | 187.56 | 93.28 | 93.28 |" in report
    assert "BraTS20_Training_004" in report
    assert (out / "boxplots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prediction_convention_from_manifest_and_override(tmp_path: Path) -> None:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt = base_labels()
    gt[5, 5, 6] = 3
    write_gt_case(gt_dir, "BraTS-GLI-00001-000", gt, (1.0, 1.0, 1.0), year=2023)
    pred = gt.copy()
    pred[pred == 3] = 4  # predictions written with 2020 codes
    _save(pred, pred_dir / "BraTS-GLI-00001-000.nii.gz", (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"BraTS-GLI-00001-000.*codes \[4\].*--convention"):
        evaluate_folder(pred_dir, gt_dir, tmp_path / "e0")
    table = evaluate_folder(pred_dir, gt_dir, tmp_path / "e1", convention="brats2020")
    assert table.loc[0, "dice_et"] == 1.0
    (pred_dir / "prediction.json").write_text('{"label_convention": "brats2020"}')
    table = evaluate_folder(pred_dir, gt_dir, tmp_path / "e2")
    assert table.loc[0, ["dice_et", "dice_tc", "dice_wt"]].tolist() == [1.0, 1.0, 1.0]


def test_prediction_on_another_grid_is_refused(tmp_path: Path) -> None:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    write_gt_case(gt_dir, "BraTS20_Training_001", base_labels(), (1.0, 1.0, 1.0))
    _save(np.zeros((12, 12, 9), np.uint8), pred_dir / "BraTS20_Training_001.nii.gz", (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"BraTS20_Training_001.*shape \(12, 12, 9\).*\(12, 12, 10\)"):
        evaluate_folder(pred_dir, gt_dir, tmp_path / "eval")


def test_cli_parallel_and_spacing_override(dataset: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    gt_dir, pred_dir = dataset
    out = tmp_path / "cli"
    code = main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out),
                 "--workers", "2", "--spacing", "1", "1", "3", "--label", "cli run"])
    assert code == 0
    cases = pd.read_csv(out / "cases.csv").set_index("case")
    # the override replaces case B's header zooms (1, 1, 2): 2 slices x 3 mm = 6 mm
    assert cases.loc["BraTS20_Training_002", "hd95_et"] == pytest.approx(6.0)
    assert cases.loc["BraTS20_Training_001", "dice_wt"] == 1.0
    printed = capsys.readouterr().out
    assert "BraTS evaluation: cli run" in printed and "Dice" in printed


def test_evaluate_folder_scores_only_the_chosen_cases(dataset: tuple[Path, Path], tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """``case_ids`` (out-of-fold scoring of a partial sweep) leaves the other ground truth cases out: the
    case without a prediction is neither scored as empty nor warned about."""
    gt_dir, pred_dir = dataset
    with caplog.at_level(logging.WARNING):
        table = evaluate_folder(pred_dir, gt_dir, tmp_path / "eval",
                                case_ids={"BraTS20_Training_001", "BraTS20_Training_002"})
    assert table["case"].tolist() == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert "scored as empty" not in caplog.text
    assert table["dice_wt"].tolist() == [1, 1]
