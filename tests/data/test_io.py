"""NIfTI I/O keeping affine and header, atomic writes (docs/method.md "Data", "Inference")."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_lightning.data.io import (
    VolumeReadError,
    atomic_path,
    load_case,
    load_volume,
    save_label_map,
    save_volume,
)


def _reference(shape=(6, 5, 4)) -> nib.Nifti1Image:
    affine = np.array([[-1.5, 0, 0, 10], [0, -1.5, 0, 20], [0, 0, 2.0, -30], [0, 0, 0, 1]])
    image = nib.Nifti1Image(np.arange(np.prod(shape), dtype=np.int16).reshape(shape), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header["descrip"] = b"reference scan"
    return image


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def test_atomic_path_success_keeps_extension(tmp_path):
    target = tmp_path / "sub" / "pred.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".nii.gz") and tmp.name.startswith(".tmp-")
        assert str(os.getpid()) in tmp.name
        nib.Nifti1Image(np.ones((2, 2, 2), np.uint8), np.eye(4)).to_filename(tmp)
        assert not target.exists()  # nothing published before the body completes
    assert target.exists() and _leftovers(target.parent) == []
    with gzip.open(target) as fh:  # really gzip-compressed: the temp name kept .nii.gz
        assert len(fh.read()) == 352 + 8


def test_atomic_path_exception_keeps_old_file(tmp_path):
    target = tmp_path / "labels.nii.gz"
    save_label_map(np.full((6, 5, 4), 2, np.uint8), _reference(), target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(before[: len(before) // 2])  # half-written file
            raise RuntimeError("interrupted")
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_save_label_map_keeps_grid_and_header(tmp_path):
    reference = _reference()
    labels = np.zeros((6, 5, 4), dtype=np.int64)
    labels[1:3, 2, 1] = 4
    labels[4, 4, 3] = 1
    labels[0, 0, 0] = 2
    path = save_label_map(labels, reference, tmp_path / "seg.nii.gz")
    back = nib.load(path)
    assert back.get_data_dtype() == np.uint8
    data = np.asanyarray(back.dataobj)
    assert data.dtype == np.uint8
    np.testing.assert_array_equal(data, labels)
    np.testing.assert_array_equal(back.affine, reference.affine)
    assert back.header.get_zooms() == (1.5, 1.5, 2.0)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 1
    assert back.header["descrip"].item() == b"reference scan"
    assert _leftovers(tmp_path) == []


def test_save_label_map_float_input(tmp_path):
    path = save_label_map(np.full((6, 5, 4), 4.0), _reference(), tmp_path / "a.nii.gz")
    assert np.asanyarray(nib.load(path).dataobj).max() == 4
    with pytest.raises(ValueError, match="non-integer values"):
        save_label_map(np.full((6, 5, 4), 0.5), _reference(), tmp_path / "b.nii.gz")
    with pytest.raises(ValueError, match="differs from the reference grid"):
        save_label_map(np.zeros((6, 5, 3), np.uint8), _reference(), tmp_path / "c.nii.gz")
    assert not (tmp_path / "b.nii.gz").exists() and not (tmp_path / "c.nii.gz").exists()


def test_save_volume_and_load_volume(tmp_path):
    reference = _reference()
    data = np.linspace(-3, 3, 120).reshape(6, 5, 4)
    path = save_volume(data, reference, tmp_path / "prob.nii.gz", np.float32)
    loaded, image = load_volume(path)
    assert loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, data, rtol=1e-6)
    np.testing.assert_array_equal(image.affine, reference.affine)
    raw, _ = load_volume(path, dtype=None)
    assert raw.dtype == np.float32


def test_load_case(synthetic_cases):
    case = synthetic_cases[0]
    images, labels, reference = load_case(case)
    assert images.shape == (4, 60, 60, 39) and images.dtype == np.float32
    assert labels.shape == (60, 60, 39) and labels.dtype == np.uint8
    for channel, path in enumerate(case.images):
        np.testing.assert_array_equal(images[channel], np.asanyarray(nib.load(path).dataobj))
    np.testing.assert_array_equal(reference.affine, nib.load(case.images[0]).affine)


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "x.nii.gz"
    noise = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)
    nib.Nifti1Image(noise, np.eye(4)).to_filename(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VolumeReadError, match=f"could not read the voxels of {path}.*truncated"):
        load_volume(path)
    with pytest.raises(VolumeReadError, match="does not exist"):
        load_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti file at all")
    with pytest.raises(VolumeReadError, match="could not read the header of"):
        load_volume(tmp_path / "junk.nii.gz")
