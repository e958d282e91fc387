"""Atomic checkpoint files and the run's two checkpoints (``best.ckpt``, ``last.ckpt``).

docs/method.md "Training" / "Known traps": the reference code overwrote its "best" checkpoint with the final
weights. Here ``checkpoints/best.ckpt`` is written only when the monitored validation metric improves
(pipeline B: lowest validation loss) and ``checkpoints/last.ckpt`` at the end of every training epoch,
each through :class:`AtomicCheckpointIO`, so an interrupted write never leaves a truncated checkpoint
(a job killed mid-save resumes from the previous ``last.ckpt``; the temporary file such a kill leaves is
removed by :func:`remove_stale_temp_files` when the job runs again). :class:`RandomStateCheckpoint` keeps
the random number generators' states in every checkpoint, which Lightning does not, so that a resumed run
draws the same crops, augmentations and shuffles as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from brats_lightning.data.io import atomic_path

log = logging.getLogger(__name__)

# brats_lightning.data.io.atomic_path names its temporary files ".tmp-<pid>-<8 hex>-<target name>".
_TEMP_NAME = re.compile(r"^\.tmp-(?P<pid>\d+)-[0-9a-f]{8}-.+")


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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files (and folders) that :func:`~brats_lightning.data.io.atomic_path` left under
    ``folder`` (recursively) when its process was killed mid-write: those whose writing process is gone.

    Returns:
        The paths removed.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in sorted(folder.rglob(".tmp-*")):
        match = _TEMP_NAME.match(path.name)
        if match is None or int(match["pid"]) == os.getpid() or _process_alive(int(match["pid"])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        log.info("removed %s (left by a process killed mid-write)", path)
    return removed


class RandomStateCheckpoint(pl.Callback):
    """Save the random number generators' states (torch, CUDA, numpy, python) in every checkpoint and restore
    them when training resumes from it.

    Lightning's checkpoints do not hold them, so a resumed run would otherwise draw other crops,
    augmentations and shuffles than the uninterrupted run (docs/method.md "Known traps": resume). The
    states are
    restored when Lightning loads the callbacks' states (``Trainer._run``, before the training data loader's
    first iterator is created), which is where an uninterrupted run stands after the checkpoint's epoch.
    """

    def state_dict(self) -> dict[str, Any]:
        # Plain types and tensors only: torch.load(weights_only=True), Lightning's default, reads them.
        name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
        states = {"torch": torch.get_rng_state(),
                  "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                            float(cached_gaussian)],
                  "python": random.getstate()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
        return {"rng_states": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["rng_states"]
        torch.set_rng_state(states["torch"])
        name, keys, pos, has_gauss, cached_gaussian = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
        version, internal, gauss_next = states["python"]
        random.setstate((version, tuple(internal), gauss_next))
        cuda = states.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
