"""3D look-alike cohorts with copies made in 3D, written as NIfTI folders (the volume-level benchmark, issue 15).

BENCHMARK.md's *3D* family: copies made in 3D (noise, flips, rotations about any axis, shifts including
fractions of a slice through-plane, resampling to another voxel size, partial slab copies), novel subjects
and holdout volumes, scored per volume. The subjects are those of :mod:`benchmarks.cohort`: the MNI152 T1w
template (:func:`benchmarks.cohort.template`) under a seeded deformation, affine jitter, bias field, gamma
and Rician noise, resampled at 1.5 mm (:func:`benchmarks.cohort.subject_volume`). Subject seeds come from
``sha256("vol3d:{seed}:{code}:{k}")`` (code 0 train, 1 holdout, 2 novel), a different prefix from the 2D
cohort's ``cohort:``, so these subjects are not the 2D cohort's.

Layout written by :func:`make_volume_cohort` under ``root``::

    train/sub-000.nii.gz ...       training subjects T
    holdout/hold-000.nii.gz ...    unseen subjects H (calibration)
    synthetic/syn-000.nii.gz ...   copies and novel subjects, in a seeded random order
    synthetic/labels.csv           path,label,source,augmentation (read by inspector.io.read_labels)
    manifest.json                  parameters, seeds, counts, per synthetic file its condition, source and
                                   the transform parameters (the cache key)

Every volume is float32 with the affine ``diag(zooms)`` (RAS, so ``nib.as_closest_canonical`` keeps it and
the product's reader slices it axially along axis 2).

Size. The audit reads every axial slice and the benchmark must run on a 2-core CPU, so by default
(``crop_to_brain=True``) every subject volume is cropped, *before* any condition, to the template head's
bounding box (voxels above 5 % of the template's range, padded by 3 voxels) and to the axial range that
:func:`benchmarks.cohort._axial_slices` uses (22 %-82 % of z: no neck, no vertex), then thinned
through-plane by keeping every ``z_step``-th axial slice (default 2: zooms (1.5, 1.5, 3.0) mm, about 38
axial slices of about 102 x 126 voxels). The conditions then act on that volume in its physical (mm) space:
``thickness`` doubles the slice thickness (6.0 mm), ``resample`` goes to 1.2 or 2.0 mm in-plane and 2.5 or
4.0 mm through-plane. ``crop_to_brain=False, z_step=1`` gives the full 1.5 mm isotropic subjects
(131 x 155 x 126), where ``thickness`` gives 3.0 mm and ``resample`` 1.2 or 2.0 mm isotropic.

Conditions (:data:`CONDITIONS_3D`) are always applied, never with a probability. Each is a function
``fn(vol, rng, zooms=(1.5, 1.5, 1.5), params=None) -> (vol, zooms)``; ``params``, a dict when given, receives
the transform parameters drawn (recorded in the manifest). Geometric conditions resample trilinearly with
:func:`torch.nn.functional.grid_sample` (zeros outside the field of view); a coarser grid is first smoothed
with a Gaussian along that axis (FWHM sqrt(new^2 - old^2), the slice profile of a thicker acquisition).

``python -m benchmarks.volumes3d_data OUT_DIR --train 16 --seed 0`` writes one cohort and logs counts and time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d

from . import cohort as _cohort

__all__ = [
    "CONDITIONS_3D",
    "GENERATOR_VERSION",
    "VolumeCohortInfo",
    "make_volume_cohort",
    "prepare_subject",
    "crop_box",
    "main",
]

log = logging.getLogger(__name__)

#: Version of this generator (part of the cache key, with :data:`benchmarks.cohort.GENERATOR_VERSION`).
GENERATOR_VERSION = "1"
#: Padding of the head's bounding box (voxels of the 1.5 mm grid).
CROP_PAD = 3
#: Foreground threshold of the bounding box, as a fraction of the template's range.
CROP_THRESHOLD = 0.05
#: Axial range kept by the crop, fractions of z (as :func:`benchmarks.cohort._axial_slices`).
AXIAL_RANGE = (0.22, 0.82)
#: Rician noise of the ``noise`` condition, fraction of the volume's range.
NOISE_SIGMA = 0.02
#: The ``thickness`` condition multiplies the through-plane zoom by this (1.5 -> 3.0 mm, 3.0 -> 6.0 mm).
THICKNESS_FACTOR = 2.0

Zooms = tuple[float, float, float]
ConditionFn = Callable[..., tuple[np.ndarray, Zooms]]

_ISO: Zooms = (_cohort.VOXEL_MM,) * 3


# ----------------------------------------------------------------------------------------------
# Resampling in mm
# ----------------------------------------------------------------------------------------------


def _as_zooms(zooms: Sequence[float]) -> Zooms:
    z = tuple(float(v) for v in zooms)
    if len(z) != 3 or not all(math.isfinite(v) and v > 0 for v in z):
        raise ValueError(f"zooms must be three positive numbers (mm); got {zooms!r}")
    return z  # type: ignore[return-value]


def _warp(
    vol: np.ndarray,
    zooms: Zooms,
    *,
    out_shape: tuple[int, int, int] | None = None,
    out_zooms: Zooms | None = None,
    matrix: np.ndarray | None = None,
    shift_mm: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Trilinear resampling of ``vol`` (X, Y, Z) in mm about the volume centres.

    An output voxel at ``p`` mm from the output centre takes the input value at ``matrix @ p + shift_mm`` mm
    from the input centre (so content moves by ``-shift_mm`` and turns by ``matrix^T``). Outside: 0.
    """
    out_shape = tuple(vol.shape) if out_shape is None else tuple(int(s) for s in out_shape)
    out_zooms = zooms if out_zooms is None else out_zooms
    m = torch.from_numpy(np.eye(3) if matrix is None else np.asarray(matrix, np.float64))
    axes = [
        (torch.arange(n, dtype=torch.float64) - (n - 1) / 2.0) * z for n, z in zip(out_shape, out_zooms, strict=True)
    ]
    gx, gy, gz = torch.meshgrid(*axes, indexing="ij")
    p = torch.stack([gx, gy, gz], -1).reshape(-1, 3)
    src = p @ m.T + torch.tensor([float(s) for s in shift_mm], dtype=torch.float64)
    n_in = torch.tensor([float(max(n - 1, 1)) for n in vol.shape], dtype=torch.float64)
    idx = src / torch.tensor(zooms, dtype=torch.float64) + torch.tensor([(n - 1) / 2.0 for n in vol.shape])
    norm = (2.0 * idx / n_in - 1.0).float().reshape(*out_shape, 3)
    # grid_sample reads an input laid out (D, H, W) = (X, Y, Z) with grid coordinates in (W, H, D) order
    grid = norm.flip(-1)[None]
    inp = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None, None]
    out = F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
    return out.clamp_min(0).numpy().astype(np.float32)


