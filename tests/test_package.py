"""Model packages (brats_lightning/package.py): export a tiny sweep of both pipelines, predict from the zip
alone with the training tree deleted (the same bytes as the tree-based ensemble), and refuse every kind of
tampering with a one-line message and nothing written."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from brats_lightning.cli import main
from brats_lightning.inference.ensemble import register_resolvers, run_ensemble
from brats_lightning.package import FORMAT_VERSION, ModelPackage, PackageError, export_package
from brats_lightning.runs import find_runs, load_network

REPO = Path(__file__).resolve().parents[1]
VAL_CASES = ["case_000", "case_001"]


def _sweep(factory) -> Path:
    """Fold 0 of a sweep: pipeline A with three models (the best two kept), pipeline B with one."""
    for seed, (model, score) in enumerate([("unet", 0.6), ("att", 0.7), ("unet_clean", 0.3)]):
        factory(pipeline="A", model=model, fold=0, score=score, seed=seed, val_cases=VAL_CASES)
    factory(pipeline="B", model="equiunet", fold=0, score=0.4, seed=10, val_cases=VAL_CASES)
    return factory.root


def _compose(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="ensemble", overrides=overrides)


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _docker_entry() -> list[str]:
    """The Dockerfile's ENTRYPOINT (JSON form)."""
    text = (REPO / "Dockerfile").read_text()
    return json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE).group(1))


@pytest.fixture
def exported(tiny_run_factory, tmp_path):
    """A package of the tiny sweep (A best2, B all, no TTA) and the tree it came from."""
    root = _sweep(tiny_run_factory)
    path = export_package(root, tmp_path / "model.zip", tta="none")
    return path, root


@pytest.mark.slow
def test_package_predicts_like_the_training_tree(exported, tiny_dataset, tmp_path, capsys):
    """The Dockerfile's entry command on a fresh folder with the training tree deleted: the merged, A and B
    label maps are byte for byte those of ``ensemble.py`` on the runs (same selection)."""
    package_path, root = exported
    tree = tmp_path / "tree"
    run_ensemble(_compose([f"runs={root}", f"dataset={tiny_dataset}", f"out={tree}", "predict.tta=none",
                           "predict.device=cpu", "evaluate=false"]))
    fresh = tmp_path / "elsewhere"
    fresh.mkdir()
    shutil.move(package_path, fresh / "model.zip")
    shutil.rmtree(root)
    out = tmp_path / "pred"
    entry = _docker_entry()
    assert entry[:3] == ["brats-lightning", "predict", "--model"]
    places = {"/opt/model/model.zip": fresh / "model.zip", "/input": tiny_dataset, "/output": out}
    args = [places.get(a, a) for a in entry[1:]]
    code, stdout, _ = _cli([*args, "--keep-pipelines", "--device", "cpu"], capsys)
    assert code == 0
    assert "Predicted cases" in stdout and "wrote 3 label map(s)" in stdout
    for case_id in ("case_000", "case_001", "case_002"):
        name = f"{case_id}.nii.gz"
        assert (out / name).read_bytes() == (tree / "predictions" / "merged" / name).read_bytes()
        for pipeline in ("A", "B"):
            assert ((out / "pipelines" / pipeline / name).read_bytes()
                    == (tree / "predictions" / pipeline / name).read_bytes())
        source, written = nib.load(tiny_dataset / case_id / f"{case_id}_t1.nii.gz"), nib.load(out / name)
        assert written.shape == source.shape and np.array_equal(written.affine, source.affine)
        assert written.get_data_dtype() == np.uint8
    manifest = json.loads((out / "prediction.json").read_text())
    assert manifest["package"]["pipelines"] == ["A", "B"] and manifest["tta"] == "none"
    a_manifest = json.loads((out / "pipelines" / "A" / "prediction.json").read_text())
    assert len(a_manifest["runs"]) == 2  # the best two of fold 0


def test_export_contents_and_model_info(exported, capsys):
    package_path, root = exported
    with zipfile.ZipFile(package_path) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("manifest.json"))
        metadata = json.loads(archive.read("package.json"))
        for name, entry in manifest["members"].items():  # an independent check of every hash
            assert hashlib.sha256(archive.read(name)).hexdigest() == entry["sha256"]
        weights = {n: archive.read(n) for n in names if n.endswith(".safetensors")}
    assert manifest["format_version"] == FORMAT_VERSION
    assert names == set(manifest["members"]) | {"manifest.json"}
    assert not [n for n in names if n.endswith((".ckpt", ".pt", ".pkl", ".pth"))]
    assert metadata["merge"] == "paper-table1" and metadata["regions"] == ["ET", "TC", "WT"]
    a, b = metadata["pipelines"]["A"], metadata["pipelines"]["B"]
    assert a["normalization"] == "minmax" and b["normalization"] == "zscore"
    assert [(n["model"], n["fold"]) for n in a["networks"]] == [("att", 0), ("unet", 0)]
    assert [n["score"] for n in a["networks"]] == [0.7, 0.6]
    # the weights are the runs' own: safetensors of the checkpoint's net.* tensors
    from safetensors.torch import load

    run = next(r for r in find_runs(root, pipeline="A") if r.model == "att")
    expected = load_network(run).state_dict()
    stored = load(weights[a["networks"][0]["weights"]])
    assert stored.keys() == expected.keys()
    assert all(torch.equal(stored[k], expected[k]) for k in expected)
    code, stdout, _ = _cli(["model-info", package_path], capsys)
    assert code == 0
    assert "| A | att | 0 |" in stdout and "| B | equiunet | 0 |" in stdout and "0.7000" in stdout
    assert "unet_clean" not in stdout
    assert re.search(r"\d+\.\d MB\), package [0-9a-f]{16}, format 1; 5 members verified", stdout)
    assert "pipelines A, B, 3 network(s)" in stdout


