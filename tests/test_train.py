"""Tests of the training entry point (train.py), run.json (runs.py) and checkpointing (checkpointing.py).

The end-to-end test runs a REAL Hydra multirun, ``python train.py -m fold=0,1 experiment=smoke``, in a
subprocess with W&B offline, then resumes one job.
"""

from __future__ import annotations

import csv
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import hydra.utils
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from brats_lightning.checkpointing import AtomicCheckpointIO, best_checkpoint, last_checkpoint
from brats_lightning.data.datamodule import BratsDataModule
from brats_lightning.errors import UserError
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


def _train(args: list[str], cwd: Path, returncode: int = 0, wandb_mode: str = "offline"
           ) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in ``cwd``, stdout and stderr captured (so stdout is not a terminal)."""
    env = {**os.environ, "WANDB_MODE": wandb_mode}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == returncode, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _wandb_history(run_dir: Path) -> dict[int, dict]:
    """The run's W&B history by step, read from its offline runs in order: a run resumed from step S
    (config ``resumed_from``) replaces what earlier runs logged from S on (W&B's own keys ``_*`` left out)."""
    from brats_lightning.runs import ResumableWandbLogger  # noqa: F401 - the logger whose records these are

    history: dict[int, dict] = {}
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (wandb_file,) = folder.glob("run-*.wandb")
        rows: dict[int, dict] = {}
        resumed_from = None
        for record in _wandb_records(wandb_file):
            kind = record.WhichOneof("record_type")
            if kind == "config":
                for item in record.config.update:
                    if (item.key or "/".join(item.nested_key)) == "resumed_from":
                        resumed_from = json.loads(item.value_json)["step"]
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in record.history.item}
                step = int(record.history.step.num)
                rows.setdefault(step, {}).update({k: v for k, v in items.items() if not k.startswith("_")})
        if resumed_from is not None:
            history = {step: row for step, row in history.items() if step < resumed_from}
        history.update(rows)
    return history


