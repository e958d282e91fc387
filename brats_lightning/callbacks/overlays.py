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
  fixed afterwards, so the images of successive epochs compare) and for the ``worst`` other cases of the
  epoch (lowest mean Dice), an axial slice through the ground truth tumour centre with ground truth (solid)
  and predicted (dashed) outlines of ET, TC and WT on t1ce and flair
  (:func:`brats_lightning.plots.draw_overlay`), saved as
  ``<trainer.log_dir or default_root_dir>/overlays/epoch{E:03d}_{case}.png`` (``epoch{E:03d}_worst_{case}``;
  the final validation of best.ckpt after training: ``best_{case}.png``). The slice index shown is the
  case's original (uncropped) grid's, when the trainer's datamodule knows the case's brain box;
* logs those PNGs to every attached WandbLogger (``log_image(key="val/overlay", ...)``) and a table of every
  validated case's Dice per region (``log_table(key="val/case_dice", ...)``), at the trainer's logging step.

It only keeps one 2D slice per drawn case in memory, never whole volumes. Without a logger, or with only
a CSVLogger, it writes the PNGs and nothing else. Under multi-process training each rank sees its own share
of the validation cases; the overlays and the table come from the cases of rank 0.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.trainer.states import TrainerFn

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
        cases: how many fixed cases to draw (the first ones by sorted case id).
        worst: how many of the epoch's other cases with the lowest mean Dice to draw as well.
        every_n_epochs: draw and log on validation epochs whose ``current_epoch + 1`` is a multiple of this
            (1 = every validation epoch). The sanity check is never drawn.
    """

    def __init__(self, cases: int = 2, every_n_epochs: int = 1, worst: int = 0) -> None:
        super().__init__()
        if cases < 0 or worst < 0 or every_n_epochs < 1:
            raise ValueError(f"OverlayCallback needs cases >= 0, worst >= 0 and every_n_epochs >= 1, found "
                             f"cases={cases}, worst={worst}, every_n_epochs={every_n_epochs}")
        self.cases = cases
        self.worst = worst
        self.every_n_epochs = every_n_epochs
        self.case_ids: list[str] | None = None  # fixed after the first drawn validation epoch
        self.slices: dict[str, OverlaySlice] = {}  # the current / last drawn epoch's slices, by case id
        self.worst_slices: dict[str, OverlaySlice] = {}  # the epoch's lowest-Dice other cases so far
        self._dice: dict[str, list[float]] = {}

    def _active(self, trainer: pl.Trainer) -> bool:
        if trainer.state.fn == TrainerFn.VALIDATING:
            return True
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _wanted(self, case_id: str) -> bool:
        if self.cases == 0:
            return False
        if self.case_ids is not None:
            return case_id in self.case_ids
        return len(self.slices) < self.cases or case_id < max(self.slices)

    def _rank(self, case_id: str) -> tuple[float, str]:
        """Worst first: the case's mean Dice this epoch, ties by case id."""
        return float(np.mean(self._dice[case_id])), case_id

    def _worst_candidate(self, case_id: str) -> bool:
        """Whether ``case_id`` is among the ``worst`` lowest-Dice cases seen so far (dropping the best one
        of them when it pushes another out)."""
        if self.worst == 0:
            return False
        kept = sorted(self.worst_slices, key=self._rank)
        if len(kept) < self.worst:
            return True
        if self._rank(case_id) < self._rank(kept[-1]):
            del self.worst_slices[kept[-1]]
            return True
        return False

    @staticmethod
    def _grid_z(trainer: pl.Trainer, case_id: str, z: int) -> int:
        """``z`` in the case's original grid: plus its brain box's start, when the datamodule knows it."""
        datamodule = getattr(trainer, "datamodule", None)
        by_id = {c.case_id: c for c in getattr(datamodule, "val_cases", None) or ()}
        if case_id not in by_id or getattr(datamodule, "cache", None) is None:
            return z
        return z + datamodule.cache.get(by_id[case_id]).box.start[2]

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.slices, self.worst_slices, self._dice = {}, {}, {}

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
            fixed = self._wanted(case_id)
            if not fixed and not self._worst_candidate(case_id):
                continue
            image = _unpadded_image(batch, index, spatial).float().cpu().numpy()
            gt = regions_to_labels(target[index].cpu().numpy())
            pr = regions_to_labels(pred[index].cpu().numpy())
            data = overlay_slice(image, gt, pr)
            data = dataclasses.replace(data, z=self._grid_z(trainer, case_id, data.z))
            if not fixed:
                self.worst_slices[case_id] = data
                continue
            self.slices[case_id] = data
            if self.case_ids is None and len(self.slices) > self.cases:  # not a fixed case after all
                evicted = max(self.slices)
                evicted_data = self.slices.pop(evicted)
                if self._worst_candidate(evicted):
                    self.worst_slices[evicted] = evicted_data

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer):
            return
        if self.case_ids is None:
            self.case_ids = sorted(self.slices)
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "overlays"  # every rank calls log_dir
        if not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning logs validation at
        final = trainer.state.fn == TrainerFn.VALIDATING
        prefix, when = ("best_", "best.ckpt") if final else (f"epoch{epoch:03d}_", f"epoch {epoch}")
        worst = {c: d for c, d in self.worst_slices.items() if c not in self.slices}
        drawn = [(c, self.slices[c], "") for c in sorted(self.slices)]
        drawn += [(c, worst[c], "worst_") for c in sorted(worst, key=self._rank)]
        paths, captions = [], []
        for case_id, data, kind in drawn:
            title = f"{case_id} ({when}{', a worst case' if kind else ''})"
            figure = draw_overlay(data, title, self._dice.get(case_id))
            paths.append(str(save_figure(figure, folder / f"{prefix}{kind}{case_id}.png")))
            captions.append(f"{kind}{case_id}")
        rows = [[epoch, case_id, *np.round(dice, 6).tolist()] for case_id, dice in sorted(self._dice.items())]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                if paths:
                    logger.log_image(key=OVERLAY_KEY, images=paths, caption=captions, step=step)
                logger.log_table(key=TABLE_KEY, columns=TABLE_COLUMNS, data=rows, step=step)
        log.debug("epoch %d: %d overlays in %s", epoch, len(paths), folder)
