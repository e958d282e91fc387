"""Find BraTS cases on disk (docs/method.md "Data").

Three namings are recognised, per case folder:

- BraTS 2020: ``BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii.gz``
- BraTS 2021: ``BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz`` (2020 labels)
- BraTS 2023 (GLI and the other 2023 sub-challenges):
  ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (ET label 3)

Uncompressed ``.nii`` files are accepted too. Channels are always returned in the order
``MODALITIES = (t1, t1ce, t2, flair)``; the seg file is optional (validation and test sets have none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from brats_lightning.data.labels import BRATS2020, BRATS2023, LabelConvention
from brats_lightning.errors import UserError

MODALITIES: tuple[str, str, str, str] = ("t1", "t1ce", "t2", "flair")
NIFTI_SUFFIXES: tuple[str, str] = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Naming:
    """How one BraTS edition names a case's files: ``<case_id><sep><suffix>.nii.gz``."""

    name: str
    sep: str
    suffixes: tuple[str, str, str, str]  # in MODALITIES order
    seg: str
    convention: LabelConvention

    def filename(self, case_id: str, key: str, ext: str = ".nii.gz") -> str:
        """File name of modality ``key`` (one of MODALITIES, or "seg") of ``case_id``."""
        suffix = self.seg if key == "seg" else self.suffixes[MODALITIES.index(key)]
        return f"{case_id}{self.sep}{suffix}{ext}"


NAMING_2020 = Naming("brats2020", "_", ("t1", "t1ce", "t2", "flair"), "seg", BRATS2020)
NAMING_2023 = Naming("brats2023", "-", ("t1n", "t1c", "t2w", "t2f"), "seg", BRATS2023)
NAMINGS: tuple[Naming, Naming] = (NAMING_2020, NAMING_2023)

_FILE_RE = re.compile(
    r"^(?P<case>.+?)(?:_(?P<s20>t1|t1ce|t2|flair|seg)|-(?P<s23>t1n|t1c|t2w|t2f|seg))\.nii(?:\.gz)?$"
)


@dataclass(frozen=True)
class Case:
    """One patient: four image files in MODALITIES order and an optional label map."""

    case_id: str
    images: tuple[Path, Path, Path, Path]
    seg: Path | None
    convention: LabelConvention

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


def _parse_folder(folder: Path) -> tuple[list[Case], list[LayoutIssue]]:
    """Read the cases held directly in ``folder`` (normally exactly one)."""
    groups: dict[tuple[str, Naming], dict[str, Path]] = {}
    for path in _nifti_files(folder):
        match = _FILE_RE.match(path.name)
        if match is None:
            continue
        naming = NAMING_2020 if match["s20"] else NAMING_2023
        suffix = match["s20"] or match["s23"]
        key = "seg" if suffix == "seg" else MODALITIES[naming.suffixes.index(suffix)]
        groups.setdefault((match["case"], naming), {}).setdefault(key, path)
    cases: list[Case] = []
    issues: list[LayoutIssue] = []
    for (case_id, naming), found in sorted(groups.items(), key=lambda item: item[0][0]):
        missing = [m for m in MODALITIES if m not in found]
        if missing:
            if set(found) == {"seg"}:
                looked = ", ".join(naming.filename(case_id, m) for m in MODALITIES)
                issues.append(LayoutIssue(
                    case_id, str(found["seg"]),
                    f"a seg file without images (looked for {looked}) in {folder}; expected t1, t1ce, t2, "
                    f"flair next to it: add the images or remove the stray file"))
                continue
            for m in missing:
                issues.append(LayoutIssue(
                    case_id, str(folder / naming.filename(case_id, m)),
                    f"{m} missing (looked for {naming.filename(case_id, m)} in {folder}); expected "
                    f"{', '.join(MODALITIES)}: restore the file or move the case out of the data set"))
            continue
        images = tuple(found[m] for m in MODALITIES)
        cases.append(Case(case_id, images, found.get("seg"), naming.convention))  # type: ignore[arg-type]
    return cases, issues


def scan_dataset(root: str | Path) -> tuple[list[Case], list[LayoutIssue]]:
    """Find every case under ``root`` without raising: (cases sorted by id, problems found).

    ``root`` is either a data set folder (one subfolder per case) or a single case folder. Cases with a
    missing modality are reported and left out; a case id found in two folders is reported and both
    copies are left out.
    """
    root = Path(root)
    if not root.is_dir():
        return [], [LayoutIssue("-", str(root), f"data folder {root} does not exist or is not a folder; "
                                                 "expected a BraTS data set folder (one subfolder per case)")]
    cases, issues = _parse_folder(root)
    if not cases and not issues:
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            sub_cases, sub_issues = _parse_folder(sub)
            cases += sub_cases
            issues += sub_issues
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
            f"<case>-t1c.nii.gz, <case>-t2w.nii.gz, <case>-t2f.nii.gz (2023): point to the folder that "
            f"contains the case folders"))
    return unique, issues


def find_cases(root: str | Path, require_labels: bool = False) -> list[Case]:
    """All cases under ``root`` (data set folder or single case folder), sorted by case id.

    Args:
        root: a folder with one subfolder per case, or one case's folder.
        require_labels: raise when a case has no seg file (training data must be labeled).

    Raises:
        DataLayoutError: nothing found, a modality missing, a duplicated case id, or (with
            ``require_labels``) a seg file missing; the message lists every such problem.
    """
    cases, issues = scan_dataset(root)
    if require_labels:
        naming = {BRATS2020.name: NAMING_2020, BRATS2023.name: NAMING_2023}
        for case in cases:
            if case.seg is None:
                expected = naming[case.convention.name].filename(case.case_id, "seg")
                issues.append(LayoutIssue(
                    case.case_id, str(case.folder / expected),
                    f"seg missing (looked for {expected} in {case.folder}); training needs labeled cases: "
                    f"add the label map or use a labeled data set"))
    if issues:
        lines = "\n".join(f"  case {i.case}: {i.message}" for i in issues)
        raise DataLayoutError(f"{len(issues)} problem(s) in data folder {Path(root)}:\n{lines}")
    return cases


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
