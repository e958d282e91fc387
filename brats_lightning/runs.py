"""The run folder, written by training and read by inference: ``run.json``, the W&B run id, ``metrics.csv``.

Every trained run writes a small ``run.json`` (pipeline, fold, model, checkpoints, validation metrics; its
keys are in docs/contracts.md, "run.json") so that inference can find and choose runs without anyone typing
checkpoint paths. The paper's ensembles are: pipeline A, the best two of three models per fold (paper
section 2.6: "best two models of each fold"); pipeline B, all five fold models. Ranking uses the validation
Dice (``val_metrics.dice_mean``), or the fast-SWA ("self-ensembled") weights' validation Dice when the run has
an SWA checkpoint (paper section 2.5), in which case the SWA weights are the ones loaded.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import os
import pickle
import re
import secrets
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.loggers.logger import rank_zero_experiment
from lightning_fabric.utilities.logger import _add_prefix
from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from torch import nn

from brats_lightning.data.io import atomic_path

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
WANDB_ID_FILE = "wandb_id.txt"
FINGERPRINT_FILE = "fingerprint.json"
REQUIRED_KEYS = (  # what inference needs of run.json (docs/contracts.md)
    "pipeline", "model", "fold", "normalization", "label_convention", "channels", "model_config",
    "checkpoints",
)


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

    def drop_rows_from(self, step: int) -> int:
        """Delete the rows of ``metrics.csv`` logged at ``step`` or later; returns how many were dropped.

        A job resumed from a checkpoint taken at trainer step ``step`` logs those steps again, so the rows
        that a killed job wrote after its last checkpoint would otherwise appear twice (docs/contracts.md,
        "Run folder").
        """
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if not path.is_file():
            return 0
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames or [], list(reader)
        kept = [r for r in rows if r.get("step") in (None, "") or int(r["step"]) < step]
        if len(kept) < len(rows):
            with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(kept)
            log.info("%s: dropped %d row(s) logged after the checkpoint (step >= %d)", path,
                     len(rows) - len(kept), step)
        return len(rows) - len(kept)


class ResumableWandbLogger(WandbLogger):
    """WandbLogger whose W&B step is the trainer's step (Lightning's logs W&B's own call counter), so a job
    resumed from a checkpoint continues the W&B history at the checkpoint's step, as an uninterrupted job
    would; :meth:`mark_resumed` records where (config ``resumed_from``)."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is None:
            super().log_metrics(metrics, step)
            return
        metrics = _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR)
        self.experiment.log({**metrics, "trainer/global_step": step}, step=int(step))

    def mark_resumed(self, step: int, checkpoint: str | Path) -> None:
        """Record in the W&B config that this process resumed the run from ``checkpoint`` at ``step``."""
        self.experiment.config.update({"resumed_from": {"step": int(step), "checkpoint": str(checkpoint)}},
                                      allow_val_change=True)


