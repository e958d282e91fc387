"""Time one 128^3 training sample from the raw .nii.gz files vs from the preprocessed cache.

One synthetic BraTS case at 1 mm (240x240x155, int16 images as BraTS ships them) is written to a temporary
folder. A training sample is what the datamodule hands to the model (SPEC.md "Preprocessing"): the four
modalities normalized (pipeline A, 1-99 percentile min-max, unless ``--normalization zscore``), cropped to
the brain box, and a random 128^3 crop of images and labels.

- raw: ``load_case`` (decompress 5 files) + ``brain_box`` + crop + normalize + ``random_crop``;
- cache: ``CaseCache.get`` (freshness check: stat of the 5 sources + meta.json; memory-map the .npy
  arrays) + ``random_crop`` (reads only the crop's voxels).

Both paths get the same generator seed per repeat and must give identical crops. The one-time cost of
building the entry is reported too. Files are in the OS page cache after the first repeat in both paths,
as during training.

Usage (from the repository root): ``python -m benchmarks.cache [--repeats 7] [--no-record]``.
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
from rich.console import Console
from rich.table import Table

from benchmarks.common import describe_device, record
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="samples timed per variant (default 7)")
    parser.add_argument("--size", type=int, default=128, help="crop side (default 128, the paper's)")
    parser.add_argument("--normalization", default="minmax", choices=["minmax", "zscore"])
    parser.add_argument("--seed", type=int, default=0, help="synthetic data set seed")
    parser.add_argument("--no-record", action="store_true", help="don't write JSON / RESULTS.md")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        root = Path(tmp) / "data"
        write_case(root, 1, seed=args.seed, spacing=1.0, year=2020)
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
    description = (f"240x240x155 int16, box {box}, {args.size}^3 crop, {args.normalization}; "
                   f"{sizes_mb:.1f} MB .nii.gz -> {cache_mb:.1f} MB .npy; load avg {os.getloadavg()[0]:.1f}")
    rows = [
        ["raw .nii.gz: load + normalize + crop", description, f"{raw_med:.1f}",
         f"{min(raw_times) * 1000:.1f}", "1.0x"],
        ["cache: memmap .npy + crop", description, f"{cache_med:.2f}", f"{min(cache_times) * 1000:.2f}",
         f"{raw_med / cache_med:.0f}x"],
        ["cache build (once per case)", description, f"{build_ms:.0f}", "-", "-"],
    ]
    table = Table(title="one training sample")
    for column in COLUMNS:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if not args.no_record:
        info = describe_device("cpu")
        json_path, md_path = record("cache", info, vars(args), COLUMNS, rows)
        Console().print(f"recorded {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
