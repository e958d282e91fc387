"""Time the BraTS metrics of one realistic case: Dice, HD95, sensitivity, specificity for ET, TC and WT, and
the BraTS 2023 lesion-wise scores of a case with 10 lesions.

The case: a 240x240x155 grid at 1 mm (BraTS), a tumour about 60 mm across (whole tumour), a ~36 mm core
with an enhancing rim around necrosis, all with irregular (noise-perturbed) borders; the prediction is the
ground truth shifted by (2, -1, 1) voxels with its borders perturbed again. ``case_metrics`` works on the
union bounding box of each region's two masks; the baseline applies the same docs/method.md recipe (erosion,
Euclidean distance transforms) to the whole volume, and both must give the same HD95.

Lesion-wise (``brats_lightning.lesionwise``, brats2023-gli rules): ten tumours of 4-15 mm radius on the same
grid, the prediction moved by a voxel and shrunk, one tumour missed and one false positive added. The
baseline is the official scorer's steps on whole volumes (``tests/test_lesionwise.py``'s brute force); both
must give the same numbers, and the row reports the speed-up.

Usage (from the repository root): ``python -m benchmarks.metrics [--repeats 5] [--baseline-repeats 2]
[--lesion-repeats 3] [--lesion-baseline-repeats 1] [--no-record]``. The timed part runs pinned to one CPU
core where the OS allows it (``os.sched_setaffinity``; the previous affinity is restored afterwards).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from scipy import ndimage

from benchmarks.common import describe_device, finish, make_main
from brats_lightning.data.labels import BRATS2020, BRATS2023, labels_to_regions
from brats_lightning.lesionwise import RULES, lesion_scores
from brats_lightning.metrics import REGION_NAMES, case_metrics

SHAPE = (240, 240, 155)
COLUMNS = ["variant", "case", "median ms", "min ms", "HD95 ET / TC / WT (mm)", "Dice ET / TC / WT",
           "speed-up"]
LESION_TUMOURS: tuple[tuple[tuple[int, int, int], float], ...] = (
    ((60, 60, 40), 15), ((170, 60, 50), 12), ((60, 170, 60), 10), ((170, 170, 90), 14), ((120, 120, 77), 8),
    ((40, 120, 110), 6), ((200, 120, 110), 7), ((120, 40, 120), 5), ((120, 200, 30), 9), ((95, 95, 130), 4),
)
"""(centre, radius in mm) of the lesion-wise case's ground truth tumours."""


