"""Data set checks: find every problem in a BraTS folder and report them all at once (docs/method.md "Data").

``check_dataset(root)`` reads every file and reports: missing or doubled (``.nii`` and ``.nii.gz``)
modalities, stray case files at the root, duplicate case ids, seg files missing from some cases of a
labeled set, unreadable or truncated files (gzip errors), files that are not 3-D or whose pixdim disagrees
with their affine, files of one case whose shapes or affines differ, non-finite voxels, all-zero
modalities, non-integer label maps and labels outside the data set's convention (3 in 2020 data, 4 in 2023
data; 4 is the resection cavity of BraTS 2024 post-treatment glioma, :mod:`brats_lightning.data.datasets`).
``fast=True`` reads only headers (presence, readability, shapes, affines). ``brats-lightning check-data DIR``
prints the problems as one table and exits with 1 when there is any. The per-file checks
(:func:`check_header`, :func:`check_voxels`) also run inside ``preprocess``, training's cache, ``predict``
and ``merge`` on every file they read; :class:`DataProblems` is the error those commands raise.
"""

from __future__ import annotations

import argparse
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from brats_lightning.data.io import VolumeReadError, load_image, read_voxels
from brats_lightning.data.labels import (
    BRATS2020,
    BRATS2023,
    BRATS2024_GLI,
    LabelConvention,
    unexpected_labels,
)
from brats_lightning.data.layout import DATASET_FILE, MODALITIES, Case, scan_dataset
from brats_lightning.errors import UserError

AFFINE_TOLERANCE_MM = 1e-3
PIXDIM_TOLERANCE = 1e-3
"""Relative tolerance between a header's pixdim and the voxel sizes of its affine."""


@dataclass
class Problem:
    """One problem: the case id, the file concerned and a message (found, expected, what to do)."""

    case: str
    file: str
    message: str


def _label_hint(convention: LabelConvention, bad: Sequence[int]) -> str:
    """The fix for labels outside ``convention``. Relabelling 4 -> 3 is only ever suggested next to the
    other reading of a 4 under 2023 names: the resection cavity of BraTS 2024 post-treatment glioma."""
    if convention == BRATS2020 and BRATS2023.et in bad:
        return ("BraTS 2020/2021 data uses 4 for enhancing tumour: relabel 3 -> 4 if this is 2023-style "
                "data under 2020 names, or fix the segmentation")
    if convention == BRATS2023 and BRATS2024_GLI.rc in bad:
        return (f"4 is no {convention.name} label: if this is BraTS 2024 post-treatment glioma (4 = "
                f"resection cavity), declare it with a {DATASET_FILE} holding "
                f'{{"dataset": "{BRATS2024_GLI.name}"}} in the data folder; if it is 2020-style data under '
                "2023 names (4 = enhancing tumour), relabel 4 -> 3; otherwise fix the segmentation")
    return "fix or re-export the segmentation"


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel side lengths in mm implied by an affine (the norms of its first three columns)."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def check_header(case_id: str, name: str, path: Path, image: nib.Nifti1Image) -> list[Problem]:
    """Header problems of one file: not 3-D, or pixdim disagreeing with the affine.

    The affine is trusted over pixdim: it is what places the voxels in scanner space (nibabel, ITK and
    every viewer use it; predictions are written with it), while pixdim is a second copy of the voxel
    size that hand-edited or resampled headers often leave stale. They must agree to
    ``PIXDIM_TOLERANCE`` (relative): a mismatch is refused, since distances (HD95) would depend on which
    one a tool reads.
    """
    if len(image.shape) != 3:
        return [Problem(case_id, str(path), f"{name} has shape {tuple(image.shape)}; expected a 3-D volume: "
                                            "re-export it as a single 3-D NIfTI")]
    pixdim = np.asarray(image.header.get_zooms()[:3], dtype=np.float64)
    from_affine = voxel_sizes(image.affine)
    if not np.allclose(pixdim, from_affine, rtol=PIXDIM_TOLERANCE, atol=0):
        return [Problem(case_id, str(path),
                        f"{name} pixdim {tuple(np.round(pixdim, 4).tolist())} mm disagrees with its affine's "
                        f"voxel size {tuple(np.round(from_affine, 4).tolist())} mm; expected them equal (the "
                        "affine is trusted: it places the voxels in space): set pixdim from the affine "
                        "(nibabel: img.header.set_zooms(voxel sizes of img.affine)) or re-export the file")]
    return []


