"""Training-data throughput: cache read + random crop + regions + batch augmentation, per worker count.

The real training input path: ``BratsDataModule`` (memory-mapped preprocessed cache, fold 0's training
cases) -> its ``train_dataloader()`` (``CropDataset``: random crop of the brain box, label map -> ET/TC/WT
regions; ``collate_cases``; pinned memory on CUDA) -> copy to the device -> the pipeline's ``BatchAugment``
(what ``BratsModule.on_after_batch_transfer`` applies), GPU synchronized. Reported: samples per second once
the workers run (the first batch, which waits for worker start-up, is timed separately). Epochs follow one
another as in training (persistent workers). The issue's target: with 8 workers, at least twice the GPU's
training-step rate (benchmarks/run_all.py compares the two).

Usage (from the repository root):

    python -m benchmarks.data_loader              # CPU: 10 synthetic cases at 2 mm, 64^3 crops, 0/1/2 workers
    python -m benchmarks.data_loader --paper      # CUDA: 10 cases at 1 mm (240x240x155), 128^3, 8 workers
    python -m benchmarks.data_loader --paper --data /path/to/MICCAI_BraTS2020_TrainingData
    python -m benchmarks.data_loader --tiny       # seconds (tests)

Synthetic cases are generated into a temporary folder (``--work DIR`` keeps data and cache for reruns).
"""

from __future__ import annotations

import argparse
import gc
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra.utils
import torch

from benchmarks.common import (
    csv_list,
    finish,
    make_main,
    pipeline_config,
    setup,
    sync,
)
from brats_lightning.data.datamodule import BratsDataModule
from brats_lightning.data.synthetic import generate_dataset

log = logging.getLogger("benchmarks.data_loader")

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"device": "cpu", "cases": 10, "spacing": 2.0, "crop": 64, "workers": "0,1,2", "samples": 48,
            "foreground_prob": 0.5},
    "paper": {"device": "cuda", "cases": 10, "spacing": 1.0, "crop": 128, "workers": "8", "samples": 240,
              "foreground_prob": 0.0},
    "tiny": {"device": "cpu", "cases": 5, "spacing": 4.0, "crop": 32, "workers": "0,1", "samples": 8,
             "foreground_prob": 0.5},
}
COLUMNS = ["data", "training cases", "crop", "batch", "pipeline", "workers", "device", "samples", "startup s",
           "samples/s", "ms/sample"]


def prepare_data(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The data set root (``--data``, or synthetic cases generated under ``work``) and a short label."""
    if args.data:
        root = Path(args.data)
        if not root.is_dir():
            raise SystemExit(f"data_loader: --data {root} is not a folder; expected a BraTS training folder")
        return root, root.name
    root = work / f"synthetic-{args.cases}-{args.spacing:g}mm"
    if not root.exists():
        log.info("generating %d synthetic cases at %g mm in %s", args.cases, args.spacing, root)
        tmp = root.with_name(root.name + ".tmp")
        generate_dataset(tmp, args.cases, seed=0, spacing=args.spacing, year=2020, progress=False)
        tmp.rename(root)
    return root, f"synthetic {args.spacing:g} mm"


def measure(datamodule: BratsDataModule, augment: torch.nn.Module | None, device: torch.device,
            samples: int) -> tuple[float, float, int]:
    """Iterate the training loader (epoch after epoch) until ``samples`` samples after the first batch.

    Returns:
        (start-up seconds: the first batch, seconds for the following batches, samples in them).
    """
    loader = datamodule.train_dataloader()
    start = time.perf_counter()
    first = True
    done, startup, t0 = 0, 0.0, 0.0
    while done < samples:
        for batch in loader:
            image = batch["image"].to(device, non_blocking=True)
            target = batch["target"].to(device, non_blocking=True)
            if augment is not None:
                image, target = augment(image, target.float())
            sync(device)
            if first:
                first = False
                startup = time.perf_counter() - start
                t0 = time.perf_counter()
                continue
            done += image.shape[0]
            if done >= samples:
                break
    elapsed = time.perf_counter() - t0
    del loader
    gc.collect()
    return startup, elapsed, done


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--paper", action="store_true", help="the paper's sizes on CUDA (see the docstring)")
    preset.add_argument("--tiny", action="store_true", help="tiny sizes, seconds (tests)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cpu; --paper: cuda)")
    p.add_argument("--data", help="an existing data set folder (default: synthetic cases)")
    p.add_argument("--work", help="folder for the synthetic cases and the cache (default: temporary)")
    p.add_argument("--cases", type=int, help="synthetic cases to generate")
    p.add_argument("--spacing", type=float, help="synthetic voxel size in mm (1 = BraTS's 240x240x155)")
    p.add_argument("--crop", type=int, help="training crop side")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--pipeline", default="A", choices=["A", "B"],
                   help="normalization and augmentation (default A)")
    p.add_argument("--no-augment", action="store_true", help="leave out the batch augmentation")
    p.add_argument("--foreground-prob", type=float, help="probability of a tumour-centred crop")
    p.add_argument("--workers", help="comma list of DataLoader worker counts")
    p.add_argument("--samples", type=int, help="samples timed per worker count (after the first batch)")
    p.add_argument("--no-record", action="store_true", help="print only: no JSON, no RESULTS.md row")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    for key, value in PRESETS["paper" if args.paper else "tiny" if args.tiny else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.workers = csv_list(args.workers, None, "workers", int)
    return args


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the benchmark described by parsed ``args``; print and record the table; return its rows."""
    device, info = setup(args)
    pipeline = pipeline_config(args.pipeline)
    augment = None
    if not args.no_augment and pipeline.get("augment"):
        augment = hydra.utils.instantiate(pipeline["augment"]).to(device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        root, label = prepare_data(args, work)
        for workers in args.workers:
            datamodule = BratsDataModule(
                root, fold=0, normalization=pipeline["normalization"], batch_size=args.batch,
                cache_dir=work / "cache", crop_size=args.crop, foreground_prob=args.foreground_prob,
                num_workers=workers, check=False, name="bench")
            datamodule.prepare_data()  # builds the cache once (reused by the next worker counts)
            datamodule.setup("fit")
            log.info("workers=%d: %d training cases", workers, len(datamodule.train_cases))
            torch.manual_seed(0)
            startup, elapsed, done = measure(datamodule, augment, device, args.samples)
            rows.append({"data": label, "training cases": len(datamodule.train_cases), "crop": args.crop,
                         "batch": args.batch, "pipeline": args.pipeline + ("" if augment else " (no aug)"),
                         "workers": workers, "device": str(device), "samples": done,
                         "startup s": round(startup, 2), "samples/s": round(done / elapsed, 1),
                         "ms/sample": round(elapsed / done * 1e3, 1)})
    title = f"training data throughput: BratsDataModule.train_dataloader() + BatchAugment ({info['label']})"
    finish("data_loader", info, vars(args), COLUMNS, rows, title, args.no_record)
    return rows


main = make_main(parse_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
