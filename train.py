"""Train one fold of one pipeline (Hydra entry point; paper section 2.5, docs/method.md "Training").

    python train.py                                   # pipeline A, EquiUnet, synthetic data, fold 0
    python train.py pipeline=B model=unet fold=3
    python train.py -m fold=0,1,2,3,4 experiment=paper_A data.root=/path/to/BraTS2020_Training
    python train.py experiment=demo_A                 # CPU-sized demo, pipeline A (demo_B: pipeline B)

Each job trains in ``outputs/<name>/<data set>/<pipeline>/<model>/fold<k>/`` and leaves there
``fingerprint.json``, ``checkpoints/{best,last}.ckpt``, ``metrics.csv``, ``overlays/``, ``wandb/`` and, at the
end, ``run.json`` and ``curves.png`` (docs/contracts.md, "Run folder"). Running the same job again resumes
from ``checkpoints/last.ckpt`` (``resume=true``) and continues the same W&B run and ``metrics.csv`` where the
checkpoint left them. A rerun whose configuration or data set differs from the run's (``fingerprint.json``)
is refused with the differences listed: ``resume=force`` continues anyway, ``resume=false`` trains the run
again from scratch. SIGTERM / Ctrl-C write ``last.ckpt`` and exit 143 / 130; bad settings exit 2 with one
line and leave no run folder behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from brats_lightning.callbacks.fast_swa import register_resolvers
from brats_lightning.data.layout import register_resolvers as register_data_resolvers

log = logging.getLogger("brats_lightning.train")
# Registered when train.py is imported, in the launching process too: Hydra's joblib launcher gives every job
# the launcher's resolvers (Singleton state), so a resolver registered inside a job would be gone in the next.
register_resolvers()  # ${fast_swa_epochs:...} in conf/callbacks/fast_swa.yaml (trainer.max_epochs)
register_data_resolvers()  # ${n_regions:${data}} in conf/model/*.yaml (out_channels)

# Lightning notices that both the module and the data module could define on_after_batch_transfer; only the
# module does (batch augmentation on the device), which is what Lightning uses.
warnings.filterwarnings("ignore", message=r"You have overridden `on_after_batch_transfer`")
# conf/hydra/launcher/{joblib,submitit_slurm,submitit_local}.yaml carry the launcher plugins' own names (so
# `hydra/launcher=submitit_slurm` picks them) and every key of the plugins' schemas; Hydra 1.3 still merges
# them with those schemas and warns that it may stop doing so, which changes nothing for complete files.
warnings.filterwarnings("ignore",
                        message=r"\s*'hydra/launcher/(joblib|submitit_slurm|submitit_local)' is validated")

# WANDB_MODE as the user set it when the process started (WandbLogger(offline=True) overwrites the variable).
# Set but empty counts as unset (wandb itself rejects an empty mode).
if os.environ.get("WANDB_MODE") == "":
    del os.environ["WANDB_MODE"]
_USER_WANDB_MODE = os.environ.get("WANDB_MODE")


def _instantiate_all(node: DictConfig | None) -> dict[str, Any]:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` config node, skipping null entries."""
    if not node:
        return {}
    return {name: hydra.utils.instantiate(entry) for name, entry in node.items()
            if entry is not None and "_target_" in entry}


def build_loggers(cfg: DictConfig, run_dir: Path) -> tuple[list[Any], str | None]:
    """Loggers from ``cfg.logger``; W&B gets the run folder's persisted id. Returns (loggers, W&B id).

    Only global rank 0 creates or reads the id (the other ranks' WandbLogger never starts a W&B run: its
    ``experiment`` is rank-zero only), so ranks can't race on ``wandb_id.txt``.
    """
    from brats_lightning.distributed import env_rank_is_zero
    from brats_lightning.runs import wandb_run_id

    loggers, run_id = [], None
    for name, entry in (cfg.get("logger") or {}).items():
        if entry is None or "_target_" not in entry:
            continue
        if entry["_target_"].endswith("WandbLogger"):
            run_id = wandb_run_id(run_dir) if env_rank_is_zero() else None
            offline = bool(entry.get("offline", True)) and _USER_WANDB_MODE is None
            loggers.append(hydra.utils.instantiate(entry, id=run_id, offline=offline))
        else:
            loggers.append(hydra.utils.instantiate(entry))
        log.debug("logger %s: %s", name, type(loggers[-1]).__name__)
    return loggers, run_id


def _metrics(results: list[dict[str, float]]) -> dict[str, float]:
    """``trainer.validate`` results -> ``{"dice_et": ..., "loss": ...}`` (the ``val/`` prefix dropped)."""
    merged: dict[str, float] = {}
    for result in results:
        merged.update({k.removeprefix("val/"): float(v) for k, v in result.items() if k.startswith("val/")})
    return merged


