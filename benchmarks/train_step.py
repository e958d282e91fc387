"""Time one training step of each network: forward with deep supervision, Dice loss sum, backward, Adam step.

SPEC.md "Measured anchors" (H200, EquiUnet w=48, 128^3, batch 1): 82 ms fp16 eager, 42 ms compiled. This
script measures the same step for our networks, so regressions and new hardware can be compared.

Usage (from the repository root):

    python -m benchmarks.train_step                  # CPU defaults: w=8, 32^3 and 64^3, batch 1, < 60 s
    python -m benchmarks.train_step --device cuda    # GPU defaults: w=48, 128^3, 16-mixed and bf16-mixed
    python -m benchmarks.train_step --device cuda --memory-format contiguous,channels_last_3d --compile both

Each configuration: count FLOPs of one forward+backward (torch's FlopCounterMode on the meta device),
build the network, run ``--warmup`` untimed steps, then time ``--steps`` steps (synchronizing the GPU
around each) and report the median and minimum. Results: a rich table, JSON in benchmarks/results/ and a
section in RESULTS.md (``--no-record`` skips both files).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import describe_device, record
from brats_lightning.losses import DeepSupervisionLoss, DiceLoss
from brats_lightning.models import AttEquiUnet, EquiUnet, Unet
from brats_lightning.models.blocks import group_norm, instance_norm

log = logging.getLogger("benchmarks.train_step")

MODELS: dict[str, type[torch.nn.Module]] = {"equiunet": EquiUnet, "unet": Unet, "attequiunet": AttEquiUnet}
NORMS = {"group": group_norm, "instance": instance_norm}
PRECISIONS = {"fp32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
DEFAULTS = {
    "cpu": {"width": 8, "sizes": "32,64", "precision": "fp32,bf16-mixed", "warmup": 1, "steps": 3},
    "cuda": {"width": 48, "sizes": "128", "precision": "16-mixed,bf16-mixed", "warmup": 5, "steps": 20},
}
COLUMNS = ["model", "norm", "width", "size", "batch", "precision", "memory format", "compile",
           "median ms", "min ms", "GFLOP/step", "TFLOP/s", "peak GiB"]


def _csv(value: str, allowed: dict[str, Any] | None, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise SystemExit(f"train_step: unknown {what} {bad}; expected a comma list of {sorted(allowed)}")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--models", default="equiunet,unet,attequiunet", help="comma list of " + ",".join(MODELS))
    p.add_argument("--norm", default="group", choices=sorted(NORMS))
    p.add_argument("--width", type=int, help="network width (CPU default 8, CUDA 48)")
    p.add_argument("--sizes", help="comma list of cubic crop sides, multiples of 8 (CPU 32,64; CUDA 128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", help="comma list of fp32, bf16-mixed, 16-mixed (CUDA only)")
    p.add_argument("--memory-format", default="contiguous", help="comma list of contiguous, channels_last_3d")
    p.add_argument("--compile", default="no", choices=["no", "yes", "both"], help="torch.compile the network")
    p.add_argument("--warmup", type=int, help="untimed steps per configuration (CPU 1, CUDA 5)")
    p.add_argument("--steps", type=int, help="timed steps per configuration (CPU 3, CUDA 20)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="leave cudnn.benchmark off")
    p.add_argument("--no-record", action="store_true", help="print only: no JSON, no RESULTS.md row")
    args = p.parse_args(argv)
    kind = torch.device(args.device).type
    if kind not in DEFAULTS:
        raise SystemExit(f"train_step: --device {args.device} is not supported; use cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "train_step: --device cuda asked but torch.cuda.is_available() is False; use --device cpu"
        )
    for key, value in DEFAULTS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = _csv(args.models, MODELS, "model")
    args.precision = _csv(args.precision, PRECISIONS, "precision")
    args.memory_format = _csv(args.memory_format, MEMORY_FORMATS, "memory format")
    args.sizes = [int(s) for s in _csv(args.sizes, None, "size")]
    if any(s % 8 for s in args.sizes):
        raise SystemExit(f"train_step: --sizes {args.sizes}; every side must be a multiple of 8")
    if kind == "cpu" and "16-mixed" in args.precision:
        raise SystemExit(
            "train_step: 16-mixed (fp16 autocast + GradScaler) is CUDA only; on CPU use bf16-mixed"
        )
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(args: argparse.Namespace, name: str, size: int, loss_fn: torch.nn.Module) -> int:
    """FLOPs of one forward + loss + backward, by torch's FlopCounterMode on the meta device (no compute)."""
    with torch.device("meta"):
        net = MODELS[name](width=args.width, norm=NORMS[args.norm]).train()
        x = torch.empty(args.batch, 4, size, size, size)
        target = torch.empty(args.batch, 3, size, size, size, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        loss_fn(net(x), target).backward()
    return int(counter.get_total_flops())


def make_step(
    model: Callable[[torch.Tensor], Any],
    params: list[torch.nn.Parameter],
    x: torch.Tensor,
    target: torch.Tensor,
    loss_fn: torch.nn.Module,
    precision: str,
) -> Callable[[], torch.Tensor]:
    """One optimizer step closure: zero_grad, autocast forward + loss, backward (scaled for fp16), Adam."""
    device = x.device
    dtype = PRECISIONS[precision]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x), target)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return loss.detach()

    return step


