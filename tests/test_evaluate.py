"""Tests for brats_lightning.evaluate: file formats, hand-worked scores, bad input refused, atomic output."""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brats_lightning.cli import main
from brats_lightning.errors import UserError
from brats_lightning.evaluate import OUTPUT_FILES, evaluate_folder
from brats_lightning.lesionwise import LESION_KEYS
from brats_lightning.metrics import EMPTY_HD95, METRIC_KEYS

SHAPE = (12, 12, 10)
EXPECTED_COLUMNS = ["case", "dice_et", "dice_tc", "dice_wt", "hd95_et", "hd95_tc", "hd95_wt",
                    "sens_et", "sens_tc", "sens_wt", "spec_et", "spec_tc", "spec_wt"]


def _save(data: np.ndarray, path: Path, zooms: tuple[float, float, float],
          affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, np.diag([*zooms, 1.0]) if affine is None else affine)
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
    # case D: no prediction at all
    write_gt_case(gt_dir, "BraTS20_Training_004", a, (1.0, 1.0, 1.0))
    return gt_dir, pred_dir


def test_evaluate_folder_scores_and_files(dataset: tuple[Path, Path], tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    gt_dir, pred_dir = dataset
    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING):
        table = evaluate_folder(pred_dir, gt_dir, out, label="synthetic / merged", missing="empty")
    assert "BraTS20_Training_004" in caplog.text and "scored as empty" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    assert not list(tmp_path.glob(".eval.*"))  # the temporary folder became the output

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
    assert "| Mean | Dice ET | Dice TC | Dice WT | HD95 ET | HD95 TC | HD95 WT |" in report
    # Dice ET mean (0 + 1 + 0 + 0) / 4; HD95 ET mean (0 + 4 + 2 x 373.13) / 4 = 187.565 (binary: 187.5649..);
    # HD95 TC and WT: 373.13 / 4 = 93.2825
    assert "| synthetic / merged | 0.2500 | 0.7500 | 0.7500 | 187.56 | 93.28 | 93.28 |" in report
    assert "scored as empty predictions (--missing empty, the BraTS rule):** BraTS20_Training_004" in report
    assert (out / "boxplots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "evaluation.json").read_text())
    assert record["rules"] == "brats2020" and record["missing_scored_empty"] == ["BraTS20_Training_004"]


def test_missing_prediction_is_an_error_by_default(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    gt_dir, pred_dir = dataset
    with pytest.raises(UserError, match=r"1 of 4 case\(s\) have no prediction.*BraTS20_Training_004.*"
                                        r"--missing empty"):
        evaluate_folder(pred_dir, gt_dir, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_no_matching_prediction_is_an_error(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    gt_dir, _ = dataset
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"no prediction in .*empty matches a ground truth.*found nothing"):
        evaluate_folder(empty, gt_dir, tmp_path / "eval", missing="empty")


@pytest.mark.parametrize("name", ["BraTS20_Training_001_seg.nii.gz", "BraTS20_Training_001-seg.nii.gz",
                                  "BraTS20_Training_001.nii"])
def test_misnamed_predictions_are_refused_by_name(tmp_path: Path, name: str) -> None:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    write_gt_case(gt_dir, "BraTS20_Training_001", base_labels(), (1.0, 1.0, 1.0))
    write_gt_case(gt_dir, "BraTS20_Training_002", base_labels(), (1.0, 1.0, 1.0))
    _save(base_labels(), pred_dir / name, (1.0, 1.0, 1.0))
    _save(base_labels(), pred_dir / "BraTS20_Training_002.nii.gz", (1.0, 1.0, 1.0))
    with pytest.raises(UserError, match=rf"{name}: named like case BraTS20_Training_001 but expected "
                                        r"BraTS20_Training_001\.nii\.gz"):
        evaluate_folder(pred_dir, gt_dir, tmp_path / "eval", missing="empty")


def test_prediction_convention_from_manifest_and_override(tmp_path: Path) -> None:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt = base_labels()
    gt[5, 5, 6] = 3
    write_gt_case(gt_dir, "BraTS-GLI-00001-000", gt, (1.0, 1.0, 1.0), year=2023)
    pred = gt.copy()
    pred[pred == 3] = 4  # predictions written with 2020 codes
    _save(pred, pred_dir / "BraTS-GLI-00001-000.nii.gz", (1.0, 1.0, 1.0))
    with pytest.raises(UserError, match=r"BraTS-GLI-00001-000.*prediction.*codes \[4\].*--convention"):
        evaluate_folder(pred_dir, gt_dir, tmp_path / "e0")
    table = evaluate_folder(pred_dir, gt_dir, tmp_path / "e1", convention="brats2020")
    assert table.loc[0, "dice_et"] == 1.0
    (pred_dir / "prediction.json").write_text('{"label_convention": "brats2020"}')
    table = evaluate_folder(pred_dir, gt_dir, tmp_path / "e2")
    assert table.loc[0, ["dice_et", "dice_tc", "dice_wt"]].tolist() == [1.0, 1.0, 1.0]


def test_bad_ground_truth_label_names_the_ground_truth(tmp_path: Path) -> None:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    labels = base_labels()
    labels[5, 5, 6] = 3  # label 3 does not exist in BraTS 2020
    write_gt_case(gt_dir, "BraTS20_Training_001", labels, (1.0, 1.0, 1.0))
    _save(base_labels(), pred_dir / "BraTS20_Training_001.nii.gz", (1.0, 1.0, 1.0))
    with pytest.raises(UserError, match=r"ground truth .*_seg\.nii\.gz holds label codes \[3\].*fix the "
                                        r"ground truth") as err:
        evaluate_folder(pred_dir, gt_dir, tmp_path / "eval")
    assert "--convention" not in str(err.value)


def test_prediction_on_another_grid_is_refused_unless_resampled(tmp_path: Path) -> None:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    labels = base_labels()
    labels[5, 5, 6] = 4
    labels[3, 3:9, 3:9] = 1  # not symmetric along x
    write_gt_case(gt_dir, "BraTS20_Training_001", labels, (1.0, 1.0, 1.0))
    _save(np.zeros((12, 12, 9), np.uint8), pred_dir / "BraTS20_Training_001.nii.gz", (1.0, 1.0, 1.0))
    with pytest.raises(UserError, match=r"BraTS20_Training_001.*another grid.*shape \(12, 12, 9\) vs "
                                        r"\(12, 12, 10\).*--resample"):
        evaluate_folder(pred_dir, gt_dir, tmp_path / "eval")
    # the same labels stored flipped along x, with the affine that puts every voxel at the same place
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[0, 3] = SHAPE[0] - 1
    _save(labels[::-1].copy(), pred_dir / "BraTS20_Training_001.nii.gz", (1.0, 1.0, 1.0), affine=flipped)
    with pytest.raises(UserError, match=r"another grid.*affines differ.*--resample"):
        evaluate_folder(pred_dir, gt_dir, tmp_path / "eval")
    table = evaluate_folder(pred_dir, gt_dir, tmp_path / "eval", resample=True)
    assert table.loc[0, ["dice_et", "dice_tc", "dice_wt"]].tolist() == [1.0, 1.0, 1.0]
    assert "resampled onto the ground truth grid" in (tmp_path / "eval" / "report.md").read_text()


def test_pixdim_that_disagrees_with_the_affine_trusts_the_affine(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt, pred = base_labels(), base_labels()
    gt[5, 5, 5] = 4
    pred[5, 5, 7] = 4  # ET 2 slices away
    affine = np.diag([1.0, 1.0, 2.0, 1.0])  # 2 mm slices, but the header's pixdim says 1 mm
    write_gt_case(gt_dir, "BraTS20_Training_001", gt, (1.0, 1.0, 1.0))
    _save(gt, gt_dir / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz", (1.0, 1.0, 1.0), affine)
    _save(pred, pred_dir / "BraTS20_Training_001.nii.gz", (1.0, 1.0, 1.0), affine)
    with caplog.at_level(logging.WARNING):
        table = evaluate_folder(pred_dir, gt_dir, tmp_path / "eval")
    assert table.loc[0, "hd95_et"] == pytest.approx(4.0)  # 2 slices x 2 mm (the affine), not 2 x 1 mm
    assert "pixdim (1.0, 1.0, 1.0) disagrees with the affine's voxel size (1.0, 1.0, 2.0)" in caplog.text
    assert "the affine is trusted" in (tmp_path / "eval" / "report.md").read_text()


@pytest.mark.parametrize("layout", ["flat", "flat_seg", "folders"])
def test_label_only_ground_truth(tmp_path: Path, layout: str) -> None:
    gt_dir, pred_dir = tmp_path / "labels", tmp_path / "pred"
    labels = base_labels()
    labels[5, 5, 6] = 3
    case_id = "BraTS-GLI-00001-000"
    path = {"flat": gt_dir / f"{case_id}.nii.gz", "flat_seg": gt_dir / f"{case_id}-seg.nii.gz",
            "folders": gt_dir / case_id / f"{case_id}-seg.nii.gz"}[layout]
    _save(labels, path, (1.0, 1.0, 1.0))
    pred = labels.copy()
    pred[pred == 3] = 1  # ET missed
    _save(pred, pred_dir / f"{case_id}.nii.gz", (1.0, 1.0, 1.0))
    table = evaluate_folder(pred_dir, gt_dir, tmp_path / "eval")
    assert table["case"].tolist() == [case_id]
    assert table.loc[0, ["dice_et", "dice_tc", "dice_wt"]].tolist() == [0.0, 1.0, 1.0]  # ET code 3 (2023)


def test_lesion_wise_rules_columns_and_report(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    gt_dir, pred_dir = dataset
    out = tmp_path / "lw"
    table = evaluate_folder(pred_dir, gt_dir, out, rules="brats2023-gli", missing="empty")
    cases = pd.read_csv(out / "cases.csv")
    assert list(cases.columns) == ["case", *METRIC_KEYS, *LESION_KEYS] == list(table.columns)
    summary = pd.read_csv(out / "summary.csv", index_col="Label")
    assert summary.columns.tolist() == [*LESION_KEYS, *METRIC_KEYS]
    row = cases.set_index("case")
    # A: identical. GT lesions of 216 voxels (WT) and 4 (TC) / 1 (ET): only WT is above 50 mm^3: WT one TP;
    # TC and ET have no lesion above the threshold and no false positive -> Dice 1, HD95 0
    a = row.loc["BraTS20_Training_001"]
    assert [a["lw_dice_wt"], a["lw_hd95_wt"], a["lw_tp_wt"], a["lw_fp_wt"], a["lw_fn_wt"]] == [1, 0, 1, 0, 0]
    assert [a["lw_dice_et"], a["lw_hd95_et"], a["lw_tp_et"]] == [1, 0, 0]
    # D: no prediction: the WT lesion is missed (Dice 0, HD95 374); full-volume HD95 374 (the 2023 scorer)
    d = row.loc["BraTS20_Training_004"]
    assert [d["lw_dice_wt"], d["lw_hd95_wt"], d["lw_fn_wt"], d["hd95_wt"]] == [0, 374, 1, 374]
    report = (out / "report.md").read_text()
    assert report.index("## Lesion-wise means") < report.index("## Full-volume means")
    assert "| Mean | LW Dice ET | LW Dice TC | LW Dice WT | LW HD95 ET | LW HD95 TC | LW HD95 WT |" in report
    assert json.loads((out / "evaluation.json").read_text())["rules"] == "brats2023-gli"


def test_incomplete_prediction_folder_is_refused(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    gt_dir, pred_dir = dataset
    (pred_dir / "prediction.json").write_text('{"kind": "predict", "complete": false}')
    with pytest.raises(UserError, match="incomplete: rerun predict"):
        evaluate_folder(pred_dir, gt_dir, tmp_path / "eval", missing="empty")


def test_out_folder_with_other_files_is_refused(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    gt_dir, pred_dir = dataset
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"--out .*outputs holds files evaluate did not write \(notes.txt\)"):
        evaluate_folder(pred_dir, gt_dir, out, missing="empty")
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_parallel_and_spacing_override(dataset: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    gt_dir, pred_dir = dataset
    out = tmp_path / "cli"
    code = main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out),
                 "--workers", "2", "--spacing", "1", "1", "3", "--label", "cli run", "--missing", "empty"])
    assert code == 0
    cases = pd.read_csv(out / "cases.csv").set_index("case")
    # the override replaces case B's header zooms (1, 1, 2): 2 slices x 3 mm = 6 mm
    assert cases.loc["BraTS20_Training_002", "hd95_et"] == pytest.approx(6.0)
    assert cases.loc["BraTS20_Training_001", "dice_wt"] == 1.0
    printed = capsys.readouterr().out
    assert "BraTS evaluation: cli run" in printed and "Dice" in printed


def test_cli_user_errors_exit_2_once_per_case_with_workers(dataset: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    gt_dir, pred_dir = dataset
    bad = base_labels()
    bad[5, 5, 6] = 7
    _save(bad, pred_dir / "BraTS20_Training_002.nii.gz", (1.0, 1.0, 2.0))
    code = main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(tmp_path / "cli"),
                 "--workers", "2", "--missing", "empty"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.count("case BraTS20_Training_002:") == 1 and "codes [7]" in err
    assert not (tmp_path / "cli").exists()


def test_evaluate_folder_scores_only_the_chosen_cases(dataset: tuple[Path, Path], tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """``case_ids`` (out-of-fold scoring of a partial sweep) leaves the other ground truth cases out: the
    case without a prediction is neither an error nor warned about."""
    gt_dir, pred_dir = dataset
    with caplog.at_level(logging.WARNING):
        table = evaluate_folder(pred_dir, gt_dir, tmp_path / "eval",
                                case_ids={"BraTS20_Training_001", "BraTS20_Training_002"})
    assert table["case"].tolist() == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert "scored as empty" not in caplog.text
    assert table["dice_wt"].tolist() == [1, 1]


KILLER = textwrap.dedent("""
    import os, shutil, signal, sys
    import pandas as pd
    import brats_lightning.evaluate as ev
    point = sys.argv[1]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def after(function):
        def wrapper(*args, **kwargs):
            result = function(*args, **kwargs)
            die()
            return result
        return wrapper

    if point == "after_cases_csv":
        pd.DataFrame.to_csv = after(pd.DataFrame.to_csv)
    elif point == "after_boxplots":
        ev.metric_boxplots = after(ev.metric_boxplots)
    elif point == "before_swap":
        ev._exchange = lambda a, b: die()
    elif point == "after_swap":  # the new output in place, the old one not yet deleted
        exchange = ev._exchange
        ev._exchange = lambda a, b: exchange(a, b) and die()
    from brats_lightning.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
def test_sigkill_leaves_the_old_or_the_new_output(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    """A SIGKILL at several points of the writing leaves the previous complete output or the new one."""
    gt_dir, pred_dir = dataset
    out = tmp_path / "eval"
    evaluate_folder(pred_dir, gt_dir, out, label="old", missing="empty")
    old = {name: (out / name).read_bytes() for name in OUTPUT_FILES}
    args = ["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out), "--label", "new",
            "--missing", "empty", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    outcomes = {}
    for point in ("after_cases_csv", "after_boxplots", "before_swap", "after_swap"):
        done = subprocess.run([sys.executable, "-c", KILLER, point, *args], env=env, capture_output=True)
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
        files = {name: (out / name).read_bytes() for name in OUTPUT_FILES if (out / name).exists()}
        assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES), point  # never a partial folder
        is_new = b"# Evaluation: new" in files["report.md"]
        if not is_new:
            assert files == old, point  # the old output, every file of it
        else:  # the new output, every file of it
            assert json.loads(files["evaluation.json"])["label"] == "new", point
        outcomes[point] = "new" if is_new else "old"
        for name, content in old.items():  # back to the old output for the next point
            (out / name).write_bytes(content)
    assert outcomes == {"after_cases_csv": "old", "after_boxplots": "old", "before_swap": "old",
                        "after_swap": "new"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".eval.")]  # the killed runs' folders
    evaluate_folder(pred_dir, gt_dir, out, label="again", missing="empty")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".eval.")] == []  # cleared by a new run