def test_export_is_atomic_and_refuses_an_empty_tree(tmp_path, capsys):
    out = tmp_path / "model.zip"
    (tmp_path / "outputs").mkdir()
    code, _, err = _cli(["export", "--runs", tmp_path / "outputs", "--out", out], capsys)
    assert code == 2 and "no runs to export" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "outputs"]  # no zip, no temporary file left


@pytest.mark.slow
def test_single_pipeline_package_writes_challenge_names(tiny_run_factory, synthetic_root_2023, tmp_path,
                                                        capsys):
    """A B-only package on BraTS 2023 cases: label maps named like the cases, on their grids, ET = 3."""
    tiny_run_factory(pipeline="B", fold=0, label_convention="brats2023", val_cases=["x"])
    package = export_package(tiny_run_factory.root, tmp_path / "b.zip", {"A": "none", "B": "all"}, tta="none")
    out = tmp_path / "pred"
    code, _, _ = _cli(["predict", "--model", package, "--data", synthetic_root_2023, "--out", out,
                       "--device", "cpu", "--no-probs"], capsys)
    assert code == 0
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert written == [f"BraTS-GLI-0000{i}-000.nii.gz" for i in (1, 2, 3)]
    source = nib.load(next((synthetic_root_2023 / "BraTS-GLI-00001-000").glob("*-t1n.nii.gz")))
    image = nib.load(out / written[0])
    assert image.shape == source.shape and np.array_equal(image.affine, source.affine)
    assert set(np.unique(np.asanyarray(image.dataobj))) <= {0, 1, 2, 3}


