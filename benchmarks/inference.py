"""Inference time per case: test-time views x ensemble members through brats_lightning.inference.

One case is a preprocessed, brain-box-cropped volume (random values; the time does not depend on them).
It goes through :func:`brats_lightning.inference.predictor.predict_probabilities`, the predictor's own
per-case path: zero padding to a multiple of 8, copy to the device, for every network every TTA view
(:func:`~brats_lightning.inference.tta.iter_view_probabilities`: views batched ``view batch`` at a time,
autocast, sigmoid, exact inverse), float64 running mean over views and networks, unpadding, copy back.
Networks are randomly initialized ``EquiUnet``s in eval mode (weights don't change the cost). Optional speed
switches (memory format, torch.compile) wrap each network with :class:`brats_lightning.speed.InferenceNet`.

docs/method.md "Measured anchors" (H200, EquiUnet w=48, 144x176x144, fp16): 70 ms per volume at batch 1, 32
ms at
batch 8 (80 views = 2.6 s per case); the issue's target: 16 views x 5 models <= 1.5 s per case.

``--overhead`` measures what the predictor's path costs beyond the network (issue 18, goal <= 1.05x): CPU
seconds per case of ``predict_probabilities`` with the predictor's own speed plan
(:func:`brats_lightning.speed.inference_plan`) and view batch, against a plain loop over a copy of the same
network (contiguous, no hooks) and the same views, one view at a time (:func:`plain_loop`); both must give
the same probabilities. CPU time of this process (``time.process_time``) is what other jobs' load changes
least; on CUDA, wall time.

Usage (from the repository root):

    python -m benchmarks.inference            # CPU: w=8, 80x96x80 (demo brain box), 16 views, 1 and 2 models
    python -m benchmarks.inference --overhead --tta flips --threads 1   # predictor / plain loop, 8 flips
    python -m benchmarks.inference --paper    # CUDA: w=48, 144x176x144, 16 views x 5 models, compile on/off
    python -m benchmarks.inference --tiny     # seconds (tests)
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import logging
import shlex
import statistics
import sys
import time
from typing import Any

import hydra.utils
import numpy as np
import torch

from benchmarks.common import (
    csv_list,
    finish,
    make_main,
    pipeline_config,
    setup,
    sync,
)
from brats_lightning.inference.predictor import PredictOptions, predict_probabilities
from brats_lightning.inference.tta import VIEW_SETS, View, get_views
from brats_lightning.models import AttEquiUnet, EquiUnet, Unet
from brats_lightning.precision import resolve_amp_dtype
from brats_lightning.speed import AMP_NAMES, InferenceNet, inference_plan

log = logging.getLogger("benchmarks.inference")

MODELS = {"equiunet": EquiUnet, "unet": Unet, "attequiunet": AttEquiUnet}
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"device": "cpu", "width": 8, "shape": "80,96,80", "tta": "all", "view_batch": "4",
            "n_models": "1,2", "precision": "auto", "memory_format": "contiguous,channels_last_3d",
            "compile": "no", "repeats": 1},
    "paper": {"device": "cuda", "width": 48, "shape": "144,176,144", "tta": "all", "view_batch": "1,8",
              "n_models": "1,5", "precision": "auto", "memory_format": "contiguous", "compile": "both",
              "repeats": 3},
    "tiny": {"device": "cpu", "width": 4, "shape": "16,24,16", "tta": "none,flips", "view_batch": "4",
             "n_models": "1,2", "precision": "fp32", "memory_format": "contiguous,channels_last_3d",
             "compile": "no", "repeats": 1},
}
COLUMNS = ["model", "width", "shape", "views", "view batch", "models", "precision", "memory format",
           "compile", "s/case", "min s", "ms/volume", "warm-up s"]
OVERHEAD_COLUMNS = ["model", "pipeline", "width", "shape", "views", "view batch", "precision",
                    "memory format", "norms", "plain s", "predictor s", "ratio", "max |diff|", "clock"]


def build_networks(args: argparse.Namespace, n: int, device: torch.device, memory_format: str,
                   compiled: bool, precision: str) -> list[torch.nn.Module]:
    """``n`` randomly initialized networks in eval mode on ``device``, wrapped with the speed switches."""
    norm_factory = hydra.utils.instantiate(pipeline_config(args.pipeline)["norm"])
    plan = inference_plan(device.type, resolve_amp_dtype(device, precision),
                          {"memory_format": memory_format, "compile": compiled, "cudnn_benchmark": "auto"})
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = plan.cudnn_benchmark
    nets = []
    for seed in range(n):
        torch.manual_seed(seed)
        net = MODELS[args.model](width=args.width, norm=norm_factory).to(device).eval()
        nets.append(InferenceNet(net, plan).eval())
    return nets


def bench_config(args: argparse.Namespace, device: torch.device, tta: str, view_batch: int, n_models: int,
                 precision: str, memory_format: str, compiled: bool) -> dict[str, Any]:
    """Time ``predict_probabilities`` for one configuration; returns the table row."""
    views = get_views(tta)
    amp_dtype = resolve_amp_dtype(device, precision)
    amp_name = AMP_NAMES[amp_dtype]
    nets = build_networks(args, n_models, device, memory_format, compiled, amp_name)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, *args.shape), dtype=np.float32)
    row: dict[str, Any] = {"model": args.model, "width": args.width, "shape": "x".join(map(str, args.shape)),
                           "views": len(views), "view batch": view_batch, "models": n_models,
                           "precision": amp_name, "memory format": memory_format, "compile": compiled}
    try:
        sync(device)
        start = time.perf_counter()
        # warm-up: every view when compiling (both view shapes, the timed batch sizes), else one view
        warm_views = views if compiled else views[:1]
        predict_probabilities(images, nets[:1] if not compiled else nets, warm_views, view_batch, device,
                              amp_dtype)
        sync(device)
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            mean, _, members = predict_probabilities(images, nets, views, view_batch, device, amp_dtype)
            sync(device)
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        row["s/case"] = "OOM"
        return row
    if members != len(views) * n_models or mean.shape != (3, *args.shape):
        raise RuntimeError(f"inference benchmark: got {members} members and shape {mean.shape}; expected "
                           f"{len(views) * n_models} and {(3, *args.shape)}")
    median = statistics.median(times)
    row.update({"s/case": round(median, 3), "min s": round(min(times), 3),
                "ms/volume": round(median / members * 1e3, 1), "warm-up s": round(first, 2)})
    return row


def plain_loop(net: torch.nn.Module, image: torch.Tensor, views: list[View],
               amp_dtype: torch.dtype | None) -> torch.Tensor:
    """The overhead row's reference: ``net`` on one view at a time, sigmoid, inverse view, mean (float32)."""
    total = torch.zeros((3, *image.shape[-3:]), device=image.device)
    with torch.inference_mode(), torch.autocast(image.device.type, amp_dtype or torch.float32,
                                                enabled=amp_dtype is not None):
        for view in views:
            total += view.inverse(torch.sigmoid(net(view.forward(image))[0].float()))
    return total / len(views)


