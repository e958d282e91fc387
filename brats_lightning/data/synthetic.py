"""A synthetic BraTS-like data set on real anatomy: the suite's embedded default data (docs/method.md "Data").

Real BraTS data can't be redistributed, so tests, demos and the CPU recipe run on cases generated here.
Each case starts from the MNI152 2009 templates shipped inside nilearn (T1 brain mask, grey and white
matter probability maps; no network access), placed in the BraTS 240x240x155 grid at 1 mm (or the same
field of view at a coarser ``spacing``), then:

1. a random affine (scale, small rotation, shift) and a smooth random deformation, so brains differ;
2. an irregular glioma in white matter: thresholded smooth noise around an ellipsoid gives the whole
   tumour (edema, label 2, reaching further along white matter), an eccentric tumour core with a necrotic
   centre (label 1) and an enhancing rim (label 4, or 3 with 2023 labels); about 10% of cases have no
   enhancing tumour (the core is all label 1) and about 15% no necrosis (the core is all enhancing);
   surrounding tissue is pushed aside (mass effect); BraTS 2024 post-treatment cases also get a resection
   cavity (label 4, CSF-like contrasts) carved into the tumour from its own random stream;
3. glioma-like contrasts per modality (paper section 1): ET bright on t1ce only, necrosis dark on t1ce,
   edema bright on t2 and flair and darker on t1, CSF bright on t2 and dark on flair, GM/WM contrast
   per modality; per-case jitter of every tissue's intensity;
4. a smooth multiplicative bias field, Rician noise and a random intensity scale per case and modality;
   images stored as int16 like BraTS, clipped to >= 1 inside the brain and exactly 0 outside, so the
   non-zero normalization and the brain box behave as on real data.

File names, case ids and label codes follow the data set chosen by ``year`` and ``task`` in the registry
(:func:`brats_lightning.data.datasets.dataset_for_year`): 2020, 2021, 2023 with any of its sub-challenges
(GLI, MEN, MET, PED, SSA, GoAT), 2024 (post-treatment glioma, which also gets a ``dataset.json`` since its
names are those of 2023 GLI). Case ``k`` depends only on ``(seed, k, spacing, year, task)``: not on the
number of cases or workers; the tumour of 2020, 2021 and 2023 cases is the same apart from its codes.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from brats_lightning.data.datasets import MODALITIES, TASKS, DataSet, dataset_for_year
from brats_lightning.data.io import atomic_path, save_volume
from brats_lightning.data.labels import LabelConvention
from brats_lightning.data.layout import DATASET_FILE
from brats_lightning.errors import UserError

log = logging.getLogger(__name__)

BRATS_GRID_MM: tuple[int, int, int] = (240, 240, 155)
YEARS: tuple[int, ...] = (2020, 2021, 2023, 2024)

# Tissue intensities relative to T1 white matter, rows in MODALITIES order (t1, t1ce, t2, flair),
# columns: CSF, GM, WM, edema, necrosis / non-enhancing core, enhancing tumour.
TISSUES: tuple[str, ...] = ("csf", "gm", "wm", "edema", "necrosis", "enhancing")
CSF, GM, WM = 1, 2, 3  # codes of SyntheticCase.tissue (0 is background)
CONTRASTS = np.array([
    # csf   gm    wm    ed    ncr   et
    [0.30, 0.68, 1.00, 0.62, 0.40, 0.72],  # t1: tumour hypo-intense, edema darker than WM
    [0.30, 0.68, 1.00, 0.62, 0.32, 1.65],  # t1ce: enhancing rim bright, necrosis dark
    [2.20, 1.20, 0.78, 1.90, 2.00, 1.25],  # t2: CSF and edema bright
    [0.28, 1.05, 0.78, 1.65, 1.05, 1.30],  # flair: CSF suppressed, edema bright
], dtype=np.float64)


def case_id_for(index: int, year: int, task: str | None = None) -> str:
    """BraTS-style id of synthetic case ``index`` (1-based): BraTS20_Training_001, BraTS2021_00001,
    BraTS-GLI-00001-000, BraTS-MEN-00001-000, ..."""
    return _dataset(year, task).case_id(index)


def _dataset(year: int, task: str | None) -> DataSet:
    if year not in YEARS:
        raise ValueError(f"unsupported year {year}; expected one of {YEARS}")
    return dataset_for_year(year, task)


def grid_for(spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of the BraTS field of view at ``spacing`` mm: round(240/s)^2 x round(155/s).

    The affine has BraTS's axis directions (x and y decreasing, z increasing) and puts the grid centre
    at the world origin.
    """
    if spacing <= 0:
        raise ValueError(f"spacing must be positive; got {spacing}")
    shape = tuple(int(round(n / spacing)) for n in BRATS_GRID_MM)
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    half = [spacing * (n - 1) / 2 for n in shape]
    affine[:3, 3] = [half[0], half[1], -half[2]]
    return shape, affine  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def _mni_templates() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """nilearn's MNI152 2009 T1, GM and WM maps at 1 mm (float32), flipped from RAS to BraTS's x and y
    directions."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    if not np.allclose(np.abs(np.diag(t1.affine)[:3]), 1.0):
        raise RuntimeError(f"nilearn's MNI152 template is not 1 mm (affine {t1.affine.tolist()})")
    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    t1_map, gm_map, wm_map = (np.ascontiguousarray(np.asarray(img.dataobj, dtype=np.float32)[::-1, ::-1, :])
                              for img in (t1, gm, wm))
    return t1_map, gm_map, wm_map


@functools.lru_cache(maxsize=2)
def _templates(spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Brain mask, GM and WM maps (1 mm template grid) and the brain centre in template voxels, smoothed
    to the output voxel size when it is coarser than 1 mm (partial volume, no aliasing)."""
    t1_map, gm_map, wm_map = _mni_templates()
    mask = (t1_map > 0).astype(np.float32)
    if spacing > 1.0:
        sigma = np.sqrt(spacing**2 - 1.0) / 2.355
        mask, gm_map, wm_map = (ndimage.gaussian_filter(a, sigma) for a in (mask, gm_map, wm_map))
    nz = np.argwhere(t1_map > 0)
    centre = (nz.min(axis=0) + nz.max(axis=0)) / 2.0
    return mask, gm_map, wm_map, centre.astype(np.float64)


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix from three angles (radians) about x, y, z."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class _SmoothField:
    """A smooth random scalar field: a sum of separable cosine products, evaluated on axis grids."""

    freqs: np.ndarray  # (terms, 3) cycles per mm
    phases: np.ndarray  # (terms, 3)
    amps: np.ndarray  # (terms,)

    @classmethod
    def draw(cls, rng: np.random.Generator, terms: int, amplitude: float, periods: tuple[float, float]
             ) -> _SmoothField:
        freqs = 1.0 / rng.uniform(*periods, size=(terms, 3))
        phases = rng.uniform(0, 2 * np.pi, size=(terms, 3))
        amps = rng.normal(0.0, amplitude, size=terms)
        return cls(freqs, phases, amps)

    def __call__(self, axes: list[np.ndarray]) -> np.ndarray:
        """Evaluate on the grid spanned by three 1-D coordinate arrays (mm); returns float32."""
        shape = tuple(len(a) for a in axes)
        cos = [np.cos(2 * np.pi * self.freqs[:, i, None] * axes[i][None, :] + self.phases[:, i, None])
               for i in range(3)]  # (terms, n_i) each
        plane = self.amps[:, None, None] * cos[0][:, :, None] * cos[1][:, None, :]  # (terms, X, Y)
        # sum over terms of plane (X, Y) x cz (Z): one matrix product
        out = plane.reshape(len(self.amps), -1).T.astype(np.float32) @ cos[2].astype(np.float32)
        return out.reshape(shape)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation (float32)."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), max(sigma_vox, 0.5))
    return noise / max(float(noise.std()), 1e-6)


