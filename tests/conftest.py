"""Shared fixtures: tiny synthetic BraTS data sets, generated once per test session.

- ``synthetic_root``: 6 cases, BraTS 2020 naming and labels (0, 1, 2, 4), 4 mm voxels (60x60x39 grid,
  brain boxes about 37x44x36), seed 0. Session-scoped and shared: treat it as read-only (copy it with
  ``shutil.copytree`` before changing anything).
- ``synthetic_cases``: ``find_cases(synthetic_root)``, sorted by case id.
- ``synthetic_root_2023``: 3 cases, BraTS 2023 GLI naming (``BraTS-GLI-00001-000-t1n.nii.gz``...) and
  labels (ET = 3), 4 mm, seed 0. Read-only as well.
- ``synthetic_root_2024``: 3 cases of BraTS 2024 post-treatment glioma (GLI names, ET = 3, resection cavity
  4, ``dataset.json``), 4 mm, seed 0. Read-only.
- ``tiny_run_factory``: tiny real runs (a width-4 network from brats_lightning.models saved as a
  Lightning-style checkpoint ``{"state_dict": {"net.<param>": tensor}}`` next to a run.json in the
  docs/contracts.md format); ``tiny_dataset`` / ``case_writer``: small cases for inference tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import hydra.utils
import nibabel as nib
import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")

SYNTHETIC_CASES = 6
SYNTHETIC_SPACING = 4.0


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 synthetic BraTS 2020 cases at 4 mm (read-only; copy before modifying)."""
    from brats_lightning.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic") / "brats2020"
    generate_dataset(root, SYNTHETIC_CASES, seed=0, spacing=SYNTHETIC_SPACING, year=2020, workers=1,
                     progress=False)
    return root


@pytest.fixture(scope="session")
def synthetic_cases(synthetic_root: Path) -> list:
    """The cases of ``synthetic_root`` (list of ``brats_lightning.data.layout.Case``)."""
    from brats_lightning.data.layout import find_cases

    return find_cases(synthetic_root, require_labels=True)


