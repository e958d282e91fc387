"""Score label maps against ground truth with the BraTS rules: 2020 (docs/method.md Evaluation; paper Tables
3-4) or the lesion-wise rules of the 2023 challenges (:mod:`brats_lightning.lesionwise`).

Command line::

    brats-lightning evaluate --pred DIR --gt DIR --out DIR [--rules NAME] [--missing error|empty]
                             [--resample] [--label NAME] [--workers N]
                             [--convention auto|brats2020|brats2023|...] [--spacing SX SY SZ]

Inputs:

* ``--pred``: one label map per case, ``<CASE>.nii.gz`` (BraTS submission naming, as written by
  ``brats-lightning predict`` / ``merge``; ``*_unc_*`` uncertainty maps are ignored). A folder whose
  ``prediction.json`` says it is incomplete (an interrupted predict or merge) is refused. Files named like a
  case but otherwise (``<CASE>.nii``, ``<CASE>_seg.nii.gz``, ``<CASE>-seg.nii.gz``) are refused by name.
  Label codes follow the folder's ``prediction.json`` ``label_convention`` when there is one, else each
  case's ground truth convention (``--convention`` overrides both).
* ``--gt``: the ground truth: a BraTS data set folder, or label files alone (per-case folders holding only
  ``<CASE>_seg.nii.gz`` / ``<CASE>-seg.nii.gz``, or flat ``<CASE>.nii.gz`` files), found with
  :func:`brats_lightning.data.layout.find_label_files`. Label codes per case from its data set
  (:mod:`brats_lightning.data.datasets`: ET 4 in 2020/2021, 3 from 2023; a ``dataset.json`` declares it).
  ET, TC and WT are scored; the 2024 rules score their own regions (``brats2024-gli``: ET, TC, WT, NETC,
  SNFH and the resection cavity RC, from :func:`brats_lightning.data.labels.region_masks`).

Every case of the ground truth needs a prediction: a missing one is an error unless ``--missing empty``
scores it as an empty prediction (the BraTS rule; report.md lists them). A prediction on another grid
(shape or affine) than its ground truth is an error unless ``--resample`` resamples it (nearest neighbour)
onto the ground truth grid. Voxel spacing for HD95 and lesion volumes comes from the ground truth: its header
zooms, or its affine when the two disagree (the affine places the voxels in the world, as nibabel does;
reported), unless ``--spacing`` is given.

Outputs in ``--out``, all written to a temporary folder that then replaces ``--out`` in one rename (a killed
run leaves the previous complete output or the new one, never a mix); columns in docs/contracts.md:

* ``cases.csv``: one row per case, ``case`` then :data:`brats_lightning.metrics.METRIC_KEYS`; with
  lesion-wise rules then :data:`brats_lightning.lesionwise.LESION_KEYS` (2024 rules: both for every region
  they score, e.g. ET, TC, WT, NETC, SNFH, RC for ``brats2024-gli``). HD95 in mm.
* ``summary.csv``: BraTS portal style, first column ``Label`` with rows ``Mean, StdDev, Median,
  25quantile, 75quantile`` (StdDev is the sample standard deviation, ddof = 1; quantiles use linear
  interpolation), then the metric columns (the lesion-wise ones first).
* ``report.md``: the means (lesion-wise first when the rules have them), the full summary, the cases scored
  without a prediction and every ground truth whose pixdim disagreed with its affine.
* ``boxplots.png``: per-case metrics per region (:func:`brats_lightning.plots.metric_boxplots`).
* ``evaluation.json``: the rules and options the scores were made with.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from brats_lightning.data.datasets import DATASETS, NAMING_2020, NAMING_2023, dataset_for_case
from brats_lightning.data.io import VolumeReadError, load_volume, to_label_map
from brats_lightning.data.labels import (
    CONVENTIONS,
    LabelConvention,
    get_convention,
    labels_to_regions,
    region_masks,
    unexpected_labels,
)
from brats_lightning.data.layout import declared_dataset, find_label_files
from brats_lightning.errors import UserError
from brats_lightning.lesionwise import RULES, case_lesion_metrics, lesion_keys, metric_keys
from brats_lightning.metrics import METRIC_KEYS, REGION_NAMES, case_metrics
from brats_lightning.plots import metric_boxplots
from brats_lightning.predictions import label_map_paths, require_complete

log = logging.getLogger(__name__)

CASES_FILE = "cases.csv"
SUMMARY_FILE = "summary.csv"
REPORT_FILE = "report.md"
BOXPLOT_FILE = "boxplots.png"
EVALUATION_FILE = "evaluation.json"
OUTPUT_FILES: tuple[str, ...] = (CASES_FILE, SUMMARY_FILE, REPORT_FILE, BOXPLOT_FILE, EVALUATION_FILE)
DEFAULT_RULES = "brats2020"
RULE_NAMES: tuple[str, ...] = (DEFAULT_RULES, *RULES)
"""``--rules`` choices: brats2020, then the lesion-wise ones (:data:`brats_lightning.lesionwise.RULES`)."""
CASE_COLUMNS: tuple[str, ...] = ("case", *METRIC_KEYS)
SUMMARY_ROWS: tuple[str, ...] = ("Mean", "StdDev", "Median", "25quantile", "75quantile")


def scored_regions(rules: str) -> tuple[str, ...]:
    """The regions ``rules`` scores (cases.csv spelling): et, tc, wt, and more under some 2024 rules."""
    return REGION_NAMES if rules == DEFAULT_RULES else RULES[rules].scored


def case_columns(rules: str) -> tuple[str, ...]:
    """The columns of ``cases.csv`` under ``rules``."""
    if rules == DEFAULT_RULES:
        return CASE_COLUMNS
    regions = scored_regions(rules)
    return ("case", *metric_keys(regions), *lesion_keys(regions))


def _regions_of(columns: Sequence[str]) -> tuple[str, ...]:
    """The regions a table's ``dice_<region>`` columns name, in table order."""
    return tuple(c.removeprefix("dice_") for c in columns if c.startswith("dice_"))


