"""The paper's whole reproduction (Henry, Carre et al., BraTS 2020), one step after another.

    python experiments/paper_brats2020/recipe.py --data /path/to/MICCAI_BraTS2020_TrainingData
    python experiments/paper_brats2020/recipe.py --data ... --launcher submitit_slurm \
        hydra.launcher.partition=gpu
    python experiments/paper_brats2020/recipe.py --tiny --out /tmp/paper_tiny   # CPU-sized, minutes

Steps (README.md in this folder explains each one and the paper section it follows):

1. ``check-data`` on the training set (``--tiny``: first ``synth`` writes a small synthetic set).
2. Pipeline A, U-Net (EquiUnet) on every case, 5 folds, fast SWA, per-case losses  (``all/A/equiunet``).
3. ``flag-cases`` on those runs: the patient-filtering exclusion list (``excluded.json``, paper 2.5).
4. Pipeline A, U-Net on the cleaned set  (``cleaned/A/equiunet``).
5. Pipeline A, attention U-Net  (``all/A/att_equiunet``).
6. Pipeline B, EquiUnet, 5 folds  (``all/B/equiunet``).
7. Out-of-fold ensembles: A = the best two runs of each fold, B = all; TTA; their merge; BraTS scores.
8. ``cv-report`` (paper Table 2) and ``comparison.md``: the paper's numbers beside ours.
9. With ``--validation-data``: the merged label maps of the online validation set, ready to upload.

Every command is printed before it runs. Training steps skip the folds whose ``run.json`` exists (and
train.py resumes an interrupted fold from its last checkpoint), so rerunning the recipe continues it.
Words after the options are Hydra overrides for every training job (``trainer.devices=1``, ``logger=csv``).
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from brats_lightning.evaluate import SUMMARY_FILE, markdown_table
from brats_lightning.reports import OOF_DIR, REPORT_CSV

REPO = Path(__file__).resolve().parents[2]
console = Console()

PAPER_FOLDS = (0, 1, 2, 3, 4)
DATA_NAME = "brats2020"  # data.name of every sweep: the second level of each run folder
REGIONS = ("et", "wt", "tc")
"""Region order of the paper's tables."""

PAPER_TABLE2: dict[str, dict[str, tuple[float, float]]] = {
    # Table 2, "Ablation study: results from cross-validation on the training set", Dice mean (std) over
    # folds, pipeline A. The rows are the three model kinds of pipeline A (docs/method.md "Training").
    "U-Net like": {"et": (0.8077, 0.011), "wt": (0.9070, 0.006), "tc": (0.8705, 0.013)},
    "+ Patients removal": {"et": (0.8126, 0.019), "wt": (0.9043, 0.005), "tc": (0.8686, 0.012)},
    "+ Attention block": {"et": (0.8144, 0.022), "wt": (0.9037, 0.008), "tc": (0.8701, 0.018)},
}
PAPER_TABLE3: dict[str, dict[str, float]] = {
    # Table 3, the BraTS 2020 online validation set (125 cases, scored by the portal), means.
    "Dice (Pipeline A alone)": {"et": 0.80585, "wt": 0.89518, "tc": 0.85415},
    "Dice (Pipeline B alone)": {"et": 0.72738, "wt": 0.91123, "tc": 0.84921},
    "Dice": {"et": 0.80585, "wt": 0.91148, "tc": 0.85416},
    "Sensitivity": {"et": 0.81488, "wt": 0.91938, "tc": 0.84485},
    "Specificity": {"et": 0.99970, "wt": 0.99915, "tc": 0.99963},
    "Hausdorff (95%)": {"et": 20.55756, "wt": 4.30103, "tc": 5.69298},
}
TABLE3_SOURCES: dict[str, tuple[str, str]] = {
    # paper Table 3 row -> (our out-of-fold evaluation under <out>/oof/, metric prefix in its summary.csv)
    "Dice (Pipeline A alone)": ("A", "dice"),
    "Dice (Pipeline B alone)": ("B", "dice"),
    "Dice": ("merged", "dice"),
    "Sensitivity": ("merged", "sens"),
    "Specificity": ("merged", "spec"),
    "Hausdorff (95%)": ("merged", "hd95"),
}


@dataclass(frozen=True)
class Sweep:
    """One 5-fold training sweep of the paper; runs land in
    ``<out>/<name>/<DATA_NAME>/<pipeline>/<model>/fold<k>``."""

    title: str
    experiment: str  # conf/experiment/<experiment>.yaml
    model: str  # conf/model/<model>.yaml
    name: str  # first level of the output folder
    paper_row: str | None  # the row of the paper's Table 2 it reproduces
    cleaned: bool = False  # trains without the cases flagged by step 3

    @property
    def pipeline(self) -> str:
        return self.experiment[-1]

    def run_dir(self, out: Path, fold: int) -> Path:
        return out / self.name / DATA_NAME / self.pipeline / self.model / f"fold{fold}"

    @property
    def cv_label(self) -> str:
        """The configuration's label in ``cv-report`` (brats_lightning.reports.config_label)."""
        return f"{self.pipeline} / {self.model}" + (" + cleaned" if self.cleaned else "")


