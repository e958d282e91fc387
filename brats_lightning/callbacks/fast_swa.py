"""Fast SWA ("self-ensembling") after the main schedule, as a Lightning callback.

Paper section 2.5 / docs/method.md "Training" (pipeline A): after the main schedule (200 epochs of Ranger),
training
continues in the same run for ``cycles`` (5) cycles of ``cycle_epochs`` (30) epochs; each cycle starts a fresh
Adam (no weight decay) at ``lr`` (5e-5) whose lr follows a cosine decay within the cycle, stepped once per
epoch; every ``snapshot_every`` (3) epochs the weights join an equal-weight running average (float32), seeded
with the weights at the end of the main schedule: 1 + 150 / 3 = 51 snapshots with the paper's numbers. The
networks use GroupNorm (no running statistics), so no batch-norm update follows. At the end the averaged
weights are validated (logged as ``val_swa/<metric>``) and saved as their own ordinary Lightning
checkpoint ``checkpoints/swa.ckpt`` (``state_dict`` keys ``net.*``), which inference prefers
(:mod:`brats_lightning.runs`).

Why not Lightning's callbacks (docs/method.md "Known traps"): ``StochasticWeightAveraging`` has no restarts
and
no snapshots (it averages every epoch after a start epoch with one SWALR schedule), and ``WeightAveraging``
writes the averaged weights (initially the untrained ones) into every checkpoint's ``state_dict``.

Epochs (0-based, ``M = main_epochs``, ``C = cycle_epochs``, ``T = cosine_epochs``, C unless set): epoch
``e >= M`` belongs to cycle ``k = (e - M) // C`` and trains with lr
``min_lr + (lr - min_lr) * (1 + cos(pi * t / T)) / 2``, ``t = e - M - k C``. The paper's cosine decays to
``min_lr`` over the cycle (T = C: its last epoch at 0.3% of ``lr``); the authors' code used
``CosineAnnealingLR(T_max=C + 10)`` stepped C times, so each cycle ended at 17.5% of ``lr``
(``callbacks.fast_swa.cosine_epochs: 40`` in
``experiment=paper_A_code``, docs/fidelity.md). After epoch ``e`` (``d = e + 1`` epochs done): ``d = M``
seeds the average; ``d > M`` with ``(d - M) % snapshot_every == 0`` adds a snapshot.

Interruption (docs/method.md "Known traps": the reference code's resume crashed): the running average, the
snapshot count and the current cycle live in the callback's ``state_dict``, saved in every checkpoint. The
optimizer of each cycle is swapped in (``trainer.strategy.optimizers`` / ``lr_scheduler_configs``) at the
end of the epoch before the cycle starts, before that epoch's ``last.ckpt`` is written, so each checkpoint
holds the optimizer and scheduler of the next epoch. Lightning restores callback states before
``configure_optimizers`` and the optimizer / scheduler states after ``on_fit_start``
(``Trainer._run``); :meth:`FastSWA.on_fit_start` therefore installs the restored cycle's Adam and schedule,
and Lightning then loads their saved states into them: a run resumed mid-SWA continues exactly. A job run
again after its last epoch (e.g. killed before ``swa.ckpt`` or run.json were written) has nothing left to
train; :meth:`FastSWA.on_fit_start` then writes and validates the averaged weights again.

Config (conf/callbacks/fast_swa.yaml, also sets ``trainer.max_epochs = main + cycles x cycle_epochs`` with the
``fast_swa_epochs`` resolver, :func:`register_resolvers`)::

    python train.py 'callbacks=[default,fast_swa]' pipeline=A
    python train.py experiment=paper_A            # fast SWA on, the paper's numbers
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.utilities import move_data_to_device
from pytorch_lightning.utilities.types import LRSchedulerConfig
from torch.nn.modules.batchnorm import _BatchNorm

from brats_lightning.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

RESOLVER = "fast_swa_epochs"


def total_epochs(main_epochs: int, cycles: int, cycle_epochs: int) -> int:
    """Epochs of a run with fast SWA: ``main_epochs + cycles * cycle_epochs`` (paper: 200 + 5 x 30 = 350)."""
    return int(main_epochs) + int(cycles) * int(cycle_epochs)


def register_resolvers() -> None:
    """Register ``${fast_swa_epochs:main,cycles,cycle_epochs}`` (:func:`total_epochs`); safe to call twice."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, total_epochs)