def summary_columns(columns: Sequence[str]) -> list[str]:
    """Metric columns of ``summary.csv``: the lesion-wise ones first (they rank), then the full-volume."""
    regions = _regions_of(columns)
    return [c for c in (*lesion_keys(regions), *metric_keys(regions)) if c in columns]


@dataclass(frozen=True)
class CaseJob:
    """What one worker needs to score one case (picklable)."""

    case_id: str
    seg: Path
    gt_convention: LabelConvention
    pred: Path | None
    pred_convention: LabelConvention
    spacing: tuple[float, float, float] | None
    rules: str
    resample: bool


def _read_labels(path: Path, convention: LabelConvention, what: str, case_id: str, fix: str
                 ) -> tuple[np.ndarray, Any]:
    try:
        data, image = load_volume(path, dtype=None)
        if data.ndim != 3:
            raise ValueError(f"{path} has shape {data.shape}; expected a 3D label map")
        labels = to_label_map(data, path)
    except (VolumeReadError, ValueError) as err:
        raise UserError(f"case {case_id}: {what} {path}: {err}") from None
    bad = unexpected_labels(labels, convention)
    if bad:
        raise UserError(f"case {case_id}: {what} {path} holds label codes {bad}; expected "
                        f"{list(convention.labels)} ({convention.name}): {fix}")
    return labels, image


def _voxel_size(image: Any, path: Path, case_id: str) -> tuple[tuple[float, float, float], str | None]:
    """The ground truth's voxel size in mm and, when its header pixdim disagrees with its affine, a note.

    The affine wins: it is what places the voxels in the world (nibabel's and every viewer's grid).
    """
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    from_affine = tuple(float(v) for v in np.sqrt((np.asarray(image.affine)[:3, :3] ** 2).sum(axis=0)))
    if np.allclose(zooms, from_affine, rtol=1e-4, atol=1e-4):
        return zooms, None  # the header's float32 zooms, as the official scorers read them
    note = (f"case {case_id}: ground truth {path}: header pixdim {tuple(round(z, 4) for z in zooms)} "
            f"disagrees with the affine's voxel size {tuple(round(v, 4) for v in from_affine)} mm; the "
            "affine is trusted (it places the voxels in the world)")
    return from_affine, note  # type: ignore[return-value]