@pytest.mark.slow
def test_multirun_two_folds_then_resume(tmp_path):
    # the joblib launcher's loky workers, on a synthetic data set that the first job generates
    data_root = tmp_path / "data" / "smoke"
    common = ["experiment=smoke", f"paths.data_dir={tmp_path / 'data'}"]
    result = _train(["-m", "fold=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=1", *common],
                    cwd=tmp_path)
    assert len(list(data_root.iterdir())) >= 6  # the generated cases
    log = result.stdout + result.stderr
    lines = set(log.splitlines())  # the loky workers' log lines can reach both streams
    assert len([line for line in lines if "using bf16-mixed" in line or "using 32-true" in line]) == 2
    # not a terminal: one plain line per epoch and job, with losses, validation Dice, lr, time and ETA
    epoch_lines = [line for line in lines if re.search(r"epoch [12]/2  train/loss ", line)]
    assert len(epoch_lines) == 4, log[-3000:]
    line_format = (r"\(main [\d.]+\)  val/loss [\d.]+  val Dice [\d.]+ \(ET [\d.]+ TC [\d.]+ WT [\d.]+\)"
                   r"  lr [\d.e+-]+  [\d.]+ s/epoch  ETA \d+m\d\ds")
    assert all(re.search(line_format, line) for line in epoch_lines), epoch_lines
    assert "v_num" not in log
    runs = {}
    for fold in (0, 1):
        run_dir = tmp_path / "outputs" / "smoke" / "smoke" / "A" / "equiunet" / f"fold{fold}"
        run = json.loads((run_dir / "run.json").read_text())
        runs[fold] = run
        assert RUN_KEYS <= set(run)
        assert (run["pipeline"], run["model"], run["fold"], run["seed"]) == ("A", "equiunet", fold, 42)
        assert run["normalization"] == "minmax" and run["label_convention"] == "brats2020"
        assert run["channels"] == ["t1", "t1ce", "t2", "flair"]
        assert run["run_dir"] == str(run_dir.resolve())
        assert run["data"]["root"] == str(data_root.resolve())
        assert run["checkpoints"]["swa"] is None and run["val_metrics_swa"] is None
        assert set(run["val_metrics"]) >= {"dice_et", "dice_tc", "dice_wt", "dice_mean", "loss",
                                           "channel_dice_et", "channel_dice_tc", "channel_dice_wt",
                                           "channel_dice_mean"}
        assert json.loads((run_dir / "fingerprint.json").read_text())["dataset.root"] == str(data_root)
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
        assert len(dice_rows) == 2  # 2 validation epochs; the final validation of best.ckpt is no epoch
        val_losses = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
        best = min(range(len(val_losses)), key=val_losses.__getitem__)  # best.ckpt: lowest val/loss
        assert run["val_metrics_checkpoint"] == "best"
        assert run["val_metrics"]["dice_mean"] == pytest.approx(dice_rows[best], abs=1e-6)
        wandb_run = _wandb_run(run_dir)
        assert wandb_run["ids"] == {run["wandb_run_id"]}
        assert (wandb_run["group"], wandb_run["name"]) == ("A", f"A-equiunet-fold{fold}")
        assert wandb_run["history"] == pytest.approx(dice_rows)
        assert wandb_run["summary"]["best/dice_mean"] == pytest.approx(run["val_metrics"]["dice_mean"])

        # the default callbacks draw overlays of the first two validation cases each validation epoch
        pngs = {p.name for p in (run_dir / "overlays").glob("*.png")}
        cases = sorted(run["val_cases"])[:2]
        assert {f"epoch{epoch:03d}_{case}.png" for epoch in (0, 1) for case in cases} <= pngs
        assert wandb_run["overlays"] >= 2 and wandb_run["case_tables"] >= 2
        assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"  # the training curves
    assert runs[0]["wandb_run_id"] != runs[1]["wandb_run_id"]
    assert runs[0]["split_file"] == runs[1]["split_file"]
    assert set(runs[0]["val_cases"]).isdisjoint(runs[1]["val_cases"])

    # the same job with other settings is refused, naming what changed: nothing is touched
    run_dir = tmp_path / "outputs" / "smoke" / "smoke" / "A" / "equiunet" / "fold0"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")  # Hydra rewrites .hydra/ and train.log
              if p.is_file() and p.name != "train.log" and ".hydra" not in p.parts}
    refused = _train(["fold=0", "pipeline.epochs=3", *common], cwd=tmp_path, returncode=2)
    assert "pipeline.epochs: 2 -> 3" in refused.stderr and "resume=force" in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("train.py: error: ")]
    assert "Traceback" not in refused.stderr and len(errors) == 1 and str(run_dir) in errors[0]
    assert {p: p.stat().st_mtime_ns for p in before} == before

    # resume=force continues the run from last.ckpt, in the same folder, W&B run and metrics.csv;
    # WANDB_MODE set but empty counts as unset (W&B offline, as configured)
    result = _train(["fold=0", "pipeline.epochs=3", "resume=force", *common], cwd=tmp_path, wandb_mode="")
    assert "resuming from" in result.stdout + result.stderr
    resumed = json.loads((run_dir / "run.json").read_text())
    assert resumed["epochs_trained"] == 3 and resumed["global_step"] == 6  # 2 more steps, not 6 new ones
    assert resumed["wandb_run_id"] == runs[0]["wandb_run_id"]
    assert _wandb_run(run_dir)["ids"] == {runs[0]["wandb_run_id"]}
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    epochs = sorted({int(r["epoch"]) for r in rows if r.get("train/loss_epoch")})
    assert epochs == [0, 1, 2]  # the first run's rows kept, the third epoch appended
    assert len([r for r in rows if r.get("val/dice_mean")]) == 3  # one per epoch, no re-validation rows
    history = _wandb_history(run_dir)  # the resumed W&B run continues at the checkpoint's step
    assert sorted(step for step, row in history.items() if "val/dice_mean" in row) == [
        int(r["step"]) for r in rows if r.get("val/dice_mean")]
    assert json.loads((run_dir / "fingerprint.json").read_text())["pipeline.epochs"] == 3


