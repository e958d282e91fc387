"""Tests for brats_lightning.reports (cv-report): grouping, mean (std) over folds, SWA and OOF rows."""

from __future__ import annotations

import json
import logging
import os
import statistics
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brats_lightning.cli import main
from brats_lightning.errors import UserError
from brats_lightning.evaluate import evaluate_folder
from brats_lightning.lesionwise import LESION_KEYS
from brats_lightning.reports import CSV_COLUMNS, cv_report


def write_run(outputs: Path, pipeline: str, model: str, fold: int, dice: tuple[float, float, float] | None,
              exclude: list[str] | None = None, swa: tuple[float, float, float] | None = None,
              sub: str = "", experiment: str | None = None) -> Path:
    """A run.json with the docs/contracts.md keys; dice = (ET, TC, WT) or None for an unfinished run."""
    run_dir = outputs / sub / pipeline / model / f"fold{fold}"
    run_dir.mkdir(parents=True, exist_ok=True)

    def metrics(values: tuple[float, float, float] | None) -> dict | None:
        if values is None:
            return None
        et, tc, wt = values
        return {"dice_et": et, "dice_tc": tc, "dice_wt": wt, "dice_mean": (et + tc + wt) / 3, "loss": 0.3}

    info = {"pipeline": pipeline, "model": model, "fold": fold, "seed": 42, "normalization": "minmax",
            "label_convention": "brats2020", "channels": ["t1", "t1ce", "t2", "flair"],
            "model_config": {"_target_": "brats_lightning.models.Unet", "width": 8},
            "checkpoints": {"best": str(run_dir / "checkpoints/best.ckpt"), "last": None, "swa": None},
            "val_metrics": metrics(dice), "val_metrics_swa": metrics(swa), "exclude": exclude or [],
            "run_dir": str(run_dir)}
    if experiment:
        info["experiment"] = experiment
    path = run_dir / "run.json"
    path.write_text(json.dumps(info))
    return path


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    out = tmp_path / "outputs"
    # A / unet: 3 folds, two with SWA scores
    write_run(out, "A", "unet", 0, (0.80, 0.86, 0.90), swa=(0.82, 0.87, 0.91))
    write_run(out, "A", "unet", 1, (0.70, 0.84, 0.92), swa=(0.74, 0.85, 0.93))
    write_run(out, "A", "unet", 2, (0.75, 0.85, 0.88))
    # A / unet on cleaned cases (exclusion list), 2 folds, in another sweep folder
    write_run(out, "A", "unet", 0, (0.81, 0.87, 0.91), exclude=["BraTS20_Training_001"], sub="cleaned")
    write_run(out, "A", "unet", 1, (0.79, 0.85, 0.89), exclude=["BraTS20_Training_001"], sub="cleaned")
    # B / equiunet: fold 0 twice (the older one must lose), fold 1 unfinished (no val_metrics)
    old = write_run(out, "B", "equiunet", 0, (0.10, 0.10, 0.10), sub="old")
    os.utime(old, (1_000_000, 1_000_000))
    write_run(out, "B", "equiunet", 0, (0.72, 0.83, 0.91))
    write_run(out, "B", "equiunet", 1, None)
    # an experiment label
    write_run(out, "A", "attunet", 0, (0.81, 0.86, 0.90), experiment="paper")
    # an out-of-fold evaluation written by `brats-lightning evaluate --out outputs/oof/merged`
    oof = out / "oof" / "merged"
    oof.mkdir(parents=True)
    cases = {"case": ["a", "b", "c"], "dice_et": [0.9, 0.6, 0.0], "dice_tc": [0.9, 0.8, 0.7],
             "dice_wt": [0.95, 0.9, 0.85], "hd95_et": [2.0, 4.0, 373.13], "hd95_tc": [3.0, 3.0, 6.0],
             "hd95_wt": [2.0, 2.0, 5.0]}
    cases.update({f"{m}_{r}": [1.0, 1.0, 1.0] for m in ("sens", "spec") for r in ("et", "tc", "wt")})
    pd.DataFrame(cases).to_csv(oof / "cases.csv", index=False)
    return out