# ----------------------------------------------------------------------------------------- tampering
def _rewrite(source: Path, target: Path, members: dict[str, bytes | None], rehash: bool) -> Path:
    """Copy the package with ``members`` replaced (None: removed); ``rehash`` updates the manifest to match
    (so that only the later checks can catch the change)."""
    with zipfile.ZipFile(source) as archive:
        content = {n: archive.read(n) for n in archive.namelist()}
    manifest = json.loads(content["manifest.json"])
    for name, data in members.items():
        if data is None:
            content.pop(name)
        else:
            content[name] = data
        if rehash and data is not None:
            manifest["members"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if rehash:
        content["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in content.items():
            archive.writestr(name, data)
    return target


class _WritesMarker:
    """Unpickling this runs ``Path(marker).touch()``: the code a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _refused(package: Path, data: Path, out: Path, capsys, expected: str) -> None:
    code, _, err = _cli(["predict", "--model", package, "--data", data, "--out", out, "--device", "cpu"],
                        capsys)
    assert code == 2, err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_tampered_packages_are_refused(exported, tiny_dataset, tmp_path, capsys):
    package_path, _ = exported
    with zipfile.ZipFile(package_path) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        metadata = json.loads(archive.read("package.json"))
        weights_name = metadata["pipelines"]["B"]["networks"][0]["weights"]
        weights = archive.read(weights_name)
    out = tmp_path / "pred"

    newer = dict(manifest, format_version=FORMAT_VERSION + 1)
    bad = _rewrite(package_path, tmp_path / "newer.zip", {"manifest.json": json.dumps(newer).encode()}, False)
    _refused(bad, tiny_dataset, out, capsys, f"package format {FORMAT_VERSION + 1}")
    _refused(bad, tiny_dataset, out, capsys, "upgrade brats-lightning")

    bad = _rewrite(package_path, tmp_path / "missing.zip", {weights_name: None}, False)
    _refused(bad, tiny_dataset, out, capsys, f"['{weights_name}'] listed in manifest.json are missing")

    flipped = bytearray(weights)
    flipped[-1] ^= 1
    bad = _rewrite(package_path, tmp_path / "altered.zip", {weights_name: bytes(flipped)}, False)
    _refused(bad, tiny_dataset, out, capsys, f"member {weights_name} does not match its SHA-256")

    bad = tmp_path / "twice.zip"  # a second entry of the same name after the checked one
    shutil.copy(package_path, bad)
    with warnings.catch_warnings(), zipfile.ZipFile(bad, "a") as archive:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        archive.writestr(weights_name, bytes(flipped))
    _refused(bad, tiny_dataset, out, capsys, "a member name appears twice in the zip")

    bad = _rewrite(package_path, tmp_path / "extra.zip", {"B/99-extra.safetensors": weights}, False)
    _refused(bad, tiny_dataset, out, capsys, "['B/99-extra.safetensors'] are not listed in manifest.json")

    wider = json.loads(json.dumps(metadata))
    wider["pipelines"]["B"]["networks"][0]["model_config"]["width"] = 8
    bad = _rewrite(package_path, tmp_path / "config.zip", {"package.json": json.dumps(wider).encode()}, True)
    _refused(bad, tiny_dataset, out, capsys, "the network config does not fit the weights")


def test_a_pickle_in_a_package_never_runs(exported, tiny_dataset, tmp_path, capsys):
    """A weights member replaced by a pickle whose unpickling would touch a marker file (hashes updated to
    match): refused as not safetensors, and the marker never appears; same for a config that names code."""
    package_path, _ = exported
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"state_dict": _WritesMarker(marker)}, buffer)
    payload = buffer.getvalue()
    with zipfile.ZipFile(package_path) as archive:
        metadata = json.loads(archive.read("package.json"))
    weights_name = metadata["pipelines"]["A"]["networks"][0]["weights"]
    out = tmp_path / "pred"
    bad = _rewrite(package_path, tmp_path / "pickle.zip", {weights_name: payload}, True)
    _refused(bad, tiny_dataset, out, capsys, f"{weights_name} (A/att/fold0) is not a safetensors file")
    assert not marker.exists()

    bad = _rewrite(package_path, tmp_path / "pt.zip", {"A/00-att-fold0.pt": payload}, True)
    _refused(bad, tiny_dataset, out, capsys, "member 'A/00-att-fold0.pt' is not allowed")

    evil = json.loads(json.dumps(metadata))
    evil["pipelines"]["A"]["networks"][0]["model_config"] = {"_target_": "pathlib.Path.touch",
                                                             "self": str(marker)}
    bad = _rewrite(package_path, tmp_path / "target.zip", {"package.json": json.dumps(evil).encode()}, True)
    _refused(bad, tiny_dataset, out, capsys, "_target_ 'pathlib.Path.touch' is not a network class")
    # a name under an allowed module that reaches other code through a module attribute
    evil["pipelines"]["A"]["networks"][0]["model_config"] = {"_target_": "torch.nn.modules.module.os.system",
                                                             "_args_": [f"touch {marker}"]}
    bad = _rewrite(package_path, tmp_path / "attr.zip", {"package.json": json.dumps(evil).encode()}, True)
    _refused(bad, tiny_dataset, out, capsys, "is not a network class")
    assert not marker.exists()


def test_data_that_does_not_match_the_package(exported, synthetic_root_2023, tmp_path, capsys):
    """BraTS 2023 cases (t1n/t1c/t2w/t2f, ET = 3) with a package trained on brats2020 data: refused."""
    package_path, _ = exported
    out = tmp_path / "pred"
    _refused(package_path, synthetic_root_2023, out, capsys,
             "(channels t1n, t1c, t2w, t2f; labels brats2023, ET = 3); this package was trained on brats2020 "
             "data (ET = 4)")
    metadata = ModelPackage.open(package_path).metadata
    metadata["pipelines"]["A"]["channels"] = ["t1", "t1ce", "t2", "adc"]
    bad = _rewrite(package_path, tmp_path / "channels.zip", {"package.json": json.dumps(metadata).encode()},
                   True)
    with pytest.raises(PackageError, match=r"channels \['adc'\] are not among"):
        ModelPackage.open(bad)


def test_predict_model_refuses_run_selection_options(exported, tiny_dataset, tmp_path, capsys):
    package_path, _ = exported
    code, _, err = _cli(["predict", "--model", package_path, "--data", tiny_dataset, "--out", tmp_path / "o",
                         "--select", "best2"], capsys)
    assert code == 2 and "--select choose runs of a training tree" in err
    code, _, err = _cli(["predict", "--model", package_path, "--data", tiny_dataset, "--out", tmp_path / "o",
                         "--uncertainty"], capsys)
    assert code == 2 and "add --keep-pipelines" in err
    assert not (tmp_path / "o").exists()


def test_load_network_reads_plain_checkpoints_without_unpickling(tiny_run_factory, caplog):
    """Plain checkpoints load with weights_only=True (no warning); one holding other objects still loads, with
    a warning that names the object's class."""
    path = tiny_run_factory(pipeline="A", fold=0)
    run = find_runs(path)[0]
    with caplog.at_level(logging.WARNING, logger="brats_lightning.runs"):
        load_network(run, "best")
    assert not caplog.records
    state = torch.load(run.checkpoint_path("last"), weights_only=True)
    state["extra"] = _WritesMarker(Path(run.path.parent / "marker"))
    torch.save(state, run.checkpoint_path("last"))
    with caplog.at_level(logging.WARNING, logger="brats_lightning.runs"):
        net = load_network(run, "last")
    assert "holds Python objects besides tensors (getattr)" in caplog.text
    assert "weights_only=False" in caplog.text
    assert isinstance(net, torch.nn.Module)