def _antialias(vol: np.ndarray, zooms: Zooms, new_zooms: Zooms) -> np.ndarray:
    """Gaussian along every axis whose voxels grow (FWHM sqrt(new^2 - old^2)), before a coarser grid."""
    out = vol
    for ax, (old, new) in enumerate(zip(zooms, new_zooms, strict=True)):
        if new > old * 1.001:
            sigma_vox = math.sqrt(new**2 - old**2) / (2.0 * math.sqrt(2.0 * math.log(2.0))) / old
            out = gaussian_filter1d(out, sigma_vox, axis=ax, mode="nearest")
    return out


def _resample_to(vol: np.ndarray, zooms: Zooms, new_zooms: Zooms) -> tuple[np.ndarray, Zooms]:
    """Same field of view on a new grid: shape ``round(shape * zooms / new_zooms)``, centres aligned."""
    new_zooms = _as_zooms(new_zooms)
    shape = tuple(max(1, int(round(n * z / nz))) for n, z, nz in zip(vol.shape, zooms, new_zooms, strict=True))
    src = _antialias(vol, zooms, new_zooms)
    return _warp(src, zooms, out_shape=shape, out_zooms=new_zooms), new_zooms  # type: ignore[arg-type]


def _rot_matrix(axis: int, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    p, q = (i for i in range(3) if i != axis)
    r = np.eye(3)
    r[p, p], r[p, q], r[q, p], r[q, q] = c, -s, s, c
    return r


def _record(params: dict[str, Any] | None, **kv: Any) -> None:
    if params is not None:
        params.update(kv)


# ----------------------------------------------------------------------------------------------
# Conditions, applied in 3D
# ----------------------------------------------------------------------------------------------


def cond_exact(vol: np.ndarray, rng: np.random.Generator, zooms: Sequence[float] = _ISO, params=None):
    """The volume unchanged (a copy)."""
    return np.array(vol, dtype=np.float32, copy=True), _as_zooms(zooms)


def cond_noise(vol: np.ndarray, rng: np.random.Generator, zooms: Sequence[float] = _ISO, params=None):
    """Rician-like noise: magnitude of the volume plus complex Gaussian noise, sigma 2 % of the range."""
    v = np.asarray(vol, np.float32)
    sigma = float(NOISE_SIGMA * (float(v.max()) - float(v.min())))
    n1 = rng.standard_normal(v.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(v.shape, dtype=np.float32) * sigma
    _record(params, sigma=sigma)
    return np.sqrt((v + n1) ** 2 + n2**2).astype(np.float32), _as_zooms(zooms)


def cond_intensity(vol: np.ndarray, rng: np.random.Generator, zooms: Sequence[float] = _ISO, params=None):
    """Intensity change: a factor in U[0.8, 0.9] or U[1.1, 1.2] and a gamma in U[0.9, 1.1] (on [0, max])."""
    v = np.clip(np.asarray(vol, np.float32), 0, None)
    factor = float(rng.uniform(0.8, 0.9) if rng.random() < 0.5 else rng.uniform(1.1, 1.2))
    gamma = float(rng.uniform(0.9, 1.1))
    hi = float(v.max()) or 1.0
    _record(params, factor=factor, gamma=gamma)
    return (factor * hi * (v / hi) ** gamma).astype(np.float32), _as_zooms(zooms)


def cond_flip(vol: np.ndarray, rng: np.random.Generator, zooms: Sequence[float] = _ISO, params=None):
    """Left-right flip (axis 0 of a RAS volume)."""
    _record(params, axis=0)
    return np.ascontiguousarray(np.asarray(vol, np.float32)[::-1]), _as_zooms(zooms)


def _rotate(vol, rng, zooms, params, deg: float):
    z = _as_zooms(zooms)
    axis = int(rng.integers(3))
    angle = float(deg if rng.random() < 0.5 else -deg)
    r = _rot_matrix(axis, angle)
    _record(params, angle_deg=angle, axis="xyz"[axis])
    # content rotated by r about the centre: an output point p reads the input at r^T p
    return _warp(np.asarray(vol, np.float32), z, matrix=r.T), z


def cond_rot5(vol: np.ndarray, rng: np.random.Generator, zooms: Sequence[float] = _ISO, params=None):
    """Rotation by 5 degrees (sign random) about a random axis x, y or z through the centre, in mm."""
    return _rotate(vol, rng, zooms, params, 5.0)


def cond_rot10(vol: np.ndarray, rng: np.random.Generator, zooms: Sequence[float] = _ISO, params=None):
    """Rotation by 10 degrees (sign random) about a random axis x, y or z through the centre, in mm."""
    return _rotate(vol, rng, zooms, params, 10.0)


def cond_shift(vol: np.ndarray, rng: np.random.Generator, zooms: Sequence[float] = _ISO, params=None):
    """Translation by 3-8 mm in-plane (random direction) and 0.3-0.7 of a slice through-plane (random sign)."""
    z = _as_zooms(zooms)
    mag = float(rng.uniform(3.0, 8.0))
    theta = float(rng.uniform(0.0, 2.0 * math.pi))
    frac = float(rng.uniform(0.3, 0.7)) * (1.0 if rng.random() < 0.5 else -1.0)
    shift = np.array([mag * math.cos(theta), mag * math.sin(theta), frac * z[2]])
    _record(
        params,
        shift_mm=[round(float(s), 4) for s in shift],
        shift_vox=[round(float(s / q), 4) for s, q in zip(shift, z, strict=True)],
    )
    return _warp(np.asarray(vol, np.float32), z, shift_mm=-shift), z


def cond_resample(vol: np.ndarray, rng: np.random.Generator, zooms: Sequence[float] = _ISO, params=None):
    """Resampling to another voxel size over the same field of view.

    In-plane zooms times 0.8 or 4/3 (1.5 -> 1.2 or 2.0 mm); through-plane the same factor when the volume
    is isotropic (1.2 or 2.0 mm isotropic), else times 5/6 or 4/3 (3.0 -> 2.5 or 4.0 mm).
    """
    z = _as_zooms(zooms)
    f_xy = float(rng.choice([0.8, 4.0 / 3.0]))
    iso = abs(z[2] - z[0]) < 1e-6 and abs(z[1] - z[0]) < 1e-6
    f_z = f_xy if iso else float(rng.choice([5.0 / 6.0, 4.0 / 3.0]))
    new = (round(z[0] * f_xy, 4), round(z[1] * f_xy, 4), round(z[2] * f_z, 4))
    out, nz = _resample_to(np.asarray(vol, np.float32), z, new)
    _record(params, zooms=list(nz))
    return out, nz


def _slab(vol, rng, zooms, params, fraction: float):
    z = _as_zooms(zooms)
    n = vol.shape[2]
    k = max(1, int(round(n * fraction)))
    start = int(rng.integers(0, n - k + 1))
    _record(params, slab=[start, start + k])
    return np.ascontiguousarray(np.asarray(vol, np.float32)[:, :, start : start + k]), z


def cond_slab_half(vol: np.ndarray, rng: np.random.Generator, zooms: Sequence[float] = _ISO, params=None):
    """A contiguous half of the axial slices (random position); zooms unchanged."""
    return _slab(vol, rng, zooms, params, 1.0 / 2.0)


def cond_slab_third(vol: np.ndarray, rng: np.random.Generator, zooms: Sequence[float] = _ISO, params=None):
    """A contiguous third of the axial slices (random position); zooms unchanged."""
    return _slab(vol, rng, zooms, params, 1.0 / 3.0)


def cond_thickness(vol: np.ndarray, rng: np.random.Generator, zooms: Sequence[float] = _ISO, params=None):
    """Thicker slices: through-plane zoom times :data:`THICKNESS_FACTOR` (1.5 -> 3.0 mm), in-plane unchanged."""
    z = _as_zooms(zooms)
    new = (z[0], z[1], round(z[2] * THICKNESS_FACTOR, 4))
    out, nz = _resample_to(np.asarray(vol, np.float32), z, new)
    _record(params, zooms=list(nz))
    return out, nz


#: The 3D copy conditions, in order: name -> ``fn(vol, rng, zooms=(1.5,)*3, params=None) -> (vol, zooms)``.
CONDITIONS_3D: dict[str, ConditionFn] = {
    "exact": cond_exact,
    "noise": cond_noise,
    "intensity": cond_intensity,
    "flip": cond_flip,
    "rot5": cond_rot5,
    "rot10": cond_rot10,
    "shift": cond_shift,
    "resample": cond_resample,
    "slab_half": cond_slab_half,
    "slab_third": cond_slab_third,
    "thickness": cond_thickness,
}


# ----------------------------------------------------------------------------------------------
# Subjects
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _template(family: str = "mni152") -> np.ndarray:
    """The real volume a family's subjects are made from, at 1 mm in [0, 1] (shared, never written to)."""
    if family == "mni152":
        return _cohort.template()
    if family == "epi-tlrc":
        return _epi_template()
    raise ValueError(f"unknown 3D family {family!r}; expected one of {FAMILIES}")


#: Data families: the real volume each subject is generated from. ``mni152``: the MNI152 2009a T1w template
#: (1 mm, the 2D look-alike cohorts' source); ``epi-tlrc``: nibabel's whole-brain EPI-contrast volume in
#: Talairach space (AFNI ``scaled+tlrc``, 3 mm: another contrast, resolution and head), upsampled to 1 mm.
FAMILIES: tuple[str, ...] = ("mni152", "epi-tlrc")


def _epi_template() -> np.ndarray:
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    from inspector.preprocess import normalise_volume

    b = _cohort.builder()
    src = next(s for s in b.SOURCES if s.subject == "nibabel-afni-tlrc")
    img = nib.as_closest_canonical(nib.load(str(b._source_path(src))))
    vol = np.asarray(img.get_fdata(dtype=np.float32))
    vol = vol.reshape(vol.shape[:3]) if vol.ndim > 3 else vol
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    size = [max(2, int(round(n * z))) for n, z in zip(vol.shape, zooms, strict=True)]
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(vol))[None, None], size=size, mode="trilinear")
    return normalise_volume(up[0, 0].numpy(), (0.5, 99.5), name="epi-tlrc")


