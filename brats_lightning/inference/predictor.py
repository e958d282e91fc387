"""Ensemble inference over trained runs (paper section 2.6 "First step"; docs/method.md Inference).

For each case: preprocess with the runs' normalization, crop to the brain box, zero-pad each side to a
multiple of 8, run every model on the 16 TTA views, average the sigmoid probabilities over views and
models, unpad, threshold at 0.5 per region, rebuild the label map (ET -> et; TC and not ET -> 1; WT and
not TC -> 2), paste it back into the original grid and save it with the input's affine and header as
``<CASE>.nii.gz`` (BraTS submission name). The averaged probabilities are kept as ``<CASE>_probs.npz``
(float16, cropped to the brain box, with the box and the original shape) for later ensembling.

Command line::

    brats-lightning predict --runs OUTPUTS --data DIR --out DIR [--pipeline A|B] [--model-name NAME]
        [--select all|best2] [--tta all|flips|none] [--view-batch N] [--oof] [--device cpu|cuda|auto]
        [--et-threshold T] [--uncertainty]
    brats-lightning predict --model model.zip --data DIR --out DIR [--device ...] [--keep-pipelines]

``--model`` predicts from a model package (``brats-lightning export``; :mod:`brats_lightning.package`).

``--oof`` predicts each case only with the runs that held it out for validation (their run.json
``val_cases``), giving cross-validation predictions for the whole training set.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from brats_lightning.errors import UserError
from brats_lightning.inference.tta import get_views, iter_view_probabilities
from brats_lightning.inference.uncertainty import UNCERTAINTY_KINDS, RunningStats, uncertainty_maps
from brats_lightning.memory import check_inference_fits
from brats_lightning.precision import resolve_amp_dtype, resolve_device
from brats_lightning.runs import Run, check_compatible, find_runs, load_network, select_runs
from brats_lightning.speed import InferenceNet, inference_plan

if TYPE_CHECKING:
    from brats_lightning.package import ModelPackage

log = logging.getLogger(__name__)

THRESHOLD = 0.5
"""Per-region probability threshold (paper section 2.6)."""

PAD_MULTIPLE = 8
"""Input sides must be multiples of 8: the network pools three times (docs/method.md Network)."""


@dataclass
class PredictOptions:
    """How to predict; the defaults are those of ``conf/predict.yaml`` (a test keeps them equal).

    Attributes:
        tta: view set, "all" (the 16 distinct views), "flips" (8) or "none".
        view_batch_size: views per network call.
        device: "auto" (CUDA when available), "cpu" or "cuda[:k]".
        precision: autocast: "auto" (fp16 on CUDA, bf16 on a CPU with native bf16, else fp32), "fp32", "bf16",
            "fp16".
        checkpoint: which checkpoint of each run: "auto" (swa, else best, else last), "best", "last", "swa".
        et_threshold: ET post-processing (:mod:`postprocess`): ET smaller than this many voxels -> NCR/NET;
            null = off (the paper).
        uncertainty: also write the BraTS 2020 uncertainty maps (:mod:`uncertainty`).
        uncertainty_kind: "entropy" or "std".
        save_probabilities: write ``<CASE>_probs.npz``.
    """

    tta: str = "all"
    view_batch_size: int = 4
    device: str = "auto"
    precision: str = "auto"
    checkpoint: str = "auto"
    et_threshold: int | None = None
    uncertainty: bool = False
    uncertainty_kind: str = "entropy"
    save_probabilities: bool = True

    @classmethod
    def from_mapping(cls, mapping: dict) -> PredictOptions:
        """Build from a dict (e.g. a Hydra config node), refusing unknown keys."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - names)
        if unknown:
            raise ValueError(f"unknown prediction options {unknown}; expected some of {sorted(names)}")
        return cls(**dict(mapping))


def channel_indices(channels: Sequence[str]) -> list[int]:
    """Positions of the runs' input ``channels`` in the preprocessed case (MODALITIES order)."""
    from brats_lightning.data.layout import MODALITIES

    unknown = [c for c in channels if c not in MODALITIES]
    if unknown:
        raise ValueError(f"runs use input channels {list(channels)}; {unknown} not among {list(MODALITIES)}")
    return [MODALITIES.index(c) for c in channels]