A_UNET = Sweep("Pipeline A: U-Net (EquiUnet), all cases, fast SWA", "paper_A", "equiunet", "all",
               "U-Net like")
A_CLEANED = Sweep("Pipeline A: U-Net on the cleaned set, fast SWA", "paper_A", "equiunet", "cleaned",
                  "+ Patients removal", cleaned=True)
A_ATTENTION = Sweep("Pipeline A: attention U-Net (CBAM), fast SWA", "paper_A", "att_equiunet", "all",
                    "+ Attention block")
B_UNET = Sweep("Pipeline B: EquiUnet", "paper_B", "equiunet", "all", None)
SWEEPS = (A_UNET, A_CLEANED, A_ATTENTION, B_UNET)

TINY_TRAIN = (
    # CPU-sized stand-ins for the paper's sizes; the rest (pipelines, callbacks, selection) is unchanged
    "model.width=4", "data.crop_size=32", "data.foreground_prob=0.5", "data.num_workers=0",
    "pipeline.epochs=2", "trainer.limit_train_batches=1", "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
)
TINY_SWA = ("callbacks.fast_swa.cycles=1", "callbacks.fast_swa.cycle_epochs=2",
            "callbacks.fast_swa.snapshot_every=1")
TINY_DATA = {"cases": 8, "spacing": 4.0}


def run_command(command: Sequence[str], step: str) -> None:
    """Print and run one command from the repository root; stop the recipe when it fails."""
    console.print(f"[bold]$ {escape(' '.join(map(str, command)))}[/bold]")
    start = time.perf_counter()
    result = subprocess.run(list(map(str, command)), cwd=REPO)
    if result.returncode:
        raise SystemExit(f"recipe step '{step}' failed (exit {result.returncode}); fix the cause and run the "
                         "recipe again: finished folds are kept and skipped")
    console.print(f"[green]{step}: done in {time.perf_counter() - start:.0f} s[/green]")


def train_command(sweep: Sweep, folds: Sequence[int], args: argparse.Namespace) -> list[str]:
    """``python train.py -m fold=... experiment=... model=...`` for the folds of a sweep still to train."""
    command = [sys.executable, "train.py", "-m", f"fold={','.join(map(str, folds))}",
               f"experiment={sweep.experiment}", f"model={sweep.model}", f"name={sweep.name}",
               f"paths.output_dir={args.out}", f"data.root={args.data}", f"data.name={DATA_NAME}"]
    if sweep.cleaned:
        command.append(f"data.exclude={args.out / 'excluded.json'}")
    if args.launcher:
        command.append(f"hydra/launcher={args.launcher}")
    if args.tiny:
        command += TINY_TRAIN + (TINY_SWA if sweep.pipeline == "A" else ())
    return command + list(args.overrides)


def train(sweep: Sweep, args: argparse.Namespace) -> None:
    missing = [k for k in args.folds if not (sweep.run_dir(args.out, k) / "run.json").exists()]
    if not missing:
        console.print(f"{sweep.title}: every fold has its run.json; skipped")
        return
    run_command(train_command(sweep, missing, args), sweep.title)


def _cell(mean: float, std: float | None = None, digits: int = 4) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if std is None or pd.isna(std) else f" ({std:.{digits - 1}f})")


def comparison_rows(out: Path) -> tuple[list[list[str]], list[list[str]]]:
    """Our rows, each followed by the paper's row it reproduces: (Table 2 rows, Table 3 rows)."""
    report = pd.read_csv(out / REPORT_CSV).set_index("label")
    table2 = []
    for sweep in SWEEPS:
        for label in (sweep.cv_label, sweep.cv_label + " + SWA"):
            if label not in report.index:
                continue
            ours = report.loc[label]
            table2.append([label, f"ours, folds {ours['folds']}",
                           *(_cell(ours[f"dice_{r}_mean"], ours[f"dice_{r}_std"]) for r in REGIONS)])
            if label.endswith(" + SWA") and sweep.paper_row:  # the paper's pipeline A models are SWA models
                paper = PAPER_TABLE2[sweep.paper_row]
                table2.append([sweep.paper_row, "paper, Table 2", *(_cell(*paper[r]) for r in REGIONS)])
    table3 = []
    for row, (source, metric) in TABLE3_SOURCES.items():
        summary_file = out / OOF_DIR / source / SUMMARY_FILE
        if not summary_file.exists():
            continue
        means = pd.read_csv(summary_file, index_col="Label").loc["Mean"]
        digits = 2 if metric == "hd95" else 4
        ours = (_cell(means[f"{metric}_{r}"], digits=digits) for r in REGIONS)
        table3.append([row, f"ours, oof/{source}", *ours])
        table3.append(["", "paper, Table 3", *(_cell(PAPER_TABLE3[row][r], digits=digits) for r in REGIONS)])
    return table2, table3


