"""Ensemble prediction end to end on tiny real runs (docs/method.md Inference)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf

from brats_lightning.cli import main as cli_main
from brats_lightning.data.labels import regions_to_labels
from brats_lightning.data.layout import find_cases
from brats_lightning.data.preprocess import preprocess_case
from brats_lightning.errors import UserError
from brats_lightning.inference.predictor import (
    PredictOptions,
    Predictor,
    case_members,
    load_probabilities,
    predict_folder,
)
from brats_lightning.runs import find_runs, read_run

REPO = Path(__file__).resolve().parents[2]

def expected_probabilities(case, normalization: str, pointwise) -> tuple[np.ndarray, object, tuple[int, ...]]:
    """The 1x1x1 network's sigmoid output computed in numpy on the preprocessed brain box."""
    pre = preprocess_case(case, normalization)
    logits = (np.einsum("oc,cxyz->oxyz", pointwise.W.astype(np.float64), pre.images)
              + pointwise.B[:, None, None, None])
    return 1 / (1 + np.exp(-logits)), pre.box, pre.original_shape


def read_nifti(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image


def test_conf_predict_yaml_matches_defaults():
    conf = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "predict.yaml"))
    assert conf == {"predict": PredictOptions().__dict__}


@pytest.mark.parametrize("tta", ["all", "flips", "none"])
def test_pointwise_network_end_to_end_exact(tiny_run_factory, tiny_dataset, tmp_path, tta, pointwise):
    """With a 1x1x1 network the ensemble output is known voxel by voxel: check crop/pad/TTA/uncrop/save."""
    tiny_run_factory(**pointwise.run_kwargs)
    out = tmp_path / "pred"
    records = predict_folder(tiny_run_factory.root, tiny_dataset, out,
                             options=PredictOptions(tta=tta, precision="fp32", view_batch_size=3))
    assert [r["case"] for r in records] == ["case_000", "case_001", "case_002"]
    assert all(r["members"] == {"all": 16, "flips": 8, "none": 1}[tta] for r in records)
    for case in find_cases(tiny_dataset):
        probs, box, shape = expected_probabilities(case, "minmax", pointwise)
        expected = np.zeros(shape, np.uint8)
        expected[box.slices] = regions_to_labels(probs > 0.5)
        labels, image = read_nifti(out / f"{case.case_id}.nii.gz")
        source = nib.load(case.images[0])
        assert image.get_data_dtype() == np.uint8 and labels.shape == source.shape
        assert np.array_equal(image.affine, source.affine)
        assert image.header.get_zooms() == source.header.get_zooms()
        uncertain = np.zeros(shape, bool)
        uncertain[box.slices] = (np.abs(probs - 0.5) < 1e-4).any(0)
        assert uncertain.sum() <= 2
        np.testing.assert_array_equal(labels[~uncertain], expected[~uncertain])
        assert set(np.unique(labels)) == {0, 1, 2, 4}
        saved, saved_box, saved_shape = load_probabilities(out / f"{case.case_id}_probs.npz")
        assert saved_box == box and saved_shape == shape
        np.testing.assert_allclose(saved, probs, atol=6e-4)
    manifest = json.loads((out / "prediction.json").read_text())
    assert manifest["label_convention"] == "brats2020"
    assert manifest["cases"] == ["case_000", "case_001", "case_002"]


def test_single_unlabeled_case_folder_on_a_full_brats_grid(tiny_run_factory, case_writer, tmp_path):
    """240x240x155 at 1 mm, a patient folder without seg: the output sits on the input's exact grid."""
    affine = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    folder = case_writer(tmp_path / "val", "BraTS20_Validation_001", shape=(240, 240, 155), affine=affine,
                        with_seg=False, brain_margin=(100, 98, 60))
    tiny_run_factory(fold=0, seed=1)
    out = tmp_path / "pred"
    argv = ["predict", "--runs", str(tiny_run_factory.root), "--data", str(folder), "--out", str(out),
            "--tta", "flips", "--device", "cpu"]
    assert cli_main(argv) == 0
    labels, image = read_nifti(out / "BraTS20_Validation_001.nii.gz")
    assert labels.shape == (240, 240, 155) and labels.dtype == np.uint8
    assert np.array_equal(image.affine, affine)
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    box = load_probabilities(out / "BraTS20_Validation_001_probs.npz")[1]
    outside = np.ones(labels.shape, bool)
    outside[box.slices] = False
    assert not labels[outside].any()


