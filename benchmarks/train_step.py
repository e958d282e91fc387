"""Time training steps through the suite's own path: a Lightning Trainer fitting BratsModule.

What one timed step is: ``BratsModule.training_step`` (the network's forward with deep supervision, the
deep-supervision Dice loss, per-case losses, logging) plus Lightning's backward and optimizer step under the
configured precision plugin (autocast; gradient scaling for 16-mixed), with the speed switches of
:mod:`brats_lightning.speed` applied by ``BratsModule.configure_model`` exactly as in training. A callback
reads the clock at ``on_train_batch_start`` and ``on_train_batch_end`` (synchronizing the GPU first);
"iteration ms" is the time between two batch ends, which adds the data fetch, the host-to-device copy and
the batch augmentation of ``on_after_batch_transfer``. The data are fixed in-memory crops (the data pipeline
has its own benchmark, benchmarks/data_loader.py). docs/method.md "Measured anchors" (H200, EquiUnet w=48,
128^3,
batch 1, Adam): 82 ms fp16 eager, 42 ms compiled; the issue's target is <= 30 ms.

Usage (from the repository root):

    python -m benchmarks.train_step                   # CPU: EquiUnet w=8 64^3, fp32/bf16 x memory formats
    python -m benchmarks.train_step --compile both    # ... and torch.compile on/off (minutes on 2 cores)
    python -m benchmarks.train_step --paper           # CUDA: w=48 128^3, EquiUnet + attention, 16-mixed and
                                                      # bf16-mixed, compile on/off
    python -m benchmarks.train_step --tiny            # seconds: the code path only (tests)

Any option overrides the preset: ``--models``, ``--width``, ``--sizes``, ``--batch``, ``--precision``,
``--memory-format``, ``--compile``, ``--pipeline`` (A: GroupNorm + squared Dice + A's augmentation; B:
InstanceNorm + plain Dice + B's), ``--optimizer`` (adam, as in the anchors, or the pipeline's own: Ranger
for A). FLOPs of one forward + backward are counted by torch's FlopCounterMode on the meta device. Results:
a table, JSON in benchmarks/results/ and a section in RESULTS.md (``--no-record`` skips the files).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    csv_list,
    finish,
    make_main,
    pipeline_config,
    setup,
    sync,
)
from brats_lightning.data.datamodule import collate_cases
from brats_lightning.module import BratsModule
from brats_lightning.speed import resolve_speed

log = logging.getLogger("benchmarks.train_step")

MODELS = {"equiunet": "brats_lightning.models.EquiUnet", "unet": "brats_lightning.models.Unet",
          "attequiunet": "brats_lightning.models.AttEquiUnet"}
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
ALIASES = {"fp32": "32-true", "32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed", "16": "16-mixed"}
MEMORY_FORMATS = ("contiguous", "channels_last_3d")
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"device": "cpu", "models": "equiunet", "width": 8, "sizes": "64",
            "precision": "32-true,bf16-mixed", "memory_format": "contiguous,channels_last_3d",
            "compile": "no", "warmup": 2, "steps": 5},
    "paper": {"device": "cuda", "models": "equiunet,attequiunet", "width": 48, "sizes": "128",
              "precision": "16-mixed,bf16-mixed", "memory_format": "contiguous", "compile": "both",
              "warmup": 5, "steps": 20},
    "tiny": {"device": "cpu", "models": "equiunet", "width": 4, "sizes": "24", "precision": "32-true",
             "memory_format": "contiguous,channels_last_3d", "compile": "no", "warmup": 1, "steps": 2},
}
COLUMNS = ["model", "pipeline", "width", "size", "batch", "precision", "memory format", "norms", "compile",
           "optimizer", "step ms", "min ms", "iteration ms", "first step s", "first loss", "GFLOP/step",
           "TFLOP/s", "peak GiB"]


@dataclass(frozen=True)
class StepConfig:
    """One configuration to time (a row of the table)."""

    model: str = "equiunet"
    width: int = 8
    size: int = 64
    batch: int = 1
    precision: str = "32-true"
    memory_format: str = "contiguous"
    compile: bool = False
    pipeline: str = "A"
    optimizer: str = "adam"
    contiguous_norms: str = "auto"


class StepTimer(pl.Callback):
    """Clock reads around every training batch (GPU synchronized), the first loss and the peak memory."""

    def __init__(self, device: torch.device, warmup: int, clock: Callable[[], float] = time.perf_counter
                 ) -> None:
        self.device, self.warmup, self.clock = device, warmup, clock
        self.step_s: list[float] = []
        self.iteration_s: list[float] = []
        self.losses: list[float] = []
        self._start = 0.0
        self._last_end: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        sync(self.device)
        if batch_idx == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = self.clock()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        sync(self.device)
        now = self.clock()
        self.step_s.append(now - self._start)
        if self._last_end is not None:
            self.iteration_s.append(now - self._last_end)
        self._last_end = now
        self.losses.append(float(outputs["loss"]))


class FixedCrops(Dataset):
    """``n`` training items, all the same random crop (image, bool regions, case id)."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.n = n
        self.image = torch.randn(4, size, size, size, generator=generator)
        self.target = torch.rand(3, size, size, size, generator=generator) > 0.7

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.image, "target": self.target, "case_id": f"bench_{index:03d}"}


