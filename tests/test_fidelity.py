"""experiment=paper_A_code (the authors' code) against experiment=paper_A (the paper's text), and the
composed configs training uses against the method's tables (docs/method.md, docs/fidelity.md)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from brats_lightning.callbacks.fast_swa import register_resolvers
from brats_lightning.data import layout
from brats_lightning.data.preprocess import Box
from brats_lightning.losses import DiceLoss
from brats_lightning.models.attention import SpatialGate
from brats_lightning.module import BratsModule

REPO = Path(__file__).resolve().parents[1]


def compose_train(*overrides: str):
    register_resolvers()
    layout.register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture(scope="module")
def build_module(synthetic_root):
    """``build(*overrides)``: the BratsModule train.py builds from the composed config, on the synthetic
    data set (the network's out_channels come from it), ``model.width=4`` unless overridden."""

    def build(*overrides: str) -> BratsModule:
        cfg = compose_train(f"data.root={synthetic_root}", "model.width=4", *overrides)
        return BratsModule.from_config(cfg)

    return build


# ------------------------------------------------------------------------- the method's augmentation table
def method_augmentation_table() -> dict[str, tuple[str, str]]:
    """docs/method.md "Augmentation": {row label: (A cell, B cell)}."""
    text = (REPO / "docs" / "method.md").read_text()
    section = text.split("\n## Augmentation\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and "---" not in line]
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows[1:]]
    return {label: (a, b) for label, a, b in cells}


def probability(cell: str) -> float:
    return {"no": 0.0, "yes": 1.0}.get(cell) if cell in ("no", "yes") else float(cell.rstrip("%")) / 100


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", text)]


def expected_augment(table: dict[str, tuple[str, str]], column: int) -> dict[str, object]:
    expected: dict[str, object] = {"rescale_per_channel": True, "noise_relative": False, "spatial": "flips",
                                   "sample_p": 1.0}
    keys = {"rescale": "rescale_p", "shift": "shift_p", "noise": "noise_p", "drop": "drop_channel_p",
            "flip": "flip_p"}
    for label, cells in table.items():
        (word,) = [w for w in keys if w in label]
        expected[keys[word]] = probability(cells[column])
        if word == "rescale":
            expected["rescale_range"] = tuple(numbers(label.split("U(")[1]))
        elif word == "shift":
            expected["shift_range"] = tuple(numbers(label.split("U(")[1]))
        elif word == "noise":
            expected["noise_std"] = numbers(label.split("N(")[1])[1]
    assert len(expected) == 4 + 5 + 3, table  # every row understood
    return expected


def module_augment(module: BratsModule) -> dict[str, object]:
    return {key: getattr(module.augment, key) for key in (
        "rescale_p", "rescale_range", "rescale_per_channel", "shift_p", "shift_range", "noise_p",
        "noise_std", "noise_relative", "drop_channel_p", "flip_p", "spatial", "sample_p")}


@pytest.mark.parametrize("overrides, column", [
    (["pipeline=A"], 0), (["pipeline=B"], 1),
    (["experiment=paper_A"], 0), (["experiment=paper_B"], 1),
])
def test_training_augmentation_is_the_method_table(build_module, overrides, column):
    """The augmentation BratsModule builds from the composed config (what training applies in
    on_after_batch_transfer) has the probabilities and ranges of docs/method.md's table."""
    table = method_augmentation_table()
    assert module_augment(build_module(*overrides)) == expected_augment(table, column)


def test_demo_a_departs_from_the_table_only_in_its_noise(build_module):
    """conf/experiment/demo_A.yaml: N(0, 0.02) noise on A's [0, 1] inputs (docs/fidelity.md), nothing else."""
    expected = dict(expected_augment(method_augmentation_table(), 0), noise_std=0.02)
    assert module_augment(build_module("experiment=demo_A")) == expected
    expected_b = expected_augment(method_augmentation_table(), 1)
    assert module_augment(build_module("experiment=demo_B")) == expected_b


# ---------------------------------------------------------------------------------- the preset's switches
def flat(node, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        out.update(flat(value, f"{path}.") if isinstance(value, dict) else {path: value})
    return out


# what experiment=paper_A_code changes in experiment=paper_A: (paper, authors' code); docs/fidelity.md
SWITCHES = {
    "name": ("paper", "paper_code"),
    "pipeline.augment.sample_p": (1.0, 0.8),
    "pipeline.augment.rescale_p": (0.8, 1.0),
    "pipeline.augment.rescale_per_channel": (True, False),
    "pipeline.augment.noise_relative": (False, True),
    "pipeline.augment.drop_channel_p": (0.16, 0.2),
    "pipeline.augment.flip_p": (0.8, 1.0),
    "pipeline.augment.spatial": ("flips", "transpose_flip"),
    "callbacks.fast_swa.cosine_epochs": (None, 40),
    "pipeline.loss.deep_reduction": ("sum", "mean"),
    "pipeline.loss.val_deep_supervision": (False, True),
    "pipeline.gate_norm": (False, True),
    "pipeline.norm.rule": ("gcd", "authors"),
    "data.split_seed": (42, 16111990),
}


@pytest.mark.parametrize("model", ["equiunet", "att_equiunet", "unet"])
def test_preset_is_paper_a_plus_the_listed_switches(model):
    common = ["data.root=/data", f"model={model}"]
    paper = flat(OmegaConf.to_container(compose_train("experiment=paper_A", *common)))
    code = flat(OmegaConf.to_container(compose_train("experiment=paper_A_code", *common)))
    diff = {k: (paper.get(k), code.get(k)) for k in sorted(set(paper) | set(code))
            if paper.get(k) != code.get(k)}
    assert diff == SWITCHES


def test_preset_networks_have_the_authors_gate_and_groups(build_module):
    net = build_module("experiment=paper_A_code", "model=att_equiunet").net
    gates = [m for m in net.modules() if isinstance(m, SpatialGate)]
    assert len(gates) == 6  # 4 encoder stages, bottom, bottom_2
    for gate in gates:
        norm, relu = gate.post
        assert gate.conv.bias is None and isinstance(relu, torch.nn.ReLU)
        assert isinstance(norm, torch.nn.GroupNorm) and (norm.num_groups, norm.num_channels) == (1, 1)
    x = torch.randn(1, 8, 8, 8, 8)
    values = gates[1].gate(x)
    assert values.min() >= 0.5 and values.max() < 1  # ReLU before the sigmoid: the gate lies in [0.5, 1)
    paper = build_module("experiment=paper_A", "model=att_equiunet").net
    assert all(isinstance(m.post, torch.nn.Identity) for m in paper.modules() if isinstance(m, SpatialGate))
    # the 24-channel layers of the w=48 Unet: 3 groups of 8 (authors), 8 groups of 3 (paper default)
    for preset, groups in (("paper_A_code", 3), ("paper_A", 8)):
        unet = build_module(f"experiment={preset}", "model=unet", "model.width=48").net
        assert {m.num_groups for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)
                and m.num_channels == 24} == {groups}


def test_validation_loss_with_the_deep_heads(build_module):
    """paper_A_code: val/loss is the mean of the main and the 4 deep losses on the unpadded box (as the
    authors' validation step); paper_A: the main output's loss alone."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 4, 16, 16, 16, generator=gen)
    box = Box((0, 0, 0), (16, 16, 12))
    target = torch.rand(1, 3, 16, 16, 12, generator=gen) > 0.7
    batch = {"image": image, "target": target, "box": [box.to_dict()], "case_id": ["c0"]}
    dice = DiceLoss(squared=True)
    for preset in ("paper_A_code", "paper_A"):
        module = build_module(f"experiment={preset}").eval()
        with torch.no_grad():
            logits, deeps = module.net(image, deep_outputs=True)
            outputs = [logits, *deeps] if preset == "paper_A_code" else [logits]
            expected = torch.stack([dice(o[..., :12], target) for o in outputs]).mean()
            metrics, _ = module.score_batch(batch)
        assert metrics["loss"].item() == pytest.approx(expected.item(), rel=1e-5), preset


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_preset_trains_end_to_end(synthetic_root, tmp_path):
    """``train.py experiment=paper_A_code`` at smoke size: 1 main epoch, one 1-epoch SWA cycle."""
    args = ["experiment=paper_A_code", f"data.root={synthetic_root}", "model.width=4", "data.crop_size=32",
            "data.foreground_prob=0.5", "data.num_workers=0", "pipeline.epochs=1",
            "callbacks.fast_swa.cycles=1", "callbacks.fast_swa.cycle_epochs=1",
            "callbacks.fast_swa.snapshot_every=1", "callbacks.overlays=null", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1", "trainer.enable_model_summary=false", "logger=csv"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    (record,) = (tmp_path / "outputs").rglob("run.json")
    run = json.loads(record.read_text())
    assert run["name"] == "paper_code" and run["epochs_trained"] == 2
    assert Path(run["checkpoints"]["swa"]).is_file() and run["fast_swa"]["cosine_epochs"] == 40
    assert run["fast_swa"]["n_snapshots"] == 2  # the end of the main schedule + one per SWA epoch
    assert run["model_config"]["norm"]["rule"] == "authors"
    assert json.loads(Path(run["split_file"]).read_text())["seed"] == 16111990
    assert all(math.isfinite(v) for v in run["val_metrics"].values())
    checkpoint = torch.load(run["checkpoints"]["last"], map_location="cpu", weights_only=False)
    pipeline = checkpoint["hyper_parameters"]["pipeline"]
    assert pipeline["augment"]["spatial"] == "transpose_flip" and pipeline["augment"]["sample_p"] == 0.8
    assert pipeline["loss"]["deep_reduction"] == "mean" and pipeline["loss"]["val_deep_supervision"]
