"""From train.py's real output (experiment=smoke) to merged, scored out-of-fold predictions."""

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

from brats_lightning.inference.merge import merge_labels
from brats_lightning.runs import find_runs

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled")
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_smoke_training_runs_feed_the_ensemble(tmp_path, synthetic_root):
    """Train pipeline A and B on fold 0 of the shared 4 mm synthetic set (read-only), then ensemble."""
    out = tmp_path / "outputs"
    _run(["train.py", "-m", "fold=0", "pipeline=A,B", "experiment=smoke", "logger=csv",
          f"data.root={synthetic_root}", f"paths.output_dir={out}", f"paths.data_dir={tmp_path / 'data'}",
          f"paths.cache_dir={tmp_path / 'cache'}"])
    runs = find_runs(out)
    assert sorted((r.pipeline, r.fold) for r in runs) == [("A", 0), ("B", 0)]
    held_out = sorted(runs[0].val_cases)
    assert held_out and sorted(runs[1].val_cases) == held_out
    # the out-of-fold data set: fold 0's validation cases (linked from the shared data set)
    source_root = Path(runs[0].info["data"]["root"])
    assert source_root == synthetic_root
    oof_data = tmp_path / "oof_data"
    oof_data.mkdir()
    for case_id in held_out:
        (oof_data / case_id).symlink_to(source_root / case_id, target_is_directory=True)

    result = _run(["ensemble.py", f"runs={out}", f"dataset={oof_data}", "oof=true", "predict.tta=flips",
                   "predict.device=cpu", f"out={tmp_path / 'ensemble'}"])
    assert "Ensemble results" in result.stdout
    pred = tmp_path / "ensemble" / "predictions"
    for case_id in held_out:
        source = nib.load(source_root / case_id / f"{case_id}_t1.nii.gz")
        a = np.asanyarray(nib.load(pred / "A" / f"{case_id}.nii.gz").dataobj)
        b = np.asanyarray(nib.load(pred / "B" / f"{case_id}.nii.gz").dataobj)
        merged_image = nib.load(pred / "merged" / f"{case_id}.nii.gz")
        merged = np.asanyarray(merged_image.dataobj)
        assert merged.shape == source.shape and np.array_equal(merged_image.affine, source.affine)
        assert merged_image.get_data_dtype() == np.uint8 and set(np.unique(merged)) <= {0, 1, 2, 4}
        np.testing.assert_array_equal(merged, merge_labels(a, b))
    for name in ("A", "B"):
        manifest = json.loads((pred / name / "prediction.json").read_text())
        assert manifest["oof"] is True and manifest["n_views"] == 8
    for name in ("A", "B", "merged"):
        cases = pd.read_csv(tmp_path / "ensemble" / name / "cases.csv")
        assert sorted(cases["case"]) == held_out
        assert cases[["dice_et", "dice_tc", "dice_wt"]].apply(lambda c: c.between(0, 1)).all().all()