def test_cv_report_table(outputs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        table = cv_report(outputs, tmp_path / "report")
    assert "fold 0 appears twice" in caplog.text and "without val_metrics" in caplog.text
    assert list(table.columns) == list(CSV_COLUMNS)
    assert table["label"].tolist() == ["A / attunet [paper]", "A / unet", "A / unet + SWA",
                                       "A / unet + cleaned", "B / equiunet", "merged"]
    rows = table.set_index("label")
    unet = rows.loc["A / unet"]
    assert unet["n"] == 3 and unet["folds"] == "0,1,2" and unet["source"] == "cv"
    assert unet["dice_et_mean"] == pytest.approx(0.75)                       # (0.80 + 0.70 + 0.75) / 3
    assert unet["dice_et_std"] == pytest.approx(0.05)                        # sample std of 0.80, 0.70, 0.75
    assert unet["dice_wt_mean"] == pytest.approx(0.90)
    assert unet["dice_tc_std"] == pytest.approx(statistics.stdev([0.86, 0.84, 0.85]))
    swa = rows.loc["A / unet + SWA"]
    assert swa["n"] == 2 and swa["folds"] == "0,1" and swa["dice_et_mean"] == pytest.approx(0.78)
    cleaned = rows.loc["A / unet + cleaned"]
    assert cleaned["dice_et_mean"] == pytest.approx(0.80) and cleaned["dice_et_std"] == pytest.approx(
        statistics.stdev([0.81, 0.79]))
    equi = rows.loc["B / equiunet"]
    assert equi["n"] == 1 and equi["dice_et_mean"] == pytest.approx(0.72) and pd.isna(equi["dice_et_std"])
    assert pd.isna(unet["hd95_et_mean"])  # fold rows carry no HD95
    oof = rows.loc["merged"]
    assert oof["source"] == "oof" and oof["n"] == 3
    assert oof["dice_et_mean"] == pytest.approx(0.5) and oof["dice_et_std"] == pytest.approx(
        statistics.stdev([0.9, 0.6, 0.0]))
    assert oof["hd95_et_mean"] == pytest.approx((2 + 4 + 373.13) / 3)

    markdown = (tmp_path / "report" / "cv_report.md").read_text()
    assert "| Dice: mean(std) | ET | TC | WT | mean | folds |" in markdown
    # region order ET, TC, WT: 0.7500 (0.050), 0.8500 (0.010), 0.9000 (0.020); mean of the three 0.8333
    assert "| A / unet | 0.7500 (0.050) | 0.8500 (0.010) | 0.9000 (0.020) | 0.8333 | 3 (0,1,2) |" in markdown
    assert "| B / equiunet | 0.7200 (-) | 0.8300 (-) | 0.9100 (-) | 0.8200 | 1 (0) |" in markdown
    # Dice ET over cases 0.9, 0.6, 0.0: mean 0.5, sample std sqrt((0.16 + 0.01 + 0.25) / 2) = 0.458;
    # WT mean 0.9, TC mean 0.8: the mean of the three 0.7333
    assert "| merged | 3 | 0.5000 (0.458) |" in markdown and "| 0.7333 |" in markdown
    csv = pd.read_csv(tmp_path / "report" / "cv_report.csv")
    assert csv["label"].tolist() == table["label"].tolist()


def test_cli_writes_into_outputs_by_default(outputs: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps table cells to the terminal width
    assert main(["cv-report", str(outputs)]) == 0
    assert (outputs / "cv_report.md").is_file() and (outputs / "cv_report.csv").is_file()
    printed = capsys.readouterr().out
    assert "A / unet + SWA" in printed and "A / attunet [paper]" in printed and "1 fold " in printed
    dice_table, hd95_table = printed.split("Out-of-fold HD95")  # Dice of every row, then HD95 of the oof rows
    assert "0.7333" in dice_table  # the merged row's mean of the three regions (see test_cv_report_table)
    assert "merged (out-of-fold)" in hd95_table and "126.38" in hd95_table  # HD95 ET (2 + 4 + 373.13) / 3
    assert "A / unet" not in hd95_table  # fold rows have no HD95


def test_empty_outputs_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no run.json"):
        cv_report(tmp_path / "empty")


@pytest.mark.parametrize("content", ["", "case,dice_et\n\"a,0.5\n"])
def test_corrupt_cases_csv_names_the_file(outputs: Path, content: str, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    path = outputs / "oof" / "merged" / "cases.csv"
    path.write_text(content)
    assert main(["cv-report", str(outputs)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "rerun `brats-lightning evaluate" in err and "Traceback" not in err


def test_corrupt_run_json_names_the_file(outputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = next(outputs.rglob("run.json"))
    path.write_text('{"pipeline": "A", ')
    assert main(["cv-report", str(outputs)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not valid JSON" in err and "Traceback" not in err


def _label_map(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, np.eye(4)), path)


def test_lesion_wise_columns_from_out_of_fold_predictions(tmp_path: Path) -> None:
    """cv-report --rules: the lesion-wise means of an out-of-fold evaluation scored by evaluate --rules."""
    outputs, gt_dir, pred_dir = tmp_path / "outputs", tmp_path / "labels", tmp_path / "pred"
    gt = np.zeros((30, 20, 20), np.uint8)
    gt[2:6, 2:6, 2:6] = 3  # 64 voxels: a lesion in every region
    gt[20:24, 2:6, 2:6] = 3  # a second lesion, 14 voxels away
    pred = gt.copy()
    pred[20:24] = 0  # the second lesion missed
    for case_id in ("BraTS-GLI-00001-000", "BraTS-GLI-00002-000"):
        _label_map(gt_dir / f"{case_id}-seg.nii.gz", gt)
        _label_map(pred_dir / f"{case_id}.nii.gz", pred if case_id.endswith("1-000") else gt)
    evaluate_folder(pred_dir, gt_dir, outputs / "oof" / "merged", rules="brats2023-gli")
    with pytest.raises(UserError, match=r"scored with --rules brats2023-gli.*not brats2023-met.*--rules "
                                        r"brats2023-met --out"):
        cv_report(outputs, rules="brats2023-met")
    table = cv_report(outputs, rules="brats2023-gli").set_index("label")
    # case 1: (1 + 0) / 2 lesions -> 0.5, HD95 (0 + 374) / 2 = 187; case 2: 1 and 0; over cases 0.75, 93.5
    assert table.loc["merged", "lw_dice_et_mean"] == pytest.approx(0.75)
    assert table.loc["merged", "lw_hd95_wt_mean"] == pytest.approx(93.5)
    markdown = (outputs / "cv_report.md").read_text()
    assert markdown.index("lesion-wise evaluation (brats2023-gli)") < markdown.index("Out-of-fold evaluation")
    assert "| merged | 2 | 0.7500 (0.354) | 0.7500 (0.354) | 0.7500 (0.354) | 93.50 (132.2) |" in markdown
    (outputs / "oof" / "merged" / "evaluation.json").unlink()
    (outputs / "oof" / "plain").mkdir()
    pd.read_csv(outputs / "oof" / "merged" / "cases.csv").drop(columns=list(LESION_KEYS)).to_csv(
        outputs / "oof" / "plain" / "cases.csv", index=False)
    with pytest.raises(UserError, match=r"plain/cases.csv: columns \['lw_dice_et'.*--rules brats2023-gli"):
        cv_report(outputs, rules="brats2023-gli")
