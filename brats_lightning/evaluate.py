"""Score label maps against ground truth with the BraTS 2020 rules (docs/method.md Evaluation; paper Tables
3-4).

Command line::

    brats-lightning evaluate --pred DIR --gt DIR --out DIR [--label NAME] [--workers N]
                             [--convention auto|brats2020|brats2023] [--spacing SX SY SZ]

Inputs:

* ``--pred``: one label map per case, ``<CASE>.nii.gz`` (BraTS submission naming, as written by
  ``brats-lightning predict`` / ``merge``; ``*_unc_*`` uncertainty maps are ignored). Label codes follow
  the folder's ``prediction.json`` ``label_convention`` when there is one, else each case's ground truth
  convention (``--convention`` overrides both).
* ``--gt``: a BraTS data set folder (``<CASE>/<CASE>_seg.nii.gz``, 2020/2021 or 2023 naming, found with
  :func:`brats_lightning.data.layout.find_cases`); every case must have a seg file. Codes per case
  (ET 4 in 2020/2021, 3 in 2023). A case without a prediction is scored as an empty prediction (warned).

Outputs in ``--out``:

* ``cases.csv``: one row per case, columns ``case`` then :data:`brats_lightning.metrics.METRIC_KEYS`
  (``dice_et, dice_tc, dice_wt, hd95_et, hd95_tc, hd95_wt, sens_et, sens_tc, sens_wt, spec_et, spec_tc,
  spec_wt``); HD95 in mm.
* ``summary.csv``: BraTS portal style, first column ``Label`` with rows ``Mean, StdDev, Median,
  25quantile, 75quantile`` (StdDev is the sample standard deviation, ddof = 1; quantiles use linear
  interpolation), then the metric columns.
* ``report.md``: a table shaped like the paper's Table 3 (row = the ``--label``; Dice ET WT TC, HD95 ET WT
  TC), then the full summary, and the list of cases scored without a prediction.
* ``boxplots.png``: per-case metrics per region (:func:`brats_lightning.plots.metric_boxplots`).

Voxel spacing for HD95 comes from the ground truth header (``zooms``) unless ``--spacing`` is given.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Collection, Sequence
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

from brats_lightning.data.io import load_volume, to_label_map
from brats_lightning.data.labels import (
    CONVENTIONS,
    LabelConvention,
    get_convention,
    labels_to_regions,
    unexpected_labels,
)
from brats_lightning.data.layout import find_cases
from brats_lightning.metrics import METRIC_KEYS, case_metrics
from brats_lightning.plots import metric_boxplots
from brats_lightning.predictions import label_map_paths, read_manifest

log = logging.getLogger(__name__)

CASES_FILE = "cases.csv"
SUMMARY_FILE = "summary.csv"
REPORT_FILE = "report.md"
BOXPLOT_FILE = "boxplots.png"
CASE_COLUMNS: tuple[str, ...] = ("case", *METRIC_KEYS)
SUMMARY_ROWS: tuple[str, ...] = ("Mean", "StdDev", "Median", "25quantile", "75quantile")
TABLE3_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Dice ET", "dice_et"), ("Dice WT", "dice_wt"), ("Dice TC", "dice_tc"),
    ("HD95 ET", "hd95_et"), ("HD95 WT", "hd95_wt"), ("HD95 TC", "hd95_tc"),
)
"""Columns of the paper's Table 3 (its region order: ET, WT, TC)."""


@dataclass(frozen=True)
class CaseJob:
    """What one worker needs to score one case (picklable)."""

    case_id: str
    seg: Path
    gt_convention: LabelConvention
    pred: Path | None
    pred_convention: LabelConvention
    spacing: tuple[float, float, float] | None


def _read_labels(path: Path, convention: LabelConvention, what: str, case_id: str) -> tuple[np.ndarray, Any]:
    data, image = load_volume(path, dtype=None)
    labels = to_label_map(data, path)
    bad = unexpected_labels(labels, convention)
    if bad:
        raise ValueError(f"case {case_id}: {what} {path} holds label codes {bad}; expected "
                         f"{list(convention.labels)} ({convention.name}): pass --convention to say which "
                         "codes the predictions use")
    return labels, image


