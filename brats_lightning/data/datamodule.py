"""LightningDataModule: checked data, cached preprocessing, k-fold split, random crops, whole-brain
validation.

Paper sections 2.3 and 2.5 / docs/method.md "Preprocessing", "Training". Per run:

1. (synthetic data only) the data set is generated when its folder is missing;
2. the fast data check (layout, a seg for every case, and every file's header: 3-D, pixdim vs affine, one
   grid and affine per case) runs before anything else and stops in seconds with every problem listed;
3. every case is checked voxel by voxel (finite values, legal labels) and preprocessed once per
   normalization (pipeline A "minmax", B "zscore") into the memory-mapped
   :class:`~brats_lightning.data.preprocess.CaseCache`; the bad cases of the whole data set are listed in
   one :class:`~brats_lightning.data.checks.DataProblems` error before training starts, and a cached case is
   never checked again;
4. the k-fold split is loaded or created (saved as JSON next to the cache, reused by every run on this data
   set, so pipelines A and B share folds) and ``exclude`` removes cases from training only;
5. training: one epoch is one pass over the training cases, each a random ``crop_size`` crop of its brain
   box (zero padded where the box is smaller) with the label map turned into bool regions (ET, TC, WT);
6. validation: one case per batch, the whole brain box zero-padded to a multiple of 8.

Crops draw their randomness from torch's RNG (seeded per DataLoader worker by PyTorch from the main
process's RNG, which ``seed_everything(seed, workers=True)`` seeds), so a fixed ``seed`` reproduces them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from brats_lightning.data.checks import DataProblems, check_cases
from brats_lightning.data.labels import labels_to_regions
from brats_lightning.data.layout import Case
from brats_lightning.data.preprocess import (
    CaseCache,
    PreprocessedCase,
    cache_dataset,
    data_root_hash,
    layout_problems,
    pad_to_multiple,
    random_crop,
)
from brats_lightning.data.splits import fold_case_ids, load_or_create_splits
from brats_lightning.distributed import file_lock
from brats_lightning.errors import UserError

log = logging.getLogger(__name__)


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT and SIGTERM, which reach the whole process group
    (Ctrl-C, SLURM's time limit). The training process stops at the next batch and shuts its workers down
    (train.py, checkpointing.StopOnSignal); torch's own handler would end a worker at once, and the training
    process would fail mid-step with "DataLoader worker ... killed by signal". A worker still ends with its
    parent (torch's watchdog). Lightning's own worker seeding (``seed_everything(workers=True)``), which
    it adds only to loaders without a ``worker_init_fn``, runs here too."""
    from lightning_fabric.utilities.seed import pl_worker_init_function

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("PL_SEED_WORKERS") == "1":
        pl_worker_init_function(worker_id)


