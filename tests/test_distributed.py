"""Tests of scale-out (brats_lightning/distributed.py, conf/hydra/launcher/, conf/trainer/ddp.yaml).

Real processes throughout: a joblib multirun of two jobs, a two-process DDP run (gloo on CPU), the
multirun + DDP guard, two processes building one cache, a SLURM-style run that gets the pre-timeout signal
and resumes (fake ``scontrol`` on PATH, SLURM variables in the environment), and the submitit_slurm preset
rendered to a real sbatch script by submitit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from brats_lightning.distributed import (
    LaunchError,
    check_launch,
    cluster_plugins,
    env_rank_is_zero,
    file_lock,
    hpc_checkpoints,
    resume_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
RUN = Path("outputs") / "smoke" / "smoke" / "A" / "equiunet"  # <name>/<data.name>/<pipeline>/<model>
SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train",
             "SLURM_NODELIST": "localhost"}


def _no_cluster_env() -> dict[str, str]:
    """This process's environment without launcher / SLURM / submitit variables."""
    drop = ("SLURM_", "SUBMITIT_", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "MASTER_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _train(args: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True,
           timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**_no_cluster_env(), "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", **(env or {})}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _smoke(root: Path, tmp_path: Path) -> list[str]:
    return ["experiment=smoke", f"data.root={root}", "data.generate=null",
            f"paths.cache_dir={tmp_path / 'cache'}", "callbacks.progress_bar=null"]


def _built(text: str) -> int:
    """Cache entries built, summed over the datamodule's "built N entries" log lines in ``text``."""
    return sum(int(n) for n in re.findall(r"built (\d+) entries", text))


# ------------------------------------------------------------------------------------------------- ranks
@pytest.mark.parametrize(("env", "zero"), [
    ({}, True), ({"LOCAL_RANK": "0", "SLURM_PROCID": "0"}, True), ({"LOCAL_RANK": "1"}, False),
    ({"SLURM_PROCID": "3"}, False), ({"RANK": "2"}, False), ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),
])
def test_env_rank_is_zero(monkeypatch, env, zero):
    for name in ("RANK", "GROUP_RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert env_rank_is_zero() is zero


# ------------------------------------------------------------------------------------------ resume point
def _touch(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))
    return path