def score_case(job: CaseJob) -> dict[str, float | str]:
    """Load one case's ground truth and prediction (empty when ``job.pred`` is None) and score it."""
    gt, gt_image = _read_labels(job.seg, job.gt_convention, "ground truth", job.case_id)
    spacing = job.spacing or tuple(float(z) for z in gt_image.header.get_zooms()[:3])
    if job.pred is None:
        pred = np.zeros_like(gt)
    else:
        pred, pred_image = _read_labels(job.pred, job.pred_convention, "prediction", job.case_id)
        if pred.shape != gt.shape:
            raise ValueError(f"case {job.case_id}: prediction {job.pred} has shape {pred.shape}, ground "
                             f"truth {job.seg} has {gt.shape}; expected label maps on the original image "
                             "grid (predict pastes the brain box back into it)")
        if not np.allclose(pred_image.affine, gt_image.affine, atol=1e-3):
            log.warning("case %s: the affine of %s differs from the ground truth's (%s); scoring voxel "
                        "by voxel", job.case_id, job.pred, job.seg)
    metrics = case_metrics(labels_to_regions(pred, job.pred_convention),
                           labels_to_regions(gt, job.gt_convention), spacing=spacing)
    return {"case": job.case_id, **metrics}


def summarize(cases: pd.DataFrame) -> pd.DataFrame:
    """BraTS portal summary of per-case metrics: Mean, StdDev (ddof=1), Median, 25quantile, 75quantile."""
    values = cases[list(METRIC_KEYS)].astype(float)
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
    """HD95 in mm with 2 decimals, specificity with 5 (it sits near 1), Dice and sensitivity with 4."""
    if np.isnan(value):  # e.g. the standard deviation of a single case
        return "-"
    digits = 2 if key.startswith("hd95") else 5 if key.startswith("spec") else 4
    return f"{value:.{digits}f}"


def report_markdown(cases: pd.DataFrame, summary: pd.DataFrame, label: str,
                    missing: Sequence[str] = ()) -> str:
    """``report.md``: the Table 3 row (means), the portal summary, cases scored without a prediction."""
    means = summary.loc["Mean"]
    table3 = markdown_table(["Metric (mean)", *(name for name, _ in TABLE3_COLUMNS)],
                             [[label, *(_format(means[key], key) for _, key in TABLE3_COLUMNS)]])
    full = markdown_table(["", *METRIC_KEYS], [[row, *(_format(summary.loc[row, k], k) for k in METRIC_KEYS)]
                                                for row in SUMMARY_ROWS])
    parts = [f"# Evaluation: {label}", "",
             f"{len(cases)} cases, BraTS 2020 rules (docs/method.md Evaluation); HD95 in mm.", "",
             "## Mean over cases (paper Table 3 layout)", "", table3, "",
             "## Summary (BraTS portal style)", "", full, "",
             f"Per-case values: `{CASES_FILE}`; box plots: `{BOXPLOT_FILE}`.", ""]
    if missing:
        parts += [f"**{len(missing)} case(s) had no prediction and were scored as empty:** "
                  + ", ".join(missing), ""]
    return "\n".join(parts)


def _prediction_convention(pred_dir: Path, convention: str | LabelConvention) -> LabelConvention | None:
    """The predictions' label codes: the override, else the folder's prediction.json, else None (per case)."""
    if convention != "auto":
        return get_convention(convention)
    manifest = read_manifest(pred_dir) or {}
    return get_convention(manifest["label_convention"]) if manifest.get("label_convention") else None


