"""The paper's scale on the CPU: 1 mm 240x240x155 synthetic cases, EquiUnet w=48 on 128^3 crops (paper
section 2.5), pipeline A at batch 1 and B at batch 3, a few training steps each through the real ``train.py``
(one whole-brain validation), a 16-view prediction of a full case by A, a one-view one by B, and the merge.

    python -m benchmarks.full_size                 # the paper's sizes (tens of minutes on 2 cores, ~10 GB)
    python -m benchmarks.full_size --budget-gb 12  # each job's memory cap (default 12 GiB)

Before each job the memory plan (:mod:`brats_lightning.memory`) picks the setting: the paper's when it fits
``--budget-gb``, else the most faithful one that does (checkpointing first, then a smaller batch); the jobs
run with ``BRATS_MEMORY_BUDGET_GB`` set to the cap, so their own fit checks enforce it. Each job runs in its
own process (``MALLOC_MMAP_THRESHOLD_`` set so freed memory leaves RSS at once); its peak RSS comes from
``wait4``. One table: job, setting, planned and measured peak memory, time, output shapes
(docs/performance.md "Full size on the CPU").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import finish, make_main, pipeline_config, setup

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
PAPER_BATCH = {"A": 1, "B": 3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "full_size",
                        help="data, cache, runs and predictions go here (reused when present)")
    parser.add_argument("--cases", type=int, default=4, help="synthetic cases (3 train B's batch 3, 1 val)")
    parser.add_argument("--spacing", type=float, default=1.0, help="mm per voxel (1.0: 240x240x155)")
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="training steps per pipeline (2: the second "
                        "one has the optimizer state)")
    parser.add_argument("--tta", default="all", choices=["all", "flips", "none"],
                        help="views of pipeline A's prediction (all = 16)")
    parser.add_argument("--tta-b", default="none", choices=["all", "flips", "none"],
                        help="views of pipeline B's prediction (only the merge needs it)")
    parser.add_argument("--budget-gb", type=float, default=12.0, help="memory cap per job (GiB)")
    parser.add_argument("--pipelines", default="A,B")
    parser.add_argument("--cost-crop", type=int, default=64, help="crop of the checkpointing cost rows")
    parser.add_argument("--cost-steps", type=int, default=3, help="timed steps per cost row (0: no rows)")
    parser.add_argument("--no-record", action="store_true", help="don't append to benchmarks/RESULTS.md")
    return parser.parse_args(argv)


def run_measured(command: list[str], env: dict[str, str], log_path: Path) -> tuple[float, float]:
    """Run ``command``; return (seconds, peak RSS GiB of the process, from ``wait4``). Raises on failure,
    showing the end of its log."""
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise SystemExit(f"full_size: {' '.join(command[:3])} ... failed (log {log_path}):\n{tail}")
    return seconds, usage.ru_maxrss * 1024 / GIB


def choose_setting(pipeline: str, width: int, crop: int, budget: int) -> tuple[dict[str, Any], Any, Any]:
    """(model config, the paper setting's plan, the setting to run: a TrainingSetting) for ``pipeline``."""
    from brats_lightning.memory import TrainingSetting, fitting_settings, plan_training

    config = pipeline_config(pipeline)
    model = {"_target_": "brats_lightning.models.EquiUnet", "width": width, "norm": config["norm"]}
    batch, optimizer = PAPER_BATCH[pipeline], config["optimizer"]["name"]
    paper = plan_training(model, crop, batch, "32-true", optimizer)
    if paper.total <= budget * 0.9:
        return model, paper, TrainingSetting(False, crop, batch, paper)
    fits = fitting_settings(model, crop, batch, "32-true", optimizer, budget, limit=1)
    if not fits:
        raise SystemExit(f"full_size: pipeline {pipeline} fits {budget / GIB:.1f} GiB in no setting")
    return model, paper, fits[0]


def checkpointing_cost(width: int, crop: int, steps: int) -> dict[str, Any]:
    """Step time with and without checkpointing (pipeline A's EquiUnet, batch 1, fp32, Adam), alternating
    the two so that a changing machine load hits both alike; and the planned memory of each."""
    import statistics

    import torch

    from brats_lightning.losses import DeepSupervisionLoss, DiceLoss
    from brats_lightning.memory import build_network, plan_training

    model = {"_target_": "brats_lightning.models.EquiUnet", "width": width,
             "norm": pipeline_config("A")["norm"]}
    torch.manual_seed(0)
    nets = {ckpt: build_network(model | {"checkpointing": ckpt}).train() for ckpt in (False, True)}
    nets[True].load_state_dict(nets[False].state_dict())
    optimizers = {ckpt: torch.optim.Adam(net.parameters(), 1e-4) for ckpt, net in nets.items()}
    loss = DeepSupervisionLoss(DiceLoss(squared=True))
    image = torch.randn(1, 4, crop, crop, crop)
    target = (torch.rand(1, 3, crop, crop, crop) > 0.7).float()
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(steps + 1):  # the first round warms up
        for ckpt, net in nets.items():
            start = time.perf_counter()
            optimizers[ckpt].zero_grad(set_to_none=True)
            loss(net(image), target).backward()
            optimizers[ckpt].step()
            if i:
                times[ckpt].append(time.perf_counter() - start)
    plain, ckpt = (statistics.median(times[c]) * 1e3 for c in (False, True))
    plans = {c: plan_training(model, crop, 1, "32-true", "adam", c).total / GIB for c in (False, True)}
    return {"job": f"checkpointing cost, w={width} {crop}^3 batch 1",
            "setting": f"step {plain:.0f} -> {ckpt:.0f} ms ({ckpt / plain:.2f} x)",
            "plan GiB": f"{plans[False]:.2f} -> {plans[True]:.2f}",
            "time s": round(sum(map(sum, times.values())), 1)}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import nibabel as nib
    import numpy as np

    from brats_lightning.data.datamodule import generate_if_missing
    from brats_lightning.inference.tta import get_views
    from brats_lightning.memory import BUDGET_ENV, HEADROOM, padded_shape, plan_inference, plan_training

    device, info = setup(argparse.Namespace(device="cpu"))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    start = time.perf_counter()
    generate_if_missing(data, {"n_cases": args.cases, "spacing": args.spacing, "seed": 0, "year": 2020})
    rows: list[dict[str, Any]] = [{"job": "synthetic data", "time s": round(time.perf_counter() - start, 1),
                                   "setting": f"{args.cases} cases, {args.spacing} mm"}]
    rows += [checkpointing_cost(width, args.cost_crop, args.cost_steps) for width in (8, args.width)
             if args.cost_steps]
    budget = int(args.budget_gb * GIB)
    env = {**os.environ, "WANDB_MODE": "disabled", "MALLOC_MMAP_THRESHOLD_": "65536",
           BUDGET_ENV: str(args.budget_gb / HEADROOM)}  # the jobs' own checks: the plan <= --budget-gb
    predictions = {}
    val_case = None
    for pipeline in args.pipelines.split(","):
        model, paper, chosen = choose_setting(pipeline, args.width, args.crop, budget)
        ckpt_plan = plan_training(model, args.crop, PAPER_BATCH[pipeline], "32-true",
                                  pipeline_config(pipeline)["optimizer"]["name"], True)
        overrides = [
            "experiment=smoke", f"pipeline={pipeline}", f"data.root={data}", "data.generate=null",
            f"data.n_folds={args.cases}", f"paths.cache_dir={work / 'cache'}",
            f"paths.output_dir={work / 'runs'}", "name=full_size", f"model.width={args.width}",
            f"data.crop_size={chosen.crop_size}", f"pipeline.batch_size={chosen.batch_size}",
            f"model.checkpointing={str(chosen.checkpointing).lower()}",
            "pipeline.epochs=1", f"trainer.limit_train_batches={args.steps}", "trainer.limit_val_batches=1",
            "trainer.check_val_every_n_epoch=2",  # one whole-brain validation: train.py's, after fit
            "trainer.precision=32-true", "trainer.accelerator=cpu", "logger=csv", "resume=false",
        ]
        seconds, peak = run_measured([sys.executable, str(REPO / "train.py"), *overrides], env,
                                     work / f"train_{pipeline}.log")
        record = next(r for r in map(json.loads, map(Path.read_text, (work / "runs").rglob("run.json")))
                      if r["pipeline"] == pipeline)
        val_case = record["val_cases"][0]
        rows.append({
            "job": f"train {pipeline}: {record['global_step']} steps + whole-brain validation",
            "setting": f"w={args.width} {chosen.crop_size}^3 batch {chosen.batch_size}"
                       f"{' checkpointing' if chosen.checkpointing else ''}",
            "paper setting plan GiB": f"{paper.total / GIB:.1f} (checkpointing {ckpt_plan.total / GIB:.1f})",
            "plan GiB": round(chosen.plan.total / GIB, 2), "peak RSS GiB": round(peak, 2),
            "time s": round(seconds, 1),
            "val dice mean": round(record["val_metrics"].get("dice_mean", -1), 3)})
        out = work / f"pred_{pipeline}"
        tta = args.tta if pipeline == "A" else args.tta_b
        runs = work / "runs" / "full_size"
        command = [sys.executable, "-m", "brats_lightning.cli", "predict", "--runs", str(runs),
                   "--data", str(data / val_case), "--out", str(out), "--pipeline", pipeline,
                   "--tta", tta, "--view-batch", "1", "--device", "cpu", "--precision", "fp32"]
        seconds, peak = run_measured(command, env, work / f"predict_{pipeline}.log")
        label_map = nib.load(out / f"{val_case}.nii.gz")
        with np.load(out / f"{val_case}_probs.npz") as probs:
            box = tuple(probs["probs"].shape[1:])
        plan = plan_inference(model, padded_shape(box), 1)
        rows.append({"job": f"predict {pipeline}: 1 case, {len(get_views(tta))} views",
                     "setting": f"box {box}, view batch 1",
                     "plan GiB": round(plan.total / GIB, 2), "peak RSS GiB": round(peak, 2),
                     "time s": round(seconds, 1), "output": "x".join(map(str, label_map.shape))})
        predictions[pipeline] = out
    if len(predictions) == 2:
        merged = work / "merged"
        seconds, peak = run_measured(
            [sys.executable, "-m", "brats_lightning.cli", "merge", "--a", str(predictions["A"]), "--b",
             str(predictions["B"]), "--out", str(merged)], env, work / "merge.log")
        shape = nib.load(merged / f"{val_case}.nii.gz").shape
        rows.append({"job": "merge A + B", "peak RSS GiB": round(peak, 2), "time s": round(seconds, 1),
                     "output": "x".join(map(str, shape))})
    columns = ["job", "setting", "paper setting plan GiB", "plan GiB", "peak RSS GiB", "time s",
               "val dice mean", "output"]
    finish("full_size", info, vars(args) | {"argv": sys.argv[1:]}, columns, rows,
           f"Full size on {device} (budget {args.budget_gb} GiB per job)", no_record=args.no_record)
    return rows


main = make_main(parse_args, run)

if __name__ == "__main__":
    sys.exit(main())
