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
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from brats_lightning.data.io import atomic_path
from brats_lightning.locks import pid_alive

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


class MovableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose selection state survives a moved run folder.

    Lightning reloads ``best_model_score`` (and the other top-k state) only when the checkpoint's
    ``dirpath`` equals the callback's; after the run folder moved it keeps only ``best_model_path``, so a
    worse epoch could overwrite ``best.ckpt``. Here the stored paths are re-rooted in the new folder first.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old, new = state_dict.get("dirpath"), self.dirpath
        if old and new and old != new:
            def moved(path: Any) -> Any:
                return os.path.join(new, os.path.basename(path)) if path else path

            state_dict = {**state_dict, "dirpath": new,
                          "best_model_path": moved(state_dict.get("best_model_path")),
                          "kth_best_model_path": moved(state_dict.get("kth_best_model_path")),
                          "last_model_path": moved(state_dict.get("last_model_path")),
                          "best_k_models": {moved(k): v
                                            for k, v in (state_dict.get("best_k_models") or {}).items()}}
            log.info("checkpoints moved from %s to %s: selection state carried over", old, new)
        super().load_state_dict(state_dict)


def best_checkpoint(dirpath: str | Path, monitor: str = "val/loss", mode: str = "min") -> ModelCheckpoint:
    """``<dirpath>/best.ckpt``: the weights of the epoch with the best ``monitor`` value so far."""
    return MovableCheckpoint(dirpath=str(dirpath), filename="best", monitor=monitor, mode=mode, save_top_k=1,
                             save_last=False, auto_insert_metric_name=False, enable_version_counter=False)


def last_checkpoint(dirpath: str | Path) -> ModelCheckpoint:
    """``<dirpath>/last.ckpt``, rewritten at the end of every training epoch (used to resume)."""
    return MovableCheckpoint(dirpath=str(dirpath), filename="last", monitor=None, save_top_k=1,
                             save_last=False, every_n_epochs=1, save_on_train_epoch_end=True,
                             enable_version_counter=False)


def checkpoint_step(path: str | Path) -> tuple[int, int]:
    """``(epoch, step)`` of a Lightning checkpoint: the step is the trainer's logging step (the ``step``
    column of metrics.csv), ``_batches_that_stepped``, which equals ``global_step`` with one optimizer."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    epoch_loop = state.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    return int(state["epoch"]), int(epoch_loop.get("_batches_that_stepped", state["global_step"]))


#: Exit codes of a job stopped by a signal, as a shell reports a process killed by it (128 + signal number).
STOP_EXIT_CODES = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


class StopOnSignal(pl.Callback):
    """SIGTERM (SLURM's time limit, ``timeout``, ``kill``) and SIGINT (Ctrl-C): finish the current batch,
    write ``last.ckpt`` there, and let train.py exit with 143 / 130 and one line saying how to resume.

    Lightning itself raises ``SIGTERMException`` (a ``SystemExit`` with code 0) at the next batch boundary
    after a SIGTERM; SIGINT is routed the same way instead of a ``KeyboardInterrupt`` in the middle of a step
    (or in a DataLoader worker, which inherits these handlers when it is forked and so ignores the signal).
    A second signal of the same kind ends the process at once. A stop during the final validation writes
    nothing: ``last.ckpt`` already holds the finished training.

    :meth:`install` it before ``trainer.fit``, :meth:`uninstall` it after the final validation;
    :attr:`signum` is the signal received.
    """

    def __init__(self, last_path: str | Path) -> None:
        super().__init__()
        self.last_path = Path(last_path)
        self.signum: int | None = None
        self.stopped_at: tuple[int, int] | None = None  # (epoch, global step) of the checkpoint written
        self._trainer: pl.Trainer | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signum:  # second signal: the default action (end the process now)
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = signum
        log.warning("received %s: stopping after the current batch (send it again to stop at once)",
                    signal.Signals(signum).name)
        if self._trainer is not None:  # Lightning's loops stop at the next batch boundary on this flag
            self._trainer._signal_connector.received_sigterm = True

    def install(self) -> None:
        """Handle SIGTERM and SIGINT from now on (before ``trainer.fit``: Lightning keeps this handler)."""
        self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_EXIT_CODES}

    def uninstall(self) -> None:
        """Restore the handlers that :meth:`install` replaced."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.signum is not None:  # received before Lightning's loops started (its flag was reset then)
            trainer._signal_connector.received_sigterm = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if self.signum is None:  # Lightning's own SIGTERM handling (or another rank's)
            self.signum = signal.SIGTERM
        if trainer.state.fn == TrainerFn.FITTING:
            trainer.save_checkpoint(self.last_path)
            self.stopped_at = (trainer.current_epoch, trainer.global_step)
            log.info("wrote %s (epoch %d, step %d)", self.last_path, *self.stopped_at)


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
        if match is None or int(match["pid"]) == os.getpid() or pid_alive(int(match["pid"])):
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