def check_settings(cfg: DictConfig) -> None:
    """Refuse, before anything is created, settings that cannot work: a fold outside ``0..n_folds-1``, a
    data folder that does not exist (and is not generated), an unknown ``resume`` value.

    Raises:
        UserError: naming the setting, what was found, what was expected and the fix.
    """
    from brats_lightning.errors import UserError

    fold, n_folds = int(cfg.fold), int(cfg.data.n_folds)
    if not 0 <= fold < n_folds:
        raise UserError(f"fold={fold}: the data set is split into data.n_folds={n_folds} folds, numbered 0 "
                        f"to {n_folds - 1}; pass fold=0 ... fold={n_folds - 1} (or change data.n_folds)")
    root = Path(cfg.data.root)
    if not cfg.data.get("generate") and not root.is_dir():
        found = "a file" if root.exists() else "nothing"
        raise UserError(f"data.root={root}: found {found}; expected a folder with one sub-folder per case "
                        "(e.g. MICCAI_BraTS2020_TrainingData); pass data.root=/path/to/it")
    if cfg.get("resume", True) not in (True, False, "force"):
        raise UserError(f"resume={cfg.resume!r}: expected true (continue the run in this folder), force "
                        "(continue it even though its settings changed) or false (train it again from "
                        "scratch)")


def _standard_start_method() -> None:
    """Use the platform's own multiprocessing start method when the launcher left another one set.

    hydra/launcher=joblib runs each job in a loky worker whose start method is "loky"; the processes this job
    starts itself (synthetic data generation, cache building, DataLoader workers) would inherit it and fail
    with "cannot find context for 'loky'" (BrokenProcessPool).
    """
    import multiprocessing

    method = multiprocessing.get_start_method(allow_none=True)
    if method is not None and method not in multiprocessing.get_all_start_methods():
        multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
        log.info("multiprocessing start method %r (set by the launcher) -> %r", method,
                 multiprocessing.get_start_method())


def _remove_unused_run_dir(run_dir: Path, output_root: Path) -> None:
    """Remove ``run_dir`` when it holds only what Hydra and the folder lock put there before training
    started (``.hydra/``, ``train.log``, the lock), then its parents below ``output_root`` left empty."""
    from brats_lightning.locks import LOCK_NAME

    if not run_dir.is_dir() or {p.name for p in run_dir.iterdir()} - {".hydra", "train.log", LOCK_NAME}:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    output_root = output_root.resolve()
    for parent in run_dir.parents:
        if parent == output_root or output_root not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()


