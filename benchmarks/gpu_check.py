"""GPU acceptance check (``make gpu-check``): the CUDA path at the paper's sizes in one script, one table.

    python -m benchmarks.gpu_check             # one CUDA GPU, synthetic 1 mm data (aimed at <= 8 minutes)
    python -m benchmarks.gpu_check --dry-run   # the same steps on the CPU at tiny sizes (the test suite)

Steps, each a row of the table (PASS / FAIL; exit 1 on any FAIL):

1. step: EquiUnet w=48 on a 128^3 crop (paper section 2.5) in 16-mixed with ``speed=auto`` (torch.compile
   on CUDA): the first-step loss eager vs compiled, step ms of both, compile time, the peak CUDA memory
   (``max_memory_allocated``) against the memory plan (:mod:`brats_lightning.memory`).
2. train A: ``train.py`` for a few hundred steps with fast SWA (snapshots every epoch), killed (SIGKILL) after
   its first ``last.ckpt`` and resumed; the training loss falls, ``swa.ckpt`` and its snapshots exist.
3. train B (a short run at batch 3, for the merge) as a 1-GPU DDP run (NCCL; gloo in the dry run).
4. predict A and B with fp16 TTA (16 views), merge them: seconds per case, one label map per case.
5. ``make bench-gpu`` (``benchmarks.run_all --gpu --strict``) against the targets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import console, pipeline_config, sync

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """What a check run uses (``GPU``: the paper's sizes on CUDA; ``DRY``: tiny, on the CPU)."""

    device: str
    accelerator: str
    precision: str
    cases: int
    spacing: float
    width: int
    crop: int
    epochs: int            # main schedule of the A run (each epoch = one pass over cases - val cases)
    swa_cycles: int
    swa_cycle_epochs: int
    timed_steps: int
    tta: str
    predict_precision: str
    backend: str
    lr: float              # the A run's Ranger lr (the paper's 1e-4 moves too little in a few hundred steps)
    bench: tuple[str, ...]


GPU = Sizes("cuda", "gpu", "16-mixed", 8, 1.0, 48, 128, 40, 2, 5, 20, "all", "fp16", "nccl", 1e-3,
            ("--gpu", "--strict"))
DRY = Sizes("cpu", "cpu", "32-true", 6, 4.0, 4, 32, 6, 1, 2, 2, "flips", "fp32", "gloo", 3e-2,
            ("--gpu", "--device", "cpu", "--tiny", "--no-compile", "--no-record", "--only", "train_step"))


@dataclass
class Report:
    """The table: (check, result, status) rows; ``failed`` when any status is FAIL."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, check: str, result: str, ok: bool | None = None) -> None:
        self.rows.append((check, result, "-" if ok is None else "PASS" if ok else "FAIL"))

    @property
    def failed(self) -> bool:
        return any(status == "FAIL" for *_, status in self.rows)

    def guard(self, check: str, fn: Callable[[], None]) -> None:
        """Run one step; an exception is a FAIL row with its message (the other steps still run)."""
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - every failure becomes a row of the table
            self.add(check, f"{type(err).__name__}: {str(err)[-300:]}", False)


def _timed(fn: Callable[[], Any], device: torch.device, n: int) -> float:
    """Median ms of ``n`` calls of ``fn``."""
    times = []
    for _ in range(n):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def step_check(sizes: Sizes, report: Report) -> None:
    """Step 1: eager vs compiled first-step loss, step ms, compile time, peak memory vs the plan."""
    from brats_lightning.memory import GIB, plan_training
    from brats_lightning.module import BratsModule

    device = torch.device(sizes.device)
    pipeline = pipeline_config("A") | {"optimizer": {"name": "adam", "lr": 1e-4}}
    model = {"_target_": "brats_lightning.models.EquiUnet", "width": sizes.width, "norm": pipeline["norm"]}
    torch.manual_seed(0)
    module = BratsModule(model, pipeline, speed={"compile": "auto"}).to(device).train()
    plan = module.apply_speed(device.type, sizes.precision)
    shape = (1, 4, sizes.crop, sizes.crop, sizes.crop)
    image = torch.randn(shape, device=device)
    target = (torch.rand(1, 3, *shape[2:], device=device) > 0.7).float()
    fp16 = sizes.precision == "16-mixed"

    def loss(compiled: bool) -> torch.Tensor:
        autocast = torch.autocast("cuda", torch.float16) if fp16 else contextlib.nullcontext()
        with autocast:
            return module.loss(module.run_net(image, compiled=compiled), target)

    with torch.no_grad():
        eager_loss = loss(False).item()
    optimizer = torch.optim.Adam(module.net.parameters(), 1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)

    def step(compiled: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss(compiled)).backward()
        scaler.step(optimizer)
        scaler.update()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    state = {k: v.clone() for k, v in module.net.state_dict().items()}
    eager_ms = _timed(lambda: step(False), device, sizes.timed_steps)
    report.add("step ms, eager", f"{eager_ms:.1f} ms ({sizes.precision}, w={sizes.width} {sizes.crop}^3 b1)")
    planned = plan_training(model, sizes.crop, 1, sizes.precision, "adam")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        ratio = planned.total / peak
        report.add("peak memory, eager step vs memory plan",
                   f"{peak / GIB:.2f} GiB measured, {planned.total / GIB:.2f} GiB planned ({ratio:.2f} x)",
                   0.7 <= ratio <= 1.6)
    else:
        report.add("peak memory, eager step vs memory plan", f"plan {planned.total / GIB:.3f} GiB (CPU: not "
                   "measured here; tests/test_memory.py checks RSS)")
    if not plan.compile:
        expected_off = None if sizes.device == "cpu" else False  # auto: compile off on the CPU
        report.add("compiled step", f"compile off ({plan.describe()})", expected_off)
        return
    module.net.load_state_dict(state)  # the compiled first-step loss at the eager one's weights
    start = time.perf_counter()
    with torch.no_grad():
        compiled_loss = loss(True).item()
    step(True)
    sync(device)
    compile_s = time.perf_counter() - start
    report.add("compile time (first forward + first step)", f"{compile_s:.1f} s")
    close = abs(compiled_loss - eager_loss) <= 2e-2 * abs(eager_loss)
    report.add("first-step loss, eager vs compiled", f"{eager_loss:.4f} vs {compiled_loss:.4f}", close)
    compiled_ms = _timed(lambda: step(True), device, sizes.timed_steps)
    report.add("step ms, compiled", f"{compiled_ms:.1f} ms ({eager_ms / compiled_ms:.2f} x faster)",
               compiled_ms < eager_ms)


def _train_command(sizes: Sizes, work: Path, pipeline: str, name: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "experiment=smoke", f"pipeline={pipeline}",
            f"data.root={work / 'data'}", "data.generate=null", f"data.n_folds={sizes.cases // 2}",
            f"paths.cache_dir={work / 'cache'}", f"paths.output_dir={work / 'runs'}", f"name={name}",
            f"model.width={sizes.width}", f"data.crop_size={sizes.crop}",
            f"trainer.precision={sizes.precision}", f"trainer.accelerator={sizes.accelerator}",
            "trainer.limit_train_batches=null", "trainer.limit_val_batches=2", "logger=csv",
            "speed.compile=auto", *extra]


def _run(command: list[str], log: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    with log.open("w") as handle:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"exit {result.returncode} ({log}):\n{tail}")
    return result


def _run_json(work: Path, name: str, pipeline: str) -> dict[str, Any]:
    records = map(json.loads, map(Path.read_text, (work / "runs" / name).rglob("run.json")))
    return next(r for r in records if r["pipeline"] == pipeline)


def train_a(sizes: Sizes, work: Path, env: dict[str, str], report: Report) -> None:
    """Step 2: train A with fast SWA, killed after its first last.ckpt and resumed; the loss falls."""
    swa = ["callbacks=[default,fast_swa]", f"callbacks.fast_swa.cycles={sizes.swa_cycles}",
           f"callbacks.fast_swa.cycle_epochs={sizes.swa_cycle_epochs}", "callbacks.fast_swa.snapshot_every=1",
           f"pipeline.epochs={sizes.epochs}", f"pipeline.optimizer.lr={sizes.lr}",
           f"trainer.check_val_every_n_epoch={sizes.epochs}"]
    command = _train_command(sizes, work, "A", "gpu_check", *swa)
    log = work / "train_A_killed.log"
    with log.open("w") as handle:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        start = time.perf_counter()
        while not list((work / "runs" / "gpu_check").rglob("last.ckpt")) and proc.poll() is None:
            time.sleep(0.2)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    report.add("train A killed after its first last.ckpt", f"{time.perf_counter() - start:.0f} s", killed)
    start = time.perf_counter()
    _run(command, work / "train_A.log", env)
    resumed = "resuming from" in (work / "train_A.log").read_text()
    record = _run_json(work, "gpu_check", "A")
    steps, swa_info = record["global_step"], record.get("fast_swa") or {}
    report.add("train A resumed to the end", f"{steps} steps, {time.perf_counter() - start:.0f} s", resumed)
    report.add("fast SWA snapshots", f"{swa_info.get('n_snapshots', 0)} snapshots, swa.ckpt "
               f"{'written' if record['checkpoints'].get('swa') else 'missing'}",
               bool(swa_info.get("n_snapshots")) and bool(record["checkpoints"].get("swa")))
    metrics = Path(record["run_dir"]) / "metrics.csv"
    losses = [float(row["train/loss_epoch"]) for row in _csv_rows(metrics) if row.get("train/loss_epoch")]
    main = losses[:sizes.epochs]  # the main schedule (the fast SWA cycles restart the learning rate)
    report.add("training loss falls (first -> last main epoch)", f"{main[0]:.3f} -> {main[-1]:.3f}",
               len(main) > 1 and main[-1] < main[0])


def _csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open() as handle:
        return list(csv.DictReader(handle))


def train_b_ddp(sizes: Sizes, work: Path, env: dict[str, str], report: Report) -> None:
    """Step 3: a short B run (batch 3, for the merge) under 1-GPU DDP (NCCL; gloo on the CPU)."""
    start = time.perf_counter()
    _run(_train_command(sizes, work, "B", "gpu_check", "pipeline.epochs=2", "speed.compile=false",
                        "trainer=ddp", "trainer.devices=1"), work / "train_B_ddp.log", env)
    backend = f"distributed_backend={sizes.backend}"
    report.add(f"train B (2 epochs, batch 3), 1-GPU DDP ({sizes.backend})",
               f"{time.perf_counter() - start:.0f} s", backend in (work / "train_B_ddp.log").read_text())


def predict_and_merge(sizes: Sizes, work: Path, env: dict[str, str], report: Report) -> None:
    """Step 4: A and B predict every case with TTA in ``predict_precision``, then the merge."""
    from brats_lightning.predictions import read_manifest

    outputs = {}
    for pipeline in ("A", "B"):
        out = work / f"pred_{pipeline}"
        command = [sys.executable, "-m", "brats_lightning.cli", "predict", "--runs",
                   str(work / "runs" / "gpu_check"), "--data", str(work / "data"), "--out", str(out),
                   "--pipeline", pipeline, "--tta", sizes.tta, "--precision", sizes.predict_precision,
                   "--device", sizes.device]
        _run(command, work / f"predict_{pipeline}.log", env)
        seconds = list((read_manifest(out) or {}).get("seconds_per_case", {}).values())
        report.add(f"inference s/case, {pipeline} ({sizes.tta} views, {sizes.predict_precision})",
                   f"{statistics.mean(seconds):.2f} s ({len(seconds)} cases)", len(seconds) == sizes.cases)
        outputs[pipeline] = out
    merged = work / "merged"
    _run([sys.executable, "-m", "brats_lightning.cli", "merge", "--a", str(outputs["A"]), "--b",
          str(outputs["B"]), "--out", str(merged)], work / "merge.log", env)
    written = len(list(merged.glob("*.nii.gz")))
    report.add("merge A + B", f"{written} label maps", written == sizes.cases)


def bench(sizes: Sizes, work: Path, env: dict[str, str], report: Report) -> None:
    """Step 5: ``make bench-gpu`` against the targets (the dry run: its CPU code path, tiny)."""
    start = time.perf_counter()
    _run([sys.executable, "-m", "benchmarks.run_all", *sizes.bench], work / "bench.log", env)
    report.add("make bench-gpu (benchmarks.run_all " + " ".join(sizes.bench) + ")",
               f"{time.perf_counter() - start:.0f} s, see {work / 'bench.log'}", True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (seconds to minutes)")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "gpu_check",
                        help="data, runs, predictions and logs (cleared first)")
    parser.add_argument("--skip-bench", action="store_true", help="leave out step 5")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Report:
    """Every step in order; the report of their rows."""
    import shutil

    from brats_lightning.data.datamodule import generate_if_missing

    sizes = DRY if args.dry_run else GPU
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    report = Report()
    start = time.perf_counter()
    generate_if_missing(work / "data", {"n_cases": sizes.cases, "spacing": sizes.spacing, "seed": 0,
                                        "year": 2020})
    report.add("synthetic data",
               f"{sizes.cases} cases at {sizes.spacing} mm, {time.perf_counter() - start:.0f} s")
    report.guard("step", lambda: step_check(sizes, report))
    report.guard("train A", lambda: train_a(sizes, work, env, report))
    report.guard("train B / DDP", lambda: train_b_ddp(sizes, work, env, report))
    report.guard("predict / merge", lambda: predict_and_merge(sizes, work, env, report))
    if not args.skip_bench:
        report.guard("bench-gpu", lambda: bench(sizes, work, env, report))
    minutes = (time.perf_counter() - start) / 60
    report.add("total time", f"{minutes:.1f} min", None if args.dry_run else minutes <= 8)
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the check, print the table; exit 1 on any FAIL (or without CUDA, unless ``--dry-run``)."""
    from rich.table import Table

    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --dry-run for the CPU code path", file=sys.stderr)
        return 1
    report = run(args)
    sizes = DRY if args.dry_run else GPU
    table = Table(title=f"gpu_check on {torch.cuda.get_device_name() if sizes.device == 'cuda' else 'cpu'}"
                  f"{' (dry run)' if args.dry_run else ''}")
    for column in ("check", "result", "status"):
        table.add_column(column)
    for row in report.rows:
        table.add_row(*row)
    console().print(table)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
