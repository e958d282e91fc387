"""Find trained runs by their ``run.json``, choose an ensemble, load the networks (SPEC.md Inference).

Every training run writes ``run.json`` (CONTRACTS.md, Training). The paper's ensembles are:
pipeline A, the best two of three models per fold (paper section 3.4: "best two models of each fold");
pipeline B, all five fold models. Ranking uses the validation Dice (``val_metrics.dice_mean``), or the
fast-SWA ("self-ensembled") weights' validation Dice when the run has an SWA checkpoint
(paper section 2.4), in which case the SWA weights are the ones loaded.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("pipeline", "model", "fold", "normalization", "label_convention", "channels", "model_config",
                 "checkpoints")


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

    def checkpoint_path(self, which: str = "auto") -> Path:
        """Path of the checkpoint ``which`` ("auto" = swa if present, else best, else last).

        run.json stores absolute paths; when the outputs folder has moved, the checkpoint is looked up
        in ``checkpoints/`` next to run.json instead.
        """
        checkpoints = self.info.get("checkpoints") or {}
        if which == "auto":
            which = next((k for k in ("swa", "best", "last") if checkpoints.get(k)), "best")
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
        raise ValueError(f"{path}: run.json lacks {missing}; expected the keys of CONTRACTS.md (Training)")
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
    # Our own training checkpoints hold Lightning's hyper-parameters (OmegaConf objects) next to the tensors.
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
