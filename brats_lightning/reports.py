"""Cross-validation report: the paper's Table 2 from a sweep's run.json files (paper section 2.7).

Command line: ``brats-lightning cv-report OUTPUTS [--out DIR] [--rules NAME]``.

* Every ``run.json`` under ``OUTPUTS`` (any depth; docs/contracts.md, "run.json") is one fold of one
  configuration.
  A configuration is (``pipeline``, ``model``, cleaned = non-empty ``exclude`` list, ``experiment`` when
  run.json has that key); its label reads ``A / unet``, ``A / unet + cleaned``, ``A / unet [name]``. When one
  configuration has the same fold twice (a rerun), the most recently written run.json is used (warned).
* Per configuration: Dice ET, TC, WT as mean (std) over folds of ``val_metrics`` (std = sample standard
  deviation, ddof = 1; shown as "-" with one fold), and the number of folds. Runs with ``val_metrics_swa``
  (fast-SWA weights, paper section 2.5) add a row ``<label> + SWA`` from those.
* Out-of-fold evaluations: every ``OUTPUTS/oof/<name>/cases.csv`` (the per-case file written by
  ``brats-lightning evaluate --out OUTPUTS/oof/<name>``) adds a row ``<name>`` with Dice and HD95 per region
  as mean (std) over cases. With ``--rules NAME`` (a lesion-wise rule set of ``evaluate --rules``) those
  rows also show the lesion-wise Dice and HD95, which the evaluations must have been scored with
  (their ``evaluation.json``; else the error says which ``evaluate`` to rerun).

Writes ``cv_report.md`` and ``cv_report.csv`` into ``--out`` (default ``OUTPUTS``) and prints the table.
``cv_report.csv`` has one row per table row: ``label, source ("cv" or "oof"), n, folds`` then
``<metric>_<region>_mean`` and ``_std`` for dice, hd95, lw_dice and lw_hd95 (HD95 only for out-of-fold rows,
the lesion-wise ones only with ``--rules``), regions in the order ET, TC, WT. A corrupt or empty run.json or
cases.csv is an error that names the file.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from brats_lightning.errors import UserError
from brats_lightning.runs import Run, find_runs

log = logging.getLogger(__name__)

OOF_DIR = "oof"
"""Out-of-fold evaluations are looked for in ``OUTPUTS/oof/<name>/cases.csv``."""
REPORT_MD = "cv_report.md"
REPORT_CSV = "cv_report.csv"
TABLE_REGIONS: tuple[str, ...] = ("et", "tc", "wt")
"""Region order of every table (ET, TC, WT), as in evaluate's outputs."""
TABLE_METRICS: tuple[str, ...] = ("dice", "hd95", "lw_dice", "lw_hd95")
CSV_COLUMNS: tuple[str, ...] = ("label", "source", "n", "folds", *(
    f"{metric}_{region}_{stat}" for metric in TABLE_METRICS for region in TABLE_REGIONS
    for stat in ("mean", "std")))


def config_label(run: Run) -> str:
    """``<pipeline> / <model>``, plus `` + cleaned`` when the run excluded cases, plus ``[experiment]``."""
    label = f"{run.pipeline} / {run.model}"
    if run.info.get("exclude"):
        label += " + cleaned"
    if run.info.get("experiment"):
        label += f" [{run.info['experiment']}]"
    return label


def group_runs(runs: Sequence[Run]) -> dict[str, dict[int, Run]]:
    """``{configuration label: {fold: run}}``; of two runs of one fold, the newer run.json wins (warned)."""
    groups: dict[str, dict[int, Run]] = {}
    for run in sorted(runs, key=lambda r: r.path.stat().st_mtime):
        folds = groups.setdefault(config_label(run), {})
        if run.fold in folds:
            log.warning("%s: fold %d appears twice (%s and %s); using the newer %s", config_label(run),
                        run.fold, folds[run.fold].path, run.path, run.path)
        folds[run.fold] = run
    return dict(sorted(groups.items()))


def _stats_row(label: str, source: str, frame: pd.DataFrame, folds: str = "") -> dict[str, object]:
    row: dict[str, object] = {"label": label, "source": source, "n": len(frame), "folds": folds}
    for metric in TABLE_METRICS:
        for region in TABLE_REGIONS:
            column = f"{metric}_{region}"
            values = frame[column].astype(float) if column in frame else pd.Series(dtype=float)
            row[f"{column}_mean"] = values.mean()       # NaN when empty
            row[f"{column}_std"] = values.std(ddof=1)   # NaN with fewer than two values
    return row


def cv_rows(runs: Sequence[Run]) -> list[dict[str, object]]:
    """Table 2 rows: per configuration, mean and std over folds of val_metrics (and of val_metrics_swa)."""
    rows = []
    for label, folds in group_runs(runs).items():
        unscored = [str(run.path) for run in folds.values() if not run.info.get("val_metrics")]
        if unscored:
            log.warning("%s: %d run(s) without val_metrics left out: %s", label, len(unscored),
                        ", ".join(unscored))
        for key, suffix in (("val_metrics", ""), ("val_metrics_swa", " + SWA")):
            scored = {fold: run.info[key] for fold, run in sorted(folds.items()) if run.info.get(key)}
            if scored:
                frame = pd.DataFrame(list(scored.values()))
                rows.append(_stats_row(label + suffix, "cv", frame, ",".join(map(str, scored))))
    return rows


