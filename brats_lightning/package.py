"""Model packages: a trained ensemble as one portable, pickle-free zip (docs/contracts.md "Model package").

``brats-lightning export`` turns a training tree (run.json files and Lightning checkpoints) into one zip:
for each pipeline the chosen networks' weights as safetensors state dicts, their model configs, the
normalization, channel order, label convention and regions, the TTA view set, the merge rule (paper
section 2.6), the optional ET threshold, the cross-validation scores, a ``MODEL_CARD.md`` and a
``manifest.json`` with the SHA-256 of every member. ``brats-lightning predict --model model.zip`` predicts
from it alone, with the same label maps as ``predict`` / ``ensemble.py`` on the training tree;
``brats-lightning model-info model.zip`` prints the card.

Safety: nothing is unpickled (weights are safetensors, metadata is JSON); every member's hash is checked
before it is used; networks are built only from classes and functions of ``brats_lightning.models`` and
``torch.nn``; a package from a newer format, a missing, extra or altered member, a network config that does
not fit its weights, or a data set that does not match the package is refused with one line
(:class:`PackageError`) before anything is written.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import re
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brats_lightning import __version__
from brats_lightning.errors import UserError
from brats_lightning.runs import Run, check_compatible, find_runs, load_network, select_runs

log = logging.getLogger(__name__)

FORMAT = "brats-lightning-model"
FORMAT_VERSION = 1
"""Version of the package layout; readers refuse packages with a higher one (docs/contracts.md)."""

MANIFEST = "manifest.json"
METADATA = "package.json"
CARD = "MODEL_CARD.md"
MERGE_RULE = "paper-table1"
"""The only merge rule: docs/method.md Inference table (paper section 2.6, "Second step")."""

PIPELINES = ("A", "B")
MEMBER_SUFFIXES = (".json", ".md", ".safetensors")
NETWORK_MODULES = ("brats_lightning.models.", "torch.nn.")
"""Where the ``_target_`` of a packaged model config may point (checked on the resolved object too)."""

TRAINING_KEYS = ("name", "seed", "epochs_trained", "precision", "fingerprint")
"""run.json keys copied into the package as each network's training record (no local paths)."""


class PackageError(UserError):
    """A model package that cannot be used: the message names the package, the member and the fix."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ export
def _member_name(pipeline: str, index: int, run: Run) -> str:
    model = re.sub(r"[^A-Za-z0-9_.-]", "_", run.model)
    return f"{pipeline}/{index:02d}-{model}-fold{run.fold}.safetensors"


def _network_weights(run: Run, checkpoint: str) -> bytes:
    """The run's network state dict (checked against its model config by loading it) as safetensors."""
    from safetensors.torch import save

    net = load_network(run, checkpoint)
    return save({k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()})


def _network_record(run: Run, checkpoint: str, member: str) -> dict[str, Any]:
    training = {k: run.info[k] for k in TRAINING_KEYS if run.info.get(k) is not None}
    training["data"] = (run.info.get("data") or {}).get("name")
    training["n_val_cases"] = len(run.val_cases)
    training["n_excluded"] = len(run.info.get("exclude") or [])
    return {
        "weights": member, "model": run.model, "fold": run.fold,
        "checkpoint": run.checkpoint_name(checkpoint),
        "model_config": run.info["model_config"], "score": run.score,
        "val_metrics": run.info.get("val_metrics"), "val_metrics_swa": run.info.get("val_metrics_swa"),
        "training": training,
    }


