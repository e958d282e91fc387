"""The data-set registry (docs/method.md "Data"): every entry is written by synth, found by its names,
passes check-data and round-trips its labels; training and predict follow its regions."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf

from brats_lightning.cli import main
from brats_lightning.data.checks import check_dataset
from brats_lightning.data.datasets import (
    DATASETS,
    NAMING_2020,
    NAMING_2023,
    dataset_for_case,
    dataset_for_year,
    get_dataset,
    match_dataset,
)
from brats_lightning.data.labels import BRATS2024_GLI, labels_to_regions, regions_to_labels
from brats_lightning.data.layout import dataset_of, dataset_of_config, find_cases, scan_dataset
from brats_lightning.data.synthetic import generate_dataset
from brats_lightning.inference.merge import merge_labels

REPO = Path(__file__).resolve().parents[2]

# Written out from the challenges' data descriptions: case 7's id, its t1ce file, the label codes, the
# regions the network predicts and the rules that rank the set.
EXPECTED = {
    "brats2020": ("BraTS20_Training_007", "BraTS20_Training_007_t1ce.nii.gz", (0, 1, 2, 4), "brats2020"),
    "brats2021": ("BraTS2021_00007", "BraTS2021_00007_t1ce.nii.gz", (0, 1, 2, 4), "brats2020"),
    "brats2023-gli": ("BraTS-GLI-00007-000", "BraTS-GLI-00007-000-t1c.nii.gz", (0, 1, 2, 3), "brats2023-gli"),
    "brats2023-men": ("BraTS-MEN-00007-000", "BraTS-MEN-00007-000-t1c.nii.gz", (0, 1, 2, 3), "brats2023-men"),
    "brats2023-met": ("BraTS-MET-00007-000", "BraTS-MET-00007-000-t1c.nii.gz", (0, 1, 2, 3), "brats2023-met"),
    "brats2023-ped": ("BraTS-PED-00007-000", "BraTS-PED-00007-000-t1c.nii.gz", (0, 1, 2, 3), "brats2023-ped"),
    "brats2023-ssa": ("BraTS-SSA-00007-000", "BraTS-SSA-00007-000-t1c.nii.gz", (0, 1, 2, 3), "brats2023-ssa"),
    "brats2023-goat": ("BraTS-GoAT-00007-000", "BraTS-GoAT-00007-000-t1c.nii.gz", (0, 1, 2, 3),
                       "brats2023-gli"),
    "brats2024-gli": ("BraTS-GLI-00007-100", "BraTS-GLI-00007-100-t1c.nii.gz", (0, 1, 2, 3, 4),
                      "brats2024-gli"),
}


def test_registry_entries():
    assert list(DATASETS) == list(EXPECTED)
    for name, (case_id, t1ce, labels, rules) in EXPECTED.items():
        ds = get_dataset(name)
        assert ds.case_id(7) == case_id and ds.matches(case_id)
        assert ds.naming.filename(case_id, "t1ce") == t1ce
        assert ds.convention.labels == labels and ds.rules == rules
        cavity = ("RC",) if name == "brats2024-gli" else ()
        assert ds.regions == ("ET", "TC", "WT", *cavity)
    assert get_dataset("brats2023-men").convention.names == {1: "NETC", 2: "SNFH", 3: "ET"}
    assert get_dataset("brats2021").convention.names == {1: "NCR/NET", 2: "ED", 4: "ET"}
    with pytest.raises(ValueError, match="unknown data set 'brats2019'"):
        get_dataset("brats2019")


def test_names_recognised():
    assert match_dataset("BraTS20_Validation_012").name == "brats2020"
    assert match_dataset("BraTS2021_01666").name == "brats2021"
    assert match_dataset("BraTS-MET-00012-000").name == "brats2023-met"
    assert match_dataset("BraTS-GoAT-00000").name == "brats2023-goat"  # the GoAT scorer's ids
    assert match_dataset("BraTS-GLI-02073-100").name == "brats2023-gli"  # 2024 shares these names
    assert match_dataset("patient7") is None
    assert dataset_for_case("patient7", NAMING_2020).name == "brats2020"  # renamed cases: by file naming
    assert dataset_for_case("BraTS-XYZ-00001-000", NAMING_2023).name == "brats2023-gli"
    assert dataset_for_case("BraTS20_Training_001", NAMING_2023).name == "brats2023-gli"  # files decide
    assert dataset_for_year(2023, "ped").name == "brats2023-ped"
    assert dataset_for_year(2023).name == "brats2023-gli" and dataset_for_year(2024).name == "brats2024-gli"
    with pytest.raises(ValueError, match="--task MEN exists for --year 2023 only"):
        dataset_for_year(2020, "MEN")
    with pytest.raises(ValueError, match="no BraTS data set for year 2022"):
        dataset_for_year(2022)


@pytest.fixture(scope="module")
def every_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One synthetic case (4 mm) of every registry entry, written by generate_dataset(year=, task=)."""
    roots = {}
    for name, ds in DATASETS.items():
        roots[name] = tmp_path_factory.mktemp("every") / name
        generate_dataset(roots[name], 1, seed=0, spacing=4.0, year=ds.year,
                         task=ds.task if ds.year == 2023 else None, workers=1, progress=False)
    return roots


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_dataset_written_found_checked_round_tripped(every_set, name):
    ds, root = DATASETS[name], every_set[name]
    (case,) = find_cases(root, require_labels=True)
    assert case.dataset is ds and case.case_id == ds.case_id(1)
    assert [p.name for p in case.files] == [ds.naming.filename(case.case_id, key)
                                            for key in ("t1", "t1ce", "t2", "flair", "seg")]
    assert (root / "dataset.json").exists() == (not ds.by_name)
    assert dataset_of(root) is ds and dataset_of_config({"root": str(root), "generate": None}) is ds
    assert check_dataset(root) == []
    labels = np.asarray(nib.load(case.seg).dataobj)
    assert set(np.unique(labels).tolist()) == set(ds.convention.labels)  # every code written, no other
    regions = labels_to_regions(labels, ds.convention)
    assert regions.shape[0] == len(ds.regions)
    np.testing.assert_array_equal(regions_to_labels(regions, ds.convention), labels)