def _on_gt_grid(pred: np.ndarray, pred_image: Any, gt_image: Any, job: CaseJob) -> tuple[np.ndarray, bool]:
    """The prediction on the ground truth grid: as it is, or resampled with ``job.resample``, else refused."""
    same_shape = pred.shape == tuple(gt_image.shape[:3])
    if same_shape and np.allclose(pred_image.affine, gt_image.affine, atol=1e-3):
        return pred, False
    if not job.resample:
        raise UserError(
            f"case {job.case_id}: prediction {job.pred} is on another grid than the ground truth {job.seg} "
            f"(shape {pred.shape} vs {tuple(gt_image.shape[:3])}, affines "
            f"{'equal' if np.allclose(pred_image.affine, gt_image.affine, atol=1e-3) else 'differ'}); "
            "expected label maps on the ground truth grid (predict pastes the brain box back into it): "
            "pass --resample to resample it onto the ground truth grid (nearest neighbour)")
    import nibabel as nib
    from nibabel.processing import resample_from_to

    moved = resample_from_to(nib.Nifti1Image(pred, pred_image.affine), (gt_image.shape[:3], gt_image.affine),
                             order=0, mode="constant", cval=0)
    return np.asarray(moved.dataobj).astype(np.uint8), True


def score_case(job: CaseJob) -> dict[str, Any]:
    """Load one case's ground truth and prediction (empty when ``job.pred`` is None) and score it.

    Returns:
        ``{"case", <metric columns>}`` plus ``"_notes"`` (pixdim warnings) and ``"_resampled"``.

    Raises:
        UserError: a file can't be read, holds illegal codes, or the prediction is on another grid.
    """
    gt, gt_image = _read_labels(job.seg, job.gt_convention, "ground truth", job.case_id,
                                "fix the ground truth, or declare its data set in dataset.json")
    spacing, note = _voxel_size(gt_image, job.seg, job.case_id)
    spacing = job.spacing or spacing
    resampled = False
    if job.pred is None:
        pred = np.zeros_like(gt)
    else:
        pred, pred_image = _read_labels(job.pred, job.pred_convention, "prediction", job.case_id,
                                        "pass --convention to say which codes the predictions use")
        pred, resampled = _on_gt_grid(pred, pred_image, gt_image, job)
    if job.rules != DEFAULT_RULES and RULES[job.rules].tissues:  # 2024 rules: their own regions (RC too)
        formed = RULES[job.rules].formed
        pred_regions = region_masks(pred, job.pred_convention, formed)
        gt_regions = region_masks(gt, job.gt_convention, formed)
    else:
        pred_regions = labels_to_regions(pred, job.pred_convention)[:3]  # ET, TC, WT (not a cavity)
        gt_regions = labels_to_regions(gt, job.gt_convention)[:3]
    if job.rules == DEFAULT_RULES:
        metrics = case_metrics(pred_regions, gt_regions, spacing=spacing)
    else:
        metrics = case_lesion_metrics(pred_regions, gt_regions, spacing, RULES[job.rules])
    return {"case": job.case_id, **metrics, "_notes": [note] if note else [], "_resampled": resampled}


def _score_or_problem(job: CaseJob) -> dict[str, Any]:
    """:func:`score_case`, with a user error returned as ``{"case", "_problem"}`` so that all are listed."""
    try:
        return score_case(job)
    except UserError as err:
        return {"case": job.case_id, "_problem": str(err)}


def summarize(cases: pd.DataFrame) -> pd.DataFrame:
    """BraTS portal summary of per-case metrics: Mean, StdDev (ddof=1), Median, 25quantile, 75quantile."""
    values = cases[summary_columns(cases.columns)].astype(float)
    summary = pd.DataFrame([values.mean(), values.std(ddof=1), values.median(),
                            values.quantile(0.25), values.quantile(0.75)], index=list(SUMMARY_ROWS))
    summary.index.name = "Label"
    return summary


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (GitHub style) of string cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _format(value: float, key: str) -> str:
    """HD95 in mm with 2 decimals, specificity with 5 (it sits near 1), lesion counts with 2, else 4."""
    if np.isnan(value):  # e.g. the standard deviation of a single case
        return "-"
    digits = 2 if "hd95" in key or key.startswith(("lw_tp", "lw_fp", "lw_fn")) else 5 if key.startswith(
        "spec") else 4
    return f"{value:.{digits}f}"


