"""Prediction folders: the label maps ``<CASE>.nii.gz`` and the ``prediction.json`` manifest beside them.

``brats-lightning predict`` and ``merge`` write these folders; ``evaluate``, ``merge`` and the ET
post-processing read them. The manifest's keys are in docs/contracts.md ("prediction.json").
"""

from __future__ import annotations

import json
from pathlib import Path

from brats_lightning.data.io import atomic_path
from brats_lightning.errors import UserError

MANIFEST = "prediction.json"
"""Name of the small JSON file that ``predict`` and ``merge`` write next to their label maps."""

UNCERTAINTY_SUFFIXES = ("_unc_enhance", "_unc_core", "_unc_whole")


def label_map_paths(folder: str | Path) -> dict[str, Path]:
    """``{case_id: path}`` of the label maps ``<CASE>.nii.gz`` in ``folder`` (uncertainty maps excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; expected a folder of <CASE>.nii.gz label maps")
    found = {}
    for path in sorted(folder.glob("*.nii.gz")):
        case_id = path.name[: -len(".nii.gz")]
        if case_id.endswith(UNCERTAINTY_SUFFIXES) or path.name.startswith("."):
            continue
        found[case_id] = path
    return found


def read_manifest(folder: str | Path) -> dict | None:
    """The folder's ``prediction.json`` (written by predict/merge), or None when there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Write ``prediction.json`` into ``folder`` atomically."""
    path = Path(folder) / MANIFEST
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def mark_incomplete(folder: str | Path, kind: str, **fields) -> Path:
    """Start (re)writing a prediction folder: its manifest says ``"complete": false`` until
    :func:`write_manifest` writes the finished one last, so a killed ``predict`` / ``merge`` leaves a folder
    that :func:`require_complete` refuses instead of an older manifest that claims completeness.

    ``fields`` go into the incomplete manifest too: predict and merge record their settings and the cases
    finished so far (``cases``), so that rerunning the same command finishes only the missing cases."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return write_manifest(folder, {"kind": kind, **fields, "complete": False})


def require_complete(folder: str | Path) -> dict | None:
    """The folder's manifest, or None for a folder without one (label maps from another tool).

    Raises:
        UserError: the manifest says the folder is incomplete (an interrupted ``predict`` or ``merge``).
    """
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("complete") is False:
        raise UserError(
            f"{Path(folder)}: incomplete: rerun predict (its {MANIFEST} says that a "
            f"{manifest.get('kind', 'predict')} "
            "run into this folder did not finish; rerunning it finishes the missing cases)"
        )
    return manifest
