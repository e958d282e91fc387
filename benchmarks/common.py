"""Small shared helpers for the benchmark scripts in this folder.

Run benchmarks from the repository root as modules, e.g. ``python -m benchmarks.train_step``; then

    from benchmarks.common import describe_device, record

    info = describe_device("cpu")          # what ran it: device name, threads, torch / CUDA versions
    record("my_bench", info, args, columns, rows)   # JSON in benchmarks/results/ + a table in RESULTS.md

``record`` is ``save_json`` + ``append_markdown``; use those directly for other layouts. JSON files are
ignored by git (one per run, for analysis); RESULTS.md is committed (the human-readable history).
``finish`` prints a rich table of dict rows and records them; ``sync`` waits for the GPU before a clock read;
``pipeline_config`` loads conf/pipeline/{A,B}.yaml as a plain dict for ``BratsModule``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: str | torch.device) -> dict[str, Any]:
    """What a benchmark ran on: device kind and name, CPU threads, torch / CUDA / Python versions.

    Args:
        device: the torch device the benchmark uses ("cpu", "cuda", "cuda:1", ...).

    Returns:
        A JSON-serializable dict; ``label`` is a short human-readable summary for tables.
    """
    device = torch.device(device)
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other processes compete for the CPU: a load above the core count makes CPU timings pessimistic.
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
        info["label"] = f"{props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        try:
            bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            bf16 = False
        info["cpu_bf16"] = bf16
        info["label"] = (
            f"CPU {info['cpu']} ({info['torch_threads']} threads, load {info['load_avg_1m']}), "
            f"torch {torch.__version__}"
        )
    return info


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")


def save_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``benchmarks/results/<name>-<UTC time>.json`` and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{_stamp()}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def append_markdown(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], note: str = ""
) -> Path:
    """Append a ``### title`` section with ``note`` and a Markdown table to ``benchmarks/RESULTS.md``.

    The file is created with a short header when missing; earlier sections are never rewritten.
    """
    if not RESULTS_MD.exists():
        RESULTS_MD.write_text(
            "# Benchmark results\n\nAppended by the scripts in `benchmarks/` (newest last); raw JSON in "
            "`benchmarks/results/` (not committed).\n"
        )
    lines = ["", f"### {title}", ""]
    if note:
        lines += [note, ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    with RESULTS_MD.open("a") as f:
        f.write("\n".join(lines) + "\n")
    return RESULTS_MD


def record(
    name: str,
    info: dict[str, Any],
    args: dict[str, Any],
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
) -> tuple[Path, Path]:
    """Save one benchmark run as JSON and append it to RESULTS.md under ``name``, the time and the device.

    Args:
        name: benchmark name (file stem of the script), used in the JSON file name and the heading.
        info: :func:`describe_device` output.
        args: the run's settings (e.g. ``vars(argparse_namespace)``); ``args["command"]`` (if set) is the
            command line shown, else ``python -m benchmarks.<name>`` with ``args["argv"]`` or ``sys.argv``.
        columns: table column names.
        rows: table rows, one value per column.

    Returns:
        (JSON path, RESULTS.md path).
    """
    command = args.get("command") or (
        "python -m benchmarks." + name + " " + shlex.join(args.get("argv") or sys.argv[1:]))
    payload = {"benchmark": name, "time_utc": _stamp(), "command": command.strip(), "device": info,
               "args": args, "columns": list(columns), "rows": [list(r) for r in rows]}
    json_path = save_json(name, payload)
    title = f"{name}: {payload['time_utc']}, {info['label']}"
    md_path = append_markdown(title, columns, rows, note=f"`{command.strip()}`")
    return json_path, md_path


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work (a no-op on the CPU), so that a clock read after it is meaningful."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device; a clear error when CUDA is asked for but absent."""
    resolved = torch.device(device)
    if resolved.type not in ("cpu", "cuda"):
        raise SystemExit(f"benchmarks: --device {device} is not supported; use cpu or cuda[:N]")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"benchmarks: --device {device} asked but torch.cuda.is_available() is False; "
                         "use --device cpu (or run on a GPU machine)")
    return resolved


def csv_list(value: str | Sequence[Any], allowed: Sequence[str] | None = None, what: str = "value",
             cast: type = str) -> list[Any]:
    """A comma list (``"a,b"``) or a sequence as a list of ``cast`` values, checked against ``allowed``."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    items = [cast(v) for v in items]
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise SystemExit(f"benchmarks: unknown {what} {bad}; expected a comma list of {list(allowed)}")
    return items


def pipeline_config(name: str = "A", epochs: int = 1) -> dict[str, Any]:
    """conf/pipeline/<name>.yaml as a resolved plain dict (``pipeline.epochs`` set to ``epochs``)."""
    from omegaconf import OmegaConf

    path = REPO_DIR / "conf" / "pipeline" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"benchmarks: pipeline {name!r}: {path} not found; expected A or B")
    cfg = OmegaConf.create({"pipeline": OmegaConf.load(path)})
    cfg.pipeline.epochs = epochs
    return OmegaConf.to_container(cfg, resolve=True)["pipeline"]  # type: ignore[index]


def console() -> Console:
    """A rich Console that is wide enough for the tables when the output is piped."""
    out = Console()
    return out if out.is_terminal else Console(width=200)


def finish(
    name: str,
    info: dict[str, Any],
    args: Mapping[str, Any],
    columns: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    title: str,
    no_record: bool = False,
) -> None:
    """Print ``rows`` (dicts keyed by ``columns``) as a rich table; unless ``no_record``, save the JSON and
    append the table to RESULTS.md (:func:`record`)."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right" if isinstance(rows[0].get(col) if rows else None, (int, float))
                         else "left")
    values = [[row.get(col) for col in columns] for row in rows]
    for row in values:
        table.add_row(*("" if v is None else str(v) for v in row))
    out = console()
    out.print(table)
    if not no_record:
        json_path, md_path = record(name, info, dict(args), columns, values)
        out.print(f"saved {json_path} and appended to {md_path}")


def setup(args: Any) -> tuple[torch.device, dict[str, Any]]:
    """The common start of a benchmark run: ``--threads`` applied (when the script has it), ``--device``
    checked, and the device described for the record."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    device = check_device(getattr(args, "device", "cpu"))
    return device, describe_device(device)


def make_main(parse_args: Callable[[list[str] | None], Any], run: Callable[[Any], Any]) -> Callable[..., int]:
    """The ``main(argv)`` of a benchmark script: log to the console, parse, run; exit code 0."""

    def main(argv: list[str] | None = None) -> int:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        run(parse_args(argv))
        return 0

    return main
