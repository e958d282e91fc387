"""Tests of brats_lightning/callbacks/case_losses.py (CaseLossRecorder, `brats-lightning flag-cases`) and of
patient filtering end to end (docs/method.md "Training": record per-case losses, exclusion as a config)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from omegaconf import OmegaConf

from brats_lightning.callbacks.case_losses import (
    CaseLossRecorder,
    case_scores,
    flag_cases,
    read_case_losses,
    write_case_losses,
)
from brats_lightning.cli import main as cli_main
from brats_lightning.data.datamodule import BratsDataModule, read_exclusions
from brats_lightning.losses import DiceLoss
from brats_lightning.module import BratsModule

REPO = Path(__file__).resolve().parents[2]


class MainOutputLoss(pl.Callback):
    """Recomputes each case's main-output squared-Dice loss from the network's logits (forward hook) and the
    (augmented) batch target, independently of the module's own per-case loss."""

    def __init__(self) -> None:
        self.losses: dict[tuple[int, str], float] = {}
        self._logits = None

    def on_fit_start(self, trainer, pl_module):
        def keep(module, inputs, output):
            self._logits = (output[0] if isinstance(output, (tuple, list)) else output).detach()
        pl_module.net.register_forward_hook(keep)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dice = DiceLoss(squared=True)
        for i, case in enumerate(batch["case_id"]):
            loss = dice(self._logits[i : i + 1], batch["target"][i : i + 1])
            self.losses[(trainer.current_epoch, case)] = float(loss)


def test_recorder_keeps_last_epochs_of_every_training_case(synthetic_root, tmp_path):
    pl.seed_everything(0)
    cfg = OmegaConf.create({"pipeline": OmegaConf.load(REPO / "conf" / "pipeline" / "A.yaml")})
    cfg.pipeline.epochs = 2
    pipe = OmegaConf.to_container(cfg, resolve=True)["pipeline"]
    model = {"_target_": "brats_lightning.models.EquiUnet", "width": 4, "norm": pipe["norm"]}
    module = BratsModule(model, pipe)
    dm = BratsDataModule(synthetic_root, fold=0, cache_dir=tmp_path / "cache", crop_size=16,
                         foreground_prob=0.5)
    recorder, check = CaseLossRecorder(last_epochs=1, dirpath=tmp_path / "run"), MainOutputLoss()
    trainer = pl.Trainer(accelerator="cpu", precision="32-true", max_epochs=2, limit_val_batches=0,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[check, recorder])
    trainer.fit(module, datamodule=dm)
    rows = read_case_losses(tmp_path / "run" / "case_losses.csv")
    train_ids = sorted(c.case_id for c in dm.train_cases)
    assert len(train_ids) == 4
    # epoch 1 only (the last of 2), every training case once
    assert sorted((e, c) for e, c, _ in rows) == [(1, c) for c in train_ids]
    assert {e for e, _ in check.losses} == {0, 1}
    for epoch, case, loss in rows:
        assert loss == pytest.approx(check.losses[(epoch, case)], rel=1e-6, abs=1e-7)
        assert 0.0 <= loss <= 1.0
    assert recorder.state_dict()["rows"] == [list(r) for r in rows]


def write_run(folder: Path, losses: dict[str, list[float]], first_epoch: int = 0) -> Path:
    """A run folder whose case_losses.csv holds ``losses[case][i]`` for epoch ``first_epoch + i``."""
    rows = [(first_epoch + i, case, value)
            for case, values in losses.items() for i, value in enumerate(values)]
    write_case_losses(folder / "case_losses.csv", sorted(rows))
    return folder


def test_scores_and_rules_hand_computed(tmp_path):
    # run 1 trained on a, b, c (epochs 5-7); run 2 on b, c, d (epochs 0-1)
    write_run(tmp_path / "runs" / "fold0",
              {"a": [0.9, 0.2, 0.4], "b": [0.1, 0.3, 0.5], "c": [0.0, 0.6, 0.8]}, first_epoch=5)
    write_run(tmp_path / "runs" / "fold1", {"b": [0.7, 0.1], "c": [0.2, 0.2], "d": [0.05, 0.15]})
    files = sorted((tmp_path / "runs").rglob("case_losses.csv"))
    # every epoch: a 0.5; b (0.3 + 0.4) / 2 = 0.35; c (14/30 + 0.2) / 2 = 1/3; d 0.1
    assert case_scores(files) == pytest.approx({"a": 0.5, "b": 0.35, "c": 1 / 3, "d": 0.1})
    # last 2 epochs of each run: a 0.3; b (0.4 + 0.4) / 2 = 0.4; c (0.7 + 0.2) / 2 = 0.45; d 0.1
    scores = case_scores(files, last_epochs=2)
    assert scores == pytest.approx({"a": 0.3, "b": 0.4, "c": 0.45, "d": 0.1})
    # quantile 0.5 of (0.1, 0.3, 0.4, 0.45) = (0.3 + 0.4) / 2 = 0.35 -> b, c above it
    assert flag_cases(scores, quantile=0.5) == (["b", "c"], pytest.approx(0.35))
    # default quantile 0.9: 0.4 + 0.7 * (0.45 - 0.4) = 0.435 -> c
    assert flag_cases(scores) == (["c"], pytest.approx(0.435))
    assert flag_cases(scores, threshold=0.4) == (["c"], 0.4)  # strictly above: b (0.4) stays
    assert flag_cases(scores, threshold=0.32) == (["b", "c"], 0.32)
    with pytest.raises(ValueError, match="either"):
        flag_cases(scores, quantile=0.5, threshold=0.3)