def _resume_state(cfg: DictConfig, run_dir: Path, fingerprint: dict[str, Any], last_path: Path
                  ) -> Path | None:
    """Compare the run folder's fingerprint with this job's and choose the checkpoint to resume from.

    Returns:
        The checkpoint (None: train from scratch).

    Raises:
        UserError: the folder holds a run with other settings or data and ``resume`` is not force/false.
    """
    from brats_lightning.distributed import resume_checkpoint
    from brats_lightning.errors import UserError
    from brats_lightning.runs import (
        RUN_FILE,
        WANDB_ID_FILE,
        fingerprint_changes,
        read_fingerprint,
        write_fingerprint,
    )

    resume = cfg.get("resume", True)
    previous = read_fingerprint(run_dir)
    if resume is False:
        for name in (RUN_FILE, WANDB_ID_FILE):  # a new W&B run; run.json comes again at the end
            (run_dir / name).unlink(missing_ok=True)
        write_fingerprint(run_dir, fingerprint)
        return None
    if previous is not None and previous != fingerprint:
        changes = fingerprint_changes(previous, fingerprint)
        shown = "; ".join(changes[:12]) + (f"; ... {len(changes) - 12} more" if len(changes) > 12 else "")
        if resume != "force":
            raise UserError(
                f"{run_dir} holds a run with other settings or data ({run_dir / 'fingerprint.json'}): "
                f"{shown}. Rerun with that run's settings to resume it, or pass resume=force to continue it "
                "with these, resume=false to train it again from scratch in this folder, or name=... for a "
                "separate run")
        log.warning("resume=force: continuing the run in %s with changed settings: %s", run_dir, shown)
    if previous != fingerprint:
        write_fingerprint(run_dir, fingerprint)
    return resume_checkpoint(last_path, run_dir)  # last.ckpt, or SLURM's hpc_ckpt_<n>.ckpt if newer


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one run as configured and write its ``run.json``.

    Returns:
        The run record written to ``run.json``.

    Raises:
        UserError: bad data or settings (every bad case listed), or another job holds the run folder.
    """
    from brats_lightning.distributed import env_rank_is_zero
    from brats_lightning.locks import FolderLock

    check_settings(cfg)
    _standard_start_method()
    env_mode = os.environ.get("WANDB_MODE")  # restored at the end (WandbLogger(offline=True) changes it)
    run_dir = Path(cfg.paths.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # one job per run folder: a second job is refused here, naming the running one (brats_lightning/locks.py)
    lock = FolderLock(run_dir, "train").acquire() if env_rank_is_zero() else None
    try:
        return _train_locked(cfg, run_dir, env_mode)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg: DictConfig, run_dir: Path, env_mode: str | None) -> dict[str, Any]:
    """:func:`train` once the run folder is held."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from brats_lightning.checkpointing import (
        STOP_EXIT_CODES,
        AtomicCheckpointIO,
        RandomStateCheckpoint,
        StopOnSignal,
        checkpoint_step,
        remove_stale_temp_files,
    )
    from brats_lightning.data.datamodule import BratsDataModule
    from brats_lightning.data.layout import MODALITIES
    from brats_lightning.distributed import (
        check_launch,
        cluster_plugins,
        env_rank_is_zero,
        hpc_checkpoints,
        resume_checkpoint,
    )
    from brats_lightning.memory import check_training_job, check_validation_job, network_config
    from brats_lightning.module import BratsModule
    from brats_lightning.precision import resolve_precision, runs_on_cpu
    from brats_lightning.runs import (
        ResumableCSVLogger,
        ResumableWandbLogger,
        callback_records,
        merge_records,
        run_fingerprint,
        write_run_record,
    )
    from brats_lightning.speed import apply_threads, resolve_speed

    if env_rank_is_zero():  # temporary files of writes cut short by a killed job (atomic_path)
        remove_stale_temp_files(run_dir)
    pl.seed_everything(int(cfg.seed), workers=True)

    datamodule = BratsDataModule.from_config(cfg)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    last_cb, best_cb = callbacks.get("last_checkpoint"), callbacks.get("best_checkpoint")
    last_path = (Path(last_cb.dirpath) if last_cb is not None else run_dir / "checkpoints") / "last.ckpt"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    ckpt_path = None
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    crop = cfg.data.crop_size
    trainer_kwargs["precision"] = resolve_precision(trainer_kwargs.get("precision", "32-true"),
                                                    trainer_kwargs.get("accelerator", "auto"),
                                                    crop if isinstance(crop, int) else list(crop))
    # memory plan vs free memory, before any data is read: refuse now, not hours in
    training_plan = check_training_job(cfg, trainer_kwargs["precision"])
    if env_rank_is_zero():  # every case checked and cached before loggers, W&B and the Trainer start
        datamodule.prepare_data()
        datamodule.setup("fit")  # the split file, for the fingerprint (Lightning's own call is then a no-op)
        fingerprint = run_fingerprint(resolved, datamodule.root, [c.case_id for c in datamodule.cases],
                                      str(datamodule.label_convention), datamodule.split_file)
        ckpt_path = _resume_state(cfg, run_dir, fingerprint, last_path)
    elif cfg.get("resume", True):  # the other ranks resume from the same checkpoint, unchecked
        ckpt_path = resume_checkpoint(last_path, run_dir)
    # the largest validation brain box, whole (rank 0)
    check_validation_job(cfg, datamodule, training_plan, trainer_kwargs["precision"])
    module = BratsModule.from_config(cfg)
    loggers, wandb_id = build_loggers(cfg, run_dir)

    speed_plan = resolve_speed(  # the module applies memory format / compile itself (configure_model)
        cfg.get("speed"), "cpu" if runs_on_cpu(trainer_kwargs.get("accelerator")) else "cuda",
        trainer_kwargs["precision"], bool(trainer_kwargs.get("deterministic")))
    if trainer_kwargs.get("benchmark") is None:  # speed.cudnn_benchmark (auto: on for CUDA)
        trainer_kwargs["benchmark"] = speed_plan.cudnn_benchmark
    apply_threads(speed_plan)  # speed.num_threads (null: torch's default)
    trainer_kwargs = {k: v for k, v in trainer_kwargs.items() if v is not None}
    # RandomStateCheckpoint: RNG states in every checkpoint, so resumed runs draw as uninterrupted ones do
    stopper = StopOnSignal(last_path)  # SIGTERM / SIGINT: last.ckpt, exit 143 / 130
    trainer = pl.Trainer(**trainer_kwargs, callbacks=[*callbacks.values(), RandomStateCheckpoint(), stopper],
                         logger=loggers or False,
                         plugins=[AtomicCheckpointIO(), *cluster_plugins()], default_root_dir=str(run_dir))
    check_launch(trainer)  # refuses Hydra multirun + Lightning-spawned DDP ranks (docs/cluster.md)
    for logger in loggers:
        logger.log_hyperparams(resolved)
    if ckpt_path is not None:
        epoch, step = checkpoint_step(ckpt_path)
        log.info("resuming from %s (epoch %d, step %d)", ckpt_path, epoch, step)
        for logger in loggers:  # the records continue where the checkpoint left them (docs/contracts.md)
            if isinstance(logger, ResumableCSVLogger):
                logger.drop_rows_from(step)
            elif isinstance(logger, ResumableWandbLogger):
                logger.mark_resumed(step, ckpt_path)
    elif env_rank_is_zero():
        for logger in loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.drop_rows_from(0)  # resume=false, or a run killed before its first checkpoint

    stopper.install()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        best_path = Path(best_cb.best_model_path) if best_cb is not None and best_cb.best_model_path else None
        scored = best_path if best_path is not None and best_path.is_file() else last_path
        val_metrics = {}
        if scored.is_file() and trainer.limit_val_batches != 0:
            fit_loggers, trainer.loggers = trainer.loggers, []  # a re-validation: not an epoch
            val_metrics = _metrics(trainer.validate(module, datamodule=datamodule, ckpt_path=str(scored),
                                                    verbose=False))
            trainer.loggers = fit_loggers
            for logger in loggers:
                if isinstance(logger, ResumableWandbLogger) and trainer.is_global_zero:
                    logger.experiment.summary.update({f"best/{k}": v for k, v in val_metrics.items()})
        record = {
            "pipeline": cfg.pipeline.name,
            "model": cfg.model_name,
            "fold": int(cfg.fold),
            "seed": int(cfg.seed),
            "name": cfg.name,
            "normalization": datamodule.cache.normalization,
            "channels": list(MODALITIES),
            "model_config": network_config(OmegaConf.to_container(cfg.model, resolve=True))[0],
            "checkpoints": {
                "best": str(best_path) if best_path is not None and best_path.is_file() else None,
                "last": str(last_path) if last_path.is_file() else None,
                "swa": None,
            },
            "val_metrics": val_metrics,
            "val_metrics_checkpoint": "best" if scored == best_path else "last",
            "val_metrics_swa": None,
            "epochs_trained": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "precision": str(trainer_kwargs["precision"]),
            "run_dir": str(run_dir),
            "wandb_run_id": wandb_id,
            **datamodule.record(),
        }
        record = merge_records(record, callback_records(trainer.callbacks))
        if trainer.is_global_zero:  # every rank computed the record; one writes it
            path = write_run_record(run_dir, record)
            log.info("run.json written: %s (val %s)", path, {k: round(v, 4) for k, v in val_metrics.items()})
            if (run_dir / "metrics.csv").is_file():  # the CSV logger's file (logger=default or csv)
                from brats_lightning.plots import training_curves

                title = f"{cfg.name}: pipeline {cfg.pipeline.name} / {cfg.model_name} / fold {cfg.fold}"
                curves = training_curves(run_dir / "metrics.csv", run_dir / "curves.png", title=title,
                                         monitor=cfg.pipeline.monitor, mode=cfg.pipeline.monitor_mode)
                log.info("training curves: %s", curves)
            for old in hpc_checkpoints(run_dir):  # requeue checkpoints, superseded by last.ckpt
                old.unlink()
                log.info("removed %s (the run finished; checkpoints/last.ckpt is newer)", old)
        return record
    except SIGTERMException:  # a signal stopped the loops; StopOnSignal wrote last.ckpt
        signum = stopper.signum or signal.SIGTERM
        log.warning("%s: stopped at epoch %d; rerun the same command to resume", signal.Signals(signum).name,
                    trainer.current_epoch + 1)
        raise SystemExit(STOP_EXIT_CODES[signum]) from None
    finally:
        stopper.uninstall()
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                wandb.finish()
        if env_mode is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = env_mode


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry: train, return the validation mean Dice (for sweepers); a UserError prints one line and
    exits 2 (brats_lightning/errors.py), no traceback."""
    from brats_lightning.errors import EXIT_USER_ERROR, UserError

    try:
        record = train(cfg)
    except UserError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        _remove_unused_run_dir(Path(cfg.paths.run_dir), Path(cfg.paths.output_dir))
        sys.exit(EXIT_USER_ERROR)
    return record["val_metrics"].get("dice_mean")


if __name__ == "__main__":
    main()