def test_bad_fold_is_refused_in_seconds_without_a_run_folder(tmp_path):
    start = time.monotonic()
    result = _train(["fold=7", "experiment=smoke", "data.root=/nonexistent", "data.generate=null"],
                    cwd=tmp_path, returncode=2, wandb_mode="disabled")
    assert time.monotonic() - start < 60  # mostly imports (torch, Lightning) on a busy 2-core machine
    assert result.stderr.strip().splitlines() == [
        "train.py: error: fold=7: the data set is split into data.n_folds=5 folds, numbered 0 to 4; pass "
        "fold=0 ... fold=4 (or change data.n_folds)"]
    assert not any((tmp_path / "outputs").iterdir())  # Hydra's run folder (.hydra/, train.log) removed again


def test_settings_checked_before_anything_is_created(tmp_path):
    import train

    cfg = OmegaConf.create({"fold": 0, "resume": True, "data": {"n_folds": 5, "root": str(tmp_path / "none"),
                                                                "generate": None}})
    with pytest.raises(UserError, match=r"data.root=.*none: found nothing; expected a folder"):
        train.check_settings(cfg)
    cfg.data.generate = {"n_cases": 2}  # a synthetic set is generated there: fine
    train.check_settings(cfg)
    cfg.resume = "maybe"
    with pytest.raises(UserError, match="resume='maybe'"):
        train.check_settings(cfg)


# ------------------------------------------------------------------------------- resume bookkeeping
def test_fingerprint_ignores_resumable_keys_and_lists_changes(tmp_path):
    from brats_lightning.runs import fingerprint_changes, run_fingerprint

    split = tmp_path / "split.json"
    split.write_text('{"folds": []}')
    config = {"fold": 0, "pipeline": {"epochs": 2}, "trainer": {"devices": 1, "max_epochs": 2},
              "data": {"num_workers": 2, "root": "/a"}, "paths": {"run_dir": "/x"},
              "callbacks": {"best_checkpoint": {"dirpath": "/x/checkpoints", "monitor": "val/loss"}}}
    base = run_fingerprint(config, tmp_path, ["b", "a"], "brats2020", split)
    assert "fold" in base and "callbacks.best_checkpoint.monitor" in base
    resumable = {"trainer.devices", "data.num_workers", "paths.run_dir", "callbacks.best_checkpoint.dirpath"}
    assert not resumable & set(base)
    moved = {**config, "trainer": {"devices": 4, "max_epochs": 2}, "data": {"num_workers": 8, "root": "/b"},
             "paths": {"run_dir": "/y"},
             "callbacks": {"best_checkpoint": {"dirpath": "/y/c", "monitor": "val/loss"}}}
    assert run_fingerprint(moved, tmp_path, ["a", "b"], "brats2020", split) == base  # same run, moved
    other = {**config, "pipeline": {"epochs": 3}}
    split.write_text('{"folds": [1]}')
    changed = run_fingerprint(other, tmp_path, ["a", "b", "c"], "brats2023", split)
    changes = fingerprint_changes(base, changed)
    assert [c.split(":")[0] for c in changes] == [
        "dataset.cases_sha256", "dataset.label_convention", "dataset.n_cases", "dataset.split_sha256",
        "pipeline.epochs"]
    assert "pipeline.epochs: 2 -> 3" in changes and "dataset.n_cases: 2 -> 3" in changes


def test_best_checkpoint_state_survives_a_moved_run_folder(tmp_path):
    old, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    saved = best_checkpoint(old, monitor="val/loss", mode="min")
    saved.best_model_score, saved.best_model_path = torch.tensor(0.25), str(old / "best.ckpt")
    saved.best_k_models = {str(old / "best.ckpt"): torch.tensor(0.25)}
    saved.kth_best_model_path, saved.kth_value = str(old / "best.ckpt"), torch.tensor(0.25)
    restored = best_checkpoint(new, monitor="val/loss", mode="min")
    restored.load_state_dict(saved.state_dict())
    assert restored.best_model_score == pytest.approx(0.25)  # Lightning alone would drop it (dirpath changed)
    assert restored.best_model_path == str(new / "best.ckpt")
    assert restored.best_k_models == {str(new / "best.ckpt"): pytest.approx(0.25)}
    assert restored.kth_best_model_path == str(new / "best.ckpt")


