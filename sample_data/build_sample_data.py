#!/usr/bin/env python
"""Rebuild ``sample_data/``: a small demo audit made of real MRI that ships inside installed packages.

Usage::

    python sample_data/build_sample_data.py [--seed 0] [--out sample_data]

The result (see ``sample_data/README.md``) is::

    train/<subject>/<view>_<index>.png       training cohort (16-bit greyscale PNG)
    holdout/<subject>/<view>_<index>.png     real slices never trained on (calibration null)
    synthetic/syn_<n>.png                    the "generated" set: novel real slices + planted copies
    synthetic/labels.csv                     ground truth: path,label,source,augmentation
    provenance.csv                           every file's package, source file, axis, slice index, split

Rules enforced here (and re-checked by ``tests/test_sample_data.py``):

* Only real anatomy from nilearn, nibabel, dipy and pydicom package data (see :data:`SOURCES`; the
  rejected files and why are listed in the README).
* Within one volume and axis, every kept slice (train, holdout or novel synthetic) is at least
  :data:`MIN_GAP` slice indices from every other kept slice, so no holdout or novel slice lies
  within fewer than 3 slices of a training slice of the same volume. Background-only slices
  (:func:`inspector.preprocess.is_background`, on the volume-normalised slice and again on the stored
  PNG as the loader sees it) are never kept.
* The split is at slice level: each volume/axis stratum is shuffled and dealt to train / holdout /
  novel in the proportions :data:`SPLIT_FRACTIONS` (largest-deficit dealing over the strata, so
  every acquisition is represented in every split in proportion). A novel slice's nearest training
  slice is therefore often the same acquisition 3 slices away: the realistic hard negative.
* Planted copies are distinct training slices passed through one benchmark condition each
  (:func:`inspector.preprocess.apply_condition`, seeded), cycling through :data:`COPY_CONDITIONS`.
  ``hflip`` is never applied to a left-right mirror-symmetric slice (axial and coronal slices of the
  symmetric MNI152 template), where it would be the identity.

The build is deterministic: the same seed and the same installed packages give byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import logging
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("build_sample_data")

#: Minimum distance (in slice indices) between two kept slices of the same volume and axis.
MIN_GAP = 3
#: Longest side of a stored slice in pixels (slices are never upsampled beyond their finest spacing).
MAX_SIDE = 160
#: Share of the real (non-copy) slices dealt to each split.
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.48, "holdout": 0.34, "novel": 0.18}
#: Planted copies per novel synthetic slice (1/3 -> copies are 25 % of the synthetic set).
COPY_RATIO = 1.0 / 3.0
#: Conditions the planted copies cycle through (names of :data:`inspector.preprocess.CONDITIONS`).
COPY_CONDITIONS: tuple[str, ...] = (
    "none",
    "hflip",
    "vflip",
    "rotate_5",
    "rotate_10",
    "noise_0.01",
    "intensity",
    "shift_8pct",
)
#: Conditions that are the identity on a left-right mirror-symmetric slice.
_MIRROR_CONDITIONS = frozenset({"hflip", "combo"})
#: Minimum number of holdout slices of a full build (p-value floor 1/(1+n) must be below alpha=0.01).
MIN_HOLDOUT = 100

_VIEW = {"axial": "ax", "coronal": "cor", "sagittal": "sag", "2d": "img"}
_AXIS_NUM = {"sagittal": 0, "coronal": 1, "axial": 2}

PROVENANCE_FIELDS = (
    "split",
    "path",
    "subject",
    "package",
    "package_version",
    "source_file",
    "volume_index",
    "axis",
    "slice_index",
    "label",
    "copy_of",
    "augmentation",
    "height",
    "width",
    "pixel_mm",
    "sha256",
)


class SampleDataError(RuntimeError):
    """The sample data could not be built or violates one of its rules."""


@dataclass(frozen=True)
class Source:
    """One real MRI file inside an installed package.

    Attributes
    ----------
    subject : str
        Folder name of the acquisition in train/ and holdout/ (the loader's subject ID for 2D files).
    package : str
        Distribution and import name of the package holding the file.
    relpath : str
        Path of the file inside the package folder.
    kind : str
        ``"nifti"`` (nibabel-readable volume, incl. AFNI BRIK), ``"npy"`` (2D array) or ``"dicom"``.
    axes : tuple of str
        Slicing axes for volumes (closest canonical orientation); ``("2d",)`` for 2D images.
    volume_index : int or None
        Volume of a 4D image to read (None for 3D/2D files).
    only_indices : tuple of int or None
        Restrict a volume to these slice indices (None: all non-background slices).
    min_index : tuple of (str, int)
        Per axis, the lowest slice index allowed (used to keep one hemisphere of a symmetric template).
    mirror_axes : tuple of str
        Axes whose slices are left-right mirror-symmetric (``hflip`` is the identity on them).
    crop_zero_border : bool
        Crop rows/columns that are exactly zero (padding) before resizing.
    description : str
        What the image shows (for the README).
    """

    subject: str
    package: str
    relpath: str
    kind: str
    axes: tuple[str, ...]
    volume_index: int | None = None
    only_indices: tuple[int, ...] | None = None
    min_index: tuple[tuple[str, int], ...] = ()
    mirror_axes: tuple[str, ...] = ()
    crop_zero_border: bool = False
    description: str = ""

    @property
    def source_file(self) -> str:
        """``package/relpath``, as recorded in provenance.csv."""
        return f"{self.package}/{self.relpath}"


#: Every source used, in a fixed order. Keys of :func:`build` ``sources=`` are the ``subject`` names.
SOURCES: tuple[Source, ...] = (
    Source(
        "mni152-t1",
        "nilearn",
        "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "nifti",
        ("axial", "coronal", "sagittal"),
        # The 2009a *symmetric* template: sagittal slice 98 - k equals slice 98 + k exactly, so only
        # the midline and the right hemisphere are used; axial/coronal slices are their own mirror.
        min_index=(("sagittal", 98),),
        mirror_axes=("axial", "coronal"),
        description="ICBM 2009a nonlinear symmetric MNI152 T1w template (average of 152 adults), 1 mm",
    ),
    Source(
        "nibabel-anatomical-t1",
        "nibabel",
        "tests/data/anatomical.nii",
        "nifti",
        ("axial", "coronal", "sagittal"),
        description="T1w crop around the ventricles, SPM-normalised, 2 mm",
    ),
    Source(
        "nibabel-example4d-epi",
        "nibabel",
        "tests/data/example4d.nii.gz",
        "nifti",
        ("axial", "coronal", "sagittal"),
        volume_index=0,
        description="T2*w EPI (BOLD fMRI) volume 0 of 2, 2 x 2 x 2.2 mm, 24 axial slices",
    ),
    Source(
        "nibabel-afni-epi",
        "nibabel",
        "tests/data/example4d+orig.HEAD",
        "nifti",
        # Axial only: the slices were acquired interleaved (odd/even slice intensities alternate),
        # so coronal and sagittal reformats of this small crop are dominated by horizontal stripes.
        ("axial",),
        volume_index=0,
        description="T2*w EPI crop (AFNI BRIK), volume 0 of 3, 3 mm, axial slices",
    ),
    Source(
        "nibabel-afni-tlrc",
        "nibabel",
        "tests/data/scaled+tlrc.HEAD",
        "nifti",
        ("axial", "coronal", "sagittal"),
        volume_index=0,
        description="whole-brain EPI-contrast volume in Talairach space (AFNI BRIK, 3DIM_HEAD_ANAT), 3 mm",
    ),
    Source(
        "dipy-aniso-b0",
        "dipy",
        "data/files/aniso_vox.nii.gz",
        "nifti",
        ("axial", "coronal", "sagittal"),
        description="diffusion b=0 (T2w) volume with anisotropic 4 x 4 x 5 mm voxels",
    ),
    Source(
        "dipy-s0-b0",
        "dipy",
        "data/files/S0_10slices.nii.gz",
        "nifti",
        ("axial",),
        volume_index=0,
        description="diffusion b=0 (T2w), 10 contiguous axial slices, 2 mm in-plane",
    ),
    Source(
        "dipy-piesno-b0",
        "dipy",
        "data/files/test_piesno.nii.gz",
        "nifti",
        ("axial",),
        # One axial slice of 14 diffusion volumes stored along the third axis: only the first
        # (b=0) image is a distinct slice; the others are the same anatomy re-acquired.
        only_indices=(0,),
        description="one axial diffusion slice, first (b=0) of 14 volumes (PIESNO test data)",
    ),
    Source(
        "dipy-t1-coronal",
        "dipy",
        "data/files/t1_coronal_slice.npy",
        "npy",
        ("2d",),
        description="one coronal T1w slice, 256 x 256",
    ),
    Source(
        "pydicom-mr-small",
        "pydicom",
        "data/test_files/MR_small.dcm",
        "dicom",
        ("2d",),
        description="one MR slice, 64 x 64, downsized from NEMA WG04 'MR1_UNC'",
    ),
    Source(
        "nibabel-tof-mip",
        "nibabel",
        "nicom/tests/data/slicethickness_empty_string.dcm",
        "dicom",
        ("2d",),
        crop_zero_border=True,
        description="maximum-intensity projection of a 3D time-of-flight MR angiogram (neck/brain vessels)",
    ),
)
SOURCE_KEYS: tuple[str, ...] = tuple(s.subject for s in SOURCES)


@dataclass
class Item:
    """One stored slice (real or planted copy) and its provenance."""

    source: Source
    axis: str
    slice_index: int
    image: np.ndarray  # stored float image in [0, 1], already quantised to uint16 levels
    pixel_mm: float
    split: str = ""  # train / holdout / novel / copy
    path: str = ""  # relative to the output root, POSIX
    copy_of: str = ""  # for copies: path relative to train/
    augmentation: str = ""

    @property
    def stratum(self) -> tuple[str, str]:
        return (self.source.source_file, self.axis)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def package_dir(package: str) -> Path:
    """Folder of an installed package, located without importing it.

    Raises
    ------
    SampleDataError
        If the package is not installed (install the project's ``dev`` extra).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SampleDataError(
            f"Package {package!r} is not installed; the sample data is built from its bundled files. "
            "Install the dev extra: pip install -e '.[dev]'."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def package_version(package: str) -> str:
    """Installed version of ``package`` (``"unknown"`` when metadata is missing)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _source_path(src: Source) -> Path:
    p = package_dir(src.package) / src.relpath
    if not p.is_file():
        raise SampleDataError(
            f"{src.source_file} is missing from the installed {src.package} {package_version(src.package)}; "
            "the sample data needs it (reinstall the package or drop the source from SOURCES)."
        )
    return p


def _display(vol: np.ndarray) -> np.ndarray:
    """(n, P, Q) canonical-plane slices -> (n, Q, P) radiological display (as inspector.io does)."""
    return vol.transpose(0, 2, 1)[:, ::-1, ::-1]


def read_volume(src: Source) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a NIfTI/BRIK source in closest canonical (RAS+) orientation.

    Returns
    -------
    volume : np.ndarray, shape (X, Y, Z), float64
    zooms : tuple of float
        Voxel sizes in mm along X, Y, Z.
    """
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(_source_path(src))))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4:
        data = data[..., src.volume_index or 0]
    if data.ndim != 3:
        raise SampleDataError(f"{src.source_file}: expected a 3D volume, got shape {data.shape}.")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return np.asarray(data, dtype=np.float64), (zooms[0], zooms[1], zooms[2])


