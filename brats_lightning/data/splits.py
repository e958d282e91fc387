"""Deterministic k-fold cross-validation splits, saved to JSON and reused (docs/method.md "Training").

Folds come from sklearn's ``KFold(n_splits, shuffle=True, random_state=seed)`` over the *sorted* case
ids, so they depend only on the set of ids, the fold count and the seed: identical on any machine. The
first run saves them; later runs load the file and refuse to continue if it lists other cases. Patient
filtering (paper section 2.6) removes flagged cases from the training part of a fold only; validation
folds never change, so cleaned and uncleaned runs stay comparable.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from brats_lightning.data.io import atomic_path

log = logging.getLogger(__name__)


class SplitMismatchError(ValueError):
    """A saved split file does not match the data set or the requested fold count / seed."""


def make_folds(case_ids: Sequence[str], n_folds: int = 5, seed: int = 42) -> list[dict[str, Any]]:
    """K folds over the sorted ``case_ids``: ``[{"fold": k, "train": [...], "val": [...]}, ...]``.

    Every case is in exactly one validation fold; train and val lists are sorted.

    Raises:
        ValueError: duplicate ids, or fewer cases than folds.
    """
    from sklearn.model_selection import KFold

    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"duplicate case ids {dupes[:5]}; expected unique ids: "
                         "run `brats-lightning check-data`")
    if n_folds < 2 or len(ids) < n_folds:
        raise ValueError(f"cannot make {n_folds} folds from {len(ids)} cases; expected n_folds >= 2 and at "
                         f"least n_folds cases: lower n_folds or add cases")
    folds = []
    kfold = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (train_idx, val_idx) in enumerate(kfold.split(ids)):
        folds.append({"fold": k, "train": sorted(ids[i] for i in train_idx),
                      "val": sorted(ids[i] for i in val_idx)})
    return folds


def save_splits(path: str | Path, folds: list[dict[str, Any]], n_folds: int, seed: int) -> Path:
    """Write folds to JSON atomically (with the fold count, seed and the sorted case list)."""
    case_ids = sorted(c for fold in folds for c in fold["val"])
    payload = {"n_folds": n_folds, "seed": seed, "case_ids": case_ids, "folds": folds}
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def load_splits(path: str | Path) -> dict[str, Any]:
    """Read a split file written by :func:`save_splits` (keys n_folds, seed, case_ids, folds)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
        _ = payload["folds"], payload["case_ids"], payload["n_folds"], payload["seed"]
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SplitMismatchError(f"split file {path} is unreadable ({err}); expected JSON with keys n_folds, "
                                 "seed, case_ids, folds: delete it to create a new split") from err
    return payload


def load_or_create_splits(
    path: str | Path, case_ids: Sequence[str] | None, n_folds: int = 5, seed: int = 42
) -> list[dict[str, Any]]:
    """Load the folds saved at ``path``, or make and save them when the file does not exist.

    Args:
        path: the split JSON file.
        case_ids: the data set's case ids (None: trust the file as it is; it must exist).
        n_folds: number of folds.
        seed: KFold shuffle seed.

    Raises:
        SplitMismatchError: the saved file lists other cases, or another fold count or seed.
    """
    path = Path(path)
    if not path.exists():
        if case_ids is None:
            raise FileNotFoundError(f"split file {path} does not exist and no case ids were given "
                                    "to create it")
        folds = make_folds(case_ids, n_folds, seed)
        save_splits(path, folds, n_folds, seed)
        log.info("created %d-fold split of %d cases (seed %d) at %s", n_folds, len(case_ids), seed, path)
        return folds
    payload = load_splits(path)
    if payload["n_folds"] != n_folds or payload["seed"] != seed:
        raise SplitMismatchError(
            f"split file {path} holds {payload['n_folds']} folds with seed {payload['seed']}; requested "
            f"{n_folds} folds with seed {seed}: use the saved settings, or another split file for new ones")
    if case_ids is not None:
        saved, current = set(payload["case_ids"]), set(case_ids)
        if saved != current:
            extra = sorted(current - saved)
            gone = sorted(saved - current)
            raise SplitMismatchError(
                f"split file {path} lists {len(saved)} cases, the data set has {len(current)}: "
                f"{len(extra)} not in the file (e.g. {extra[:3]}), {len(gone)} in the file but not in the "
                f"data "
                f"(e.g. {gone[:3]}); expected the same cases: point split_file to a new path for this data "
                f"set, or delete {path} to re-split")
    return payload["folds"]


def fold_case_ids(
    splits: list[dict[str, Any]], fold: int, exclude: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """(train ids, val ids) of ``fold``; ``exclude`` removes cases from train only (patient filtering)."""
    by_fold = {int(f["fold"]): f for f in splits}
    if fold not in by_fold:
        raise ValueError(f"fold {fold} does not exist; the split has folds {sorted(by_fold)}")
    excluded = set(exclude)
    known = {c for f in splits for c in f["val"]}
    unknown = sorted(excluded - known)
    if unknown:
        log.warning("%d excluded case(s) are not in the split and are ignored: %s", len(unknown), unknown[:5])
    entry = by_fold[fold]
    train = [c for c in entry["train"] if c not in excluded]
    return train, list(entry["val"])
