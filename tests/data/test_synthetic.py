"""The synthetic BraTS-like data set on MNI152 anatomy (docs/method.md "Data", CPU demo recipe)."""

from __future__ import annotations

import numpy as np
import pytest

from brats_lightning.cli import main
from brats_lightning.data.io import load_case
from brats_lightning.data.layout import find_cases
from brats_lightning.data.synthetic import (
    case_id_for,
    case_parameters,
    generate_dataset,
    grid_for,
    synthesize_case,
)

T1, T1CE, T2, FLAIR = range(4)
CSF, GM, WM = 1, 2, 3


def test_grid():
    shape, affine = grid_for(1.0)
    assert shape == (240, 240, 155)
    shape, affine = grid_for(2.0)
    assert shape == (120, 120, 78)  # round(240 / 2), round(155 / 2) = 78 (77.5 rounds to even)
    np.testing.assert_array_equal(np.diag(affine), [-2.0, -2.0, 2.0, 1.0])
    assert grid_for(4.0)[0] == (60, 60, 39)
    assert case_id_for(7, 2020) == "BraTS20_Training_007"
    assert case_id_for(7, 2021) == "BraTS2021_00007"
    assert case_id_for(7, 2023) == "BraTS-GLI-00007-000"
    assert case_id_for(7, 2023, "MEN") == "BraTS-MEN-00007-000"
    assert case_id_for(7, 2023, "GoAT") == "BraTS-GoAT-00007-000"
    assert case_id_for(7, 2024) == "BraTS-GLI-00007-100"
    with pytest.raises(ValueError, match="unsupported year 2019"):
        case_id_for(7, 2019)


def test_default_output_unchanged():
    """The 2020 cases are the ones generated before the registry existed (voxel hashes recorded then), and
    every 2023 task and 2024 share their images and tumour (only codes, and 2024's cavity, differ)."""
    import hashlib

    def digest(array):
        return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]

    case = synthesize_case(1, seed=0, spacing=4.0)
    assert (digest(case.images), digest(case.labels)) == ("474a7b5110eac9b0", "71e64cf2dc1e9dca")
    men = synthesize_case(1, seed=0, spacing=4.0, year=2023, task="MEN")
    np.testing.assert_array_equal(men.images, case.images)
    np.testing.assert_array_equal(men.labels, np.where(case.labels == 4, 3, case.labels))
    post = synthesize_case(1, seed=0, spacing=4.0, year=2024)
    cavity = post.labels == 4
    assert cavity.sum() > 20 and set(np.unique(post.labels).tolist()) == {0, 1, 2, 3, 4}
    # outside the cavity the tumour is the 2023 one; inside it the tumour (or brain) was resected
    np.testing.assert_array_equal(post.labels[~cavity], men.labels[~cavity])
    assert (men.labels[cavity] > 0).mean() > 0.5
    t2, flair = post.images[T2], post.images[FLAIR]
    assert _region_mean(t2, cavity) > _region_mean(t2, post.labels == 3)  # fluid: bright on t2,
    assert _region_mean(flair, cavity) < _region_mean(flair, post.labels == 2)  # dark on flair


def test_deterministic_for_a_seed():
    a = synthesize_case(2, seed=5, spacing=4.0)
    b = synthesize_case(2, seed=5, spacing=4.0)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = synthesize_case(2, seed=6, spacing=4.0)
    d = synthesize_case(3, seed=5, spacing=4.0)
    assert not np.array_equal(a.images, c.images) and not np.array_equal(a.images, d.images)


@pytest.mark.slow
def test_case_independent_of_count_and_workers(tmp_path, synthetic_root):
    # case 2 of a 3-case set built by 2 worker processes equals case 2 of the 6-case fixture (1 worker)
    generate_dataset(tmp_path, 3, seed=0, spacing=4.0, workers=2, progress=False)
    mine = find_cases(tmp_path)[1]
    theirs = find_cases(synthetic_root)[1]
    assert mine.case_id == theirs.case_id == "BraTS20_Training_002"
    for a, b in zip(mine.files, theirs.files, strict=True):
        np.testing.assert_array_equal(load_case_file(a), load_case_file(b))


def load_case_file(path):
    import nibabel as nib

    return np.asanyarray(nib.load(path).dataobj)


