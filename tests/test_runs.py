"""The run folder (brats_lightning/runs.py): finding, selecting and loading trained runs (run.json per
docs/contracts.md), and the resumable CSV logger."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch

from brats_lightning.runs import (
    ResumableCSVLogger,
    check_compatible,
    find_runs,
    load_network,
    read_run,
    select_runs,
)


def test_find_and_filter(tiny_run_factory):
    for fold in range(2):
        tiny_run_factory(pipeline="A", model="unet", fold=fold)
        tiny_run_factory(pipeline="A", model="equiunet", fold=fold)
        tiny_run_factory(pipeline="B", model="equiunet", fold=fold)
    root = tiny_run_factory.root
    assert len(find_runs(root)) == 6
    a = find_runs(root, pipeline="A")
    assert [(r.model, r.fold) for r in a] == [("equiunet", 0), ("equiunet", 1), ("unet", 0), ("unet", 1)]
    assert [r.fold for r in find_runs(root, pipeline="B", folds=[1])] == [1]
    assert len(find_runs(root, model="unet")) == 2
    with pytest.raises(FileNotFoundError, match="no such folder"):
        find_runs(root / "missing")


def test_best2_per_fold_prefers_swa_scores(tiny_run_factory):
    # fold 0: SWA lifts the 0.60 run to 0.90; fold 1: plain scores; fold 2: only one run
    tiny_run_factory(model="att", fold=0, score=0.60, swa_score=0.90)
    tiny_run_factory(model="unet", fold=0, score=0.80)
    tiny_run_factory(model="unet_clean", fold=0, score=0.70)
    tiny_run_factory(model="att", fold=1, score=0.71)
    tiny_run_factory(model="unet", fold=1, score=0.72, swa_score=0.50)
    tiny_run_factory(model="unet_clean", fold=1, score=0.73)
    tiny_run_factory(model="unet", fold=2, score=0.40)
    runs = find_runs(tiny_run_factory.root)
    chosen = select_runs(runs, "best2")
    assert [(r.fold, r.model) for r in chosen] == [
        (0, "att"), (0, "unet"), (1, "unet_clean"), (1, "att"), (2, "unet")]
    best1 = select_runs(runs, "best1")
    assert [(r.fold, r.model) for r in best1] == [(0, "att"), (1, "unet_clean"), (2, "unet")]
    assert select_runs(runs, "all") == runs
    with pytest.raises(ValueError, match="selection rule"):
        select_runs(runs, "top2")


def test_best_k_needs_scores(tiny_run_factory):
    tiny_run_factory(fold=0, score=None)
    with pytest.raises(ValueError, match=r"A/equiunet/fold0 .*use --select all"):
        select_runs(find_runs(tiny_run_factory.root), "best2")


def test_auto_checkpoint_is_swa_and_weights_load_exactly(tiny_run_factory):
    run = read_run(tiny_run_factory(fold=0, swa_score=0.9, seed=3))
    assert run.checkpoint_path("auto").name == "swa.ckpt"
    net = load_network(run)
    assert not net.training
    saved = torch.load(run.checkpoint_path("swa"), weights_only=False)["state_dict"]
    for key, value in net.state_dict().items():
        assert torch.equal(value, saved[f"net.{key}"]), key
    best = load_network(run, "best")
    assert not torch.equal(best.head.weight, net.head.weight)
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 16, 16, 16)


def test_moved_outputs_folder_finds_checkpoints(tiny_run_factory, tmp_path):
    path = tiny_run_factory(fold=0)
    moved = tmp_path / "moved"
    shutil.move(str(tiny_run_factory.root), moved)
    run = find_runs(moved)[0]
    assert run.checkpoint_path("auto") == moved / "A" / "equiunet" / "fold0" / "checkpoints" / "best.ckpt"
    assert not path.exists()
    load_network(run)


def test_missing_checkpoint_message(tiny_run_factory):
    run = read_run(tiny_run_factory(fold=0))
    run.checkpoint_path("best").unlink()
    with pytest.raises(FileNotFoundError, match=r"fold0 .*checkpoint 'best' not found"):
        load_network(run, "best")
    with pytest.raises(FileNotFoundError, match="no 'swa' checkpoint"):
        run.checkpoint_path("swa")


def test_incompatible_runs_are_refused_by_name(tiny_run_factory):
    tiny_run_factory(pipeline="A", fold=0)
    tiny_run_factory(pipeline="B", fold=0)
    runs = find_runs(tiny_run_factory.root)
    with pytest.raises(ValueError, match=r"normalization.*--pipeline.*minmax: \['A/equiunet/fold0"):
        check_compatible(runs)
    check_compatible(find_runs(tiny_run_factory.root, pipeline="B"))
    tiny_run_factory(pipeline="B", fold=1, label_convention="brats2023")
    with pytest.raises(ValueError, match=r"label_convention.*brats2023: \['B/equiunet/fold1"):
        check_compatible(find_runs(tiny_run_factory.root, pipeline="B"))
    tiny_run_factory(pipeline="A", fold=1, channels=("t1ce", "flair"))
    with pytest.raises(ValueError, match=r"channels.*A/equiunet/fold1"):
        check_compatible(find_runs(tiny_run_factory.root, pipeline="A"))


def test_bad_run_json(tmp_path):
    (tmp_path / "run.json").write_text('{"pipeline": "A"}')
    with pytest.raises(ValueError, match="lacks"):
        find_runs(tmp_path)


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
