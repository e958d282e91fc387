"""NIfTI reading and writing that keeps affine and header, with atomic writes (docs/method.md "Data",
"Inference").

Every write goes to a temporary file in the destination folder that is renamed onto the destination only
once it is complete (``os.replace``), so an interrupted run never leaves a truncated file behind. The
temporary name keeps the destination's extension (``.tmp-<pid>-<name>.nii.gz``) because nibabel infers
the format, and the compression, from it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from brats_lightning.data.layout import MODALITIES, Case


class VolumeReadError(OSError):
    """A NIfTI file could not be read (missing, truncated, corrupt, not NIfTI)."""


READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError,
)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    If the body raises, the temporary file is removed and ``path`` (if it existed) is left untouched.

    Example:
        >>> with atomic_path("out/seg.nii.gz") as tmp:  # doctest: +SKIP
        ...     image.to_filename(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def load_image(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI file (header only; voxels are read lazily), with a clear error when it can't be read."""
    path = Path(path)
    try:
        return nib.load(path)
    except FileNotFoundError:
        raise VolumeReadError(f"{path} does not exist: check the path or the data set layout") from None
    except READ_ERRORS as err:
        raise VolumeReadError(
            f"could not read the header of {path} ({type(err).__name__}: {err}); expected a NIfTI "
            f"file: re-download or re-export it") from err


def read_voxels(image: nib.Nifti1Image, path: str | Path, dtype: type | None = None) -> np.ndarray:
    """Read all voxels of an opened image (scaled by the header's slope/intercept if any).

    Args:
        image: from :func:`load_image`.
        path: the file, for error messages.
        dtype: convert to this dtype (None keeps what the file gives: the stored dtype unless scaled).
    """
    try:
        data = np.asanyarray(image.dataobj)
    except READ_ERRORS as err:
        raise VolumeReadError(
            f"could not read the voxels of {path} ({type(err).__name__}: {err}); the file is truncated "
            f"or corrupt: re-download or re-export it") from err
    return np.asarray(data, dtype=dtype) if dtype is not None else np.asarray(data)


def load_volume(path: str | Path, dtype: type | None = np.float32) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read one volume: (voxels, image). Images come as float32; pass ``dtype=None`` for the stored dtype."""
    image = load_image(path)
    return read_voxels(image, path, dtype), image


def to_label_map(data: np.ndarray, path: str | Path) -> np.ndarray:
    """Convert a label volume to uint8, refusing non-integer or out-of-range values."""
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise ValueError(f"label map {path} holds non-finite values; expected integer labels: "
                             "re-export the segmentation")
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            bad = np.unique(data[rounded != data])[:5]
            raise ValueError(f"label map {path} holds non-integer values (e.g. {bad.tolist()}); expected "
                             "integer labels: re-export it with nearest-neighbour interpolation")
        data = rounded
    if data.size and (data.min() < 0 or data.max() > 255):
        raise ValueError(f"label map {path} holds values outside 0..255 (min {data.min()}, max "
                         f"{data.max()}); expected BraTS labels: check that this is a segmentation")
    return data.astype(np.uint8)


def load_case(case: Case) -> tuple[np.ndarray, np.ndarray | None, nib.Nifti1Image]:
    """Read a case: images float32 (4, X, Y, Z) in MODALITIES order, label map uint8 or None, t1 image.

    The t1 image is the reference for the grid, affine and header when writing predictions.

    Raises:
        VolumeReadError: a file can't be read.
        ValueError: the files' shapes differ, or the label map is not integer.
    """
    reference = load_image(case.images[0])
    shape = tuple(reference.shape)
    images = np.empty((len(MODALITIES), *shape), dtype=np.float32)
    for channel, (modality, path) in enumerate(zip(MODALITIES, case.images, strict=True)):
        image = reference if channel == 0 else load_image(path)
        if tuple(image.shape) != shape:
            raise ValueError(
                f"case {case.case_id}: {modality} {path.name} has shape {tuple(image.shape)}, t1 has "
                f"{shape}; expected all modalities on one grid: re-register or re-export the case")
        images[channel] = read_voxels(image, path, np.float32)
    labels = None
    if case.seg is not None:
        seg_image = load_image(case.seg)
        if tuple(seg_image.shape) != shape:
            raise ValueError(
                f"case {case.case_id}: seg {case.seg.name} has shape {tuple(seg_image.shape)}, t1 has "
                f"{shape}; expected the label map on the images' grid: re-export the segmentation")
        labels = to_label_map(read_voxels(seg_image, case.seg), case.seg)
    return images, labels, reference


def save_volume(data: np.ndarray, reference: nib.Nifti1Image, path: str | Path, dtype: type) -> Path:
    """Write ``data`` as ``dtype`` on ``reference``'s grid (its affine and header), atomically.

    Raises:
        ValueError: ``data``'s shape differs from the reference grid.
    """
    data = np.asarray(data)
    if tuple(data.shape[:3]) != tuple(reference.shape[:3]):
        raise ValueError(f"cannot write {path}: data shape {data.shape} differs from the reference grid "
                         f"{tuple(reference.shape)}; paste it back into the original grid first (uncrop)")
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    image = nib.Nifti1Image(data.astype(dtype, copy=False), reference.affine, header=header)
    if np.dtype(dtype).kind in "iu" and data.dtype.kind in "iub":
        image.header.set_slope_inter(1.0, 0.0)  # integers are written as they are, never rescaled
    path = Path(path)
    with atomic_path(path) as tmp:
        image.to_filename(tmp)
    return path


def save_label_map(labels: np.ndarray, reference: nib.Nifti1Image, path: str | Path) -> Path:
    """Write a label map as uint8 on ``reference``'s grid (its affine and header), atomically."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        labels = to_label_map(labels, path)
    return save_volume(labels.astype(np.uint8, copy=False), reference, path, np.uint8)
