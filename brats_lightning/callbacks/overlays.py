"""Validation overlays and per-case Dice during training (paper Fig. 3 style), saved as PNG and sent to W&B.

:class:`OverlayCallback` reads the validation batches and outputs of docs/contracts.md ("Validation outputs"):
``batch = {"image": (B, 4, X', Y', Z'), "target": bool (B, 3, X, Y, Z), "case_id": [...], "box": [...]}`` and
``outputs = {"pred_regions": bool (B, 3, X, Y, Z), ...}`` from ``validation_step``. The image may be
zero-padded beyond the target: when the batch has ``box`` (one ``{"start", "stop"}`` dict or
:class:`~brats_lightning.data.preprocess.Box` per sample, where the data lies in the padded image, as the
datamodule's centred ``pad_to_multiple`` gives it), the image is cut to that box; without ``box`` the
padding is taken to sit at the end of each axis (``image[..., :X, :Y, :Z]``).

Each validation epoch it

* draws, for the first ``cases`` case ids in sorted order (chosen in the first validation epoch and kept
  fixed afterwards, so the images of successive epochs compare), an axial slice through the ground truth
  tumour centre with ground truth (solid) and predicted (dashed) outlines on t1ce and flair
  (:func:`brats_lightning.plots.draw_overlay`), saved as
  ``<trainer.log_dir or default_root_dir>/overlays/epoch{E:03d}_{case}.png``;
* logs those PNGs to every attached WandbLogger (``log_image(key="val/overlay", ...)``) and a table of every
  validated case's Dice per region (``log_table(key="val/case_dice", ...)``).

It only keeps one 2D slice per chosen case in memory, never whole volumes. Without a logger, or with only
a CSVLogger, it writes the PNGs and nothing else. Under multi-process training each rank sees its own share
of the validation cases; the overlays and the table come from the cases of rank 0.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from brats_lightning.data.labels import REGIONS, regions_to_labels
from brats_lightning.data.preprocess import Box
from brats_lightning.metrics import region_dice
from brats_lightning.plots import OverlaySlice, draw_overlay, overlay_slice, save_figure

log = logging.getLogger(__name__)

OVERLAY_KEY = "val/overlay"
TABLE_KEY = "val/case_dice"
TABLE_COLUMNS = ["epoch", "case", *(f"dice_{r.lower()}" for r in REGIONS)]


def _unpadded_image(batch: dict[str, Any], index: int, spatial: tuple[int, int, int]) -> torch.Tensor:
    """Sample ``index``'s image (4, X, Y, Z) on the target's grid: cut to ``batch["box"]`` when present."""
    image = batch["image"][index]
    boxes = batch.get("box")
    if boxes is None:
        return image[:, : spatial[0], : spatial[1], : spatial[2]]
    box = boxes[index] if isinstance(boxes[index], Box) else Box.from_dict(boxes[index])
    if box.shape != spatial:
        raise ValueError(f"case {batch['case_id'][index]}: batch box {box} has shape {box.shape} but the "
                         f"target has {spatial}; expected the box of the unpadded data in the padded image")
    return image[(slice(None), *box.slices)]


class OverlayCallback(pl.Callback):
    """Save (and log to W&B) validation overlays of a fixed set of cases, plus a per-case Dice table.

    Args:
        cases: how many cases to draw (the first ones by sorted case id).
        every_n_epochs: draw and log on validation epochs whose ``current_epoch + 1`` is a multiple of this
            (1 = every validation epoch). The sanity check is never drawn.
    """

    def __init__(self, cases: int = 2, every_n_epochs: int = 1) -> None:
        super().__init__()
        if cases < 0 or every_n_epochs < 1:
            raise ValueError(f"OverlayCallback needs cases >= 0 and every_n_epochs >= 1, found "
                             f"cases={cases}, every_n_epochs={every_n_epochs}")
        self.cases = cases
        self.every_n_epochs = every_n_epochs
        self.case_ids: list[str] | None = None  # fixed after the first drawn validation epoch
        self.slices: dict[str, OverlaySlice] = {}  # the current / last drawn epoch's slices, by case id
        self._dice: dict[str, list[float]] = {}

    def _active(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _wanted(self, case_id: str) -> bool:
        if self.cases == 0:
            return False
        if self.case_ids is not None:
            return case_id in self.case_ids
        return len(self.slices) < self.cases or case_id < max(self.slices)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.slices, self._dice = {}, {}

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active(trainer):
            return
        if not isinstance(outputs, dict) or "pred_regions" not in outputs:
            raise ValueError("OverlayCallback needs validation_step to return a dict with 'pred_regions' "
                             f"(bool (B, 3, X, Y, Z)); got {type(outputs).__name__} "
                             f"{sorted(outputs) if isinstance(outputs, dict) else ''}")
        tumour = slice(0, len(REGIONS))  # ET, TC, WT: a BraTS 2024 cavity channel (RC) is not drawn
        pred, target = outputs["pred_regions"].bool()[:, tumour], batch["target"].bool()[:, tumour]
        case_ids = list(batch["case_id"])
        scores = region_dice(pred, target).cpu().tolist()
        spatial = tuple(target.shape[-3:])
        for index, case_id in enumerate(case_ids):
            self._dice[case_id] = scores[index]
            if not self._wanted(case_id):
                continue
            image = _unpadded_image(batch, index, spatial).float().cpu().numpy()
            gt = regions_to_labels(target[index].cpu().numpy())
            pr = regions_to_labels(pred[index].cpu().numpy())
            self.slices[case_id] = overlay_slice(image, gt, pr)
            if self.case_ids is None and len(self.slices) > self.cases:
                del self.slices[max(self.slices)]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer):
            return
        if self.case_ids is None:
            self.case_ids = sorted(self.slices)
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "overlays"  # every rank calls log_dir
        if not trainer.is_global_zero:
            return
        epoch, step = trainer.current_epoch, trainer.global_step
        paths, captions = [], []
        for case_id in sorted(self.slices):
            title = f"{case_id} (epoch {epoch})"
            figure = draw_overlay(self.slices[case_id], title, self._dice.get(case_id))
            paths.append(str(save_figure(figure, folder / f"epoch{epoch:03d}_{case_id}.png")))
            captions.append(case_id)
        rows = [[epoch, case_id, *np.round(dice, 6).tolist()] for case_id, dice in sorted(self._dice.items())]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                if paths:
                    logger.log_image(key=OVERLAY_KEY, images=paths, caption=captions, step=step)
                logger.log_table(key=TABLE_KEY, columns=TABLE_COLUMNS, data=rows, step=step)
        log.debug("epoch %d: %d overlays in %s", epoch, len(paths), folder)
