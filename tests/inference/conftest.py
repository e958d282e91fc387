"""Tiny real runs for inference tests: a width-4 network from brats_lightning.models, saved as a
Lightning-style checkpoint ``{"state_dict": {"net.<param>": tensor}}`` next to a run.json in the
CONTRACTS.md format."""

from __future__ import annotations

import json
from pathlib import Path

import hydra.utils
import pytest
import torch

MODEL_CONFIGS = {
    "A": {"_target_": "brats_lightning.models.EquiUnet", "in_channels": 4, "out_channels": 3, "width": 4,
          "deep_supervision": True,
          "norm": {"_target_": "brats_lightning.models.blocks.group_norm", "_partial_": True}},
    "B": {"_target_": "brats_lightning.models.EquiUnet", "in_channels": 4, "out_channels": 3, "width": 4,
          "deep_supervision": True,
          "norm": {"_target_": "brats_lightning.models.blocks.instance_norm", "_partial_": True}},
}
NORMALIZATION = {"A": "minmax", "B": "zscore"}


def make_run(
    root: Path,
    pipeline: str = "A",
    model: str = "equiunet",
    fold: int = 0,
    score: float | None = 0.5,
    val_cases: list[str] | tuple[str, ...] = (),
    seed: int = 0,
    swa_score: float | None = None,
    label_convention: str = "brats2020",
    channels: tuple[str, ...] = ("t1", "t1ce", "t2", "flair"),
    normalization: str | None = None,
    name: str | None = None,
    bias: dict[int, float] | None = None,
) -> Path:
    """Write a tiny trained-looking run (real network, real checkpoint) and return its run.json path.

    ``bias`` optionally sets the head's output biases (channel -> value) so that predictions are non-trivial.
    """
    run_dir = root / pipeline / model / (name or f"fold{fold}")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    config = dict(MODEL_CONFIGS[pipeline], in_channels=len(channels))
    torch.manual_seed(seed)
    net = hydra.utils.instantiate(config)
    if bias:
        with torch.no_grad():
            for channel, value in bias.items():
                net.head.bias[channel] = value
    state = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "epoch": 1}
    checkpoints = {"best": str(run_dir / "checkpoints" / "best.ckpt"),
                   "last": str(run_dir / "checkpoints" / "last.ckpt"), "swa": None}
    torch.save(state, checkpoints["best"])
    torch.save(state, checkpoints["last"])
    if swa_score is not None:
        torch.manual_seed(seed + 1000)
        swa_net = hydra.utils.instantiate(config)
        checkpoints["swa"] = str(run_dir / "checkpoints" / "swa.ckpt")
        swa_state = {f"net.{k}": v for k, v in swa_net.state_dict().items()}
        torch.save({"state_dict": swa_state}, checkpoints["swa"])

    def metrics(value: float | None) -> dict | None:
        if value is None:
            return None
        return {"dice_et": value, "dice_tc": value, "dice_wt": value, "dice_mean": value, "loss": 1 - value}

    info = {
        "pipeline": pipeline, "model": model, "fold": fold, "seed": seed,
        "normalization": normalization or NORMALIZATION[pipeline], "label_convention": label_convention,
        "channels": list(channels), "model_config": config, "checkpoints": checkpoints,
        "val_metrics": metrics(score), "val_metrics_swa": metrics(swa_score),
        "data": {"name": "synthetic", "root": str(root)}, "split_file": str(root / "splits.json"),
        "val_cases": list(val_cases), "exclude": [], "run_dir": str(run_dir), "wandb_run_id": None,
    }
    path = run_dir / "run.json"
    path.write_text(json.dumps(info, indent=2))
    return path


@pytest.fixture
def tiny_run_factory(tmp_path):
    """``factory(**make_run kwargs)`` writing runs under ``tmp_path / "outputs"``."""
    root = tmp_path / "outputs"

    def factory(**kwargs) -> Path:
        return make_run(root, **kwargs)

    factory.root = root
    return factory