def module_configs(cfg: StepConfig, epochs: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model_config, pipeline config) for ``BratsModule``: the pipeline's norm, loss and augmentation;
    ``optimizer`` "adam" (lr 1e-4, as in the anchors) or "pipeline" (A: Ranger, B: Adam)."""
    pipeline = pipeline_config(cfg.pipeline, epochs=epochs)
    if cfg.optimizer == "adam":
        pipeline["optimizer"] = {"name": "adam", "lr": 1.0e-4}
    elif cfg.optimizer != "pipeline":
        raise SystemExit(f"train_step: --optimizer {cfg.optimizer!r}; expected adam or pipeline")
    model = {"_target_": MODELS[cfg.model], "width": cfg.width, "norm": pipeline["norm"]}
    return model, pipeline


def count_flops(cfg: StepConfig) -> int:
    """FLOPs of one forward + deep-supervision loss + backward (FlopCounterMode on the meta device)."""
    model_config, pipeline = module_configs(cfg)
    with torch.device("meta"):
        module = BratsModule(model_config, pipeline)
        module.train()
        x = torch.empty(cfg.batch, 4, cfg.size, cfg.size, cfg.size)
        target = torch.empty(cfg.batch, 3, cfg.size, cfg.size, cfg.size, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        module.loss(module.net(x), target).backward()
    return int(counter.get_total_flops())


def _quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (r".*does not have many workers.*", r".*isinstance\(treespec, LeafSpec\)",
                    r".*GPU available but not used.*", r".*You have overridden `on_after_batch_transfer`.*",
                    r".*Trying to infer the `batch_size`.*", r".*no `val_dataloader`.*"):
        warnings.filterwarnings("ignore", message=message)


def bench_config(cfg: StepConfig, device: torch.device, warmup: int, steps: int,
                 compile_mode: str | None = None, clock: Callable[[], float] = time.perf_counter
                 ) -> dict[str, Any]:
    """Fit BratsModule for ``warmup + steps`` batches of ``cfg`` and return the table row (a dict)."""
    _quiet_lightning()
    if cfg.precision == "16-mixed" and device.type == "cpu":
        raise SystemExit("train_step: 16-mixed (fp16 autocast + grad scaling) is CUDA only; use bf16-mixed")
    if device.type == "cpu" and cfg.precision == "bf16-mixed" and cfg.size // 8 == 2:
        raise SystemExit("train_step: bf16 on the CPU with 16^3 crops hits a oneDNN Conv3d gradient bug "
                         "(brats_lightning/precision.py); use sizes of 24 or more")
    row: dict[str, Any] = {"model": cfg.model, "pipeline": cfg.pipeline, "width": cfg.width, "size": cfg.size,
                           "batch": cfg.batch, "precision": cfg.precision, "memory format": cfg.memory_format,
                           "compile": cfg.compile, "optimizer": cfg.optimizer}
    flops = count_flops(cfg)
    row["GFLOP/step"] = round(flops / 1e9, 1)
    model_config, pipeline = module_configs(cfg, epochs=1)
    speed = {"memory_format": cfg.memory_format, "compile": cfg.compile, "compile_mode": compile_mode,
             "cudnn_benchmark": "auto", "contiguous_norms": cfg.contiguous_norms}
    plan = resolve_speed(speed, device.type, cfg.precision)
    channels_last = plan.memory_format != "contiguous"
    row["norms"] = ("contiguous" if plan.contiguous_norms else "native") if channels_last else "-"
    pl.seed_everything(0, verbose=False)
    module = BratsModule(model_config, pipeline, speed=speed)
    loader = DataLoader(FixedCrops(cfg.batch * (warmup + steps), cfg.size), batch_size=cfg.batch,
                        collate_fn=collate_cases, pin_memory=device.type == "cuda")
    timer = StepTimer(device, warmup, clock)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1, precision=cfg.precision, max_epochs=1,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        benchmark=plan.cudnn_benchmark)
    try:
        trainer.fit(module, train_dataloaders=loader)
    except torch.OutOfMemoryError:
        row["step ms"] = "OOM"
        return row
    finally:
        del trainer
    row.update({"_step_s": timer.step_s[warmup:], "_flops": flops,
                "_iteration_s": timer.iteration_s[max(warmup - 1, 0):],  # [i]: batch end i -> end i + 1
                "first step s": round(timer.step_s[0], 2), "first loss": round(timer.losses[0], 5),
                "peak GiB": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                             if device.type == "cuda" else None)})
    if not all(abs(v) < float("inf") for v in timer.losses):  # False for NaN too
        log.warning("%s: non-finite loss in %s", cfg, timer.losses)
    return _summarize(row)


def _summarize(row: dict[str, Any]) -> dict[str, Any]:
    """Fill the timing columns from the raw timed steps (``_step_s``, ``_iteration_s``)."""
    timed, iterations = row["_step_s"], row["_iteration_s"]
    median = statistics.median(timed)
    row.update({"step ms": round(median * 1e3, 1), "min ms": round(min(timed) * 1e3, 1),
                "iteration ms": round(statistics.median(iterations) * 1e3, 1) if iterations else None,
                "TFLOP/s": round(row["_flops"] / median / 1e12, 3)})
    return row


def run_configs(configs: list[StepConfig], device: torch.device, warmup: int, steps: int,
                compile_mode: str | None = None, rounds: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> list[dict[str, Any]]:
    """Time every configuration in turn (memory released and dynamo reset between them).

    With ``rounds`` > 1 the whole list runs again round-robin and each row pools the timed steps of all
    rounds (its first-step time and loss stay those of round 1): on a shared machine, a load that changes
    during the run then weighs on every configuration alike.
    """
    rows: list[dict[str, Any]] = []
    for r in range(rounds):
        for i, cfg in enumerate(configs):
            log.info("[round %d/%d, %d/%d] %s", r + 1, rounds, i + 1, len(configs), asdict(cfg))
            row = bench_config(cfg, device, warmup, steps, compile_mode, clock)
            if r == 0:
                rows.append(row)
            elif "_step_s" in row and "_step_s" in rows[i]:
                rows[i]["_step_s"] += row["_step_s"]
                rows[i]["_iteration_s"] += row["_iteration_s"]
                _summarize(rows[i])
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if cfg.compile:
                torch._dynamo.reset()
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--paper", action="store_true", help="the paper's sizes on CUDA (see the docstring)")
    preset.add_argument("--tiny", action="store_true", help="tiny sizes, seconds (tests)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cpu; --paper: cuda)")
    p.add_argument("--models", help="comma list of " + ",".join(MODELS))
    p.add_argument("--pipeline", default="A", choices=["A", "B"], help="norm, loss, augmentation (default A)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "pipeline"],
                   help="adam (lr 1e-4, as the anchors) or the pipeline's own (A: Ranger)")
    p.add_argument("--width", type=int, help="network width")
    p.add_argument("--sizes", help="comma list of cubic crop sides, multiples of 8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", help="comma list of 32-true (fp32), bf16-mixed, 16-mixed (CUDA)")
    p.add_argument("--memory-format", help="comma list of contiguous, channels_last_3d")
    p.add_argument("--compile", choices=["no", "yes", "both"], help="torch.compile the training forward")
    p.add_argument("--contiguous-norms", default="auto",
                   help="comma list of auto, true, false: speed.contiguous_norms (channels_last_3d only)")
    p.add_argument("--compile-mode", help="torch.compile mode (default: torch's default)")
    p.add_argument("--warmup", type=int, help="untimed steps per configuration")
    p.add_argument("--steps", type=int, help="timed steps per configuration")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the configurations round-robin this many times, pooling their steps")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time steps in CPU seconds of this process (time.process_time): with --threads 1, "
                        "what other jobs' load changes least")
    p.add_argument("--no-record", action="store_true", help="print only: no JSON, no RESULTS.md row")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    preset_name = "paper" if args.paper else "tiny" if args.tiny else "cpu"
    for key, value in PRESETS[preset_name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = csv_list(args.models, list(MODELS), "model")
    args.precision = [ALIASES.get(v, v) for v in csv_list(args.precision, None, "precision")]
    csv_list(args.precision, PRECISIONS, "precision")
    args.memory_format = csv_list(args.memory_format, MEMORY_FORMATS, "memory format")
    args.sizes = csv_list(args.sizes, None, "size", int)
    args.contiguous_norms = csv_list(args.contiguous_norms, ["auto", "true", "false"], "contiguous norms")
    if any(s % 8 for s in args.sizes):
        raise SystemExit(f"train_step: --sizes {args.sizes}; every side must be a multiple of 8")
    return args


def configs_from_args(args: argparse.Namespace) -> list[StepConfig]:
    """The cartesian product of the command line's lists."""
    compile_modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    configs = [StepConfig(model, args.width, size, args.batch, precision, fmt, compiled, args.pipeline,
                          args.optimizer, norms)
               for model, size, precision, fmt, norms, compiled in itertools.product(
                   args.models, args.sizes, args.precision, args.memory_format, args.contiguous_norms,
                   compile_modes)]
    # contiguous networks have no norm hooks: keep one configuration of each
    return list(dict.fromkeys(c if c.memory_format != "contiguous" else replace(c, contiguous_norms="auto")
                              for c in configs))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the benchmark described by parsed ``args``; print and record the table; return its rows."""
    device, info = setup(args)
    clock = time.process_time if args.cpu_time else time.perf_counter
    rows = run_configs(configs_from_args(args), device, args.warmup, args.steps, args.compile_mode,
                       args.rounds, clock)
    rounds = f" x {args.rounds} rounds" if args.rounds > 1 else ""
    title = (f"train step through Trainer.fit(BratsModule) ({info['label']}; warm-up {args.warmup}, "
             f"median of {args.steps}{rounds}{'; CPU time' if args.cpu_time else ''})")
    finish("train_step", info, vars(args), COLUMNS, rows, title, args.no_record)
    return rows


main = make_main(parse_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
