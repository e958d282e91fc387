"""Merge pipeline A's and pipeline B's label maps (paper section 3.4, "Second step"; docs/method.md
Inference table).

Where A says background or edema and B says background or edema, B's label wins; everywhere else
(A says NCR/NET or ET, or B says NCR/NET or ET) A's label stands. The paper prints the table with B's
labels as rows; docs/method.md gives it with A's labels as rows.

Command line: ``brats-lightning merge --a DIR --b DIR --out DIR [--convention auto|brats2020|brats2023]``.
Each folder holds one ``<CASE>.nii.gz`` label map per case (as written by ``brats-lightning predict``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from brats_lightning.data.labels import (
    BRATS2020,
    BRATS2023,
    CONVENTIONS,
    LabelConvention,
    get_convention,
    unexpected_labels,
)
from brats_lightning.predictions import label_map_paths, read_manifest, write_manifest

log = logging.getLogger(__name__)


def merge_labels(a: np.ndarray, b: np.ndarray, convention: LabelConvention = BRATS2020) -> np.ndarray:
    """Merge two label maps voxel-wise with the docs/method.md table.

    Args:
        a: pipeline A's label map (integer codes of ``convention``).
        b: pipeline B's label map, same shape.
        convention: label codes (ET is 4 in BraTS 2020/2021, 3 in 2023).

    Returns:
        uint8 label map: B's label where both A and B say 0 or edema, A's label elsewhere.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"merge_labels: label maps differ in shape: A {a.shape}, B {b.shape}")
    soft = (0, convention.ed)
    b_wins = np.isin(a, soft) & np.isin(b, soft)
    return np.where(b_wins, b, a).astype(np.uint8)


def _folder_convention(folder: Path) -> LabelConvention | None:
    manifest = read_manifest(folder)
    if manifest and manifest.get("label_convention"):
        return get_convention(manifest["label_convention"])
    return None


def _infer_convention(labels: dict[str, np.ndarray], where: str) -> LabelConvention | None:
    """The convention implied by the ET codes present (3 -> 2023, 4 -> 2020), None when no ET anywhere."""
    seen = set()
    for volume in labels.values():
        seen |= {code for code in (3, 4) if np.any(volume == code)}
    if seen == {3, 4}:
        raise ValueError(f"{where}: label maps contain both 3 and 4; pass --convention brats2020|brats2023")
    if seen:
        return BRATS2023 if 3 in seen else BRATS2020
    return None


def merge_folders(
    a_dir: str | Path, b_dir: str | Path, out_dir: str | Path, convention: str | LabelConvention = "auto"
) -> list[Path]:
    """Merge every case of ``a_dir`` with the same case of ``b_dir`` into ``out_dir``.

    Args:
        a_dir: pipeline A's label maps.
        b_dir: pipeline B's label maps.
        out_dir: where ``<CASE>.nii.gz`` merged maps go (A's affine and header).
        convention: "auto" (from the folders' prediction.json, else from the codes present), or a name.

    Returns:
        The written paths, sorted by case.

    Raises:
        ValueError: different case sets, shapes, affines, label conventions, or unknown label codes.
    """
    from brats_lightning.data.io import load_volume, save_label_map, to_label_map

    a_dir, b_dir, out_dir = Path(a_dir), Path(b_dir), Path(out_dir)
    a_paths, b_paths = label_map_paths(a_dir), label_map_paths(b_dir)
    if not a_paths:
        raise FileNotFoundError(f"{a_dir}: no <CASE>.nii.gz label maps found (pipeline A predictions)")
    if set(a_paths) != set(b_paths):
        only_a = sorted(set(a_paths) - set(b_paths))
        only_b = sorted(set(b_paths) - set(a_paths))
        raise ValueError(
            f"merge: the folders hold different cases: only in A ({a_dir}): {only_a or 'none'}; "
            f"only in B ({b_dir}): {only_b or 'none'}. Predict the same cases with both pipelines."
        )
    if convention == "auto":
        conv_a, conv_b = _folder_convention(a_dir), _folder_convention(b_dir)
        if conv_a and conv_b and conv_a != conv_b:
            raise ValueError(
                f"merge: A ({a_dir}) uses label convention {conv_a.name}, B ({b_dir}) uses {conv_b.name}"
            )
        conv = conv_a or conv_b
    else:
        conv = get_convention(convention)

    loaded: dict[str, tuple[np.ndarray, np.ndarray, object]] = {}
    # Label maps are small (uint8); the convention check needs to see all of them when it is inferred.
    for case_id in sorted(a_paths):
        a, a_img = load_volume(a_paths[case_id], dtype=None)
        b, b_img = load_volume(b_paths[case_id], dtype=None)
        if a.shape != b.shape:
            raise ValueError(
                f"merge: case {case_id}: A {a_paths[case_id]} has shape {a.shape}, B {b_paths[case_id]} "
                f"has {b.shape}; both must be on the same grid"
            )
        if not np.allclose(a_img.affine, b_img.affine, atol=1e-4):
            raise ValueError(
                f"merge: case {case_id}: affines differ between A {a_paths[case_id]} and B "
                f"{b_paths[case_id]}:\n{a_img.affine}\nvs\n{b_img.affine}"
            )
        loaded[case_id] = (to_label_map(a, a_paths[case_id]), to_label_map(b, b_paths[case_id]), a_img)
    if conv is None:
        conv = _infer_convention({k: v[0] for k, v in loaded.items()}, str(a_dir))
        conv_b = _infer_convention({k: v[1] for k, v in loaded.items()}, str(b_dir))
        if conv and conv_b and conv != conv_b:
            raise ValueError(f"merge: A ({a_dir}) uses ET code {conv.et}, B ({b_dir}) uses {conv_b.et}")
        conv = conv or conv_b or BRATS2020

    for case_id, (a, b, _) in loaded.items():  # check everything before writing anything
        for name, volume, path in (("A", a, a_paths[case_id]), ("B", b, b_paths[case_id])):
            bad = unexpected_labels(volume, conv)
            if bad:
                raise ValueError(
                    f"merge: case {case_id}: {name} label map {path} holds codes {bad}; expected "
                    f"{list(conv.labels)} ({conv.name})"
                )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case_id, (a, b, a_img) in loaded.items():
        merged = merge_labels(a, b, conv)
        written.append(save_label_map(merged, a_img, out_dir / f"{case_id}.nii.gz"))
    write_manifest(out_dir, {
        "kind": "merge", "label_convention": conv.name,
        "a": str(a_dir.resolve()), "b": str(b_dir.resolve()), "cases": sorted(loaded),
    })
    log.info("merged %d cases into %s", len(written), out_dir)
    return written


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
