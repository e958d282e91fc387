"""Patient filtering: per-case training losses, and the `flag-cases` command that turns them into an
exclusion list (paper section 2.6 / docs/method.md "Training").

Paper: "cases with high training loss at the end of the training procedure were flagged as potentially wrong
and removed from the complete training set, thus creating a 'cleaned' version of the training dataset".

1. :class:`CaseLossRecorder` (``'callbacks=[default,case_losses]'``) writes ``case_losses.csv`` in the run
   folder (columns ``epoch, case_id, loss``): the main-output Dice loss of every training case (its random
   crop, augmented) in each of the last ``last_epochs`` epochs, from ``training_step``'s ``case_losses``.
2. ``brats-lightning flag-cases RUN_DIR... --out FILE [--quantile Q | --threshold T] [--last-epochs N]``
   scores each case by its mean loss over the last N recorded epochs of each run, averaged over the runs that
   trained on it (a case is in the training set of 4 of 5 folds), and flags the cases scoring above the
   threshold (``--threshold T``) or above the ``Q`` quantile of all scores (``--quantile``, default 0.9).
   ``FILE.json`` gets ``{"exclude": [...], "rule": {...}, "runs": [...], "scores": {...}}``; any other name
   gets one case id per line and the rule, runs and scores in ``<name>.meta.json`` beside it (the whole
   name plus ``.meta.json``: ``excluded.txt`` -> ``excluded.txt.meta.json``).
3. ``python train.py data.exclude=FILE ...`` trains on the cleaned set: the listed cases leave the training
   folds only, validation keeps them (:func:`brats_lightning.data.splits.fold_case_ids`); run.json records
   the excluded ids, the file and its rule.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from brats_lightning.data.io import atomic_path

log = logging.getLogger(__name__)

CSV_NAME = "case_losses.csv"
COLUMNS = ("epoch", "case_id", "loss")
DEFAULT_QUANTILE = 0.9


class CaseLossRecorder(pl.Callback):
    """Record each training case's main-output loss in the last ``last_epochs`` epochs (``case_losses.csv``).

    The CSV is rewritten atomically at the end of every training epoch from the rows kept in the callback's
    state (saved in checkpoints), so a resumed run continues it and a killed run leaves a complete file.

    Args:
        last_epochs: epochs kept (the latest ones; None keeps every epoch).
        dirpath: folder of the CSV (None: the trainer's ``default_root_dir``, the run folder in train.py).
        filename: CSV name.
    """

    def __init__(self, last_epochs: int | None = 10, dirpath: str | Path | None = None,
                 filename: str = CSV_NAME) -> None:
        super().__init__()
        if last_epochs is not None and int(last_epochs) < 1:
            raise ValueError(f"case losses: last_epochs={last_epochs}; expected >= 1 or null (every epoch)")
        self.last_epochs = None if last_epochs is None else int(last_epochs)
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.filename = filename
        self.rows: list[tuple[int, str, float]] = []  # (epoch, case id, loss) of the kept epochs
        self._epoch_rows: list[tuple[int, str, float]] = []

    def path(self, trainer: pl.Trainer) -> Path:
        """Where the CSV goes."""
        return (self.dirpath if self.dirpath is not None else Path(trainer.default_root_dir)) / self.filename

    def _first_kept_epoch(self, epoch: int, max_epochs: int | None) -> int:
        if self.last_epochs is None:
            return 0
        if max_epochs is not None and max_epochs > 0:
            return max(0, min(epoch, max_epochs - 1) - self.last_epochs + 1)
        return max(0, epoch - self.last_epochs + 1)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_rows = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        """Keep the batch's per-case losses (``outputs["case_losses"]``, ``outputs["case_id"]``)."""
        epoch = trainer.current_epoch
        if epoch < self._first_kept_epoch(epoch, trainer.max_epochs):
            return
        if not isinstance(outputs, dict) or "case_losses" not in outputs or outputs.get("case_id") is None:
            found = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
            raise ValueError(
                f"CaseLossRecorder needs training_step to return {{'loss', 'case_losses', 'case_id'}} (as "
                f"BratsModule does), found {found}")
        losses = outputs["case_losses"].detach().float().cpu().reshape(-1).tolist()
        ids = [str(c) for c in outputs["case_id"]]
        if len(losses) != len(ids):
            raise ValueError(f"CaseLossRecorder: {len(losses)} case losses for {len(ids)} case ids {ids}")
        self._epoch_rows.extend((epoch, case, loss) for case, loss in zip(ids, losses, strict=True))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Add the epoch's rows (from every rank), drop epochs out of the window, rewrite the CSV."""
        epoch = trainer.current_epoch
        rows = self._epoch_rows
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            gathered: list[list[tuple[int, str, float]]] = [[] for _ in range(trainer.world_size)]
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        first = self._first_kept_epoch(epoch, trainer.max_epochs)
        latest = {(e, c): v for e, c, v in rows}  # a case seen twice in one epoch (mid-epoch resume): last
        self.rows = sorted([r for r in self.rows if first <= r[0] != epoch]
                           + [(e, c, v) for (e, c), v in latest.items()])
        self._epoch_rows = []
        if trainer.is_global_zero and self.rows:
            write_case_losses(self.path(trainer), self.rows)

    def state_dict(self) -> dict[str, Any]:
        # epoch_rows: the epoch in progress, for checkpoints written mid-epoch (SLURM requeue, hpc_ckpt)
        return {"rows": [list(r) for r in self.rows], "epoch_rows": [list(r) for r in self._epoch_rows],
                "last_epochs": self.last_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [(int(e), str(c), float(v)) for e, c, v in state_dict["rows"]]
        self._epoch_rows = [(int(e), str(c), float(v)) for e, c, v in state_dict.get("epoch_rows", [])]


def write_case_losses(path: str | Path, rows: Iterable[tuple[int, str, float]]) -> Path:
    """Write ``epoch, case_id, loss`` rows to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows((e, c, repr(float(v))) for e, c, v in rows)
    return path


def find_case_loss_files(run_dirs: Sequence[str | Path]) -> list[Path]:
    """The ``case_losses.csv`` of each run folder (or of every run below a folder of runs), sorted.

    Raises:
        FileNotFoundError: a folder without any.
    """
    files: list[Path] = []
    for run_dir in map(Path, run_dirs):
        direct = run_dir / CSV_NAME
        found = [direct] if direct.is_file() else sorted(run_dir.rglob(CSV_NAME)) if run_dir.is_dir() else []
        if not found:
            raise FileNotFoundError(
                f"{run_dir}: no {CSV_NAME} found (in the folder or below it); train with the case-loss "
                "recorder on: python train.py 'callbacks=[default,case_losses]' ...")
        files.extend(found)
    return sorted(set(f.resolve() for f in files))


def read_case_losses(path: str | Path) -> list[tuple[int, str, float]]:
    """Rows ``(epoch, case_id, loss)`` of one ``case_losses.csv``.

    Raises:
        ValueError: other columns.
    """
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames}, expected {list(COLUMNS)} "
                             "(written by CaseLossRecorder)")
        return [(int(r["epoch"]), r["case_id"], float(r["loss"])) for r in reader]


def run_case_scores(rows: Sequence[tuple[int, str, float]],
                    last_epochs: int | None = None) -> dict[str, float]:
    """Mean loss per case over the run's last ``last_epochs`` recorded epochs (None: every recorded epoch)."""
    if not rows:
        return {}
    last = max(r[0] for r in rows)
    first = -1 if last_epochs is None else last - int(last_epochs) + 1
    losses: dict[str, list[float]] = defaultdict(list)
    for epoch, case, loss in rows:
        if epoch >= first:
            losses[case].append(loss)
    return {case: float(np.mean(values)) for case, values in sorted(losses.items())}


def case_scores(files: Sequence[str | Path], last_epochs: int | None = None) -> dict[str, float]:
    """Score per case: :func:`run_case_scores` of each run, averaged over the runs that trained on it."""
    per_case: dict[str, list[float]] = defaultdict(list)
    for path in files:
        for case, score in run_case_scores(read_case_losses(path), last_epochs).items():
            per_case[case].append(score)
    return {case: float(np.mean(values)) for case, values in sorted(per_case.items())}


def flag_cases(scores: dict[str, float], quantile: float | None = None,
               threshold: float | None = None) -> tuple[list[str], float]:
    """Cases whose score is strictly above ``threshold``, or above the ``quantile`` of all scores
    (``numpy.quantile``, linear interpolation; default 0.9 when neither is given).

    Returns:
        ``(flagged case ids sorted, the cut-off used)``.

    Raises:
        ValueError: both or an out-of-range quantile given, or no scores.
    """
    if quantile is not None and threshold is not None:
        raise ValueError("give either a quantile or a threshold, not both")
    if not scores:
        raise ValueError("no case losses to flag from (the CSVs are empty)")
    if threshold is None:
        q = DEFAULT_QUANTILE if quantile is None else float(quantile)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {quantile} outside [0, 1]")
        cut = float(np.quantile(np.array(list(scores.values()), dtype=np.float64), q))
    else:
        cut = float(threshold)
    return sorted(c for c, s in scores.items() if s > cut), cut


def write_exclusion_list(out: str | Path, flagged: Sequence[str], meta: dict[str, Any]) -> list[Path]:
    """Write the list: ``*.json`` -> ``{"exclude": [...], **meta}``; else one id a line + ``<out>.meta.json``.
    Both forms are read by ``data.exclude`` (:func:`brats_lightning.data.datamodule.read_exclusions`).

    Returns:
        The files written.
    """
    out = Path(out)
    record = {"exclude": list(flagged), **meta}
    text = json.dumps(record, indent=2) + "\n"
    if out.suffix == ".json":
        with atomic_path(out) as tmp:
            tmp.write_text(text)
        return [out]
    meta_path = out.with_name(out.name + ".meta.json")
    with atomic_path(meta_path) as tmp:
        tmp.write_text(text)
    with atomic_path(out) as tmp:
        tmp.write_text("".join(f"{case}\n" for case in flagged))
    return [out, meta_path]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brats-lightning flag-cases``."""
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run folders holding case_losses.csv (or folders of runs, searched recursively)")
    parser.add_argument("--out", required=True, type=Path,
                        help="exclusion list: a .json file (ids, rule and scores in one file), or any other "
                             "name for one id a line plus the rule and scores in <name>.meta.json beside it "
                             "(excluded.txt -> excluded.txt.meta.json)")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--quantile", type=float, default=None,
                      help=f"flag cases above this quantile of the scores (default {DEFAULT_QUANTILE})")
    rule.add_argument("--threshold", type=float, default=None, help="flag cases scoring above this loss")
    parser.add_argument("--last-epochs", type=int, default=None,
                        help="score over each run's last N recorded epochs (default: all recorded)")


def run(args: argparse.Namespace) -> int:
    """Run ``brats-lightning flag-cases``."""
    from rich.console import Console
    from rich.table import Table

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = find_case_loss_files(args.run_dirs)
    scores = case_scores(files, args.last_epochs)
    flagged, cut = flag_cases(scores, args.quantile, args.threshold)
    rule = ({"threshold": float(args.threshold)} if args.threshold is not None
            else {"quantile": DEFAULT_QUANTILE if args.quantile is None else float(args.quantile)})
    meta = {
        "rule": {**rule, "cutoff": cut, "last_epochs": args.last_epochs,
                 "score": "mean main-output Dice loss per case over each run's last epochs, averaged over "
                          "runs; flagged when score > cutoff"},
        "runs": [str(f.parent) for f in files],
        "scores": scores,
    }
    written = write_exclusion_list(args.out, flagged, meta)
    table = Table(title=f"flag-cases: {len(flagged)} of {len(scores)} cases above {cut:.4f}")
    table.add_column("case")
    table.add_column("score", justify="right")
    for case in sorted(flagged, key=lambda c: -scores[c]):
        table.add_row(case, f"{scores[case]:.4f}")
    Console().print(table)
    log.info("wrote %s (from %d run(s))", ", ".join(map(str, written)), len(files))
    return 0