def bench_overhead(args: argparse.Namespace, device: torch.device, tta: str, precision: str
                   ) -> dict[str, Any]:
    """CPU seconds per case of ``predict_probabilities`` (the predictor's plan and view batch) against
    :func:`plain_loop` over a contiguous copy of the same network; the row, with their ratio."""
    views = list(get_views(tta))
    amp_dtype = resolve_amp_dtype(device, precision)
    view_batch = PredictOptions().view_batch_size
    torch.manual_seed(0)
    norm_factory = hydra.utils.instantiate(pipeline_config(args.pipeline)["norm"])
    bare = MODELS[args.model](width=args.width, norm=norm_factory).to(device).eval()
    plan = inference_plan(device.type, amp_dtype)
    wrapped = InferenceNet(copy.deepcopy(bare), plan).eval()
    images = np.random.default_rng(0).standard_normal((4, *args.shape), dtype=np.float32)
    image = torch.from_numpy(images)[None].to(device)
    clock = time.process_time if device.type == "cpu" else time.perf_counter

    def timed(fn: Any) -> tuple[float, torch.Tensor]:
        sync(device)
        start = clock()
        out = fn()
        sync(device)
        return clock() - start, torch.as_tensor(out)

    def predictor() -> np.ndarray:
        return predict_probabilities(images, [wrapped], views, view_batch, device, amp_dtype)[0]

    predict_probabilities(images, [wrapped], views[:1], view_batch, device, amp_dtype)  # warm-up
    plain_loop(bare, image, views[:1], amp_dtype)
    plain_s, predictor_s = [], []
    for _ in range(args.repeats):  # alternating, so a changing load weighs on both alike
        seconds, reference = timed(lambda: plain_loop(bare, image, views, amp_dtype).cpu())
        plain_s.append(seconds)
        seconds, probs = timed(predictor)
        predictor_s.append(seconds)
    diff = float((probs - reference).abs().max())
    tolerance = 1e-3 if amp_dtype is None else 2e-2  # fp32: other kernels (oneDNN, layouts) reorder sums
    if diff > tolerance:
        raise RuntimeError(f"inference overhead: predictor and plain loop differ by {diff:.2e} "
                           f"(> {tolerance:g})")
    plain, fast = statistics.median(plain_s), statistics.median(predictor_s)
    return {"model": args.model, "pipeline": args.pipeline, "width": args.width,
            "shape": "x".join(map(str, args.shape)), "views": len(views), "view batch": view_batch,
            "precision": AMP_NAMES[amp_dtype], "memory format": plan.memory_format,
            "norms": "contiguous" if plan.contiguous_norms else "native", "plain s": round(plain, 3),
            "predictor s": round(fast, 3), "ratio": round(fast / plain, 3), "max |diff|": f"{diff:.1e}",
            "clock": "CPU time" if device.type == "cpu" else "wall"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--paper", action="store_true", help="the paper's sizes on CUDA (see the docstring)")
    preset.add_argument("--tiny", action="store_true", help="tiny sizes, seconds (tests)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cpu; --paper: cuda)")
    p.add_argument("--model", default="equiunet", choices=sorted(MODELS))
    p.add_argument("--pipeline", default="A", choices=["A", "B"], help="norm layer (A GroupNorm, B Instance)")
    p.add_argument("--width", type=int, help="network width")
    p.add_argument("--shape", help="padded brain-box shape X,Y,Z (multiples of 8)")
    p.add_argument("--tta", help=f"comma list of view sets: {', '.join(VIEW_SETS)} (16 views = all)")
    p.add_argument("--view-batch", help="comma list of views per network call")
    p.add_argument("--n-models", help="comma list of ensemble sizes")
    p.add_argument("--precision", help="comma list of auto (fp16 CUDA / bf16 CPU), fp32, bf16, fp16")
    p.add_argument("--memory-format", help="comma list of contiguous, channels_last_3d")
    p.add_argument("--compile", choices=["no", "yes", "both"], help="torch.compile each network")
    p.add_argument("--repeats", type=int, help="timed cases per configuration (after one warm-up case)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--overhead", action="store_true",
                   help="predictor / plain loop over the same network and views (see the docstring)")
    p.add_argument("--no-record", action="store_true", help="print only: no JSON, no RESULTS.md row")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    for key, value in PRESETS["paper" if args.paper else "tiny" if args.tiny else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.shape = tuple(csv_list(args.shape, None, "shape", int))
    if len(args.shape) != 3 or any(s % 8 for s in args.shape):
        raise SystemExit(f"inference: --shape {args.shape}; expected X,Y,Z, each a multiple of 8")
    args.tta = csv_list(args.tta, list(VIEW_SETS), "view set")
    args.view_batch = csv_list(args.view_batch, None, "view batch", int)
    args.n_models = csv_list(args.n_models, None, "ensemble size", int)
    args.precision = csv_list(args.precision, ["auto", "fp32", "bf16", "fp16"], "precision")
    args.memory_format = csv_list(args.memory_format, ["contiguous", "channels_last_3d"], "memory format")
    return args


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the benchmark described by parsed ``args``; print and record the table; return its rows."""
    device, info = setup(args)
    if args.overhead:
        rows = [bench_overhead(args, device, tta, precision)
                for tta, precision in itertools.product(args.tta, args.precision)]
        title = f"inference overhead: predict_probabilities / plain loop ({info['label']})"
        command = "python -m benchmarks.inference " + shlex.join(args.argv if args.argv is not None
                                                                 else sys.argv[1:])
        finish("inference_overhead", info, {**vars(args), "command": command}, OVERHEAD_COLUMNS, rows, title,
               args.no_record)
        return rows
    compile_modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    rows = []
    for tta, view_batch, n_models, precision, fmt, compiled in itertools.product(
            args.tta, args.view_batch, args.n_models, args.precision, args.memory_format, compile_modes):
        log.info("views %s, view batch %d, %d model(s), %s, %s, compile=%s", tta, view_batch, n_models,
                 precision, fmt, compiled)
        rows.append(bench_config(args, device, tta, view_batch, n_models, precision, fmt, compiled))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if compiled:
            torch._dynamo.reset()
    title = f"inference per case: predict_probabilities (TTA x models) ({info['label']})"
    finish("inference", info, vars(args), COLUMNS, rows, title, args.no_record)
    return rows


main = make_main(parse_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