def export_package(
    runs_dir: str | Path,
    out: str | Path,
    select: Mapping[str, str] | None = None,
    checkpoint: str = "auto",
    et_threshold: int | None = None,
    tta: str = "all",
) -> Path:
    """Write the model package of the runs under ``runs_dir`` to ``out`` (atomically: a temporary file
    renamed into place).

    Args:
        runs_dir: training outputs (searched for run.json).
        out: the zip to write.
        select: per pipeline, "all", "best<k>" (per fold, :func:`brats_lightning.runs.select_runs`) or "none";
            default the paper's ``{"A": "best2", "B": "all"}`` (section 2.6). A pipeline without runs is
            left out (with a log line) unless every pipeline is.
        checkpoint: which checkpoint of each run ("auto": swa, else best, else last).
        et_threshold: ET post-processing threshold in voxels stored for predict (None: off, the paper).
        tta: TTA view set predict uses ("all": the paper's 16 views, "flips", "none").

    Returns:
        ``out``.
    """
    from brats_lightning.data.io import atomic_path
    from brats_lightning.data.labels import get_convention
    from brats_lightning.inference.tta import get_views

    select = dict(select or {"A": "best2", "B": "all"})
    get_views(tta)  # refuse an unknown view set before any work
    pipelines: dict[str, dict[str, Any]] = {}
    weights: dict[str, bytes] = {}
    for pipeline in PIPELINES:
        rule = select.get(pipeline, "none")
        if rule == "none":
            continue
        found = find_runs(runs_dir, pipeline=pipeline)
        if not found:
            log.info("export: no pipeline %s runs under %s; the package leaves it out", pipeline, runs_dir)
            continue
        chosen = select_runs(found, rule)
        check_compatible(chosen)
        networks = []
        for index, run in enumerate(chosen):
            member = _member_name(pipeline, index, run)
            weights[member] = _network_weights(run, checkpoint)
            networks.append(_network_record(run, checkpoint, member))
            log.info("export: %s (%s checkpoint) -> %s", run.name, networks[-1]["checkpoint"], member)
        pipelines[pipeline] = {"select": rule, "normalization": chosen[0].normalization,
                               "channels": list(chosen[0].channels),
                               "label_convention": chosen[0].label_convention, "networks": networks}
    if not pipelines:
        raise UserError(f"export: no runs to export under {runs_dir} (selection {select}); expected run.json "
                        "files of pipeline A and/or B: train first, or point --runs at the sweep's folder")
    conventions = {p["label_convention"] for p in pipelines.values()}
    if len(conventions) > 1:
        raise UserError(f"export: pipelines A and B use different label conventions {sorted(conventions)}; "
                        "their maps cannot be merged: export one pipeline (--select-a none or "
                        "--select-b none)")
    convention = get_convention(conventions.pop())
    metadata = {
        "label_convention": convention.name, "regions": list(convention.regions), "tta": tta,
        "et_threshold": et_threshold, "merge": MERGE_RULE if len(pipelines) == 2 else None,
        "pipelines": pipelines, "suite_version": __version__, "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    members = {METADATA: (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode(),
               CARD: model_card(metadata).encode(), **weights}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "suite_version": __version__,
                "members": {name: {"sha256": sha256(data), "bytes": len(data)}
                            for name, data in members.items()}}
    out = Path(out)
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        archive.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                         zipfile.ZIP_DEFLATED)
        for name, data in members.items():
            archive.writestr(name, data, zipfile.ZIP_STORED if name.endswith(".safetensors") else
                             zipfile.ZIP_DEFLATED)
    log.info("export: wrote %s (%d network(s), %.1f MB)", out, len(weights), out.stat().st_size / 1e6)
    return out


def _dice_cells(metrics: Mapping[str, Any] | None) -> list[str]:
    keys = ("dice_et", "dice_tc", "dice_wt", "dice_mean")
    return [f"{metrics[k]:.4f}" if metrics and metrics.get(k) is not None else "-" for k in keys]


