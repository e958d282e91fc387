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


def make_case(case_id: str, seed: int, start: tuple[int, int, int] | None = None) -> dict:
    """Image zero-padded to 16^3 with the data at ``start`` (and a "box" entry), or at the origin (no box).

    Inside the data, every channel is 1 + 2 x WT + noise in [0, 0.5): the tumour shows where it lies.
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.ogrid[: SPATIAL[0], : SPATIAL[1], : SPATIAL[2]]
    r2 = (x - 7) ** 2 + (y - 6) ** 2 + (z - 6) ** 2
    target = np.stack([r2 < 4, r2 < 9, r2 < 20 + seed])  # ET, TC, WT (nested)
    image = np.zeros((4, PADDED, PADDED, PADDED), np.float32)
    offset = start or (0, 0, 0)
    inner = tuple(slice(o, o + s) for o, s in zip(offset, SPATIAL, strict=True))
    image[(slice(None), *inner)] = 1.0 + 0.5 * rng.random((4, *SPATIAL)) + target[2] * 2.0
    sample = {"image": torch.from_numpy(image), "target": torch.from_numpy(target), "case_id": case_id}
    if start is not None:
        sample["box"] = {"start": list(start), "stop": [o + s for o, s in zip(start, SPATIAL, strict=True)]}
    return sample


def collate(samples: list[dict]) -> dict:
    """Stack tensors; other keys (case ids, boxes) become lists, as the datamodule's collate does."""
    return {key: torch.stack([s[key] for s in samples]) if isinstance(samples[0][key], torch.Tensor)
            else [s[key] for s in samples] for key in samples[0]}


class TinyModule(pl.LightningModule):
    """A one-layer conv net that returns the contract's validation outputs (docs/contracts.md, "Validation
    outputs")."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Conv3d(4, 3, kernel_size=3, padding=1)
        self.seen_dice: dict[str, list[float]] = {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["image"])[..., : SPATIAL[0], : SPATIAL[1], : SPATIAL[2]]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["target"].float())

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        x, y, z = batch["target"].shape[-3:]
        logits = self.net(batch["image"])
        if "box" in batch:  # unpad each sample at its box
            logits = torch.stack([logits[i, :, b["start"][0]: b["stop"][0], b["start"][1]: b["stop"][1],
                                         b["start"][2]: b["stop"][2]] for i, b in enumerate(batch["box"])])
        else:
            logits = logits[..., :x, :y, :z]
        pred = logits.sigmoid() > 0.5
        pred[:, :, 6:9, 6:9, 5:8] = True  # guarantee something to outline
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["target"].float())
        self.log("val/loss", loss, batch_size=len(batch["case_id"]))
        scores = region_dice(pred, batch["target"]).tolist()
        self.seen_dice.update(zip(batch["case_id"], scores, strict=True))
        return {"loss": loss, "pred_regions": pred, "case_id": batch["case_id"]}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path: Path, callback: OverlayCallback, logger: object, max_epochs: int = 2,
        start: tuple[int, int, int] | None = None) -> TinyModule:
    data = [make_case(case_id, seed, start) for seed, case_id in enumerate(CASE_IDS)]
    module = TinyModule()
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=logger,
                         default_root_dir=tmp_path, callbacks=[callback], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
                         num_sanity_val_steps=1)
    trainer.fit(module, DataLoader(data, batch_size=2, collate_fn=collate),
                DataLoader(data, batch_size=2, collate_fn=collate))
    return module


def test_no_logger_fixed_sorted_cases(tmp_path: Path) -> None:
    fit(tmp_path, OverlayCallback(cases=2), logger=False)
    pngs = sorted(p.name for p in (tmp_path / "overlays").glob("*.png"))
    # the first two case ids in sorted order, the same in both epochs; none from the sanity check
    assert pngs == ["epoch000_case_a.png", "epoch000_case_b.png",
                    "epoch001_case_a.png", "epoch001_case_b.png"]
    assert (tmp_path / "overlays" / pngs[0]).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("start", [None, (1, 0, 2)], ids=["padded-at-end", "centred-with-box"])
def test_overlay_image_is_aligned_with_the_target(tmp_path: Path, start: tuple[int, int, int] | None) -> None:
    callback = OverlayCallback(cases=2)
    fit(tmp_path, callback, logger=False, max_epochs=1, start=start)
    assert sorted(callback.slices) == ["case_a", "case_b"]
    for data in callback.slices.values():
        # t1ce is 1 + 2 x WT + noise < 0.5 inside the data: above 2.5 exactly on the ground truth WT
        np.testing.assert_array_equal(data.images[0] > 2.5, data.gt_regions[2])
        assert data.gt_regions[2].any() and (data.images[0] > 0).all()  # no padding in the drawn image


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
    loader = DataLoader([make_case("case_a", 0)], collate_fn=collate)
    with pytest.raises(ValueError, match="pred_regions"):
        trainer.fit(NoPredictions(), loader, loader)


def test_worst_cases_drawn_beside_the_fixed_ones(tmp_path: Path) -> None:
    module = fit(tmp_path, OverlayCallback(cases=1, worst=2), logger=False, max_epochs=1)
    means = {case: float(np.mean(dice)) for case, dice in module.seen_dice.items()}  # the module's own Dice
    others = sorted((c for c in CASE_IDS if c != "case_a"), key=lambda c: (means[c], c))  # ties: by id
    assert sorted(p.name for p in (tmp_path / "overlays").glob("*.png")) == sorted(
        ["epoch000_case_a.png", *(f"epoch000_worst_{case}.png" for case in others[:2])])


def test_slice_index_is_the_original_grids(tmp_path: Path) -> None:
    """With a datamodule that knows each case's brain box (as BratsDataModule's cache does), the slice
    index shown is the cropped one plus the box start along z."""
    from types import SimpleNamespace

    class BoxedData(pl.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.data = [make_case(case_id, seed) for seed, case_id in enumerate(CASE_IDS)]
            self.val_cases = [SimpleNamespace(case_id=c) for c in CASE_IDS]
            box = SimpleNamespace(start=(3, 5, 7))  # the brain box in the original grid
            self.cache = SimpleNamespace(get=lambda case: SimpleNamespace(box=box))

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.data, batch_size=2, collate_fn=collate)

        val_dataloader = train_dataloader

    cropped = OverlayCallback(cases=2)
    fit(tmp_path / "cropped", cropped, logger=False, max_epochs=1)
    boxed = OverlayCallback(cases=2)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, default_root_dir=tmp_path / "boxed",
                         callbacks=[boxed], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_train_batches=2, num_sanity_val_steps=0)
    trainer.fit(TinyModule(), datamodule=BoxedData())
    assert {c: d.z for c, d in boxed.slices.items()} == {c: d.z + 7 for c, d in cropped.slices.items()}
