"""The paper's reproduction recipe (experiments/paper_brats2020/recipe.py) end to end with --tiny settings."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "experiments" / "paper_brats2020" / "recipe.py"


def _load_recipe():
    spec = importlib.util.spec_from_file_location("paper_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _run_recipe(args: list[str]) -> str:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1", "COLUMNS": "160"}
    result = subprocess.run([sys.executable, str(RECIPE), *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def test_recipe_needs_data_unless_tiny(tmp_path):
    recipe = _load_recipe()
    with pytest.raises(SystemExit):
        recipe.parse_args(["--out", str(tmp_path)])
    args = recipe.parse_args(["--tiny", "--out", str(tmp_path), "--folds", "0,2", "logger=csv"])
    assert args.data == tmp_path.resolve() / "data" and args.folds == (0, 2)
    assert args.overrides == ["logger=csv"]
    command = recipe.train_command(recipe.A_CLEANED, [2], args)
    assert command[2:5] == ["-m", "fold=2", "experiment=paper_A"]
    assert f"data.exclude={tmp_path.resolve() / 'excluded.json'}" in command
    assert "callbacks.fast_swa.cycles=1" in command and command[-1] == "logger=csv"
    assert not any(a.startswith("callbacks.") for a in recipe.train_command(recipe.B_UNET, [0], args))


@pytest.mark.slow
def test_recipe_runs_every_step_on_synthetic_data(synthetic_root, tmp_path):
    recipe = _load_recipe()
    out = tmp_path / "paper"
    args = ["--tiny", "--out", str(out), "--data", str(synthetic_root),
            f"paths.cache_dir={tmp_path / 'cache'}"]
    log = _run_recipe(args)

    # steps 2-6: 4 sweeps x 5 folds, each run where the recipe says, with the paper's configuration
    runs = {}
    for sweep in recipe.SWEEPS:
        for fold in range(5):
            run = json.loads((sweep.run_dir(out, fold) / "run.json").read_text())
            assert (run["pipeline"], run["model"], run["fold"]) == (sweep.pipeline, sweep.model, fold)
            assert (run["checkpoints"]["swa"] is not None) == (sweep.pipeline == "A")  # fast SWA on A only
            runs[sweep, fold] = run
    # step 3: the exclusion list comes from the first sweep's case losses; only the cleaned sweep uses it
    excluded = json.loads((out / "excluded.json").read_text())
    assert excluded["exclude"] and set(excluded["runs"]) == {
        str(recipe.A_UNET.run_dir(out, k)) for k in range(5)}
    for (sweep, _), run in runs.items():
        assert sorted(run["exclude"]) == (sorted(excluded["exclude"]) if sweep.cleaned else [])

    # step 7: every case predicted out of fold by each pipeline and by the merge, then scored
    cases = sorted(p.name for p in synthetic_root.iterdir() if p.is_dir())
    for name in ("A", "B", "merged"):
        scored = pd.read_csv(out / "oof" / name / "cases.csv")
        assert sorted(scored["case"]) == cases
        assert len(list((out / "oof" / "predictions" / name).glob("*.nii.gz"))) == len(cases)

    # step 8: the cross-validation table and the comparison agree with the runs' own numbers
    report = pd.read_csv(out / "cv_report.csv").set_index("label")
    for sweep in recipe.SWEEPS:
        dice = [runs[sweep, k]["val_metrics"]["dice_et"] for k in range(5)]
        assert report.loc[sweep.cv_label, "dice_et_mean"] == pytest.approx(sum(dice) / 5, abs=1e-6)
        if sweep.pipeline == "A":
            swa = [runs[sweep, k]["val_metrics_swa"]["dice_wt"] for k in range(5)]
            swa_mean = report.loc[sweep.cv_label + " + SWA", "dice_wt_mean"]
            assert swa_mean == pytest.approx(sum(swa) / 5, abs=1e-6)
    comparison = (out / "comparison.md").read_text()
    assert "not comparable" in comparison  # --tiny says so
    swa_row = report.loc["A / equiunet + SWA"]
    assert (f"| A / equiunet + SWA | ours, folds 0,1,2,3,4 | {swa_row['dice_et_mean']:.4f} "
            f"({swa_row['dice_et_std']:.3f}) |") in comparison
    assert "| U-Net like | paper, Table 2 | 0.8077 (0.011) | 0.9070 (0.006) | 0.8705 (0.013) |" in comparison
    merged_dice = pd.read_csv(out / "oof" / "merged" / "cases.csv")["dice_wt"].mean()
    assert "| Dice | ours, oof/merged | " in comparison and f"{merged_dice:.4f}" in comparison
    assert "| Hausdorff (95%) | ours, oof/merged |" in comparison and "| 20.56 | 4.30 | 5.69 |" in comparison
    assert "recipe finished" in log

    # running it again continues the recipe: no training job reruns, the finished runs stay untouched
    def stamps() -> dict:
        return {(s, k): (s.run_dir(out, k) / "run.json").stat().st_mtime_ns for s, k in runs}

    before = stamps()
    log = _run_recipe(args)
    assert log.count("every fold has its run.json; skipped") == len(recipe.SWEEPS)
    assert "train.py -m" not in log
    assert stamps() == before