def check_voxels(case_id: str, name: str, path: Path, data: np.ndarray,
                 convention: LabelConvention) -> list[Problem]:
    """Voxel problems of one file: non-finite values; an all-zero image; for ``name == "seg"``
    non-integer labels or labels outside ``convention``."""
    problems: list[Problem] = []
    if data.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            problems.append(Problem(case_id, str(path),
                                    f"{name} holds {bad} non-finite voxels (NaN/inf); expected finite "
                                    "values: re-export the file or set those voxels to 0"))
            data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    if name != "seg":
        if not np.any(data):
            problems.append(Problem(case_id, str(path),
                                    f"{name} is all zeros; expected a brain image for each of "
                                    f"{', '.join(MODALITIES)}: re-export the sequence or drop the case"))
        return problems
    if data.dtype.kind == "f":
        fractional = data != np.rint(data)
        if fractional.any():
            examples = np.unique(data[fractional])[:3].tolist()
            problems.append(Problem(case_id, str(path),
                                    f"seg holds non-integer labels (e.g. {examples}, "
                                    f"{int(fractional.sum())} voxels); expected integer labels "
                                    f"{convention.labels}: re-export the segmentation with "
                                    "nearest-neighbour interpolation"))
            return problems
        data = np.rint(data).astype(np.int64)
    bad_labels = unexpected_labels(data, convention)
    if bad_labels:
        counts = ", ".join(f"{v}: {int(np.count_nonzero(data == v))} voxels" for v in bad_labels)
        problems.append(Problem(case_id, str(path),
                                f"seg holds label(s) {bad_labels} ({counts}) outside the "
                                f"{convention.name} set {convention.labels}; "
                                f"{_label_hint(convention, bad_labels)}"))
    return problems


def check_headers(case: Case) -> tuple[list[Problem], dict[str, nib.Nifti1Image]]:
    """Header problems of a case (readable, 3-D, pixdim vs affine, one grid and affine for all files) and
    the opened images by name (MODALITIES, then "seg"; unreadable files left out)."""
    problems: list[Problem] = []
    names = list(MODALITIES) + (["seg"] if case.seg is not None else [])
    headers = {}
    for name, path in zip(names, case.files, strict=True):
        try:
            headers[name] = load_image(path)
        except VolumeReadError as err:
            problems.append(Problem(case.case_id, str(path), f"{name} unreadable: {err}"))
    reference_name = next((n for n in names if n in headers), None)
    for name, path in zip(names, case.files, strict=True):
        if name not in headers:
            continue
        image = headers[name]
        problems += check_header(case.case_id, name, path, image)
        if len(image.shape) != 3 or name == reference_name:
            continue
        ref = headers[reference_name]
        if tuple(image.shape) != tuple(ref.shape):
            problems.append(Problem(case.case_id, str(path),
                                    f"{name} shape {tuple(image.shape)} differs from {reference_name}'s "
                                    f"{tuple(ref.shape)}; expected all files of a case on one grid: "
                                    "resample or re-export the case"))
        else:
            diff = float(np.max(np.abs(np.asarray(image.affine) - np.asarray(ref.affine))))
            if diff > AFFINE_TOLERANCE_MM:
                problems.append(Problem(case.case_id, str(path),
                                        f"{name} affine differs from {reference_name}'s (max difference "
                                        f"{diff:.4g}); expected all files of a case co-registered with one "
                                        "affine: re-register or re-export the case"))
    return problems, headers


def check_case(case: Case, fast: bool = False) -> list[Problem]:
    """Every problem of one case (see the module doc); ``fast`` reads headers only."""
    problems, headers = check_headers(case)
    if fast:
        return problems
    names = list(MODALITIES) + (["seg"] if case.seg is not None else [])
    for name, path in zip(names, case.files, strict=True):
        if name not in headers:
            continue
        try:
            data = read_voxels(headers[name], path)
        except VolumeReadError as err:
            problems.append(Problem(case.case_id, str(path), f"{name} unreadable: {err}"))
            continue
        problems += check_voxels(case.case_id, name, path, data, case.convention)
    return problems


def _check_case_job(args: tuple[Case, bool]) -> list[Problem]:
    return check_case(*args)


def check_cases(cases: Sequence[Case], fast: bool = False, workers: int = 1) -> list[Problem]:
    """Every problem of ``cases``, sorted by case and file (``workers`` processes; 1: in this process)."""
    problems: list[Problem] = []
    if workers > 1 and len(cases) > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(cases)), mp_context=context) as pool:
            for found in pool.map(_check_case_job, [(c, fast) for c in cases]):
                problems += found
    else:
        for case in cases:
            problems += check_case(case, fast)
    return sorted(problems, key=lambda p: (p.case, p.file))