@dataclass(frozen=True)
class CaseParameters:
    """Every random choice of one case that does not depend on the grid (see :func:`case_parameters`)."""

    matrix: np.ndarray  # output mm -> template voxels (scale and rotation)
    shift: np.ndarray  # template voxels
    deform: tuple[_SmoothField, ...]  # mm displacement per axis
    r_wt: float  # whole-tumour radius, mm
    pick_u: float  # which white-matter candidate holds the tumour centre
    pick_offset: np.ndarray
    push: float  # mass effect strength
    radii: np.ndarray  # whole-tumour ellipsoid semi-axes, mm
    t_rot: np.ndarray  # tumour orientation
    f_tc: float  # core size relative to the whole tumour
    tc_offset: np.ndarray  # core centre offset, mm
    f_ncr: float  # necrosis size relative to the core
    has_et: bool
    has_ncr: bool
    contrasts: np.ndarray  # CONTRASTS with per-case jitter
    biases: tuple[_SmoothField, ...]  # log bias field per modality
    sigmas: np.ndarray  # Rician noise level per modality (relative to T1 WM)
    scales: np.ndarray  # stored intensity scale per modality


def case_parameters(seed: int, index: int) -> CaseParameters:
    """The random choices of case ``index`` of data set ``seed`` (about 10% of cases get no enhancing
    tumour, 15% no necrosis)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0]))
    scale = np.array([rng.uniform(0.88, 1.0), rng.uniform(0.88, 1.0), rng.uniform(0.85, 0.92)])
    rot = _rotation(np.deg2rad(rng.uniform(-6, 6, size=3)))
    shift = rng.uniform(-5, 5, size=3) * np.array([1, 1, 0.4])
    deform = tuple(_SmoothField.draw(rng, 4, 4.0, (60.0, 160.0)) for _ in range(3))
    r_wt = float(rng.uniform(18.0, 34.0))
    pick_u, pick_offset = float(rng.random()), rng.random(3)
    push = float(rng.uniform(0.15, 0.35) * (r_wt / 34.0))
    radii = r_wt * rng.uniform(0.75, 1.2, size=3)
    t_rot = _rotation(rng.uniform(0, 2 * np.pi, size=3))
    f_tc = float(rng.uniform(0.45, 0.75))
    tc_offset = rng.normal(0.0, 0.12 * r_wt, size=3)
    f_ncr = float(rng.uniform(0.45, 0.8))
    kind = float(rng.random())
    contrasts = CONTRASTS * np.exp(rng.normal(0.0, 0.06, size=CONTRASTS.shape))
    biases = tuple(_SmoothField.draw(rng, 3, 0.12, (120.0, 300.0)) for _ in MODALITIES)
    sigmas = rng.uniform(0.015, 0.04, size=len(MODALITIES))
    scales = rng.uniform(300.0, 1200.0, size=len(MODALITIES))
    return CaseParameters(
        matrix=rot @ np.diag(1.0 / scale), shift=shift, deform=deform, r_wt=r_wt, pick_u=pick_u,
        pick_offset=pick_offset, push=push, radii=radii, t_rot=t_rot, f_tc=f_tc, tc_offset=tc_offset,
        f_ncr=f_ncr, has_et=kind >= 0.10, has_ncr=not 0.10 <= kind < 0.25, contrasts=contrasts,
        biases=biases, sigmas=sigmas, scales=scales)


@dataclass
class SyntheticCase:
    """One generated case: int16 images (4, X, Y, Z), uint8 labels (X, Y, Z), the affine, the healthy
    tissue map (uint8: 0 background, 1 CSF, 2 GM, 3 WM; not written to disk) and a summary."""

    case_id: str
    images: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray
    centre: tuple[int, int, int]
    info: dict


def _cavity(seed: int, index: int, lu: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """A resection cavity (bool, local tumour box): a smooth ellipsoid off the core centre, drawn from its
    own stream so that the tumour around it is the one the other years get."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 2]))
    direction = rng.normal(size=3)
    centre = direction / np.linalg.norm(direction) * rng.uniform(0.2, 0.45) * float(radii.min())
    semi = float(radii.min()) * rng.uniform(0.35, 0.55, size=3)
    rel = lu - centre[:, None, None, None].astype(np.float32)
    return sum((rel[i] / np.float32(semi[i])) ** 2 for i in range(3)) < 1.0


