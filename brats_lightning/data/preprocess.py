"""Brain box, crop / pad helpers and the on-disk cache of preprocessed cases (paper section 2.3,
docs/method.md "Preprocessing").

A case is preprocessed once per normalization: every file is checked as it is read (the checks of
``check-data``: 3-D, pixdim vs affine, one grid and affine, finite voxels, legal labels; a bad case raises
:class:`~brats_lightning.data.checks.DataProblems`), images are normalized per modality, then cropped to
the brain box (the smallest box holding every non-zero voxel of any modality). The cache stores the
cropped arrays as uncompressed ``.npy`` files (float32, or float16 with ``dtype="float16"``),
memory-mapped at training time, next to a ``meta.json`` that records that the case passed the checks, the
box, the original grid and the source files' sizes and mtimes. Entries live under
``<cache_dir>/<normalization>[-float16]/<hash of the data root>/<case_id>/`` (docs/contracts.md "Cache
layout") and are rebuilt when stale or written by an older layout (``CACHE_FORMAT``).

Geometry helpers act on the last three (spatial) axes, so they serve (X, Y, Z) label maps and
(C, X, Y, Z) image stacks alike.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brats_lightning.data.checks import (
    DataProblems,
    Problem,
    check_headers,
    check_voxels,
    voxel_sizes,
)
from brats_lightning.data.io import VolumeReadError, read_voxels, to_label_map
from brats_lightning.data.labels import LabelConvention, get_convention
from brats_lightning.data.layout import MODALITIES, Case
from brats_lightning.data.normalize import PIPELINE_NORMALIZATION, get_normalization

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Cache layout version in every entry's meta.json; an entry of another version is rebuilt, never read
(1: float32 only, no check record; 2: checked cases, ``dtype``)."""

CACHE_DTYPES = ("float32", "float16")
"""Image dtypes of the cache; float16 halves it (values within 1e-3 relative of float32, tested)."""