def _run_jobs(jobs: list[CaseJob], workers: int) -> list[dict[str, float | str]]:
    columns = (TextColumn("evaluate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    results = []
    with Progress(*columns, transient=False) as progress, ExitStack() as stack:
        task = progress.add_task("cases", total=len(jobs))
        mapper = map
        if workers > 1:  # spawn: never fork a parent that may hold torch / OpenMP threads
            mapper = stack.enter_context(ProcessPoolExecutor(workers, mp_context=get_context("spawn"))).map
        for result in mapper(score_case, jobs):
            results.append(result)
            progress.advance(task)
    return results


def evaluate_folder(pred_dir: str | Path, gt_dir: str | Path, out_dir: str | Path, label: str | None = None,
                    workers: int = 1, convention: str | LabelConvention = "auto",
                    spacing: Sequence[float] | None = None,
                    case_ids: Collection[str] | None = None) -> pd.DataFrame:
    """Score every ground truth case of ``gt_dir`` against ``pred_dir`` and write the reports to ``out_dir``.

    Args:
        pred_dir: folder of ``<CASE>.nii.gz`` label maps.
        gt_dir: BraTS data set folder with seg files.
        out_dir: where cases.csv, summary.csv, report.md and boxplots.png go (created).
        label: the row name in report.md (the data set / method); default the prediction folder's name.
        workers: processes scoring cases in parallel (1 = in this process).
        convention: the predictions' label codes: "auto" (prediction.json, else the case's own), or a name.
        spacing: voxel size in mm overriding the ground truth headers' zooms.
        case_ids: score only these ground truth cases (default: all of them).

    Returns:
        The per-case table (columns :data:`CASE_COLUMNS`, one row per ground truth case, sorted by case).
    """
    pred_dir, out_dir = Path(pred_dir), Path(out_dir)
    label = label or pred_dir.name
    cases = [c for c in find_cases(gt_dir, require_labels=True) if case_ids is None or c.case_id in case_ids]
    predictions = label_map_paths(pred_dir)
    pred_convention = _prediction_convention(pred_dir, convention)
    spacing_override = None if spacing is None else tuple(float(s) for s in spacing)
    missing = [c.case_id for c in cases if c.case_id not in predictions]
    if missing:
        log.warning("%d of %d cases have no prediction in %s and are scored as empty predictions: %s",
                    len(missing), len(cases), pred_dir, ", ".join(missing))
    extra = sorted(set(predictions) - {c.case_id for c in cases})
    if extra:
        log.warning("%d prediction(s) in %s have no ground truth in %s and are ignored: %s",
                    len(extra), pred_dir, gt_dir, ", ".join(extra))
    jobs = [CaseJob(c.case_id, c.seg, c.convention, predictions.get(c.case_id),
                    pred_convention or c.convention, spacing_override) for c in cases]
    table = pd.DataFrame(_run_jobs(jobs, workers), columns=list(CASE_COLUMNS))
    summary = summarize(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / CASES_FILE, index=False, float_format="%.6f")
    summary.to_csv(out_dir / SUMMARY_FILE, float_format="%.6f")
    (out_dir / REPORT_FILE).write_text(report_markdown(table, summary, label, missing))
    metric_boxplots(table, out_dir / BOXPLOT_FILE, title=label)
    log.info("evaluated %d cases: %s", len(table), out_dir)
    return table


def summary_table(summary: pd.DataFrame, label: str) -> Table:
    """A rich Table of the summary (mean, std, median per metric and region) for the console."""
    table = Table(title=f"BraTS evaluation: {escape(label)}")
    table.add_column("metric")
    for region in ("ET", "WT", "TC"):
        table.add_column(region, justify="right")
    for metric, name in (("dice", "Dice"), ("hd95", "HD95 (mm)"), ("sens", "Sensitivity"),
                         ("spec", "Specificity")):
        cells = []
        for region in ("et", "wt", "tc"):
            key = f"{metric}_{region}"
            mean, std, median = (summary.loc[r, key] for r in ("Mean", "StdDev", "Median"))
            cells.append(f"{_format(mean, key)} ± {_format(std, key)} (median {_format(median, key)})")
        table.add_row(name, *cells)
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brats-lightning evaluate``."""
    parser.add_argument("--pred", required=True, type=Path, help="folder of <CASE>.nii.gz label maps")
    parser.add_argument("--gt", required=True, type=Path, help="BraTS data set folder with <CASE>_seg files")
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder (cases.csv, summary.csv, report.md, boxplots.png)")
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
                            convention=args.convention, spacing=args.spacing)
    console = Console()
    console.print(summary_table(summarize(table), label))
    console.print(f"wrote {args.out / CASES_FILE}, {SUMMARY_FILE}, {REPORT_FILE}, {BOXPLOT_FILE}")
    return 0
