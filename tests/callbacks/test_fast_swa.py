"""Tests of brats_lightning/callbacks/fast_swa.py (FastSWA) and conf/callbacks/fast_swa.yaml.

The expected schedule, snapshot epochs and averages are computed here from the closed forms of docs/method.md
"Training" (fast SWA) and from copies of the weights taken by a recording callback, not from the callback's
own helpers.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

from brats_lightning.callbacks.fast_swa import FastSWA, register_resolvers
from brats_lightning.checkpointing import AtomicCheckpointIO, RandomStateCheckpoint, last_checkpoint
from brats_lightning.data.datamodule import BratsDataModule
from brats_lightning.module import BratsModule
from brats_lightning.optim import Ranger, build_optimizer, build_scheduler
from brats_lightning.runs import ResumableCSVLogger, callback_records, read_run, write_run_record

REPO = Path(__file__).resolve().parents[2]

# small schedule used with the real BratsModule: 2 main epochs, 2 cycles x 3 epochs, a snapshot every 2
MAIN, CYCLES, CYCLE, EVERY, LR = 2, 2, 3, 2, 5e-5
TOTAL = MAIN + CYCLES * CYCLE  # 8


def expected_swa_lr(epoch: int, main: int, cycle_epochs: int, lr: float) -> float:
    """docs/method.md: each cycle restarts at lr with a per-epoch cosine decay to 0 over the cycle."""
    t = (epoch - main) % cycle_epochs
    return lr * 0.5 * (1 + math.cos(math.pi * t / cycle_epochs))


class Recorder(pl.Callback):
    """Per epoch: the optimizer in use (type, object, lr, weight decay, whether it has state) at the epoch's
    start, and float64 copies of the floating-point state entries at its end (keyed by epochs done)."""

    def __init__(self) -> None:
        self.optim: dict[int, dict] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        group = opt.param_groups[0]
        scheduled = trainer.lr_scheduler_configs[0].scheduler.optimizer
        self.optim[trainer.current_epoch] = {
            "type": type(opt), "opt": opt, "lr": group["lr"], "weight_decay": group["weight_decay"],
            "has_state": len(opt.state) > 0, "scheduler_optimizer": scheduled is opt}

    def on_train_epoch_end(self, trainer, pl_module):
        state = pl_module.state_dict()
        self.weights[trainer.current_epoch + 1] = {
            k: v.detach().double().clone() for k, v in state.items() if v.is_floating_point()}


class Crash(pl.Callback):
    """Stops the process-like run at the start of epoch ``epoch`` (after that epoch's predecessor's
    checkpoint), as a kill would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash at epoch {self.epoch}")


def make_module(seed: int = 0) -> BratsModule:
    from omegaconf import OmegaConf

    pl.seed_everything(seed)
    cfg = OmegaConf.create({"pipeline": OmegaConf.load(REPO / "conf" / "pipeline" / "A.yaml")})
    cfg.pipeline.epochs = MAIN
    pipe = OmegaConf.to_container(cfg, resolve=True)["pipeline"]
    model = {"_target_": "brats_lightning.models.EquiUnet", "width": 4, "norm": pipe["norm"]}
    return BratsModule(model, pipe)


def make_trainer(run_dir: Path, callbacks: list, logger=False) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", precision="32-true", max_epochs=TOTAL, limit_train_batches=1,
                      check_val_every_n_epoch=1000, num_sanity_val_steps=0, deterministic=True, logger=logger,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir,
                      callbacks=[*callbacks, last_checkpoint(run_dir / "checkpoints"),
                                 RandomStateCheckpoint()],
                      plugins=[AtomicCheckpointIO()])


def make_swa(run_dir: Path) -> FastSWA:
    return FastSWA(main_epochs=MAIN, cycles=CYCLES, cycle_epochs=CYCLE, snapshot_every=EVERY, lr=LR,
                   dirpath=run_dir / "checkpoints")


@pytest.fixture(scope="module")
def swa_run(synthetic_root, tmp_path_factory):
    """One uninterrupted run: BratsModule (w=4, 16^3 crops), 2 main + 2 x 3 SWA epochs, CSV logger."""
    run_dir = tmp_path_factory.mktemp("swa_run")
    cache = tmp_path_factory.mktemp("swa_cache")
    module = make_module()
    dm = BratsDataModule(synthetic_root, fold=0, cache_dir=cache, crop_size=16, foreground_prob=0.5)
    swa, rec = make_swa(run_dir), Recorder()
    trainer = make_trainer(run_dir, [rec, swa], logger=ResumableCSVLogger(run_dir))
    trainer.fit(module, datamodule=dm)
    return {"run_dir": run_dir, "cache": cache, "module": module, "dm": dm, "swa": swa, "rec": rec,
            "trainer": trainer}