def test_resume_checkpoint_picks_the_newest(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert resume_checkpoint(last, tmp_path) is None
    _touch(last, 1000)
    assert resume_checkpoint(last, tmp_path) == last
    hpc2 = _touch(tmp_path / "hpc_ckpt_2.ckpt", 2000)  # saved at SLURM's signal, after last.ckpt
    _touch(tmp_path / "hpc_ckpt_10.ckpt", 500)        # the highest number is Lightning's latest, not the name
    _touch(tmp_path / "hpc_ckpt_x.ckpt", 9000)        # not Lightning's naming: ignored
    assert [p.name for p in hpc_checkpoints(tmp_path)] == ["hpc_ckpt_2.ckpt", "hpc_ckpt_10.ckpt"]
    assert resume_checkpoint(last, tmp_path) == last  # hpc_ckpt_10 (older than last.ckpt) is the candidate
    (tmp_path / "hpc_ckpt_10.ckpt").unlink()
    assert resume_checkpoint(last, tmp_path) == hpc2
    _touch(last, 3000)  # training went on after the requeue: last.ckpt is newer again
    assert resume_checkpoint(last, tmp_path) == last
    last.unlink()
    assert resume_checkpoint(last, tmp_path) == hpc2


# --------------------------------------------------------------------------------------------- file lock
def test_file_lock_excludes_another_holder(tmp_path):
    lock, order = tmp_path / "cache" / ".build.lock", []
    ready = threading.Event()

    def second() -> None:
        ready.set()
        with file_lock(lock) as held:  # a second open file description: flock blocks it
            order.append(("second", held))

    with file_lock(lock) as held:
        assert held and lock.is_file()
        thread = threading.Thread(target=second)
        thread.start()
        ready.wait()
        time.sleep(0.3)
        order.append(("first released", True))
    thread.join(10)
    assert order == [("first released", True), ("second", True)]


def test_file_lock_without_a_writable_place_yields_false(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with file_lock(blocker / "sub" / ".lock") as held:
        assert held is False


# ---------------------------------------------------------------------------------------- launch guard
def _hydra_job(mode: str) -> None:
    """Make HydraConfig look like a job of ``mode`` (RUN or MULTIRUN) composed from conf/."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["fold=3"], return_hydra_config=True)
    cfg.hydra.mode = RunMode[mode]
    cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)


@pytest.fixture
def hydra_job():
    from hydra.core.hydra_config import HydraConfig

    yield _hydra_job
    HydraConfig.instance().cfg = None


def _ddp_trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)


def test_check_launch_refuses_multirun_with_lightning_spawned_ranks(monkeypatch, hydra_job):
    for name in SLURM_ENV:
        monkeypatch.delenv(name, raising=False)
    hydra_job("MULTIRUN")
    with pytest.raises(LaunchError, match=r"(?s)job #0 \(fold=3\).*2 processes per node.*submitit_slurm"):
        check_launch(_ddp_trainer())
    check_launch(pl.Trainer(accelerator="cpu", devices=1, logger=False))  # one process per job: fine
    hydra_job("RUN")
    check_launch(_ddp_trainer())  # a single run: Lightning re-runs exactly this job in the same folder


def test_check_launch_allows_multirun_when_slurm_starts_the_ranks(monkeypatch, hydra_job):
    for name, value in {**SLURM_ENV, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"}.items():
        monkeypatch.setenv(name, value)
    hydra_job("MULTIRUN")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         plugins=cluster_plugins())
    env = trainer.strategy.cluster_environment
    assert type(env).__name__ == "SLURMEnvironment" and env.creates_processes_externally
    assert env.auto_requeue and env.requeue_signal == signal.SIGUSR1
    check_launch(trainer)


def test_check_launch_refuses_submitit_local_tasks(monkeypatch):
    monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "2")
    with pytest.raises(LaunchError, match="tasks_per_node=2"):
        check_launch(pl.Trainer(accelerator="cpu", devices=1, logger=False))


def test_cluster_plugins_only_under_slurm(monkeypatch):
    for name in SLURM_ENV:
        monkeypatch.delenv(name, raising=False)
    assert cluster_plugins() == []


# -------------------------------------------------------------------------------------- cache under race
_BUILDER = """
import json, logging, sys, time
from pathlib import Path
root, cache, sync, name, mode = sys.argv[1:6]
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
if mode == "cache":  # the data layer only (no Lightning import: faster start)
    from brats_lightning.data.layout import find_cases
    from brats_lightning.data.preprocess import CaseCache
else:
    from brats_lightning.data.datamodule import BratsDataModule
(Path(sync) / ("ready-" + name)).touch()
while not (Path(sync) / "go").exists():
    time.sleep(0.002)
if mode == "cache":    # CaseCache alone: temp folder + atomic rename, no lock
    summary = CaseCache(cache, "minmax").build(find_cases(root), workers=1, progress=False)
    sys.stderr.write(f"built {summary['built']} entries\\n")
else:                  # what a training job does first (Lightning's prepare_data): the same, under the lock
    BratsDataModule(root, cache_dir=cache, num_workers=1).prepare_data()
"""


def _race(root: Path, cache: Path, sync: Path, mode: str) -> list[int]:
    """Start two builders, release them at the same instant, return how many entries each built."""
    sync.mkdir()
    env = {**_no_cluster_env(), "WANDB_MODE": "disabled"}
    command = [sys.executable, "-c", _BUILDER, str(root), str(cache), str(sync)]
    procs = [subprocess.Popen([*command, str(i), mode], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((sync / f"ready-{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "builders did not start"
        time.sleep(0.01)
    (sync / "go").touch()
    built = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-4000:]
        built.append(_built(err))
    return built


def _assert_one_valid_cache(cache: Path, cases: list) -> None:
    from brats_lightning.data.preprocess import CaseCache, preprocess_case

    folder = CaseCache(cache, "minmax").entry_dir(cases[0]).parent
    names = sorted(p.name for p in folder.iterdir())
    assert [n for n in names if n != ".build.lock"] == sorted(c.case_id for c in cases)  # no .tmp-/.old- left
    store = CaseCache(cache, "minmax")
    for case in cases:
        assert store.is_fresh(case)
        cached, fresh = store.get(case), preprocess_case(case, "minmax")
        assert cached.box == fresh.box
        assert np.array_equal(np.asarray(cached.images), fresh.images)
        assert np.array_equal(np.asarray(cached.labels), fresh.labels)


@pytest.mark.slow
def test_two_processes_build_one_cache(synthetic_root, synthetic_cases, tmp_path):
    # the data layer alone: both processes build every entry, the renames race, one valid entry each remains
    built = _race(synthetic_root, tmp_path / "cache_a", tmp_path / "sync_a", "cache")
    assert built == [len(synthetic_cases)] * 2
    _assert_one_valid_cache(tmp_path / "cache_a", synthetic_cases)
    # two training jobs starting together: the lock makes one build and the other reuse
    built = _race(synthetic_root, tmp_path / "cache_b", tmp_path / "sync_b", "datamodule")
    assert sorted(built) == [0, len(synthetic_cases)]
    _assert_one_valid_cache(tmp_path / "cache_b", synthetic_cases)


# ------------------------------------------------------------------------------------------ joblib sweep
@pytest.mark.slow
def test_joblib_multirun_runs_two_jobs_side_by_side(synthetic_root, synthetic_cases, tmp_path):
    _train(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "fold=0,1",
            *_smoke(synthetic_root, tmp_path)], cwd=tmp_path, env={"WANDB_MODE": "disabled"})
    spans, logs = [], ""
    for fold in (0, 1):
        run_dir = tmp_path / RUN / f"fold{fold}"
        run = json.loads((run_dir / "run.json").read_text())
        assert (run["fold"], run["run_dir"]) == (fold, str(run_dir.resolve()))
        assert Path(run["checkpoints"]["last"]).is_file()
        log = (run_dir / "train.log").read_text()
        logs += log
        stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]", log, flags=re.M)
        spans.append((stamps[0], stamps[-1]))
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]  # the two jobs ran at the same time
    assert _built(logs) == len(synthetic_cases)  # the shared cache was built once between the two jobs
    _assert_one_valid_cache(tmp_path / "cache", synthetic_cases)


# ---------------------------------------------------------------------------------------------- DDP run
@pytest.mark.slow
def test_ddp_two_processes_write_everything_once(synthetic_root, synthetic_cases, tmp_path):
    result = _train(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                     *_smoke(synthetic_root, tmp_path)], cwd=tmp_path)
    run_dir = tmp_path / RUN / "fold0"
    # two processes ran: Lightning re-ran train.py for rank 1, which logged into the same run folder
    rank1_log = (run_dir / "train_ddp_process_1.log").read_text()
    rank0_log = (run_dir / "train.log").read_text()
    assert "run.json written" in rank0_log and "run.json written" not in rank1_log
    assert (result.stdout + result.stderr).count("run.json written") == 1
    assert _built(rank0_log + rank1_log) == len(synthetic_cases)  # cache built by one process
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr

    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert [p.name for p in tmp_path.rglob("run.json")] == ["run.json"]
    assert len(list(tmp_path.rglob("metrics.csv"))) == 1 and len(list(tmp_path.rglob("hparams.yaml"))) == 1
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1  # W&B logged from rank 0 only
    run = json.loads((run_dir / "run.json").read_text())
    wandb_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert run["wandb_run_id"] == wandb_id and offline_runs[0].name.endswith(wandb_id)
    assert run["epochs_trained"] == 2 and set(run["val_metrics"]) >= {"dice_mean", "loss"}
    state = torch.load(run["checkpoints"]["last"], map_location="cpu", weights_only=False)
    assert state["global_step"] == run["global_step"] == 4  # 2 epochs x 2 steps (limit_train_batches=2)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_under_srun_takes_ranks_from_slurm(synthetic_root, tmp_path):
    """What `srun --ntasks-per-node=2 python train.py trainer=ddp` starts: two tasks with SLURM's variables;
    trainer=ddp takes devices from SLURM_NTASKS_PER_NODE and Lightning re-launches nothing."""
    base = {**_no_cluster_env(), **SLURM_ENV, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_JOB_ID": "4243", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
            "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    args = [sys.executable, str(REPO / "train.py"), "trainer=ddp", "trainer.accelerator=cpu", "logger=csv",
            *_smoke(synthetic_root, tmp_path)]
    logs = [tmp_path / f"task{r}.log" for r in (0, 1)]
    procs = []
    for rank, log in enumerate(logs):  # output to files: a full pipe could stall a rank inside a collective
        env = {**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}
        with open(log, "w") as out:
            procs.append(subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT))
    for proc in procs:
        proc.wait(timeout=300)
    outputs = [log.read_text() for log in logs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    both = "".join(outputs)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outputs[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    assert both.count("run.json written") == 1 and "run.json written" in outputs[0]
    run_dir = tmp_path / RUN / "fold0"
    assert not (run_dir / "train_ddp_process_1.log").exists()  # SLURM started the ranks, not Lightning
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    run = json.loads((run_dir / "run.json").read_text())
    assert (run["epochs_trained"], run["global_step"]) == (2, 4)


@pytest.mark.slow
def test_multirun_with_ddp_is_refused_before_any_rank_starts(synthetic_root, tmp_path):
    result = _train(["-m", "fold=0", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                     *_smoke(synthetic_root, tmp_path)], cwd=tmp_path, check=False)
    assert result.returncode != 0
    message = result.stderr
    assert "LaunchError: Hydra multirun (-m) job #0" in message
    assert "hydra/launcher=submitit_slurm" in message and "without -m" in message
    assert not list(tmp_path.rglob("run.json")) and not list(tmp_path.rglob("train_ddp_process_1.log"))


# ------------------------------------------------------------------------------ SLURM requeue and resume
@pytest.mark.slow
def test_slurm_signal_saves_requeues_and_the_job_resumes(synthetic_root, tmp_path):
    """SLURM's pre-timeout SIGUSR1 -> Lightning saves hpc_ckpt_1.ckpt and calls `scontrol requeue 4242`
    (a fake scontrol that, like SLURM, then terminates the job); the requeued job resumes from it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\nkill -TERM $PPID\n')
    scontrol.chmod(0o755)
    env = {**_no_cluster_env(), **SLURM_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "SCONTROL_LOG": str(tmp_path / "scontrol.log"), "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    args = [sys.executable, str(REPO / "train.py"), *_smoke(synthetic_root, tmp_path), "pipeline.epochs=4",
            "trainer.accelerator=cpu", "logger=csv"]
    run_dir = tmp_path / RUN / "fold0"
    last = run_dir / "checkpoints" / "last.ckpt"
    with open(tmp_path / "first.log", "w") as out:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not last.exists():  # epoch 0 done: the signal arrives during training
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.02)
        epoch0 = last.stat().st_mtime
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=240)
    first = (tmp_path / "first.log").read_text()
    assert "SLURM auto-requeueing enabled" in first and "Requeued SLURM job: 4242" in first
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert not (run_dir / "run.json").exists()  # the job stopped early
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    saved = torch.load(hpc, map_location="cpu", weights_only=False)
    assert saved["global_step"] >= 2 and hpc.stat().st_mtime >= epoch0
    # scontrol's SIGTERM then stops the job (train.py writes last.ckpt there, at or after the hpc checkpoint)
    resume_from = max([hpc, last], key=lambda p: p.stat().st_mtime_ns)

    # the requeued job (same command): resumes from the signal's checkpoint and finishes the schedule
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resuming from {resume_from}" in again.stdout + again.stderr
    run = json.loads((run_dir / "run.json").read_text())
    assert (run["epochs_trained"], run["global_step"]) == (4, 8)  # 4 epochs x 2 steps, none repeated
    assert not hpc.exists()  # superseded by last.ckpt once the run finished