TABLE2_HEADER = ("configuration", "source", "ET", "WT", "TC")
TABLE3_HEADER = ("metric (mean)", "source", "ET", "WT", "TC")


def write_comparison(out: Path, args: argparse.Namespace) -> Path:
    """``<out>/comparison.md``: cross-validation and ensemble numbers, ours beside the paper's (printed)."""
    table2, table3 = comparison_rows(out)
    scale = ("**Tiny CPU settings on synthetic data: these numbers check the plumbing and are not comparable "
             "with the paper's.**\n\n" if args.tiny else "")
    text = "\n".join([
        "# Paper (Henry, Carre et al., BraTS 2020) vs this reproduction", "",
        f"Written {datetime.datetime.now():%Y-%m-%d %H:%M} by experiments/paper_brats2020/recipe.py from "
        f"`{out}`; training data `{args.data}`.", "", scale +
        "## Cross-validation Dice, mean (std) over folds", "",
        "The paper's Table 2 rows are pipeline A's three model kinds after fast SWA, so each follows our "
        "`+ SWA` row; the rows without SWA are the same runs at the end of the main schedule. The paper "
        "gives no cross-validation numbers for pipeline B.", "",
        markdown_table(TABLE2_HEADER, table2), "",
        "## Ensembles", "",
        "Ours: out-of-fold on the training set (each case predicted only by the runs that held it out; A = "
        "the best two runs per fold, B = all, 16-view TTA, then the merge), mean over cases. The paper's "
        "Table 3 is the online validation set (125 unseen cases scored by the BraTS portal), so ours can "
        "differ a little even with identical models.", "",
        markdown_table(TABLE3_HEADER, table3), ""])
    path = out / "comparison.md"
    path.write_text(text)
    for title, header, rows in (("Cross-validation Dice, mean (std) over folds", TABLE2_HEADER, table2),
                                ("Ensembles (ours: out-of-fold; paper: online validation)", TABLE3_HEADER,
                                 table3)):
        table = Table(title=title)
        for column in header:
            table.add_column(column, justify="right" if column in ("ET", "WT", "TC") else "left")
        for row in rows:
            table.add_row(*map(escape, row), style="dim" if row[1].startswith("paper") else None)
        console.print(table)
    console.print(f"wrote {path}")
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Steps and options: experiments/paper_brats2020/README.md")
    parser.add_argument("--data", type=Path, default=None,
                        help="BraTS training set (one folder per case); --tiny: default <out>/data")
    parser.add_argument("--out", type=Path, default=Path("outputs/paper_brats2020"),
                        help="root of every run, ensemble and report (default outputs/paper_brats2020)")
    parser.add_argument("--folds", type=lambda s: tuple(int(k) for k in s.split(",")), default=PAPER_FOLDS,
                        help="folds to train (default 0,1,2,3,4); with fewer, the ensembles cover the "
                             "cases they held out")
    parser.add_argument("--launcher", default=None,
                        help="Hydra launcher for the sweeps: submitit_slurm, submitit_local or joblib "
                             "(default: one job after another in this process)")
    parser.add_argument("--validation-data", type=Path, default=None,
                        help="the online validation set: predict it with both ensembles and merge")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU-sized settings on a small synthetic set: runs every step in minutes")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every training job")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    if args.data is None:
        if not args.tiny:
            parser.error("--data is required (the BraTS 2020 training set), or --tiny for a synthetic trial")
        args.data = args.out / "data"
    args.data = args.data.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    cli = [sys.executable, "-m", "brats_lightning.cli"]
    if args.tiny and not args.data.exists():
        run_command([*cli, "synth", "--out", args.data, "--cases", TINY_DATA["cases"],
                     "--spacing", TINY_DATA["spacing"]], "synthetic data")
    run_command([*cli, "check-data", args.data], "check-data")
    train(A_UNET, args)
    run_command([*cli, "flag-cases", *(A_UNET.run_dir(args.out, k) for k in args.folds),
                 "--out", args.out / "excluded.json"], "flag-cases")
    for sweep in (A_CLEANED, A_ATTENTION, B_UNET):
        train(sweep, args)
    oof_cases = "all" if set(args.folds) == set(PAPER_FOLDS) else "held_out"
    run_command([sys.executable, "ensemble.py", f"runs={args.out}", f"dataset={args.data}", "oof=true",
                 f"oof_cases={oof_cases}"], "out-of-fold ensembles, merge, scores")
    run_command([*cli, "cv-report", args.out], "cv-report")
    write_comparison(args.out, args)
    if args.validation_data is not None:
        run_command([sys.executable, "ensemble.py", f"runs={args.out}",
                     f"dataset={args.validation_data.resolve()}", f"out={args.out / 'validation'}"],
                    "online validation set: ensembles and merge")
        console.print(f"upload {args.out / 'validation' / 'predictions' / 'merged'} to the BraTS portal")
    console.print(f"[bold green]recipe finished in {(time.perf_counter() - start) / 60:.1f} min[/bold green]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