def model_card(metadata: Mapping[str, Any]) -> str:
    """``MODEL_CARD.md``: what was trained on which data, with which config, how it scored."""
    from brats_lightning.data.labels import get_convention

    convention = get_convention(metadata["label_convention"])
    pipelines = metadata["pipelines"]
    data_sets = sorted({str(n["training"].get("data")) for p in pipelines.values() for n in p["networks"]})
    et = metadata["et_threshold"]
    lines = [
        "# Model card", "",
        f"A brats-lightning model package (format {FORMAT_VERSION}, brats-lightning "
        f"{metadata['suite_version']}, torch {metadata['torch_version']}, made {metadata['created']}): "
        "brain-tumour segmentation with self-ensembled, deeply-supervised 3D U-Nets (Henry, Carre et al., "
        "BraTS 2020).", "",
        "## Input and output", "",
        "- input: one case folder per patient with the four MR sequences; channels per pipeline below",
        f"- output: `<CASE>.nii.gz` label map on the input grid, codes {list(convention.labels)} "
        f"({convention.name}; ET = {convention.et}); regions {', '.join(metadata['regions'])}",
        f"- test-time augmentation: `{metadata['tta']}`; probability threshold 0.5 per region",
        "- ET post-processing: " + ("off (the paper)" if et is None
                                    else f"ET under {et} voxels becomes NCR/NET"),
        "- merge: " + ("paper Table 1 (A and B label maps, section 2.6)" if metadata["merge"]
                       else "none (one pipeline)"),
        "", "## Training data", "",
        f"Data set(s): {', '.join(data_sets)} ({convention.name} labels). Each network was trained on its "
        "fold's training cases; the scores below are on the fold's held-out validation cases.", "",
        "## Networks and cross-validation scores (validation Dice of the packaged weights)", "",
        "| pipeline | model | fold | seed | checkpoint | epochs | val cases | Dice ET | Dice TC | Dice WT "
        "| mean |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, pipeline in pipelines.items():
        for net in pipeline["networks"]:
            metrics = net["val_metrics_swa"] if net["checkpoint"] == "swa" else net["val_metrics"]
            training = net["training"]
            lines.append(f"| {name} | {net['model']} | {net['fold']} | {training.get('seed', '-')} | "
                         f"{net['checkpoint']} | {training.get('epochs_trained', '-')} | "
                         f"{training['n_val_cases']} | " + " | ".join(_dice_cells(metrics)) + " |")
    lines += ["", "## Pipelines", ""]
    for name, pipeline in pipelines.items():
        scores = [n["score"] for n in pipeline["networks"] if n["score"] is not None]
        mean = f"{sum(scores) / len(scores):.4f}" if scores else "-"
        configs = {json.dumps(n["model_config"], sort_keys=True) for n in pipeline["networks"]}
        lines.append(f"- {name}: {len(pipeline['networks'])} network(s) (selection `{pipeline['select']}`), "
                     f"normalization `{pipeline['normalization']}`, "
                     f"channels {', '.join(pipeline['channels'])}, "
                     f"mean validation Dice {mean}; model config(s): "
                     + "; ".join(f"`{c}`" for c in sorted(configs)))
    lines += ["", "## Use", "", "    brats-lightning predict --model model.zip --data CASES --out OUT", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- load
def _check_targets(config: Any, where: str) -> None:
    """Refuse a model config that would build anything but a network of brats_lightning.models / torch.nn
    (hydra's ``_target_`` can name any callable) or use interpolations (``${...}``)."""
    from hydra.utils import get_object

    if isinstance(config, Mapping):
        for key, value in config.items():
            if key == "_target_":
                target = str(value)
                located = None
                if target.startswith(NETWORK_MODULES):
                    try:
                        located = get_object(target)
                    except Exception:  # noqa: BLE001 - any failure to resolve is a refusal
                        located = None
                origin = f"{getattr(located, '__module__', '')}.{getattr(located, '__qualname__', '')}"
                if located is None or not origin.startswith(NETWORK_MODULES):
                    raise PackageError(
                        f"{where}: model_config _target_ {target!r} is not a network class or function of "
                        f"{' or '.join(m.rstrip('.') for m in NETWORK_MODULES)}; refusing to build it (a "
                        "package must not run other code): re-export the package from its training runs")
            else:
                _check_targets(value, where)
    elif isinstance(config, list):
        for value in config:
            _check_targets(value, where)
    elif isinstance(config, str) and "${" in config:
        raise PackageError(f"{where}: model_config holds an interpolation {config!r}; expected plain values: "
                           "re-export the package from its training runs")


@dataclass
class ModelPackage:
    """A verified model package (open it with :meth:`open`).

    Attributes:
        path: the zip file.
        manifest: ``manifest.json``.
        metadata: ``package.json``.
    """

    path: Path
    manifest: dict
    metadata: dict
    _members: dict[Path, str] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> ModelPackage:
        """Open and verify ``path``: format version, member list and hashes, metadata, every network's
        config against its weights. Nothing is unpickled.

        Raises:
            PackageError: what is wrong and what to do.
        """
        path = Path(path)
        if not path.is_file():
            raise PackageError(f"{path}: no such file; expected a model package written by brats-lightning "
                               "export")
        try:
            with zipfile.ZipFile(path) as archive:
                infos = {info.filename: info for info in archive.infolist()}
                if len(infos) != len(archive.infolist()):
                    raise PackageError(f"{path}: a member name appears twice in the zip: the package was "
                                       "altered; get an intact copy or re-export it")
                if MANIFEST not in infos:
                    raise PackageError(f"{path}: no {MANIFEST} inside; not a brats-lightning model package: "
                                       "export it with brats-lightning export")
                manifest = _json(archive.read(MANIFEST), path, MANIFEST)
                _check_manifest(manifest, path, set(infos))
                for name, entry in manifest["members"].items():
                    if infos[name].file_size != entry["bytes"]:
                        raise PackageError(f"{path}: member {name} has {infos[name].file_size} bytes, the "
                                           f"manifest says {entry['bytes']}: altered; get an intact copy")
                    _verify(archive.read(name), entry, path, name)
                metadata = _json(archive.read(METADATA), path, METADATA)
        except zipfile.BadZipFile as err:
            raise PackageError(f"{path}: not a readable zip file ({err}); expected a model package written "
                               "by brats-lightning export: get an intact copy") from None
        package = cls(path=path, manifest=manifest, metadata=metadata)
        package._check_metadata()
        for pipeline in package.pipelines:  # build every network once: its config must fit its weights
            for run in package.runs(pipeline):
                package.load_network(run)
        return package

    # -------------------------------------------------------------------------------------- properties
    @property
    def pipelines(self) -> list[str]:
        return list(self.metadata["pipelines"])

    @property
    def tta(self) -> str:
        return str(self.metadata["tta"])

    @property
    def et_threshold(self) -> int | None:
        value = self.metadata.get("et_threshold")
        return None if value is None else int(value)

    @property
    def label_convention(self) -> str:
        return str(self.metadata["label_convention"])

    @property
    def package_id(self) -> str:
        """First 16 hex digits of the SHA-256 of the manifest's member list (names and hashes)."""
        return sha256(json.dumps(self.manifest["members"], sort_keys=True).encode())[:16]

    def card(self) -> str:
        """``MODEL_CARD.md`` (hash checked)."""
        return self._read(CARD).decode()

    # ------------------------------------------------------------------------------------------ checks
    def _check_metadata(self) -> None:
        from brats_lightning.data.labels import get_convention
        from brats_lightning.data.layout import MODALITIES
        from brats_lightning.data.normalize import get_normalization
        from brats_lightning.inference.tta import get_views

        meta, where = self.metadata, f"{self.path}: {METADATA}"
        try:
            get_convention(meta["label_convention"])
            get_views(meta["tta"])
            pipelines = meta["pipelines"]
            if not pipelines or not set(pipelines) <= set(PIPELINES):
                raise ValueError(f"pipelines {sorted(pipelines)}; expected A and/or B")
            if len(pipelines) == 2 and meta.get("merge") != MERGE_RULE:
                raise ValueError(f"merge rule {meta.get('merge')!r}; this version knows {MERGE_RULE!r}")
            for name, pipeline in pipelines.items():
                get_normalization(pipeline["normalization"])
                unknown = [c for c in pipeline["channels"] if c not in MODALITIES]
                if unknown:
                    raise ValueError(f"pipeline {name} channels {unknown} are not among {list(MODALITIES)}")
                if not pipeline["networks"]:
                    raise ValueError(f"pipeline {name} has no networks")
                for net in pipeline["networks"]:
                    member = net["weights"]
                    if member not in self.manifest["members"] or not member.endswith(".safetensors"):
                        raise ValueError(f"network weights {member!r} are not a listed .safetensors member")
                    _check_targets(net["model_config"], f"{self.path}: {member}")
        except (KeyError, TypeError, ValueError) as err:
            raise PackageError(f"{where} is not valid ({type(err).__name__}: {err}); the package is "
                               "damaged or not from brats-lightning export: re-export it") from None

    def check_cases(self, cases: Sequence) -> None:
        """Refuse cases of another data-set family than the one the package was trained on: their channel
        files (t1n, t1c, t2w, t2f vs t1, t1ce, t2, flair) and label codes (ET 3 vs 4) do not match.

        Raises:
            PackageError: naming the first such case.
        """
        from brats_lightning.data.labels import get_convention

        trained = get_convention(self.label_convention)
        for case in cases:
            if case.convention.name != trained.name:
                raise PackageError(
                    f"case {case.case_id} ({case.folder}): {case.dataset.title} data (channels "
                    f"{', '.join(case.dataset.naming.suffixes)}; labels {case.convention.name}, ET = "
                    f"{case.convention.et}); this package was trained on {trained.name} data (ET = "
                    f"{trained.et}) and writes its codes: predict these cases with a package trained on "
                    f"{case.convention.name} data")

    # ---------------------------------------------------------------------------------------- networks
    def runs(self, pipeline: str) -> list[Run]:
        """The pipeline's networks as :class:`~brats_lightning.runs.Run` records (path ``<zip>/<member>``), in
        the exported (ensemble) order, for :meth:`Predictor.from_package`."""
        if pipeline not in self.metadata["pipelines"]:
            raise PackageError(f"{self.path}: no pipeline {pipeline} (it holds {self.pipelines})")
        spec = self.metadata["pipelines"][pipeline]
        runs = []
        for net in spec["networks"]:
            info = {"pipeline": pipeline, "model": net["model"], "fold": net["fold"],
                    "normalization": spec["normalization"], "label_convention": self.label_convention,
                    "channels": spec["channels"], "model_config": net["model_config"],
                    "val_metrics": net["val_metrics"], "val_metrics_swa": net["val_metrics_swa"],
                    "checkpoints": {net["checkpoint"]: net["weights"]}}
            run = Run(path=self.path / net["weights"], info=info)
            self._members[run.path] = net["weights"]
            runs.append(run)
        return runs

    def load_network(self, run: Run, device: str | torch.device = "cpu") -> nn.Module:
        """Build ``run``'s network from its model config and load its safetensors weights (hash checked), in
        eval mode (the package's counterpart of :func:`brats_lightning.runs.load_network`)."""
        import hydra.utils
        from safetensors import SafetensorError
        from safetensors.torch import load

        member = self._members[run.path]
        data = self._read(member)
        where = f"{self.path}: {member} ({run.pipeline}/{run.model}/fold{run.fold})"
        try:
            state = load(data)
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise PackageError(f"{where} is not a safetensors file ({err}); refusing it (packages never hold "
                               "pickles): re-export the package") from None
        try:
            net = hydra.utils.instantiate(run.info["model_config"])
        except Exception as err:  # noqa: BLE001 - a config this suite cannot build is a package problem
            raise PackageError(f"{where}: its model_config cannot be built ({err}): the package needs "
                               "another brats-lightning version, or re-export it") from None
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            raise PackageError(f"{where}: the network config does not fit the weights ({detail}): the "
                               "package was altered or mixed; re-export it") from None
        return net.to(device).eval()

    def _read(self, member: str) -> bytes:
        """A member's bytes, hash checked against the manifest (again: the file may have changed since
        :meth:`open`)."""
        try:
            with zipfile.ZipFile(self.path) as archive:
                data = archive.read(member)
        except (KeyError, zipfile.BadZipFile, OSError) as err:
            raise PackageError(f"{self.path}: cannot read member {member} ({err}): the file changed after it "
                               "was opened; get an intact copy") from None
        _verify(data, self.manifest["members"][member], self.path, member)
        return data


def _json(data: bytes, path: Path, member: str) -> dict:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PackageError(f"{path}: {member} is not valid JSON ({err}): the package is damaged; get an "
                           "intact copy") from None
    if not isinstance(value, dict):
        raise PackageError(f"{path}: {member} is not a JSON object: the package is damaged; get an "
                           "intact copy")
    return value


def _check_manifest(manifest: dict, path: Path, names: set[str]) -> None:
    """Format and version first (a newer layout may differ in everything else), then the member list."""
    if manifest.get("format") != FORMAT:
        raise PackageError(f"{path}: {MANIFEST} format is {manifest.get('format')!r}, expected {FORMAT!r}: "
                           "not a brats-lightning model package")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise PackageError(f"{path}: {MANIFEST} format_version {version!r} is not a positive integer: the "
                           "package is damaged; get an intact copy")
    if version > FORMAT_VERSION:
        raise PackageError(f"{path}: package format {version} (made by brats-lightning "
                           f"{manifest.get('suite_version', '?')}); this brats-lightning ({__version__}) "
                           f"reads format {FORMAT_VERSION} or older: upgrade brats-lightning")
    members = manifest.get("members")
    if not isinstance(members, dict) or METADATA not in members or CARD not in members:
        raise PackageError(f"{path}: {MANIFEST} does not list {METADATA} and {CARD}: the package is damaged; "
                           "get an intact copy")
    for name, entry in members.items():
        unsafe = name.startswith(("/", "\\")) or ".." in Path(name).parts or "\\" in name
        if unsafe or not name.endswith(MEMBER_SUFFIXES):
            raise PackageError(f"{path}: member {name!r} is not allowed (expected relative names ending in "
                               f"{', '.join(MEMBER_SUFFIXES)}): refusing the package")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(
                entry.get("bytes"), int):
            raise PackageError(f"{path}: {MANIFEST} entry of {name} lacks sha256/bytes: the package is "
                               "damaged; get an intact copy")
    missing = sorted(set(members) - names)
    if missing:
        raise PackageError(f"{path}: member(s) {missing} listed in {MANIFEST} are missing: the package is "
                           "incomplete; get an intact copy or re-export it")
    extra = sorted(names - set(members) - {MANIFEST})
    if extra:
        raise PackageError(f"{path}: member(s) {extra} are not listed in {MANIFEST}: the package was "
                           "altered; get an intact copy or re-export it")


def _verify(data: bytes, entry: Mapping[str, Any], path: Path, member: str) -> None:
    if sha256(data) != entry["sha256"]:
        raise PackageError(f"{path}: member {member} does not match its SHA-256 in {MANIFEST}: it was "
                           "altered or damaged; get an intact copy or re-export the package")


# ----------------------------------------------------------------------------------------------- predict
def predict_pipelines(ensembles: dict[str, Any], cases: list, pred_dir: Path, merged_dir: Path | None,
                      oof: bool = False) -> dict[str, Path]:
    """Predict ``cases`` with each pipeline's Predictor (from run folders or a package) into
    ``<pred_dir>/<name>``, then merge A and B into ``merged_dir`` (paper section 2.6; when given and both
    exist); returns ``{name: folder}`` (with "merged"). Used by ``predict --model`` and ``ensemble.py``."""
    from brats_lightning.inference.merge import merge_folders

    folders: dict[str, Path] = {}
    for name, predictor in ensembles.items():
        folders[name] = pred_dir / name
        predictor.predict(cases, folders[name], oof=oof)
    if merged_dir is not None and {"A", "B"} <= set(folders):
        merge_folders(folders["A"], folders["B"], merged_dir)
        folders["merged"] = merged_dir
    return folders


def predict_package(
    package: ModelPackage,
    data: str | Path,
    out: str | Path,
    options: Any = None,
    keep_pipelines: bool = False,
) -> list[dict]:
    """Predict every case of ``data`` with the package's ensembles into ``out``.

    With one pipeline its label maps go to ``out``; with A and B, both are predicted (into
    ``out/pipelines/{A,B}`` with ``keep_pipelines``, else a temporary folder) and their merge (paper section
    3.4) is written to ``out``. The package, the cases and the options are all checked before anything is
    written.

    Args:
        package: an opened package.
        data: a data set folder or one case folder.
        out: output folder.
        options: :class:`~brats_lightning.inference.predictor.PredictOptions` (device, precision, ...); its
            ``tta`` and ``et_threshold`` are used as given (:func:`package_options` fills them in).
        keep_pipelines: keep A's and B's own predictions under ``out/pipelines``.

    Returns:
        One record per case: the final label map, the seconds spent on it (all pipelines).
    """
    from brats_lightning.data.layout import find_cases
    from brats_lightning.inference.predictor import PredictOptions, Predictor
    from brats_lightning.predictions import read_manifest, write_manifest

    options = options or package_options(PredictOptions(), package)
    cases = find_cases(data)
    package.check_cases(cases)
    ensembles = {name: Predictor.from_package(package, name, options) for name in package.pipelines}
    out = Path(out)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="brats-lightning-predict-") as tmp:
        if len(ensembles) == 1:
            (name, predictor), = ensembles.items()
            predictor.predict(cases, out)
            folders = {name: out}
        else:
            folders = predict_pipelines(ensembles, cases, out / "pipelines" if keep_pipelines else Path(tmp),
                                        merged_dir=out)
        seconds = {name: folder_seconds(folder) for name, folder in folders.items()}
    manifest = dict(read_manifest(out) or {})  # predict's, or merge's (naming A's and B's folders)
    manifest.update(package={"file": package.path.name, "id": package.package_id,
                             "pipelines": package.pipelines},
                    tta=options.tta, et_threshold=options.et_threshold)
    if not keep_pipelines:
        manifest.pop("a", None)  # temporary folders, gone
        manifest.pop("b", None)
    write_manifest(out, manifest)
    records = []
    for case in cases:
        records.append({"case": case.case_id, "labels": str(out / f"{case.case_id}.nii.gz"),
                        "seconds": sum(s.get(case.case_id, 0.0) for s in seconds.values())})
    log.info("predicted %d case(s) in %.1f s", len(records), time.perf_counter() - start)
    return records


def folder_seconds(folder: Path) -> dict[str, float]:
    """Seconds per case recorded in a prediction folder's manifest (empty for a merged folder)."""
    from brats_lightning.predictions import read_manifest

    return dict((read_manifest(folder) or {}).get("seconds_per_case") or {})


def package_options(options: Any, package: ModelPackage, tta: str | None = None,
                    et_threshold: int | None = None) -> Any:
    """``options`` with the package's TTA view set and ET threshold, unless ``tta`` / ``et_threshold`` are
    given (then the maps can differ from the exporter's)."""
    chosen_tta = package.tta if tta is None else tta
    chosen_et = package.et_threshold if et_threshold is None else et_threshold
    for what, mine, theirs in (("tta", chosen_tta, package.tta), ("et_threshold", chosen_et,
                                                                   package.et_threshold)):
        if mine != theirs:
            log.warning("%s=%s instead of the package's %s: the label maps will differ from the exporter's",
                        what, mine, theirs)
    return replace(options, tta=chosen_tta, et_threshold=chosen_et, checkpoint="auto")


def summary_table(records: Sequence[dict], convention: str):
    """A rich table: per case, the tumour volumes (mL) of the final label map and the seconds spent."""
    import nibabel as nib
    import numpy as np
    from rich.table import Table

    from brats_lightning.data.labels import get_convention, labels_to_regions

    table = Table(title="Predicted cases (volumes in mL)")
    for column in ("case", "ET", "TC", "WT", "seconds"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for record in records:
        image = nib.load(record["labels"])
        labels = np.asanyarray(image.dataobj)
        voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000
        volumes = labels_to_regions(labels, get_convention(convention)).reshape(3, -1).sum(1) * voxel_ml
        table.add_row(record["case"], *(f"{v:.1f}" for v in volumes), f"{record['seconds']:.1f}")
    return table


# --------------------------------------------------------------------------------------------------- CLI
def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", required=True, type=Path, help="training outputs (holds run.json files)")
    parser.add_argument("--out", required=True, type=Path, help="the package to write (model.zip)")
    parser.add_argument("--select-a", default="best2", help="pipeline A: all, best<k> per fold, or none")
    parser.add_argument("--select-b", default="all", help="pipeline B: all, best<k> per fold, or none")
    parser.add_argument("--checkpoint", default="auto", choices=["auto", "best", "last", "swa"],
                        help="which checkpoint of each run (auto: swa, else best, else last)")
    parser.add_argument("--et-threshold", type=int, default=None,
                        help="ET under T voxels becomes NCR/NET at predict (off by default, the paper)")
    parser.add_argument("--tta", default="all", choices=["all", "flips", "none"],
                        help="test-time views predict uses (all: the paper's 16)")


def _export_run(args: argparse.Namespace) -> int:
    _log_to_console()
    path = export_package(args.runs, args.out, {"A": args.select_a, "B": args.select_b}, args.checkpoint,
                          args.et_threshold, args.tta)
    package = ModelPackage.open(path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, package {package.package_id}); "
          f"see it with: brats-lightning model-info {path}")
    return 0


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", type=Path, help="a model package (brats-lightning export)")


def _info_run(args: argparse.Namespace) -> int:
    package = ModelPackage.open(args.package)
    networks = sum(len(p["networks"]) for p in package.metadata["pipelines"].values())
    print(package.card())
    print(f"file: {package.path} ({package.path.stat().st_size / 1e6:.1f} MB), package {package.package_id}, "
          f"format {package.manifest['format_version']}; {len(package.manifest['members'])} members verified "
          f"(SHA-256); pipelines {', '.join(package.pipelines)}, {networks} network(s)")
    return 0


def predict_command(args: argparse.Namespace) -> int:
    """``brats-lightning predict --model model.zip ...`` (the options come from the predict command)."""
    from rich.console import Console

    from brats_lightning.inference.predictor import PredictOptions

    given = [flag for flag, value in (("--runs", args.runs), ("--pipeline", args.pipeline),
                                      ("--model-name", args.model_name), ("--select", args.select),
                                      ("--oof", args.oof), ("--checkpoint", args.checkpoint)) if value]
    if given:
        raise UserError(f"predict --model: {', '.join(given)} choose runs of a training tree; a package "
                        "holds its chosen networks already: drop them (or export another package)")
    package = ModelPackage.open(args.model)
    if args.uncertainty and len(package.pipelines) == 2 and not args.keep_pipelines:
        raise UserError("predict --model: --uncertainty writes each pipeline's maps (the merge has none) and "
                        "this package has two: add --keep-pipelines (maps in OUT/pipelines/{A,B})")
    base = PredictOptions(view_batch_size=args.view_batch, device=args.device, precision=args.precision,
                          uncertainty=args.uncertainty, uncertainty_kind=args.uncertainty_kind,
                          save_probabilities=not args.no_probs)
    options = package_options(base, package, args.tta, args.et_threshold)
    records = predict_package(package, args.data, args.out, options, keep_pipelines=args.keep_pipelines)
    Console().print(summary_table(records, package.label_convention))
    seconds = sum(r["seconds"] for r in records)
    print(f"wrote {len(records)} label map(s) to {args.out} ({seconds / max(len(records), 1):.1f} s per "
          f"case, package {package.package_id})")
    return 0


def _log_to_console() -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])


@dataclass(frozen=True)
class _Command:
    add_arguments: Any
    run: Any


EXPORT_COMMAND = _Command(_export_arguments, _export_run)
"""``brats-lightning export`` (registered in brats_lightning/cli.py)."""
INFO_COMMAND = _Command(_info_arguments, _info_run)
"""``brats-lightning model-info``."""