@pytest.mark.slow
def test_schedule_snapshots_and_average(swa_run):
    swa, rec, module = swa_run["swa"], swa_run["rec"], swa_run["module"]
    # lr and optimizer per epoch: the module's Ranger for the main epochs, then a fresh Adam per cycle
    for epoch in range(MAIN):
        assert rec.optim[epoch]["type"] is Ranger
    for epoch in range(MAIN, TOTAL):
        info = rec.optim[epoch]
        assert info["type"] is torch.optim.Adam and info["weight_decay"] == 0.0
        assert info["scheduler_optimizer"]
        assert info["lr"] == pytest.approx(expected_swa_lr(epoch, MAIN, CYCLE, LR), rel=1e-12, abs=1e-20)
        cycle_start = (epoch - MAIN) % CYCLE == 0
        assert info["has_state"] is not cycle_start  # fresh Adam (no moments) exactly at each cycle start
        assert (info["opt"] is rec.optim[epoch - 1]["opt"]) is not cycle_start
    assert [rec.optim[e]["lr"] for e in (2, 3, 4, 5)] == pytest.approx([5e-5, 3.75e-5, 1.25e-5, 5e-5])
    # snapshots: the weights after epoch 2 (end of the main schedule), then every 2 epochs: 4, 6, 8
    expected_epochs = [MAIN] + list(range(MAIN + EVERY, TOTAL + 1, EVERY))
    assert expected_epochs == [2, 4, 6, 8]
    assert swa.snapshot_epochs == expected_epochs and swa.n_snapshots == 4
    keys = set(rec.weights[TOTAL])
    assert set(swa.average) == keys and all(k.startswith("net.") for k in keys)
    changed = 0
    for key in keys:
        expected = torch.stack([rec.weights[e][key] for e in expected_epochs]).mean(dim=0)
        assert swa.average[key].dtype == torch.float32
        torch.testing.assert_close(swa.average[key].double(), expected, rtol=0, atol=2e-7)
        changed += not torch.equal(rec.weights[MAIN][key], rec.weights[TOTAL][key])
    assert changed > 0  # the SWA epochs trained: the snapshots differ
    # the module keeps its own (last-epoch) weights; the average is only in swa.ckpt
    for key, value in module.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value.double(), rec.weights[TOTAL][key])


def test_swa_checkpoint_loads_and_reproduces_val_swa(swa_run, tmp_path):
    swa, run_dir, dm = swa_run["swa"], swa_run["run_dir"], swa_run["dm"]
    path = run_dir / "checkpoints" / "swa.ckpt"
    assert swa.swa_path == path.resolve() and path.is_file()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain Lightning checkpoint
    assert "optimizer_states" not in ckpt and "callbacks" not in ckpt
    assert set(ckpt["state_dict"]) == set(swa_run["module"].state_dict())
    for key, value in swa.average.items():
        assert torch.equal(ckpt["state_dict"][key], value)
    # a fresh model from the checkpoint, validated by Lightning, scores what the callback logged
    fresh = BratsModule.load_from_checkpoint(path, map_location="cpu")
    results = pl.Trainer(accelerator="cpu", precision="32-true", logger=False, enable_progress_bar=False,
                         enable_model_summary=False).validate(fresh, datamodule=dm, verbose=False)[0]
    metrics = swa.val_metrics
    assert set(metrics) >= {"loss", "dice_mean", "dice_et", "dice_tc", "dice_wt"}  # every val/ metric
    assert {f"val/{key}" for key in metrics} == {key for key in results if key.startswith("val/")}
    for key, value in metrics.items():
        assert results[f"val/{key}"] == pytest.approx(value, abs=1e-6)
    swa_run["trainer"].loggers[0].finalize("success")
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_swa/dice_mean")]
    assert len(rows) == 1
    for key, value in metrics.items():
        assert float(rows[0][f"val_swa/{key}"]) == pytest.approx(value, rel=1e-6)
    # run.json: the record train.py merges; inference then picks the SWA weights and their score
    record = callback_records([swa])
    assert record["checkpoints"] == {"swa": str(path.resolve())}
    assert record["val_metrics_swa"] == metrics and record["fast_swa"]["n_snapshots"] == 4
    base = {"pipeline": "A", "model": "equiunet", "fold": 0, "normalization": "minmax",
            "label_convention": "brats2020", "channels": ["t1", "t1ce", "t2", "flair"],
            "model_config": dict(fresh.hparams["model_config"]),
            "checkpoints": {"best": None, "last": str(run_dir / "checkpoints" / "last.ckpt")},
            "val_metrics": {"dice_mean": -1.0}}
    run = read_run(write_run_record(tmp_path, {**base, **record, "checkpoints": {**base["checkpoints"],
                                                                                   **record["checkpoints"]}}))
    assert run.checkpoint_path() == path.resolve() and run.score == pytest.approx(metrics["dice_mean"])