def test_csv_rows_after_the_checkpoint_are_dropped(tmp_path):
    from brats_lightning.runs import ResumableCSVLogger

    logger = ResumableCSVLogger(tmp_path)
    for step in range(5):
        logger.log_metrics({"train/loss_step": float(step)}, step=step)
    logger.save()
    assert ResumableCSVLogger(tmp_path).drop_rows_from(3) == 2
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 1, 2]


# ------------------------------------------------------------------------------------- validation
def test_validation_scores_the_label_map_and_keeps_channel_dice_apart():
    """ET fires where the truth has no tumour core: the label map (ET -> et first) makes that tumour core and
    whole tumour too, which is what inference writes; the per-channel Dice does not see it."""
    cfg = OmegaConf.create({"pipeline": OmegaConf.load(REPO / "conf" / "pipeline" / "B.yaml")})
    pipeline = OmegaConf.to_container(cfg, resolve=False)["pipeline"]
    pipeline["augment"] = None
    conv = {"_target_": "torch.nn.Conv3d", "in_channels": 4, "out_channels": 3, "kernel_size": 1}
    module = BratsModule(conv, {"loss": pipeline["loss"], "augment": None}).eval()
    with torch.no_grad():  # logits: ET = 20 t1ce - 10, TC = -10, WT = 20 flair - 10
        module.net.weight.zero_()
        module.net.weight[0, 1], module.net.weight[2, 3] = 20.0, 20.0
        module.net.bias.fill_(-10.0)
    image = torch.zeros(1, 4, 8, 8, 8)
    image[0, 1, :2] = 1.0  # t1ce: ET predicted in 2 x 8 x 8 = 128 voxels (a)
    image[0, 3, 4:] = 1.0  # flair: WT predicted in 256 other voxels (b)
    et = torch.zeros(8, 8, 8, dtype=torch.bool)
    et[:2] = True
    wt = et.clone()
    wt[4:] = True
    target = torch.stack([et, et, wt])[None]  # truth: ET = TC = a, WT = a + b (nested)
    box = {"start": [0, 0, 0], "stop": [8, 8, 8]}
    metrics, pred = module.score_batch({"image": image, "target": target, "box": [box]})
    assert torch.equal(pred[0], target[0])  # the label map's regions: ET a, TC a, WT a + b
    assert [float(metrics[f"dice_{r}"]) for r in ("et", "tc", "wt", "mean")] == pytest.approx([1, 1, 1, 1])
    a, b = 128, 256
    channel_wt = 2 * b / (b + (a + b))  # predicted b against truth a + b
    assert [float(metrics[f"channel_dice_{r}"]) for r in ("et", "tc", "wt")] == pytest.approx(
        [1.0, 0.0, channel_wt])  # TC channel empty against a non-empty truth: 0
    assert float(metrics["channel_dice_mean"]) == pytest.approx((1.0 + channel_wt) / 3)


# ---------------------------------------------------------------------------------------- progress
def test_progress_bar_has_no_version_and_the_epoch_line_its_numbers(tmp_path):
    from brats_lightning.progress import EpochLog, RichBar, progress_bar

    trainer = pl.Trainer(logger=pl.loggers.CSVLogger(tmp_path), max_epochs=40, enable_progress_bar=False)
    module = BratsModule({"_target_": "torch.nn.Identity"}, {"loss": {"squared": False}, "augment": None})
    assert "v_num" not in RichBar().get_metrics(trainer, module)
    assert isinstance(progress_bar(), EpochLog)  # pytest's stdout is not a terminal
    bar = EpochLog()
    trainer.fit_loop.epoch_progress.current.completed = 3  # epoch 3 (the 4th of 40)
    values = {"train/loss_epoch": 4.5, "train/loss_main": 0.9, "val/loss": 0.8, "val/dice_mean": 0.4,
              "val/dice_et": 0.1, "val/dice_tc": 0.4, "val/dice_wt": 0.7}
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
    bar._validated, bar._durations = True, [10.0, 14.0]
    assert bar.line(trainer) == (  # ETA: 12 s (mean) x 36 epochs left
        "epoch 4/40  train/loss 4.5000 (main 0.9000)  val/loss 0.8000  val Dice 0.400 "
        "(ET 0.100 TC 0.400 WT 0.700)  14.0 s/epoch  ETA 7m12s")