def _seed_of(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _subject_shape(tmpl_shape: Sequence[int]) -> tuple[int, int, int]:
    return tuple(int(round(s / _cohort.VOXEL_MM)) for s in tmpl_shape)  # type: ignore[return-value]


def crop_box(tmpl: np.ndarray) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """The crop of the 1.5 mm subject grid: the template head's box (padded) within the axial range.

    The subject grid spans the template's (align_corners): template index ``t`` sits at subject index
    ``t * (n - 1) / (S - 1)``. Returns ``((x0, x1), (y0, y1), (z0, z1))``, half-open, in subject voxels.
    """
    out_shape = _subject_shape(tmpl.shape)
    lo_v, hi_v = float(tmpl.min()), float(tmpl.max())
    idx = np.argwhere(tmpl > lo_v + CROP_THRESHOLD * (hi_v - lo_v))
    box = []
    for ax, (n, s) in enumerate(zip(out_shape, tmpl.shape, strict=True)):
        scale = (n - 1) / max(s - 1, 1)
        a = max(0, int(math.floor(idx[:, ax].min() * scale)) - CROP_PAD)
        b = min(n, int(math.ceil(idx[:, ax].max() * scale)) + CROP_PAD + 1)
        if ax == 2:
            a, b = max(a, int(AXIAL_RANGE[0] * n)), min(b, int(AXIAL_RANGE[1] * n))
        box.append((a, b))
    return tuple(box)  # type: ignore[return-value]


def prepare_subject(
    tmpl: np.ndarray, sub_seed: int, *, crop_to_brain: bool = True, z_step: int = 2
) -> tuple[np.ndarray, Zooms]:
    """One subject volume as written: generated at 1.5 mm, cropped (optional), every ``z_step``-th slice.

    Returns the volume (X, Y, Z) float32 and its zooms (1.5, 1.5, 1.5 * z_step).
    """
    vol = _cohort.subject_volume(tmpl, sub_seed)
    if crop_to_brain:
        (x0, x1), (y0, y1), (z0, z1) = crop_box(tmpl)
        vol = vol[x0:x1, y0:y1, z0:z1]
    vol = np.ascontiguousarray(vol[:, :, :: int(z_step)], dtype=np.float32)
    v = _cohort.VOXEL_MM
    return vol, (v, v, v * int(z_step))


def _save(path: Path, vol: np.ndarray, zooms: Zooms) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(vol, np.float32), np.diag([*zooms, 1.0]))
    img.header.set_xyzt_units("mm")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    tmp = path.with_name(path.name[: -len(".nii.gz")] + ".tmp.nii.gz")
    nib.save(img, str(tmp))
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# The cohort
# ----------------------------------------------------------------------------------------------


