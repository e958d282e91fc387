"""Merge pipeline A's and pipeline B's label maps (paper section 2.6, "Second step"; docs/method.md
Inference table).

Where A says background or edema and B says background or edema, B's label wins; everywhere else
(A says NCR/NET or ET, or B says NCR/NET or ET) A's label stands. The paper prints the table with B's
labels as rows; docs/method.md gives it with A's labels as rows.

Command line: ``brats-lightning merge --a DIR --b DIR --out DIR [--convention auto|brats2020|brats2023]``.
Each folder holds one ``<CASE>.nii.gz`` label map per case (as written by ``brats-lightning predict``).

Nothing bad gets in and nothing half-done looks finished: folders whose prediction.json says incomplete are
refused; a first pass reads every pair of label maps, one case at a time, and checks them (readable, 3-D,
pixdim vs affine, integer labels of the convention, A and B on one grid), listing every problem before
anything is written; the output folder is locked (:mod:`brats_lightning.locks`), marked incomplete before
the first label map and given its complete prediction.json last, so a killed merge leaves a folder that
``evaluate`` and ``merge`` refuse, and rerunning the same merge finishes only the missing cases. One case is
in memory at a time.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from brats_lightning.data.checks import DataProblems, Problem, check_header
from brats_lightning.data.io import VolumeReadError, load_image, read_voxels, save_label_map, to_label_map
from brats_lightning.data.labels import (
    BRATS2020,
    BRATS2023,
    CONVENTIONS,
    LabelConvention,
    get_convention,
)
from brats_lightning.errors import UserError
from brats_lightning.locks import hold_folder
from brats_lightning.predictions import (
    label_map_paths,
    mark_incomplete,
    read_manifest,
    require_complete,
    write_manifest,
)

log = logging.getLogger(__name__)


def merge_labels(a: np.ndarray, b: np.ndarray, convention: LabelConvention = BRATS2020) -> np.ndarray:
    """Merge two label maps voxel-wise with the docs/method.md table.

    Args:
        a: pipeline A's label map (integer codes of ``convention``).
        b: pipeline B's label map, same shape.
        convention: label codes (ET is 4 in BraTS 2020/2021, 3 in 2023; 4 is the cavity in BraTS 2024).

    Returns:
        uint8 label map: B's label where both A and B say 0 or edema (or, in BraTS 2024, resection cavity:
        like edema it is outside the tumour core that A's label keeps), A's label elsewhere.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"merge_labels: label maps differ in shape: A {a.shape}, B {b.shape}")
    soft = (0, convention.ed) + (() if convention.rc is None else (convention.rc,))
    b_wins = np.isin(a, soft) & np.isin(b, soft)
    return np.where(b_wins, b, a).astype(np.uint8)


def _read_label_map(case_id: str, side: str, path: Path) -> tuple[np.ndarray | None, object, list[Problem]]:
    """(uint8 labels or None, image or None, problems) of one input label map."""
    try:
        image = load_image(path)
    except VolumeReadError as err:
        return None, None, [Problem(case_id, str(path), f"{side} label map unreadable: {err}")]
    problems = check_header(case_id, f"{side} label map", path, image)
    if problems:
        return None, image, problems
    try:
        return to_label_map(read_voxels(image, path), path), image, []
    except VolumeReadError as err:
        return None, image, [Problem(case_id, str(path), f"{side} label map unreadable: {err}")]
    except ValueError as err:
        return None, image, [Problem(case_id, str(path), f"{side} {err}")]


