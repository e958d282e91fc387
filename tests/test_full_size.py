"""The paper's scale on the CPU (benchmarks/full_size.py; issue 16 part 1): 1 mm 240x240x155 synthetic cases,
EquiUnet w=48 on 128^3 crops, pipeline A (batch 1) and B (as close to batch 3 as a 12 GiB cap allows),
through train.py (a whole-brain validation), a 16-view prediction of a full case and the merge. Tens of
minutes and ~10 GB of RAM on 2 cores: marked ``full`` (``make test-full``), skipped by ``make test``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import full_size  # noqa: E402


@pytest.mark.full
def test_full_size_path_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = full_size.parse_args(["--work", str(tmp_path / "full"), "--no-record"])
    rows = {row["job"].split(":")[0]: row for row in full_size.run(args)}
    for pipeline in ("A", "B"):
        train, predict = rows[f"train {pipeline}"], rows[f"predict {pipeline}"]
        assert train["setting"].startswith("w=48 128^3"), train
        assert 0 < train["peak RSS GiB"] <= args.budget_gb * 1.1, train
        assert predict["output"] == "240x240x155", predict
    assert rows["train A"]["setting"] == "w=48 128^3 batch 1"  # the paper's setting fits 12 GiB
    assert rows["merge A + B"]["output"] == "240x240x155"
