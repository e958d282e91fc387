"""Scale-out with existing engines: ranks, the Hydra-multirun + DDP guard, SLURM requeue, resume point, locks.

docs/method.md "Known traps" (Hydra multirun with in-process DDP re-launches the sweep in each rank) and
docs/cluster.md. Nothing here starts processes or submits jobs: Hydra's launcher plugins (joblib,
submitit) start the jobs, SLURM or Lightning start the ranks, Lightning's ``SLURMEnvironment`` saves and
requeues on SLURM's pre-timeout signal. This module only

* tells, before the Trainer exists, whether this process is global rank 0 (:func:`env_rank_is_zero`), so
  that only rank 0 creates files such as the run's W&B id;
* refuses launches that would run the same work twice (:func:`check_launch`);
* gives Lightning's SLURM environment with auto-requeue under SLURM (:func:`cluster_plugins`);
* picks the newest resume point among ``checkpoints/last.ckpt`` and Lightning's ``hpc_ckpt_<n>.ckpt``
  (:func:`resume_checkpoint`);
* serializes whole-cache builds of concurrent jobs with a file lock (:func:`file_lock`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The signal SLURM sends before the time limit (``--signal=USR1@<seconds>``; the submitit_slurm preset sets
#: it), on which Lightning saves ``hpc_ckpt_<n>.ckpt`` and runs ``scontrol requeue`` (Lightning's default).
REQUEUE_SIGNAL = signal.SIGUSR1

#: Environment variables that launchers set to a non-zero value in every process but global rank 0:
#: torchrun (RANK, GROUP_RANK), Lightning's subprocess launcher (LOCAL_RANK, NODE_RANK), SLURM's srun
#: (SLURM_PROCID), LSF's jsrun (JSM_NAMESPACE_RANK).
RANK_VARIABLES = ("RANK", "GROUP_RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")

_HPC_CHECKPOINT = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


class LaunchError(RuntimeError):
    """This launch would run the same job (or the whole sweep) more than once; the message says what to do."""


# ------------------------------------------------------------------------------------------------ ranks
def env_rank_is_zero() -> bool:
    """True when no launcher variable (:data:`RANK_VARIABLES`) marks this process as a non-zero rank.

    For use before the Trainer exists (e.g. creating the run's W&B id); afterwards use
    ``trainer.is_global_zero``. A process on node 1 started by hand (``NODE_RANK=1``) counts as non-zero
    even though its LOCAL_RANK is 0.
    """
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value and value != "0":
            return False
    return True


# ------------------------------------------------------------------------------------------ launch guard
def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_launch(trainer: Any) -> None:
    """Refuse launches in which ranks or tasks would each run the job (or the sweep) again.

    Call it after building the Trainer and before ``fit`` (Lightning starts the extra ranks in ``fit``).

    Lightning's ``_SubprocessScriptLauncher`` (pytorch_lightning/strategies/launchers/subprocess_script.py,
    ``_call_children_scripts``) starts ``devices - 1`` more processes per node unless the cluster
    environment creates them (SLURM's srun, torchrun). With Hydra in use it builds their command line with
    lightning_fabric's ``_hydra_subprocess_cmd``: ``sys.argv[1:]`` unchanged, plus
    ``hydra.run.dir=<this job's run.dir> hydra.job.name=train_ddp_process_<k> hydra.output_subdir=null``.
    In a multirun, ``sys.argv`` still holds ``-m`` and the sweep (``fold=0,1,2,3,4``), and ``hydra.run.dir``
    is ignored in multirun mode, so every extra rank would start the whole sweep again (docs/method.md "Known
    traps"); under the joblib or submitit launchers ``sys.argv``/``__main__`` are not even ``train.py``'s.
    In a single run (no ``-m``) the re-invoked command reproduces exactly this job in the same folder, so
    that case is allowed.

    Raises:
        LaunchError: Hydra multirun with Lightning-spawned ranks; or a submitit *local* job with more than
            one task (each task would train the whole job: Lightning has no cluster environment for it).
    """
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    tasks = int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1") or 1)
    if tasks > 1:
        raise LaunchError(
            f"submitit local job with tasks_per_node={tasks}: each task would train the whole job again "
            "(Lightning recognizes SLURM's tasks, not submitit-local ones). Use "
            "hydra.launcher.tasks_per_node=1 with hydra/launcher=submitit_local (one process per job), or "
            "hydra/launcher=submitit_slurm with "
            "tasks_per_node = gpus_per_node = trainer.devices for multi-GPU jobs (docs/cluster.md).")
    launcher = getattr(trainer.strategy, "launcher", None)
    if not isinstance(launcher, _SubprocessScriptLauncher):
        return
    if launcher.cluster_environment.creates_processes_externally or not _multirun():
        return
    from hydra.core.hydra_config import HydraConfig

    job = HydraConfig.get().job
    raise LaunchError(
        f"Hydra multirun (-m) job #{job.num} ({job.override_dirname or 'no overrides'}) asks Lightning for "
        f"{launcher.num_processes} processes per node x {launcher.num_nodes} node(s) with strategy "
        f"{type(trainer.strategy).__name__}. Lightning would start the extra ranks by re-running this "
        "command line, which still holds -m and the sweep, so every rank would start the whole sweep again "
        "(lightning_fabric _hydra_subprocess_cmd). Do one of:\n"
        "  1. on SLURM: python train.py -m hydra/launcher=submitit_slurm hydra.launcher.gpus_per_node=N "
        "trainer=ddp ... (tasks_per_node follows gpus_per_node: SLURM starts one process per GPU, "
        "Lightning's SLURMEnvironment joins them);\n"
        "  2. one GPU per job: keep trainer.devices=1 (trainer=default) and run the jobs side by side "
        "(hydra/launcher=joblib, submitit_local or submitit_slurm);\n"
        "  3. several GPUs without SLURM: run each job on its own, without -m: "
        "python train.py trainer=ddp trainer.devices=N fold=0 ...")


# ----------------------------------------------------------------------------------------- SLURM requeue
def cluster_plugins() -> list[Any]:
    """Trainer plugins for the cluster this process runs in.

    Under SLURM (an ``srun`` task, or a batch step: ``SLURM_NTASKS`` set and the job not named ``bash`` or
    ``interactive``): ``[SLURMEnvironment(auto_requeue=True, requeue_signal=SIGUSR1)]``. Lightning then takes
    ranks from ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NODEID`` (no process re-launching), and on SIGUSR1
    every rank calls ``trainer.save_checkpoint(<default_root_dir>/hpc_ckpt_<n+1>.ckpt)`` (rank 0 writes it)
    and global rank 0 runs ``scontrol requeue <job id>`` (``<array job>_<task>`` for array jobs;
    trainer/connectors/signal_connector.py ``_slurm_sigusr_handler_fn``). Elsewhere: ``[]`` (Lightning's
    own detection).
    """
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=True, requeue_signal=REQUEUE_SIGNAL)]
    return []


def hpc_checkpoints(folder: str | Path) -> list[Path]:
    """Lightning's ``hpc_ckpt_<n>.ckpt`` files in ``folder`` (the Trainer's ``default_root_dir``), by n."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in folder.iterdir()
             if (m := _HPC_CHECKPOINT.match(path.name)) and path.is_file()]
    return [path for _, path in sorted(found)]