class FastSWA(pl.Callback):
    """Fast SWA with restarts: cycles of fresh Adam + cosine, equal-weight snapshot average (paper 2.4).

    Args:
        main_epochs: length of the main schedule (``${pipeline.epochs}``; paper 200). The average is seeded
            with the weights at its end.
        cycles: number of SWA cycles (5).
        cycle_epochs: epochs per cycle (30).
        snapshot_every: epochs between snapshots, counted from the end of the main schedule (3).
        lr: Adam's lr at the start of each cycle (5e-5).
        weight_decay: Adam's weight decay (0 in the paper).
        min_lr: lr the cosine decays to at the end of a cycle (0).
        cosine_epochs: period T of each cycle's cosine, in epochs (None: ``cycle_epochs``, the paper; the
            authors' code: 40 with 30-epoch cycles). Epochs past T keep ``min_lr``.
        dirpath: folder of the averaged weights' checkpoint (None: ``<default_root_dir>/checkpoints``).
        filename: its file name (``swa.ckpt``).
        validate: validate the averaged weights at the end (``val_swa/<metric>``, ``val_metrics_swa``).

    Raises:
        ValueError: inconsistent epoch counts or lr.
    """

    def __init__(
        self,
        main_epochs: int,
        cycles: int = 5,
        cycle_epochs: int = 30,
        snapshot_every: int = 3,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        min_lr: float = 0.0,
        cosine_epochs: int | None = None,
        dirpath: str | Path | None = None,
        filename: str = "swa.ckpt",
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.main_epochs, self.cycles, self.cycle_epochs = int(main_epochs), int(cycles), int(cycle_epochs)
        self.snapshot_every = int(snapshot_every)
        if self.main_epochs < 0 or self.cycles < 1 or self.cycle_epochs < 1 or self.snapshot_every < 1:
            raise ValueError(
                f"fast SWA: main_epochs={main_epochs}, cycles={cycles}, cycle_epochs={cycle_epochs}, "
                f"snapshot_every={snapshot_every}; expected main_epochs >= 0 and the others >= 1 "
                "(conf/callbacks/fast_swa.yaml)")
        if not 0 <= min_lr <= lr:
            raise ValueError(f"fast SWA: lr={lr}, min_lr={min_lr}; expected 0 <= min_lr <= lr")
        self.lr, self.weight_decay, self.min_lr = float(lr), float(weight_decay), float(min_lr)
        self.cosine_epochs = self.cycle_epochs if cosine_epochs is None else int(cosine_epochs)
        if self.cosine_epochs < 1:
            raise ValueError(f"fast SWA: cosine_epochs={cosine_epochs}; expected >= 1 (null: cycle_epochs)")
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.filename = filename
        self.validate = bool(validate)
        # state (saved in every checkpoint)
        self.cycle = -1  # installed optimizer: -1 = the module's (main schedule), k = cycle k
        self.epochs_done = 0  # training epochs completed when the state was last updated
        self.n_snapshots = 0  # weights averaged so far (the seed counts)
        self.snapshot_epochs: list[int] = []  # epochs done at each snapshot (the seed: main_epochs)
        self.average: dict[str, torch.Tensor] | None = None  # float32 running mean of the float entries
        # results of this process (run.json)
        self.swa_path: Path | None = None
        self.saved_snapshot_epochs: list[int] = []  # the snapshots in swa.ckpt (kept when a later
        # validation of best.ckpt restores this callback's state from an earlier checkpoint)
        self.val_metrics: dict[str, float] | None = None

    # ------------------------------------------------------------------------------------------ schedule
    @property
    def total_epochs(self) -> int:
        """``main_epochs + cycles * cycle_epochs``: what ``trainer.max_epochs`` must be."""
        return total_epochs(self.main_epochs, self.cycles, self.cycle_epochs)

    def cycle_of(self, epoch: int) -> int:
        """Cycle of 0-based epoch ``epoch`` (-1 during the main schedule)."""
        return -1 if epoch < self.main_epochs else (epoch - self.main_epochs) // self.cycle_epochs

    def _cycle_scheduler_config(self) -> dict[str, Any]:
        return {"name": "cosine", "epochs": self.cosine_epochs, "warmup_epochs": 0, "min_lr": self.min_lr}

    def _install_cycle(self, trainer: pl.Trainer, cycle: int) -> None:
        """Swap in cycle ``cycle``'s fresh Adam (no weight decay) and its per-epoch cosine schedule."""
        if not trainer.optimizers:
            raise RuntimeError("fast SWA: the trainer has no optimizer to replace; configure_optimizers must "
                               "return one (BratsModule does)")
        params = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
        adam = {"name": "adam", "lr": self.lr, "weight_decay": self.weight_decay}
        optimizer = build_optimizer(params, adam)
        scheduler = build_scheduler(optimizer, self._cycle_scheduler_config())
        trainer.strategy.optimizers = [optimizer]
        trainer.strategy.lr_scheduler_configs = [LRSchedulerConfig(scheduler, interval="epoch")]
        self.cycle = cycle
        log.info("fast SWA: cycle %d/%d (epochs %d-%d): fresh Adam lr %g, cosine over %d epochs", cycle + 1,
                 self.cycles, self.main_epochs + cycle * self.cycle_epochs,
                 self.main_epochs + (cycle + 1) * self.cycle_epochs - 1, self.lr, self.cosine_epochs)

    # ------------------------------------------------------------------------------------------ averaging
    @staticmethod
    def _averaged_entries(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The module's floating-point state entries (parameters and float buffers), detached."""
        return {k: v.detach() for k, v in pl_module.state_dict().items() if torch.is_floating_point(v)}

    def _seed(self, pl_module: pl.LightningModule) -> None:
        self.average = {k: v.float().clone() for k, v in self._averaged_entries(pl_module).items()}
        self.n_snapshots, self.snapshot_epochs = 1, [self.main_epochs]
        log.info("fast SWA: average seeded with the weights after epoch %d", self.main_epochs)

    @torch.no_grad()
    def _add_snapshot(self, pl_module: pl.LightningModule, epochs_done: int) -> None:
        assert self.average is not None
        self.n_snapshots += 1
        for key, value in self._averaged_entries(pl_module).items():
            avg = self.average[key]
            if avg.device != value.device:
                avg = self.average[key] = avg.to(value.device)
            avg.add_(value.float() - avg, alpha=1.0 / self.n_snapshots)  # running mean, float32
        self.snapshot_epochs.append(epochs_done)

    def averaged_state_dict(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The module's ``state_dict`` with every floating-point entry replaced by the running average (cast
        to the entry's dtype and device); other entries (integer buffers) are the module's.

        Raises:
            RuntimeError: no snapshot yet.
        """
        if self.average is None:
            raise RuntimeError("fast SWA: no weights averaged yet (the average is seeded at the end of epoch "
                               f"{self.main_epochs})")
        state = pl_module.state_dict()
        missing = sorted(k for k, v in state.items() if torch.is_floating_point(v) and k not in self.average)
        if missing:
            raise RuntimeError(f"fast SWA: the running average lacks {missing[:5]}: the module changed since "
                               "the average was seeded")
        return {k: self.average[k].to(dtype=v.dtype, device=v.device) if k in self.average else v
                for k, v in state.items()}

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "cycle": self.cycle, "epochs_done": self.epochs_done, "n_snapshots": self.n_snapshots,
            "snapshot_epochs": list(self.snapshot_epochs),
            "average": None if self.average is None else {k: v.detach().cpu().clone()
                                                          for k, v in self.average.items()},
            "config": {"main_epochs": self.main_epochs, "cycle_epochs": self.cycle_epochs,
                       "snapshot_every": self.snapshot_every, "cycles": self.cycles},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config", {})
        if int(state_dict["epochs_done"]) > self.main_epochs:
            changed = {k: (saved.get(k), getattr(self, k)) for k in ("main_epochs", "cycle_epochs",
                                                                      "snapshot_every")
                       if saved.get(k) is not None and saved.get(k) != getattr(self, k)}
            if changed:
                raise ValueError(
                    f"fast SWA: the checkpoint was written with other settings {changed} (saved, now) and "
                    f"is {state_dict['epochs_done']} epochs in; resume with the saved values or start a new "
                    "run folder")
        self.cycle = int(state_dict["cycle"])
        self.epochs_done = int(state_dict["epochs_done"])
        self.n_snapshots = int(state_dict["n_snapshots"])
        self.snapshot_epochs = [int(e) for e in state_dict["snapshot_epochs"]]
        average = state_dict.get("average")
        self.average = None if average is None else {k: v.float().clone() for k, v in average.items()}

    # ------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the epoch budget and that the strategy restores callbacks before ``on_fit_start``."""
        if stage != "fit":
            return
        if trainer.max_epochs != self.total_epochs:
            raise ValueError(
                f"fast SWA needs trainer.max_epochs = main_epochs {self.main_epochs} + cycles {self.cycles} "
                f"x cycle_epochs {self.cycle_epochs} = {self.total_epochs}, found {trainer.max_epochs}: set "
                f"trainer.max_epochs={self.total_epochs} (conf/callbacks/fast_swa.yaml sets it unless "
                "trainer.max_epochs is overridden) or change the callback's epochs")
        if trainer.strategy.restore_checkpoint_after_setup:
            raise ValueError(
                f"fast SWA: strategy {type(trainer.strategy).__name__} restores checkpoints after "
                "on_fit_start, so a resumed run could not get its SWA optimizer back; use a single-device or "
                "DDP strategy")
        if not pl_module.automatic_optimization:
            raise ValueError("fast SWA swaps the optimizer used by automatic optimization; the module uses "
                             "manual optimization")
        norms = sorted({type(m).__name__ for m in pl_module.modules() if isinstance(m, _BatchNorm)})
        if norms:
            log.warning("fast SWA: the network has %s layers whose running statistics are averaged, not "
                        "recomputed (the paper's GroupNorm has none)", norms)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resumed in the SWA phase: install the saved cycle's optimizer and schedule (Lightning loads their
        states next). Resumed after the last epoch: validate and save the averaged weights again."""
        if self.cycle >= 0:
            self._install_cycle(trainer, self.cycle)
        if self.epochs_done >= self.total_epochs:
            log.info("fast SWA: the run already finished (%d epochs); saving and validating the averaged "
                     "weights again", self.epochs_done)
            self._finish(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Match the phase of the epoch about to run when the state does not (a fresh run with
        ``main_epochs=0``, or a checkpoint written without this callback at the end of the main schedule)."""
        epoch = trainer.current_epoch
        expected = self.cycle_of(epoch)
        if expected == self.cycle:
            return
        at_cycle_start = epoch >= self.main_epochs and (epoch - self.main_epochs) % self.cycle_epochs == 0
        if expected < 0 or not at_cycle_start or (self.average is None and epoch != self.main_epochs):
            raise ValueError(
                f"fast SWA: training resumes at epoch {epoch} (cycle {expected}) but the checkpoint's "
                f"fast-SWA state is at cycle {self.cycle} with {self.n_snapshots} snapshots; resume from a "
                "checkpoint written by this callback, or from the end of the main schedule (epoch "
                f"{self.main_epochs})")
        if self.average is None:
            self._seed(pl_module)
        self._install_cycle(trainer, expected)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Seed / snapshot, then install the next cycle's optimizer before ``last.ckpt`` is written."""
        done = trainer.current_epoch + 1
        if done == self.main_epochs:
            self._seed(pl_module)
        elif done > self.main_epochs and (done - self.main_epochs) % self.snapshot_every == 0:
            self._add_snapshot(pl_module, done)
        into_swa = done - self.main_epochs
        if 0 <= into_swa and done < self.total_epochs and into_swa % self.cycle_epochs == 0:
            self._install_cycle(trainer, into_swa // self.cycle_epochs)
        self.epochs_done = done

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save and validate the averaged weights once all cycles are done."""
        if self.epochs_done >= self.total_epochs:
            self._finish(trainer, pl_module)
        else:
            log.warning("fast SWA: training stopped after %d of %d epochs; no averaged weights saved",
                        self.epochs_done, self.total_epochs)

    # ------------------------------------------------------------------------------------------ results
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write ``swa.ckpt`` (averaged weights, Lightning format) and validate them; the module keeps its
        own weights afterwards."""
        path = (self.dirpath if self.dirpath is not None
                else Path(trainer.default_root_dir) / "checkpoints") / self.filename
        current = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        pl_module.load_state_dict(self.averaged_state_dict(pl_module))
        try:
            trainer.save_checkpoint(path, weights_only=True)
            metrics = self.evaluate(trainer, pl_module) if self.validate else {}
        finally:
            pl_module.load_state_dict(current)
        self.swa_path, self.val_metrics = path.resolve(), metrics or None
        self.saved_snapshot_epochs = list(self.snapshot_epochs)
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics({f"val_swa/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
        log.info("fast SWA: %d snapshots averaged -> %s; validation %s", self.n_snapshots, path,
                 {k: round(v, 4) for k, v in metrics.items()})

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Score the module's current weights on the validation cases with ``pl_module.score_batch`` (the
        rules of ``validation_step``), under the trainer's precision; honours ``limit_val_batches``. With
        several ranks, each scores the cases of its validation loader and the sums are pooled.

        Returns:
            Means over the validation cases (``loss``, ``dice_mean``, ``dice_et``...), {} without a
            validation loader or with ``limit_val_batches=0``.
        """
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        loader = source.val_dataloader() if hasattr(source, "val_dataloader") else None
        limit = trainer.limit_val_batches
        if loader is None or not limit:
            return {}
        n_batches = len(loader)
        n_batches = min(n_batches, limit) if isinstance(limit, int) else int(n_batches * float(limit))
        was_training = pl_module.training
        pl_module.eval()
        sums: dict[str, float] = {}
        count = 0
        try:
            with trainer.precision_plugin.val_step_context():
                for index, batch in enumerate(loader):
                    if index >= n_batches:
                        break
                    batch = move_data_to_device(batch, pl_module.device)
                    metrics, _ = pl_module.score_batch(batch)
                    size = int(batch["image"].shape[0])
                    for key, value in metrics.items():
                        sums[key] = sums.get(key, 0.0) + float(value) * size
                    count += size
        finally:
            pl_module.train(was_training)
        if trainer.world_size > 1:  # each rank scored its share of the cases (DDP): pool sums and counts
            keys = sorted(sums)
            packed = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64,
                                  device=pl_module.device)
            packed = trainer.strategy.reduce(packed, reduce_op="sum").tolist()
            sums, count = dict(zip(keys, packed[:-1], strict=True)), packed[-1]
        return {k: v / count for k, v in sums.items()} if count else {}

    def run_record(self) -> dict[str, Any]:
        """run.json contribution (merged by train.py): the SWA checkpoint, its validation metrics and the
        snapshot schedule; {} before the averaged weights were saved."""
        if self.swa_path is None:
            return {}
        return {
            "checkpoints": {"swa": str(self.swa_path)},
            "val_metrics_swa": self.val_metrics,
            "fast_swa": {"main_epochs": self.main_epochs, "cycles": self.cycles,
                         "cycle_epochs": self.cycle_epochs, "snapshot_every": self.snapshot_every,
                         "lr": self.lr, "weight_decay": self.weight_decay, "min_lr": self.min_lr,
                         "cosine_epochs": self.cosine_epochs,
                         "n_snapshots": len(self.saved_snapshot_epochs),
                         "snapshot_epochs": list(self.saved_snapshot_epochs)},
        }


__all__ = ["FastSWA", "register_resolvers", "total_epochs"]
