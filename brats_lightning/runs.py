"""The run folder: ``run.json`` (written at the end of a run), the persisted W&B run id, the CSV log.

DESIGN.md "Data flow": every trained run writes a small ``run.json`` (pipeline, fold, model, checkpoints,
validation metrics; keys in CONTRACTS.md "Training") so that inference can find and choose runs without
anyone typing checkpoint paths. Reading it belongs to :mod:`brats_lightning.inference.runs`.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import secrets
import string
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from brats_lightning.data.io import atomic_path

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
WANDB_ID_FILE = "wandb_id.txt"


def merge_records(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: ``extra``'s values win, nested dicts are merged key by key (neither input is modified).

    Example: ``merge_records({"checkpoints": {"best": "b", "swa": None}}, {"checkpoints": {"swa": "s"}})``
    -> ``{"checkpoints": {"best": "b", "swa": "s"}}``.
    """
    merged = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_records(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def callback_records(callbacks: Iterable[Any]) -> dict[str, Any]:
    """Merge the dicts returned by every callback that defines ``run_record()`` (e.g. fast SWA's
    ``{"checkpoints": {"swa": ...}, "val_metrics_swa": {...}}``), in callback order."""
    record: dict[str, Any] = {}
    for callback in callbacks:
        method = getattr(callback, "run_record", None)
        if callable(method):
            extra = method()
            if extra:
                record = merge_records(record, extra)
    return record


def write_run_record(run_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Write ``<run_dir>/run.json`` atomically (JSON, sorted keys, indented); returns its path."""
    path = Path(run_dir) / RUN_FILE
    text = json.dumps(record, indent=2, sort_keys=True, default=str)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return path


def wandb_run_id(run_dir: str | Path) -> str:
    """The run folder's W&B run id: read from ``<run_dir>/wandb_id.txt``, or created and saved there.

    Re-running the same job (same folder) resumes the same W&B run; different folds/jobs get different ids.
    """
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    alphabet = string.ascii_lowercase + string.digits  # W&B run ids: letters and digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(12))
    with atomic_path(path) as tmp:
        tmp.write_text(run_id + "\n")
    return run_id


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps (appends to) an existing ``metrics.csv`` instead of deleting it.

    A job killed while appending leaves a partial last row: it is cut off when the job resumes. A header
    change (a new metric) rewrites the file through a temporary file renamed into place (Lightning rewrites
    it in place, so a kill then could truncate the whole history).
    """

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                keep = data[: data.rfind(b"\n") + 1]
                with atomic_path(path) as tmp:
                    tmp.write_bytes(keep)
                log.warning("%s: dropped a partial last row (%d bytes) left by an interrupted write", path,
                            len(data) - len(keep))
            with open(path, newline="") as f:
                header = f.readline().strip()
            self.metrics_keys = sorted(k for k in header.split(",") if k)

    def save(self) -> None:
        """Lightning's ``save``, except that the header on disk is compared with the keys every time.

        Lightning extends its key list before it rewrites the header; a job interrupted during that rewrite
        (e.g. the SIGTERM of a SLURM requeue) then appends its last rows, when the logger is finalized, under
        the old, shorter header. Re-reading the header makes the rows and the header always agree.
        """
        if not self.metrics:
            return
        self._record_new_keys()
        path = Path(self.metrics_file_path)
        if path.is_file():
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != self.metrics_keys:
                self._rewrite_with_new_header(self.metrics_keys)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            if f.tell() == 0:
                writer.writeheader()
            writer.writerows(self.metrics)
        self.metrics = []

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            metrics = list(csv.DictReader(f))
        with atomic_path(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(metrics)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger writing ``<save_dir>/metrics.csv`` (no version sub-folders) that appends when a resumed job
    finds the previous ``metrics.csv`` (Lightning's CSVLogger deletes it)."""

    def __init__(self, save_dir: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, name="", version="", **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