def _read_cases(path: Path, rules: str | None) -> pd.DataFrame:
    """An out-of-fold ``cases.csv``, checked: readable, with the columns shown, scored with ``rules``."""
    from brats_lightning.evaluate import EVALUATION_FILE

    option = f"--rules {rules} " if rules else ""
    rerun = f"rerun `brats-lightning evaluate {option}--out {path.parent}` on its predictions"
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: empty or not a CSV ({err}); expected the cases.csv written by "
                        f"`brats-lightning evaluate`: {rerun}") from None
    metrics = ("dice", "hd95") + (("lw_dice", "lw_hd95") if rules else ())
    columns = [f"{m}_{r}" for m in metrics for r in TABLE_REGIONS]
    missing = [c for c in columns if c not in frame]
    record = path.parent / EVALUATION_FILE
    scored = json.loads(record.read_text()).get("rules") if record.is_file() else None
    if rules and scored not in (None, rules):
        raise UserError(f"{path}: scored with --rules {scored} (its {EVALUATION_FILE}), not {rules}: {rerun}")
    if missing:
        raise UserError(f"{path}: columns {missing} missing; expected the cases.csv written by "
                        f"`brats-lightning evaluate`{' --rules ' + rules if rules else ''}: {rerun}")
    try:
        frame[columns] = frame[columns].astype(float)
    except ValueError as err:
        raise UserError(f"{path}: non-numeric scores ({err}): {rerun}") from None
    return frame


def oof_rows(outputs: Path, rules: str | None = None) -> list[dict[str, object]]:
    """One row per ``OUTPUTS/oof/<name>/cases.csv``: Dice and HD95 (and, with ``rules``, the lesion-wise
    ones) as mean and std over its cases."""
    rows = []
    for path in sorted((outputs / OOF_DIR).glob("*/cases.csv")):
        if not path.parent.name.startswith("."):  # evaluate's temporary folders
            rows.append(_stats_row(path.parent.name, "oof", _read_cases(path, rules)))
    return rows


def _cell(row: dict[str, object] | pd.Series, key: str, digits: int) -> str:
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    if pd.isna(mean):
        return "-"
    return f"{mean:.{digits}f} ({'-' if pd.isna(std) else f'{std:.{max(digits - 1, 1)}f}'})"


def _mean_dice(row: dict[str, object] | pd.Series) -> str:
    """The mean of the three regions' mean Dice (the demo's single number; not a column of the paper's)."""
    means = [row[f"dice_{g}_mean"] for g in TABLE_REGIONS]
    return "-" if any(pd.isna(m) for m in means) else f"{sum(means) / len(means):.4f}"


def _oof_line(row: pd.Series, metrics: tuple[str, str], mean_dice: bool) -> str:
    dice, hd95 = metrics
    cells = [_cell(row, f"{dice}_{g}", 4) for g in TABLE_REGIONS] + ([_mean_dice(row)] if mean_dice else [])
    cells += [_cell(row, f"{hd95}_{g}", 2) for g in TABLE_REGIONS]
    return f"| {row['label']} | {row['n']} | " + " | ".join(cells) + " |"