def test_flag_cases_command_writes_lists_data_exclude_reads(tmp_path):
    write_run(tmp_path / "sweep" / "A" / "fold0", {"a": [0.9, 0.2], "b": [0.1, 0.3], "c": [0.0, 0.9]})
    write_run(tmp_path / "sweep" / "A" / "fold1", {"a": [0.5, 0.5], "d": [0.0, 0.1]})
    # text list + meta, from a folder of runs (searched recursively); scores a 0.525, b 0.2, c 0.45, d 0.05
    out = tmp_path / "excluded.txt"
    assert cli_main(["flag-cases", str(tmp_path / "sweep"), "--out", str(out), "--threshold", "0.4"]) == 0
    assert out.read_text() == "a\nc\n" and read_exclusions(out) == ["a", "c"]
    meta = json.loads((tmp_path / "excluded.txt.meta.json").read_text())
    assert meta["exclude"] == ["a", "c"]
    assert meta["rule"]["threshold"] == 0.4 and meta["rule"]["cutoff"] == 0.4
    assert meta["runs"] == [str((tmp_path / "sweep" / "A" / f).resolve()) for f in ("fold0", "fold1")]
    assert meta["scores"] == pytest.approx({"a": 0.525, "b": 0.2, "c": 0.45, "d": 0.05})
    # JSON list (one file), quantile over the last epoch only: a 0.35, b 0.3, c 0.9, d 0.1 -> q 0.75 = 0.4875
    out_json = tmp_path / "excluded.json"
    args = ["flag-cases", str(tmp_path / "sweep" / "A" / "fold0"), str(tmp_path / "sweep" / "A" / "fold1"),
            "--out", str(out_json), "--quantile", "0.75", "--last-epochs", "1"]
    assert cli_main(args) == 0
    record = json.loads(out_json.read_text())
    assert record["exclude"] == ["c"] and record["rule"]["quantile"] == 0.75
    assert record["rule"]["cutoff"] == pytest.approx(0.4875) and record["rule"]["last_epochs"] == 1
    assert read_exclusions(out_json) == ["c"]
    with pytest.raises(FileNotFoundError, match="no case_losses.csv"):
        cli_main(["flag-cases", str(tmp_path / "nowhere"), "--out", str(out)])
    with pytest.raises(SystemExit):  # --quantile and --threshold are exclusive
        cli_main(["flag-cases", str(tmp_path / "sweep"), "--out", str(out), "--quantile", "0.5",
                  "--threshold", "0.1"])


def _train(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.mark.slow
def test_patient_filtering_end_to_end(synthetic_root, tmp_path):
    """Two folds with the recorder -> flag-cases -> the same two folds trained on the cleaned set: the flagged
    cases are never trained on and stay in the validation sets."""
    common = ["-m", "fold=0,1", "experiment=smoke", f"data.root={synthetic_root}", "data.generate=null",
              "data.n_folds=2", "data.crop_size=16", "trainer.limit_train_batches=null", "pipeline.epochs=1",
              "logger=csv", "trainer.precision=32-true", "trainer.limit_val_batches=0",
              "callbacks=[default,case_losses]",
              "callbacks.progress_bar=null", f"paths.cache_dir={tmp_path / 'cache'}"]
    _train([*common, "name=full"], cwd=tmp_path)
    full = tmp_path / "outputs" / "full" / "smoke" / "A" / "equiunet"  # <name>/<data.name>/...
    runs = {k: json.loads((full / f"fold{k}" / "run.json").read_text()) for k in (0, 1)}
    all_ids = sorted(runs[0]["val_cases"] + runs[1]["val_cases"])
    assert len(all_ids) == 6
    for k in (0, 1):  # each case of the fold's training set, once (1 epoch)
        rows = read_case_losses(full / f"fold{k}" / "case_losses.csv")
        assert sorted(c for _, c, _ in rows) == sorted(set(all_ids) - set(runs[k]["val_cases"]))

    excluded = tmp_path / "excluded.txt"
    assert cli_main(["flag-cases", str(full), "--out", str(excluded), "--quantile", "0.7"]) == 0
    flagged = read_exclusions(excluded)
    assert len(flagged) == 2  # 0.7 quantile of 6 scores: between the 4th and 5th, 2 above
    with open(full / "fold0" / "case_losses.csv", newline="") as f:
        assert set(flagged) <= {r["case_id"] for r in csv.DictReader(f)} | set(runs[0]["val_cases"])

    _train([*common, "name=clean", f"data.exclude={excluded}"], cwd=tmp_path)
    clean = tmp_path / "outputs" / "clean" / "smoke" / "A" / "equiunet"
    validated = set()
    for k in (0, 1):
        run = json.loads((clean / f"fold{k}" / "run.json").read_text())
        assert run["val_cases"] == runs[k]["val_cases"]  # validation unchanged, flagged cases included
        validated |= set(run["val_cases"])
        trained = {c for _, c, _ in read_case_losses(clean / f"fold{k}" / "case_losses.csv")}
        assert trained == set(all_ids) - set(run["val_cases"]) - set(flagged)
        assert run["exclude"] == flagged
        assert run["exclude_source"]["file"] == str(excluded.resolve())
        assert run["exclude_source"]["rule"]["quantile"] == 0.7
        assert run["exclude_source"]["runs"] == [str((full / f"fold{j}").resolve()) for j in (0, 1)]
    assert set(flagged) <= validated
