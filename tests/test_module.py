"""Tests of brats_lightning/module.py (BratsModule) and brats_lightning/precision.py."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.trainer.states import RunningStage

from brats_lightning import precision
from brats_lightning.data.datamodule import BratsDataModule
from brats_lightning.data.labels import BRATS2020, labels_to_regions_torch, regions_to_labels_torch
from brats_lightning.data.preprocess import Box
from brats_lightning.losses import DiceLoss
from brats_lightning.module import BratsModule

CONF = Path(__file__).resolve().parents[1] / "conf"


def pipeline_config(name: str = "A", epochs: int = 3, **augment: float) -> dict:
    cfg = OmegaConf.create({"pipeline": OmegaConf.load(CONF / "pipeline" / f"{name}.yaml")})
    cfg.pipeline.epochs = epochs
    for key, value in augment.items():
        cfg.pipeline.augment[key] = value
    return OmegaConf.to_container(cfg, resolve=True)["pipeline"]


def model_config(pipeline: dict, width: int = 4) -> dict:
    return {"_target_": "brats_lightning.models.EquiUnet", "width": width, "norm": pipeline["norm"]}


# ------------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("requested", ["16-mixed", "bf16-mixed", "16"])
def test_cpu_precision_fallback_logs_once(requested, caplog):
    caplog.set_level(logging.INFO, logger="brats_lightning.precision")
    resolved = precision.resolve_precision(requested, "cpu", crop_size=64)
    expected = "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"
    assert resolved == expected
    lines = [r.getMessage() for r in caplog.records if r.name == "brats_lightning.precision"]
    if resolved == requested:
        assert lines == []
    else:
        assert len(lines) == 1 and requested in lines[0] and expected in lines[0] and "CPU" in lines[0]


def test_precision_passthrough_and_bf16_conv_guard(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="brats_lightning.precision")
    assert precision.resolve_precision("32-true", "cpu") == "32-true"
    assert precision.resolve_precision("16-mixed", "cuda") == "16-mixed"  # GPU: unchanged
    assert caplog.records == []
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    assert precision.resolve_precision("16-mixed", "cpu", crop_size=128) == "32-true"
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    assert precision.resolve_precision("16-mixed", "cpu", crop_size=128) == "bf16-mixed"
    assert precision.resolve_precision("16-mixed", "cpu", crop_size=[32, 16, 32]) == "32-true"
    assert len(caplog.records) == 3 and "2x2x2" in caplog.records[-1].getMessage()


def test_bf16_conv_guard_matches_torch_behaviour():
    """The guard exists because CPU bf16 Conv3d weight gradients at 2x2x2 inputs are wrong in this torch
    build; when a torch upgrade fixes that, this test fails as a reminder to drop the guard."""
    if not precision.cpu_supports_bf16():
        pytest.skip("CPU without native bf16")
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(32, 32, 3, padding=1, bias=False)
    errors = {}
    for side in (2, 4):
        conv.zero_grad()
        x = torch.randn(1, 32, side, side, side)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        grad_out = torch.randn(y.shape)
        y.float().backward(grad_out)
        w = conv.weight.detach().double().requires_grad_()
        torch.nn.functional.conv3d(x.double(), w, padding=1).backward(grad_out.double())
        errors[side] = float((conv.weight.grad.double() - w.grad).abs().max() / w.grad.abs().max())
    assert errors[4] < 0.05
    # garbage at 2x2x2: relative errors of 1 (zeros), 1e35, inf or nan from run to run
    assert not errors[2] < 0.05, "CPU bf16 conv3d at 2x2x2 looks fixed: remove precision._bf16_conv_bug"


# --------------------------------------------------------------------------------------------------- module
def test_state_dict_and_hparams_are_plain():
    pipe = pipeline_config("B")
    module = BratsModule(model_config(pipe), pipe, {"hd95": False})
    keys = list(module.state_dict())
    assert keys and all(k.startswith("net.") for k in keys)
    assert isinstance(module.net.encoder1.block1.norm, torch.nn.InstanceNorm3d)
    assert module.loss.base.squared is False
    assert type(module.hparams["pipeline"]) is dict and type(module.hparams["model_config"]) is dict
    optim = module.configure_optimizers()
    assert type(optim["optimizer"]).__name__ == "Adam" and optim["lr_scheduler"]["interval"] == "epoch"
    pipe_a = pipeline_config("A")
    module_a = BratsModule(model_config(pipe_a, width=16), pipe_a)
    assert isinstance(module_a.net.encoder1.block1.norm, torch.nn.GroupNorm)
    assert module_a.net.encoder1.block1.norm.num_groups == 16 and module_a.loss.base.squared is True
    assert type(module_a.configure_optimizers()["optimizer"]).__name__ == "Ranger"


def test_augmentation_only_on_training_batches(tmp_path):
    pipe = pipeline_config("A", rescale_p=0.0, noise_p=0.0, drop_channel_p=0.0, flip_p=1.0)
    module = BratsModule(model_config(pipe), pipe)
    trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    module.trainer = trainer
    image = torch.arange(2 * 4 * 8 * 8 * 8, dtype=torch.float32).reshape(2, 4, 8, 8, 8)
    target = torch.rand(2, 3, 8, 8, 8) > 0.5
    trainer.state.stage = RunningStage.TRAINING
    out = module.on_after_batch_transfer({"image": image, "target": target, "case_id": ["a", "b"]}, 0)
    assert torch.equal(out["image"], image.flip(2, 3, 4))
    assert torch.equal(out["target"], target.flip(2, 3, 4).float())
    assert out["case_id"] == ["a", "b"]
    trainer.state.stage = RunningStage.VALIDATING
    out = module.on_after_batch_transfer({"image": image, "target": target}, 0)
    assert out["image"] is image and out["target"] is target


def _numpy_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    tp, fp, fn = np.sum(pred & gt), np.sum(pred & ~gt), np.sum(~pred & gt)
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


class _Outputs(pl.Callback):
    def __init__(self) -> None:
        self.items: list[tuple[dict, dict]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.items.append((outputs, batch))


def test_validation_scores_unpadded_thresholded_predictions(synthetic_root, tmp_path):
    pl.seed_everything(0)
    pipe = pipeline_config("A")
    module = BratsModule(model_config(pipe), pipe, {"hd95": True})
    dm = BratsDataModule(synthetic_root, fold=0, cache_dir=tmp_path / "cache", crop_size=32)
    outputs = _Outputs()
    trainer = pl.Trainer(accelerator="cpu", precision="32-true", logger=False, callbacks=[outputs],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(module, datamodule=dm, verbose=False)
    metrics = trainer.callback_metrics
    assert len(outputs.items) == len(dm.val_cases) == 2
    dice_rows, losses = [], []
    module.eval()
    for out, batch in outputs.items:
        box = Box.from_dict(batch["box"][0])
        target = batch["target"]
        assert out["pred_regions"].dtype == torch.bool and out["pred_regions"].shape == target.shape
        assert out["case_id"] == batch["case_id"]
        with torch.no_grad():
            logits = module.net(batch["image"])[(slice(None), slice(None), *box.slices)]
        # validation scores the label map inference writes (nesting enforced), back in regions
        label_map = regions_to_labels_torch(torch.sigmoid(logits) > 0.5, BRATS2020)
        assert torch.equal(out["pred_regions"], labels_to_regions_torch(label_map, BRATS2020))
        losses.append(float(DiceLoss(squared=True)(logits, target)))
        pred, gt = out["pred_regions"][0].numpy(), target[0].numpy()
        dice_rows.append([_numpy_dice(pred[c], gt[c]) for c in range(3)])
    dice = np.array(dice_rows)
    assert float(metrics["val/dice_et"]) == pytest.approx(dice[:, 0].mean(), abs=1e-6)
    assert float(metrics["val/dice_tc"]) == pytest.approx(dice[:, 1].mean(), abs=1e-6)
    assert float(metrics["val/dice_wt"]) == pytest.approx(dice[:, 2].mean(), abs=1e-6)
    assert float(metrics["val/dice_mean"]) == pytest.approx(dice.mean(), abs=1e-6)
    assert float(metrics["val/loss"]) == pytest.approx(np.mean(losses), abs=1e-5)
    assert {"val/hd95_et", "val/hd95_tc", "val/hd95_wt"} <= set(metrics)


def test_training_step_returns_per_case_losses(synthetic_root, tmp_path):
    pipe = pipeline_config("B", epochs=1)
    module = BratsModule(model_config(pipe), pipe)
    dm = BratsDataModule(synthetic_root, fold=0, batch_size=3, cache_dir=tmp_path / "cache", crop_size=32)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module.train()
    out = module.training_step(batch, 0)
    assert out["loss"].ndim == 0 and out["loss"].requires_grad
    assert out["case_losses"].shape == (3,) and not out["case_losses"].requires_grad
    assert out["case_id"] == batch["case_id"]
    logits = module.net(batch["image"])[0]
    dice = DiceLoss(squared=False)
    per_case = [float(dice(logits[i : i + 1], batch["target"][i : i + 1])) for i in range(3)]
    assert out["case_losses"].tolist() == pytest.approx(per_case, abs=1e-5)
