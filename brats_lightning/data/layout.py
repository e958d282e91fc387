"""Find BraTS cases on disk (docs/method.md "Data").

Two file namings are recognised, per case folder, and each case is matched to its data set in the registry
(:mod:`brats_lightning.data.datasets`) by its id:

- BraTS 2020/2021: ``BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii.gz``,
  ``BraTS2021_00000/BraTS2021_00000_{...}.nii.gz`` (labels 1, 2, 4)
- BraTS 2023 and later (GLI, MEN, MET, PED, SSA, GoAT; 2024 post-treatment GLI):
  ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (labels 1, 2, 3; 4 = RC in 2024)

A data folder may declare its data set in ``dataset.json`` (``{"dataset": "brats2024-gli"}``): needed where
names are shared (2024 post-treatment glioma is named like 2023 GLI). Uncompressed ``.nii`` files are
accepted too (one file per modality: ``.nii`` beside ``.nii.gz`` is refused). Channels are always returned
in the order ``MODALITIES = (t1, t1ce, t2, flair)``; the seg file is optional (validation and test sets have
none).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brats_lightning.data.datasets import (
    DATASETS,
    MODALITIES,
    NAMING_2020,
    NAMING_2023,
    DataSet,
    Naming,
    dataset_for_case,
    dataset_for_year,
    get_dataset,
)
from brats_lightning.data.labels import REGIONS, LabelConvention
from brats_lightning.errors import UserError

NIFTI_SUFFIXES: tuple[str, str] = (".nii.gz", ".nii")
DATASET_FILE = "dataset.json"
"""A data folder's own declaration of its data set: ``{"dataset": "<registry name>"}``."""

_FILE_RE = re.compile(
    r"^(?P<case>.+?)(?:_(?P<s20>t1|t1ce|t2|flair|seg)|-(?P<s23>t1n|t1c|t2w|t2f|seg))\.nii(?:\.gz)?$"
)


@dataclass(frozen=True)
class Case:
    """One patient: four image files in MODALITIES order, an optional label map and its data set."""

    case_id: str
    images: tuple[Path, Path, Path, Path]
    seg: Path | None
    dataset: DataSet

    @property
    def convention(self) -> LabelConvention:
        """The label codes of the case's data set."""
        return self.dataset.convention

    @property
    def has_labels(self) -> bool:
        """True when the case has a segmentation file (training data)."""
        return self.seg is not None

    @property
    def folder(self) -> Path:
        """The folder that holds the case's files."""
        return self.images[0].parent

    @property
    def files(self) -> tuple[Path, ...]:
        """All of the case's files: the four images, then the seg file when present."""
        return self.images + ((self.seg,) if self.seg is not None else ())


@dataclass(frozen=True)
class LayoutIssue:
    """A problem found while scanning a data set folder (reported by checks, raised by find_cases)."""

    case: str
    file: str
    message: str


class DataLayoutError(UserError, ValueError):
    """The data folder does not hold BraTS cases as expected; the message lists every problem."""


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))


def declared_dataset(root: str | Path) -> DataSet | None:
    """The data set ``root/dataset.json`` declares, or None without that file.

    Raises:
        UserError: the file is not JSON ``{"dataset": name}`` with a registry name.
    """
    path = Path(root) / DATASET_FILE
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text())["dataset"]
        return get_dataset(name)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: could not read the data set it declares ({err}); expected "
                        f'{{"dataset": NAME}} with NAME one of {", ".join(DATASETS)}: fix or delete the '
                        "file") from None