def collate_cases(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``image`` and ``target`` tensors; every other key becomes a list (case ids, boxes, spacings)."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def read_exclusions(exclude: str | os.PathLike | Sequence[str] | None) -> list[str]:
    """Case ids left out of training: a list, or a file (JSON list, ``{"exclude": [...]}``, one id a line).

    Raises:
        FileNotFoundError: ``exclude`` names a file that does not exist.
    """
    if exclude is None:
        return []
    if isinstance(exclude, (str, os.PathLike)):
        path = Path(exclude)
        if not path.is_file():
            raise FileNotFoundError(
                f"exclusion list {path} not found; expected a JSON list of case ids or one case id per line "
                "(e.g. written by `brats-lightning flag-cases`), or set data.exclude to a list")
        text = path.read_text()
        if path.suffix == ".json":
            import json

            data = json.loads(text)
            if isinstance(data, Mapping):
                data = data.get("exclude", data.get("cases", []))
            return [str(c) for c in data]
        return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return [str(c) for c in exclude]


def exclusion_source(exclude: str | os.PathLike | Sequence[str] | None) -> dict[str, Any] | None:
    """Where an exclusion list came from, for run.json: None for an inline list; for a file
    ``{"file": absolute path, "rule": ..., "runs": [...]}`` with the rule and source runs that
    `brats-lightning flag-cases` recorded (in the JSON itself, or in ``<file>.meta.json`` beside a text list).
    """
    if not isinstance(exclude, (str, os.PathLike)):
        return None
    import json

    path = Path(exclude).resolve()
    meta_path = path if path.suffix == ".json" else path.with_name(path.name + ".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta = meta if isinstance(meta, Mapping) else {}
    return {"file": str(path), **{k: meta[k] for k in ("rule", "runs") if k in meta}}


class _CachedCases:
    """Memory-mapped cache entries opened once per process (DataLoader worker)."""

    def __init__(self, cache: CaseCache, cases: Sequence[Case]) -> None:
        self.cache = cache
        self.cases = list(cases)
        self._open: dict[int, PreprocessedCase] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def get(self, index: int) -> PreprocessedCase:
        if index not in self._open:
            self._open[index] = self.cache.get(self.cases[index])
        return self._open[index]

    def __getstate__(self) -> dict[str, Any]:  # memmaps are re-opened in each worker
        return {"cache": self.cache, "cases": self.cases, "_open": {}}


class CropDataset(Dataset):
    """Training samples: a random crop per case (docs/method.md "Preprocessing": random 128^3 crop in the
    brain box).

    Items: ``{"image": float32 (4, *size), "target": bool (3, *size) regions ET/TC/WT, "case_id": str}``.

    Args:
        cache: the preprocessed-case cache (normalization fixed).
        cases: the training cases.
        crop_size: crop side(s) in voxels.
        foreground_prob: probability that the crop is centred on a tumour voxel (0 = the paper's plain crop).
    """

    def __init__(self, cache: CaseCache, cases: Sequence[Case], crop_size: int | Sequence[int],
                 foreground_prob: float = 0.0) -> None:
        self.cases = _CachedCases(cache, cases)
        self.crop_size = crop_size if isinstance(crop_size, int) else tuple(int(s) for s in crop_size)
        self.foreground_prob = float(foreground_prob)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pre = self.cases.get(index)
        # torch's RNG is seeded per worker (and by seed_everything in the main process): reproducible crops.
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        image, labels = random_crop(pre.images, pre.labels, self.crop_size, rng, self.foreground_prob)
        regions = labels_to_regions(labels, pre.convention)
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                "target": torch.from_numpy(np.ascontiguousarray(regions, dtype=bool)),
                "case_id": pre.case_id}


class WholeBrainDataset(Dataset):
    """Validation samples: the whole brain box padded to a multiple of 8 (docs/method.md "Inference").

    Items: ``{"image": float32 (4, X', Y', Z') padded, "target": bool (3, X, Y, Z) unpadded regions,
    "case_id": str, "box": {"start": [...], "stop": [...]}`` (where the data lies in the padded image;
    ``Box.from_dict`` rebuilds it), ``"spacing": (sx, sy, sz)`` mm}``.
    """

    def __init__(self, cache: CaseCache, cases: Sequence[Case], multiple: int = 8) -> None:
        self.cases = _CachedCases(cache, cases)
        self.multiple = multiple

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pre = self.cases.get(index)
        image, box = pad_to_multiple(np.asarray(pre.images, dtype=np.float32), self.multiple)
        regions = labels_to_regions(np.asarray(pre.labels), pre.convention)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)),
                "target": torch.from_numpy(np.ascontiguousarray(regions, dtype=bool)),
                "case_id": pre.case_id, "box": box.to_dict(), "spacing": tuple(float(s) for s in pre.spacing)}