@pytest.mark.slow
def test_resume_mid_cycle_continues_exactly(swa_run, tmp_path):
    """Interrupted at the start of epoch 4 (cycle 0 of SWA, Adam with state), resumed from last.ckpt with a
    differently initialized module: the same lr, snapshots, running average and final weights."""
    ref = swa_run
    dm = BratsDataModule(ref["dm"].root, fold=0, cache_dir=ref["cache"], crop_size=16, foreground_prob=0.5)
    first = make_trainer(tmp_path, [make_swa(tmp_path), Crash(4)])
    with pytest.raises(RuntimeError, match="simulated crash at epoch 4"):
        first.fit(make_module(), datamodule=dm)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["callbacks"]["FastSWA"]["cycle"] == 0 and saved["callbacks"]["FastSWA"]["epochs_done"] == 4
    assert saved["optimizer_states"][0]["state"]  # Adam moments to restore

    swa, rec = make_swa(tmp_path), Recorder()
    dm = BratsDataModule(ref["dm"].root, fold=0, cache_dir=ref["cache"], crop_size=16, foreground_prob=0.5)
    resumed = make_trainer(tmp_path, [rec, swa])
    resumed.fit(make_module(seed=123), datamodule=dm, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert sorted(rec.optim) == list(range(4, TOTAL)) and resumed.current_epoch == TOTAL
    for epoch in range(4, TOTAL):
        assert rec.optim[epoch]["type"] is torch.optim.Adam
        assert rec.optim[epoch]["lr"] == ref["rec"].optim[epoch]["lr"]
        assert rec.optim[epoch]["has_state"] == ref["rec"].optim[epoch]["has_state"]
    assert swa.snapshot_epochs == ref["swa"].snapshot_epochs
    for key, value in ref["swa"].average.items():
        assert torch.equal(swa.average[key], value)
    for key, value in ref["rec"].weights[TOTAL].items():
        assert torch.equal(rec.weights[TOTAL][key], value)
    assert swa.val_metrics == ref["swa"].val_metrics


# ---------------------------------------------------------------------------------- tiny module, many epochs
class Tiny(pl.LightningModule):
    """A linear layer on fixed random data, with pipeline A's optimizer and main schedule."""

    def __init__(self, main_epochs: int) -> None:
        super().__init__()
        self.main_epochs = main_epochs
        self.net = torch.nn.Linear(3, 2)
        self.data = TensorDataset(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)),
                                  torch.randn(4, 2, generator=torch.Generator().manual_seed(1)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=4)

    def configure_optimizers(self):
        opt = build_optimizer(self.net.parameters(), {"name": "ranger", "lr": 1e-4})
        sched = build_scheduler(opt, {"name": "constant_cosine", "epochs": max(self.main_epochs, 1),
                                      "constant_fraction": 0.5})
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def tiny_trainer(tmp_path: Path, max_epochs: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
                      default_root_dir=tmp_path)


def test_paper_numbers_350_epochs_51_snapshots(tmp_path):
    swa, rec = FastSWA(main_epochs=200, validate=False, dirpath=tmp_path), Recorder()
    assert (swa.cycles, swa.cycle_epochs, swa.snapshot_every, swa.lr) == (5, 30, 3, 5e-5)
    tiny_trainer(tmp_path, 350, [rec, swa]).fit(Tiny(200))
    assert swa.n_snapshots == 51 == 1 + 150 // 3
    assert swa.snapshot_epochs == [200] + list(range(203, 351, 3))
    for epoch in range(200):  # the main schedule: constant 1e-4 for 100 epochs, cosine to 0 over 100
        main_lr = 1e-4 if epoch < 100 else 1e-4 * 0.5 * (1 + math.cos(math.pi * (epoch - 100) / 100))
        assert rec.optim[epoch]["type"] is Ranger and rec.optim[epoch]["lr"] == pytest.approx(main_lr)
    for epoch in range(200, 350):
        assert rec.optim[epoch]["type"] is torch.optim.Adam
        assert rec.optim[epoch]["lr"] == pytest.approx(expected_swa_lr(epoch, 200, 30, 5e-5), rel=1e-12)
    assert len({id(rec.optim[e]["opt"]) for e in range(200, 350)}) == 5  # a fresh Adam per cycle
    weights = torch.stack([rec.weights[e]["net.weight"] for e in swa.snapshot_epochs])
    torch.testing.assert_close(swa.average["net.weight"].double(), weights.mean(0), rtol=0, atol=1e-7)
    assert (tmp_path / "swa.ckpt").is_file()