def test_synth_cli_year_and_task(tmp_path, capsys):
    out = tmp_path / "men"
    assert main(["synth", "--out", str(out), "--cases", "1", "--spacing", "4", "--year", "2023",
                 "--task", "MEN", "--workers", "1"]) == 0
    assert "(2023 naming, brats2023-men, 60x60x39 at 4 mm, seed 0)" in capsys.readouterr().out
    assert [c.case_id for c in find_cases(out)] == ["BraTS-MEN-00001-000"]
    assert main(["synth", "--out", str(tmp_path / "x"), "--year", "2020", "--task", "MEN"]) == 2
    assert "--task MEN exists for --year 2023 only" in capsys.readouterr().err


def test_declared_dataset(synthetic_root_2024, tmp_path, capsys, monkeypatch):
    assert json.loads((synthetic_root_2024 / "dataset.json").read_text()) == {"dataset": "brats2024-gli"}
    assert check_dataset(synthetic_root_2024) == []  # 4 is the resection cavity here: legal
    root = tmp_path / "undeclared"
    shutil.copytree(synthetic_root_2024, root)
    (root / "dataset.json").unlink()
    assert dataset_of(root).name == "brats2023-gli"  # the names alone say 2023 GLI
    problems = check_dataset(root)
    assert problems and all("seg holds label(s) [4]" in p.message for p in problems)
    message = problems[0].message
    assert "resection cavity" in message and '{"dataset": "brats2024-gli"}' in message
    assert "if it is 2020-style data under 2023 names (4 = enhancing tumour), relabel 4 -> 3" in message
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["check-data", str(root), "--workers", "1"]) == 1
    (root / "dataset.json").write_text('{"dataset": "brats2042"}')
    (issue,) = scan_dataset(root)[1]
    assert issue.file == str(root / "dataset.json") and "unknown data set 'brats2042'" in issue.message
    (root / "dataset.json").write_text('{"dataset": "brats2020"}')  # 2020 names expected, 2023 found
    cases, issues = scan_dataset(root)
    assert not cases and len(issues) == 3
    assert "files named in the brats2023 style, but dataset.json declares brats2020" in issues[0].message