def realistic_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ground truth, prediction) label maps, BraTS 2020 codes, on the 240x240x155 grid."""
    rng = np.random.default_rng(seed)
    x, y, z = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]

    def tumour(centre: tuple[int, int, int], noise_seed: int) -> np.ndarray:
        noise = ndimage.gaussian_filter(np.random.default_rng(noise_seed).standard_normal((80, 80, 80)), 3)
        noise = noise / noise.std() * 1.5  # irregular borders: +-1.5 mm (1 sd)
        r = np.sqrt((x - centre[0]) ** 2 + ((y - centre[1]) / 1.1) ** 2 + ((z - centre[2]) / 0.9) ** 2)
        labels = np.zeros(SHAPE, np.uint8)
        box = tuple(slice(c - 40, c + 40) for c in centre)
        rb = r[box] + noise
        labels[box][rb < 30] = 2   # edema: whole tumour ~60 mm across
        labels[box][rb < 18] = 4   # enhancing rim
        labels[box][rb < 12] = 1   # necrosis
        return labels

    gt = tumour((130, 110, 80), int(rng.integers(1 << 30)))
    pred = tumour((132, 109, 81), int(rng.integers(1 << 30)))
    return gt, pred


def lesion_case() -> tuple[np.ndarray, np.ndarray]:
    """(ground truth, prediction) label maps, BraTS 2023 codes (1 NETC, 2 SNFH, 3 ET), 10 GT lesions: the
    prediction moves each tumour by a voxel, misses the 4 mm one and adds a false positive."""
    def paint(labels: np.ndarray, centre: tuple[int, int, int], radius: float) -> None:
        box = tuple(slice(max(c - int(radius) - 1, 0), min(c + int(radius) + 2, n))
                    for c, n in zip(centre, SHAPE, strict=True))
        r = np.sqrt(sum((g - c) ** 2 for g, c in zip(np.ogrid[box], centre, strict=True))) / radius
        labels[box][(r < 1) & (labels[box] == 0)] = 2
        labels[box][r < 0.7] = 3
        labels[box][r < 0.45] = 1

    gt, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    for (x, y, z), radius in LESION_TUMOURS:
        paint(gt, (x, y, z), radius)
        if radius > 4:
            paint(pred, (x + 1, y, z - 1), radius * 0.95)
    paint(pred, (200, 200, 30), 5)
    return gt, pred


def _time(fn: Callable[[], dict[str, float]], repeats: int) -> tuple[list[float], dict[str, float]]:
    times, result = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return times, result


def whole_volume_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """The docs/method.md recipe on the whole volume (the baseline the bounding-box crop must equal)."""
    structure = ndimage.generate_binary_structure(3, 1)
    out = {}
    for i, name in enumerate(REGION_NAMES):
        a, b = pred[i], gt[i]
        sa = a ^ ndimage.binary_erosion(a, structure=structure, border_value=0)
        sb = b ^ ndimage.binary_erosion(b, structure=structure, border_value=0)
        distances = np.concatenate([ndimage.distance_transform_edt(~sb)[sa],
                                    ndimage.distance_transform_edt(~sa)[sb]])
        out[f"hd95_{name}"] = float(np.percentile(distances, 95))
        out[f"dice_{name}"] = 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
    return out


def lesionwise_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of the lesion-wise scorer (bounding boxes) and of the whole-volume baseline (same numbers)."""
    from tests.test_lesionwise import brute_force

    gt_labels, pred_labels = lesion_case()
    gt, pred = labels_to_regions(gt_labels, BRATS2023), labels_to_regions(pred_labels, BRATS2023)
    rules, spacing = RULES["brats2023-gli"], (1.0, 1.0, 1.0)

    def scorer(score: Callable) -> Callable[[], dict[str, float]]:
        def scores() -> dict[str, float]:
            out = {}
            for i, region in enumerate(REGION_NAMES):
                result = score(pred[i], gt[i], spacing, rules)
                out.update({f"hd95_{region}": result.hd95, f"dice_{region}": result.dice,
                            f"lesions_{region}": (result.tp, result.fp, result.fn)})
            return out
        return scores

    case = f"{'x'.join(map(str, SHAPE))}, {len(LESION_TUMOURS)} GT lesions, brats2023-gli, 1 core"
    variants = [("lesion-wise (bounding boxes)", scorer(lesion_scores), args.lesion_repeats),
                ("lesion-wise whole volume (baseline)", scorer(brute_force), args.lesion_baseline_repeats)]
    rows, results = [], {}
    for name, fn, repeats in variants:
        if repeats < 1:
            continue
        times, results[name] = _time(fn, repeats)
        result = results[name]
        rows.append({"variant": name, "case": case, "median ms": round(statistics.median(times)),
                     "min ms": round(min(times)),
                     "HD95 ET / TC / WT (mm)": " / ".join(f"{result[f'hd95_{r}']:.3f}" for r in REGION_NAMES),
                     "Dice ET / TC / WT": " / ".join(f"{result[f'dice_{r}']:.4f}" for r in REGION_NAMES)})
    if len(results) == 2:
        ours, baseline = results.values()
        for key, value in baseline.items():
            same = value == ours[key] if key.startswith("lesions") else abs(value - ours[key]) <= 1e-9
            if not same:
                raise SystemExit(f"metrics benchmark: lesion-wise {key} differs: bounding boxes {ours[key]} "
                                 f"vs whole volume {value}")
        rows[0]["speed-up"] = f"{rows[1]['median ms'] / max(rows[0]['median ms'], 1):.1f} x"
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-repeats", type=int, default=2,
                        help="repeats of the whole-volume baseline (0: skip it and its HD95 check)")
    parser.add_argument("--lesion-repeats", type=int, default=3, help="repeats of the lesion-wise scorer")
    parser.add_argument("--lesion-baseline-repeats", type=int, default=1,
                        help="repeats of the whole-volume lesion-wise baseline (0: skip it and its check)")
    parser.add_argument("--no-pin", action="store_true", help="don't pin the process to one CPU core")
    parser.add_argument("--no-record", action="store_true", help="print only; no JSON, no RESULTS.md row")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    return args