def check_dataset(root: str | Path, fast: bool = False, workers: int = 1) -> list[Problem]:
    """Every problem of the data set under ``root`` (empty list when clean).

    Args:
        root: data set folder (one subfolder per case) or one case folder.
        fast: headers only (presence, readability, shapes, affines): no voxel reads.
        workers: processes for the per-case checks (1: in this process).
    """
    cases, issues = scan_dataset(root)
    problems = [Problem(i.case, i.file, i.message) for i in issues] + check_cases(cases, fast, workers)
    problems += _unlabeled_in_labeled_set(cases)
    return sorted(problems, key=lambda p: (p.case, p.file))


def _unlabeled_in_labeled_set(cases: Sequence[Case]) -> list[Problem]:
    """Cases without a seg file in a set where other cases have one (a training set missing labels)."""
    n_labeled = sum(case.has_labels for case in cases)
    if n_labeled in (0, len(cases)):
        return []
    problems = []
    for case in cases:
        if not case.has_labels:
            expected = case.dataset.naming.filename(case.case_id, "seg")
            problems.append(Problem(case.case_id, str(case.folder / expected),
                                    f"seg missing (looked for {expected} in {case.folder}) while {n_labeled} "
                                    f"of the {len(cases)} cases have one; expected every case of a training "
                                    "set labeled (a validation set has none): add the label map or move "
                                    "the case out"))
    return problems


def problems_table(problems: Sequence[Problem], root: str | Path | None = None, limit: int = 200) -> str:
    """Problems as plain-text lines ``case  file  message`` (paths relative to ``root``), for messages."""
    root = None if root is None else Path(root)
    lines = []
    for problem in problems[:limit]:
        path = Path(problem.file)
        shown = str(path.relative_to(root)) if root and path.is_relative_to(root) and path != root else path
        lines.append(f"  {problem.case}  {shown}: {problem.message}")
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


class DataProblems(UserError):
    """Bad input found by the checks: the message lists every problem (``problems`` keeps them)."""

    def __init__(self, problems: Sequence[Problem], what: str, root: str | Path | None = None,
                 fix: str = "fix or remove these cases, then rerun") -> None:
        self.problems = list(problems)
        n_cases = len({p.case for p in self.problems})
        super().__init__(f"{what}: {len(self.problems)} problem(s) in {n_cases} case(s):\n"
                         f"{problems_table(self.problems, root)}\n{fix}")


def describe_cases(root: str | Path, what: str = "cases") -> str:
    """``"6 cases (brats2020)"``: the number of complete cases found under ``root`` and their data sets."""
    cases = scan_dataset(root)[0]
    names = ", ".join(sorted({case.dataset.name for case in cases}))
    return f"{len(cases)} {what}" + (f" ({names})" if names else "")


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``brats-lightning check-data``."""
    from brats_lightning.data.preprocess import default_workers

    parser.add_argument("data", type=Path, help="data set folder (one subfolder per case) or one case folder")
    parser.add_argument("--fast", action="store_true",
                        help="headers only: presence, readability, shapes, affines (seconds)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes for the voxel checks (default: CPU count, at most 8)")


def run(args: argparse.Namespace) -> int:
    """Print every problem as one table; exit code 1 when there is any."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    problems = check_dataset(args.data, fast=args.fast, workers=args.workers)
    found = describe_cases(args.data, "cases" if not problems else "complete cases")
    mode = "headers only" if args.fast else "full check"
    if not problems:
        console.print(f"{found}, no problems ({mode}) in {args.data}")
        return 0
    table = Table(title=f"check-data {args.data} ({mode})", show_lines=False)
    table.add_column("case", style="bold", overflow="fold")
    table.add_column("file", overflow="fold")
    table.add_column("problem", overflow="fold")
    root = Path(args.data)
    for problem in problems:
        path = Path(problem.file)
        shown = str(path.relative_to(root)) if path.is_relative_to(root) and path != root else problem.file
        table.add_row(problem.case, shown, problem.message)
    console.print(table)
    n_bad = len({p.case for p in problems})
    console.print(f"[red]{len(problems)} problem(s) in {n_bad} case(s)[/red] "
                  f"({found} found)")
    return 1
