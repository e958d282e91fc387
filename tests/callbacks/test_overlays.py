"""OverlayCallback under a real pytorch_lightning.Trainer: no logger, CSVLogger, WandbLogger offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader

from brats_lightning.callbacks.overlays import OverlayCallback
from brats_lightning.metrics import region_dice

PADDED = 16            # images are zero-padded to 16^3, as the datamodule pads to a multiple of 8
SPATIAL = (14, 15, 13)  # the unpadded target / prediction shape
CASE_IDS = ["case_c", "case_a", "case_d", "case_b", "case_e"]  # deliberately unsorted


def make_case(case_id: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    x, y, z = np.ogrid[: SPATIAL[0], : SPATIAL[1], : SPATIAL[2]]
    r2 = (x - 7) ** 2 + (y - 7) ** 2 + (z - 6) ** 2
    target = np.stack([r2 < 4, r2 < 9, r2 < 20 + seed])  # ET, TC, WT (nested)
    image = np.zeros((4, PADDED, PADDED, PADDED), np.float32)
    image[:, : SPATIAL[0], : SPATIAL[1], : SPATIAL[2]] = rng.random((4, *SPATIAL)) + target[2] * 2.0
    return {"image": torch.from_numpy(image), "target": torch.from_numpy(target), "case_id": case_id}


class TinyModule(pl.LightningModule):
    """A one-layer conv net that returns the contract's validation outputs (CONTRACTS.md, Training)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Conv3d(4, 3, kernel_size=3, padding=1)
        self.seen_dice: dict[str, list[float]] = {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["image"])[..., : SPATIAL[0], : SPATIAL[1], : SPATIAL[2]]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["target"].float())

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        x, y, z = batch["target"].shape[-3:]
        logits = self.net(batch["image"])[..., :x, :y, :z]
        pred = logits.sigmoid() > 0.5
        pred[:, :, 6:9, 6:9, 5:8] = True  # guarantee something to outline
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["target"].float())
        self.log("val/loss", loss, batch_size=len(batch["case_id"]))
        scores = region_dice(pred, batch["target"]).tolist()
        self.seen_dice.update(zip(batch["case_id"], scores, strict=True))
        return {"loss": loss, "pred_regions": pred, "case_id": batch["case_id"]}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path: Path, callback: OverlayCallback, logger: object, max_epochs: int = 2) -> TinyModule:
    data = [make_case(case_id, seed) for seed, case_id in enumerate(CASE_IDS)]
    module = TinyModule()
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=logger,
                         default_root_dir=tmp_path, callbacks=[callback], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
                         num_sanity_val_steps=1)
    trainer.fit(module, DataLoader(data, batch_size=2), DataLoader(data, batch_size=2))
    return module


def test_no_logger_fixed_sorted_cases(tmp_path: Path) -> None:
    fit(tmp_path, OverlayCallback(cases=2), logger=False)
    pngs = sorted(p.name for p in (tmp_path / "overlays").glob("*.png"))
    # the first two case ids in sorted order, the same in both epochs; none from the sanity check
    assert pngs == ["epoch000_case_a.png", "epoch000_case_b.png",
                    "epoch001_case_a.png", "epoch001_case_b.png"]
    assert (tmp_path / "overlays" / pngs[0]).read_bytes()[:4] == b"\x89PNG"


def test_every_n_epochs_with_csv_logger(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv", version=0)
    fit(tmp_path, OverlayCallback(cases=3, every_n_epochs=2), logger=logger)
    overlays = Path(logger.log_dir) / "overlays"
    assert sorted(p.name for p in overlays.glob("*.png")) == [
        "epoch001_case_a.png", "epoch001_case_b.png", "epoch001_case_c.png"]


def test_wandb_offline_images_and_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="overlay-test")
    module = fit(tmp_path, OverlayCallback(cases=2), logger=logger)
    logger.experiment.finish()
    assert sorted(p.name for p in (tmp_path / "overlays").glob("*.png")) == [
        "epoch000_case_a.png", "epoch000_case_b.png", "epoch001_case_a.png", "epoch001_case_b.png"]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    images = sorted((media / "images").rglob("*.png"))
    assert len(images) == 4  # 2 cases x 2 epochs
    tables = sorted((media / "table").rglob("*.table.json"))
    assert len(tables) == 2  # one per epoch
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["epoch", "case", "dice_et", "dice_tc", "dice_wt"]
    assert [row[1] for row in table["data"]] == sorted(CASE_IDS)
    # the table holds the Dice the module itself computed on the same predictions (last epoch)
    for row in table["data"]:
        assert row[2:] == pytest.approx(module.seen_dice[row[1]], abs=1e-6)


def test_rejects_outputs_without_predictions(tmp_path: Path) -> None:
    class NoPredictions(TinyModule):
        def validation_step(self, batch: dict, batch_idx: int) -> dict:
            return {"loss": super().validation_step(batch, batch_idx)["loss"]}

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                         callbacks=[OverlayCallback()], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_train_batches=1, num_sanity_val_steps=0)
    data = [make_case("case_a", 0)]
    with pytest.raises(ValueError, match="pred_regions"):
        trainer.fit(NoPredictions(), DataLoader(data), DataLoader(data))