def test_n_regions_follows_the_data_set(tmp_path, synthetic_root, synthetic_root_2024):
    def out_channels(data: dict) -> int:
        cfg = OmegaConf.create({"data": data, "model": {"out_channels": "${n_regions:${data}}"}})
        return OmegaConf.to_container(cfg, resolve=True)["model"]["out_channels"]

    generate = {"n_cases": 2, "spacing": 4.0, "seed": 0, "year": 2024, "task": None}
    assert out_channels({"root": str(tmp_path / "not_yet"), "generate": generate}) == 4
    assert out_channels({"root": str(tmp_path / "not_yet"), "generate": {**generate, "year": 2021}}) == 3
    assert out_channels({"root": str(synthetic_root), "generate": None}) == 3
    assert out_channels({"root": str(synthetic_root_2024), "generate": None}) == 4
    (tmp_path / "empty").mkdir()  # no cases: the tumour regions; the data check then names the problem
    assert out_channels({"root": str(tmp_path / "empty"), "generate": None}) == 3
    for config in sorted((REPO / "conf" / "model").glob("*.yaml")):
        assert "  out_channels: ${n_regions:${data}}" in config.read_text(), config.name


def test_merge_rule_with_cavity():
    """A's tumour core (NETC, ET) stands; elsewhere (0, SNFH, RC on both sides) B's label wins."""
    codes = BRATS2024_GLI.labels
    pairs = list(itertools.product(codes, codes))
    a = np.array([p[0] for p in pairs], dtype=np.uint8)
    b = np.array([p[1] for p in pairs], dtype=np.uint8)
    core = {BRATS2024_GLI.ncr, BRATS2024_GLI.et}
    expected = [x if x in core or y in core else y for x, y in pairs]
    assert merge_labels(a, b, BRATS2024_GLI).tolist() == expected


# ------------------------------------------------------------------------------ training and predict
def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _smoke_train(root: Path, tmp_path: Path, name: str) -> dict:
    """One epoch of the smoke experiment on ``root`` (3 cases, 3 folds); returns run.json."""
    _run([str(REPO / "train.py"), "experiment=smoke", f"data.root={root}", "data.generate=null",
          f"data.name={name}", "data.n_folds=3", "pipeline.epochs=1", "trainer.limit_val_batches=1",
          f"paths.output_dir={tmp_path / 'outputs'}", f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path)
    (path,) = (tmp_path / "outputs").rglob("run.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_smoke_training_on_a_2023_set(synthetic_root_2023, tmp_path):
    run = _smoke_train(synthetic_root_2023, tmp_path, "gli2023")
    assert run["label_convention"] == "brats2023" and run["model_config"]["out_channels"] == 3
    assert {"dice_et", "dice_tc", "dice_wt"} <= set(run["val_metrics"])
    assert "dice_rc" not in run["val_metrics"]


@pytest.mark.slow
def test_smoke_training_and_predict_on_the_2024_set(synthetic_root_2024, tmp_path):
    run = _smoke_train(synthetic_root_2024, tmp_path, "gli2024")
    assert run["label_convention"] == "brats2024-gli" and run["model_config"]["out_channels"] == 4
    assert {"dice_et", "dice_tc", "dice_wt", "dice_rc"} <= set(run["val_metrics"])
    out = tmp_path / "pred"
    _run(["-m", "brats_lightning.cli", "predict", "--runs", str(tmp_path / "outputs"), "--data",
          str(synthetic_root_2024), "--out", str(out), "--tta", "none", "--no-probs"], tmp_path)
    assert json.loads((out / "prediction.json").read_text())["label_convention"] == "brats2024-gli"
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert written == [f"{c.case_id}.nii.gz" for c in find_cases(synthetic_root_2024)]
    for path in out.glob("*.nii.gz"):
        assert set(np.unique(np.asarray(nib.load(path).dataobj)).tolist()) <= set(BRATS2024_GLI.labels)