def test_out_of_fold_members():
    """Each case gets exactly the runs that held it out; a case no run held out is an error naming it."""

    class FakeRun:  # run.json records: only val_cases and name are read here
        def __init__(self, name, val):
            self.name, self.val_cases = name, tuple(val)

    runs = [FakeRun("f0", ["a", "b"]), FakeRun("f1", ["c"]), FakeRun("f0b", ["a", "b"])]
    assert case_members(runs, ["a", "b", "c"], oof=True) == {"a": (0, 2), "b": (0, 2), "c": (1,)}
    assert case_members(runs, ["a", "c"], oof=False) == {"a": (0, 1, 2), "c": (0, 1, 2)}
    with pytest.raises(ValueError, match=r"\['d'\]"):
        case_members(runs, ["a", "d"], oof=True)


def test_out_of_fold_prediction_uses_only_held_out_models(tiny_run_factory, tiny_dataset, tmp_path):
    p0 = tiny_run_factory(fold=0, seed=10, val_cases=["case_000", "case_001"])
    p1 = tiny_run_factory(fold=1, seed=11, val_cases=["case_002"])
    options = PredictOptions(tta="none", precision="fp32")
    oof = tmp_path / "oof"
    records = predict_folder(tiny_run_factory.root, tiny_dataset, oof, oof=True, options=options)
    assert {r["case"]: r["members"] for r in records} == {"case_000": 1, "case_001": 1, "case_002": 1}
    cases = find_cases(tiny_dataset)
    for run_path, case in ((p0, cases[0]), (p0, cases[1]), (p1, cases[2])):
        alone = tmp_path / f"alone_{case.case_id}"
        Predictor([read_run(run_path)], options).predict([case], alone)
        np.testing.assert_array_equal(load_probabilities(oof / f"{case.case_id}_probs.npz")[0],
                                      load_probabilities(alone / f"{case.case_id}_probs.npz")[0])
    both = tmp_path / "both"
    Predictor(find_runs(tiny_run_factory.root), options).predict(cases[:1], both)
    assert not np.array_equal(load_probabilities(both / "case_000_probs.npz")[0],
                              load_probabilities(oof / "case_000_probs.npz")[0])
    manifest = json.loads((oof / "prediction.json").read_text())
    assert manifest["oof"] is True and manifest["case_runs"]["case_002"] == [read_run(p1).name]
    # a run set that held out only case_002: the other two cases are named
    with pytest.raises(ValueError, match=r"\['case_000', 'case_001'\]"):
        Predictor([read_run(p1)], options).predict(cases, tmp_path / "bad", oof=True)


def test_two_pipelines_are_not_mixed(tiny_run_factory, tiny_dataset, tmp_path):
    tiny_run_factory(pipeline="A", fold=0)
    tiny_run_factory(pipeline="B", fold=0)
    with pytest.raises(ValueError, match="normalization"):
        predict_folder(tiny_run_factory.root, tiny_dataset, tmp_path / "p")
    records = predict_folder(tiny_run_factory.root, tiny_dataset / "case_002", tmp_path / "b", pipeline="B",
                             options=PredictOptions(tta="none"))
    assert [r["case"] for r in records] == ["case_002"]
    with pytest.raises(UserError, match="model=nope"):
        predict_folder(tiny_run_factory.root, tiny_dataset, tmp_path / "p", model="nope")


def test_brats2023_runs_write_et_as_3(tiny_run_factory, tiny_dataset, tmp_path, pointwise):
    tiny_run_factory(**pointwise.run_kwargs, label_convention="brats2023")
    out = tmp_path / "pred"
    predict_folder(tiny_run_factory.root, tiny_dataset, out, options=PredictOptions(tta="none"))
    labels, _ = read_nifti(out / "case_000.nii.gz")
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert json.loads((out / "prediction.json").read_text())["label_convention"] == "brats2023"
