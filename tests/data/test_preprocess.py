"""Brain box, crop / pad / uncrop, random crops and the preprocessed cache (docs/method.md
"Preprocessing")."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_lightning.data.io import load_case
from brats_lightning.data.layout import find_cases
from brats_lightning.data.normalize import MinMaxPercentile, ZScoreNonzero
from brats_lightning.data.preprocess import (
    Box,
    CaseCache,
    brain_box,
    crop,
    data_root_hash,
    pad_to_multiple,
    pad_to_shape,
    preprocess_case,
    random_crop,
    uncrop,
    unpad,
)


# ------------------------------------------------------------------------------------------------ geometry
def test_brain_box_any_modality():
    images = np.zeros((4, 10, 9, 8), dtype=np.float32)
    images[0, 2, 3, 4] = 1.0
    images[2, 5, 1, 6] = -2.0  # negative intensities are brain too (non-zero)
    box = brain_box(images)
    assert box == Box((2, 1, 4), (6, 4, 7))
    assert box.shape == (4, 3, 3) and box.slices == (slice(2, 6), slice(1, 4), slice(4, 7))
    assert brain_box(images[2]) == Box((5, 1, 6), (6, 2, 7))
    with pytest.raises(ValueError, match="all voxels are zero"):
        brain_box(np.zeros((2, 3, 3, 3)))


def test_crop_and_uncrop_round_trip():
    rng = np.random.default_rng(0)
    full = rng.random((3, 10, 9, 8))
    box = Box((1, 2, 3), (7, 9, 5))
    cropped = crop(full, box)
    assert cropped.shape == (3, 6, 7, 2)
    np.testing.assert_array_equal(cropped, full[:, 1:7, 2:9, 3:5])
    pasted = uncrop(cropped, box, (10, 9, 8))
    inside = np.zeros((10, 9, 8), bool)
    inside[1:7, 2:9, 3:5] = True
    np.testing.assert_array_equal(pasted[:, inside], full[:, inside])
    assert not pasted[:, ~inside].any()
    labels = uncrop(np.ones((6, 7, 2), np.uint8), box, (3, 10, 9, 8))  # full_shape's last 3 dims count
    assert labels.shape == (10, 9, 8) and labels.dtype == np.uint8 and labels.sum() == 6 * 7 * 2
    import torch  # imported here: spawned worker processes of other tests re-import this module

    assert torch.equal(crop(torch.from_numpy(full), box), torch.from_numpy(cropped))
    with pytest.raises(ValueError, match="differs from the box shape"):
        uncrop(np.ones((6, 7, 3)), box, (10, 9, 8))


def test_pad_to_multiple_and_unpad():
    data = np.arange(3 * 13 * 16 * 9, dtype=np.float32).reshape(3, 13, 16, 9) + 1
    padded, box = pad_to_multiple(data, 8)
    assert padded.shape == (3, 16, 16, 16)
    # centred: (16 - 13) // 2 = 1 before on x, 0 on y, (16 - 9) // 2 = 3 before on z
    assert box == Box((1, 0, 3), (14, 16, 12))
    np.testing.assert_array_equal(unpad(padded, box), data)
    assert padded.sum() == data.sum()  # everything else is zero
    same, box2 = pad_to_multiple(np.ones((8, 16, 24)), 8)
    assert same.shape == (8, 16, 24) and box2 == Box((0, 0, 0), (8, 16, 24))


def test_pad_to_shape():
    padded, box = pad_to_shape(np.ones((2, 3, 4)), (5, 3, 7), fill=-1)
    assert padded.shape == (5, 3, 7) and box == Box((1, 0, 1), (3, 3, 5))
    assert (padded == -1).sum() == 5 * 3 * 7 - 2 * 3 * 4
    with pytest.raises(ValueError, match="cannot pad spatial shape"):
        pad_to_shape(np.ones((9, 3, 4)), (8, 8, 8))


def test_random_crop_is_a_window_of_the_source():
    images = np.arange(2 * 20 * 18 * 16, dtype=np.float32).reshape(2, 20, 18, 16)
    target = (images[0] % 7 == 0).astype(np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(20):
        img, tgt = random_crop(images, target, (8, 9, 10), rng)
        assert img.shape == (2, 8, 9, 10) and tgt.shape == (8, 9, 10)
        x, y, z = np.unravel_index(int(img[0, 0, 0, 0]), (20, 18, 16))  # unique values locate the window
        np.testing.assert_array_equal(img, images[:, x:x + 8, y:y + 9, z:z + 10])
        np.testing.assert_array_equal(tgt, target[x:x + 8, y:y + 9, z:z + 10])
        assert not isinstance(img, np.memmap)


def test_random_crop_pads_when_box_is_smaller():
    images = np.random.default_rng(1).uniform(1, 2, size=(4, 5, 20, 7)).astype(np.float32)
    target = np.ones((3, 5, 20, 7), dtype=bool)  # regions (3, ...) work as targets too
    rng = np.random.default_rng(2)
    for _ in range(10):
        img, tgt = random_crop(images, target, 8, rng)
        assert img.shape == (4, 8, 8, 8) and tgt.shape == (3, 8, 8, 8)
        # x (5) and z (7) are fully inside the crop, y (20) is cut to 8: 5 * 8 * 7 voxels of data
        assert np.count_nonzero(img[0]) == 5 * 8 * 7
        assert np.count_nonzero(tgt[0]) == 5 * 8 * 7
        xs = np.flatnonzero(img[0].any(axis=(1, 2)))
        assert len(xs) == 5 and np.all(np.diff(xs) == 1)  # data contiguous, zeros around it


def test_random_crop_foreground_centred():
    images = np.ones((1, 40, 40, 40), dtype=np.float32)
    target = np.zeros((40, 40, 40), dtype=np.uint8)
    target[20, 5, 30] = 4
    rng = np.random.default_rng(3)
    for _ in range(10):
        _, tgt = random_crop(images, target, 16, rng, foreground_prob=1.0)
        # centred on the voxel: starts 20 - 8 = 12, 5 - 8 -> clamped to 0, 30 - 8 = 22
        assert tgt[8, 5, 8] == 4
    hits = 0
    draws = 400
    for _ in range(draws):
        _, tgt = random_crop(images, target, 16, rng, foreground_prob=0.5)
        hits += int(tgt.any())
    # a plain random 16^3 window (start 0..24) holds (20, 5, 30) with probability 16/25 * 6/25 * 10/25
    p_random = 16 / 25 * 6 / 25 * 10 / 25
    expected = 0.5 + 0.5 * p_random
    assert abs(hits / draws - expected) < 0.08, (hits / draws, expected)


def test_random_crop_reproducible_and_without_target():
    images = np.random.default_rng(4).random((4, 30, 30, 30)).astype(np.float32)
    a, _ = random_crop(images, None, 12, np.random.default_rng(7))
    b, none = random_crop(images, None, 12, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert none is None


# --------------------------------------------------------------------------------------------- preprocess
@pytest.fixture()
def data_copy(synthetic_root: Path, tmp_path: Path) -> Path:
    """A private copy of two synthetic cases (tests here change source files)."""
    root = tmp_path / "data"
    for case in sorted(p for p in synthetic_root.iterdir() if p.is_dir())[:2]:
        shutil.copytree(case, root / case.name)
    return root


def test_preprocess_case(synthetic_cases):
    case = synthetic_cases[0]
    raw, labels, reference = load_case(case)
    pre = preprocess_case(case, "minmax")
    box = brain_box(raw)
    assert pre.box == box and pre.case_id == case.case_id
    assert pre.images.shape == (4, *box.shape) and pre.images.dtype == np.float32
    assert pre.original_shape == (60, 60, 39) and pre.spacing == (4.0, 4.0, 4.0)
    np.testing.assert_array_equal(pre.affine, reference.affine)
    assert pre.convention.name == "brats2020"
    np.testing.assert_array_equal(uncrop(pre.labels, pre.box, pre.original_shape), labels)
    for channel in range(4):
        np.testing.assert_allclose(pre.images[channel], MinMaxPercentile()(crop(raw[channel], box)), atol=0)
        assert not pre.images[channel][crop(raw[channel], box) == 0].any()  # background stays 0
    # normalization over the full volume equals normalization of the box (all non-zero voxels are inside)
    np.testing.assert_allclose(uncrop(pre.images, box, raw.shape), MinMaxPercentile()(raw), atol=1e-7)
    zs = preprocess_case(case, "zscore")
    np.testing.assert_allclose(zs.images, ZScoreNonzero()(crop(raw, box)), atol=1e-6)


def test_cache_returns_memmap_equal_to_preprocess(data_copy, tmp_path):
    case = find_cases(data_copy)[0]
    cache = CaseCache(tmp_path / "cache", "minmax")
    entry = cache.entry_dir(case)
    assert entry == tmp_path / "cache" / "minmax" / data_root_hash(case) / case.case_id
    assert len(data_root_hash(case)) == 12
    got = cache.get(case)
    assert isinstance(got.images, np.memmap) and isinstance(got.labels, np.memmap)
    ref = preprocess_case(case, "minmax")
    np.testing.assert_array_equal(np.asarray(got.images), ref.images)
    np.testing.assert_array_equal(np.asarray(got.labels), ref.labels)
    assert got.box == ref.box and got.original_shape == ref.original_shape and got.spacing == ref.spacing
    np.testing.assert_array_equal(got.affine, ref.affine)
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["normalization"] == {"name": "minmax", "params": {"low": 1.0, "high": 99.0}}
    assert [Path(s["path"]).name for s in meta["sources"]] == [p.name for p in case.files]
    assert sorted(p.name for p in entry.iterdir()) == ["images.npy", "labels.npy", "meta.json"]
    assert cache.build([case]) == {"built": 0, "reused": 1}


def _created(entry: Path) -> int:
    return (entry / "images.npy").stat().st_ino


def test_cache_rebuilt_when_source_mtime_or_size_changes(data_copy, tmp_path):
    case = find_cases(data_copy)[0]
    cache = CaseCache(tmp_path / "cache", "minmax")
    cache.get(case)
    entry = cache.entry_dir(case)
    first = _created(entry)
    t1 = case.images[0]
    stat = t1.stat()
    os.utime(t1, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touched: same bytes, new mtime
    assert not cache.is_fresh(case)
    cache.get(case)
    second = _created(entry)
    assert second != first and cache.is_fresh(case)
    # same mtime, different size: rewrite t1 with doubled intensities as float32, then restore the mtime
    stat = t1.stat()
    image = nib.load(t1)
    doubled = np.asanyarray(image.dataobj).astype(np.float32) * 2
    nib.Nifti1Image(doubled, image.affine, image.header).to_filename(t1)
    os.utime(t1, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert t1.stat().st_size != stat.st_size and t1.stat().st_mtime_ns == stat.st_mtime_ns
    assert not cache.is_fresh(case)
    got = cache.get(case)
    assert _created(entry) != second
    np.testing.assert_array_equal(np.asarray(got.images), preprocess_case(case, "minmax").images)
    assert not [p for p in entry.parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_cache_rebuilt_when_normalization_differs(data_copy, tmp_path):
    case = find_cases(data_copy)[0]
    minmax = CaseCache(tmp_path / "cache", "A")
    zscore = CaseCache(tmp_path / "cache", "zscore")
    a, b = minmax.get(case), zscore.get(case)
    assert minmax.entry_dir(case) != zscore.entry_dir(case)
    assert float(np.max(a.images)) == 1.0 and float(np.max(b.images)) > 1.0
    # an entry written with other parameters (e.g. an older percentile setting) is stale
    meta_path = minmax.entry_dir(case) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["normalization"]["params"]["low"] = 2.0
    meta_path.write_text(json.dumps(meta))
    assert not minmax.is_fresh(case)
    assert minmax.build([case], workers=1, progress=False) == {"built": 1, "reused": 0}
    assert json.loads(meta_path.read_text())["normalization"]["params"]["low"] == 1.0


def test_cache_new_seg_file_makes_entry_stale(data_copy, tmp_path):
    case = find_cases(data_copy)[0]
    seg = case.seg
    hidden = seg.with_name("hidden.bin")
    seg.rename(hidden)
    unlabeled = find_cases(data_copy)[0]
    cache = CaseCache(tmp_path / "cache", "zscore")
    assert cache.get(unlabeled).labels is None
    hidden.rename(seg)
    labeled = find_cases(data_copy)[0]
    assert not cache.is_fresh(labeled)
    assert cache.get(labeled).labels is not None


def test_cache_corrupt_entry_is_rebuilt(data_copy, tmp_path):
    case = find_cases(data_copy)[0]
    cache = CaseCache(tmp_path / "cache", "minmax")
    cache.get(case)
    images = cache.entry_dir(case) / "images.npy"
    images.write_bytes(images.read_bytes()[:1000])  # truncated array file
    got = cache.get(case)
    np.testing.assert_array_equal(np.asarray(got.images), preprocess_case(case, "minmax").images)


def test_losing_the_rename_race_keeps_the_winner(data_copy, tmp_path):
    case = find_cases(data_copy)[0]
    cache = CaseCache(tmp_path / "cache", "minmax")
    entry = cache.build_one(case)
    winner = _created(entry)
    assert cache.build_one(case) == entry  # a second builder finds a fresh entry in place
    assert _created(entry) == winner
    assert [p.name for p in entry.parent.iterdir()] == [case.case_id]


def _build_in_process(cache_dir: str, data_root: str, barrier) -> None:
    case = find_cases(data_root)[0]
    barrier.wait()
    CaseCache(cache_dir, "minmax").build_one(case)


def test_concurrent_builders_end_with_one_valid_entry(data_copy, tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    args = (str(tmp_path / "cache"), str(data_copy), barrier)
    procs = [context.Process(target=_build_in_process, args=args) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    case = find_cases(data_copy)[0]
    cache = CaseCache(tmp_path / "cache", "minmax")
    assert cache.is_fresh(case)
    assert [p.name for p in cache.entry_dir(case).parent.iterdir()] == [case.case_id]
    np.testing.assert_array_equal(np.asarray(cache.get(case).images), preprocess_case(case, "minmax").images)


def test_parallel_build_and_cli(data_copy, tmp_path, capsys):
    from brats_lightning.cli import main

    cases = find_cases(data_copy)
    cache = CaseCache(tmp_path / "cache", "zscore")
    assert cache.build(cases, workers=2, progress=False) == {"built": 2, "reused": 0}
    assert all(cache.is_fresh(c) for c in cases)
    assert main(["preprocess", str(data_copy), "--pipeline", "B", "--cache", str(tmp_path / "cache"),
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 cases, pipeline B (zscore): built 0, reused 2" in out
    assert main(["preprocess", str(data_copy), "--pipeline", "A", "--cache", str(tmp_path / "cache"),
                 "--workers", "1"]) == 0
    assert "built 2, reused 0" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- compact cache
def test_float16_cache_within_1e3_relative_of_float32(data_copy, tmp_path):
    """Both normalizations of a real-range case (synthetic MRI intensities): float16 values are within 1e-3
    relative of float32 (float16 keeps 11 significant bits: 2^-11 = 4.9e-4) wherever float16 is normal
    (|v| >= 2^-14); the few smaller values (min-max just above the 1st percentile) are within 2^-25."""
    case = find_cases(data_copy)[0]
    for normalization in ("minmax", "zscore"):
        full = CaseCache(tmp_path / "cache", normalization).get(case)
        compact = CaseCache(tmp_path / "cache", normalization, dtype="float16").get(case)
        assert compact.images.dtype == np.float16 and full.images.dtype == np.float32
        exact = np.asarray(full.images, dtype=np.float64)
        error = np.abs(np.asarray(compact.images, dtype=np.float64) - exact)
        normal = np.abs(exact) >= 2.0**-14
        assert normal[exact != 0].mean() > 0.9 and np.ptp(exact) >= 1.0  # a realistic range
        assert np.all(error[normal] <= 1e-3 * np.abs(exact[normal])), normalization
        assert np.all(error[~normal] <= 2.0**-25)
        assert np.array_equal(exact == 0, np.asarray(compact.images) == 0)  # background stays exactly 0
        np.testing.assert_array_equal(np.asarray(compact.labels), np.asarray(full.labels))
        images = CaseCache(tmp_path / "cache", normalization, "float16").entry_dir(case) / "images.npy"
        assert images.stat().st_size < 0.51 * (CaseCache(tmp_path / "cache", normalization).entry_dir(case)
                                               / "images.npy").stat().st_size
    assert CaseCache(tmp_path / "cache", "minmax", "float16").entry_dir(case).parts[-3] == "minmax-float16"
    with pytest.raises(ValueError, match="cache dtype 'bfloat16'"):
        CaseCache(tmp_path / "cache", "minmax", "bfloat16")


def test_entry_of_an_older_layout_is_rebuilt_not_misread(data_copy, tmp_path):
    """An entry written by layout 1 (float32 only, no check record) is rebuilt; so is an entry whose arrays
    disagree with its meta (float16 images under a float32 meta)."""
    case = find_cases(data_copy)[0]
    cache = CaseCache(tmp_path / "cache", "minmax")
    entry = cache.build_one(case)
    meta_path = entry / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format"] == 2 and meta["check"] == "passed" and meta["dtype"] == "float32"
    old = {k: v for k, v in meta.items() if k not in ("check", "dtype")} | {"format": 1}
    meta_path.write_text(json.dumps(old))
    np.save(entry / "images.npy", np.zeros((4, 2, 2, 2), np.float64))  # what an older writer might leave
    assert not cache.is_fresh(case)
    got = cache.get(case)
    np.testing.assert_array_equal(np.asarray(got.images), preprocess_case(case, "minmax").images)
    assert json.loads(meta_path.read_text())["format"] == 2
    np.save(entry / "images.npy", np.asarray(got.images, dtype=np.float16))  # arrays lie about the meta
    got = cache.get(case)
    assert got.images.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(got.images), preprocess_case(case, "minmax").images)


def test_bad_case_gets_no_entry_and_the_rest_are_cached(data_copy, tmp_path):
    from brats_lightning.data.checks import DataProblems

    cases = find_cases(data_copy)
    t1 = cases[1].images[0]
    image = nib.load(t1)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    data[data > 0] = np.nan  # every brain voxel NaN: the percentile would be NaN, the channel cached as 0
    nib.Nifti1Image(data, image.affine).to_filename(t1)  # stored as float32 (the source is integer)
    cache = CaseCache(tmp_path / "cache", "minmax")
    with pytest.raises(DataProblems, match=rf"{cases[1].case_id}  .*t1 holds \d+ non-finite voxels"):
        cache.build(cases, workers=1, progress=False)
    assert cache.is_fresh(cases[0]) and not cache.entry_dir(cases[1]).exists()
