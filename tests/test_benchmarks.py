"""Tests of benchmarks/: the comparison against the targets (exact, hand-worked) and the GPU and CPU code
paths of ``python -m benchmarks.run_all`` run end to end at tiny sizes on the CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) leaves the repository root off sys.path
    sys.path.insert(0, str(REPO))

from benchmarks import common, run_all  # noqa: E402


@pytest.fixture()
def results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Benchmark JSON and RESULTS.md go to a temporary folder."""
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(common, "RESULTS_MD", tmp_path / "RESULTS.md")
    return tmp_path


def _train_row(model: str, ms: float, **extra) -> dict:
    return {"model": model, "width": 48, "size": 128, "batch": 1, "precision": "16-mixed", "step ms": ms,
            "first loss": 3.0, "compile": True, **extra}


def test_status_rules() -> None:
    assert run_all._status(30.0, 30.0, True) == "PASS"
    assert run_all._status(30.1, 30.0, True) == "FAIL"
    assert run_all._status(2.0, 2.0, True, at_least=True) == "PASS"
    assert run_all._status(1.9, 2.0, True, at_least=True) == "FAIL"
    assert run_all._status(None, 30.0, True) == "not run"
    assert run_all._status(1.0, 30.0, False).startswith("not compared")


def test_gpu_checks_against_the_targets() -> None:
    train = {"eager": _train_row("equiunet", 80.0), "compiled": _train_row("equiunet", 25.0),
             "compiled_bf16": _train_row("equiunet", 24.0, precision="bf16-mixed"),
             "att_eager": _train_row("attequiunet", 96.0), "att_compiled": _train_row("attequiunet", 31.25),
             "cl_compiled": _train_row("equiunet", 37.5), "ranger_compiled": _train_row("equiunet", 33.0)}
    infer = {"b1": {"ms/volume": 60.0}, "b8": {"ms/volume": 20.0},
             "ensemble": {"s/case": 1.6, "views": 16, "models": 5, "shape": "144x176x144"},
             "ensemble_compiled": {"s/case": 1.5}}
    data = [{"workers": 8, "crop": 128, "samples/s": 80.0}]
    checks = {c.check: c for c in run_all.gpu_checks(train, infer, data, [], compared=True)}
    compiled = checks["train step, EquiUnet w=48 128^3 b1, 16-mixed, compiled"]
    assert (compiled.measured, compiled.status) == ("25.0 ms", "PASS")
    att = checks["attention / plain step, compiled"]  # 31.25 / 25 = 1.25 <= 1.25
    assert (att.measured, att.status) == ("1.25 x", "PASS")
    assert checks["attention / plain step, eager"].measured == "1.20 x"  # 96 / 80
    assert checks["channels_last_3d / contiguous step, compiled"].measured == "1.50 x"  # 37.5 / 25
    ens = "inference per case, 16 views x 5 models at 144x176x144"
    assert checks[f"{ens}, eager"].status == "FAIL" and checks[f"{ens}, compiled"].status == "PASS"
    # the data target is twice the fastest EquiUnet step rate: 2 * 1000 / 24 ms = 83.3 samples/s > 80
    (data_check,) = [c for c in checks.values() if c.check.startswith("data: samples/s, 8 workers")]
    assert data_check.target.startswith(">= 83.3/s") and data_check.status == "FAIL"
    assert checks["|first-step loss compiled - eager| (same weights and batch)"].status == "PASS"


@pytest.mark.slow
def test_gpu_path_runs_tiny_on_cpu(results_dir: Path, synthetic_root: Path) -> None:
    """`run_all --gpu` with `--device cpu --tiny`: every benchmark of the GPU run, recorded, at tiny sizes."""
    args = run_all.parse_args(["--gpu", "--device", "cpu", "--tiny", "--no-compile",
                               "--data", str(synthetic_root)])
    checks = run_all.run(args)
    names = [c.check for c in checks]
    for start in ("train step, EquiUnet w=4 24^3", "attention / plain step, compiled",
                  "channels_last_3d / contiguous step", "inference per case, 8 views x 2 models",
                  "data: samples/s, 1 workers", "metrics per case"):
        assert any(n.startswith(start) for n in names), (start, names)
    assert all(c.status in ("info", "not run (compile off)") or c.status.startswith("not compared")
               for c in checks)
    text = (results_dir / "RESULTS.md").read_text()
    for name in ("train_step", "inference", "data_loader", "cache", "metrics", "run_all"):
        assert f"### {name}: " in text
    assert text.count(f"torch {torch.__version__}") == 6 and "python -m benchmarks.run_all --gpu" in text
    payloads = {p.name.split("-")[0]: json.loads(p.read_text()) for p in (results_dir / "results").iterdir()}
    assert sorted(payloads) == ["cache", "data_loader", "inference", "metrics", "run_all", "train_step"]
    columns = payloads["train_step"]["columns"]
    rows = [dict(zip(columns, r, strict=True)) for r in payloads["train_step"]["rows"]]
    train = {(r["model"], r["memory format"], r["optimizer"]): r for r in rows}
    eager = train[("equiunet", "contiguous", "adam")]
    # Same seed, weights and batch: the first loss comes before any optimizer step, so the optimizer can't
    # change it, and the memory format only changes rounding.
    assert train[("equiunet", "contiguous", "pipeline")]["first loss"] == eager["first loss"]
    assert abs(train[("equiunet", "channels_last_3d", "adam")]["first loss"] - eager["first loss"]) < 1e-2
    (data_row,) = payloads["data_loader"]["rows"]
    assert dict(zip(payloads["data_loader"]["columns"], data_row, strict=True))["samples"] == 8


@pytest.mark.slow
def test_cpu_path_runs_tiny(results_dir: Path) -> None:
    """`run_all` (CPU) at tiny sizes: training steps in both memory formats and the inference rows."""
    checks = run_all.run(run_all.parse_args(["--tiny", "--only", "train_step,inference", "--no-record"]))
    names = [c.check for c in checks]
    assert "channels_last_3d speed-up, fp32" in names
    assert sum(n.startswith("inference per case, 8 views") for n in names) == 3
    assert "inference overhead: predictor / plain loop, 8 flips (CPU time)" in names
    assert not (results_dir / "RESULTS.md").exists()  # --no-record


def test_inference_overhead_row_tiny(results_dir: Path) -> None:
    """`benchmarks.inference --overhead`: the predictor's path against a plain loop over the same network and
    views (issue 18), recorded; the benchmark itself refuses probabilities that differ."""
    from benchmarks import inference
    from brats_lightning.speed import inference_plan

    (row,) = inference.run(inference.parse_args(["--tiny", "--overhead", "--tta", "flips"]))
    plan = inference_plan("cpu", None)
    assert (row["views"], row["view batch"], row["memory format"], row["clock"]) == (
        8, 4, plan.memory_format, "CPU time")
    assert row["norms"] == ("contiguous" if plan.contiguous_norms else "native")
    # Each of the three is rounded to 3 decimals: the ratio lies within the bounds those roundings allow.
    fast, plain, half = row["predictor s"], row["plain s"], 5e-4
    assert (fast - half) / (plain + half) - half <= row["ratio"] <= (fast + half) / (plain - half) + half
    assert float(row["max |diff|"]) <= 1e-5
    assert "### inference_overhead:" in (results_dir / "RESULTS.md").read_text()