def report_markdown(table: pd.DataFrame, outputs: Path, rules: str | None = None) -> str:
    """``cv_report.md``: Table 2 layout for the folds, then the out-of-fold evaluations (lesion-wise first
    with ``rules``)."""
    cv, oof = table[table["source"] == "cv"], table[table["source"] == "oof"]
    lines = [f"# Cross-validation report: {outputs}", ""]
    lines += ["## Cross-validation (paper Table 2): validation Dice per fold, mean (std) over folds", "",
              "| Dice: mean(std) | ET | TC | WT | mean | folds |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | " + " | ".join(_cell(r, f"dice_{g}", 4) for g in TABLE_REGIONS)
              + f" | {_mean_dice(r)} | {r['n']} ({r['folds']}) |" for _, r in cv.iterrows()]
    if cv.empty:
        lines.append("| (no run.json with val_metrics found) | - | - | - | - | 0 |")
    if oof.empty:
        lines += ["", f"## Out-of-fold evaluation (`{OOF_DIR}/<name>/cases.csv`)", "",
                  f"None found (run `brats-lightning evaluate --out {outputs / OOF_DIR}/<name>`)."]
        return "\n".join(lines) + "\n"
    if rules:
        lines += ["", f"## Out-of-fold lesion-wise evaluation ({rules}): mean (std) over cases", "",
                  "| Data | cases | LW Dice ET | LW Dice TC | LW Dice WT | LW HD95 ET | LW HD95 TC "
                  "| LW HD95 WT |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [_oof_line(r, ("lw_dice", "lw_hd95"), False) for _, r in oof.iterrows()]
    lines += ["", f"## Out-of-fold evaluation (`{OOF_DIR}/<name>/cases.csv`): mean (std) over cases", "",
              "| Data | cases | Dice ET | Dice TC | Dice WT | Dice mean | HD95 ET | HD95 TC | HD95 WT |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [_oof_line(r, ("dice", "hd95"), True) for _, r in oof.iterrows()]
    return "\n".join(lines) + "\n"


def cv_report(outputs: str | Path, out_dir: str | Path | None = None, rules: str | None = None
              ) -> pd.DataFrame:
    """Build the report of every run under ``outputs``; write cv_report.md / .csv into ``out_dir``.

    Args:
        outputs: the training outputs folder (searched recursively for run.json).
        out_dir: where the report goes (default ``outputs``).
        rules: a lesion-wise ``evaluate --rules`` name: show the out-of-fold lesion-wise scores too.

    Returns:
        The table (columns :data:`CSV_COLUMNS`), cross-validation rows first.

    Raises:
        UserError: nothing found, or a run.json / cases.csv that can't be read (the message names it).
    """
    outputs = Path(outputs)
    if not outputs.is_dir():
        raise UserError(f"{outputs}: no such folder; expected the outputs folder of train.py runs")
    try:
        runs = find_runs(outputs)
    except ValueError as err:  # a corrupt run.json: the message names it
        raise UserError(f"{err}: fix or delete that file") from None
    table = pd.DataFrame(cv_rows(runs) + oof_rows(outputs, rules), columns=list(CSV_COLUMNS))
    if table.empty:
        raise UserError(f"{outputs}: no run.json with val_metrics and no {OOF_DIR}/<name>/cases.csv found; "
                        "expected the outputs folder of train.py runs")
    out_dir = Path(out_dir) if out_dir is not None else outputs
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / REPORT_CSV, index=False, float_format="%.6f")
    (out_dir / REPORT_MD).write_text(report_markdown(table, outputs, rules))
    return table


def rich_tables(table: pd.DataFrame, rules: str | None = None) -> list[Table]:
    """The report for the console: Dice for every row, then the out-of-fold rows' HD95 (and, with
    ``rules``, their lesion-wise Dice and HD95)."""
    dice = Table(title="Cross-validation Dice, mean (std) over folds; out-of-fold: over cases")
    hd95 = Table(title="Out-of-fold HD95 (mm), mean (std) over cases")
    lesion = Table(title=f"Out-of-fold lesion-wise Dice and HD95 (mm), {rules}, mean (std) over cases")
    for out, columns in ((dice, ("Dice ET", "Dice TC", "Dice WT", "Dice mean")),
                         (hd95, ("HD95 ET", "HD95 TC", "HD95 WT")),
                         (lesion, ("LW Dice ET", "LW Dice TC", "LW Dice WT", "LW HD95 ET", "LW HD95 TC",
                                   "LW HD95 WT"))):
        out.add_column("configuration", no_wrap=True)
        out.add_column("n", justify="right")
        for name in columns:  # numbers wrap on a narrow terminal rather than being cut
            out.add_column(name, justify="right", overflow="fold")
    for _, row in table.iterrows():
        oof = row["source"] == "oof"
        unit = ("case" if oof else "fold") + ("s" if row["n"] != 1 else "")
        head = (escape(row["label"] + (" (out-of-fold)" if oof else "")), f"{row['n']} {unit}")
        dice.add_row(*head, *(_cell(row, f"dice_{g}", 4) for g in TABLE_REGIONS), _mean_dice(row))
        if oof:
            hd95.add_row(*head, *(_cell(row, f"hd95_{g}", 2) for g in TABLE_REGIONS))
            if rules:
                lesion.add_row(*head, *(_cell(row, f"lw_dice_{g}", 4) for g in TABLE_REGIONS),
                               *(_cell(row, f"lw_hd95_{g}", 2) for g in TABLE_REGIONS))
    return [t for t in (dice, lesion, hd95) if t is dice or t.row_count]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brats-lightning cv-report``."""
    from brats_lightning.lesionwise import RULES

    parser.add_argument("outputs", type=Path, help="training outputs folder (searched for run.json)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where cv_report.md/.csv go (default: OUTPUTS)")
    parser.add_argument("--rules", default=None, choices=list(RULES),
                        help="show the out-of-fold lesion-wise scores of these rules (the oof evaluations "
                        "must be scored with `evaluate --rules` NAME)")


def run(args: argparse.Namespace) -> int:
    """Run ``brats-lightning cv-report``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    table = cv_report(args.outputs, args.out, args.rules)
    console = Console()
    for printed in rich_tables(table, args.rules):
        console.print(printed)
    out_dir = args.out or args.outputs
    console.print(f"wrote {out_dir / REPORT_MD} and {out_dir / REPORT_CSV}")
    return 0
