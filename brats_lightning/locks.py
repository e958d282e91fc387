"""One job per output folder: a lock file naming the job that writes a run or prediction folder.

``train.py`` holds its run folder, ``predict`` and ``merge`` their output folder, for as long as they write
there. The lock is a small JSON file ``<folder>/.brats-lightning.lock`` (docs/contracts.md "Folder lock")
with the holder's pid, host, process start time, start date, command line and SLURM job id. A second job
on the same folder is refused at once with a :class:`FolderLocked` error (a UserError: exit 2) that names
the running job. The lock is released when the job ends; a lock left by a killed job is taken over when
it is stale: on this host when its pid is dead (or now belongs to another process: the start times
differ), on any host when it was written by the same SLURM job (a requeued job resumes its own folder). A
lock written on another host by a job that is not ours can't be checked from here: the message says to
delete the file if that job is gone.

The file is created with ``O_CREAT | O_EXCL`` (atomic, also on NFS), so two jobs starting together can't
both take a free folder; a stale lock is taken over under an ``flock`` on ``<lock>.guard``, so two jobs
can't both take over the same stale lock.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from brats_lightning.errors import UserError

LOCK_NAME = ".brats-lightning.lock"


class FolderLocked(UserError):
    """Another job holds the folder; the message names it (pid, host, start time, command)."""


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux ``/proc/<pid>/stat`` field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the command name, which may hold spaces


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this host (also when it belongs to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            f"{', SLURM job ' + str(holder['slurm_job_id']) if holder.get('slurm_job_id') else ''}: "
            f"{holder.get('command', '?')}")


class FolderLock:
    """The lock of one folder for one job (see the module doc); use :func:`hold_folder`.

    Args:
        folder: the folder the job writes (created if missing).
        what: the job's kind, for messages ("train", "predict", "merge").
    """

    def __init__(self, folder: str | Path, what: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.held = False

    def _record(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "process_start": _process_start(pid),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": self.what,
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID")}

    def _read(self) -> dict | None:
        """The holder's record; None when there is no lock file. A file still being written reads as {}."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def _stale(self, holder: dict) -> bool:
        """True when the holder is certainly gone (see the module doc)."""
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job_id") == job:
            return True
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        pid = holder["pid"]
        if pid == os.getpid():
            return True  # left by this process (an earlier job in it that raised before releasing)
        if not pid_alive(pid):
            return True
        start = _process_start(pid)
        return start is not None and holder.get("process_start") not in (None, start)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(self._record()) + "\n")
        return True

    def acquire(self) -> FolderLock:
        """Take the lock (taking over a stale one).

        Raises:
            FolderLocked: a live job holds the folder.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        for _attempt in range(50):
            if self._create():
                self.held = True
                atexit.register(self.release)
                return self
            holder = self._read()
            if holder == {} and time.time() - self._mtime() < 5:
                time.sleep(0.05)  # being written right now by a job that just created it
                continue
            if holder is None or holder == {} or self._stale(holder):
                self._take_over(holder)
                continue
            raise FolderLocked(
                f"{self.folder}: another job is writing this folder ({_describe(holder)}); expected one "
                f"{self.what} job per folder: wait for it to finish or use another folder (if that job is no "
                f"longer running, e.g. its machine went down, delete {self.path})")
        raise FolderLocked(f"{self.folder}: could not take {self.path}: other jobs keep taking it; retry")

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _take_over(self, seen: dict | None) -> None:
        """Remove the stale lock ``seen`` unless another job replaced it meanwhile (under the guard flock)."""
        with open(self.path.with_name(self.path.name + ".guard"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if self._read() == seen:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    def release(self) -> None:
        """Remove the lock file if this process still holds it."""
        if not self.held:
            return
        self.held = False
        atexit.unregister(self.release)
        holder = self._read()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


@contextlib.contextmanager
def hold_folder(folder: str | Path, what: str) -> Iterator[FolderLock]:
    """Hold ``folder``'s lock for the ``with`` block (see :class:`FolderLock`).

    Raises:
        FolderLocked: a live job holds the folder.
    """
    lock = FolderLock(folder, what).acquire()
    try:
        yield lock
    finally:
        lock.release()