def bench_one(
    args: argparse.Namespace, name: str, size: int, precision: str, memory_format: str, compiled: bool
) -> list[Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = MODELS[name](width=args.width, norm=NORMS[args.norm]).to(device).train()
    fmt = MEMORY_FORMATS[memory_format]
    x = torch.randn(args.batch, 4, size, size, size, device=device).contiguous(memory_format=fmt)
    target = torch.rand(args.batch, 3, size, size, size, device=device) > 0.7
    loss_fn = DeepSupervisionLoss(DiceLoss(squared=True))
    flops = count_flops(args, name, size, loss_fn)
    net = net.to(memory_format=fmt)
    model = torch.compile(net) if compiled else net
    step = make_step(model, list(net.parameters()), x, target, loss_fn, precision)
    row_head = [name, args.norm, args.width, size, args.batch, precision, memory_format, compiled]
    try:
        for _ in range(args.warmup):
            step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            _sync(device)
            start = time.perf_counter()
            loss = step()
            _sync(device)
            times.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            log.warning("%s: non-finite loss %s", row_head, loss.item())
    except torch.OutOfMemoryError:
        return [*row_head, "OOM", None, round(flops / 1e9, 1), None, None]
    median = statistics.median(times)
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    return [*row_head, round(median * 1e3, 1), round(min(times) * 1e3, 1), round(flops / 1e9, 1),
            round(flops / median / 1e12, 3), peak]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    info = describe_device(device)
    compile_modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    rows = []
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # rich assumes 80 columns when piped; the table needs about 150
    configs = list(
        itertools.product(args.models, args.sizes, args.precision, args.memory_format, compile_modes)
    )
    with console.status("") as status:
        for i, (name, size, precision, fmt, compiled) in enumerate(configs, start=1):
            status.update(f"[{i}/{len(configs)}] {name} {size}^3 {precision} {fmt} compile={compiled}")
            rows.append(bench_one(args, name, size, precision, fmt, compiled))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if compiled:
                torch._dynamo.reset()
    table = Table(title=f"train step ({info['label']}; warm-up {args.warmup}, median of {args.steps})")
    for col in COLUMNS:
        left = col in ("model", "norm", "precision", "memory format")
        table.add_column(col, justify="left" if left else "right")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)
    if not args.no_record:
        json_path, md_path = record("train_step", info, vars(args), COLUMNS, rows)
        console.print(f"saved {json_path} and appended to {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
