"""`python ensemble.py` (Hydra) end to end on tiny real runs: A and B ensembles, merge, evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from brats_lightning.inference.ensemble import register_resolvers, run_ensemble
from brats_lightning.inference.merge import merge_labels

REPO = Path(__file__).resolve().parents[2]
FOLD_VAL = {0: ["case_000", "case_001"], 1: ["case_002"]}


def _runs(factory) -> None:
    """Pipeline A: three models in fold 0 (best two kept), one in fold 1; pipeline B: one per fold."""
    for seed, (model, score) in enumerate([("unet", 0.5), ("att", 0.7), ("unet_clean", 0.3)]):
        factory(pipeline="A", model=model, fold=0, score=score, seed=seed, val_cases=FOLD_VAL[0])
    factory(pipeline="A", model="unet", fold=1, score=0.5, seed=5, val_cases=FOLD_VAL[1])
    for fold in (0, 1):
        factory(pipeline="B", model="equiunet", fold=fold, seed=10 + fold, val_cases=FOLD_VAL[fold])


def _labels(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image


@pytest.mark.slow
def test_ensemble_script_out_of_fold(tiny_run_factory, tiny_dataset):
    _runs(tiny_run_factory)
    runs = tiny_run_factory.root
    env = dict(os.environ, WANDB_MODE="disabled")
    result = subprocess.run(
        [sys.executable, "ensemble.py", f"runs={runs}", f"dataset={tiny_dataset}", "oof=true",
         "predict.tta=none", "predict.device=cpu", "choose_et_threshold=true", "et_candidates=[0,5,10]"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Ensemble results" in result.stdout
    out = runs / "oof"
    pred = out / "predictions"
    for case_id in ("case_000", "case_001", "case_002"):
        source = nib.load(tiny_dataset / case_id / f"{case_id}_t1.nii.gz")
        a, _ = _labels(pred / "A" / f"{case_id}.nii.gz")
        b, _ = _labels(pred / "B" / f"{case_id}.nii.gz")
        merged, image = _labels(pred / "merged" / f"{case_id}.nii.gz")
        assert merged.shape == source.shape and np.array_equal(image.affine, source.affine)
        assert image.get_data_dtype() == np.uint8 and set(np.unique(merged)) <= {0, 1, 2, 4}
        np.testing.assert_array_equal(merged, merge_labels(a, b))
    manifest_a = json.loads((pred / "A" / "prediction.json").read_text())
    assert manifest_a["oof"] is True
    assert sorted(manifest_a["case_runs"]["case_000"]) == [
        f"A/{model}/fold0 ({runs / 'A' / model / 'fold0'})" for model in ("att", "unet")]
    assert manifest_a["case_runs"]["case_002"] == [f"A/unet/fold1 ({runs / 'A' / 'unet' / 'fold1'})"]
    report = json.loads((out / "ensemble.json").read_text())
    assert set(report["et_threshold"]) == {"A", "B", "merged"}
    for choice in report["et_threshold"].values():
        assert set(choice["mean_dice_et"]) == {"0", "5", "10"}
        assert choice["mean_dice_et"][str(choice["threshold"])] == max(choice["mean_dice_et"].values())
    for name in ("A", "B", "merged"):
        cases = pd.read_csv(out / name / "cases.csv")
        assert sorted(cases["case"]) == ["case_000", "case_001", "case_002"]
        assert report["results"][name]["dice_wt"] == pytest.approx(cases["dice_wt"].mean(), abs=1e-5)
        assert report["results"][name]["hd95_et"] == pytest.approx(cases["hd95_et"].mean(), abs=1e-4)


def _compose(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="ensemble", overrides=overrides)


def test_ensemble_without_labels_single_pipeline(tiny_run_factory, tmp_path, case_writer):
    _runs(tiny_run_factory)
    data = tmp_path / "validation"
    for i in range(2):
        case_writer(data, f"BraTS20_Validation_{i:03d}", seed=i, with_seg=False)
    out = tmp_path / "ens"
    cfg = _compose([f"runs={tiny_run_factory.root}", f"dataset={data}", f"out={out}", "predict.tta=none",
                    "~pipelines.B"])
    assert cfg.pred_dir == str(out / "predictions") and cfg.evaluate == "auto"
    report = run_ensemble(cfg)
    assert report["results"] == {} and set(report["predictions"]) == {"A"}
    assert sorted(p.name for p in (out / "predictions" / "A").glob("*.nii.gz")) == [
        "BraTS20_Validation_000.nii.gz", "BraTS20_Validation_001.nii.gz"]
    assert not (out / "predictions" / "merged").exists()
    manifest = json.loads((out / "predictions" / "A" / "prediction.json").read_text())
    assert len(manifest["runs"]) == 3  # best two of fold 0 + the only run of fold 1
    with pytest.raises(ValueError, match="evaluate=true"):
        run_ensemble(_compose([f"runs={tiny_run_factory.root}", f"dataset={data}", f"out={out}",
                               "evaluate=true"]))


def test_ensemble_default_paths_and_missing_pipeline(tiny_run_factory, tiny_dataset):
    tiny_run_factory(pipeline="A", fold=0, val_cases=["case_000"])
    root = tiny_run_factory.root
    cfg = _compose([f"runs={root}", f"dataset={tiny_dataset}"])
    assert cfg.out == f"{root}/ensemble" and cfg.eval_dir == cfg.out
    assert _compose([f"runs={root}", "oof=true"]).out == f"{root}/oof"
    with pytest.raises(FileNotFoundError, match=r"no pipeline B runs .*~pipelines.B"):
        run_ensemble(cfg)


@pytest.mark.slow
def test_ensemble_out_of_fold_on_a_partial_sweep(tiny_run_factory, tiny_dataset):
    """Only fold 0 trained (as in `make demo`): oof_cases=held_out predicts and scores fold 0's validation
    cases; the default (all) refuses, naming the cases no run held out."""
    for pipeline in ("A", "B"):
        tiny_run_factory(pipeline=pipeline, model="unet", fold=0, seed=1, val_cases=FOLD_VAL[0])
    runs = tiny_run_factory.root
    command = [sys.executable, "ensemble.py", f"runs={runs}", f"dataset={tiny_dataset}", "oof=true",
               "predict.tta=none", "predict.device=cpu"]
    env = dict(os.environ, WANDB_MODE="disabled")
    refused = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "pass oof_cases=held_out" in refused.stderr
    result = subprocess.run([*command, "oof_cases=held_out"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scored = pd.read_csv(runs / "oof" / "merged" / "cases.csv")["case"].tolist()
    assert scored == sorted(FOLD_VAL[0])
    assert sorted(p.name for p in (runs / "oof" / "predictions" / "merged").glob("*.nii.gz")) == [
        f"{c}.nii.gz" for c in sorted(FOLD_VAL[0])]


@pytest.mark.slow
def test_ensemble_script_from_a_model_package(tiny_run_factory, tiny_dataset, tmp_path):
    """`python ensemble.py model=model.zip` (what `make ensemble ARGS="model=model.zip ..."` runs): the
    package's pipelines only (here B), the same label maps as predicting from its runs, scored; oof=true
    refused."""
    from brats_lightning.data.layout import find_cases
    from brats_lightning.errors import UserError
    from brats_lightning.inference.predictor import PredictOptions, Predictor
    from brats_lightning.package import export_package
    from brats_lightning.runs import find_runs

    tiny_run_factory(pipeline="B", model="equiunet", fold=0, seed=3, val_cases=FOLD_VAL[0])
    root = tiny_run_factory.root
    package = export_package(root, tmp_path / "model.zip", {"A": "none", "B": "all"}, tta="none")
    tree = tmp_path / "tree"
    predictor = Predictor(find_runs(root), PredictOptions(tta="none", device="cpu"))
    predictor.predict(find_cases(tiny_dataset), tree)
    out = tmp_path / "ens"
    result = subprocess.run(
        [sys.executable, "ensemble.py", f"model={package}", f"dataset={tiny_dataset}", f"out={out}",
         "predict.device=cpu"],
        cwd=REPO, env=dict(os.environ, WANDB_MODE="disabled"), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Ensemble results" in result.stdout
    for case_id in ("case_000", "case_001", "case_002"):
        name = f"{case_id}.nii.gz"
        assert (out / "predictions" / "B" / name).read_bytes() == (tree / name).read_bytes()
    assert not (out / "predictions" / "A").exists() and not (out / "predictions" / "merged").exists()
    assert len(pd.read_csv(out / "B" / "cases.csv")) == 3
    with pytest.raises(UserError, match="oof=true with package="):
        run_ensemble(_compose([f"package={package}", f"dataset={tiny_dataset}", "oof=true",
                               f"out={tmp_path / 'oof'}"]))