def test_fixture_layout_labels_and_background(synthetic_cases):
    assert [c.case_id for c in synthetic_cases] == [f"BraTS20_Training_{k:03d}" for k in range(1, 7)]
    present = set()
    for case in synthetic_cases:
        images, labels, reference = load_case(case)
        assert images.shape == (4, 60, 60, 39)
        assert np.asanyarray(reference.dataobj).dtype == np.int16  # stored like BraTS
        codes = set(np.unique(labels).tolist())
        assert codes <= {0, 1, 2, 4} and 2 in codes
        present |= codes
        brain = images[0] != 0
        for channel in range(4):  # one brain mask shared by all modalities, positive inside, 0 outside
            np.testing.assert_array_equal(images[channel] != 0, brain)
            assert images[channel][brain].min() >= 1
        assert not labels[~brain].any()  # tumour only inside the brain
        assert not (brain[0].any() or brain[-1].any() or brain[:, 0].any() or brain[:, -1].any())
        fraction = brain.mean()
        assert 0.15 < fraction < 0.5, fraction  # a brain, not an empty or full grid
    assert present == {0, 1, 2, 4}


def test_tumour_kinds_frequency():
    params = [case_parameters(0, k) for k in range(1, 1001)]
    no_et = np.mean([not p.has_et for p in params])
    no_ncr = np.mean([not p.has_ncr for p in params])
    assert 0.07 < no_et < 0.13 and 0.12 < no_ncr < 0.18
    assert not any(not p.has_et and not p.has_ncr for p in params)  # a core always exists


def _region_mean(volume, mask):
    assert mask.sum() > 20
    return float(volume[mask].mean())


@pytest.mark.parametrize("index", [2, 4])
def test_glioma_contrasts(index):
    case = synthesize_case(index, seed=0, spacing=2.0)
    images, labels, tissue = case.images.astype(np.float64), case.labels, case.tissue
    assert case.info["has_et"] and case.info["has_necrosis"]
    et, ncr, ed = labels == 4, labels == 1, labels == 2
    healthy = labels == 0
    # assumptions of the paper's section 1: ET bright on t1ce vs necrosis (and vs t1), edema bright on flair
    assert _region_mean(images[T1CE], et) > 2 * _region_mean(images[T1CE], ncr)
    et_ratio = _region_mean(images[T1CE], et) / _region_mean(images[T1CE], healthy & (tissue == WM))
    t1_ratio = _region_mean(images[T1], et) / _region_mean(images[T1], healthy & (tissue == WM))
    assert et_ratio > 1.2 and t1_ratio < 1.0  # enhancement on t1ce only
    assert _region_mean(images[FLAIR], ed) > 1.3 * _region_mean(images[FLAIR], healthy & (tissue == WM))
    assert _region_mean(images[T2], ed) > 1.5 * _region_mean(images[T2], healthy & (tissue == WM))
    assert _region_mean(images[T1], ed) < _region_mean(images[T1], healthy & (tissue == WM))
    # healthy tissue: CSF bright on t2 and dark on flair; WM > GM > CSF on t1; GM > WM on t2
    wm, gm, csf = (healthy & (tissue == t) for t in (WM, GM, CSF))
    assert _region_mean(images[T2], csf) > _region_mean(images[T2], gm) > _region_mean(images[T2], wm)
    assert _region_mean(images[FLAIR], csf) < _region_mean(images[FLAIR], wm)
    assert _region_mean(images[T1], wm) > _region_mean(images[T1], gm) > _region_mean(images[T1], csf)


def test_2023_naming_and_labels(synthetic_root_2023):
    cases = find_cases(synthetic_root_2023, require_labels=True)
    assert [c.case_id for c in cases] == ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000", "BraTS-GLI-00003-000"]
    assert cases[0].images[1].name == "BraTS-GLI-00001-000-t1c.nii.gz"
    assert all(c.convention.name == "brats2023" for c in cases)
    codes = set()
    for case in cases:
        codes |= set(np.unique(load_case(case)[1]).tolist())
    assert codes <= {0, 1, 2, 3} and 3 in codes


def test_cli_with_preview(tmp_path, capsys):
    png = tmp_path / "preview.png"
    out = tmp_path / "set"
    assert main(["synth", "--out", str(out), "--cases", "2", "--seed", "3", "--spacing", "4",
                 "--preview", str(png), "--workers", "1"]) == 0
    out_text = capsys.readouterr().out
    assert "wrote 2 synthetic cases (2020 naming, brats2020, 60x60x39 at 4 mm, seed 3)" in out_text
    assert [c.case_id for c in find_cases(out)] == ["BraTS20_Training_001", "BraTS20_Training_002"]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000
