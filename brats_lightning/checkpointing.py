"""Atomic checkpoint files and the run's two checkpoints (``best.ckpt``, ``last.ckpt``).

SPEC.md "Training" / "Known traps": the reference code overwrote its "best" checkpoint with the final
weights. Here ``checkpoints/best.ckpt`` is written only when the monitored validation metric improves
(pipeline B: lowest validation loss) and ``checkpoints/last.ckpt`` at the end of every training epoch,
each through :class:`AtomicCheckpointIO`, so an interrupted write never leaves a truncated checkpoint
(a job killed mid-save resumes from the previous ``last.ckpt``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from brats_lightning.data.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes go to a temporary file in the target's folder, flushed to
    disk, then ``os.replace``-d onto the target (atomic on POSIX). Pass it as a Trainer plugin.

    Lightning's own ``_atomic_save`` stages through fsspec's transaction, whose temporary file lives in the
    system temp folder, so the final move can be a cross-device copy; this one never is.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically.

        Raises:
            TypeError: ``storage_options`` given (not supported, as in ``TorchCheckpointIO``).
        """
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} does not support storage_options (got {storage_options!r})")
        if "://" in str(path):  # remote (fsspec) targets: Lightning's transaction-based save
            super().save_checkpoint(checkpoint, path)
            return
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())


def best_checkpoint(dirpath: str | Path, monitor: str = "val/loss", mode: str = "min") -> ModelCheckpoint:
    """``<dirpath>/best.ckpt``: the weights of the epoch with the best ``monitor`` value so far."""
    return ModelCheckpoint(dirpath=str(dirpath), filename="best", monitor=monitor, mode=mode, save_top_k=1,
                           save_last=False, auto_insert_metric_name=False, enable_version_counter=False)


def last_checkpoint(dirpath: str | Path) -> ModelCheckpoint:
    """``<dirpath>/last.ckpt``, rewritten at the end of every training epoch (used to resume)."""
    return ModelCheckpoint(dirpath=str(dirpath), filename="last", monitor=None, save_top_k=1, save_last=False,
                           every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False)
