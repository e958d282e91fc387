"""Training survives interruption (train.py, checkpointing.py, runs.py, callbacks/fast_swa.py).

A real ``python train.py`` job with fast SWA and the case-loss recorder is killed with SIGKILL once during
the main schedule and once during the SWA phase, then run again with the same command until it finishes; it
must end with the same epochs, weights, averaged weights, per-case losses and W&B run id as an uninterrupted
job, and leave no temporary files. Running the finished job again (after losing swa.ckpt and run.json, as a
kill right after the last epoch would) must recreate them, identical, without training. A small in-process
run checks that fp16 AMP's grad scaler state crosses a resume in the SWA phase (Lightning only scales on
CUDA; here a CPU GradScaler is given to Lightning's MixedPrecision plugin).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from test_train import _wandb_history
from torch.utils.data import DataLoader, TensorDataset

from brats_lightning.callbacks.fast_swa import FastSWA
from brats_lightning.checkpointing import AtomicCheckpointIO, RandomStateCheckpoint, last_checkpoint
from brats_lightning.optim import build_optimizer, build_scheduler

REPO = Path(__file__).resolve().parents[1]
MAIN, CYCLES, CYCLE = 2, 2, 2
TOTAL = MAIN + CYCLES * CYCLE  # 6 epochs, SWA snapshots after epochs 2 (seed), 3, 4, 5, 6


def command(name: str, synthetic_root: Path, tmp: Path) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "experiment=smoke", f"name={name}",
            f"data.root={synthetic_root}", "data.generate=null", "data.crop_size=16",
            "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.precision=32-true",
            "trainer.deterministic=true", "callbacks=[default,fast_swa,case_losses]",
            "callbacks.progress_bar=null",
            f"pipeline.epochs={MAIN}", f"callbacks.fast_swa.cycles={CYCLES}",
            f"callbacks.fast_swa.cycle_epochs={CYCLE}", "callbacks.fast_swa.snapshot_every=1",
            f"paths.output_dir={tmp / 'outputs'}", f"paths.cache_dir={tmp / 'cache'}"]


ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}


def run_to_end(cmd: list[str], cwd: Path, env: dict[str, str] = ENV) -> None:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def swa_state(last: Path) -> dict | None:
    """The FastSWA state of ``last.ckpt`` (None while it doesn't exist)."""
    if not last.is_file():
        return None
    return torch.load(last, map_location="cpu", weights_only=True)["callbacks"]["FastSWA"]


def logged_after_checkpoint(last: Path) -> bool:
    """Whether metrics.csv beside ``last.ckpt``'s run folder holds rows from the checkpoint's step on (rows a
    resumed job must drop: it logs those steps again)."""
    metrics = last.parent.parent / "metrics.csv"
    if not metrics.is_file():
        return False
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    with open(metrics, newline="") as f:
        return any(row.get("step") and int(row["step"]) >= step for row in csv.DictReader(f))


def run_and_kill(cmd: list[str], cwd: Path, last: Path, epochs_done: int) -> dict:
    """Start the job, SIGKILL it as soon as ``last.ckpt`` says ``epochs_done`` epochs are done and metrics.csv
    holds rows logged after that checkpoint; return the FastSWA state of the ``last.ckpt`` it leaves."""
    process = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            state = swa_state(last)
            if state is not None and state["epochs_done"] >= epochs_done and logged_after_checkpoint(last):
                break
            assert process.poll() is None, f"the job ended before epoch {epochs_done}: " + \
                process.stderr.read().decode()[-4000:]
            time.sleep(0.05)
        else:
            pytest.fail(f"no checkpoint after {epochs_done} epochs within 300 s")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    return swa_state(last)


def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_killed_twice_finishes_like_an_uninterrupted_run(synthetic_root, tmp_path):
    ref_dir = tmp_path / "outputs" / "ref" / "smoke" / "A" / "equiunet" / "fold0"
    run_dir = tmp_path / "outputs" / "killed" / "smoke" / "A" / "equiunet" / "fold0"
    last = run_dir / "checkpoints" / "last.ckpt"
    run_to_end(command("ref", synthetic_root, tmp_path), tmp_path)

    cmd = command("killed", synthetic_root, tmp_path)
    state = run_and_kill(cmd, tmp_path, last, epochs_done=1)  # main schedule (Ranger)
    assert state["cycle"] == -1 and 1 <= state["epochs_done"] < MAIN
    wandb_id = (run_dir / "wandb_id.txt").read_text().strip()
    state = run_and_kill(cmd, tmp_path, last, epochs_done=MAIN + 1)  # SWA cycle 0, Adam with moments
    assert state["cycle"] >= 0 and MAIN + 1 <= state["epochs_done"] < TOTAL and state["n_snapshots"] >= 2
    assert torch.load(last, weights_only=True)["optimizer_states"][0]["state"]
    stale = run_dir / "checkpoints" / f".tmp-{dead_pid()}-0123abcd-last.ckpt"  # a save cut short by a kill
    stale.write_bytes(b"partial")
    run_to_end(cmd, tmp_path)

    ref_last = torch.load(ref_dir / "checkpoints" / "last.ckpt", weights_only=True)
    new_last = torch.load(last, weights_only=True)
    assert new_last["epoch"] == ref_last["epoch"] == TOTAL - 1
    assert new_last["global_step"] == ref_last["global_step"] == TOTAL
    for key, value in ref_last["state_dict"].items():
        assert torch.equal(new_last["state_dict"][key], value), key
    ref_swa = torch.load(ref_dir / "checkpoints" / "swa.ckpt", weights_only=True)["state_dict"]
    new_swa = torch.load(run_dir / "checkpoints" / "swa.ckpt", weights_only=True)["state_dict"]
    assert set(new_swa) == set(ref_swa)
    for key, value in ref_swa.items():
        assert torch.equal(new_swa[key], value), key
    ref_run = json.loads((ref_dir / "run.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    assert run["epochs_trained"] == ref_run["epochs_trained"] == TOTAL
    assert run["val_metrics_swa"] == ref_run["val_metrics_swa"]
    assert run["val_metrics"] == ref_run["val_metrics"]
    assert run["fast_swa"] == ref_run["fast_swa"] and run["fast_swa"]["snapshot_epochs"] == [2, 3, 4, 5, 6]
    assert run["checkpoints"]["swa"] == str((run_dir / "checkpoints" / "swa.ckpt").resolve())
    assert run["wandb_run_id"] == wandb_id
    assert (run_dir / "case_losses.csv").read_text() == (ref_dir / "case_losses.csv").read_text()
    with open(run_dir / "metrics.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert all(len(line) == len(lines[0]) for line in lines)  # no partial rows
    rows = [dict(zip(lines[0], line, strict=True)) for line in lines[1:]]
    assert sorted({int(r["epoch"]) for r in rows if r["train/loss_epoch"]}) == list(range(TOTAL))
    # the records equal the uninterrupted run's: no rows of the killed jobs' steps after their checkpoints
    with open(ref_dir / "metrics.csv", newline="") as f:
        ref_rows = list(csv.DictReader(f))
    assert rows == ref_rows
    # W&B: the last job's offline run continues at its checkpoint's step with the uninterrupted run's values
    # (a SIGKILLed job's own offline file may lack its last records: W&B had not written them yet)
    ref_history, history = _wandb_history(ref_dir), _wandb_history(run_dir)
    assert history and set(history) <= set(ref_history) and max(history) == max(ref_history)
    def numbers(row: dict) -> dict:  # metrics (media entries hold file names and hashes)
        return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    for step, values in history.items():
        assert numbers(values) == pytest.approx(numbers(ref_history[step])), step
    assert not stale.exists()
    assert not [p for p in run_dir.rglob("*") if p.name.startswith(".tmp-") or p.suffix == ".tmp"]

    # finished, then killed before swa.ckpt and run.json were written: the rerun recreates both, no training
    last_hash = sha256(last)
    (run_dir / "run.json").unlink()
    (run_dir / "checkpoints" / "swa.ckpt").unlink()
    run_to_end(cmd, tmp_path)
    assert sha256(last) == last_hash
    rerun = json.loads((run_dir / "run.json").read_text())
    assert rerun["epochs_trained"] == TOTAL and rerun["val_metrics_swa"] == run["val_metrics_swa"]
    assert rerun["checkpoints"] == run["checkpoints"] and rerun["wandb_run_id"] == wandb_id
    again = torch.load(run_dir / "checkpoints" / "swa.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(again[k], v) for k, v in ref_swa.items())
    assert not [p for p in run_dir.rglob("*") if p.name.startswith(".tmp-") or p.suffix == ".tmp"]


@pytest.mark.slow
def test_sigterm_and_ctrl_c_write_last_ckpt_exit_143_130_and_resume(synthetic_root, tmp_path):
    """The whole process group is signalled (SLURM's time limit, Ctrl-C in a terminal), DataLoader worker
    included: the job writes last.ckpt, says how to resume, exits 143 / 130 without a traceback, and the same
    command finishes the run with every step once."""
    run_dir = tmp_path / "outputs" / "stop" / "smoke" / "A" / "equiunet" / "fold0"
    last = run_dir / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, str(REPO / "train.py"), "experiment=smoke", "name=stop",
           f"data.root={synthetic_root}", "data.generate=null", "data.crop_size=16", "data.num_workers=1",
           "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.precision=32-true",
           "pipeline.epochs=4", "logger=csv", f"paths.output_dir={tmp_path / 'outputs'}",
           f"paths.cache_dir={tmp_path / 'cache'}"]
    env = {**ENV, "WANDB_MODE": "disabled"}
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        done = torch.load(last, weights_only=True)["global_step"] if last.is_file() else 0
        log = tmp_path / f"{signal.Signals(signum).name}.log"
        with open(log, "w") as output:
            process = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # its own process group, as a shell's job
            deadline = time.monotonic() + 300
            while not (last.is_file() and torch.load(last, weights_only=True)["global_step"] > done):
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            os.killpg(process.pid, signum)
            process.wait(timeout=300)
        out = log.read_text()
        assert process.returncode == code, out[-4000:]
        assert f"{signal.Signals(signum).name}: stopped at epoch" in out, out[-3000:]
        assert "rerun the same command to resume" in out and "Traceback" not in out, out[-4000:]
        assert last.is_file() and not (run_dir / "run.json").exists()
    run_to_end(cmd, tmp_path, env)
    run = json.loads((run_dir / "run.json").read_text())
    assert (run["epochs_trained"], run["global_step"]) == (4, 4)  # 4 epochs x 1 step, none repeated
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for column in ("train/loss_step", "train/loss_epoch", "val/loss"):
        steps = [int(r["step"]) for r in rows if r[column]]
        assert len(steps) == len(set(steps)) == 4, (column, steps)


class Linear(pl.LightningModule):
    """A linear layer on fixed random data (4 shuffled batches an epoch), Ranger + pipeline A's schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(3, 2)
        self.data = TensorDataset(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)),
                                  100 * torch.randn(8, 2, generator=torch.Generator().manual_seed(1)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).float(), y)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=2, shuffle=True)

    def configure_optimizers(self):
        opt = build_optimizer(self.net.parameters(), {"name": "ranger", "lr": 1e-2})
        sched = build_scheduler(opt, {"name": "constant_cosine", "epochs": 2, "constant_fraction": 0.5})
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class Crash(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 3:
            raise RuntimeError("crash at epoch 3")


def fit_fp16(folder: Path, callbacks: list, ckpt_path: str | None = None, seed: int = 0):
    pl.seed_everything(seed)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    swa = FastSWA(main_epochs=2, cycles=2, cycle_epochs=2, snapshot_every=1, validate=False, dirpath=folder)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=6, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=[MixedPrecision("16-mixed", "cpu", scaler),
                                                              AtomicCheckpointIO()],
                         callbacks=[*callbacks, swa, last_checkpoint(folder), RandomStateCheckpoint()])
    module = Linear()
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, swa, scaler


def test_grad_scaler_and_swa_state_cross_a_resume(tmp_path):
    ref, ref_swa, ref_scaler = fit_fp16(tmp_path / "ref", [])
    with pytest.raises(RuntimeError, match="crash at epoch 3"):
        fit_fp16(tmp_path / "run", [Crash()])
    saved = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert saved["callbacks"]["FastSWA"]["cycle"] == 0 and saved["epoch"] == 2
    assert saved["MixedPrecision"]["scale"] < 2.0**16  # the scaler backed off and regrew: a state to restore
    module, swa, scaler = fit_fp16(tmp_path / "run", [], ckpt_path=str(tmp_path / "run" / "last.ckpt"),
                                   seed=1)
    assert scaler.state_dict() == ref_scaler.state_dict()
    assert torch.equal(module.net.weight, ref.net.weight) and torch.equal(module.net.bias, ref.net.bias)
    assert swa.snapshot_epochs == ref_swa.snapshot_epochs == [2, 3, 4, 5, 6]
    assert all(torch.equal(swa.average[k], v) for k, v in ref_swa.average.items())
