"""Time one 128^3 training sample from the raw .nii.gz files vs from the preprocessed cache.

One synthetic BraTS case at 1 mm (240x240x155, int16 images as BraTS ships them) is written to a temporary
folder. A training sample is what the datamodule hands to the model (docs/method.md "Preprocessing"): the four
modalities normalized (pipeline A, 1-99 percentile min-max, unless ``--normalization zscore``), cropped to
the brain box, and a random 128^3 crop of images and labels.

- raw: ``load_case`` (decompress 5 files) + ``brain_box`` + crop + normalize + ``random_crop``;
- cache: ``CaseCache.get`` (freshness check: stat of the 5 sources + meta.json; memory-map the .npy
  arrays) + ``random_crop`` (reads only the crop's voxels).

Both paths get the same generator seed per repeat and must give identical crops. The one-time cost of
building the entry is reported too. Files are in the OS page cache after the first repeat in both paths,
as during training.

Usage (from the repository root): ``python -m benchmarks.cache [--repeats 7] [--spacing 1] [--size 128]
[--no-record]`` (``--spacing 4 --size 32`` takes seconds: tests).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import describe_device, finish, make_main
from brats_lightning.data.io import load_case
from brats_lightning.data.layout import find_cases
from brats_lightning.data.normalize import get_normalization
from brats_lightning.data.preprocess import CaseCache, brain_box, crop, random_crop
from brats_lightning.data.synthetic import write_case

COLUMNS = ["variant", "case", "median ms", "min ms", "speed-up vs raw"]


def _time(fn: Callable[[int], tuple[np.ndarray, np.ndarray]], repeats: int) -> tuple[list[float], list]:
    times, outputs = [], []
    for repeat in range(repeats):
        start = time.perf_counter()
        outputs.append(fn(repeat))
        times.append(time.perf_counter() - start)
    return times, outputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="samples timed per variant (default 7)")
    parser.add_argument("--size", type=int, default=128, help="crop side (default 128, the paper's)")
    parser.add_argument("--normalization", default="minmax", choices=["minmax", "zscore"])
    parser.add_argument("--seed", type=int, default=0, help="synthetic data set seed")
    parser.add_argument("--spacing", type=float, default=1.0,
                        help="synthetic voxel size in mm (default 1: BraTS's 240x240x155 grid)")
    parser.add_argument("--no-record", action="store_true", help="don't write JSON / RESULTS.md")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    return args


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    """Time raw vs cached training samples; print and record the table; return its rows."""
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        root = Path(tmp) / "data"
        write_case(root, 1, seed=args.seed, spacing=args.spacing, year=2020)
        (case,) = find_cases(root, require_labels=True)
        norm = get_normalization(args.normalization)

        def raw_sample(repeat: int) -> tuple[np.ndarray, np.ndarray]:
            images, labels, _ = load_case(case)
            box = brain_box(images)
            normalized = norm(np.ascontiguousarray(crop(images, box)))
            return random_crop(normalized, crop(labels, box), args.size, np.random.default_rng(repeat))

        cache = CaseCache(Path(tmp) / "cache", args.normalization)
        start = time.perf_counter()
        cache.build([case], workers=1, progress=False)
        build_ms = (time.perf_counter() - start) * 1000

        def cached_sample(repeat: int) -> tuple[np.ndarray, np.ndarray]:
            pre = cache.get(case)
            return random_crop(pre.images, pre.labels, args.size, np.random.default_rng(repeat))

        raw_times, raw_out = _time(raw_sample, args.repeats)
        cache_times, cache_out = _time(cached_sample, args.repeats)
        for (a_img, a_lab), (b_img, b_lab) in zip(raw_out, cache_out, strict=True):
            if not (np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)):
                raise AssertionError("raw and cached samples differ: the cache is wrong")
        pre = cache.get(case)
        box = "x".join(map(str, pre.box.shape))
        sizes_mb = sum(p.stat().st_size for p in case.files) / 1e6
        cache_mb = sum(p.stat().st_size for p in cache.entry_dir(case).iterdir()) / 1e6

    raw_med, cache_med = statistics.median(raw_times) * 1000, statistics.median(cache_times) * 1000
    grid = "x".join(map(str, pre.original_shape))
    description = (f"{grid} int16, box {box}, {args.size}^3 crop, {args.normalization}; "
                   f"{sizes_mb:.1f} MB .nii.gz -> {cache_mb:.1f} MB .npy; load avg {os.getloadavg()[0]:.1f}")
    rows = [
        {"variant": "raw .nii.gz: load + normalize + crop", "case": description,
         "median ms": round(raw_med, 1), "min ms": round(min(raw_times) * 1000, 1),
         "speed-up vs raw": "1.0x"},
        {"variant": "cache: memmap .npy + crop", "case": description, "median ms": round(cache_med, 2),
         "min ms": round(min(cache_times) * 1000, 2), "speed-up vs raw": f"{raw_med / cache_med:.0f}x"},
        {"variant": "cache build (once per case)", "case": description, "median ms": round(build_ms),
         "min ms": "-", "speed-up vs raw": "-"},
    ]
    finish("cache", describe_device("cpu"), vars(args), COLUMNS, rows, "one training sample", args.no_record)
    return rows


main = make_main(parse_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