@dataclass
class VolumeCohortInfo:
    """A generated 3D cohort on disk.

    Attributes
    ----------
    root, train_dir, holdout_dir, synthetic_dir : Path
    labels : pandas.DataFrame
        ``synthetic/labels.csv``: columns ``path, label, source, augmentation`` (strings; empty for novel).
    n_train, n_holdout, n_novel : int
    conditions : tuple of str
    seed : int
    """

    root: Path
    train_dir: Path
    holdout_dir: Path
    synthetic_dir: Path
    labels: pd.DataFrame
    n_train: int
    n_holdout: int
    n_novel: int
    conditions: tuple[str, ...]
    seed: int


def _name(prefix: str, k: int, n: int) -> str:
    return f"{prefix}-{k:0{max(3, len(str(max(n - 1, 0))))}d}.nii.gz"


def _read_labels(csv: Path) -> pd.DataFrame:
    return pd.read_csv(csv, dtype=str, keep_default_na=False)


def _info(root: Path, params: dict[str, Any]) -> VolumeCohortInfo:
    return VolumeCohortInfo(
        root=root,
        train_dir=root / "train",
        holdout_dir=root / "holdout",
        synthetic_dir=root / "synthetic",
        labels=_read_labels(root / "synthetic" / "labels.csv"),
        n_train=params["n_train"],
        n_holdout=params["n_holdout"],
        n_novel=params["n_novel"],
        conditions=tuple(params["conditions"]),
        seed=params["seed"],
    )