@pytest.fixture(scope="session")
def synthetic_root_2023(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 synthetic cases with BraTS 2023 GLI naming and labels (ET = 3), 4 mm (read-only)."""
    from brats_lightning.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic") / "brats2023"
    generate_dataset(root, 3, seed=0, spacing=SYNTHETIC_SPACING, year=2023, workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def synthetic_root_2024(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 synthetic BraTS 2024 post-treatment glioma cases (2023 GLI names, labels 1-3 and the resection
    cavity 4, a dataset.json declaring brats2024-gli), 4 mm (read-only)."""
    from brats_lightning.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic") / "brats2024"
    generate_dataset(root, 3, seed=0, spacing=SYNTHETIC_SPACING, year=2024, workers=1, progress=False)
    return root


MODEL_CONFIGS = {
    "A": {"_target_": "brats_lightning.models.EquiUnet", "in_channels": 4, "out_channels": 3, "width": 4,
          "deep_supervision": True,
          "norm": {"_target_": "brats_lightning.models.blocks.group_norm", "_partial_": True}},
    "B": {"_target_": "brats_lightning.models.EquiUnet", "in_channels": 4, "out_channels": 3, "width": 4,
          "deep_supervision": True,
          "norm": {"_target_": "brats_lightning.models.blocks.instance_norm", "_partial_": True}},
}
NORMALIZATION = {"A": "minmax", "B": "zscore"}


def make_run(
    root: Path,
    pipeline: str = "A",
    model: str = "equiunet",
    fold: int = 0,
    score: float | None = 0.5,
    val_cases: list[str] | tuple[str, ...] = (),
    seed: int = 0,
    swa_score: float | None = None,
    label_convention: str = "brats2020",
    channels: tuple[str, ...] = ("t1", "t1ce", "t2", "flair"),
    normalization: str | None = None,
    name: str | None = None,
    model_config: dict | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a tiny trained-looking run (real network, real checkpoint) and return its run.json path.

    ``model_config`` replaces the width-4 EquiUnet (any importable nn.Module); ``weights`` are loaded into the
    network before it is saved.
    """
    run_dir = root / pipeline / model / (name or f"fold{fold}")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    config = model_config or dict(MODEL_CONFIGS[pipeline], in_channels=len(channels))
    torch.manual_seed(seed)
    net = hydra.utils.instantiate(config)
    if weights:
        net.load_state_dict(weights)
    state = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "epoch": 1}
    checkpoints = {"best": str(run_dir / "checkpoints" / "best.ckpt"),
                   "last": str(run_dir / "checkpoints" / "last.ckpt"), "swa": None}
    torch.save(state, checkpoints["best"])
    torch.save(state, checkpoints["last"])
    if swa_score is not None:
        torch.manual_seed(seed + 1000)
        swa_net = hydra.utils.instantiate(config)
        checkpoints["swa"] = str(run_dir / "checkpoints" / "swa.ckpt")
        swa_state = {f"net.{k}": v for k, v in swa_net.state_dict().items()}
        torch.save({"state_dict": swa_state}, checkpoints["swa"])

    def metrics(value: float | None) -> dict | None:
        if value is None:
            return None
        return {"dice_et": value, "dice_tc": value, "dice_wt": value, "dice_mean": value, "loss": 1 - value}

    info = {
        "pipeline": pipeline, "model": model, "fold": fold, "seed": seed,
        "normalization": normalization or NORMALIZATION[pipeline], "label_convention": label_convention,
        "channels": list(channels), "model_config": config, "checkpoints": checkpoints,
        "val_metrics": metrics(score), "val_metrics_swa": metrics(swa_score),
        "data": {"name": "synthetic", "root": str(root)}, "split_file": str(root / "splits.json"),
        "val_cases": list(val_cases), "exclude": [], "run_dir": str(run_dir), "wandb_run_id": None,
    }
    path = run_dir / "run.json"
    path.write_text(json.dumps(info, indent=2))
    return path


@pytest.fixture
def tiny_run_factory(tmp_path):
    """``factory(**make_run kwargs)`` writing runs under ``tmp_path / "outputs"``."""
    root = tmp_path / "outputs"

    def factory(**kwargs) -> Path:
        return make_run(root, **kwargs)

    factory.root = root
    return factory


def write_case(
    root: Path,
    case_id: str,
    shape: tuple[int, int, int] = (22, 26, 18),
    affine: np.ndarray | None = None,
    seed: int = 0,
    with_seg: bool = True,
    brain_margin: tuple[int, int, int] = (3, 3, 2),
) -> Path:
    """Write a small BraTS 2020-style case (4 modalities, optional seg) and return its folder.

    The brain is an ellipsoid inside a margin of zeros (so the brain box is smaller than the grid and its
    sides are not multiples of 8); a spherical tumour with ET, NCR/NET and edema shells lies inside it.
    """
    rng = np.random.default_rng(seed)
    if affine is None:  # non-trivial: LPS-like flips, 2 mm in-plane, 2.5 mm slices, an offset
        affine = np.array([[-2.0, 0, 0, 31.5], [0, -2.0, 0, 40.25], [0, 0, 2.5, -17.0], [0, 0, 0, 1]])
    box = tuple(slice(m, s - m) for m, s in zip(brain_margin, shape, strict=True))
    inner = tuple(b.stop - b.start for b in box)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in inner], indexing="ij"))
    centre = (np.array(inner, dtype=np.float32) / 2 - 0.5)[:, None, None, None]
    brain = (((grid - centre) / centre) ** 2).sum(0) <= 1.02
    shift = rng.integers(-1, 2, size=3)[:, None, None, None]
    r = np.sqrt((((grid - centre - shift) * np.array([1.0, 1.0, 1.25], np.float32)[:, None, None, None]) ** 2)
                .sum(0))
    scale = 1 + 0.15 * (seed % 3)  # tumour size differs between cases
    seg_box = np.zeros(inner, np.uint8)
    seg_box[brain & (r < 4.5 * scale)] = 2
    seg_box[brain & (r < 3 * scale)] = 4
    seg_box[brain & (r < 1.5 * scale)] = 1
    folder = root / case_id
    folder.mkdir(parents=True, exist_ok=True)
    boost = {"t1": {}, "t1ce": {4: 120, 1: -30}, "t2": {2: 60, 1: 80}, "flair": {2: 90, 4: 40, 1: 30}}
    for modality, extra in boost.items():
        values = rng.uniform(80, 120, inner).astype(np.float32)
        for code, delta in extra.items():
            values[seg_box == code] += delta
        image = np.zeros(shape, np.float32)
        image[box] = values * brain
        nib.Nifti1Image(image, affine).to_filename(folder / f"{case_id}_{modality}.nii.gz")
    if with_seg:
        seg = np.zeros(shape, np.uint8)
        seg[box] = seg_box
        nib.Nifti1Image(seg, affine).to_filename(folder / f"{case_id}_seg.nii.gz")
    return folder


@pytest.fixture
def tiny_dataset(tmp_path):
    """Three labeled cases under ``tmp_path / "data"`` (case ids case_000..case_002)."""
    root = tmp_path / "data"
    for i in range(3):
        write_case(root, f"case_{i:03d}", seed=i)
    return root


@pytest.fixture
def case_writer():
    """:func:`write_case` as a fixture (tests have no package to import it from)."""
    return write_case


POINTWISE_CONFIG = {"_target_": "torch.nn.Conv3d", "in_channels": 4, "out_channels": 3, "kernel_size": 1}
# logits: ET = 10 t1ce - 7, TC = 10 t2 - 8, WT = 10 flair - 4 (input channels t1, t1ce, t2, flair)
POINTWISE_W = np.array([[0, 10, 0, 0], [0, 0, 10, 0], [0, 0, 0, 10]], dtype=np.float32)
POINTWISE_B = np.array([-7, -8, -4], dtype=np.float32)


@pytest.fixture
def pointwise():
    """A real 1x1x1 network (torch.nn.Conv3d) with known weights: its output is computable voxel by voxel.

    ``pointwise.run_kwargs`` goes to ``tiny_run_factory``; ``pointwise.W`` / ``pointwise.B`` are the weights.
    """
    weights = {"weight": torch.from_numpy(POINTWISE_W).reshape(3, 4, 1, 1, 1),
               "bias": torch.from_numpy(POINTWISE_B)}
    run_kwargs = {"model": "pointwise", "model_config": POINTWISE_CONFIG, "weights": weights}
    return SimpleNamespace(W=POINTWISE_W, B=POINTWISE_B, run_kwargs=run_kwargs)