# ------------------------------------------------------------------------------------------ fingerprint
#: Config keys (and key prefixes) that may change between a job and its resume without making it another
#: run: where and how it runs, what it logs, how fast; never what it trains on or how it learns.
RESUMABLE_KEYS = (
    "resume", "paths", "logger", "speed", "validation.hd95",
    "callbacks.progress_bar", "callbacks.overlays", "callbacks.lr_monitor",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.benchmark",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "data.root", "data.cache_dir", "data.num_workers", "data.check",
)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping) and node:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def _resumable(key: str) -> bool:
    # *.dirpath: callbacks' folders inside the run folder, which may have moved since
    return key.endswith(".dirpath") or any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_fingerprint(config: Mapping[str, Any], root: str | Path, case_ids: Sequence[str],
                    label_convention: str, split_file: str | Path) -> dict[str, Any]:
    """What makes a run this run: the resolved config minus :data:`RESUMABLE_KEYS`, flattened to dotted
    keys, and the data set's identity (root, case list, label convention, split file content)."""
    ids = sorted(map(str, case_ids))
    data = {"dataset.root": str(Path(root).resolve()), "dataset.n_cases": len(ids),
            "dataset.cases_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
            "dataset.label_convention": label_convention, "dataset.split_sha256": sha256_file(split_file)}
    return {**{k: v for k, v in _flatten(config).items() if not _resumable(k)}, **data}


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs (or that only one side has), sorted."""
    missing = "(unset)"
    return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}" for k in sorted(set(old) | set(new))
            if old.get(k, missing) != new.get(k, missing)]


def read_fingerprint(run_dir: str | Path) -> dict[str, Any] | None:
    """``<run_dir>/fingerprint.json``, or None when the run folder has none (a new run)."""
    path = Path(run_dir) / FINGERPRINT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_fingerprint(run_dir: str | Path, fingerprint: Mapping[str, Any]) -> Path:
    """Write ``<run_dir>/fingerprint.json`` atomically (sorted keys); returns its path."""
    path = Path(run_dir) / FINGERPRINT_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True, default=str) + "\n")
    return path


@dataclass(frozen=True)
class Run:
    """One trained run: its ``run.json`` content and where that file lives.

    Attributes:
        path: the ``run.json`` file.
        info: its parsed content.
    """

    path: Path
    info: dict = field(hash=False, compare=False)

    @property
    def pipeline(self) -> str:
        return str(self.info["pipeline"])

    @property
    def model(self) -> str:
        return str(self.info["model"])

    @property
    def fold(self) -> int:
        return int(self.info["fold"])

    @property
    def normalization(self) -> str:
        return str(self.info["normalization"])

    @property
    def label_convention(self) -> str:
        return str(self.info["label_convention"])

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self.info["channels"])

    @property
    def val_cases(self) -> tuple[str, ...]:
        return tuple(self.info.get("val_cases") or ())

    @property
    def name(self) -> str:
        """Short name for messages: ``<pipeline>/<model>/fold<k> (<run dir>)``."""
        return f"{self.pipeline}/{self.model}/fold{self.fold} ({self.path.parent})"

    @property
    def has_swa(self) -> bool:
        """Whether the run saved fast-SWA ("self-ensembled") weights."""
        return bool((self.info.get("checkpoints") or {}).get("swa"))

    @property
    def score(self) -> float | None:
        """Validation mean Dice used for ranking: the SWA weights' when they exist and were scored."""
        metrics = None
        if self.has_swa and self.info.get("val_metrics_swa"):
            metrics = self.info["val_metrics_swa"]
        elif self.info.get("val_metrics"):
            metrics = self.info["val_metrics"]
        if not metrics or metrics.get("dice_mean") is None:
            return None
        return float(metrics["dice_mean"])

    def checkpoint_name(self, which: str = "auto") -> str:
        """The checkpoint ``which`` names: itself, or for "auto" swa if the run has one, else best, last."""
        if which != "auto":
            return which
        checkpoints = self.info.get("checkpoints") or {}
        return next((k for k in ("swa", "best", "last") if checkpoints.get(k)), "best")

    def checkpoint_path(self, which: str = "auto") -> Path:
        """Path of the checkpoint ``which`` ("auto" = swa if present, else best, else last).

        run.json stores absolute paths; when the outputs folder has moved, the checkpoint is looked up
        in ``checkpoints/`` next to run.json instead.
        """
        checkpoints = self.info.get("checkpoints") or {}
        which = self.checkpoint_name(which)
        stored = checkpoints.get(which)
        if not stored:
            raise FileNotFoundError(
                f"run {self.name}: run.json ({self.path}) lists no {which!r} checkpoint; "
                f"it has {sorted(k for k, v in checkpoints.items() if v)}"
            )
        candidates = [Path(stored), self.path.parent / "checkpoints" / Path(stored).name,
                      self.path.parent / stored]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"run {self.name}: checkpoint {which!r} not found (looked at {[str(c) for c in candidates]}); "
            "was the run folder moved or cleaned?"
        )


def read_run(path: str | Path) -> Run:
    """Parse one ``run.json`` and check it has the keys inference needs."""
    path = Path(path)
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected a run.json written by train.py") from err
    missing = [k for k in REQUIRED_KEYS if k not in info]
    if missing:
        raise ValueError(f"{path}: run.json lacks {missing}; expected the keys in docs/contracts.md")
    return Run(path=path, info=info)


def find_runs(
    outputs: str | Path,
    pipeline: str | None = None,
    model: str | None = None,
    folds: Iterable[int] | None = None,
) -> list[Run]:
    """All runs under ``outputs`` (any depth), optionally filtered, sorted by (pipeline, model, fold, path).

    Args:
        outputs: a run folder or a folder of run folders (searched recursively for run.json).
        pipeline: keep only this pipeline ("A" or "B").
        model: keep only this model name (run.json "model").
        folds: keep only these folds.
    """
    outputs = Path(outputs)
    if outputs.is_file() and outputs.name == "run.json":
        paths = [outputs]
    elif outputs.is_dir():
        paths = sorted(outputs.rglob("run.json"))
    else:
        raise FileNotFoundError(f"{outputs}: no such folder; expected the training outputs folder")
    runs = [read_run(p) for p in paths]
    fold_set = None if folds is None else {int(f) for f in folds}
    runs = [
        r for r in runs
        if (pipeline is None or r.pipeline == pipeline)
        and (model is None or r.model == model)
        and (fold_set is None or r.fold in fold_set)
    ]
    return sorted(runs, key=lambda r: (r.pipeline, r.model, r.fold, str(r.path)))


