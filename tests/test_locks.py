"""One job per output folder (brats_lightning/locks.py), with real processes: a live holder refuses a second
job and is named; a killed holder's lock is taken over; jobs racing for a free folder get it once; train.py
is refused on a held run folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brats_lightning.locks import LOCK_NAME, FolderLock, FolderLocked, hold_folder

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from brats_lightning.locks import hold_folder
with hold_folder(sys.argv[1], "predict"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(folder: Path, seconds: float = 60) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_live_holder_refuses_and_is_named_then_killed_lock_is_taken_over(tmp_path):
    proc = _holder(tmp_path / "out")
    try:
        record = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
        assert record["pid"] == proc.pid and record["host"] == socket.gethostname()
        with pytest.raises(FolderLocked, match=f"pid {proc.pid} on {socket.gethostname()}") as info:
            FolderLock(tmp_path / "out", "merge").acquire()
        assert "one merge job per folder" in str(info.value) and "-c" in str(info.value)
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup: the lock file stays behind, stale
        proc.wait()
    assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["pid"] == proc.pid
    with hold_folder(tmp_path / "out", "merge") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # released on exit


def test_clean_exit_releases(tmp_path):
    proc = _holder(tmp_path / "out", seconds=0)
    assert proc.wait(timeout=60) == 0
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def _write_lock(folder: Path, **record) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(record))


def test_stale_rules(tmp_path, monkeypatch):
    here = socket.gethostname()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path / "reused", pid=other.pid, host=here, process_start=1)  # pid now another process
        FolderLock(tmp_path / "reused", "train").acquire().release()
        _write_lock(tmp_path / "alive", pid=other.pid, host=here, process_start=None, command="python x")
        with pytest.raises(FolderLocked, match="python x"):
            FolderLock(tmp_path / "alive", "train").acquire()
    finally:
        other.kill()
        other.wait()
    _write_lock(tmp_path / "remote", pid=1, host="node-17", started="2026-01-01T00:00:00")
    with pytest.raises(FolderLocked, match=f"pid 1 on node-17.*delete {tmp_path / 'remote' / LOCK_NAME}"):
        FolderLock(tmp_path / "remote", "train").acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a requeued SLURM job takes its own lock over, on any node
    _write_lock(tmp_path / "requeued", pid=1, host="node-17", slurm_job_id="4242")
    lock = FolderLock(tmp_path / "requeued", "train").acquire()
    assert json.loads(lock.path.read_text())["slurm_job_id"] == "4242"
    lock.release()


RACE = """
import sys, time
from brats_lightning.locks import FolderLock, FolderLocked
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    lock = FolderLock(sys.argv[1], "predict").acquire()
except FolderLocked:
    print("refused")
else:
    print("held", flush=True)
    time.sleep(1.5)
    lock.release()
"""


def test_racing_jobs_take_a_free_folder_once(tmp_path):
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / "out"), str(start)],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outputs == ["held", "refused", "refused", "refused"]


@pytest.mark.slow
def test_second_train_job_on_a_run_folder_is_refused(tmp_path):
    """train.py exits 2 at start, before touching data, naming the job that holds the run folder."""
    run_dir = tmp_path / "outputs" / "fold0"
    proc = _holder(run_dir)
    try:
        env = dict(os.environ, WANDB_MODE="disabled")
        result = subprocess.run(
            [sys.executable, str(REPO / "train.py"), "experiment=smoke", f"hydra.run.dir={run_dir}",
             f"paths.data_dir={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"another job is writing this folder (pid {proc.pid}" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "data").exists() and not (tmp_path / "cache").exists()
