"""Tests of brats_lightning/optim.py: Ranger under a real Lightning Trainer, gradient centralization, and the
per-epoch schedules against their closed forms (paper section 2.5, docs/method.md "Training")."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch_optimizer
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from brats_lightning.optim import (
    Ranger,
    WarmupConstantCosine,
    build_optimizer,
    build_scheduler,
    centralize_gradient,
)

CONF = Path(__file__).resolve().parents[1] / "conf"


def _pipeline(name: str, epochs: int) -> dict:
    cfg = OmegaConf.create({"pipeline": OmegaConf.load(CONF / "pipeline" / f"{name}.yaml")})
    cfg.pipeline.epochs = epochs
    return OmegaConf.to_container(cfg, resolve=True)["pipeline"]


def _lrs(optimizer_cfg: dict, scheduler_cfg: dict, epochs: int) -> list[float]:
    """The lr in effect during each epoch, stepping the scheduler once per epoch as Lightning does."""
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = build_optimizer(params, optimizer_cfg)
    scheduler = build_scheduler(optimizer, scheduler_cfg)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_pipeline_a_schedule_constant_100_then_cosine_to_zero():
    cfg = _pipeline("A", 200)
    assert cfg["optimizer"]["name"] == "ranger" and cfg["optimizer"]["lr"] == 1e-4
    lrs = _lrs(cfg["optimizer"], cfg["scheduler"], 200)
    for epoch, lr in enumerate(lrs):
        expected = 1e-4 if epoch < 100 else 1e-4 * 0.5 * (1 + math.cos(math.pi * (epoch - 100) / 100))
        assert lr == pytest.approx(expected, rel=1e-12, abs=1e-18), epoch
    assert lrs[99] == 1e-4 and lrs[100] == pytest.approx(1e-4) and lrs[150] == pytest.approx(0.5e-4)
    assert lrs[199] == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))


def test_pipeline_b_schedule_equals_torch_cosine_annealing():
    cfg = _pipeline("B", 400)
    assert cfg["optimizer"]["name"] == "adam" and cfg["optimizer"]["weight_decay"] == 0.0
    lrs = _lrs(cfg["optimizer"], cfg["scheduler"], 400)
    reference_param = [torch.nn.Parameter(torch.zeros(2))]
    reference = torch.optim.Adam(reference_param, lr=1e-4)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=400)
    for epoch, lr in enumerate(lrs):
        assert lr == pytest.approx(reference.param_groups[0]["lr"], rel=1e-9, abs=1e-18), epoch
        assert lr == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * epoch / 400)), rel=1e-12, abs=1e-18)
        reference.step()
        annealing.step()


def test_warmup_then_cosine_with_floor():
    schedule = WarmupConstantCosine(epochs=10, warmup_epochs=2, constant_epochs=3, min_factor=0.1)
    factors = [schedule(e) for e in range(12)]
    assert factors[:2] == [pytest.approx(1 / 3), pytest.approx(2 / 3)]
    assert factors[2:5] == [1.0, 1.0, 1.0]
    for e in range(5, 10):
        assert factors[e] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (e - 5) / 5)))
    assert factors[10] == factors[11] == pytest.approx(0.1)  # held after the schedule's end
    schedule_cfg = {"name": "cosine", "epochs": 4, "warmup_epochs": 1, "min_lr": 1e-3}
    lrs = _lrs({"name": "adam", "lr": 0.01}, schedule_cfg, 5)
    assert lrs == pytest.approx([0.005, 0.01, 0.01 * 0.1 + 0.009 * 0.5 * (1 + math.cos(math.pi / 3)),
                                 1e-3 + 0.009 * 0.5 * (1 + math.cos(2 * math.pi / 3)), 1e-3])


def test_constant_fraction_follows_epochs_and_bad_configs_raise():
    schedule_cfg = {"name": "constant_cosine", "epochs": 8, "constant_fraction": 0.5}
    lrs = _lrs({"name": "sgd", "lr": 1.0}, schedule_cfg, 8)
    assert lrs[:4] == [1.0] * 4 and lrs[4] == pytest.approx(1.0) and lrs[6] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="constant_epochs=100"):
        _lrs({"name": "sgd", "lr": 1.0}, {"name": "constant_cosine", "epochs": 8, "constant_epochs": 100}, 1)
    with pytest.raises(ValueError, match="unknown scheduler"):
        _lrs({"name": "sgd", "lr": 1.0}, {"name": "step", "epochs": 8}, 1)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], {"name": "lamb", "lr": 1.0})


def test_centralize_gradient_zero_mean_per_output_channel():
    torch.manual_seed(0)
    grad = torch.randn(5, 3, 3, 3, 3) + 2.0
    original = grad.clone()
    centralize_gradient(grad)
    assert torch.allclose(grad.mean(dim=(1, 2, 3, 4)), torch.zeros(5), atol=1e-6)
    assert torch.allclose(original - grad, original.mean(dim=(1, 2, 3, 4), keepdim=True).expand_as(grad))
    bias = torch.randn(5)
    assert torch.equal(centralize_gradient(bias.clone()), bias)


def test_ranger_matches_torch_optimizer_ranger_with_centralized_gradients():
    """Same arithmetic as torch-optimizer's Ranger (RAdam + Lookahead k=6) once the gradient is centralized,
    over 13 steps (two Lookahead synchronizations, both sides of RAdam's rectification threshold)."""
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3)
    ours_p, ref_p = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    ours = Ranger([ours_p], lr=1e-2, use_gc=True)
    ref = torch_optimizer.Ranger([ref_p], lr=1e-2)
    target = torch.randn(4, 3, 3)
    for _ in range(13):
        ref.zero_grad()
        ((ref_p - target) ** 2 * torch.arange(1.0, 10.0).view(1, 3, 3)).sum().backward()
        centralize_gradient(ref_p.grad)
        ref.step()

        def closure() -> torch.Tensor:
            ours.zero_grad()
            loss = ((ours_p - target) ** 2 * torch.arange(1.0, 10.0).view(1, 3, 3)).sum()
            loss.backward()
            return loss

        returned = ours.step(closure)
        assert isinstance(returned, torch.Tensor) and returned.requires_grad
    assert torch.allclose(ours_p, ref_p, atol=1e-7)
    assert not torch.allclose(ours_p, weight)


class _Regression(pl.LightningModule):
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)
        self.optimizer_name = optimizer
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "torch_optimizer":
            return torch_optimizer.Ranger(self.parameters(), lr=0.05)
        return build_optimizer(self.parameters(), {"name": "ranger", "lr": 0.2, "k": 6, "alpha": 0.5})


def _regression_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    y = x @ torch.linspace(-1, 1, 8).unsqueeze(1) + 0.5
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _trainer(tmp_path: Path) -> pl.Trainer:
    return pl.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)


def test_torch_optimizer_ranger_fails_under_lightning(tmp_path):
    """The trap (docs/method.md "Known traps"): torch-optimizer's Ranger ignores Lightning's closure."""
    with pytest.raises(Exception, match="closure"):
        _trainer(tmp_path).fit(_Regression("torch_optimizer"), _regression_loader())


def test_ranger_trains_under_lightning_trainer(tmp_path):
    pl.seed_everything(0)
    module = _Regression("ours")
    before = module.layer.weight.detach().clone()
    _trainer(tmp_path).fit(module, _regression_loader())
    assert len(module.losses) == 40  # 5 epochs x 8 batches, every closure ran exactly once
    assert not torch.allclose(module.layer.weight, before)
    first, last = sum(module.losses[:8]) / 8, sum(module.losses[-8:]) / 8
    assert last < 0.2 * first
