"""The GPU acceptance script (benchmarks/gpu_check.py, ``make gpu-check``) in its CPU dry run: every step's
code path at tiny sizes (train.py killed and resumed, fast SWA, DDP with gloo, TTA prediction, merge), so it
cannot rot while no GPU is at hand."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import gpu_check  # noqa: E402


def test_a_failing_step_is_a_fail_row_and_the_others_still_run():
    report = gpu_check.Report()
    report.guard("broken", lambda: 1 / 0)
    report.guard("fine", lambda: report.add("fine", "ok", True))
    assert report.rows[0][0] == "broken" and report.rows[0][2] == "FAIL"
    assert "ZeroDivisionError" in report.rows[0][1]
    assert report.rows[1] == ("fine", "ok", "PASS") and report.failed


@pytest.mark.slow
def test_dry_run_passes_every_step(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    report = gpu_check.run(argparse.Namespace(dry_run=True, work=tmp_path / "check", skip_bench=True))
    rows = {check: (result, status) for check, result, status in report.rows}
    assert not report.failed, [row for row in report.rows if row[2] == "FAIL"]
    assert rows["train A killed after its first last.ckpt"][1] == "PASS"
    assert rows["train A resumed to the end"][1] == "PASS"
    assert rows["fast SWA snapshots"][1] == "PASS"
    assert rows["training loss falls (first -> last main epoch)"][1] == "PASS"
    assert rows["train B (2 epochs, batch 3), 1-GPU DDP (gloo)"][1] == "PASS"
    assert rows["merge A + B"] == (f"{gpu_check.DRY.cases} label maps", "PASS")
    assert any(check.startswith("inference s/case, A") for check in rows)