def _means_table(label: str, means: pd.Series, metrics: Sequence[tuple[str, str]],
                 regions: Sequence[str] = REGION_NAMES) -> str:
    header = [f"{name} {region.upper()}" for _, name in metrics for region in regions]
    cells = [_format(means[f"{key}_{region}"], key) for key, _ in metrics for region in regions]
    return markdown_table(["Mean", *header], [[label, *cells]])


def report_markdown(cases: pd.DataFrame, summary: pd.DataFrame, label: str, rules: str = DEFAULT_RULES,
                    missing: Sequence[str] = (), notes: Sequence[str] = (),
                    resampled: Sequence[str] = ()) -> str:
    """``report.md``: the means (lesion-wise first), the portal summary, what was scored in a special way."""
    means = summary.loc["Mean"]
    regions = scored_regions(rules)
    parts = [f"# Evaluation: {label}", ""]
    if rules == DEFAULT_RULES:
        parts += [f"{len(cases)} cases, BraTS 2020 rules (docs/method.md Evaluation); HD95 in mm.", ""]
    else:
        lesion = RULES[rules]
        parts += [f"{len(cases)} cases, {rules} lesion-wise rules (the official {lesion.challenge} scorer: "
                  f"{lesion.describe()}; brats_lightning/lesionwise.py); HD95 in mm.", "",
                  "## Lesion-wise means (what ranks)", "",
                  _means_table(label, means, (("lw_dice", "LW Dice"), ("lw_hd95", "LW HD95")), regions), "",
                  "Lesions per case (mean): "
                  + ", ".join(f"{kind.upper()} " + " / ".join(_format(means[f"lw_{kind}_{r}"], f"lw_{kind}")
                                                             for r in regions)
                              for kind in ("tp", "fp", "fn"))
                  + f" ({' / '.join(r.upper() for r in regions)})", ""]
    rows = [[row, *(_format(summary.loc[row, k], k) for k in summary.columns)] for row in SUMMARY_ROWS]
    parts += ["## Full-volume means", "",
              _means_table(label, means, (("dice", "Dice"), ("hd95", "HD95")), regions),
              "", "## Summary (BraTS portal style)", "", markdown_table(["", *summary.columns], rows), "",
              f"Per-case values: `{CASES_FILE}`; box plots: `{BOXPLOT_FILE}`.", ""]
    if missing:
        parts += [f"**{len(missing)} case(s) had no prediction and were scored as empty predictions "
                  "(--missing empty, the BraTS rule):** " + ", ".join(missing), ""]
    if resampled:
        parts += [f"**{len(resampled)} prediction(s) were resampled onto the ground truth grid (--resample, "
                  "nearest neighbour):** " + ", ".join(resampled), ""]
    if notes:
        parts += ["**Ground truth headers:**", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(parts)


def _prediction_convention(manifest: dict | None, convention: str | LabelConvention
                           ) -> LabelConvention | None:
    """The predictions' label codes: the override, else the folder's prediction.json, else None (per case)."""
    if convention != "auto":
        return get_convention(convention)
    manifest = manifest or {}
    return get_convention(manifest["label_convention"]) if manifest.get("label_convention") else None


def _gt_convention(case_id: str, path: Path, declared: Any) -> LabelConvention:
    """A ground-truth case's label codes: the declared data set's, else the one its name belongs to."""
    if declared is not None:
        return declared.convention
    named = [ds for ds in DATASETS.values() if ds.by_name and ds.matches(case_id)]
    if named:
        return named[0].convention
    name = path.name.removesuffix(".gz").removesuffix(".nii")
    if name.endswith(("_seg", "-seg")):
        return dataset_for_case(case_id, NAMING_2020 if name.endswith("_seg") else NAMING_2023).convention
    raise UserError(f"case {case_id}: ground truth {path}: its name does not say which BraTS label codes it "
                    f"uses; expected a BraTS case id (e.g. BraTS20_Training_001, BraTS-GLI-00000-000) or a "
                    f'<case>_seg / <case>-seg name: add dataset.json {{"dataset": NAME}} to the ground truth '
                    f"folder (NAME one of {', '.join(DATASETS)})")


_MISNAMED = re.compile(r"^(?P<case>.+?)(?:[_-]seg)?\.nii(?:\.gz)?$")


def _misnamed_predictions(pred_dir: Path, found: Collection[str], case_ids: Collection[str]) -> list[str]:
    """Files of ``pred_dir`` that name a ground truth case without the expected ``<CASE>.nii.gz``."""
    problems = []
    for path in sorted(pred_dir.iterdir()):
        match = _MISNAMED.match(path.name)
        if not path.is_file() or match is None or path.name.startswith("."):
            continue
        case_id = match["case"]
        if case_id in case_ids and path.name != f"{case_id}.nii.gz":
            problems.append(f"{path}: named like case {case_id} but expected {case_id}.nii.gz"
                            + (" (that file exists too: remove this one)" if case_id in found else
                               ": rename it (predict and merge write <CASE>.nii.gz)"))
    return problems


def _run_jobs(jobs: list[CaseJob], workers: int) -> list[dict[str, Any]]:
    columns = (TextColumn("evaluate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    results = []
    with Progress(*columns, transient=False) as progress, ExitStack() as stack:
        task = progress.add_task("cases", total=len(jobs))
        mapper: Callable = map
        if workers > 1:  # spawn: never fork a parent that may hold torch / OpenMP threads
            mapper = stack.enter_context(ProcessPoolExecutor(workers, mp_context=get_context("spawn"))).map
        for result in mapper(_score_or_problem, jobs):
            results.append(result)
            progress.advance(task)
    return results


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100  # AT_FDCWD
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.is_file():
        raise UserError(f"--out {out_dir} is a file; expected a folder for evaluate's outputs: choose "
                        "another --out")
    if out_dir.is_dir():
        other = sorted(p.name for p in out_dir.iterdir() if p.name not in OUTPUT_FILES)
        if other:
            raise UserError(f"--out {out_dir} holds files evaluate did not write ({', '.join(other[:5])}"
                            f"{', ...' if len(other) > 5 else ''}); expected an empty folder or a previous "
                            f"evaluate output (it is replaced whole): choose another --out")


@contextlib.contextmanager
def _replacing(out_dir: Path):
    """Yield a fresh temporary folder beside ``out_dir``; it replaces ``out_dir`` whole when the body is done.

    The replacement is one atomic exchange of the two folders where the OS has it (Linux), so a reader or a
    killed run sees the old complete output or the new one; elsewhere two renames, with the old output kept
    as ``.<name>.old-<pid>`` in between. Leftovers of killed runs are removed first.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    if not _exchange(tmp, out_dir):
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        tmp = old
    shutil.rmtree(tmp, ignore_errors=True)  # now the previous output


def evaluate_folder(pred_dir: str | Path, gt_dir: str | Path, out_dir: str | Path, label: str | None = None,
                    workers: int = 1, convention: str | LabelConvention = "auto",
                    spacing: Sequence[float] | None = None, case_ids: Collection[str] | None = None,
                    rules: str = DEFAULT_RULES, missing: str = "error",
                    resample: bool = False) -> pd.DataFrame:
    """Score every ground truth case of ``gt_dir`` against ``pred_dir`` and write the reports to ``out_dir``.

    Args:
        pred_dir: folder of ``<CASE>.nii.gz`` label maps.
        gt_dir: BraTS data set folder, or a folder of label files alone.
        out_dir: where cases.csv, summary.csv, report.md, boxplots.png, evaluation.json go (replaced whole).
        label: the row name in report.md (the data set / method); default the prediction folder's name.
        workers: processes scoring cases in parallel (1 = in this process).
        convention: the predictions' label codes: "auto" (prediction.json, else the case's own), or a name.
        spacing: voxel size in mm overriding the ground truth's.
        case_ids: score only these ground truth cases (default: all of them).
        rules: ``brats2020`` or a lesion-wise rule set (:data:`RULE_NAMES`).
        missing: ``error`` (a case without prediction is an error) or ``empty`` (scored as empty).
        resample: resample predictions on another grid onto the ground truth's (else they are refused).

    Returns:
        The per-case table (columns :func:`case_columns`, one row per ground truth case, sorted by case).

    Raises:
        UserError: bad input (listed in one message): an incomplete prediction folder, no or misnamed
            predictions, missing ones (without ``missing="empty"``), unreadable or illegal label maps,
            predictions on another grid (without ``resample``), an ``out_dir`` holding other files.
    """
    pred_dir, out_dir = Path(pred_dir), Path(out_dir)
    if rules not in RULE_NAMES:
        raise UserError(f"--rules {rules}: unknown; expected one of {', '.join(RULE_NAMES)}")
    if missing not in ("error", "empty"):
        raise UserError(f"--missing {missing}: unknown; expected error or empty")
    label = label or pred_dir.name
    if not pred_dir.is_dir():
        raise UserError(f"--pred {pred_dir}: no such folder; expected a folder of <CASE>.nii.gz label maps")
    manifest = require_complete(pred_dir)
    _check_out_dir(out_dir)
    declared = declared_dataset(gt_dir) if Path(gt_dir).is_dir() else None
    labels = {c: p for c, p in find_label_files(gt_dir).items() if case_ids is None or c in case_ids}
    if not labels:
        raise UserError(f"--gt {gt_dir}: none of the chosen cases ({', '.join(sorted(case_ids or []))}) has "
                        "a ground truth; expected their label files there")
    predictions = label_map_paths(pred_dir)
    problems = _misnamed_predictions(pred_dir, predictions, labels)
    matched = [c for c in labels if c in predictions]
    if not matched:
        shown = ", ".join(sorted(p.name for p in pred_dir.iterdir())[:5]) or "nothing"
        raise UserError("\n  ".join([
            f"no prediction in {pred_dir} matches a ground truth case of {gt_dir} (found {shown}); expected "
            f"<CASE>.nii.gz per case, e.g. {next(iter(labels))}.nii.gz", *problems]))
    absent = [c for c in labels if c not in predictions]
    if absent and missing == "error":
        problems.append(f"{len(absent)} of {len(labels)} case(s) have no prediction in {pred_dir}: "
                        f"{', '.join(absent)}; expected <CASE>.nii.gz for each: predict them, or pass "
                        "--missing empty to score them as empty predictions (the BraTS rule)")
    if problems:
        raise UserError(f"{len(problems)} problem(s) with the predictions:\n  " + "\n  ".join(problems))
    if absent:
        log.warning("%d of %d cases have no prediction in %s and are scored as empty predictions: %s",
                    len(absent), len(labels), pred_dir, ", ".join(absent))
    extra = sorted(set(predictions) - set(labels))
    if extra and case_ids is None:
        log.warning("%d prediction(s) in %s have no ground truth in %s and are ignored: %s",
                    len(extra), pred_dir, gt_dir, ", ".join(extra))
    pred_convention = _prediction_convention(manifest, convention)
    spacing_override = None if spacing is None else tuple(float(s) for s in spacing)
    jobs = []
    for case_id, seg in labels.items():
        gt_convention = _gt_convention(case_id, seg, declared)
        jobs.append(CaseJob(case_id, seg, gt_convention, predictions.get(case_id),
                            pred_convention or gt_convention, spacing_override, rules, resample))
    results = _run_jobs(jobs, workers)
    failed = [r["_problem"] for r in results if "_problem" in r]
    if failed:
        raise UserError(f"{len(failed)} case(s) could not be scored:\n  " + "\n  ".join(failed))
    notes = [n for r in results for n in r["_notes"]]
    for note in notes:
        log.warning("%s", note)
    resampled = [r["case"] for r in results if r["_resampled"]]
    table = pd.DataFrame(results, columns=list(case_columns(rules)))
    summary = summarize(table)
    with _replacing(out_dir) as tmp:
        table.to_csv(tmp / CASES_FILE, index=False, float_format="%.6f")
        summary.to_csv(tmp / SUMMARY_FILE, float_format="%.6f")
        report = report_markdown(table, summary, label, rules, absent, notes, resampled)
        (tmp / REPORT_FILE).write_text(report)
        metric_boxplots(table, tmp / BOXPLOT_FILE, title=label)
        (tmp / EVALUATION_FILE).write_text(json.dumps({
            "rules": rules, "label": label, "pred": str(pred_dir), "gt": str(gt_dir), "cases": len(table),
            "missing_scored_empty": absent, "resampled": resampled, "spacing": spacing_override,
            "ground_truth_notes": notes}, indent=2) + "\n")
    log.info("evaluated %d cases (%s rules): %s", len(table), rules, out_dir)
    return table


def summary_table(summary: pd.DataFrame, label: str) -> Table:
    """A rich Table of the summary (mean ± std, median per metric and region) for the console."""
    table = Table(title=f"BraTS evaluation: {escape(label)}")
    table.add_column("metric")
    regions = _regions_of(summary.columns)
    for region in regions:
        table.add_column(region.upper(), justify="right")
    names = {"lw_dice": "Lesion-wise Dice", "lw_hd95": "Lesion-wise HD95 (mm)", "dice": "Dice",
             "hd95": "HD95 (mm)", "sens": "Sensitivity", "spec": "Specificity"}
    for metric, name in names.items():
        if f"{metric}_et" not in summary.columns:
            continue
        cells = []
        for region in regions:
            key = f"{metric}_{region}"
            mean, std, median = (summary.loc[r, key] for r in ("Mean", "StdDev", "Median"))
            cells.append(f"{_format(mean, key)} ± {_format(std, key)} (median {_format(median, key)})")
        table.add_row(name, *cells)
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brats-lightning evaluate``."""
    parser.add_argument("--pred", required=True, type=Path, help="folder of <CASE>.nii.gz label maps")
    parser.add_argument("--gt", required=True, type=Path,
                        help="BraTS data set folder, or a folder of label files alone (<CASE>_seg.nii.gz)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder, replaced whole (cases.csv, summary.csv, report.md, ...)")
    parser.add_argument("--rules", default=DEFAULT_RULES, choices=RULE_NAMES,
                        help="scoring rules: brats2020 (default), or the lesion-wise rules of a BraTS 2023+ "
                        "challenge, as its official scorer sets them")
    parser.add_argument("--missing", default="error", choices=["error", "empty"],
                        help="a ground truth case without prediction: error (default), or empty: score it as "
                        "an empty prediction (the BraTS rule)")
    parser.add_argument("--resample", action="store_true",
                        help="resample predictions on another grid onto the ground truth's (nearest "
                        "neighbour) instead of refusing them")
    parser.add_argument("--label", default=None,
                        help="row name in report.md (default: the --pred folder name)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="cases scored in parallel (default: min(8, CPUs))")
    parser.add_argument("--convention", default="auto", choices=["auto", *CONVENTIONS],
                        help="label codes of the predictions (default: prediction.json, else each "
                        "case's own)")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                        help="voxel size in mm (default: from the ground truth NIfTI headers)")


def run(args: argparse.Namespace) -> int:
    """Run ``brats-lightning evaluate`` and print the summary table."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    label = args.label or args.pred.name
    table = evaluate_folder(args.pred, args.gt, args.out, label=label, workers=args.workers,
                            convention=args.convention, spacing=args.spacing, rules=args.rules,
                            missing=args.missing, resample=args.resample)
    console = Console()
    console.print(summary_table(summarize(table), label))
    console.print(f"wrote {args.out / CASES_FILE}, {SUMMARY_FILE}, {REPORT_FILE}, {BOXPLOT_FILE}, "
                  f"{EVALUATION_FILE}")
    return 0
