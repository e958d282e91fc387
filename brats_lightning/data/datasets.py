"""The BraTS data sets the suite knows, defined once as data (docs/method.md "Data").

Each :class:`DataSet` says how its files are named, how its cases are called, which label convention its
segmentations use (codes, class names, regions) and which scoring rules rank it (``evaluate --rules``).
Everything that needs to know "which BraTS is this" (discovery in :mod:`brats_lightning.data.layout`,
check-data, training, predict, merge, evaluate, ``synth``) reads it from :data:`DATASETS`.

- ``brats2020`` (``BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz``...) and ``brats2021``
  (``BraTS2021_00000``): labels 1 NCR/NET, 2 ED, 4 ET; rules ``brats2020``.
- ``brats2023-gli``, ``-men``, ``-met``, ``-ped``, ``-ssa``, ``-goat``
  (``BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz``...): labels 1 NETC, 2 SNFH, 3 ET; rules
  ``brats2023-<task>`` (GoAT: ``brats2023-gli``).
- ``brats2024-gli``, post-treatment glioma (named like 2023 GLI): labels 1 NETC, 2 SNFH, 3 ET, 4 RC
  (resection cavity, a fourth region); rules ``brats2024-gli``.

BraTS 2024 post-treatment glioma names its cases and files exactly as 2023 GLI does, so names alone cannot
tell the two apart: such a folder declares itself in a ``dataset.json`` file (``{"dataset":
"brats2024-gli"}``, :func:`brats_lightning.data.layout.declared_dataset`); ``synth --year 2024`` writes one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from brats_lightning.data.labels import BRATS2020, BRATS2023, BRATS2024_GLI, LabelConvention

MODALITIES: tuple[str, str, str, str] = ("t1", "t1ce", "t2", "flair")
"""The network's input channels, in this order, whatever a data set calls its files."""


@dataclass(frozen=True)
class Naming:
    """How a family of BraTS data sets names a case's files: ``<case_id><sep><suffix>.nii.gz``."""

    name: str
    sep: str
    suffixes: tuple[str, str, str, str]  # in MODALITIES order
    seg: str

    def filename(self, case_id: str, key: str, ext: str = ".nii.gz") -> str:
        """File name of modality ``key`` (one of MODALITIES, or "seg") of ``case_id``."""
        suffix = self.seg if key == "seg" else self.suffixes[MODALITIES.index(key)]
        return f"{case_id}{self.sep}{suffix}{ext}"


NAMING_2020 = Naming("brats2020", "_", ("t1", "t1ce", "t2", "flair"), "seg")
NAMING_2023 = Naming("brats2023", "-", ("t1n", "t1c", "t2w", "t2f"), "seg")


@dataclass(frozen=True)
class DataSet:
    """One BraTS data set: naming, case ids, label convention and scoring rules.

    Attributes:
        name: registry key, ``brats<year>`` or ``brats<year>-<task>`` (``brats2023-gli``).
        title: human-readable name.
        year: the challenge year.
        task: the 2023+ sub-challenge (``GLI``, ``MEN``, ``MET``, ``PED``, ``SSA``, ``GoAT``), None before.
        naming: file naming.
        case_ids: regular expression a case id of this set matches.
        id_format: ``str.format`` pattern of a case id from its 1-based index (``synth``).
        convention: label codes, class names and regions.
        rules: the ``evaluate --rules`` name that ranks this set.
        by_name: False where another entry has the same names (the folder must declare this set).
    """

    name: str
    title: str
    year: int
    task: str | None
    naming: Naming
    case_ids: str
    id_format: str
    convention: LabelConvention
    rules: str
    by_name: bool = True

    @property
    def regions(self) -> tuple[str, ...]:
        """The region channels the network predicts for this set (ET, TC, WT[, RC])."""
        return self.convention.regions

    def case_id(self, index: int) -> str:
        """The id of case ``index`` (1-based) in this set's style, e.g. ``BraTS-MEN-00007-000``."""
        return self.id_format.format(index=index)

    def matches(self, case_id: str) -> bool:
        """True when ``case_id`` is named like this set's cases."""
        return re.fullmatch(self.case_ids, case_id) is not None