def _cached(root: Path, params: dict[str, Any]) -> bool:
    man = root / "manifest.json"
    if not man.is_file() or not (root / "synthetic" / "labels.csv").is_file():
        return False
    try:
        m = json.loads(man.read_text())
    except (OSError, ValueError):
        return False
    if m.get("params") != params:
        return False
    files = [root / "train" / f for f in m.get("train", [])] + [root / "holdout" / f for f in m.get("holdout", [])]
    files += [root / "synthetic" / s["path"] for s in m.get("synthetic", [])]
    return all(f.is_file() for f in files)


def _clear(root: Path) -> None:
    """Remove what a previous generation wrote (its own file patterns only)."""
    (root / "manifest.json").unlink(missing_ok=True)
    for sub, pat in (("train", "sub-*.nii.gz"), ("holdout", "hold-*.nii.gz"), ("synthetic", "syn-*.nii.gz")):
        for f in (root / sub).glob(pat):
            f.unlink()
    (root / "synthetic" / "labels.csv").unlink(missing_ok=True)


def make_volume_cohort(
    root: Path,
    n_train: int,
    *,
    n_holdout: int = 10,
    n_novel: int = 20,
    copies_per_condition: int = 2,
    conditions: Sequence[str] | None = None,
    seed: int = 0,
    crop_to_brain: bool = True,
    z_step: int = 2,
    family: str = "mni152",
) -> VolumeCohortInfo:
    """Write (or find cached) a 3D look-alike cohort: train/, holdout/, synthetic/ (+ labels.csv), manifest.json.

    Parameters
    ----------
    root : Path
        Output folder (created).
    n_train : int
        Training subjects (``train/sub-XXX.nii.gz``).
    n_holdout : int
        Unseen holdout subjects (``holdout/hold-XXX.nii.gz``).
    n_novel : int
        Unseen novel subjects written into the synthetic set unchanged.
    copies_per_condition : int
        Copies per condition; each copy is one training subject (seeded draw, a condition's copies from
        different subjects when ``copies_per_condition <= n_train``) under the condition.
    conditions : sequence of str, optional
        Names of :data:`CONDITIONS_3D` (default: all, in order).
    seed : int
    crop_to_brain : bool
        Crop every subject to the head's box and the axial range 22-82 % of z before any condition (see the
        module's docstring).
    z_step : int
        Keep every ``z_step``-th axial slice of each subject (default 2: 3.0 mm through-plane).
    family : str
        One of :data:`FAMILIES`: the real volume the subjects are made from.

    Returns
    -------
    VolumeCohortInfo
        Cached: when ``root/manifest.json`` holds the same parameters (and generator versions) and every
        file it lists exists, nothing is regenerated or rewritten.
    """
    root = Path(root)
    conds = tuple(CONDITIONS_3D) if conditions is None else tuple(str(c) for c in conditions)
    unknown = [c for c in conds if c not in CONDITIONS_3D]
    if unknown:
        raise ValueError(f"unknown 3D condition(s) {unknown}; expected some of {list(CONDITIONS_3D)}")
    if len(set(conds)) != len(conds):
        raise ValueError(f"conditions must be distinct; got {list(conds)}")
    for name, v in (("n_train", n_train), ("n_holdout", n_holdout), ("n_novel", n_novel)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0; got {v}")
    if int(copies_per_condition) < 0:
        raise ValueError(f"copies_per_condition must be >= 0; got {copies_per_condition}")
    if int(z_step) < 1:
        raise ValueError(f"z_step must be >= 1; got {z_step}")
    n_copies = len(conds) * int(copies_per_condition)
    if n_copies and n_train < 1:
        raise ValueError("copies need at least one training subject (n_train >= 1)")
    params: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "subject_generator_version": _cohort.GENERATOR_VERSION,
        "n_train": int(n_train),
        "n_holdout": int(n_holdout),
        "n_novel": int(n_novel),
        "copies_per_condition": int(copies_per_condition),
        "conditions": list(conds),
        "seed": int(seed),
        "crop_to_brain": bool(crop_to_brain),
        "z_step": int(z_step),
    }
    if family not in FAMILIES:
        raise ValueError(f"unknown 3D family {family!r}; expected one of {FAMILIES}")
    prefix = "vol3d" if family == "mni152" else f"vol3d-{family}"
    if family != "mni152":  # the first family's cached cohorts keep their parameters (and cache key)
        params["family"] = family
    if _cached(root, params):
        log.info("3D cohort %s is cached (same parameters); not regenerated", root)
        return _info(root, params)

    t0 = time.perf_counter()
    for sub in ("train", "holdout", "synthetic"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    _clear(root)
    tmpl = _template(family)
    box = crop_box(tmpl) if crop_to_brain else None

    def subject(code: int, k: int) -> tuple[int, np.ndarray, Zooms]:
        s = _seed_of(f"{prefix}:{seed}:{code}:{k}")
        vol, zooms = prepare_subject(tmpl, s, crop_to_brain=crop_to_brain, z_step=z_step)
        return s, vol, zooms

    seeds: dict[str, list[int]] = {"train": [], "holdout": [], "novel": []}
    names: dict[str, list[str]] = {"train": [], "holdout": []}
    train_vols: list[np.ndarray] = []
    shape = zooms0 = None
    for role, code, prefix, count in (("train", 0, "sub", n_train), ("holdout", 1, "hold", n_holdout)):
        for k in range(count):
            s, vol, zooms0 = subject(code, k)
            shape = vol.shape
            name = _name(prefix, k, count)
            _save(root / role / name, vol, zooms0)
            seeds[role].append(s)
            names[role].append(name)
            if role == "train":
                train_vols.append(vol)
    train_names, hold_names = names["train"], names["holdout"]
    t_subjects = time.perf_counter() - t0

    # the synthetic set: copies (condition, j) then novel subjects, written in a seeded random order
    items: list[dict[str, Any]] = []
    for cond in conds if n_copies else ():
        # each condition's copies from different subjects while there are enough (then cycling again)
        src_rng = np.random.default_rng(_seed_of(f"vol3d-src:{seed}:{cond}"))
        reps = -(-int(copies_per_condition) // n_train)
        sources = np.concatenate([src_rng.permutation(n_train) for _ in range(reps)])[: int(copies_per_condition)]
        for j, src in enumerate(sources.tolist()):
            items.append({"label": "copy", "condition": cond, "j": j, "src": int(src)})
    for k in range(n_novel):
        items.append({"label": "novel", "k": k})
    total = len(items)
    order = np.random.default_rng(_seed_of(f"vol3d-order:{seed}")).permutation(total)
    synthetic: list[dict[str, Any] | None] = [None] * total
    rows = []
    for pos, i in enumerate(order.tolist()):
        it = items[i]
        fname = _name("syn", pos, total)
        if it["label"] == "copy":
            rng = np.random.default_rng(_seed_of(f"vol3d-copy:{seed}:{it['condition']}:{it['j']}"))
            p: dict[str, Any] = {}
            vol, zooms = CONDITIONS_3D[it["condition"]](train_vols[it["src"]], rng, zooms0, params=p)
            src_name = train_names[it["src"]]
            entry = {"path": fname, "label": "copy", "source": src_name, "condition": it["condition"], "params": p}
            rows.append((fname, "copy", src_name, it["condition"]))
        else:
            s, vol, zooms = subject(2, it["k"])
            entry = {"path": fname, "label": "novel", "source": "", "condition": "", "novel_index": it["k"], "seed": s}
            rows.append((fname, "novel", "", ""))
        entry["shape"] = [int(v) for v in vol.shape]
        entry["zooms"] = [float(v) for v in zooms]
        _save(root / "synthetic" / fname, vol, zooms)
        synthetic[pos] = entry
    seeds["novel"] = [_seed_of(f"{prefix}:{seed}:2:{k}") for k in range(n_novel)]  # by novel_index
    labels = pd.DataFrame(rows, columns=["path", "label", "source", "augmentation"])
    labels.to_csv(root / "synthetic" / "labels.csv", index=False)
    elapsed = time.perf_counter() - t0
    manifest = {
        "params": params,
        "subject_seed_rule": "sha256('vol3d:{seed}:{code}:{k}')[:4] little-endian; code 0 train, 1 holdout, 2 novel",
        "seeds": seeds,
        "counts": {
            "train": int(n_train),
            "holdout": int(n_holdout),
            "novel": int(n_novel),
            "copies": int(n_copies),
            "synthetic": int(total),
        },
        "crop_box": None if box is None else [list(b) for b in box],
        "subject_shape": None if shape is None else [int(v) for v in shape],
        "subject_zooms": [_cohort.VOXEL_MM, _cohort.VOXEL_MM, _cohort.VOXEL_MM * int(z_step)],
        "train": train_names,
        "holdout": hold_names,
        "synthetic": synthetic,
    }
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(root / "manifest.json")
    log.info(
        "3D cohort -> %s: %d train, %d holdout, %d synthetic (%d copies, %d novel); subject shape %s zooms %s; "
        "%.1f s (%.2f s per subject for train+holdout)",
        root,
        n_train,
        n_holdout,
        total,
        n_copies,
        n_novel,
        shape,
        manifest["subject_zooms"],
        elapsed,
        t_subjects / max(n_train + n_holdout, 1),
    )
    return _info(root, params)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output folder")
    ap.add_argument("--train", type=int, default=16, help="training subjects (default 16)")
    ap.add_argument("--holdout", type=int, default=10, help="holdout subjects (default 10)")
    ap.add_argument("--novel", type=int, default=20, help="novel subjects in the synthetic set (default 20)")
    ap.add_argument("--copies", type=int, default=2, help="copies per condition (default 2)")
    ap.add_argument("--conditions", nargs="+", default=None, choices=list(CONDITIONS_3D), help="default: all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-crop", action="store_true", help="keep the whole 1.5 mm field of view")
    ap.add_argument("--z-step", type=int, default=2, help="keep every z-step-th axial slice (default 2)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    t0 = time.perf_counter()
    info = make_volume_cohort(
        a.out,
        a.train,
        n_holdout=a.holdout,
        n_novel=a.novel,
        copies_per_condition=a.copies,
        conditions=a.conditions,
        seed=a.seed,
        crop_to_brain=not a.no_crop,
        z_step=a.z_step,
    )
    counts = info.labels["label"].value_counts().to_dict()
    log.info(
        "%s: train %d, holdout %d, synthetic %d (%s), conditions %s; %.1f s",
        info.root,
        info.n_train,
        info.n_holdout,
        len(info.labels),
        counts,
        ",".join(info.conditions),
        time.perf_counter() - t0,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