# ----------------------------------------------------------------------------------- launcher presets
@pytest.mark.slow
def test_slurm_preset_composes(tmp_path, monkeypatch):
    env = {**_no_cluster_env(), "SBATCH_PARTITION": "gpu-a100", "SBATCH_ACCOUNT": "brats",
           "BRATS_SLURM_GPUS": "2", "BRATS_SLURM_TIME_MIN": "2880"}
    shown = subprocess.run([sys.executable, str(REPO / "train.py"), "hydra/launcher=submitit_slurm",
                            "--cfg", "hydra"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr[-3000:]
    hydra_cfg = OmegaConf.create(shown.stdout)
    launcher = hydra_cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.signal_delay_s == 120 and launcher.max_num_timeout == 0
    assert "validated against ConfigStore schema" not in shown.stderr  # silenced in train.py: complete file
    resolved = subprocess.run([sys.executable, str(REPO / "train.py"), "hydra/launcher=submitit_slurm",
                               "--cfg", "all", "--package", "hydra.launcher", "--resolve"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert resolved.returncode == 0, resolved.stderr[-3000:]
    params = OmegaConf.to_container(OmegaConf.create(resolved.stdout))
    assert {k: params[k] for k in ("partition", "account", "qos", "gpus_per_node", "tasks_per_node",
                                   "timeout_min", "cpus_per_task", "mem_gb")} == {
        "partition": "gpu-a100", "account": "brats", "qos": None, "gpus_per_node": 2, "tasks_per_node": 2,
        "timeout_min": 2880, "cpus_per_task": 8, "mem_gb": 64}
    assert params["additional_parameters"] == {"signal": "USR1@120", "requeue": True}
    assert params["submitit_folder"] == "outputs/default/.submitit/%j"

    # what submitit writes for sbatch from these parameters (the plugin's launch() mapping); submitit only
    # needs an `srun` on PATH to build it
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    params.pop("_target_")
    executor = submitit.AutoExecutor(folder=tmp_path / "sub", cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("--signal=USR1@120", "--requeue", "--gpus-per-node=2", "--ntasks-per-node=2",
                 "--partition=gpu-a100", "--account=brats", "--time=2880", "--cpus-per-task=8", "--mem=64GB"):
        assert f"#SBATCH {line}\n" in script
    assert "USR2" not in script  # submitit's own signal is replaced by Lightning's


@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/\w+' is validated against ConfigStore schema")
def test_ddp_and_local_presets_compose(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=ddp", "hydra/launcher=joblib", "hydra.launcher.n_jobs=3"],
                      return_hydra_config=True)
        local = compose("train", overrides=["hydra/launcher=submitit_local"], return_hydra_config=True)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    devices = int(os.environ["SLURM_NTASKS_PER_NODE"]) if "SLURM_NTASKS_PER_NODE" in os.environ else "auto"
    assert (trainer["strategy"], trainer["sync_batchnorm"], trainer["devices"]) == ("ddp", False, devices)
    assert trainer["precision"] == "16-mixed" and trainer["num_sanity_val_steps"] == 0  # default.yaml's keys
    assert cfg.hydra.launcher.n_jobs == 3 and cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert local.hydra.launcher.tasks_per_node == 1
    assert local.hydra.launcher._target_.endswith("LocalLauncher")