def read_image(src: Source) -> tuple[np.ndarray, tuple[float, float]]:
    """Read a 2D source (``.npy`` or single-frame DICOM) as float64 with its pixel spacing (dy, dx)."""
    path = _source_path(src)
    if src.kind == "npy":
        arr = np.load(path)
        spacing = (1.0, 1.0)
    elif src.kind == "dicom":
        import pydicom
        from pydicom.pixels import apply_modality_lut

        ds = pydicom.dcmread(path)
        arr = apply_modality_lut(ds.pixel_array, ds)
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            arr = -np.asarray(arr, dtype=np.float64)
        ps = ds.get("PixelSpacing")
        spacing = (float(ps[0]), float(ps[1])) if ps else (1.0, 1.0)
    else:
        raise SampleDataError(f"{src.source_file}: unknown 2D kind {src.kind!r}; expected 'npy' or 'dicom'.")
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2:
        raise SampleDataError(f"{src.source_file}: expected a 2D image, got shape {arr.shape}.")
    if src.crop_zero_border:
        nz = np.argwhere(arr != 0)
        (r0, c0), (r1, c1) = nz.min(0), nz.max(0) + 1
        arr = arr[r0:r1, c0:c1]
    return arr, spacing


# ----------------------------------------------------------------------------------------------
# Image helpers
# ----------------------------------------------------------------------------------------------