def resume_checkpoint(last_path: str | Path, hpc_folder: str | Path) -> Path | None:
    """The checkpoint to resume from: the newer (modification time) of ``last_path`` and the highest-numbered
    ``hpc_ckpt_<n>.ckpt`` in ``hpc_folder``; None when neither exists.

    ``last.ckpt`` is written at the end of every training epoch; ``hpc_ckpt_<n>.ckpt`` when SLURM's
    pre-timeout signal arrives, possibly mid-epoch, so after a requeue it is usually the newer one.
    Lightning only looks for hpc checkpoints itself when ``fit`` gets ``ckpt_path=None``
    (trainer/connectors/checkpoint_connector.py ``_parse_ckpt_path``), and train.py passes a path, hence
    this choice. Modification times decide, as Lightning's own ``ckpt_path="last"`` does.
    """
    candidates = [Path(last_path)] + hpc_checkpoints(hpc_folder)[-1:]
    existing = [p for p in candidates if p.is_file()]
    if not existing:
        return None
    return max(existing, key=lambda p: (p.stat().st_mtime_ns, p.name.startswith("hpc_ckpt_")))


# ------------------------------------------------------------------------------------------- file lock
@contextmanager
def file_lock(path: str | Path, what: str = "") -> Iterator[bool]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if missing) for the ``with`` block.

    Used around whole-cache builds so that the jobs of a sweep (and the ranks of a job) that start together
    build the cache once: the first takes the lock and builds, the others wait, then find every entry fresh.
    The lock dies with its process (no stale locks). Where the file can't be created (read-only cache) or
    the file system has no ``flock`` (e.g. Lustre mounted without ``-o flock``), it logs a warning and
    yields False without locking: the cache's atomic renames still keep every entry valid, at the cost of
    duplicated work.

    Yields:
        True when the lock is held.
    """
    path = Path(path)
    label = what or str(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        log.warning("%s: can't open lock file %s (%s); continuing without a lock", label, path, err)
        yield False
        return
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            log.info("%s: another process holds %s; waiting for it", label, path)
            start = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
            log.info("%s: lock acquired after %.1f s", label, time.monotonic() - start)
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.warning("%s: the file system of %s has no flock (%s); continuing without a lock", label, path,
                        err)
        yield locked
    finally:
        os.close(fd)  # releases the lock