def synthesize_case(index: int, seed: int = 0, spacing: float = 1.0, year: int = 2020,
                    task: str | None = None) -> SyntheticCase:
    """Generate synthetic case ``index`` (1-based) of the data set with ``seed`` (see the module doc)."""
    dataset = _dataset(year, task)
    convention: LabelConvention = dataset.convention
    # grid-independent choices come from one stream, noise arrays (sized by the grid) from another, so a
    # case's anatomy, tumour kind and contrasts are the same whatever the spacing
    params = case_parameters(seed, index)
    noise_rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 1]))
    shape, affine = grid_for(spacing)
    mask_t, gm_t, wm_t, tpl_centre = _templates(float(spacing))
    s = float(spacing)
    centre_vox = (np.array(shape) - 1) / 2.0
    matrix, shift, deform, r_wt = params.matrix, params.shift, params.deform, params.r_wt
    radii, t_rot, tc_offset = params.radii, params.t_rot, params.tc_offset
    f_tc, f_ncr, has_et, has_ncr = params.f_tc, params.f_ncr, params.has_et, params.has_ncr
    contrasts = params.contrasts

    def axes_mm(start: np.ndarray, stop: np.ndarray, step: int = 1) -> list[np.ndarray]:
        return [((np.arange(a, b, step) - c) * s).astype(np.float32)
                for a, b, c in zip(start, stop, centre_vox, strict=True)]

    def template_coords(axes: list[np.ndarray], warped: list[np.ndarray] | None = None) -> np.ndarray:
        """Template voxel coordinates (3, *grid) of output points (the axes grid or its warped version)."""
        grid = warped if warped is not None else [
            axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]]
        full = tuple(len(a) for a in axes)
        moved = np.empty((3, int(np.prod(full))), dtype=np.float32)
        for k in range(3):
            moved[k] = (grid[k] + deform[k](axes)).reshape(-1)
        coords = matrix.astype(np.float32) @ moved  # one small matrix product over all points
        coords += (tpl_centre + shift).astype(np.float32)[:, None]
        return coords.reshape(3, *full)

    def sample(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0, prefilter=False,
                                       output=np.float32)

    # --- coarse pass (~4 mm): brain extent and a white-matter location for the tumour
    stride = max(1, int(round(4.0 / s)))
    zero = np.zeros(3, dtype=int)
    coarse_axes = axes_mm(zero, np.array(shape), stride)
    coarse = template_coords(coarse_axes)
    coarse_mask = sample(mask_t, coarse) > 0.5
    coarse_wm = sample(wm_t, coarse)
    nz = np.argwhere(coarse_mask)
    if nz.size == 0:
        raise RuntimeError(f"synthetic case {index}: the template brain fell outside the grid {shape}")
    margin = int(np.ceil(10.0 / s))
    lo = np.maximum(nz.min(axis=0) * stride - margin, 0)
    hi = np.minimum(nz.max(axis=0) * stride + margin + 1, shape)
    depth = ndimage.distance_transform_edt(coarse_mask, sampling=stride * s)
    zc = coarse_axes[2]
    z_lo, z_hi = zc[nz[:, 2].min()], zc[nz[:, 2].max()]
    # cerebral hemispheres, away from the vertex: 30-75% of the brain's height (gliomas are supratentorial)
    band = (zc > z_lo + 0.3 * (z_hi - z_lo)) & (zc < z_lo + 0.75 * (z_hi - z_lo))
    ok = (coarse_wm > 0.6) & (depth >= 14.0) & band[None, None, :]
    if not ok.any():
        ok = (coarse_wm > 0.5) & (depth >= 8.0)
    candidates = np.argwhere(ok)
    pick = (candidates[int(params.pick_u * len(candidates))] * stride
            + (params.pick_offset * stride).astype(int))
    tumour_vox = np.clip(pick, lo, hi - 1)
    c_mm = ((tumour_vox - centre_vox) * s).astype(np.float32)

    # --- full-resolution pass inside the brain's box, with mass effect around the tumour
    axes = axes_mm(lo, hi)
    u = [axes[0][:, None, None] - c_mm[0], axes[1][None, :, None] - c_mm[1],
         axes[2][None, None, :] - c_mm[2]]
    r2 = u[0] ** 2 + u[1] ** 2 + u[2] ** 2
    factor = (1.0 - params.push * np.exp(-r2 / (2.0 * (0.9 * r_wt) ** 2))).astype(np.float32)
    warped = [(c_mm[k] + u[k] * factor).astype(np.float32) for k in range(3)]
    coords = template_coords(axes, warped)
    brain = sample(mask_t, coords) > 0.5
    inside = coords[:, brain]  # tissue maps are only needed inside the brain
    gm = np.zeros(brain.shape, dtype=np.float32)
    wm = np.zeros(brain.shape, dtype=np.float32)
    gm[brain] = np.clip(sample(gm_t, inside), 0.0, 1.0)
    wm[brain] = np.clip(sample(wm_t, inside), 0.0, 1.0)
    del inside
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    del coords, warped, r2, factor
    out_box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    tissue = np.zeros(shape, dtype=np.uint8)
    is_wm = brain & (wm >= gm) & (wm >= csf)
    is_gm = brain & ~is_wm & (gm >= csf)
    tissue[out_box] = np.where(is_wm, WM, np.where(is_gm, GM, np.where(brain, CSF, 0))).astype(np.uint8)

    # --- tumour labels in a local box around the centre
    half = int(np.ceil(1.4 * radii.max() / s)) + 2  # the whole tumour reaches at most 1.375 radii
    local_c = tumour_vox - lo
    llo = np.maximum(local_c - half, 0)
    lhi = np.minimum(local_c + half + 1, hi - lo)
    box = tuple(slice(a, b) for a, b in zip(llo, lhi, strict=True))
    lshape = tuple(int(b - a) for a, b in zip(llo, lhi, strict=True))
    local_axes = [(np.arange(a, b) - c) * s for a, b, c in zip(llo, lhi, local_c, strict=True)]
    lu = np.stack(np.meshgrid(*local_axes, indexing="ij")).astype(np.float32)

    def ellipsoid(offset: np.ndarray, semi: np.ndarray) -> np.ndarray:
        rel = lu - offset[:, None, None, None].astype(np.float32)
        v = np.tensordot(t_rot.T.astype(np.float32), rel, axes=1)
        return np.sqrt(sum((v[i] / semi[i]) ** 2 for i in range(3)))

    n_wt = _smooth_noise(noise_rng, lshape, 7.0 / s)
    n_tc = _smooth_noise(noise_rng, lshape, 4.0 / s)
    n_tex = _smooth_noise(noise_rng, lshape, 2.0 / s)
    n_ncr = _smooth_noise(noise_rng, lshape, 3.0 / s)
    lbrain = brain[box]
    # irregular border (smooth noise), reaching further along white matter, sparing CSF spaces
    reach = 1.0 + 0.25 * np.tanh(n_wt) + 0.25 * (wm[box] - 0.5)
    wt = (ellipsoid(np.zeros(3), radii) < reach) & lbrain & (csf[box] < 0.6)
    d_tc = ellipsoid(tc_offset, radii * f_tc) + 0.15 * n_tc
    r_tc = f_tc * radii.min()
    f_ncr = min(f_ncr, 1.0 - 1.6 * s / r_tc) if has_et and has_ncr else f_ncr
    tc = (d_tc < 1.0) & lbrain
    cvox = tuple(int(v) for v in local_c - llo)
    tc[cvox] = True
    ncr = tc & (d_tc + 0.12 * n_ncr < f_ncr) if has_ncr else np.zeros_like(tc)
    wt |= tc
    parts, _ = ndimage.label(wt)  # one lesion: drop edema islands not connected to the core
    wt = np.isin(parts, np.unique(parts[tc]))
    local_labels = np.zeros(lshape, dtype=np.uint8)
    local_labels[wt] = convention.ed
    if not has_et:
        local_labels[tc] = convention.ncr
    else:
        local_labels[tc] = convention.et
        local_labels[ncr] = convention.ncr
    if convention.rc is not None:  # BraTS 2024: the resection cavity replaces part of the tumour
        local_labels[_cavity(seed, index, lu, radii) & lbrain] = convention.rc

    # --- intensities
    blur = 0.7 / s
    soft = {}
    regions = [("edema", wt & ~tc & (local_labels == convention.ed) if convention.rc else wt & ~tc),
               ("necrosis", local_labels == convention.ncr), ("enhancing", local_labels == convention.et)]
    if convention.rc is not None:
        regions.append(("cavity", local_labels == convention.rc))
    for name, region in regions:
        weight = region.astype(np.float32)
        soft[name] = ndimage.gaussian_filter(weight, blur) if blur >= 0.3 else weight
    healthy_w = np.clip(1.0 - soft["edema"] - soft["necrosis"] - soft["enhancing"], 0.0, 1.0)
    if "cavity" in soft:
        healthy_w = np.clip(healthy_w - soft["cavity"], 0.0, 1.0)
    texture = 1.0 + 0.07 * n_tex
    brain_idx = np.flatnonzero(brain)
    bshape = brain.shape
    images = np.zeros((len(MODALITIES), *shape), dtype=np.int16)
    for m in range(len(MODALITIES)):
        mu = contrasts[m]
        vol = (csf * np.float32(mu[0]) + gm * np.float32(mu[1]) + wm * np.float32(mu[2])).astype(np.float32)
        local = vol[box]
        tumour = (soft["edema"] * (0.25 * local + 0.75 * mu[3])
                  + (soft["necrosis"] * mu[4] + soft["enhancing"] * mu[5]) * texture)
        if "cavity" in soft:  # fluid: the CSF contrasts
            tumour = tumour + soft["cavity"] * mu[0]
        vol[box] = healthy_w * local + tumour
        vol *= np.exp(params.biases[m](axes))
        sigma = np.float32(params.sigmas[m])
        values = vol.ravel()[brain_idx]
        n1 = noise_rng.standard_normal(values.size, dtype=np.float32)
        n2 = noise_rng.standard_normal(values.size, dtype=np.float32)
        values = np.sqrt((values + sigma * n1) ** 2 + (sigma * n2) ** 2) * np.float32(params.scales[m])
        stored = np.zeros(bshape, dtype=np.int16).ravel()
        stored[brain_idx] = np.clip(np.rint(values), 1, 32767).astype(np.int16)
        images[m][out_box] = stored.reshape(bshape)

    labels = np.zeros(shape, dtype=np.uint8)
    full_box = tuple(slice(a + c.start, a + c.stop) for a, c in zip(lo, box, strict=True))
    labels[full_box] = local_labels
    counts = {str(v): int(np.count_nonzero(labels == v)) for v in convention.labels[1:]}
    info = {"index": index, "seed": seed, "spacing": s, "tumour_radius_mm": round(float(r_wt), 1),
            "has_et": bool(has_et), "has_necrosis": bool(has_ncr and (labels == convention.ncr).any()),
            "label_voxels": counts, "intensity_scale": np.round(params.scales, 1).tolist(),
            "noise_sigma": np.round(params.sigmas, 4).tolist()}
    return SyntheticCase(dataset.case_id(index), images, labels, affine, tissue,
                         tuple(int(v) for v in tumour_vox), info)  # type: ignore[arg-type]