def resample_square_pixels(img: np.ndarray, spacing: tuple[float, float], max_side: int) -> tuple[np.ndarray, float]:
    """Resample a slice to square pixels, long side at most ``max_side``, never finer than its finest spacing.

    Parameters
    ----------
    img : np.ndarray, shape (H, W), values in [0, 1]
    spacing : tuple of float
        ``(dy, dx)`` in mm.
    max_side : int

    Returns
    -------
    image : np.ndarray, shape (H', W'), float32 in [0, 1]
    pixel_mm : float
        The new (square) pixel size.
    """
    import torch
    import torch.nn.functional as F

    h, w = img.shape
    dy, dx = spacing
    pix = max(min(dy, dx), max(h * dy, w * dx) / max_side)
    nh, nw = max(1, round(h * dy / pix)), max(1, round(w * dx / pix))
    if (nh, nw) == (h, w):
        return np.asarray(img, dtype=np.float32), pix
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    r = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=(nh < h or nw < w))
    return r[0, 0].clamp(0.0, 1.0).numpy(), pix


def to_uint16(img: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint16 over the full range (shape kept)."""
    return np.round(np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0) * 65535.0).astype(np.uint16)


def png_bytes(img: np.ndarray) -> bytes:
    """Encode a [0, 1] image as a 16-bit greyscale PNG (deterministic: no metadata, fixed compression)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint16(img)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def loader_sees_background(img: np.ndarray) -> bool:
    """Whether ``inspector.load_cohort`` would skip this stored 2D PNG as background-only."""
    from inspector.preprocess import ConstantImageError, is_background, normalise_volume

    try:
        return is_background(normalise_volume(to_uint16(img)))
    except ConstantImageError:
        return True


# ----------------------------------------------------------------------------------------------
# Candidates, split, copies
# ----------------------------------------------------------------------------------------------


def _spaced(indices: Sequence[int], gap: int) -> list[int]:
    """Greedy subsequence of sorted ``indices`` with consecutive differences >= ``gap``."""
    out: list[int] = []
    for k in sorted(indices):
        if not out or k - out[-1] >= gap:
            out.append(k)
    return out


def candidates(src: Source, max_side: int = MAX_SIDE) -> list[Item]:
    """All usable slices of one source: non-background, >= MIN_GAP apart per axis, in stored form."""
    from inspector.preprocess import is_background, normalise_volume

    items: list[Item] = []
    if src.kind == "nifti":
        vol, zooms = read_volume(src)
        norm = normalise_volume(vol, name=src.source_file)
        for axis in src.axes:
            a = _AXIS_NUM[axis]
            p, q = (i for i in range(3) if i != a)
            stack = _display(np.moveaxis(norm, a, 0))
            spacing = (zooms[q], zooms[p])
            allowed = range(dict(src.min_index).get(axis, 0), stack.shape[0])
            if src.only_indices is not None:
                allowed = [k for k in allowed if k in src.only_indices]
            valid = [k for k in allowed if not is_background(stack[k])]
            for k in _spaced(valid, MIN_GAP):
                img, pix = resample_square_pixels(stack[k], spacing, max_side)
                img = to_uint16(img).astype(np.float32) / 65535.0
                if loader_sees_background(img):
                    log.info("%s %s %d: background after resizing; dropped", src.subject, axis, k)
                    continue
                items.append(Item(src, axis, int(k), img, pix))
    else:
        raw, spacing = read_image(src)
        norm = normalise_volume(raw, name=src.source_file)
        img, pix = resample_square_pixels(norm, spacing, max_side)
        img = to_uint16(img).astype(np.float32) / 65535.0
        if is_background(norm) or loader_sees_background(img):
            raise SampleDataError(f"{src.source_file}: the image is background-only; it cannot be a sample slice.")
        items.append(Item(src, "2d", 0, img, pix))
    return items


def deal_splits(items: list[Item], rng: np.random.Generator, fractions: dict[str, float]) -> None:
    """Assign ``item.split`` (train/holdout/novel) at slice level, proportionally within every stratum.

    Strata (volume file + axis) are visited in a random order and their slices in a random order;
    each slice goes to the split whose running count lags its target share the most.
    """
    strata: dict[tuple[str, str], list[Item]] = defaultdict(list)
    for it in items:
        strata[it.stratum].append(it)
    keys = sorted(strata)
    order = rng.permutation(len(keys))
    names = list(fractions)
    share = np.array([fractions[n] for n in names], dtype=np.float64)
    share = share / share.sum()
    counts = np.zeros(len(names))
    dealt = 0
    for ki in order:
        group = strata[keys[ki]]
        for gi in rng.permutation(len(group)):
            dealt += 1
            deficit = dealt * share - counts
            s = int(np.argmax(deficit))
            counts[s] += 1
            group[gi].split = names[s]


def plant_copies(
    train: list[Item], n_copies: int, rng: np.random.Generator, seed: int, conditions: Sequence[str]
) -> list[Item]:
    """Planted copies: distinct training slices, each passed through one condition (cycled).

    Sources are spread over the acquisitions in proportion to their training slices (the subject
    lagging its share the most goes next), each subject's slices taken in a random order.
    """
    from inspector.preprocess import CONDITIONS, apply_condition

    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise SampleDataError(f"Unknown copy condition(s) {unknown}; valid: {sorted(CONDITIONS)}.")
    pools: dict[str, list[Item]] = defaultdict(list)
    for i in rng.permutation(len(train)):
        pools[train[int(i)].source.subject].append(train[int(i)])
    subjects = sorted(pools)
    share = np.array([len(pools[s]) for s in subjects], dtype=np.float64) / max(1, len(train))
    picked = np.zeros(len(subjects))
    copies: list[Item] = []
    for j in range(n_copies):
        cond = conditions[j % len(conditions)]
        src_item = None
        deficit = (j + 1) * share - picked
        for si in sorted(range(len(subjects)), key=lambda k: (-deficit[k], k)):
            pool = pools[subjects[si]]
            for pi, it in enumerate(pool):
                if cond in _MIRROR_CONDITIONS and it.axis in it.source.mirror_axes:
                    continue
                src_item = pool.pop(pi)
                picked[si] += 1
                break
            if src_item is not None:
                break
        if src_item is None:
            raise SampleDataError(
                f"Not enough training slices to plant {n_copies} copies (stopped at copy {j}, condition {cond!r})."
            )
        aug = apply_condition(src_item.image, cond, np.random.default_rng([seed, 7, j]))
        img = to_uint16(aug).astype(np.float32) / 65535.0
        if loader_sees_background(img):
            raise SampleDataError(f"Copy {j} of {src_item.path} under {cond!r} became background-only.")
        copies.append(
            Item(
                src_item.source,
                src_item.axis,
                src_item.slice_index,
                img,
                src_item.pixel_mm,
                split="copy",
                copy_of=src_item.path.removeprefix("train/"),
                augmentation=cond,
            )
        )
    return copies


def _real_path(split: str, it: Item) -> str:
    folder = "holdout" if split == "holdout" else "train"
    return f"{folder}/{it.source.subject}/{_VIEW[it.axis]}_{it.slice_index:03d}.png"


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def check_rows(rows: Sequence[dict[str, str]], min_gap: int = MIN_GAP) -> None:
    """Validate provenance rows: spacing of real slices, distance to training slices, copy sources.

    Raises
    ------
    SampleDataError
        Naming the first violation found.
    """
    by_stratum: dict[tuple[str, str, str], list[tuple[int, str, str]]] = defaultdict(list)
    train_paths = {r["path"] for r in rows if r["split"] == "train"}
    for r in rows:
        if r["label"] == "copy":
            if "train/" + r["copy_of"] not in train_paths:
                raise SampleDataError(f"{r['path']}: copy_of {r['copy_of']!r} is not a training file.")
            continue
        key = (r["source_file"], r["volume_index"], r["axis"])
        by_stratum[key].append((int(r["slice_index"]), r["split"], r["path"]))
    for key, members in by_stratum.items():
        members.sort()
        for (i, _, pa), (j, _, pb) in zip(members, members[1:], strict=False):
            if j - i < min_gap:
                raise SampleDataError(f"{pa} and {pb} are {j - i} slices apart in {key}; need >= {min_gap}.")


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------


@dataclass
class BuildSummary:
    """What :func:`build` wrote.

    Attributes
    ----------
    out : Path
    rows : list of dict
        The provenance rows (as written to provenance.csv).
    counts : dict
        Files per split (``train``, ``holdout``, ``synthetic``, ``copy``, ``novel``).
    """

    out: Path
    rows: list[dict[str, str]]
    counts: dict[str, int]


def build(
    out: str | Path,
    seed: int = 0,
    *,
    sources: Sequence[str] | None = None,
    max_side: int = MAX_SIDE,
    min_holdout: int | None = None,
) -> BuildSummary:
    """Build the sample audit under ``out`` (its train/, holdout/, synthetic/ and provenance.csv are replaced).

    Parameters
    ----------
    out : str or Path
        Output folder; other files in it (README.md, this script) are left alone.
    seed : int
        Seed of the split, the copy selection, the augmentations and the synthetic order.
    sources : sequence of str, optional
        Subset of :data:`SOURCE_KEYS` (default: all).
    max_side : int
        Longest side of a stored slice in pixels.
    min_holdout : int, optional
        Minimum number of holdout slices (default :data:`MIN_HOLDOUT` for a full build, 0 for a subset).

    Returns
    -------
    BuildSummary

    Raises
    ------
    ValueError
        If ``sources`` names an unknown source.
    SampleDataError
        If a package file is missing or a rule of the sample data would be violated.
    """
    if sources is None:
        chosen = list(SOURCES)
    else:
        unknown = [s for s in sources if s not in SOURCE_KEYS]
        if unknown:
            raise ValueError(f"Unknown sample-data source(s) {unknown}; valid: {list(SOURCE_KEYS)}.")
        chosen = [s for s in SOURCES if s.subject in set(sources)]
    if min_holdout is None:
        min_holdout = MIN_HOLDOUT if sources is None else 0
    out = Path(out)

    items: list[Item] = []
    for src in chosen:
        got = candidates(src, max_side)
        log.info("%-24s %3d candidate slices (%s)", src.subject, len(got), ", ".join(src.axes))
        items.extend(got)
    deal_splits(items, np.random.default_rng([seed, 1]), SPLIT_FRACTIONS)
    for it in items:
        if it.split in ("train", "holdout"):
            it.path = _real_path(it.split, it)
    train = sorted((it for it in items if it.split == "train"), key=lambda it: it.path)
    holdout = [it for it in items if it.split == "holdout"]
    novel = sorted((it for it in items if it.split == "novel"), key=lambda it: _real_path("train", it))
    if len(holdout) < min_holdout:
        raise SampleDataError(
            f"Only {len(holdout)} holdout slices (need >= {min_holdout} so the empirical p-value floor "
            "1/(1+n) stays below alpha=0.01); add sources or change SPLIT_FRACTIONS."
        )
    n_copies = max(1, round(len(novel) * COPY_RATIO)) if novel else 0
    copies = plant_copies(train, n_copies, np.random.default_rng([seed, 2]), seed, COPY_CONDITIONS)
    synthetic = novel + copies
    for n, pi in enumerate(np.random.default_rng([seed, 3]).permutation(len(synthetic))):
        synthetic[pi].path = f"synthetic/syn_{n:03d}.png"

    rows: list[dict[str, str]] = []
    versions = {p: package_version(p) for p in sorted({s.package for s in chosen})}
    blobs: dict[str, bytes] = {}
    for it in items + copies:
        data = png_bytes(it.image)
        blobs[it.path] = data
        is_syn = it.split in ("novel", "copy")
        rows.append(
            {
                "split": "synthetic" if is_syn else it.split,
                "path": it.path,
                "subject": it.source.subject,
                "package": it.source.package,
                "package_version": versions[it.source.package],
                "source_file": it.source.source_file,
                "volume_index": "" if it.source.volume_index is None else str(it.source.volume_index),
                "axis": it.axis,
                "slice_index": str(it.slice_index),
                "label": ("copy" if it.split == "copy" else "novel") if is_syn else "",
                "copy_of": it.copy_of,
                "augmentation": it.augmentation,
                "height": str(it.image.shape[0]),
                "width": str(it.image.shape[1]),
                "pixel_mm": f"{it.pixel_mm:.4f}",
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    rows.sort(key=lambda r: r["path"])
    check_rows(rows)

    for name in ("train", "holdout", "synthetic"):
        if (out / name).exists():
            shutil.rmtree(out / name)
    for rel, data in blobs.items():
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    syn_rows = [r for r in rows if r["split"] == "synthetic"]
    _write_csv(
        out / "synthetic" / "labels.csv",
        ("path", "label", "source", "augmentation"),
        [
            {
                "path": r["path"].removeprefix("synthetic/"),
                "label": r["label"],
                "source": r["copy_of"],
                "augmentation": r["augmentation"],
            }
            for r in syn_rows
        ],
    )
    _write_csv(out / "provenance.csv", PROVENANCE_FIELDS, rows)
    counts = {
        "train": len(train),
        "holdout": len(holdout),
        "synthetic": len(synthetic),
        "copy": len(copies),
        "novel": len(novel),
    }
    log.info("wrote %s: %s", out, counts)
    return BuildSummary(out, rows, counts)


def _write_csv(path: Path, fields: Sequence[str], rows: Sequence[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in fields})


def summary_table(rows: Sequence[dict[str, str]]) -> str:
    """Slices per subject and split, as a Markdown table."""
    per: dict[str, Counter[str]] = defaultdict(Counter)
    for r in rows:
        per[r["subject"]][r["label"] or r["split"]] += 1
    cols = ("train", "holdout", "novel", "copy")
    lines = ["| subject | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for subj in [s.subject for s in SOURCES if s.subject in per]:
        lines.append(f"| {subj} | " + " | ".join(str(per[subj][c]) for c in cols) + " |")
    tot = Counter()
    for c in per.values():
        tot.update(c)
    lines.append("| **total** | " + " | ".join(str(tot[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of split, copies, augmentations (default 0)")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="output folder (default: this folder)"
    )
    ap.add_argument("--max-side", type=int, default=MAX_SIDE, help=f"longest stored side in px (default {MAX_SIDE})")
    ap.add_argument("--table", action="store_true", help="also log the per-subject count table (Markdown)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        res = build(args.out, args.seed, max_side=args.max_side)
    except SampleDataError as e:
        log.error("error: %s", e)
        return 1
    if args.table:
        log.info("%s", summary_table(res.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