# ----------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Box:
    """A box on a 3-D grid: voxels ``start[i] <= index < stop[i]`` on each spatial axis."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", tuple(int(v) for v in self.start))
        object.__setattr__(self, "stop", tuple(int(v) for v in self.stop))
        if len(self.start) != 3 or len(self.stop) != 3 or any(
                a > b for a, b in zip(self.start, self.stop, strict=True)):
            raise ValueError(f"invalid box start={self.start} stop={self.stop}; "
                             "expected 3 axes and start <= stop")

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Index with ``array[(..., *box.slices)]`` (see :func:`crop`)."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, list[int]]:
        return {"start": list(self.start), "stop": list(self.stop)}

    @classmethod
    def from_dict(cls, data: dict[str, Sequence[int]]) -> Box:
        return cls(tuple(data["start"]), tuple(data["stop"]))  # type: ignore[arg-type]


def _spatial(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) < 3:
        raise ValueError(f"expected an array with at least 3 (spatial) dimensions; got shape {tuple(shape)}")
    return tuple(int(s) for s in shape[-3:])  # type: ignore[return-value]


def _size3(size: int | Sequence[int]) -> tuple[int, int, int]:
    sizes = (size,) * 3 if isinstance(size, (int, np.integer)) else tuple(size)
    if len(sizes) != 3 or any(int(s) <= 0 for s in sizes):
        raise ValueError(f"size must be a positive int or 3 positive ints; got {size!r}")
    return tuple(int(s) for s in sizes)  # type: ignore[return-value]


def brain_box(images: np.ndarray) -> Box:
    """Smallest box holding every non-zero voxel of any modality of ``images`` (C, X, Y, Z) or (X, Y, Z).

    Raises:
        ValueError: every voxel is zero.
    """
    images = np.asarray(images)
    mask = images != 0
    if mask.ndim == 4:
        mask = mask.any(axis=0)
    start, stop = [], []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hits.size == 0:
            raise ValueError(f"all voxels are zero (shape {images.shape}); expected a brain: check the case")
        start.append(hits[0])
        stop.append(hits[-1] + 1)
    return Box(tuple(start), tuple(stop))  # type: ignore[arg-type]


def crop(array: Any, box: Box) -> Any:
    """``array[..., box]`` on the last three axes (numpy arrays and torch tensors; a view, not a copy)."""
    return array[(Ellipsis, *box.slices)]


def unpad(array: Any, box: Box) -> Any:
    """Undo :func:`pad_to_multiple` / :func:`pad_to_shape` with the Box they returned (same as crop)."""
    return crop(array, box)


def pad_to_shape(array: np.ndarray, shape: Sequence[int], fill: float = 0) -> tuple[np.ndarray, Box]:
    """Pad the last three axes to ``shape``, centring the data: (padded, Box of the data inside it).

    Raises:
        ValueError: a side of ``array`` is larger than ``shape``.
    """
    spatial, target = _spatial(array.shape), _size3(shape)
    if any(s > t for s, t in zip(spatial, target, strict=True)):
        raise ValueError(f"cannot pad spatial shape {spatial} to the smaller shape {target}; "
                         "crop first (random_crop or crop)")
    before = [(t - s) // 2 for s, t in zip(spatial, target, strict=True)]
    after = [t - s - b for b, s, t in zip(before, spatial, target, strict=True)]
    widths = [(0, 0)] * (array.ndim - 3) + list(zip(before, after, strict=True))
    padded = np.pad(array, widths, mode="constant", constant_values=fill)
    return padded, Box(tuple(before), tuple(b + s for b, s in zip(before, spatial, strict=True)))  # type: ignore[arg-type]


def pad_to_multiple(array: np.ndarray, multiple: int = 8, fill: float = 0) -> tuple[np.ndarray, Box]:
    """Zero-pad the last three axes up to the next multiple of ``multiple`` (the network pools 3 times).

    Returns the padded array and the Box of the original data inside it (give it to :func:`unpad`).
    """
    spatial = _spatial(array.shape)
    target = [-(-s // multiple) * multiple for s in spatial]
    return pad_to_shape(array, target, fill)


def uncrop(array: np.ndarray, box: Box, full_shape: Sequence[int], fill: float = 0) -> np.ndarray:
    """Paste ``array`` (..., *box.shape) back at ``box`` in a ``fill``-ed grid of spatial ``full_shape``."""
    full = _spatial(full_shape)
    if _spatial(array.shape) != box.shape:
        raise ValueError(f"array spatial shape {_spatial(array.shape)} differs from the box shape "
                         f"{box.shape}; "
                         "expected the cropped (unpadded) data")
    if any(b > f for b, f in zip(box.stop, full, strict=True)):
        raise ValueError(f"box {box} does not fit in the grid {full}")
    out = np.full((*array.shape[:-3], *full), fill, dtype=array.dtype)
    out[(Ellipsis, *box.slices)] = array
    return out


def _window(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Copy the window [start, start + size) of the last three axes; outside the array reads as 0."""
    spatial = _spatial(array.shape)
    out = np.zeros((*array.shape[:-3], *size), dtype=array.dtype)
    src, dst = [], []
    for st, sz, dim in zip(start, size, spatial, strict=True):
        lo, hi = max(st, 0), min(st + sz, dim)
        src.append(slice(lo, hi))
        dst.append(slice(lo - st, hi - st))
    out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return out