def _read_pair(case_id: str, a_path: Path, b_path: Path) -> tuple[np.ndarray | None, np.ndarray | None,
                                                                   object, list[Problem]]:
    """(A labels, B labels, A's image, problems) of one case; A and B must share grid and affine."""
    a, a_img, problems = _read_label_map(case_id, "A", a_path)
    b, b_img, b_problems = _read_label_map(case_id, "B", b_path)
    problems += b_problems
    if a is not None and b is not None:
        if a.shape != b.shape:
            problems.append(Problem(case_id, str(b_path), f"B has shape {b.shape}, A ({a_path}) has "
                                    f"{a.shape}; expected both on the same grid: predict both from the same "
                                    "data"))
        elif not np.allclose(a_img.affine, b_img.affine, atol=1e-4):
            diff = float(np.max(np.abs(a_img.affine - b_img.affine)))
            problems.append(Problem(case_id, str(b_path), f"B's affine differs from A's ({a_path}) by up to "
                                    f"{diff:.4g}; expected one affine: predict both from the same data"))
    return a, b, a_img, problems


def _folder_convention(folder: Path) -> LabelConvention | None:
    manifest = read_manifest(folder)
    if manifest and manifest.get("label_convention"):
        return get_convention(manifest["label_convention"])
    return None


def _codes(labels: np.ndarray) -> set[int]:
    return {int(v) for v in np.flatnonzero(np.bincount(labels.ravel(), minlength=1))}


