"""Shared fixtures: tiny synthetic BraTS data sets, generated once per test session.

- ``synthetic_root``: 6 cases, BraTS 2020 naming and labels (0, 1, 2, 4), 4 mm voxels (60x60x39 grid,
  brain boxes about 37x44x36), seed 0. Session-scoped and shared: treat it as read-only (copy it with
  ``shutil.copytree`` before changing anything).
- ``synthetic_cases``: ``find_cases(synthetic_root)``, sorted by case id.
- ``synthetic_root_2023``: 3 cases, BraTS 2023 GLI naming (``BraTS-GLI-00001-000-t1n.nii.gz``...) and
  labels (ET = 3), 4 mm, seed 0. Read-only as well.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