def random_crop(
    images: np.ndarray,
    target: np.ndarray | None,
    size: int | Sequence[int],
    rng: np.random.Generator,
    foreground_prob: float = 0.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Random crop of ``size`` from images (C, X, Y, Z) and target (X, Y, Z) label map or (K, X, Y, Z) masks.

    Paper section 2.3: a random 128^3 crop inside the brain box; sides smaller than the crop are
    zero-padded (the data is then placed at a random offset inside the crop). With probability
    ``foreground_prob`` the crop is instead centred on a random tumour voxel (non-zero target), as far
    as the box allows; 0 is the paper's plain random crop.

    Returns:
        (image crop (C, *size), target crop (..., *size) or None), new arrays (not views of a memmap).
    """
    size3 = _size3(size)
    spatial = _spatial(images.shape)
    if target is not None and _spatial(target.shape) != spatial:
        raise ValueError(f"images {images.shape} and target {target.shape} have different spatial shapes")
    low = [min(0, d - s) for d, s in zip(spatial, size3, strict=True)]
    high = [max(0, d - s) for d, s in zip(spatial, size3, strict=True)]
    centre = None
    if target is not None and foreground_prob > 0 and rng.random() < foreground_prob:
        fg = np.asarray(target) != 0
        if fg.ndim == 4:
            fg = fg.any(axis=0)
        voxels = np.flatnonzero(fg)
        if voxels.size:
            centre = np.unravel_index(voxels[rng.integers(voxels.size)], spatial)
    if centre is None:
        start = [int(rng.integers(lo, hi + 1)) for lo, hi in zip(low, high, strict=True)]
    else:
        start = [int(np.clip(c - s // 2, lo, hi))
                 for c, s, lo, hi in zip(centre, size3, low, high, strict=True)]
    image_crop = _window(images, start, size3)
    target_crop = None if target is None else _window(target, start, size3)
    return image_crop, target_crop


# ---------------------------------------------------------------------------------------- preprocessing
@dataclass
class PreprocessedCase:
    """A case normalized and cropped to its brain box (images are an np.memmap when from the cache).

    Attributes:
        case_id: the case's id.
        images: float32 (4, *box.shape), MODALITIES order.
        labels: uint8 label map (box-cropped, original label codes) or None for unlabeled cases.
        box: the brain box in the original grid.
        original_shape: the original grid's (X, Y, Z).
        affine: the original 4x4 affine (t1's).
        convention: the case's label convention.
        spacing: voxel size in mm.
    """

    case_id: str
    images: np.ndarray
    labels: np.ndarray | None
    box: Box
    original_shape: tuple[int, int, int]
    affine: np.ndarray
    convention: LabelConvention
    spacing: tuple[float, float, float]


def load_checked_case(case: Case) -> tuple[np.ndarray, np.ndarray | None, Any]:
    """Read a case, checking every file as it is read: (images float32 (4, X, Y, Z), uint8 labels or None,
    t1 image). One read per file: the checks of ``check-data`` (:mod:`brats_lightning.data.checks`) run on
    the headers and voxels that preprocessing needs anyway.

    Raises:
        DataProblems: every problem of the case (a UserError).
    """
    problems, headers = check_headers(case)
    if problems:
        raise DataProblems(problems, f"case {case.case_id}")
    reference = headers[MODALITIES[0]]
    images = np.empty((len(MODALITIES), *reference.shape), dtype=np.float32)
    labels = None
    for name, path in zip([*MODALITIES, "seg"], case.files, strict=False):
        try:
            data = read_voxels(headers[name], path)
        except VolumeReadError as err:
            problems.append(Problem(case.case_id, str(path), f"{name} unreadable: {err}"))
            continue
        found = check_voxels(case.case_id, name, path, data, case.convention)
        problems += found
        if found:
            continue
        if name == "seg":
            labels = to_label_map(data, path)
        else:
            images[MODALITIES.index(name)] = data
    if problems:
        raise DataProblems(problems, f"case {case.case_id}")
    return images, labels, reference


def preprocess_case(case: Case, normalization: str) -> PreprocessedCase:
    """Load (checked), crop to the brain box and normalize one case in memory (training cache, inference).

    The box comes from the raw images (non-zero voxels of any modality); normalization statistics use
    only non-zero voxels, which all lie inside the box, so cropping first gives identical values. The
    spacing comes from the affine (trusted over pixdim; they agree once checked, see
    :func:`brats_lightning.data.checks.check_header`).

    Raises:
        DataProblems: the case fails the checks.
    """
    norm = get_normalization(normalization)
    images, labels, reference = load_checked_case(case)
    box = brain_box(images)  # never all zero: check_voxels refuses an all-zero modality
    cropped = norm(np.ascontiguousarray(crop(images, box)))
    if labels is not None:
        kept = np.count_nonzero(crop(labels, box))
        total = np.count_nonzero(labels)
        if kept != total:
            log.warning("case %s: %d labelled voxels lie outside the brain box (all modalities 0 there) "
                        "and are dropped", case.case_id, total - kept)
        labels = np.ascontiguousarray(crop(labels, box))
    return PreprocessedCase(
        case_id=case.case_id,
        images=cropped,
        labels=labels,
        box=box,
        original_shape=tuple(int(s) for s in reference.shape[:3]),  # type: ignore[arg-type]
        affine=np.asarray(reference.affine, dtype=np.float64),
        convention=case.convention,
        spacing=tuple(float(z) for z in voxel_sizes(reference.affine)),  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------------------------------------- cache
def data_root_hash(case: Case) -> str:
    """Short hash of the resolved folder that holds the case's folder (the data set root)."""
    root = case.folder.resolve().parent
    return hashlib.sha1(str(root).encode()).hexdigest()[:12]


def _source_stats(case: Case) -> list[dict[str, Any]]:
    stats = []
    for path in case.files:
        st = path.stat()
        stats.append({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return stats


def _normalization_spec(name: str) -> dict[str, Any]:
    norm = get_normalization(name)
    return {"name": norm.name, "params": norm.params}


def default_workers() -> int:
    """Worker processes for parallel builds: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


class CaseCache:
    """Preprocessed cases on disk, one entry per (normalization, data root, case), memory-mapped on read.

    Args:
        cache_dir: root folder of the cache (e.g. ``cache/``).
        normalization: "minmax" (pipeline A) or "zscore" (pipeline B); "A" / "B" are accepted.
        dtype: images as "float32" or "float16" (half the size; in ``<normalization>-float16``).

    Only cases that pass the checks are cached (each entry records it), so the check is paid once. An entry
    is rebuilt when any source file's size or mtime changed, files were added or removed (e.g. a seg file
    appeared), the normalization (name or parameters), the dtype or the cache layout (``CACHE_FORMAT``)
    changed, or the entry is unreadable. Builds write into a temporary folder renamed into place, so
    concurrent builders of one entry end with one valid entry.
    """

    def __init__(self, cache_dir: str | Path, normalization: str, dtype: str = "float32") -> None:
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype {dtype!r}; expected one of {CACHE_DTYPES}")
        self.cache_dir = Path(cache_dir)
        self.spec = _normalization_spec(normalization)
        self.normalization = self.spec["name"]
        self.dtype = dtype

    def entry_dir(self, case: Case) -> Path:
        """Folder of ``case``'s entry."""
        folder = self.normalization if self.dtype == "float32" else f"{self.normalization}-{self.dtype}"
        return self.cache_dir / folder / data_root_hash(case) / case.case_id

    def _read_meta(self, entry: Path) -> dict[str, Any] | None:
        try:
            return json.loads((entry / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    def is_fresh(self, case: Case) -> bool:
        """True when the entry exists and matches the case's files and this normalization."""
        meta = self._read_meta(self.entry_dir(case))
        return meta is not None and self._meta_fresh(meta, case)

    def _meta_fresh(self, meta: dict[str, Any], case: Case) -> bool:
        try:
            sources = _source_stats(case)
        except OSError:
            return False
        return (meta.get("format") == CACHE_FORMAT and meta.get("normalization") == self.spec
                and meta.get("dtype") == self.dtype and meta.get("check") == "passed"
                and meta.get("case_id") == case.case_id and meta.get("sources") == sources)

    def _load(self, entry: Path, meta: dict[str, Any]) -> PreprocessedCase:
        box = Box.from_dict(meta["box"])
        images = np.load(entry / "images.npy", mmap_mode="r")
        if images.shape != (4, *box.shape) or images.dtype != np.dtype(self.dtype):
            raise ValueError(f"cache entry {entry}: images.npy has shape {images.shape} {images.dtype}, "
                             f"meta says (4, {box.shape}) {self.dtype}")
        labels = None
        if meta["has_labels"]:
            labels = np.load(entry / "labels.npy", mmap_mode="r")
            if labels.shape != box.shape or labels.dtype != np.uint8:
                raise ValueError(f"cache entry {entry}: labels.npy has shape {labels.shape} {labels.dtype}, "
                                 f"meta says {box.shape} uint8")
        return PreprocessedCase(
            case_id=meta["case_id"], images=images, labels=labels, box=box,
            original_shape=tuple(meta["original_shape"]), affine=np.asarray(meta["affine"], dtype=np.float64),
            convention=get_convention(meta["label_convention"]), spacing=tuple(meta["spacing"]),
        )

    def get(self, case: Case) -> PreprocessedCase:
        """The case's preprocessed arrays, memory-mapped from the cache; (re)built first when stale."""
        entry = self.entry_dir(case)
        for _attempt in range(3):
            meta = self._read_meta(entry)
            if meta is not None and self._meta_fresh(meta, case):
                try:
                    return self._load(entry, meta)
                except (OSError, ValueError) as err:
                    log.warning("cache entry %s unreadable (%s); rebuilding", entry, err)
                    self._discard(entry)
            self.build_one(case)
        raise RuntimeError(f"case {case.case_id}: cache entry {entry} could not be built and read back; "
                           f"delete {entry} and retry")

    def _discard(self, entry: Path) -> None:
        """Move a stale entry aside (atomic) and delete it."""
        trash = entry.parent / f".old-{os.getpid()}-{uuid.uuid4().hex[:8]}-{entry.name}"
        try:
            os.rename(entry, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def build_one(self, case: Case) -> Path:
        """Preprocess ``case`` and publish its entry atomically; returns the entry folder.

        If another process publishes a fresh entry first, that entry is kept and this build discarded.

        Raises:
            DataProblems: the case fails the checks (nothing is written for it).
        """
        entry = self.entry_dir(case)
        entry.parent.mkdir(parents=True, exist_ok=True)
        sources = _source_stats(case)
        pre = preprocess_case(case, self.normalization)
        tmp = entry.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{case.case_id}"
        tmp.mkdir()
        try:
            np.save(tmp / "images.npy", np.ascontiguousarray(pre.images, dtype=self.dtype))
            if pre.labels is not None:
                np.save(tmp / "labels.npy", np.ascontiguousarray(pre.labels, dtype=np.uint8))
            meta = {
                "format": CACHE_FORMAT,
                "check": "passed",
                "dtype": self.dtype,
                "case_id": case.case_id,
                "normalization": self.spec,
                "box": pre.box.to_dict(),
                "original_shape": list(pre.original_shape),
                "affine": pre.affine.tolist(),
                "spacing": list(pre.spacing),
                "label_convention": case.convention.name,
                "has_labels": pre.labels is not None,
                "sources": sources,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            for _attempt in range(5):
                try:
                    os.rename(tmp, entry)
                    return entry
                except OSError:
                    if not entry.exists():
                        continue
                    current = self._read_meta(entry)
                    if current is not None and self._meta_fresh(current, case):
                        return entry  # another process won the race with an equally fresh entry
                    self._discard(entry)  # a stale entry: move it aside and publish ours
            raise RuntimeError(f"case {case.case_id}: could not publish cache entry {entry}; "
                               "another process keeps replacing it: retry or delete it")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def build(
        self, cases: Sequence[Case], workers: int | None = None, progress: bool = True
    ) -> dict[str, int]:
        """Build the stale or missing entries of ``cases`` in parallel (fresh ones are reused).

        Every case is built (and so checked) before any problem is raised, so the error lists all bad cases;
        the clean ones are cached, the bad ones get no entry.

        Args:
            cases: the cases to cache.
            workers: worker processes (None: :func:`default_workers`; 1 builds in this process).
            progress: show a rich progress bar.

        Returns:
            ``{"built": n, "reused": m}``.

        Raises:
            DataProblems: every problem of every bad case (each reported once, also with workers).
        """
        todo = [case for case in cases if not self.is_fresh(case)]
        summary = {"built": 0, "reused": len(cases) - len(todo)}
        if not todo:
            return summary
        problems: list[Problem] = []
        workers = default_workers() if workers is None else max(1, int(workers))
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task(f"caching {self.normalization}", total=len(todo))
            if workers == 1 or len(todo) == 1:
                for case in todo:
                    problems += self._build_checked(case)
                    bar.advance(task)
            else:
                context = multiprocessing.get_context("spawn")  # safe even when torch/CUDA are initialised
                with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
                    job = (str(self.cache_dir), self.normalization, self.dtype)
                    futures = [pool.submit(_build_entry, *job, c) for c in todo]
                    for future in as_completed(futures):
                        problems += future.result()
                        bar.advance(task)
        summary["built"] = len(todo) - len({p.case for p in problems})
        if problems:
            problems.sort(key=lambda p: (p.case, p.file))
            raise DataProblems(problems, f"caching {self.normalization}")
        return summary

    def _build_checked(self, case: Case) -> list[Problem]:
        """Build one entry; the case's problems instead of an entry when it fails the checks."""
        try:
            self.build_one(case)
        except DataProblems as err:
            return err.problems
        return []


def _build_entry(cache_dir: str, normalization: str, dtype: str, case: Case) -> list[Problem]:
    """Worker entry point for :meth:`CaseCache.build` (module level so it pickles): the case's problems."""
    return CaseCache(cache_dir, normalization, dtype)._build_checked(case)


def layout_problems(root: str | Path, require_labels: bool = False) -> tuple[list[Case], list[Problem]]:
    """The cases under ``root`` and its layout problems (missing files, duplicates; with ``require_labels``
    a missing seg), as :class:`~brats_lightning.data.checks.Problem` rows."""
    from brats_lightning.data.layout import scan_dataset

    cases, issues = scan_dataset(root)
    problems = [Problem(i.case, i.file, i.message) for i in issues]
    if require_labels:
        for case in (c for c in cases if c.seg is None):
            expected = case.dataset.naming.filename(case.case_id, "seg")
            problems.append(Problem(case.case_id, str(case.folder / expected),
                                    f"seg missing (looked for {expected}); training needs a label map for "
                                    "every case: add it or move the case out of the training set"))
    return cases, problems


def cache_dataset(cache: CaseCache, root: str | Path, workers: int | None = None,
                  require_labels: bool = False, progress: bool = True) -> tuple[list[Case], dict[str, int]]:
    """Check and cache every case under ``root``: (cases, build summary).

    Raises:
        DataProblems: every problem of the data set in one table (layout problems and every bad case); the
            clean cases are cached, the bad ones are not.
    """
    cases, problems = layout_problems(root, require_labels)
    bad = {p.case for p in problems}
    summary = {"built": 0, "reused": 0}
    try:
        summary = cache.build([c for c in cases if c.case_id not in bad], workers=workers, progress=progress)
    except DataProblems as err:
        problems += err.problems
    if problems:
        raise DataProblems(sorted(problems, key=lambda p: (p.case, p.file)), f"{root}", root,
                           fix=f"nothing was cached for these cases: fix or remove them (full report: "
                               f"`brats-lightning check-data {root}`), then rerun")
    return cases, summary


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``brats-lightning preprocess``."""
    parser.add_argument("data", type=Path, help="data set folder (one subfolder per case)")
    parser.add_argument("--pipeline", choices=sorted(PIPELINE_NORMALIZATION), required=True,
                        help="A: 1-99 percentile min-max; B: z-score (both over non-zero voxels)")
    parser.add_argument("--cache", type=Path, default=Path("cache"), help="cache folder (default: cache/)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"worker processes (default: CPU count, at most 8; here {default_workers()})")
    parser.add_argument("--cache-dtype", choices=CACHE_DTYPES, default="float32",
                        help="image dtype in the cache (float16: half the size; default float32)")


def run(args: argparse.Namespace) -> int:
    """Check and cache a data set for one pipeline; prints a one-line summary.

    Raises:
        DataProblems: every problem of the data set (exit 2; the clean cases are cached).
    """
    from rich.console import Console

    console = Console()
    normalization = PIPELINE_NORMALIZATION[args.pipeline]
    cache = CaseCache(args.cache, normalization, args.cache_dtype)
    start = time.perf_counter()
    cases, summary = cache_dataset(cache, args.data, workers=args.workers)
    where = cache.entry_dir(cases[0]).parent
    console.print(f"{len(cases)} cases, pipeline {args.pipeline} ({normalization}): "
                  f"built {summary['built']}, reused {summary['reused']} "
                  f"in {time.perf_counter() - start:.1f} s -> {where}")
    return 0