def generate_if_missing(root: Path, generate: Mapping[str, Any]) -> bool:
    """Generate the synthetic data set at ``root`` when the folder is missing (in a temporary folder renamed
    into place, so two jobs starting together end with one complete data set). Returns True if generated."""
    if root.exists():
        return False
    from brats_lightning.data.synthetic import generate_dataset

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{root.name}"
    kwargs = {k: v for k, v in generate.items() if k != "n_cases"}
    log.info("generating synthetic data set (%d cases, %s) at %s", generate["n_cases"], kwargs, root)
    try:
        generate_dataset(tmp, int(generate["n_cases"]), **kwargs)
        try:
            os.rename(tmp, root)
        except OSError:
            if not root.exists():
                raise
            log.info("another job generated %s first; using it", root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


class BratsDataModule(pl.LightningDataModule):
    """Data for one fold of one pipeline.

    Args:
        root: the data set folder (one sub-folder per case; 2020 / 2021 / 2023 naming detected per case).
        fold: the validation fold.
        normalization: "minmax" (pipeline A) or "zscore" (pipeline B).
        batch_size: training batch size (A 1, B 3).
        cache_dir: root of the preprocessed-case cache.
        n_folds: number of cross-validation folds.
        split_seed: KFold shuffle seed.
        split_file: the split JSON (None: ``<cache_dir>/splits/<name>-<root hash>-<n>fold-seed<s>.json``).
        exclude: case ids (or a file of them) left out of training (patient filtering); validation keeps them.
        crop_size: training crop side (128 in the paper).
        foreground_prob: probability of a tumour-centred crop (0 in the paper, 0.5 in the CPU demo).
        num_workers: DataLoader workers (also the cache-building processes, at least 1).
        check: run the fast (headers only) data check of every case before building the cache; without it
            header problems are found while caching (the cache checks every file either way).
        generate: ``{"n_cases", "spacing", "seed", "year"}`` to generate a synthetic set at ``root`` when
            it is missing (None for real data).
        name: the data set's short name (split file name, run.json).
        cache_dtype: "float32" or "float16" images in the cache (:class:`CaseCache`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        fold: int = 0,
        normalization: str = "minmax",
        batch_size: int = 1,
        cache_dir: str | os.PathLike = "cache",
        n_folds: int = 5,
        split_seed: int = 42,
        split_file: str | os.PathLike | None = None,
        exclude: str | os.PathLike | Sequence[str] | None = (),
        crop_size: int | Sequence[int] = 128,
        foreground_prob: float = 0.0,
        num_workers: int = 0,
        check: bool = True,
        generate: Mapping[str, Any] | None = None,
        name: str = "data",
        cache_dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.root = Path(root).resolve()
        self.fold = int(fold)
        self.normalization = normalization
        self.batch_size = int(batch_size)
        self.cache_dir = Path(cache_dir).resolve()
        self.n_folds = int(n_folds)
        self.split_seed = int(split_seed)
        self.split_file = None if split_file is None else Path(split_file).resolve()
        self.exclude = read_exclusions(exclude)
        self.exclude_source = exclusion_source(exclude)
        self.crop_size = crop_size
        self.foreground_prob = float(foreground_prob)
        self.num_workers = int(num_workers)
        self.check = bool(check)
        self.generate = dict(generate) if generate else None
        self.name = name
        self.cases: list[Case] = []
        self.train_cases: list[Case] = []
        self.val_cases: list[Case] = []
        self.label_convention: str | None = None
        self.cache = CaseCache(self.cache_dir, normalization, cache_dtype)
        self._cached_cases: list[Case] | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> BratsDataModule:
        """Build from the full training config: ``cfg.data`` plus ``fold``, ``pipeline.normalization`` and
        ``pipeline.batch_size``."""
        data = cfg.data
        exclude = data.get("exclude")
        if exclude is not None and not isinstance(exclude, str):
            exclude = list(exclude)
        generate = data.get("generate")
        return cls(
            root=data.root, fold=cfg.fold, normalization=cfg.pipeline.normalization,
            batch_size=cfg.pipeline.batch_size, cache_dir=data.cache_dir, n_folds=data.n_folds,
            split_seed=data.split_seed, split_file=data.get("split_file"), exclude=exclude,
            crop_size=data.crop_size if isinstance(data.crop_size, int) else list(data.crop_size),
            foreground_prob=data.foreground_prob, num_workers=data.num_workers, check=data.get("check", True),
            generate=None if generate is None else dict(generate), name=data.name,
            cache_dtype=data.get("cache_dtype", "float32"),
        )

    def prepare_data(self) -> None:
        """Generate the synthetic data set if configured and missing, check it and cache every case.

        Lightning calls this on local rank 0 only while the other ranks wait (``_InfiniteBarrier``,
        trainer/connectors/data_connector.py), so one process per node builds the cache; the file lock of
        :meth:`_build_cache` makes jobs of a sweep that start together build it once.
        """
        if self.generate is not None:
            generate_if_missing(self.root, self.generate)
        if self.root.exists():
            self._check_and_cache()

    def _check_and_cache(self) -> list[Case]:
        """Check every case and cache the data set once per process (see the module doc, steps 2-3), holding
        ``<cache>/<normalization>/<root hash>/.build.lock``; returns the cases.

        Raises:
            DataProblems: every problem of the data set, before any training step.
        """
        if self._cached_cases is not None:
            return self._cached_cases
        fix = (f"fix or remove these cases (full report: `brats-lightning check-data {self.root}`), "
               "then train again")
        if self.check:
            cases, problems = layout_problems(self.root, require_labels=True)
            problems += check_cases(cases, fast=True)
            if problems:
                raise DataProblems(problems, f"data check of {self.root} (headers; nothing cached)",
                                   self.root, fix)
        cases = layout_problems(self.root)[0]
        lock = self.cache.entry_dir(cases[0]).parent / ".build.lock" if cases else self.cache_dir / ".lock"
        with file_lock(lock, f"cache {lock.parent}"):
            try:
                cases, summary = cache_dataset(self.cache, self.root, max(1, self.num_workers),
                                               require_labels=True)
            except DataProblems as err:
                raise DataProblems(err.problems, f"data check of {self.root}", self.root,
                                   "the clean cases are cached; " + fix) from None
        if summary["built"]:
            log.info("cache %s: built %d entries, reused %d", lock.parent, summary["built"],
                     summary["reused"])
        self._cached_cases = cases
        return cases

    def setup(self, stage: str | None = None) -> None:
        """Check the data, build the cache, split into folds and create the train / validation cases."""
        if self.cases:
            return
        if not self.root.exists():
            hint = ("set data.generate to create a synthetic set" if self.generate is None
                    else "prepare_data() generates it; call it first")
            raise UserError(f"data folder {self.root} does not exist; {hint} or point data.root to "
                            "a BraTS training folder")
        cases = self._check_and_cache()
        conventions = sorted({c.convention.name for c in cases})
        if len(conventions) > 1:
            by = {name: [c.case_id for c in cases if c.convention.name == name][:3] for name in conventions}
            raise UserError(f"data folder {self.root} mixes label conventions {by}; expected one BraTS "
                            "edition per data set: split the folder")
        self.label_convention = conventions[0]
        if self.split_file is None:
            name = f"{self.name}-{data_root_hash(cases[0])}-{self.n_folds}fold-seed{self.split_seed}.json"
            self.split_file = self.cache_dir / "splits" / name
        ids = [c.case_id for c in cases]
        splits = load_or_create_splits(self.split_file, ids, self.n_folds, self.split_seed)
        train_ids, val_ids = fold_case_ids(splits, self.fold, exclude=self.exclude)
        by_id = {c.case_id: c for c in cases}
        self.cases = cases
        self.train_cases = [by_id[i] for i in train_ids]
        self.val_cases = [by_id[i] for i in val_ids]
        if not self.train_cases or not self.val_cases:
            raise UserError(f"fold {self.fold} of {self.split_file} has {len(self.train_cases)} training "
                            f"and {len(self.val_cases)} validation cases; expected at least one of each: "
                            "use more cases, fewer folds or a shorter exclusion list")
        excluded = sorted(set(self.exclude) & (set(by_id) - set(val_ids)))
        log.info("fold %d: %d training cases (%d excluded), %d validation cases; cache %s", self.fold,
                 len(self.train_cases), len(excluded), len(self.val_cases),
                 self.cache.entry_dir(cases[0]).parent)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=collate_cases, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0, drop_last=False,
                          worker_init_fn=leave_stop_signals_to_the_trainer)

    def train_dataloader(self) -> DataLoader:
        """Random crops of the training cases, shuffled; one epoch = one pass over them."""
        dataset = CropDataset(self.cache, self.train_cases, self.crop_size, self.foreground_prob)
        return self._loader(dataset, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Whole padded brain boxes of the validation cases, one per batch.

        Under DDP, Lightning's DistributedSampler gives every rank the same number of cases, repeating up to
        ``world_size - 1`` of them, so the synced validation means can count a case twice (docs/cluster.md).
        Equal counts are needed: Lightning averages the summed values and the integer batch counts across
        ranks, and with gloo the averaged count is truncated to an integer (lightning_fabric
        utilities/distributed.py ``_sync_ddp``).
        """
        return self._loader(WholeBrainDataset(self.cache, self.val_cases), 1, shuffle=False)

    def record(self) -> dict[str, Any]:
        """The data part of run.json: data name/root, split file, validation cases, exclusions (ids, and the
        file and flag-cases rule they came from), label convention."""
        return {"data": {"name": self.name, "root": str(self.root)},
                "split_file": None if self.split_file is None else str(self.split_file),
                "val_cases": [c.case_id for c in self.val_cases], "exclude": list(self.exclude),
                "exclude_source": self.exclude_source,
                "label_convention": self.label_convention}