def case_members(runs: Sequence[Run], case_ids: Sequence[str], oof: bool) -> dict[str, tuple[int, ...]]:
    """For each case, the indices (into ``runs``) of the runs that predict it.

    Without ``oof`` every run predicts every case; with ``oof`` only the runs whose run.json ``val_cases``
    list the case (the models that never trained on it).

    Raises:
        ValueError: in out-of-fold mode, cases that no run held out (named in the message).
    """
    if not oof:
        return {case_id: tuple(range(len(runs))) for case_id in case_ids}
    members = {case_id: tuple(i for i, run in enumerate(runs) if case_id in run.val_cases)
               for case_id in case_ids}
    orphans = [case_id for case_id, chosen in members.items() if not chosen]
    if orphans:
        raise ValueError(
            f"--oof: no selected run held out these cases for validation: {orphans}. Out-of-fold prediction "
            f"needs every case in some run's val_cases (runs: {[r.name for r in runs]}); predict the "
            "training set of those runs, or drop --oof."
        )
    return members


def predict_probabilities(
    images: np.ndarray,
    nets: Sequence[torch.nn.Module],
    views: Sequence,
    view_batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    track_spread: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Mean sigmoid probabilities of ``nets`` x ``views`` on one preprocessed, box-cropped case.

    Args:
        images: float32 (C, X, Y, Z) normalized and cropped to the brain box.
        nets: networks in eval mode on ``device``.
        views: TTA views.
        view_batch_size: views per network call.
        device: where to compute.
        amp_dtype: autocast dtype or None.
        track_spread: also return the members' standard deviation.

    Returns:
        (mean (3, X, Y, Z) float32, std or None, number of members), on the unpadded box.
    """
    from brats_lightning.data.preprocess import pad_to_multiple, unpad

    padded, inner = pad_to_multiple(np.ascontiguousarray(images, dtype=np.float32), PAD_MULTIPLE)
    tensor = torch.from_numpy(padded)[None].to(device)
    stats = RunningStats()
    with torch.inference_mode():
        for net in nets:
            for probs in iter_view_probabilities(net, tensor, views, view_batch_size, amp_dtype):
                stats.add(probs, track_spread=track_spread)
        mean = unpad(stats.mean(), inner).cpu().numpy()
        std = unpad(stats.std(), inner).cpu().numpy() if track_spread else None
    return np.ascontiguousarray(mean), None if std is None else np.ascontiguousarray(std), stats.count


def save_probabilities(path: Path, probs: np.ndarray, box, original_shape: Sequence[int], members: int
                       ) -> Path:
    """Write ``<CASE>_probs.npz``: float16 probabilities on the brain box, plus the box and original shape."""
    from brats_lightning.data.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(
            handle, probs=probs.astype(np.float16), regions=np.array(["ET", "TC", "WT"]),
            box_start=np.array(box.start), box_stop=np.array(box.stop),
            original_shape=np.array(original_shape), members=np.array(members),
        )
    return path


def load_probabilities(path: str | Path) -> tuple[np.ndarray, object, tuple[int, int, int]]:
    """Read a ``<CASE>_probs.npz``: (probabilities float32 (3, *box.shape), Box, original shape)."""
    from brats_lightning.data.preprocess import Box

    with np.load(path) as data:
        box = Box(tuple(data["box_start"].tolist()), tuple(data["box_stop"].tolist()))
        return data["probs"].astype(np.float32), box, tuple(int(s) for s in data["original_shape"])


class Predictor:
    """Predict cases with an ensemble of runs that share normalization, label convention and channels.

    Args:
        runs: the ensemble (see :func:`brats_lightning.runs.select_runs`).
        options: prediction options.
    """

    def __init__(self, runs: Sequence[Run], options: PredictOptions | None = None) -> None:
        check_compatible(runs)
        self.runs = list(runs)
        self.options = options or PredictOptions()
        from brats_lightning.data.labels import get_convention

        self.convention = get_convention(self.runs[0].label_convention)
        self.normalization = self.runs[0].normalization
        self.channels = channel_indices(self.runs[0].channels)
        self.views = get_views(self.options.tta)
        self.device = resolve_device(self.options.device)
        self.amp_dtype = resolve_amp_dtype(self.device, self.options.precision)
        self.speed = inference_plan(self.device.type, self.amp_dtype)  # per CPU kind and precision
        if self.options.uncertainty_kind not in UNCERTAINTY_KINDS:
            raise ValueError(
                f"uncertainty_kind={self.options.uncertainty_kind!r}; expected one of {UNCERTAINTY_KINDS}")
        # where the networks come from: the runs' checkpoints, or a model package (from_package)
        self.load_net: Callable[..., torch.nn.Module] = partial(load_network,
                                                                checkpoint=self.options.checkpoint)

    @classmethod
    def from_package(cls, package: ModelPackage, pipeline: str, options: PredictOptions | None = None
                     ) -> Predictor:
        """Predict with one pipeline's networks of a model package (brats_lightning/package.py) instead of
        run folders: same ensemble order, same label maps."""
        predictor = cls(package.runs(pipeline), options)
        predictor.load_net = package.load_network
        return predictor

    def predict_case(self, case, nets: Sequence[torch.nn.Module], out_dir: Path) -> dict:
        """Predict one case with ``nets`` and write its files; returns a small record (paths, timing)."""
        from brats_lightning.data.io import load_image, save_label_map, save_volume
        from brats_lightning.data.labels import regions_to_labels
        from brats_lightning.data.preprocess import preprocess_case, uncrop
        from brats_lightning.inference.postprocess import apply_et_threshold
        from brats_lightning.inference.uncertainty import uncertainty_paths

        start = time.perf_counter()
        pre = preprocess_case(case, self.normalization)
        images = pre.images[self.channels]
        check_inference_fits([r.info["model_config"] for r in self.runs], pre.box.shape,  # refuse, not OOM
                             min(self.options.view_batch_size, len(self.views)), self.amp_dtype, self.device,
                             case.case_id)
        want_std = self.options.uncertainty and self.options.uncertainty_kind == "std"
        mean, std, members = predict_probabilities(
            images, nets, self.views, self.options.view_batch_size, self.device, self.amp_dtype, want_std)
        labels = regions_to_labels(mean > THRESHOLD, self.convention)
        labels = apply_et_threshold(labels, self.options.et_threshold, self.convention)
        reference = load_image(case.images[0])
        label_path = save_label_map(uncrop(labels, pre.box, pre.original_shape), reference,
                                    out_dir / f"{case.case_id}.nii.gz")
        record = {"case": case.case_id, "labels": str(label_path), "members": members}
        if self.options.save_probabilities:
            record["probs"] = str(save_probabilities(out_dir / f"{case.case_id}_probs.npz", mean, pre.box,
                                                     pre.original_shape, members))
        if self.options.uncertainty:
            maps = uncertainty_maps(mean, std, self.options.uncertainty_kind)
            for i, (region, path) in enumerate(uncertainty_paths(out_dir, case.case_id).items()):
                save_volume(uncrop(maps[i], pre.box, pre.original_shape), reference, path, np.uint8)
                record[f"unc_{region}"] = str(path)
        record["seconds"] = time.perf_counter() - start
        return record

    def predict(self, cases: Sequence, out_dir: str | Path, oof: bool = False) -> list[dict]:
        """Predict ``cases`` (from ``find_cases``) into ``out_dir``, one case in memory at a time.

        Every image is checked first and every problem listed before anything is written
        (:func:`checked_images`). The folder is locked (:mod:`brats_lightning.locks`), marked incomplete
        before the first label map, and its complete prediction.json is written last; cases that an
        interrupted run with the same settings finished are not predicted again. Cases are grouped by the
        runs that predict them, so each group's networks are loaded once.

        Returns:
            One record per case predicted now.
        """
        from brats_lightning.locks import hold_folder
        from brats_lightning.predictions import mark_incomplete, read_manifest, write_manifest

        out_dir = Path(out_dir)
        cases = checked_images(cases, out_dir)
        members = case_members(self.runs, [c.case_id for c in cases], oof)
        settings = {
            "label_convention": self.convention.name, "normalization": self.normalization,
            "pipelines": sorted({r.pipeline for r in self.runs}), "runs": [str(r.path) for r in self.runs],
            "oof": oof, "options": asdict(self.options), "n_views": len(self.views),
            "et_threshold": self.options.et_threshold,
        }
        with hold_folder(out_dir, "predict"):
            previous = read_manifest(out_dir) or {}
            if previous.get("label_convention") not in (None, self.convention.name):
                raise UserError(
                    f"{out_dir} already holds {previous['label_convention']} predictions; these runs predict "
                    f"{self.convention.name}: choose another --out folder")
            same = all(previous.get(k) == v for k, v in settings.items())
            if previous.get("cases") and not same:
                log.warning("%s: its %d earlier case(s) were predicted with other settings; the new manifest "
                            "lists only this run's cases", out_dir, len(previous["cases"]))
            kept = {c for c in previous.get("cases", []) if same and (out_dir / f"{c}.nii.gz").is_file()}
            resumed = kept if previous.get("complete") is False else set()
            seconds = {c: t for c, t in previous.get("seconds_per_case", {}).items() if c in kept}
            case_runs = {c: r for c, r in previous.get("case_runs", {}).items() if c in kept}

            def manifest(complete: bool) -> dict:
                return {**settings, "cases": sorted(kept), "seconds_per_case": seconds,
                        "case_runs": case_runs, "complete": complete}

            def finished(record: dict) -> None:  # the incomplete manifest lists every finished case
                kept.add(record["case"])
                seconds[record["case"]] = round(record["seconds"], 3)
                case_runs[record["case"]] = record["runs"]
                mark_incomplete(out_dir, "predict", **manifest(False))

            mark_incomplete(out_dir, "predict", **manifest(False))
            records = self._predict_cases([c for c in cases if c.case_id not in resumed], members, out_dir,
                                          finished)
            write_manifest(out_dir, {"kind": "predict", **manifest(True)})
        if resumed:
            log.info("%d case(s) were finished by an interrupted run with the same settings; kept",
                     len(resumed))
        return records

    def _predict_cases(self, cases: Sequence, members: dict[str, tuple[int, ...]], out_dir: Path,
                       on_done: Callable[[dict], object]) -> list[dict]:
        """Predict ``cases`` group by group (networks loaded once per group); ``on_done(record)`` per case."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        groups: dict[tuple[int, ...], list] = {}
        for case in cases:
            groups.setdefault(members[case.case_id], []).append(case)
        records = []
        log.info("predicting %d case(s) with %d run(s) x %d view(s) on %s (%s, %s)", len(cases),
                 len(self.runs), len(self.views), self.device, self.amp_dtype or "fp32",
                 self.speed.memory_format)
        columns = (TextColumn("predict {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task("", total=len(cases))
            for group, group_cases in groups.items():
                nets = [InferenceNet(self.load_net(self.runs[i], device=self.device),
                                     self.speed) for i in group]
                for case in group_cases:
                    progress.update(task, description=case.case_id)
                    record = self.predict_case(case, nets, out_dir)
                    record["runs"] = [self.runs[i].name for i in group]
                    records.append(record)
                    on_done(record)
                    log.info("%s: %d member(s), %.1f s", case.case_id, record["members"], record["seconds"])
                    progress.advance(task)
                del nets
                gc.collect()
        return records


def checked_images(cases: Sequence, where: str | Path, problems: Sequence = ()) -> list:
    """``cases`` without their seg files (predict reads the images only), once every image passed the checks
    of ``check-data`` (:func:`brats_lightning.data.checks.check_cases`).

    Raises:
        DataProblems: every problem of every case (and the given ``problems``), before anything is written.
    """
    import dataclasses

    from brats_lightning.data.checks import DataProblems, check_cases
    from brats_lightning.data.preprocess import default_workers

    cases = [dataclasses.replace(c, seg=None) for c in cases]
    # a process pool starts in seconds: worth it for a data set, not for a few cases
    workers = default_workers() if len(cases) > 8 else 1
    problems = [*problems, *check_cases(cases, workers=workers)]
    if problems:
        raise DataProblems(sorted(problems, key=lambda p: (p.case, p.file)), f"predict into {where}",
                           fix=f"nothing was written to {where}: fix or remove these cases (full report: "
                               "`brats-lightning check-data DATA`), then rerun predict")
    return cases


def predict_folder(
    runs_dir: str | Path,
    data: str | Path,
    out: str | Path,
    pipeline: str | None = None,
    model: str | None = None,
    select: str = "all",
    oof: bool = False,
    options: PredictOptions | None = None,
) -> list[dict]:
    """Find and select runs under ``runs_dir``, then predict every case of ``data`` into ``out``.

    Args:
        runs_dir: training outputs (searched for run.json).
        data: a data set folder or a single case folder (labels not needed).
        out: output folder.
        pipeline: only this pipeline's runs ("A" or "B").
        model: only this model's runs.
        select: "all" or "best<k>" per fold.
        oof: out-of-fold mode.
        options: prediction options.

    Returns:
        One record per case (paths, members, seconds).
    """
    from brats_lightning.data.preprocess import layout_problems

    found = find_runs(runs_dir, pipeline=pipeline, model=model)
    if not found:
        wanted = ", ".join(f"{k}={v}" for k, v in (("pipeline", pipeline), ("model", model)) if v) or "any"
        raise UserError(f"no run.json under {runs_dir} ({wanted}); expected trained runs: train first "
                        "(python train.py ...) or check --runs / --pipeline / --model-name")
    runs = select_runs(found, select)
    log.info("ensemble (%s): %s", select, ", ".join(r.name for r in runs))
    cases, problems = layout_problems(data)
    if problems:  # listed with every image problem of the cases that were found
        checked_images(cases, out, problems)
    return Predictor(runs, options).predict(cases, out, oof=oof)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brats-lightning predict`` (defaults from :class:`PredictOptions` = conf/predict.yaml)."""
    d = PredictOptions()
    parser.add_argument("--runs", type=Path, help="training outputs (holds run.json files)")
    parser.add_argument("--model", type=Path,
                        help="a model package (brats-lightning export) instead of --runs: A, B, merge")
    parser.add_argument("--keep-pipelines", action="store_true",
                        help="with --model: also keep A's and B's own predictions in OUT/pipelines/{A,B}")
    parser.add_argument("--data", required=True, type=Path, help="data set folder or a single case folder")
    parser.add_argument("--out", required=True, type=Path, help="output folder (<CASE>.nii.gz, _probs.npz)")
    parser.add_argument("--pipeline", choices=["A", "B"], help="only this pipeline's runs")
    parser.add_argument("--model-name", help="only this model's runs (run.json 'model')")
    parser.add_argument("--select", help="all (default), or best<k> per fold (paper: A best2, B all)")
    parser.add_argument("--tta", choices=["all", "flips", "none"],
                        help=f"test-time views (default {d.tta}; with --model the package's)")
    parser.add_argument("--view-batch", type=int, default=d.view_batch_size, help="views per network call")
    parser.add_argument("--oof", action="store_true",
                        help="out-of-fold: each case only with the runs that held it out for validation")
    parser.add_argument("--device", default=d.device, help="auto, cpu or cuda[:k]")
    parser.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--checkpoint", choices=["auto", "best", "last", "swa"],
                        help=f"which checkpoint of each run (default {d.checkpoint})")
    parser.add_argument("--et-threshold", type=int, default=d.et_threshold,
                        help="ET smaller than T voxels becomes NCR/NET (off by default; with --model the "
                             "package's, 0 = off)")
    parser.add_argument("--uncertainty", action="store_true", help="write BraTS 2020 uncertainty maps")
    parser.add_argument("--uncertainty-kind", default=d.uncertainty_kind, choices=list(UNCERTAINTY_KINDS))
    parser.add_argument("--no-probs", action="store_true", help="don't write <CASE>_probs.npz")


def run(args: argparse.Namespace) -> int:
    """Run ``brats-lightning predict``."""
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    if args.model is not None:
        from brats_lightning.package import predict_command

        return predict_command(args)
    if args.runs is None:
        raise UserError("predict: give --runs OUTPUTS (a training tree) or --model model.zip (a package)")
    d = PredictOptions()
    options = PredictOptions(
        tta=args.tta or d.tta, view_batch_size=args.view_batch, device=args.device, precision=args.precision,
        checkpoint=args.checkpoint or d.checkpoint, et_threshold=args.et_threshold,
        uncertainty=args.uncertainty, uncertainty_kind=args.uncertainty_kind,
        save_probabilities=not args.no_probs,
    )
    records = predict_folder(args.runs, args.data, args.out, args.pipeline, args.model_name,
                             args.select or "all", args.oof, options)
    seconds = [r["seconds"] for r in records]
    log.info("wrote %d case(s) to %s (%.1f s per case)", len(records), args.out, float(np.mean(seconds)))
    return 0
