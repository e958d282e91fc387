"""Training progress for people: a live bar in a terminal, one plain line per epoch anywhere else.

A log file or a SLURM job's output is not a terminal: a progress bar there writes nothing useful (or
carriage-return noise). :func:`progress_bar` (conf/callbacks/default.yaml) picks

* in a terminal, Lightning's ``RichProgressBar`` without the meaningless ``v_num`` (:class:`RichBar`);
* otherwise :class:`EpochLog`: after every training epoch one log line with the training losses, the
  validation loss and Dice when validation ran that epoch, the learning rate, the epoch's duration and the
  estimated time left (docs/method.md "Training").
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, RichProgressBar

from brats_lightning.data.labels import REGIONS

log = logging.getLogger(__name__)


def _without_version(metrics: dict[str, Any]) -> dict[str, Any]:
    metrics.pop("v_num", None)  # the logger's version: "" or 0 here, never informative
    return metrics


class RichBar(RichProgressBar):
    """Lightning's rich progress bar, without ``v_num``."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return _without_version(super().get_metrics(trainer, pl_module))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class EpochLog(ProgressBar):
    """One ``INFO`` line per training epoch, e.g.
    ``epoch 4/40  train/loss 4.61 (main 0.92)  val/loss 0.81  val Dice 0.412 (ET 0.20 TC 0.43 WT 0.61)
    lr 3.0e-02  12.3 s/epoch  ETA 7m23s``.

    ``train/loss`` is what the optimizer minimizes (the deep-supervision sum in pipeline A), ``main`` the
    main head's loss alone (``train/loss_main``), comparable with ``val/loss``; val Dice is the label-map
    Dice (:class:`~brats_lightning.module.BratsModule`). Being a ``ProgressBar``, it replaces Lightning's
    default bar.
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._epoch_start = 0.0
        self._validated = False
        self._durations: list[float] = []

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start, self._validated = time.monotonic(), False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validated = not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        self._durations.append(time.monotonic() - self._epoch_start)
        log.info(self.line(trainer))

    def line(self, trainer: pl.Trainer) -> str:
        """The epoch's line from ``trainer.callback_metrics`` and the optimizer's learning rate."""
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        epoch, total = trainer.current_epoch, trainer.max_epochs
        parts = [f"epoch {epoch + 1}/{total if total and total > 0 else '?'}"]  # counted from 1
        if "train/loss_epoch" in metrics:
            main = metrics.get("train/loss_main")  # logged per epoch only: no _epoch suffix
            parts.append(f"train/loss {metrics['train/loss_epoch']:.4f}"
                         + (f" (main {main:.4f})" if main is not None else ""))
        if self._validated and "val/loss" in metrics:
            parts.append(f"val/loss {metrics['val/loss']:.4f}")
            if "val/dice_mean" in metrics:
                regions = " ".join(f"{r} {metrics.get(f'val/dice_{r.lower()}', float('nan')):.3f}"
                                   for r in REGIONS)
                parts.append(f"val Dice {metrics['val/dice_mean']:.3f} ({regions})")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        seconds = sum(self._durations) / len(self._durations)
        parts.append(f"{self._durations[-1]:.1f} s/epoch")
        if total and total > 0:
            parts.append(f"ETA {_duration(seconds * max(total - epoch - 1, 0))}")
        return "  ".join(parts)


def progress_bar() -> ProgressBar:
    """:class:`RichBar` when stdout is a terminal, else :class:`EpochLog`."""
    return RichBar() if sys.stdout.isatty() else EpochLog()