@contextlib.contextmanager
def one_core(enabled: bool = True) -> Iterator[int | None]:
    """Pin this process to one CPU core while the block runs (restoring the previous affinity after)."""
    if not enabled or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    previous = os.sched_getaffinity(0)
    pinned = min(previous)
    os.sched_setaffinity(0, {pinned})
    try:
        yield pinned
    finally:
        os.sched_setaffinity(0, previous)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time the variants, check the HD95 against the baseline, print and record; return the rows."""
    gt_labels, pred_labels = realistic_case()
    gt, pred = labels_to_regions(gt_labels, BRATS2020), labels_to_regions(pred_labels, BRATS2020)
    wt_extent = [int(s.stop - s.start) for s in ndimage.find_objects(gt[2].astype(np.uint8))[0]]

    def triple(result: dict[str, float], key: str, fmt: str) -> str:
        return " / ".join(format(result[f"{key}_{r}"], fmt) for r in REGION_NAMES)

    rows = []
    variants = [("case_metrics (bounding box)", lambda: case_metrics(pred, gt), args.repeats),
                ("case_metrics, hd95=False", lambda: case_metrics(pred, gt, hd95=False), args.repeats),
                ("whole volume (baseline)", lambda: whole_volume_metrics(pred, gt), args.baseline_repeats)]
    results = {}
    with one_core(not args.no_pin) as pinned:
        for name, fn, repeats in variants:
            if repeats < 1:
                continue
            times, result = _time(fn, repeats)
            results[name] = result
            hd = triple(result, "hd95", ".3f") if "hd95_et" in result else "-"
            case = f"{'x'.join(map(str, SHAPE))}, WT {'x'.join(map(str, wt_extent))} vox, 1 core"
            rows.append({"variant": name, "case": case, "median ms": round(statistics.median(times)),
                         "min ms": round(min(times)), "HD95 ET / TC / WT (mm)": hd,
                         "Dice ET / TC / WT": triple(result, "dice", ".4f")})
    ours, baseline = results["case_metrics (bounding box)"], results.get("whole volume (baseline)", {})
    for key in baseline:
        if abs(ours[key] - baseline[key]) > 1e-9:
            raise SystemExit(f"metrics benchmark: {key} differs: bounding box {ours[key]} vs whole volume "
                             f"{baseline[key]}")
    if baseline:
        rows[0]["speed-up"] = f"{rows[-1]['median ms'] / max(rows[0]['median ms'], 1):.1f} x"
    with one_core(not args.no_pin):
        rows += lesionwise_rows(args)
    info = describe_device("cpu")
    info["pinned_cpu"] = pinned
    checked = "HD95 identical to the baseline" if baseline else "baseline skipped"
    checked += "; lesion-wise: " + ("same numbers as the whole-volume baseline" if len(rows) > 3 and rows[-1][
        "variant"].endswith("(baseline)") else "baseline skipped")
    note = (f"one case {SHAPE}, whole tumour extent {wt_extent} voxels (1 mm), prediction = perturbed ground "
            f"truth; {'pinned to CPU ' + str(pinned) if pinned is not None else 'not pinned'}; "
            f"{args.repeats} repeats (baseline {args.baseline_repeats}); {checked}")
    finish("metrics", info, {**vars(args), "wt_extent_voxels": wt_extent}, COLUMNS, rows,
           f"BraTS metrics, one case: {note}", args.no_record)
    return rows


main = make_main(parse_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