def _reference_image(shape: tuple[int, ...], affine: np.ndarray) -> nib.Nifti1Image:
    image = nib.Nifti1Image(np.zeros(shape, dtype=np.int16), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image


def write_case(out: str | Path, index: int, seed: int = 0, spacing: float = 1.0, year: int = 2020,
               task: str | None = None) -> Path:
    """Generate case ``index`` and write its five files in BraTS layout under ``out``; returns the folder."""
    case = synthesize_case(index, seed, spacing, year, task)
    naming = _dataset(year, task).naming
    folder = Path(out) / case.case_id
    folder.mkdir(parents=True, exist_ok=True)
    reference = _reference_image(case.labels.shape, case.affine)
    for modality, volume in zip(MODALITIES, case.images, strict=True):
        save_volume(volume, reference, folder / naming.filename(case.case_id, modality), np.int16)
    save_volume(case.labels, reference, folder / naming.filename(case.case_id, "seg"), np.uint8)
    return folder


def _write_case_job(args: tuple[str, int, int, float, int, str | None]) -> str:
    return str(write_case(*args))


def generate_dataset(
    out: str | Path,
    n_cases: int,
    seed: int = 0,
    spacing: float = 1.0,
    year: int = 2020,
    task: str | None = None,
    preview: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write ``n_cases`` synthetic cases (ids 1..n_cases) in BraTS layout under ``out``.

    Args:
        out: data set folder (created).
        n_cases: number of cases.
        seed: data set seed; case k's content depends only on (seed, k, spacing, year, task).
        spacing: voxel size in mm (1.0 gives BraTS's 240x240x155 grid).
        year: 2020 or 2021 (labels 0/1/2/4), 2023 (BraTS-<task> naming, ET label 3) or 2024 (post-treatment
            glioma: 2023 GLI names, a resection cavity label 4, and a dataset.json declaring the set).
        task: the 2023 sub-challenge (GLI, MEN, MET, PED, SSA, GoAT; None: GLI).
        preview: write a PNG of case 1 (one axial slice per modality with the label overlay).
        workers: worker processes (None: CPU count, at most 8; 1 generates in this process).
        progress: show a rich progress bar.

    Returns:
        The case folders, sorted.
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1; got {n_cases}")
    dataset = _dataset(year, task)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from brats_lightning.data.preprocess import default_workers

    workers = min(default_workers() if workers is None else max(1, int(workers)), n_cases)
    jobs = [(str(out), k, int(seed), float(spacing), int(year), task) for k in range(1, n_cases + 1)]
    start = time.perf_counter()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    folders: list[Path] = []
    with Progress(*columns, transient=False, disable=not progress) as bar:
        bar_task = bar.add_task("synthetic cases", total=n_cases)
        if workers == 1:
            for job in jobs:
                folders.append(Path(_write_case_job(job)))
                bar.advance(bar_task)
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                for folder in pool.map(_write_case_job, jobs):
                    folders.append(Path(folder))
                    bar.advance(bar_task)
    elapsed = time.perf_counter() - start
    if not dataset.by_name:  # names shared with another data set: the folder says which one it is
        with atomic_path(out / DATASET_FILE) as tmp:
            tmp.write_text(json.dumps({"dataset": dataset.name}) + "\n")
    with atomic_path(out / "synthetic.json") as tmp:
        tmp.write_text(json.dumps({"generator": "brats_lightning.data.synthetic", "n_cases": n_cases,
                                   "seed": seed, "spacing": spacing, "year": year, "task": task,
                                   "dataset": dataset.name, "seconds": round(elapsed, 2),
                                   "workers": workers}, indent=1) + "\n")
    log.info("wrote %d synthetic cases to %s in %.1f s (%d workers)", n_cases, out, elapsed, workers)
    if preview is not None:
        write_preview(_preview_case(folders, dataset), preview, dataset)
    return sorted(folders)


def _preview_case(folders: list[Path], dataset: DataSet) -> Path:
    """The first case whose label map holds every label (else the first case)."""
    from brats_lightning.data.io import load_volume
    from brats_lightning.data.layout import find_cases

    for folder in sorted(folders):
        case = find_cases(folder, dataset=dataset)[0]
        if case.seg is not None:
            seg, _ = load_volume(case.seg, dtype=None)
            if set(case.convention.labels) <= set(np.unique(seg).tolist()):
                return folder
    return sorted(folders)[0]


LABEL_COLOURS = {"et": (1.0, 0.0, 0.0), "ncr": (0.0, 0.85, 0.0), "ed": (1.0, 0.9, 0.0), "rc": (0.2, 0.5, 1.0)}
"""Overlay colour per label role of a convention (named by the convention's class names in the legend)."""


def write_preview(case_folder: str | Path, png: str | Path, dataset: DataSet | None = None) -> Path:
    """PNG of one case: an axial slice per modality through the tumour centre, without and with the label
    overlay (ET red, NCR/NET (NETC) green, ED (SNFH) yellow, as in the paper's Fig. 1; RC blue).
    ``dataset``: the case's data set (None: from its names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from brats_lightning.data.io import load_case
    from brats_lightning.data.layout import find_cases

    case = find_cases(case_folder, dataset=dataset)[0]
    images, labels, _ = load_case(case)
    conv = case.convention
    codes = {role: getattr(conv, role) for role in LABEL_COLOURS if getattr(conv, role) is not None}
    if labels is None or not labels.any():
        z = images.shape[-1] // 2
    else:  # the centre of the tumour core (of the whole tumour when there is no core)
        core = np.isin(labels, (conv.ncr, conv.et))
        z = int(round(np.argwhere(core if core.any() else labels > 0)[:, 2].mean()))
    brain = np.argwhere((images[:, :, :, z] > 0).any(axis=0))
    pad = max(2, images.shape[1] // 48)
    (x0, y0), (x1, y1) = np.maximum(brain.min(axis=0) - pad, 0), brain.max(axis=0) + pad + 1
    fig, axes = plt.subplots(2, 4, figsize=(9.6, 6.2), facecolor="black")
    for m, name in enumerate(MODALITIES):
        sl = images[m, x0:x1, y0:y1, z].T  # rows: anterior -> posterior; columns: patient right -> left
        voxels = images[m][images[m] > 0]
        vmax = np.percentile(voxels, 99.5) if voxels.size else 1.0
        for row in range(2):
            ax = axes[row, m]
            ax.imshow(sl, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
            if row == 1 and labels is not None:
                lab = labels[x0:x1, y0:y1, z].T
                rgba = np.zeros((*lab.shape, 4))
                for role, code in codes.items():
                    rgba[lab == code] = (*LABEL_COLOURS[role], 0.45)
                ax.imshow(rgba, interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(name, color="white", fontsize=11)
    handles = [Patch(color=LABEL_COLOURS[role], label=conv.names[code]) for role, code in codes.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white",
               fontsize=10)
    fig.suptitle(f"{case.case_id} (synthetic), axial slice {z}", color="white", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=80, facecolor="black", format="png")
    plt.close(fig)
    return png


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``brats-lightning synth``."""
    parser.add_argument("--out", type=Path, required=True, help="data set folder to write")
    parser.add_argument("--cases", type=int, default=20, help="number of cases (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (default 0)")
    parser.add_argument("--spacing", type=float, default=1.0,
                        help="voxel size in mm (default 1: BraTS's 240x240x155 grid; 2 gives 120x120x78)")
    parser.add_argument("--year", type=int, choices=YEARS, default=2020,
                        help="naming and labels: 2020/2021 (ET=4), 2023 (BraTS-<task>, ET=3) or 2024 "
                             "(post-treatment glioma: 2023 GLI names, ET=3, resection cavity 4)")
    parser.add_argument("--task", choices=TASKS, default=None,
                        help="2023 sub-challenge (names BraTS-<TASK>-...; default GLI)")
    parser.add_argument("--preview", type=Path, default=None, help="write a PNG preview of the first case")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: CPU count, at most 8)")


def run(args: argparse.Namespace) -> int:
    """Generate the data set and print where it went."""
    from rich.console import Console

    start = time.perf_counter()
    try:
        dataset = _dataset(args.year, args.task)
    except ValueError as err:
        raise UserError(f"synth: {err}") from None
    folders = generate_dataset(args.out, args.cases, seed=args.seed, spacing=args.spacing, year=args.year,
                               task=args.task, preview=args.preview, workers=args.workers)
    shape, _ = grid_for(args.spacing)
    message = (f"wrote {len(folders)} synthetic cases ({args.year} naming, {dataset.name}, "
               f"{shape[0]}x{shape[1]}x{shape[2]} at "
               f"{args.spacing:g} mm, seed {args.seed}) to {args.out} in {time.perf_counter() - start:.1f} s")
    if args.preview is not None:
        message += f"; preview: {args.preview}"
    Console().print(message)
    return 0
