"""Tests of brats_lightning/memory.py: activation checkpointing equals the plain network (loss, gradients,
keys), the memory plan against hand counts and against the real peak RSS of a training step on this CPU, and
the fit checks refusing a job for a fake small budget with settings that fit (the CLI path included)."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from brats_lightning.errors import UserError
from brats_lightning.losses import DeepSupervisionLoss, DiceLoss
from brats_lightning.memory import (
    BUDGET_ENV,
    GIB,
    HEADROOM,
    build_network,
    check_inference_fits,
    check_training_fits,
    check_validation_fits,
    enable_checkpointing,
    optimizer_state_ratio,
    plan_inference,
    plan_training,
)
from brats_lightning.module import BratsModule

REPO = Path(__file__).resolve().parents[1]
GROUP = {"_target_": "brats_lightning.models.blocks.group_norm", "_partial_": True, "groups": 16}
INSTANCE = {"_target_": "brats_lightning.models.blocks.instance_norm", "_partial_": True}


def _config(model: str = "EquiUnet", width: int = 4, norm: dict = GROUP, **extra) -> dict:
    return {"_target_": f"brats_lightning.models.{model}", "width": width, "norm": norm, **extra}


def _loss_and_grads(net: torch.nn.Module, image: torch.Tensor, target: torch.Tensor):
    net.zero_grad(set_to_none=True)
    loss = DeepSupervisionLoss(DiceLoss(squared=True))(net(image), target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


# ----------------------------------------------------------------------------------- activation checkpointing
@pytest.mark.parametrize(("model", "norm"), [("EquiUnet", GROUP), ("Unet", INSTANCE), ("AttEquiUnet", GROUP)])
def test_checkpointing_gives_the_plain_loss_and_gradients(model, norm):
    torch.manual_seed(0)
    plain = build_network(_config(model, norm=norm)).train()
    checkpointed = build_network(_config(model, norm=norm, checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())  # same weights; and the same keys
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    image = torch.randn(1, 4, 16, 16, 16)
    target = (torch.rand(1, 3, 16, 16, 16) > 0.6).float()
    loss, grads = _loss_and_grads(plain, image, target)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, image, target)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-8, msg=name)
    with torch.no_grad():  # eval / no-grad: the plain forward, same logits
        torch.testing.assert_close(checkpointed.eval()(image), plain.eval()(image), rtol=0, atol=0)


def test_checkpointing_recomputes_stages_and_survives_copies():
    stages = enable_checkpointing(build_network(_config()))
    assert stages == 9  # encoder1-4, bottom, bottom_2, decoder3-1
    with pytest.raises(ValueError, match="no U-Net stages"):
        enable_checkpointing(torch.nn.Conv3d(1, 1, 1))
    ckpt = build_network(_config(checkpointing=True)).train()
    calls = []
    ckpt.encoder1.block1.conv.register_forward_hook(lambda *_: calls.append(1))
    image, target = torch.randn(1, 4, 16, 16, 16), torch.ones(1, 3, 16, 16, 16)
    _loss_and_grads(ckpt, image, target)
    assert len(calls) == 2  # forward + the recomputation in the backward pass
    twin = copy.deepcopy(ckpt)  # fast SWA / Lightning copies keep the checkpointed stages on the copy
    assert twin.encoder1.forward.args[0] is twin.encoder1
    twin_loss = _loss_and_grads(twin, image, target)[0]
    torch.testing.assert_close(twin_loss, _loss_and_grads(ckpt, image, target)[0])


def test_module_builds_the_checkpointed_network_with_plain_keys():
    pipeline = {"loss": {"squared": True}, "augment": None, "optimizer": {"name": "adam", "lr": 1e-3},
                "scheduler": {"name": "cosine", "epochs": 2}}
    plain = BratsModule(_config(checkpointing=False), pipeline)
    ckpt = BratsModule(_config(checkpointing=True), pipeline)
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    assert isinstance(ckpt.net.bottom.forward, functools.partial)
    assert not isinstance(plain.net.bottom.forward, functools.partial)


# ----------------------------------------------------------------------------------------------- the plan
def test_plan_parts_by_hand():
    config = _config(width=8)
    net = build_network(config)
    n_params = sum(p.numel() for p in net.parameters())
    assert optimizer_state_ratio("adam") == 2.0  # exp_avg, exp_avg_sq
    assert optimizer_state_ratio("ranger") == 3.0  # + the Lookahead slow weights
    plan = plan_training(config, 32, 1, optimizer="ranger")
    assert plan.parameters == plan.gradients == 4 * n_params
    assert plan.optimizer_state == 12 * n_params
    # activations are linear in the voxels of the batch (GroupNorm's per-group statistics aside)
    double = plan_training(config, 32, 2, optimizer="ranger")
    assert double.activations == pytest.approx(2 * plan.activations, rel=1e-3)
    bigger = plan_training(config, 64, 1, optimizer="ranger")
    assert bigger.activations == pytest.approx(8 * plan.activations, rel=1e-3)
    # the first block of encoder1 alone saves its conv input (4 x 32^3 floats) and output (8 x 32^3 floats)
    assert plan.activations > (4 + 8) * 32**3 * 4
    ckpt = plan_training(config, 32, 1, optimizer="ranger", checkpointing=True)
    assert ckpt.activations < plan.activations
    assert (ckpt.parameters, ckpt.optimizer_state) == (plan.parameters, plan.optimizer_state)


def test_mixed_precision_shrinks_instance_norm_activations_not_group_norm_ones():
    """CUDA autocast runs convolutions in fp16 and GroupNorm in fp32 (keeping fp32 copies); InstanceNorm stays
    in fp16. The Dice loss's sums run in fp32 either way."""
    instance = plan_training(_config(width=8, norm=INSTANCE), 32, 1)
    instance16 = plan_training(_config(width=8, norm=INSTANCE), 32, 1, precision="16-mixed")
    assert instance16.activations < 0.7 * instance.activations
    group = plan_training(_config(width=8), 32, 1)
    group16 = plan_training(_config(width=8), 32, 1, precision="16-mixed")
    assert group16.activations > 0.9 * group.activations
    with pytest.raises(ValueError, match="precision"):
        plan_training(_config(), 32, 1, precision="64-true")