def _parse_folder(folder: Path, declared: DataSet | None, stray: bool = False
                  ) -> tuple[list[Case], list[LayoutIssue]]:
    """Read the cases held directly in ``folder`` (normally exactly one).

    ``stray``: ``folder`` is a data set root whose cases live in sub-folders, so files of an incomplete
    case here are reported as strays.
    """
    groups: dict[tuple[str, Naming], dict[str, list[Path]]] = {}
    for path in _nifti_files(folder):
        match = _FILE_RE.match(path.name)
        if match is None:
            continue
        naming = NAMING_2020 if match["s20"] else NAMING_2023
        suffix = match["s20"] or match["s23"]
        key = "seg" if suffix == "seg" else MODALITIES[naming.suffixes.index(suffix)]
        groups.setdefault((match["case"], naming), {}).setdefault(key, []).append(path)
    cases: list[Case] = []
    issues: list[LayoutIssue] = []
    for (case_id, naming), found in sorted(groups.items(), key=lambda item: item[0][0]):
        doubled = {key: paths for key, paths in found.items() if len(paths) > 1}
        for key, paths in doubled.items():
            names = " and ".join(p.name for p in paths)
            issues.append(LayoutIssue(
                case_id, str(paths[0]),
                f"{key} found twice ({names} in {folder}); expected one file per modality: delete the "
                f"copy you do not want (the suite will not pick one for you)"))
        missing = [m for m in MODALITIES if m not in found]
        if missing and stray:
            for paths in found.values():
                issues.append(LayoutIssue(
                    case_id, str(paths[0]),
                    f"stray file {paths[0].name} at the data set root {folder}, whose cases are in "
                    f"sub-folders; expected every case's files in its own folder: move it into "
                    f"{folder / case_id} or delete it"))
            continue
        if missing:
            if set(found) == {"seg"}:
                looked = ", ".join(naming.filename(case_id, m) for m in MODALITIES)
                issues.append(LayoutIssue(
                    case_id, str(found["seg"][0]),
                    f"a seg file without images (looked for {looked}) in {folder}; expected t1, t1ce, t2, "
                    f"flair next to it: add the images or remove the stray file"))
                continue
            for m in missing:
                issues.append(LayoutIssue(
                    case_id, str(folder / naming.filename(case_id, m)),
                    f"{m} missing (looked for {naming.filename(case_id, m)} in {folder}); expected "
                    f"{', '.join(MODALITIES)}: restore the file or move the case out of the data set"))
            continue
        if doubled:
            continue
        if declared is not None and declared.naming != naming:
            issues.append(LayoutIssue(
                case_id, str(found[MODALITIES[0]][0]),
                f"files named in the {naming.name} style, but {DATASET_FILE} declares {declared.name} "
                f"({declared.naming.name} names, e.g. {declared.naming.filename(declared.case_id(1), 't1')})"
                f": fix {DATASET_FILE} or move the case out"))
            continue
        dataset = declared or dataset_for_case(case_id, naming)
        images = tuple(found[m][0] for m in MODALITIES)
        seg = found["seg"][0] if "seg" in found else None
        cases.append(Case(case_id, images, seg, dataset))  # type: ignore[arg-type]
    return cases, issues


