"""Look-alike cohorts: many distinct subjects of one protocol, generated at run time (BENCHMARK.md).

In a real study every training subject looks like every other: same anatomy, same scanner, same protocol.
This family makes such cohorts from one real brain, the ICBM 2009a MNI152 T1w template shipped with nilearn
(the sample data's first source). Each *subject* is the template under its own seeded

* smooth random deformation (a displacement field of two scales, about 3 mm RMS, from random control
  points upsampled with cubic-like trilinear smoothing),
* affine jitter (rotations up to 4 degrees about each axis, isotropic scale 0.92-1.08, shifts up to 4 mm),
* multiplicative bias field (smooth, about +-15 %), contrast change (gamma 0.85-1.15) and Rician-like noise
  (sigma 1-2.5 % of the range),

resampled at 1.5 mm and cut into axial slices 4.5 mm apart through the brain (26 per subject, less the
background-only slices the product's loader would skip: about 5 % of them, above the vertex of a shifted
subject). Slices are normalised with the product's rule and resized to the audit's loading size.

Split by subject (:func:`make_cohort`): ``n_train`` subjects form T, ``n_holdout`` unseen subjects form the
holdout H, ``n_novel`` other unseen subjects give the novel slices of G; copies are slices of ``n_copied``
training subjects passed through one condition (those of :data:`inspector.preprocess.CONDITIONS`, or a
*writer* condition of :mod:`benchmarks.writers`: orientation, field of view, matrix size, bit depth).

Everything is a pure function of the seed; cohorts are cached in ``benchmarks/_data/cohort-*.npz``
(git-ignored).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inspector.config import AuditConfig
from inspector.preprocess import is_background, normalise_volume, resize_square

from .data import DATA_DIR, builder

__all__ = ["Cohort", "make_cohort", "subject_volume", "template", "SLICE_GAP_MM", "VOXEL_MM"]

log = logging.getLogger(__name__)

#: Resampling grid of the generated subjects (mm).
VOXEL_MM = 1.5
#: Distance between kept axial slices (mm): three voxels, as the protocol's MIN_GAP.
SLICE_GAP_MM = 4.5
#: Version of the generator (part of the cache key).
GENERATOR_VERSION = "2"  # 2: the loader's background rule drops slices outside the head


def template() -> np.ndarray:
    """The MNI152 2009a T1w template as float32 in [0, 1], shape (X, Y, Z) in RAS order, 1 mm."""
    import nibabel as nib

    b = builder()
    src = next(s for s in b.SOURCES if s.subject == "mni152-t1")
    img = nib.as_closest_canonical(nib.load(str(b._source_path(src))))
    vol = np.asarray(img.get_fdata(dtype=np.float32))
    return normalise_volume(vol, (0.5, 99.5), name="mni152")


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], grid: int, amp: float) -> torch.Tensor:
    """Random field (1, 3, *shape) from ``grid``^3 control points, trilinear-upsampled twice (smooth)."""
    ctrl = torch.from_numpy(rng.standard_normal((1, 3, grid, grid, grid)).astype(np.float32)) * amp
    mid = tuple(max(grid * 3, 4) for _ in range(3))
    f = F.interpolate(ctrl, size=mid, mode="trilinear", align_corners=True)
    return F.interpolate(f, size=shape, mode="trilinear", align_corners=True)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    a = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    cx, sx, cy, sy, cz, sz = np.cos(a[0]), np.sin(a[0]), np.cos(a[1]), np.sin(a[1]), np.cos(a[2]), np.sin(a[2])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def subject_volume(tmpl: np.ndarray, seed: int) -> np.ndarray:
    """One synthetic subject: the template under a seeded deformation, affine jitter, bias, gamma, noise.

    Parameters
    ----------
    tmpl : np.ndarray, shape (X, Y, Z)
        The template at 1 mm, values in [0, 1].
    seed : int

    Returns
    -------
    np.ndarray, shape (X', Y', Z'), float32
        The subject resampled at :data:`VOXEL_MM`, intensities roughly in [0, 1] (not normalised).
    """
    rng = np.random.default_rng(seed)
    shape_out = tuple(int(round(s / VOXEL_MM)) for s in tmpl.shape)
    ext = np.asarray(tmpl.shape, np.float64)  # mm extent per axis (1 mm voxels)
    # sampling grid over the output volume, in normalised [-1, 1] coordinates of the template
    lin = [torch.linspace(-1, 1, n) for n in shape_out]
    gx, gy, gz = torch.meshgrid(*lin, indexing="ij")
    pts = torch.stack([gx, gy, gz], -1).reshape(-1, 3).double()  # (N, 3) in (x, y, z) order
    # affine jitter in mm about the volume centre
    rot = _rotation(rng, 4.0) / rng.uniform(0.92, 1.08)
    shift_mm = rng.uniform(-4.0, 4.0, size=3)
    half = ext / 2.0
    mm = pts.numpy() * half
    src = mm @ rot.T + shift_mm
    src_n = torch.from_numpy(src / half).float().reshape(*shape_out, 3)
    # smooth deformation: a coarse (5^3) and a finer (9^3) field, in mm then normalised
    disp = _smooth_field(rng, shape_out, 5, 2.2) + _smooth_field(rng, shape_out, 9, 1.2)  # (1, 3, X, Y, Z) mm
    disp = disp[0].permute(1, 2, 3, 0) / torch.from_numpy(half.astype(np.float32))
    src_n = src_n + disp
    # grid_sample wants (x=W, y=H, z=D) order for an input laid out (D, H, W) = (X, Y, Z): reverse
    grid = src_n.flip(-1)[None]
    vol = torch.from_numpy(tmpl)[None, None]
    out = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
    # bias field, contrast, noise
    bias = torch.exp(_smooth_field(rng, shape_out, 4, 0.15)[0, 0])
    out = out.clamp_min(0) * bias
    out = out.clamp(0, 1.5) ** float(rng.uniform(0.85, 1.15))
    sigma = float(rng.uniform(0.01, 0.025))
    n1 = torch.from_numpy(rng.standard_normal(out.shape).astype(np.float32)) * sigma
    n2 = torch.from_numpy(rng.standard_normal(out.shape).astype(np.float32)) * sigma
    out = torch.sqrt((out + n1) ** 2 + n2**2)  # Rician magnitude
    return out.numpy().astype(np.float32)


def _axial_slices(vol: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Kept axial slices (every SLICE_GAP_MM through the brain), each normalised on its own and resized.

    Returns (k, size, size) float32 and the slice indices (k,).
    """
    step = max(1, int(round(SLICE_GAP_MM / VOXEL_MM)))
    z = vol.shape[2]
    # the brain's axial extent of the template: skip the lowest 22 % (neck, cerebellum tail) and top 18 %
    lo, hi = int(0.22 * z), int(0.82 * z)
    idx = np.arange(lo, hi, step)
    # the product's loader skips a volume's background-only slices (its rule, on the volume-normalised
    # intensities): a subject shifted by the affine jitter has a slice or two of pure noise above the vertex
    # at the top of this range, which a real audit would never load (nor score, nor flag)
    vn = normalise_volume(vol, (0.5, 99.5), name="subject")
    idx = np.array([k for k in idx if not is_background(vn[:, :, k])], dtype=np.int64)
    out = []
    for k in idx:
        s = np.rot90(vol[:, :, k])  # anterior up, patient right on the image left (radiological)
        out.append(resize_square(normalise_volume(np.ascontiguousarray(s), (0.5, 99.5), name="slice"), size))
    return np.stack(out).astype(np.float32), idx


@dataclass
class Cohort:
    """A generated look-alike cohort, split by subject.

    Attributes
    ----------
    images : np.ndarray, shape (n, S, S), float32 in [0, 1]
    subject : np.ndarray of int, shape (n,)
        Subject number (0 .. n_subjects - 1).
    slice_index : np.ndarray of int, shape (n,)
    role : np.ndarray of str, shape (n,)
        ``train``, ``holdout`` or ``novel`` per slice (by subject).
    seed : int
    """

    images: np.ndarray
    subject: np.ndarray
    slice_index: np.ndarray
    role: np.ndarray
    seed: int

    def rows(self, role: str) -> np.ndarray:
        """Indices of the slices of one role, shape (k,)."""
        return np.flatnonzero(self.role == role)


def make_cohort(
    n_train: int,
    *,
    n_holdout: int = 6,
    n_novel: int = 6,
    seed: int = 0,
    size: int | None = None,
    cache_dir: Path = DATA_DIR,
) -> Cohort:
    """Generate (or load from the cache) a look-alike cohort of ``n_train + n_holdout + n_novel`` subjects.

    Subjects are generated from their own seeds ``(seed, role, k)``, so the first 8 training subjects of the
    32-subject cohort are the 8 of the 8-subject cohort, and the holdout and novel subjects never change with
    ``n_train``.

    Parameters
    ----------
    n_train, n_holdout, n_novel : int
        Subjects per role.
    seed : int
    size : int, optional
        Slice size in pixels (default: the audit's loading size).
    cache_dir : Path

    Returns
    -------
    Cohort
    """
    size = int(size or AuditConfig().size)
    key = hashlib.sha256(f"{GENERATOR_VERSION}:{n_train}:{n_holdout}:{n_novel}:{seed}:{size}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"cohort-{key}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        return Cohort(z["images"], z["subject"], z["slice_index"], z["role"].astype(str), seed)
    tmpl = template()
    imgs, subj, sidx, role = [], [], [], []
    n = 0
    for r, count, code in (("train", n_train, 0), ("holdout", n_holdout, 1), ("novel", n_novel, 2)):
        for k in range(count):
            sub_seed = int.from_bytes(hashlib.sha256(f"cohort:{seed}:{code}:{k}".encode()).digest()[:4], "little")
            sl, ix = _axial_slices(subject_volume(tmpl, sub_seed), size)
            imgs.append(sl)
            subj.append(np.full(len(sl), n))
            sidx.append(ix)
            role.append(np.full(len(sl), r))
            n += 1
    co = Cohort(np.concatenate(imgs), np.concatenate(subj), np.concatenate(sidx), np.concatenate(role), seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=co.images, subject=co.subject, slice_index=co.slice_index, role=co.role.astype("U8"))
    tmp.replace(path)
    log.info("generated a look-alike cohort of %d subjects (%d slices) -> %s", n, len(co.images), path.name)
    return co