def test_inference_plan_is_live_tensors_not_everything():
    config = _config(width=8)
    plan = plan_inference(config, (32, 32, 32))
    saved = plan_training(config, 32, 1).activations
    one = 8 * 32**3 * 4  # one full-resolution feature map
    assert 2 * one < plan.activations < saved  # at least a skip and the current map; no graph kept
    assert plan_inference(config, (32, 32, 32), batch_size=2).activations == pytest.approx(
        2 * plan.activations, rel=1e-3)


_MEASURE = """
import json, sys, torch
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
from brats_lightning.losses import DeepSupervisionLoss, DiceLoss
from brats_lightning.memory import build_network
config, crop = json.loads(sys.argv[1]), int(sys.argv[2])
base = rss("VmRSS")
net = build_network(config).train()
optimizer = torch.optim.Adam(net.parameters(), 1e-4)
loss = DeepSupervisionLoss(DiceLoss(squared=True))
image = torch.randn(1, 4, crop, crop, crop)
target = (torch.rand(1, 3, crop, crop, crop) > 0.7).float()
for _ in range(2):  # the second step: optimizer state exists, gradients are freed and rebuilt
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM (peak RSS)
    optimizer.zero_grad(set_to_none=True)
    loss(net(image), target).backward()
    optimizer.step()
print(rss("VmHWM") - base)
"""


