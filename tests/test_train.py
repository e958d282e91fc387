"""Tests of the training entry point (train.py), run.json (runs.py) and checkpointing (checkpointing.py).

The end-to-end test runs a REAL Hydra multirun, ``python train.py -m fold=0,1 experiment=smoke``, in a
subprocess with W&B offline, then resumes one job.
"""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import hydra.utils
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from brats_lightning.checkpointing import AtomicCheckpointIO, best_checkpoint, last_checkpoint
from brats_lightning.data.datamodule import BratsDataModule
from brats_lightning.module import BratsModule
from brats_lightning.runs import callback_records, merge_records, wandb_run_id, write_run_record

REPO = Path(__file__).resolve().parents[1]
RUN_KEYS = {"pipeline", "model", "fold", "seed", "normalization", "label_convention", "channels",
            "model_config", "checkpoints", "val_metrics", "val_metrics_swa", "data", "split_file",
            "val_cases", "exclude", "run_dir", "wandb_run_id"}


# ------------------------------------------------------------------------------------------- checkpointing
def test_atomic_checkpoint_write_keeps_old_file_on_failure(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    assert torch.load(path)["epoch"] == 1
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails inside torch.save
        io.save_checkpoint({"epoch": 2, "bad": lambda: None}, path)
    assert torch.load(path)["epoch"] == 1  # the previous checkpoint survives a failed write
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left
    io.save_checkpoint({"epoch": 3}, path)
    assert torch.load(path)["epoch"] == 3


class _ScoreAndSnapshot(pl.Callback):
    """Logs ``test/score`` = epoch (so the best epoch, mode min, is epoch 0) and snapshots the weights at the
    end of each validation."""

    def __init__(self) -> None:
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log("test/score", float(trainer.current_epoch))

    def on_validation_end(self, trainer, pl_module):
        state = pl_module.state_dict()
        self.snapshots[trainer.current_epoch] = {k: v.detach().clone() for k, v in state.items()}


@pytest.mark.slow
def test_best_checkpoint_keeps_best_epoch_not_final_weights(synthetic_root, tmp_path):
    """The reference code overwrote "best" with the final weights (docs/method.md "Known traps")."""
    pl.seed_everything(0)
    cfg = OmegaConf.create({"pipeline": OmegaConf.load(REPO / "conf" / "pipeline" / "A.yaml")})
    cfg.pipeline.epochs, cfg.pipeline.optimizer.lr = 3, 1e-2
    pipe = OmegaConf.to_container(cfg, resolve=True)["pipeline"]
    net_cfg = {"_target_": "brats_lightning.models.EquiUnet", "width": 4, "norm": pipe["norm"]}
    module = BratsModule(net_cfg, pipe)
    dm = BratsDataModule(synthetic_root, fold=0, cache_dir=tmp_path / "cache", crop_size=16)
    snap = _ScoreAndSnapshot()
    ckpt_dir = tmp_path / "checkpoints"
    trainer = pl.Trainer(accelerator="cpu", precision="32-true", max_epochs=3, limit_train_batches=2,
                         limit_val_batches=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[snap, best_checkpoint(ckpt_dir, monitor="test/score", mode="min"),
                                    last_checkpoint(ckpt_dir)],
                         plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.ckpt", "last.ckpt"]
    best = torch.load(ckpt_dir / "best.ckpt", weights_only=False)
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert best["epoch"] == 0 and last["epoch"] == 2
    for key, value in snap.snapshots[0].items():
        assert torch.equal(best["state_dict"][key], value), key
    final = module.state_dict()
    assert all(torch.equal(last["state_dict"][k], v) for k, v in final.items())
    assert any(not torch.equal(best["state_dict"][k], final[k]) for k in final)


# ------------------------------------------------------------------------------------------------- runs.py
def test_run_record_merge_and_write(tmp_path):
    class SWA:
        def run_record(self):
            return {"checkpoints": {"swa": "/x/swa.ckpt"}, "val_metrics_swa": {"dice_mean": 0.9}}

    class Other:
        pass

    base = {"checkpoints": {"best": "/x/best.ckpt", "last": "/x/last.ckpt", "swa": None},
            "val_metrics_swa": None}
    merged = merge_records(base, callback_records([Other(), SWA()]))
    assert merged == {"checkpoints": {"best": "/x/best.ckpt", "last": "/x/last.ckpt", "swa": "/x/swa.ckpt"},
                      "val_metrics_swa": {"dice_mean": 0.9}}
    assert base["checkpoints"]["swa"] is None  # inputs untouched
    path = write_run_record(tmp_path, merged)
    assert json.loads(path.read_text()) == merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
    first = wandb_run_id(tmp_path / "run")
    assert first == wandb_run_id(tmp_path / "run") and first != wandb_run_id(tmp_path / "other")
    assert first.isalnum() and (tmp_path / "run" / "wandb_id.txt").read_text().strip() == first


# ------------------------------------------------------------------------------------------- end to end
def _wandb_records(path: Path) -> list:
    """Records of a W&B ``run-*.wandb`` file (LevelDB log format: 32 KiB blocks of typed chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, chunks = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    records = []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def _wandb_run(run_dir: Path) -> dict:
    """Run id, group, name, val/dice_mean history, final summary and the number of overlay images and
    per-case Dice tables logged, from the run's offline W&B files."""
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert folders, f"no offline W&B run in {run_dir / 'wandb'}"
    info: dict = {"history": [], "summary": {}, "ids": set(), "overlays": 0, "case_tables": 0}
    for folder in folders:
        (wandb_file,) = folder.glob("run-*.wandb")
        for record in _wandb_records(wandb_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                info["ids"].add(record.run.run_id)
                info["group"], info["name"] = record.run.run_group, record.run.display_name
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in record.history.item}
                if "val/dice_mean" in items:
                    info["history"].append(items["val/dice_mean"])
                info["overlays"] += any(k.startswith("val/overlay/") for k in items)  # logged images
                info["case_tables"] += any(k.startswith("val/case_dice/") for k in items)  # W&B tables
            elif kind == "summary":
                info["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                        for i in record.summary.update})
        summary_json = folder / "files" / "wandb-summary.json"  # written by some W&B versions
        if summary_json.is_file():
            info["summary"].update(json.loads(summary_json.read_text()))
    return info


def _train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.mark.slow
def test_multirun_two_folds_then_resume(synthetic_root, tmp_path):
    common = ["experiment=smoke", f"data.root={synthetic_root}", "data.generate=null"]
    result = _train(["-m", "fold=0,1", *common], cwd=tmp_path)
    log = result.stdout + result.stderr
    assert log.count("using bf16-mixed") + log.count("using 32-true") == 2  # one precision line per job
    runs = {}
    for fold in (0, 1):
        run_dir = tmp_path / "outputs" / "smoke" / "A" / "equiunet" / f"fold{fold}"
        run = json.loads((run_dir / "run.json").read_text())
        runs[fold] = run
        assert RUN_KEYS <= set(run)
        assert (run["pipeline"], run["model"], run["fold"], run["seed"]) == ("A", "equiunet", fold, 42)
        assert run["normalization"] == "minmax" and run["label_convention"] == "brats2020"
        assert run["channels"] == ["t1", "t1ce", "t2", "flair"]
        assert run["run_dir"] == str(run_dir.resolve())
        assert run["data"]["root"] == str(synthetic_root.resolve())
        assert run["checkpoints"]["swa"] is None and run["val_metrics_swa"] is None
        assert set(run["val_metrics"]) >= {"dice_et", "dice_tc", "dice_wt", "dice_mean", "loss"}
        split = json.loads(Path(run["split_file"]).read_text())
        assert run["val_cases"] == split["folds"][fold]["val"]
        assert run["model_config"]["width"] == 4 and run["model_config"]["norm"]["groups"] == 16

        # checkpoints reload into a fresh network built from model_config
        net = hydra.utils.instantiate(run["model_config"]).eval()
        for which in ("best", "last"):
            path = Path(run["checkpoints"][which])
            assert path.is_file() and path.parent == run_dir / "checkpoints"
            state = torch.load(path, map_location="cpu", weights_only=False)
            net.load_state_dict({k.removeprefix("net."): v for k, v in state["state_dict"].items()})
            module = BratsModule.load_from_checkpoint(path, map_location="cpu").eval()
            x = torch.randn(1, 4, 16, 16, 16, generator=torch.Generator().manual_seed(fold))
            with torch.no_grad():
                assert torch.equal(net(x), module.net(x))

        # metrics.csv and the offline W&B run hold the validation metrics
        with open(run_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        dice_rows = [float(r["val/dice_mean"]) for r in rows if r.get("val/dice_mean")]
        assert len(dice_rows) == 3  # 2 validation epochs + the final validation of best.ckpt
        assert dice_rows[-1] == pytest.approx(run["val_metrics"]["dice_mean"])
        wandb_run = _wandb_run(run_dir)
        assert wandb_run["ids"] == {run["wandb_run_id"]}
        assert (wandb_run["group"], wandb_run["name"]) == ("A", f"A-equiunet-fold{fold}")
        assert wandb_run["history"] == pytest.approx(dice_rows)
        assert wandb_run["summary"]["val/dice_mean"] == pytest.approx(run["val_metrics"]["dice_mean"])

        # the default callbacks draw overlays of the first two validation cases each validation epoch
        pngs = {p.name for p in (run_dir / "overlays").glob("*.png")}
        cases = sorted(run["val_cases"])[:2]
        assert {f"epoch{epoch:03d}_{case}.png" for epoch in (0, 1) for case in cases} <= pngs
        assert wandb_run["overlays"] >= 2 and wandb_run["case_tables"] >= 2
        assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"  # the training curves
    assert runs[0]["wandb_run_id"] != runs[1]["wandb_run_id"]
    assert runs[0]["split_file"] == runs[1]["split_file"]
    assert set(runs[0]["val_cases"]).isdisjoint(runs[1]["val_cases"])

    # running the same job again resumes from last.ckpt, in the same folder and W&B run
    run_dir = tmp_path / "outputs" / "smoke" / "A" / "equiunet" / "fold0"
    result = _train(["fold=0", "pipeline.epochs=3", *common], cwd=tmp_path)
    assert "resuming from" in result.stdout + result.stderr
    resumed = json.loads((run_dir / "run.json").read_text())
    assert resumed["epochs_trained"] == 3 and resumed["global_step"] == 6  # 2 more steps, not 6 new ones
    assert resumed["wandb_run_id"] == runs[0]["wandb_run_id"]
    assert _wandb_run(run_dir)["ids"] == {runs[0]["wandb_run_id"]}
    with open(run_dir / "metrics.csv", newline="") as f:
        epochs = sorted({int(r["epoch"]) for r in csv.DictReader(f) if r.get("train/loss_epoch")})
    assert epochs == [0, 1, 2]  # the first run's rows kept, the third epoch appended