def test_no_main_schedule_seeds_with_initial_weights(tmp_path):
    """main_epochs=0: the average starts from the initial weights and the first cycle from epoch 0."""
    swa, rec = FastSWA(main_epochs=0, cycles=1, cycle_epochs=2, snapshot_every=1, validate=False,
                       dirpath=tmp_path), Recorder()
    module = Tiny(0)
    initial = module.net.weight.detach().double().clone()
    tiny_trainer(tmp_path, 2, [rec, swa]).fit(module)
    assert swa.snapshot_epochs == [0, 1, 2]
    assert rec.optim[0]["type"] is torch.optim.Adam and not rec.optim[0]["has_state"]
    expected = torch.stack([initial, rec.weights[1]["net.weight"], rec.weights[2]["net.weight"]]).mean(0)
    torch.testing.assert_close(swa.average["net.weight"].double(), expected, rtol=0, atol=1e-7)


def test_wrong_max_epochs_fails_at_setup_with_the_value_to_set(tmp_path):
    swa = FastSWA(main_epochs=4, cycles=2, cycle_epochs=3, dirpath=tmp_path)
    with pytest.raises(ValueError, match=r"set trainer.max_epochs=10 "):
        tiny_trainer(tmp_path, 7, [swa]).fit(Tiny(4))


def test_resuming_with_other_swa_settings_is_refused():
    swa = FastSWA(main_epochs=4, cycles=2, cycle_epochs=3, snapshot_every=3)
    state = swa.state_dict()
    state.update(epochs_done=6, cycle=0, n_snapshots=1)
    # more cycles: accepted (extends the run); another snapshot interval: refused
    FastSWA(main_epochs=4, cycles=3, cycle_epochs=3, snapshot_every=3).load_state_dict(state)
    with pytest.raises(ValueError, match="snapshot_every"):
        FastSWA(main_epochs=4, cycles=2, cycle_epochs=3, snapshot_every=2).load_state_dict(state)


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, main, total", [
    (["callbacks=[default,fast_swa]", "pipeline=A"], 200, 350),
    (["experiment=paper_A", "data.root=/data"], 200, 350),
    (["callbacks=[default,fast_swa]", "experiment=smoke", "callbacks.fast_swa.cycles=2",
      "callbacks.fast_swa.cycle_epochs=3"], 2, 8),
])
def test_config_sets_max_epochs(overrides, main, total):
    register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    node = cfg.callbacks.fast_swa
    assert node._target_ == "brats_lightning.callbacks.fast_swa.FastSWA"
    assert (node.main_epochs, cfg.trainer.max_epochs) == (main, total)
    if main == 200:
        assert (node.cycles, node.cycle_epochs, node.snapshot_every, node.lr, node.weight_decay) == \
            (5, 30, 3, 5e-5, 0.0)


def test_authors_cycle_schedule_is_cosine_annealing_t40_stepped_30_times(tmp_path):
    """experiment=paper_A_code's ``cosine_epochs``: each cycle's lr per epoch is what the authors' code got
    from ``CosineAnnealingLR(Adam(lr=5e-5), T_max=30 + 10)`` stepped once after each of the 30 epochs
    (torch's scheduler run here), so every cycle ends at 17.5% of 5e-5 before the next restarts."""
    register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=paper_A_code", "data.root=/data"])
    node = cfg.callbacks.fast_swa
    assert (node.cosine_epochs, node.cycle_epochs, node.lr) == (40, 30, 5e-5)
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=node.lr)
    torch_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(adam, T_max=node.cycle_epochs + 10)
    code_lrs = []
    for _ in range(node.cycle_epochs):
        code_lrs.append(adam.param_groups[0]["lr"])
        adam.step()
        torch_schedule.step()
    assert code_lrs[-1] / node.lr == pytest.approx(0.5 * (1 + math.cos(math.pi * 29 / 40)))  # 0.1747
    assert code_lrs[-1] / node.lr == pytest.approx(0.175, abs=5e-4)
    swa = FastSWA(main_epochs=1, cycles=2, cycle_epochs=node.cycle_epochs, snapshot_every=3, lr=node.lr,
                  cosine_epochs=node.cosine_epochs, validate=False, dirpath=tmp_path)
    rec = Recorder()
    tiny_trainer(tmp_path, swa.total_epochs, [rec, swa]).fit(Tiny(1))
    for cycle in range(2):
        lrs = [rec.optim[1 + cycle * 30 + t]["lr"] for t in range(30)]
        assert lrs == pytest.approx(code_lrs, rel=1e-12)
    assert swa.run_record()["fast_swa"]["cosine_epochs"] == 40
    # the paper's default decays to (nearly) 0 within the cycle instead
    assert FastSWA(main_epochs=1).cosine_epochs == 30
    with pytest.raises(ValueError, match="cosine_epochs"):
        FastSWA(main_epochs=1, cosine_epochs=0)