def select_runs(runs: Sequence[Run], rule: str = "all") -> list[Run]:
    """Choose an ensemble from ``runs``.

    Args:
        runs: candidate runs (typically one pipeline).
        rule: "all", or "best<k>" (e.g. "best2", the paper's pipeline A rule): the k runs with the highest
            validation Dice in each fold (SWA weights' Dice when present).

    Returns:
        The chosen runs, sorted by (fold, -score) for best-k or in input order for "all".
    """
    if rule == "all":
        return list(runs)
    match = re.fullmatch(r"best(\d+)", rule)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"unknown run selection rule {rule!r}; expected 'all' or 'best<k>' such as 'best2'")
    k = int(match.group(1))
    unscored = [r.name for r in runs if r.score is None]
    if unscored:
        raise ValueError(
            f"selection {rule!r} ranks runs by val_metrics.dice_mean, but these runs have none: {unscored}. "
            "Finish or re-validate them, or use --select all."
        )
    by_fold: dict[int, list[Run]] = defaultdict(list)
    for run in runs:
        by_fold[run.fold].append(run)
    chosen = []
    for fold in sorted(by_fold):
        ranked = sorted(by_fold[fold], key=lambda r: (-r.score, str(r.path)))
        if len(ranked) < k:
            log.warning("fold %d has %d runs, fewer than the %d asked for by %r: using all of them",
                        fold, len(ranked), k, rule)
        chosen += ranked[:k]
    return chosen


def check_compatible(runs: Sequence[Run]) -> None:
    """Refuse ensembles whose members disagree on label convention, input channels or normalization.

    All members of one ensemble see the same preprocessed input and produce the same label codes, so
    they must share ``label_convention``, ``channels`` and ``normalization`` (one pipeline).
    """
    if not runs:
        raise ValueError("no runs to ensemble")
    for key in ("label_convention", "channels", "normalization"):
        groups: dict[object, list[str]] = defaultdict(list)
        for run in runs:
            groups[getattr(run, key)].append(run.name)
        if len(groups) > 1:
            detail = "; ".join(f"{value}: {names}" for value, names in groups.items())
            hint = " (pass --pipeline A or B)" if key == "normalization" else ""
            raise ValueError(f"runs differ in {key}, cannot ensemble them{hint}: {detail}")


def load_network(run: Run, checkpoint: str = "auto", device: str | torch.device = "cpu") -> nn.Module:
    """Build the run's network from ``run.json["model_config"]`` and load its checkpoint, in eval mode.

    Args:
        run: the run.
        checkpoint: "auto" (swa, else best, else last), "best", "last" or "swa".
        device: where to put the network.

    Returns:
        The network (``state_dict`` keys ``net.<param>`` with the prefix stripped), eval mode.
    """
    import hydra.utils

    net = hydra.utils.instantiate(run.info["model_config"])
    path = run.checkpoint_path(checkpoint)
    try:  # our checkpoints hold tensors and plain types only: nothing is unpickled beyond them
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # e.g. older checkpoints with OmegaConf hyper-parameters
        found = re.search(r"GLOBAL (\S+)", str(err))
        log.warning("run %s: %s holds Python objects besides tensors (%s); loading it with "
                    "weights_only=False, which runs code from the file: use only checkpoints you trust "
                    "(`brats-lightning export` writes a pickle-free package)", run.name, path,
                    found.group(1) if found else "not only tensors")
        state = torch.load(path, map_location="cpu", weights_only=False)
    state_dict = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f"run {run.name}: {path} holds no state_dict; expected a Lightning checkpoint")
    net_state = {k[len("net."):]: v for k, v in state_dict.items() if k.startswith("net.")}
    if not net_state:
        raise ValueError(
            f"run {run.name}: {path} has no 'net.*' keys (found e.g. {list(state_dict)[:3]}); "
            "expected a BratsModule checkpoint"
        )
    try:
        net.load_state_dict(net_state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"run {run.name}: checkpoint {path} does not fit model_config {run.info['model_config']}: {err}"
        ) from err
    return net.to(device).eval()