def _measured_peak(config: dict, crop: int) -> int:
    """Peak RSS of a training step (batch 1) above the RSS before the network was built, in a fresh process
    whose malloc returns freed memory at once (MALLOC_MMAP_THRESHOLD_), so RSS follows the live tensors."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(config), str(crop)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=900, check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.full
@pytest.mark.parametrize("norm", [GROUP, INSTANCE], ids=["A", "B"])
def test_plan_matches_the_measured_peak_rss(norm):
    """On this CPU (fp32, w=16, 64^3; minutes on 2 loaded cores, so `make test-full`): the memory
    checkpointing saves in the real peak RSS is within 30% of the planned saving, and the plan's total within
    -30% / +20% of the measured peak (which also holds the framework's buffers: oneDNN scratch pads, threads).
    Measured here: plan / RSS 0.79 plain, 0.75 checkpointed; saving 81 MiB measured, 77 MiB planned."""
    configs = [_config(width=16, norm=norm, checkpointing=ckpt) for ckpt in (False, True)]
    measured = [_measured_peak(config, 64) for config in configs]
    planned = [plan_training(config, 64, 1, optimizer="adam").total for config in configs]
    saving, planned_saving = measured[0] - measured[1], planned[0] - planned[1]
    assert saving == pytest.approx(planned_saving, rel=0.3), (measured, planned)
    for m, p in zip(measured, planned, strict=True):
        assert 0.7 * m < p < 1.2 * m, (measured, planned)


# ---------------------------------------------------------------------------------------------- fit checks
def _budget_between(monkeypatch, low: int, high: int) -> None:
    """Set the fake device budget so that a plan of ``low`` bytes fits and one of ``high`` does not."""
    monkeypatch.setenv(BUDGET_ENV, str((low + high) / 2 / HEADROOM / GIB))


def test_training_refused_with_settings_that_fit(monkeypatch):
    config = _config(width=48)
    plain = plan_training(config, 128, 3, optimizer="adam")
    ckpt = plan_training(config, 128, 3, optimizer="adam", checkpointing=True)
    _budget_between(monkeypatch, ckpt.total, plain.total)
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        check_training_fits(config, 128, 3, "32-true", "adam", "cpu")
    assert time.perf_counter() - start < 30  # refused in seconds, nothing trained
    message = str(err.value)
    assert "Settings that fit: model.checkpointing=true (" in message  # same crop and batch: the first fix
    assert f"{BUDGET_ENV}=" in message
    fixed = check_training_fits(_config(width=48, checkpointing=True), 128, 3, "32-true", "adam", "cpu")
    assert fixed.total == ckpt.total

    # a budget below even checkpointing at batch 3: smaller batches / crops, each one really fits
    monkeypatch.setenv(BUDGET_ENV, str(0.5 * ckpt.total / GIB))
    with pytest.raises(UserError) as err:
        check_training_fits(config, 128, 3, "32-true", "adam", "cpu")
    fits = str(err.value).split("Settings that fit: ")[1].split("; ")
    assert fits
    for fix in fits:
        overrides = dict(item.split("=") for item in fix.split(" (")[0].split())
        plan = plan_training(_config(width=48, checkpointing=overrides.get("model.checkpointing") == "true"),
                             int(overrides.get("data.crop_size", 128)),
                             int(overrides.get("pipeline.batch_size", 3)), optimizer="adam")
        assert plan.total <= HEADROOM * 0.5 * ckpt.total * 1.001  # (the budget is printed rounded)


def test_validation_and_inference_refused_for_the_largest_box(monkeypatch):
    config = _config(width=8)
    training = plan_training(config, 32, 1, optimizer="adam")
    small, large = (48, 48, 40), (96, 96, 80)
    need_small = check_validation_fits(training, config, small, "32-true", "cpu")
    monkeypatch.setenv(BUDGET_ENV, str(need_small / HEADROOM / GIB * 1.01))
    with pytest.raises(UserError, match=r"largest validation brain box \(96, 96, 80\).*limit_val_batches=0"):
        check_validation_fits(training, config, large, "32-true", "cpu")
    # inference: 4 views per call do not fit, fewer do; the message names the case and the flag
    monkeypatch.delenv(BUDGET_ENV)
    need_one = check_inference_fits([config], large, 1, None, "cpu")
    monkeypatch.setenv(BUDGET_ENV, str(need_one / HEADROOM / GIB * 1.5))
    with pytest.raises(UserError, match=r"case BraTS20_X .*Fix: --view-batch [1-3] "):
        check_inference_fits([config], large, 4, None, "cpu", case="BraTS20_X")
    monkeypatch.setenv(BUDGET_ENV, "not-a-number")
    with pytest.raises(UserError, match="expected a number of GiB"):
        check_inference_fits([config], large, 1, None, "cpu")


@pytest.mark.slow
def test_train_py_refuses_a_job_that_cannot_fit(synthetic_root, tmp_path):
    """The real entry point, paper-size network and crops, a 2 GiB fake device: refused before any case is
    cached or any step runs, with the overrides that fit; exit code non-zero, no checkpoint written."""
    env = {**os.environ, "WANDB_MODE": "disabled", BUDGET_ENV: "2"}
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "experiment=smoke", f"data.root={synthetic_root}",
         "data.generate=null", "model.width=48", "data.crop_size=128", "pipeline=B",
         f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}", "logger=none"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "memory plan: training" in output and "Settings that fit: " in output, output
    assert "pipeline.batch_size=" in output or "data.crop_size=" in output, output
    assert not list((tmp_path / "out").rglob("*.ckpt"))
    assert not list(tmp_path.rglob("meta.json"))  # refused before any case was cached