def scan_dataset(root: str | Path, dataset: str | DataSet | None = None
                 ) -> tuple[list[Case], list[LayoutIssue]]:
    """Find every case under ``root`` without raising: (cases sorted by id, problems found).

    ``root`` is either a data set folder (one subfolder per case) or a single case folder; sub-folders are
    always scanned, and case files lying at the root beside case folders are reported as strays. Cases
    with a missing or doubled modality are reported and left out; a case id found in two folders is
    reported and both copies are left out.

    Args:
        root: the folder.
        dataset: the registry entry every case belongs to; None: ``root/dataset.json`` when there is one,
            else each case's own name (:func:`brats_lightning.data.datasets.dataset_for_case`).
    """
    root = Path(root)
    if not root.is_dir():
        return [], [LayoutIssue("-", str(root), f"data folder {root} does not exist or is not a folder; "
                                                 "expected a BraTS data set folder (one subfolder per case)")]
    try:
        declared = get_dataset(dataset) if dataset is not None else declared_dataset(root)
    except UserError as err:
        return [], [LayoutIssue("-", str(root / DATASET_FILE), str(err))]
    cases: list[Case] = []
    issues: list[LayoutIssue] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        sub_cases, sub_issues = _parse_folder(sub, declared)
        cases += sub_cases
        issues += sub_issues
    root_cases, root_issues = _parse_folder(root, declared, stray=bool(cases or issues))
    cases += root_cases
    issues += root_issues
    by_id: dict[str, list[Case]] = {}
    for case in cases:
        by_id.setdefault(case.case_id, []).append(case)
    unique: list[Case] = []
    for case_id, copies in sorted(by_id.items()):
        if len(copies) == 1:
            unique.append(copies[0])
            continue
        folders = ", ".join(str(c.folder) for c in copies)
        for copy in copies:
            issues.append(LayoutIssue(
                case_id, str(copy.images[0]),
                f"duplicate case id: found in {len(copies)} folders ({folders}); expected each case once: "
                f"delete or move the extra copies"))
    if not unique and not issues:
        issues.append(LayoutIssue(
            "-", str(root),
            f"no BraTS cases found in {root}; expected one folder per case holding <case>_t1.nii.gz, "
            f"<case>_t1ce.nii.gz, <case>_t2.nii.gz, <case>_flair.nii.gz (2020/2021) or <case>-t1n.nii.gz, "
            f"<case>-t1c.nii.gz, <case>-t2w.nii.gz, <case>-t2f.nii.gz (2023 and later): point to the folder "
            f"that contains the case folders"))
    return unique, issues


def find_cases(root: str | Path, require_labels: bool = False, dataset: str | DataSet | None = None
               ) -> list[Case]:
    """All cases under ``root`` (data set folder or single case folder), sorted by case id.

    Args:
        root: a folder with one subfolder per case, or one case's folder.
        require_labels: raise when a case has no seg file (training data must be labeled).
        dataset: the data set of every case (see :func:`scan_dataset`); None: declared or from the names.

    Raises:
        DataLayoutError: nothing found, a modality missing or doubled, a stray file, a duplicated case id,
            or (with ``require_labels``) a seg file missing; the message lists every such problem.
    """
    cases, issues = scan_dataset(root, dataset)
    if require_labels:
        for case in cases:
            if case.seg is None:
                expected = case.dataset.naming.filename(case.case_id, "seg")
                issues.append(LayoutIssue(
                    case.case_id, str(case.folder / expected),
                    f"seg missing (looked for {expected} in {case.folder}); training needs labeled cases: "
                    f"add the label map or use a labeled data set"))
    if issues:
        lines = "\n".join(f"  case {i.case}: {i.message}" for i in issues)
        raise DataLayoutError(f"{len(issues)} problem(s) in data folder {Path(root)}:\n{lines}")
    return cases


def dataset_of(root: str | Path) -> DataSet:
    """The one data set of the folder ``root`` (declared, else from its case names; no file is read).

    Raises:
        DataLayoutError: no case found, or cases of data sets with different label conventions.
    """
    cases, issues = scan_dataset(root)
    if not cases:
        lines = "\n".join(f"  case {i.case}: {i.message}" for i in issues)
        raise DataLayoutError(f"no complete case in data folder {root}, so its data set is unknown:\n{lines}")
    found: dict[str, list[str]] = {}
    for case in cases:
        found.setdefault(case.dataset.name, []).append(case.case_id)
    conventions = {DATASETS[name].convention for name in found}
    if len(conventions) > 1:
        shown = "; ".join(f"{name}: {', '.join(ids[:3])}" for name, ids in sorted(found.items()))
        raise DataLayoutError(f"data folder {root} mixes data sets with different label codes ({shown}); "
                              "expected one BraTS edition per folder: split the folder")
    return DATASETS[max(found, key=lambda name: len(found[name]))]


def dataset_of_config(data: Mapping[str, Any]) -> DataSet:
    """The data set a ``data`` config describes (conf/data/*.yaml): the folder's own (:func:`dataset_of`)
    when ``data.root`` exists, else the one ``data.generate`` will write (``year``, ``task``)."""
    root = Path(str(data["root"]))
    generate = data.get("generate")
    if not root.exists() and generate:
        return dataset_for_year(int(generate.get("year", 2020)), generate.get("task"))
    return dataset_of(root)


