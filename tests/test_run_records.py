"""Run records and the resumable CSV logger (brats_lightning/runs.py)."""

from __future__ import annotations

import csv

from brats_lightning.runs import ResumableCSVLogger


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_csv_rows_always_match_the_header_on_disk(tmp_path):
    """Lightning extends its key list before rewriting the header; if the rewrite is cut short (a SLURM
    requeue's SIGTERM), the next save must still write rows that fit the header on disk."""
    writer = ResumableCSVLogger(tmp_path).experiment
    writer.log_metrics({"a": 1.0}, step=0)
    writer.save()
    writer.log_metrics({"a": 2.0, "b": 3.0}, step=1)
    writer._record_new_keys()  # the in-memory keys run ahead of the file, as after an interrupted rewrite
    writer.save()
    rows = _rows(tmp_path / "metrics.csv")
    assert rows[0] == ["a", "b", "step"]
    assert rows[1:] == [["1.0", "", "0"], ["2.0", "3.0", "1"]]


def test_csv_logger_appends_after_a_resume(tmp_path):
    first = ResumableCSVLogger(tmp_path).experiment
    first.log_metrics({"loss": 1.0}, step=0)
    first.save()
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("0.5,")  # a row cut short by a killed job
    second = ResumableCSVLogger(tmp_path).experiment
    second.log_metrics({"loss": 0.25}, step=1)
    second.save()
    assert _rows(tmp_path / "metrics.csv") == [["loss", "step"], ["1.0", "0"], ["0.25", "1"]]
