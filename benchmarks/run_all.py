"""Run every benchmark, then one table against docs/method.md's measured anchors and the issue's targets.

    python -m benchmarks.run_all              # CPU, demo sizes, < 5 minutes on 2 cores (make bench)
    python -m benchmarks.run_all --compile    # ... plus torch.compile training rows (minutes more on a CPU)
    python -m benchmarks.run_all --gpu        # CUDA, the paper's sizes, ~10-15 minutes (make bench-gpu)
    python -m benchmarks.run_all --gpu --device cpu --tiny --no-compile  # GPU code path in seconds (tests)

What runs (each benchmark also records its own table; see the modules' docstrings):

- ``train_step``: Trainer.fit(BratsModule) steps. GPU: EquiUnet w=48 128^3 batch 1 in 16-mixed eager and
  compiled, bf16 compiled, the attention variant eager and compiled, channels_last_3d compiled, and the
  paper's Ranger (pipeline A) compiled, all with Adam unless said. CPU: EquiUnet w=8 64^3 in fp32 and bf16 x
  contiguous / channels_last_3d (``--compile``: the compiled rows too).
- ``data_loader``: samples/s of the real training loader + augmentation (GPU: 1 mm cases, 128^3, 8 workers;
  CPU: 2 mm, 64^3, 0/1/2 workers).
- ``inference``: seconds per case of ``predict_probabilities`` (GPU: w=48, 144x176x144, 16 views at view
  batch 1 and 8 with one model, and 16 views x 5 models eager and compiled; CPU: w=8, 80x96x80, 16 views x
  1 model in both memory formats, x 2 models in channels_last_3d; and the predictor's overhead against a
  plain loop over the same network and 8 flips, ``inference.py --overhead``).
- ``cache``: one training sample from raw .nii.gz vs the memory-mapped cache (1 mm case, 128^3 crop).
- ``metrics``: Dice + HD95 + sensitivity + specificity of one 240x240x155 case, and its lesion-wise scores
  (BraTS 2023, 10 lesions) against the whole-volume baseline.

The comparison table marks each target PASS or FAIL (``--strict``: exit 1 on a FAIL); with ``--tiny`` the
sizes are not the anchors' and nothing is compared. ``--only a,b`` runs a subset; ``--no-record`` writes no
files.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from benchmarks import cache as cache_bench
from benchmarks import data_loader, inference, metrics, train_step
from benchmarks.common import check_device, csv_list, describe_device, finish
from benchmarks.train_step import StepConfig
from brats_lightning.precision import cpu_supports_bf16

log = logging.getLogger("benchmarks.run_all")

BENCHES = ("train_step", "data_loader", "inference", "cache", "metrics")
SUMMARY_COLUMNS = ["check", "measured", "docs/method.md anchor", "target", "status"]


@dataclass
class Check:
    """One row of the comparison table."""

    check: str
    measured: str
    anchor: str = "-"
    target: str = "-"
    status: str = "info"

    def row(self) -> dict[str, str]:
        return {"check": self.check, "measured": self.measured, "docs/method.md anchor": self.anchor,
                "target": self.target, "status": self.status}


# ------------------------------------------------------------------------------------------ configurations
def train_configs(gpu: bool, tiny: bool, device: torch.device, compile_on: bool) -> dict[str, StepConfig]:
    """Named training-step configurations of the suite (see the module docstring)."""
    width, size = (4, 24) if tiny else (48, 128) if gpu else (8, 64)
    bf16 = "bf16-mixed" if device.type == "cuda" or cpu_supports_bf16() else "32-true"
    if gpu:
        half = "16-mixed" if device.type == "cuda" else bf16
        base = StepConfig("equiunet", width, size, 1, half, "contiguous", False, "A", "adam")
        configs = {
            "eager": base,
            "compiled": replace(base, compile=True),
            "compiled_bf16": replace(base, precision=bf16, compile=True),
            "att_eager": replace(base, model="attequiunet"),
            "att_compiled": replace(base, model="attequiunet", compile=True),
            "cl_compiled": replace(base, memory_format="channels_last_3d", compile=True),
            "ranger_compiled": replace(base, optimizer="pipeline", compile=True),
        }
    else:
        base = StepConfig("equiunet", width, size, 1, "32-true", "contiguous", False, "A", "adam")
        configs = {
            "fp32": base,
            "fp32_cl": replace(base, memory_format="channels_last_3d"),
            "bf16": replace(base, precision=bf16),
            "bf16_cl": replace(base, precision=bf16, memory_format="channels_last_3d"),
        }
        if compile_on:
            configs["bf16_cl_compiled"] = replace(configs["bf16_cl"], compile=True)
            configs["fp32_cl_compiled"] = replace(configs["fp32_cl"], compile=True)
    if not compile_on:
        configs = {k: replace(c, compile=False) for k, c in configs.items()}
    return configs


def inference_configs(gpu: bool, tiny: bool) -> tuple[list[str], dict[str, tuple[str, int, int, str, bool]]]:
    """(argv of the inference preset, named (views, view batch, models, memory format, compile) tuples)."""
    argv = ["--tiny"] if tiny else ["--paper"] if gpu else []
    n_ens = 2 if tiny or not gpu else 5
    views = "flips" if tiny else "all"
    if gpu:
        one = "none" if tiny else views
        return argv, {"b1": (one, 1, 1, "contiguous", False), "b8": (one, 8, 1, "contiguous", False),
                      "ensemble": (views, 8, n_ens, "contiguous", False),
                      "ensemble_compiled": (views, 8, n_ens, "contiguous", True)}
    return argv, {"one": (views, 4, 1, "contiguous", False),
                  "one_cl": (views, 4, 1, "channels_last_3d", False),
                  "ensemble_cl": (views, 4, n_ens, "channels_last_3d", False)}


# ---------------------------------------------------------------------------------------------- running
def run_train(configs: dict[str, StepConfig], device: torch.device, gpu: bool, tiny: bool, record: bool,
              command: str) -> dict[str, dict[str, Any]]:
    # CPU: two round-robin rounds, so that a load changing during the run weighs on every row alike
    warmup, steps, rounds = (1, 1, 1) if tiny else (5, 20, 1) if gpu else (2, 3, 2)
    unique = list(dict.fromkeys(configs.values()))
    timed = train_step.run_configs(unique, device, warmup, steps, rounds=rounds)
    rows = dict(zip(unique, timed, strict=True))
    info = describe_device(device)
    finish("train_step", info, {"command": command, "warmup": warmup, "steps": steps, "rounds": rounds},
           train_step.COLUMNS, list(rows.values()), f"train step through Trainer.fit(BratsModule) "
           f"({info['label']}; warm-up {warmup}, median of {steps} x {rounds} round(s))", not record)
    return {name: rows[cfg] for name, cfg in configs.items()}


def run_inference(gpu: bool, tiny: bool, device: torch.device, compile_on: bool, record: bool,
                  command: str) -> dict[str, dict[str, Any]]:
    argv, configs = inference_configs(gpu, tiny)
    args = inference.parse_args([*argv, "--device", str(device)])
    precision = "auto" if device.type == "cuda" or not tiny else "fp32"
    results, done = {}, {}
    for name, (views, view_batch, n_models, fmt, compiled) in configs.items():
        key = (views, view_batch, n_models, fmt, compiled and compile_on)
        if key not in done:
            done[key] = inference.bench_config(args, device, views, view_batch, n_models, precision, fmt,
                                               key[-1])
            if key[-1]:
                torch._dynamo.reset()
        results[name] = done[key]
    info = describe_device(device)
    finish("inference", info, {**vars(args), "command": command}, inference.COLUMNS, list(done.values()),
           f"inference per case: predict_probabilities (TTA x models) ({info['label']})", not record)
    if not gpu:  # the predictor's path against a plain loop over the same network and 8 flips (issue 18)
        results["overhead"] = inference.bench_overhead(args, device, "flips", precision)
        finish("inference_overhead", info, {**vars(args), "command": command}, inference.OVERHEAD_COLUMNS,
               [results["overhead"]], f"inference overhead: predictor / plain loop ({info['label']})",
               not record)
    return results


def run_data(gpu: bool, tiny: bool, device: torch.device, record: bool, command: str, data: str | None
             ) -> list[dict[str, Any]]:
    argv = ["--tiny"] if tiny else ["--paper"] if gpu else []
    workers = ["--workers", "1"] if tiny and gpu else []
    argv += ["--data", data] if data else []
    args = data_loader.parse_args([*argv, "--device", str(device), *workers])
    args.no_record, args.command = not record, command
    return data_loader.run(args)


def run_cache(tiny: bool, record: bool, command: str) -> list[dict[str, Any]]:
    args = cache_bench.parse_args(["--repeats", "1", "--spacing", "4", "--size", "32"] if tiny
                                  else ["--repeats", "3"])
    args.no_record, args.command = not record, command
    return cache_bench.run(args)


def run_metrics(tiny: bool, record: bool, command: str) -> list[dict[str, Any]]:
    args = metrics.parse_args(["--repeats", "1" if tiny else "3", "--baseline-repeats", "0",
                               "--lesion-repeats", "1" if tiny else "3",
                               "--lesion-baseline-repeats", "0" if tiny else "1"])
    args.no_record, args.command = not record, command
    return metrics.run(args)


# ------------------------------------------------------------------------------------------- comparison
def _ms(row: dict[str, Any] | None, key: str = "step ms") -> float | None:
    value = None if row is None else row.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _status(value: float | None, limit: float, compared: bool, at_least: bool = False) -> str:
    if value is None:
        return "not run"
    if not compared:
        return "not compared (tiny / CPU sizes)"
    ok = value >= limit if at_least else value <= limit
    return "PASS" if ok else "FAIL"


def _fmt(value: float | None, unit: str, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f} {unit}".strip()


def gpu_checks(train: dict, infer: dict, data: list, metric: list, compared: bool) -> list[Check]:
    """The comparison rows of ``--gpu`` (docs/method.md "Measured anchors", H200; the issue's targets)."""
    checks = []
    eager, compiled = _ms(train.get("eager")), _ms(train.get("compiled"))
    label = "EquiUnet w=48 128^3 b1"
    if train:
        size = train["eager"]
        label = f"EquiUnet w={size['width']} {size['size']}^3 b{size['batch']}"
        prec = size["precision"]
        checks.append(Check(f"train step, {label}, {prec}, eager", _fmt(eager, "ms"),
                            "82 ms (reference code, fp16 eager)"))
        checks.append(Check(f"train step, {label}, {prec}, compiled", _fmt(compiled, "ms"), "42 ms",
                            "<= 30 ms", _status(compiled, 30.0, compared)))
        checks.append(Check(f"train step, {label}, {train['compiled_bf16']['precision']}, compiled",
                            _fmt(_ms(train.get("compiled_bf16")), "ms"), "39 ms"))
        att_c, att_e = _ms(train.get("att_compiled")), _ms(train.get("att_eager"))
        ratio_c = att_c / compiled if att_c and compiled else None
        ratio_e = att_e / eager if att_e and eager else None
        checks.append(Check("attention / plain step, compiled", _fmt(ratio_c, "x", 2),
                            "1.29x (50 vs 39 ms)", "<= 1.25x", _status(ratio_c, 1.25, compared)))
        checks.append(Check("attention / plain step, eager", _fmt(ratio_e, "x", 2), "1.2x (100 vs 82 ms)"))
        cl = _ms(train.get("cl_compiled"))
        ratio_cl = cl / compiled if cl and compiled else None
        checks.append(Check("channels_last_3d / contiguous step, compiled", _fmt(ratio_cl, "x", 2),
                            "1.43x (60 vs 42 ms): slower", "> 1 (why auto keeps contiguous on CUDA)",
                            _status(ratio_cl, 1.0, compared, at_least=True)))
        ranger = _ms(train.get("ranger_compiled"))
        checks.append(Check(f"train step with Ranger (pipeline A's optimizer), {label}, compiled",
                            _fmt(ranger, "ms"), "-", "-"))
        loss_e, loss_c = train["eager"].get("first loss"), train["compiled"].get("first loss")
        if isinstance(loss_e, (int, float)) and isinstance(loss_c, (int, float)):
            diff = abs(loss_c - loss_e)
            ok = "PASS" if diff <= 1e-2 else "FAIL"
            checks.append(Check("|first-step loss compiled - eager| (same weights and batch)", f"{diff:.2e}",
                                "-", "<= 1e-2 (16-bit autocast)",
                                ok if train["compiled"]["compile"] else "not run (compile off)"))
    if infer:
        b1, b8 = _ms(infer.get("b1"), "ms/volume"), _ms(infer.get("b8"), "ms/volume")
        ens, ens_c = _ms(infer.get("ensemble"), "s/case"), _ms(infer.get("ensemble_compiled"), "s/case")
        row = infer["ensemble"]
        what = f"{row['views']} views x {row['models']} models at {row['shape']}"
        checks.append(Check(f"inference, 1 model, view batch 1, per volume ({row['shape']})", _fmt(b1, "ms"),
                            "70 ms (fp16)"))
        checks.append(Check("inference, 1 model, view batch 8, per volume", _fmt(b8, "ms"), "32 ms (fp16)"))
        checks.append(Check(f"inference per case, {what}, eager", _fmt(ens, "s", 2),
                            "2.6 s for 80 views (32 ms/volume)", "<= 1.5 s", _status(ens, 1.5, compared)))
        checks.append(Check(f"inference per case, {what}, compiled", _fmt(ens_c, "s", 2), "-", "<= 1.5 s",
                            _status(ens_c, 1.5, compared)))
    checks += data_checks(train, data, compared, gpu=True)
    checks += metric_checks(metric)
    return checks


def data_checks(train: dict, data: list, compared: bool, gpu: bool) -> list[Check]:
    """Data throughput of the most-workers row vs twice the fastest training-step rate."""
    if not data:
        return []
    row = max(data, key=lambda r: r["workers"])
    steps = [_ms(r) for r in train.values() if r.get("model") == "equiunet"] if train else []
    steps = [s for s in steps if s]
    best = min(steps) if steps else None
    need = 2 * 1000.0 / best if best else None
    target = f">= {need:.1f}/s (2x the fastest step, {best:.0f} ms)" if need else ">= 2x the step rate"
    value = _ms(row, "samples/s")
    status = _status(value, need, compared, at_least=True) if need else "not run"
    where = "GPU" if gpu else "CPU"
    checks = [Check(f"data: samples/s, {row['workers']} workers, {row['crop']}^3 crops ({where} step rate)",
                    _fmt(value, "/s"), "-", target, status)]
    for r in data:
        if r is not row:
            checks.append(Check(f"data: samples/s, {r['workers']} workers", _fmt(_ms(r, "samples/s"), "/s")))
    return checks


def metric_checks(metric: list) -> list[Check]:
    if not metric:
        return []
    checks = [Check("metrics per case (Dice, HD95, sens, spec; 3 regions; 1 core)",
                    _fmt(_ms(metric[0], "median ms"), "ms", 0))]
    lesion = next((r for r in metric if r["variant"] == "lesion-wise (bounding boxes)"), None)
    if lesion:
        speed_up = float(lesion["speed-up"].split()[0]) if lesion.get("speed-up") else None
        measured = f"{_fmt(_ms(lesion, 'median ms'), 'ms', 0)} ({_fmt(speed_up, 'x')} the whole volume)"
        checks.append(Check("lesion-wise per case (brats2023-gli, 10 lesions, 3 regions, 1 core)", measured,
                            target=">= 10 x the whole-volume baseline",
                            status="info" if speed_up is None else _status(speed_up, 10.0, True, True)))
    return checks


def cpu_checks(train: dict, infer: dict, data: list, cached: list, metric: list, compared: bool
               ) -> list[Check]:
    """The comparison rows of the CPU run (docs/method.md "Measured anchors" CPU and "CPU demo recipe")."""
    checks = []
    if train:
        fp32, fp32_cl = _ms(train.get("fp32")), _ms(train.get("fp32_cl"))
        bf16, bf16_cl = _ms(train.get("bf16")), _ms(train.get("bf16_cl"))
        label = f"EquiUnet w={train['fp32']['width']} {train['fp32']['size']}^3 b1"
        checks.append(Check(f"train step, {label}, fp32", _fmt(fp32, "ms", 0),
                            "~667 ms (1.5 steps/s); 'a w=8 U-Net step ~1 s'"))
        checks.append(Check(f"train step, {label}, {train['bf16']['precision']}", _fmt(bf16, "ms", 0),
                            "~270 ms (3.7 steps/s)"))
        for name, plain, cl, anchor in (("fp32", fp32, fp32_cl, "15-45% faster"),
                                        (train["bf16"]["precision"], bf16, bf16_cl, "did not help")):
            gain = plain / cl if plain and cl else None
            checks.append(Check(f"channels_last_3d speed-up, {name}", _fmt(gain, "x", 2), anchor,
                                "> 1 (why auto picks it on CPU)", _status(gain, 1.0, compared, True)))
        for key in ("bf16_cl_compiled", "fp32_cl_compiled"):
            if key in train and train[key]["compile"]:
                base = _ms(train.get(key.removesuffix("_compiled")))
                value = _ms(train[key])
                gain = base / value if base and value else None
                checks.append(Check(f"torch.compile speed-up, {train[key]['precision']} channels_last_3d",
                                    f"{_fmt(gain, 'x', 2)} (first step {train[key]['first step s']} s)"))
    if infer:
        for name in ("one", "one_cl", "ensemble_cl"):
            row = infer.get(name)
            if row:
                checks.append(Check(f"inference per case, {row['views']} views x {row['models']} model(s), "
                                    f"{row['shape']}, {row['precision']}, {row['memory format']}",
                                    _fmt(_ms(row, "s/case"), "s", 2)))
        if "overhead" in infer:
            ratio = infer["overhead"]["ratio"]
            checks.append(Check("inference overhead: predictor / plain loop, 8 flips (CPU time)",
                                _fmt(ratio, "x", 2), "1.24x before (issue 18)", "<= 1.05x",
                                _status(ratio, 1.05, compared)))
    checks += data_checks(train, data, compared, gpu=False)
    if cached:
        checks.append(Check(f"one training sample from the cache ({cached[1]['case'].split(',')[0]})",
                            _fmt(_ms(cached[1], "median ms"), "ms", 2), "35 ms from .npy"))
        checks.append(Check("one training sample from raw .nii.gz",
                            _fmt(_ms(cached[0], "median ms"), "ms", 0), "300-500 ms"))
    checks += metric_checks(metric)
    return checks


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="the paper's sizes on CUDA, compared with the targets")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda with --gpu, else cpu)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (seconds): the code path only, for tests")
    compile_group = p.add_mutually_exclusive_group()
    compile_group.add_argument("--compile", action="store_true", help="CPU run: add torch.compile rows")
    compile_group.add_argument("--no-compile", action="store_true", help="GPU run: leave torch.compile out")
    p.add_argument("--only", help="comma list of " + ", ".join(BENCHES))
    p.add_argument("--data", help="data set folder for the data_loader benchmark (default: synthetic cases)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target FAILs")
    p.add_argument("--no-record", action="store_true", help="print only: no JSON, no RESULTS.md rows")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    args.only = csv_list(args.only, BENCHES, "benchmark") if args.only else list(BENCHES)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def run(args: argparse.Namespace) -> list[Check]:
    """Run the selected benchmarks and return the comparison rows (also printed and recorded)."""
    device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = not args.no_record
    command = "python -m benchmarks.run_all " + shlex.join(args.argv)
    compile_on = (args.gpu and not args.no_compile) or (not args.gpu and args.compile)
    start = time.perf_counter()
    train: dict[str, dict[str, Any]] = {}
    infer: dict[str, dict[str, Any]] = {}
    data: list[dict[str, Any]] = []
    cached: list[dict[str, Any]] = []
    metric: list[dict[str, Any]] = []
    steps: list[tuple[str, Callable[[], None]]] = []

    def do_train() -> None:
        train.update(run_train(train_configs(args.gpu, args.tiny, device, compile_on), device, args.gpu,
                               args.tiny, record, command))

    def do_infer() -> None:
        infer.update(run_inference(args.gpu, args.tiny, device, compile_on, record, command))

    steps = [("train_step", do_train), ("inference", do_infer),
             ("data_loader",
              lambda: data.extend(run_data(args.gpu, args.tiny, device, record, command, args.data))),
             ("cache", lambda: cached.extend(run_cache(args.tiny, record, command))),
             ("metrics", lambda: metric.extend(run_metrics(args.tiny, record, command)))]
    for name, step in steps:
        if name in args.only:
            log.info("=== %s", name)
            step()
    compared = not args.tiny and (device.type == "cuda" or not args.gpu)
    if args.gpu:
        checks = gpu_checks(train, infer, data, metric, compared)
    else:
        checks = cpu_checks(train, infer, data, cached, metric, compared)
    info = describe_device(device)
    minutes = (time.perf_counter() - start) / 60
    title = (f"run_all{' --gpu' if args.gpu else ''}{' (tiny sizes)' if args.tiny else ''}: {info['label']}; "
             f"{minutes:.1f} min")
    finish("run_all", info, {"command": command, "minutes": round(minutes, 2)}, SUMMARY_COLUMNS,
           [c.row() for c in checks], title, not record)
    return checks


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    checks = run(args)
    return 1 if args.strict and any(c.status == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    raise SystemExit(main())