def _input_paths(folder: Path, side: str, out_dir: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise UserError(f"merge: {side} folder {folder} does not exist; expected pipeline {side}'s label "
                        "maps (<CASE>.nii.gz) from `brats-lightning predict`: check --a / --b")
    if folder.resolve() == out_dir.resolve():
        raise UserError(f"merge: --out {out_dir} is the {side} folder; expected a separate output folder")
    require_complete(folder)
    paths = label_map_paths(folder)
    if not paths:
        raise UserError(f"merge: {folder}: no <CASE>.nii.gz label maps found; expected pipeline {side}'s "
                        "predictions: run `brats-lightning predict` first")
    return paths


def merge_folders(
    a_dir: str | Path, b_dir: str | Path, out_dir: str | Path, convention: str | LabelConvention = "auto"
) -> list[Path]:
    """Merge every case of ``a_dir`` with the same case of ``b_dir`` into ``out_dir`` (see the module doc).

    Args:
        a_dir: pipeline A's label maps.
        b_dir: pipeline B's label maps.
        out_dir: where ``<CASE>.nii.gz`` merged maps go (A's affine and header).
        convention: "auto" (from the folders' prediction.json, else from the codes present), or a name.

    Returns:
        The paths of every case's merged map, sorted by case.

    Raises:
        UserError: an incomplete or empty input folder, different case sets or label conventions, or
            (:class:`DataProblems`) every bad label map; nothing is written then.
        FolderLocked: another job writes ``out_dir``.
    """
    a_dir, b_dir, out_dir = Path(a_dir), Path(b_dir), Path(out_dir)
    a_paths, b_paths = _input_paths(a_dir, "A", out_dir), _input_paths(b_dir, "B", out_dir)
    if set(a_paths) != set(b_paths):
        only_a = sorted(set(a_paths) - set(b_paths))
        only_b = sorted(set(b_paths) - set(a_paths))
        raise UserError(
            f"merge: the folders hold different cases: only in A ({a_dir}): {only_a or 'none'}; "
            f"only in B ({b_dir}): {only_b or 'none'}; expected the same cases: predict the same cases "
            "with both pipelines"
        )
    if convention == "auto":
        conv_a, conv_b = _folder_convention(a_dir), _folder_convention(b_dir)
        if conv_a and conv_b and conv_a != conv_b:
            raise UserError(f"merge: A ({a_dir}) uses label convention {conv_a.name}, B ({b_dir}) uses "
                            f"{conv_b.name}; expected one: merge predictions of the same data set")
        conv = conv_a or conv_b
    else:
        conv = get_convention(convention)

    # pass 1: check every pair, one case in memory at a time; keep only the codes each side uses
    problems: list[Problem] = []
    codes: dict[str, dict[str, set[int]]] = {"A": {}, "B": {}}
    for case_id in sorted(a_paths):
        a, b, _, found = _read_pair(case_id, a_paths[case_id], b_paths[case_id])
        problems += found
        for side, labels in (("A", a), ("B", b)):
            if labels is not None:
                codes[side][case_id] = _codes(labels)
    if conv is None:
        seen = {side: {c for case in per.values() for c in case & {3, 4}} for side, per in codes.items()}
        for side, folder in (("A", a_dir), ("B", b_dir)):
            if seen[side] == {3, 4}:
                problems.append(Problem("-", str(folder), f"{side} label maps contain both 3 and 4 (ET in "
                                        "BraTS 2023 and 2020); expected one convention: pass --convention "
                                        "brats2020|brats2023"))
        if seen["A"] in ({3}, {4}) and seen["B"] in ({3}, {4}) and seen["A"] != seen["B"]:
            problems.append(Problem("-", str(b_dir), f"A ({a_dir}) uses ET code {min(seen['A'])}, B uses "
                                    f"{min(seen['B'])}; expected one convention: predict both with runs of "
                                    "the same data set"))
        single = [s for s in (seen["A"], seen["B"]) if len(s) == 1]
        conv = (BRATS2023 if 3 in single[0] else BRATS2020) if single else BRATS2020
    for side, paths in (("A", a_paths), ("B", b_paths)):
        for case_id, present in codes[side].items():
            bad = sorted(present - set(conv.labels))
            if bad:
                problems.append(Problem(case_id, str(paths[case_id]),
                                        f"{side} label map holds codes {bad}; expected {list(conv.labels)} "
                                        f"({conv.name}): check --convention or re-run predict"))
    if problems:
        raise DataProblems(problems, f"merge {a_dir} + {b_dir}",
                           fix=f"nothing was written to {out_dir}: fix the inputs, then rerun merge")

    # pass 2: merge and write, one case at a time, under the folder's lock
    settings = {"label_convention": conv.name, "a": str(a_dir.resolve()), "b": str(b_dir.resolve())}
    with hold_folder(out_dir, "merge"):
        previous = read_manifest(out_dir) or {}
        resumed = previous.get("complete") is False and all(previous.get(k) == v for k, v in settings.items())
        done = [c for c in previous.get("cases", []) if c in a_paths and (out_dir / f"{c}.nii.gz").is_file()
                ] if resumed else []
        mark_incomplete(out_dir, "merge", **settings, cases=done)
        n_resumed = len(done)
        for case_id in sorted(set(a_paths) - set(done)):
            a, b, a_img, found = _read_pair(case_id, a_paths[case_id], b_paths[case_id])
            if found:  # changed since the first pass
                raise DataProblems(found, f"merge {a_dir} + {b_dir}", fix="an input changed during the "
                                   "merge: rerun merge (it finishes the missing cases)")
            save_label_map(merge_labels(a, b, conv), a_img, out_dir / f"{case_id}.nii.gz")
            done.append(case_id)
            mark_incomplete(out_dir, "merge", **settings, cases=done)
        write_manifest(out_dir, {"kind": "merge", **settings, "cases": sorted(a_paths), "complete": True})
    log.info("merged %d cases into %s (%d kept from an interrupted run)", len(a_paths), out_dir, n_resumed)
    return [out_dir / f"{case_id}.nii.gz" for case_id in sorted(a_paths)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brats-lightning merge``."""
    parser.add_argument("--a", required=True, type=Path, help="pipeline A label maps (<CASE>.nii.gz)")
    parser.add_argument("--b", required=True, type=Path, help="pipeline B label maps (<CASE>.nii.gz)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the merged label maps")
    parser.add_argument(
        "--convention", default="auto", choices=["auto", *CONVENTIONS],
        help="label codes (default: from the folders' prediction.json, else from the codes present)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``brats-lightning merge``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written = merge_folders(args.a, args.b, args.out, args.convention)
    log.info("wrote %d merged label maps to %s", len(written), args.out)
    return 0