def n_regions(data: Mapping[str, Any]) -> int:
    """The number of region channels of the data set a ``data`` config describes (3, or 4 with a
    resection cavity). A folder without usable cases gives the 3 tumour regions: the data check that runs
    before training then names its problems in a plain message (an error raised while a config is
    resolved would reach the user wrapped in a traceback)."""
    try:
        return len(dataset_of_config(data).regions)
    except UserError:
        return len(REGIONS)


def register_resolvers() -> None:
    """Register ``${n_regions:${data}}`` (:func:`n_regions`): conf/model/*.yaml set ``out_channels`` with
    it. Safe to call twice; importing this module calls it, so any code that reads a data config has it."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("n_regions"):
        OmegaConf.register_new_resolver("n_regions", n_regions)


def _label_file_case(path: Path, flat: bool) -> str | None:
    """The case id of a label file, or None when ``path`` is not one.

    Names ``<CASE>_seg`` / ``<CASE>-seg`` count everywhere; a bare ``<CASE>`` only in the flat root (where
    predictions-style names are common), and never a modality image such as ``<CASE>_t1``.
    """
    match = _FILE_RE.match(path.name)
    if match is not None:
        return match["case"] if "seg" in (match["s20"], match["s23"]) else None
    if not flat:
        return None
    return path.name.removesuffix(".gz").removesuffix(".nii")


def find_label_files(root: str | Path) -> dict[str, Path]:
    """Ground-truth label maps under ``root``, keyed by case id (sorted): label-only folders welcome.

    Accepted, and mixable: per-case folders holding ``<CASE>_seg.nii.gz`` or ``<CASE>-seg.nii.gz`` (alone,
    as challenge validation labels are distributed, or beside the four images of an ordinary data set),
    and flat files in ``root`` itself named ``<CASE>.nii.gz``, ``<CASE>_seg.nii.gz`` or
    ``<CASE>-seg.nii.gz``; ``.nii`` works everywhere. Other files are ignored.

    Raises:
        UserError: ``root`` is not a folder; no label file; a case id given by two files (say
            ``X.nii.gz`` and ``X_seg.nii``, or two folders); a case whose images are there but not its
            seg. The message lists every such file.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"ground-truth folder {root} does not exist or is not a folder; expected a folder "
                        "of label maps (<case>_seg.nii.gz per case folder, or flat <case>.nii.gz files)")
    found: dict[str, list[Path]] = {}
    unlabeled: list[str] = []
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        files = _nifti_files(folder)
        for path in files:
            case_id = _label_file_case(path, flat=folder == root)
            if case_id is not None:
                found.setdefault(case_id, []).append(path)
        matches = [_FILE_RE.match(p.name) for p in files]
        with_images = {m["case"] for m in matches if m is not None and "seg" not in (m["s20"], m["s23"])}
        unlabeled += [f"{case_id} in {folder}" for case_id in sorted(with_images) if case_id not in found]
    problems = [f"case {case_id}: {len(paths)} label files ({', '.join(map(str, paths))}); expected one: "
                "delete or move the extra ones" for case_id, paths in sorted(found.items()) if len(paths) > 1]
    problems += [f"case {where}: images but no seg file; expected <case>_seg.nii.gz or <case>-seg.nii.gz "
                 "next to them: add the label map or move the case out" for where in unlabeled]
    if problems:
        listed = "\n  ".join(problems)
        raise UserError(f"{len(problems)} problem(s) in ground-truth folder {root}:\n  {listed}")
    if not found:
        raise UserError(f"no label files found in {root}; expected per-case folders holding "
                        "<case>_seg.nii.gz (or <case>-seg.nii.gz), or flat <case>.nii.gz / <case>_seg.nii.gz "
                        "files: point to the folder that holds them")
    return {case_id: paths[0] for case_id, paths in sorted(found.items())}


register_resolvers()