def _task_2023(task: str, title: str, rules: str | None = None) -> DataSet:
    return DataSet(
        f"brats2023-{task.lower()}", f"BraTS 2023 {title} ({task})", 2023, task, NAMING_2023,
        rf"BraTS-{task}-\d{{5}}(-\d{{3}})?", f"BraTS-{task}-{{index:05d}}-000", BRATS2023,
        rules or f"brats2023-{task.lower()}")


DATASETS: dict[str, DataSet] = {ds.name: ds for ds in (
    DataSet("brats2020", "BraTS 2020", 2020, None, NAMING_2020, r"BraTS20_[A-Za-z]+_\d+",
            "BraTS20_Training_{index:03d}", BRATS2020, "brats2020"),
    DataSet("brats2021", "BraTS 2021", 2021, None, NAMING_2020, r"BraTS2021_\d+", "BraTS2021_{index:05d}",
            BRATS2020, "brats2020"),
    _task_2023("GLI", "adult glioma"),
    _task_2023("MEN", "meningioma"),
    _task_2023("MET", "brain metastases"),
    _task_2023("PED", "pediatric tumours"),
    _task_2023("SSA", "sub-Saharan Africa glioma"),
    # The GoAT scorer ranks each case with the rules of its source cohort (a mapping the organisers keep);
    # without that mapping the glioma rules are the closest fit.
    _task_2023("GoAT", "generalizability across tumours", rules="brats2023-gli"),
    DataSet("brats2024-gli", "BraTS 2024 post-treatment glioma (GLI)", 2024, "GLI", NAMING_2023,
            r"BraTS-GLI-\d{5}(-\d{3})?", "BraTS-GLI-{index:05d}-100", BRATS2024_GLI, "brats2024-gli",
            by_name=False),
)}

TASKS: tuple[str, ...] = tuple(ds.task for ds in DATASETS.values() if ds.year == 2023)  # type: ignore[misc]
"""The 2023 sub-challenges, as ``synth --task`` spells them."""


def get_dataset(name: str | DataSet) -> DataSet:
    """The registry entry called ``name`` (a DataSet passes through unchanged)."""
    if isinstance(name, DataSet):
        return name
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(DATASETS)}") from None


def dataset_for_year(year: int, task: str | None = None) -> DataSet:
    """The entry of challenge ``year`` (and 2023 sub-challenge ``task``; GLI when None): ``synth --year``."""
    if year == 2023:
        task = task or "GLI"
        matches = [ds for ds in DATASETS.values() if ds.year == 2023 and ds.task.lower() == task.lower()]
    else:
        if task not in (None, "GLI"):
            raise ValueError(f"--task {task} exists for --year 2023 only; got --year {year}")
        matches = [ds for ds in DATASETS.values() if ds.year == year]
    if not matches:
        years = sorted({ds.year for ds in DATASETS.values()})
        raise ValueError(f"no BraTS data set for year {year}, task {task}; expected a year in {years} "
                         f"(tasks {', '.join(TASKS)} for 2023)")
    return matches[0]


def match_dataset(case_id: str) -> DataSet | None:
    """The entry recognised by name (``by_name``) whose case ids ``case_id`` looks like; None: no entry.

    A ``BraTS-GLI-...`` id gives brats2023-gli: BraTS 2024 post-treatment glioma shares its names and has
    to be declared (``dataset.json``, :func:`brats_lightning.data.layout.declared_dataset`).
    """
    return next((ds for ds in DATASETS.values() if ds.by_name and ds.matches(case_id)), None)


def dataset_for_case(case_id: str, naming: Naming) -> DataSet:
    """The entry of a case called ``case_id`` whose files are named by ``naming``.

    :func:`match_dataset` when its naming agrees; otherwise the first entry with that file naming
    (brats2020 for ``_t1`` files, brats2023-gli for ``-t1n`` files), so renamed cases keep working with
    the right label codes.
    """
    matched = match_dataset(case_id)
    if matched is not None and matched.naming == naming:
        return matched
    return next(ds for ds in DATASETS.values() if ds.naming == naming and ds.by_name)
