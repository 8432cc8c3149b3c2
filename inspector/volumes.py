"""Volumes as a unit: slice-order consistency, a shortlist of training volumes, 3D verification.

A generator of 3D data emits volumes, and a copied volume reproduces one training volume as a whole: its slices
match a contiguous run of one training volume's slices, in order (or reversed), at a near-constant offset and
spacing, possibly flipped, rotated a few degrees in 3D, resampled to another voxel size or cropped to a slab.
This module turns the slice stage's matches into that volume-level evidence, in three steps:

1. **Slice-order consistency** (:func:`slice_runs`): for each synthetic volume and each training volume its
   slices were matched to (the final match and every shortlisted candidate), a robust line
   ``train_index = slope * synthetic_index + offset`` is fitted through the matched index pairs (RANSAC over
   pairs, then least squares on the inliers). Its *consistency* is the share of the synthetic volume's slices
   whose match lies on that line (within ``tolerance`` training slices), weighted by their slice similarity.
   Copied volumes score near 1; a novel volume's matches scatter over many training volumes and positions.
2. **Shortlist**: the ``shortlist`` training volumes of highest consistency (ties: summed similarity).
3. **3D verification** (:func:`register_volumes`): each shortlisted training volume is registered onto the
   synthetic one with a 3D affine transform (batched in torch, on the GPU when present), started from every
   in-plane orientation of the eight, both through-plane directions, the foreground's moments and the
   run's slope and offset; the best starts are refined by Gauss-Newton (a forward-additive Lucas-Kanade with an
   intensity gain and bias, i.e. the enhanced correlation coefficient in 3D) over a two-level pyramid. The
   score is the masked normalised cross-correlation over the overlap (voxels of the synthetic volume's head
   that map inside the training volume) times the *coverage* (the share of the synthetic head that does).

A volume's **volume similarity** is its best verified score; :class:`inspector.calibration.Calibration`
turns it into a p-value against the holdout volumes scored through the same path.

Coordinates: every volume is a stack ``(D, H, W)`` of its slices in slice-index order, seen in normalised
coordinates ``(x, y, z) in [-1, 1]^3`` (``x`` along W, ``y`` along H, ``z`` along D; voxel centres,
``align_corners=False``), whatever its voxel count. The transform maps a point of the synthetic volume to
the training volume: ``p_train = A @ p_syn + t``; sampling the training volume at ``A p + t`` over the
synthetic grid gives the training volume in the synthetic volume's frame (:func:`resample_to`), which is
what the viewer shows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .store import release_freed_memory, release_pages
from .types import ProgressFn

__all__ = [
    "VolumeRef",
    "SliceRun",
    "VolumeAlignment",
    "VolumeMatch",
    "group_volumes",
    "slice_runs",
    "stack_volume",
    "register_volumes",
    "resample_to",
    "match_volumes",
    "fisher_z",
]

log = logging.getLogger(__name__)

#: Intensity above which a voxel belongs to the head (inputs are normalised to [0, 1]).
FOREGROUND = 0.06


# ---------------------------------------------------------------------------------------------- data model
@dataclass(frozen=True)
class VolumeRef:
    """The slices of one volume in a loaded cohort.

    Attributes
    ----------
    volume : str
        The volume's id (its source path relative to the cohort root; see :func:`inspector.pipeline.volume_ids`).
    rows : np.ndarray of int, shape (n,)
        Rows of the cohort's slices (and of its image stack), in slice-index order.
    slice_index : np.ndarray of int, shape (n,)
        Each row's index in the source volume, increasing.
    subject_id : str
    """

    volume: str
    rows: np.ndarray
    slice_index: np.ndarray
    subject_id: str

    def __len__(self) -> int:
        return int(self.rows.size)


@dataclass(frozen=True)
class SliceRun:
    """A synthetic volume's slices lying on a line through one training volume's slice indices.

    ``train_index ≈ slope * synthetic_index + offset`` for the ``n_inliers`` inlier slices; ``consistency`` is
    their summed slice similarity (clipped to [0, 1]) over the synthetic volume's slice count, in [0, 1].
    ``first, last`` is the synthetic slice-index range of the inliers.
    """

    train_volume: int
    slope: float
    offset: float
    n_inliers: int
    consistency: float
    first: int
    last: int


@dataclass
class VolumeAlignment:
    """A 3D transform from a synthetic volume to a training volume, and its score.

    Attributes
    ----------
    matrix : np.ndarray, shape (3, 4)
        ``[A | t]`` in normalised ``(x, y, z)`` coordinates: ``p_train = A @ p_syn + t``.
    ncc : float
        Masked NCC over the overlap, in [-1, 1].
    coverage : float
        Share of the synthetic volume's head that maps inside the training volume, in [0, 1].
    score : float
        ``ncc * coverage`` (the volume similarity when this is the best candidate).
    """

    matrix: np.ndarray
    ncc: float
    coverage: float
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "matrix": [[round(float(v), 6) for v in row] for row in np.asarray(self.matrix)],
            "ncc": float(self.ncc),
            "coverage": float(self.coverage),
            "score": float(self.score),
        }


@dataclass
class VolumeMatch:
    """One query volume's volume-level match (a row of ``volumes.csv``'s verification columns).

    Attributes
    ----------
    volume : str
    n_slices : int
    similarity : float
        The best verified 3D score (``ncc * coverage``); ``nan`` when no candidate could be verified.
    train_volume : str
        The training volume of that score (``""`` if none).
    train_subject : str
    run : SliceRun or None
        The slice run of the chosen training volume (None when it came from no run).
    alignment : VolumeAlignment or None
    candidates : list of str
        Every shortlisted training volume, best consistency first.
    consistency : float
        The best slice-order consistency among the candidates, in [0, 1].
    """

    volume: str
    n_slices: int
    similarity: float
    train_volume: str = ""
    train_subject: str = ""
    run: SliceRun | None = None
    alignment: VolumeAlignment | None = None
    candidates: list[str] = field(default_factory=list)
    consistency: float = 0.0


def fisher_z(r: Any) -> np.ndarray:
    """``atanh`` of correlations clipped to [-0.9999, 0.9999], shape as ``r`` (float64)."""
    return np.arctanh(np.clip(np.asarray(r, np.float64), -0.9999, 0.9999))


# ---------------------------------------------------------------------------------------------- grouping
def group_volumes(paths: Sequence[str], slice_index: Sequence[int], subjects: Sequence[str]) -> list[VolumeRef]:
    """Group a cohort's slices into volumes (by source path), each in slice-index order.

    Parameters
    ----------
    paths, slice_index, subjects : sequences of length n
        Per slice: its volume id, its index in the volume and its subject.

    Returns
    -------
    list of VolumeRef
        In order of first appearance.
    """
    paths = np.asarray(paths, dtype=object)
    sidx = np.asarray(slice_index, dtype=np.int64)
    subj = np.asarray(subjects, dtype=object)
    if not (paths.shape == sidx.shape == subj.shape):
        raise ValueError(
            f"paths, slice_index and subjects must have one length; got {paths.shape}, {sidx.shape}, {subj.shape}."
        )
    order: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        order.setdefault(str(p), []).append(i)
    out = []
    for p, rows in order.items():
        r = np.asarray(rows, dtype=np.int64)
        r = r[np.argsort(sidx[r], kind="stable")]
        out.append(VolumeRef(p, r, sidx[r], str(subj[r[0]])))
    return out


# ---------------------------------------------------------------------------------------------- slice runs
def _fit_line(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, tol: float, rng: np.random.Generator
) -> tuple[float, float, np.ndarray]:
    """Robust weighted line ``y = a x + b`` (RANSAC over point pairs, slope |a| in [0.2, 5], then least squares).

    Returns (a, b, inlier mask). Points sharing one x are alternatives (candidates of one slice): a slice counts
    once, with its best-fitting alternative.
    """
    n = x.size
    ux = np.unique(x)
    if ux.size == 1:
        j = int(np.argmax(w))
        return 1.0, float(y[j] - x[j]), np.arange(n) == j
    best = (-1.0, 1.0, float(np.median(y - x)))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if x[i] != x[j]]
    if len(pairs) > 400:
        pick = rng.choice(len(pairs), 400, replace=False)
        pairs = [pairs[k] for k in pick]
    for i, j in pairs:
        a = (y[j] - y[i]) / (x[j] - x[i])
        if not (0.2 <= abs(a) <= 5.0):
            continue
        b = y[i] - a * x[i]
        support = _support(x, y, w, a, b, tol)
        if support > best[0]:
            best = (support, a, b)
    _, a, b = best
    for _ in range(2):  # least squares on the inliers (one per slice)
        inl = _inliers(x, y, w, a, b, tol)
        if inl.sum() < 2 or np.unique(x[inl]).size < 2:
            break
        a2, b2 = np.polyfit(x[inl], y[inl], 1, w=np.sqrt(np.maximum(w[inl], 1e-6)))
        if not (0.2 <= abs(a2) <= 5.0):
            break
        a, b = float(a2), float(b2)
    return float(a), float(b), _inliers(x, y, w, a, b, tol)


def _inliers(x: np.ndarray, y: np.ndarray, w: np.ndarray, a: float, b: float, tol: float) -> np.ndarray:
    """Points within ``tol`` of the line, at most one per x (the heaviest)."""
    close = np.abs(y - (a * x + b)) <= tol
    keep = np.zeros(x.size, dtype=bool)
    idx = np.flatnonzero(close)
    if idx.size:
        order = idx[np.lexsort((-w[idx], x[idx]))]
        _, first = np.unique(x[order], return_index=True)
        keep[order[first]] = True
    return keep


def _support(x: np.ndarray, y: np.ndarray, w: np.ndarray, a: float, b: float, tol: float) -> float:
    return float(w[_inliers(x, y, w, a, b, tol)].sum())


def slice_runs(
    query: VolumeRef,
    train: Sequence[VolumeRef],
    train_volume_of: np.ndarray,
    train_slice_index: np.ndarray,
    matches: np.ndarray,
    weights: np.ndarray,
    *,
    tolerance: float = 2.0,
    max_volumes: int = 8,
    seed: int = 0,
) -> list[SliceRun]:
    """The slice runs of one synthetic volume through the training volumes its slices matched.

    Parameters
    ----------
    query : VolumeRef
        The synthetic volume.
    train : sequence of VolumeRef
        The training volumes (``train_volume_of`` indexes it).
    train_volume_of : np.ndarray of int, shape (n_train_slices,)
        The training volume of each training slice.
    train_slice_index : np.ndarray of int, shape (n_train_slices,)
        Each training slice's index in its volume.
    matches : np.ndarray of int, shape (n_query_slices, K)
        Per query slice (rows of ``query.rows`` order), training slices it matched (final match first, then
        shortlisted candidates; ``-1`` = none).
    weights : np.ndarray, shape (n_query_slices, K)
        Each match's weight in [0, 1] (the final match: its slice similarity; candidates less).
    tolerance : float
        Largest distance (in training slice indices) of an inlier from the line.
    max_volumes : int
        Training volumes considered (those with most matched weight).

    Returns
    -------
    list of SliceRun
        Best consistency first.
    """
    m = len(query)
    if matches.shape[0] != m or weights.shape != matches.shape:
        raise ValueError(f"matches and weights must have shape ({m}, K); got {matches.shape} and {weights.shape}.")
    rng = np.random.default_rng(seed)
    qz = np.repeat(query.slice_index.astype(np.float64), matches.shape[1])
    flat = matches.reshape(-1)
    w = np.clip(weights.reshape(-1).astype(np.float64), 0.0, 1.0)
    ok = flat >= 0
    qz, flat, w = qz[ok], flat[ok], w[ok]
    vol = train_volume_of[flat]
    tz = train_slice_index[flat].astype(np.float64)
    tot = np.bincount(vol, weights=w, minlength=len(train))
    cands = [int(v) for v in np.argsort(-tot, kind="stable")[:max_volumes] if tot[v] > 0]
    runs = []
    for v in cands:
        sel = vol == v
        a, b, inl = _fit_line(qz[sel], tz[sel], w[sel], tolerance, rng)
        xs = qz[sel][inl]
        cons = float(w[sel][inl].sum() / max(m, 1))
        runs.append(
            SliceRun(
                train_volume=v,
                slope=a,
                offset=b,
                n_inliers=int(inl.sum()),
                consistency=min(1.0, cons),
                first=int(xs.min()) if xs.size else int(query.slice_index[0]),
                last=int(xs.max()) if xs.size else int(query.slice_index[-1]),
            )
        )
    runs.sort(key=lambda r: (-r.consistency, -r.n_inliers))
    return runs


# ---------------------------------------------------------------------------------------------- stacks
def stack_volume(images: Any, ref: VolumeRef) -> np.ndarray:
    """The volume's slices as one array ``(D, H, W)`` float32, in slice-index order.

    ``images`` is any row-indexable stack of the cohort's slices (an array or a memory map), shape (n, H, W).
    """
    return np.ascontiguousarray(np.asarray(images[ref.rows], dtype=np.float32))


def _z_normalised(index: np.ndarray | float, ref_index: np.ndarray) -> np.ndarray:
    """Normalised z (voxel centres, align_corners=False) of slice indices in a stack holding ``ref_index``."""
    i0 = float(ref_index[0])
    n = ref_index.size
    step = float(np.median(np.diff(ref_index))) if n > 1 else 1.0
    step = step if step > 0 else 1.0
    p = (np.asarray(index, np.float64) - i0) / step
    return (2.0 * p + 1.0) / n - 1.0


def run_z_map(run: SliceRun, query: VolumeRef, train: VolumeRef) -> tuple[float, float]:
    """``(a_zz, t_z)`` mapping the query's normalised z to the training volume's along ``run``."""
    zi = np.array([query.slice_index[0], query.slice_index[-1] if len(query) > 1 else query.slice_index[0] + 1.0])
    zq = _z_normalised(zi, query.slice_index)
    zt = _z_normalised(run.slope * zi + run.offset, train.slice_index)
    if abs(zq[1] - zq[0]) < 1e-9:
        return 1.0, float(zt[0] - zq[0])
    a = float((zt[1] - zt[0]) / (zq[1] - zq[0]))
    return a, float(zt[0] - a * zq[0])


# ---------------------------------------------------------------------------------------------- registration
def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %r requested but CUDA is not available; registering volumes on the CPU", device)
        return torch.device("cpu")
    return torch.device(device)


def _to_grid(vol: np.ndarray | torch.Tensor, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """A (D, H, W) volume resampled (trilinear, antialiased by area when shrinking in-plane) to ``shape``."""
    x = torch.as_tensor(np.asarray(vol, np.float32) if not isinstance(vol, torch.Tensor) else vol, device=device)
    x = x.float()[None, None]
    d, h, w = shape
    if x.shape[-1] > 2 * w or x.shape[-2] > 2 * h:  # area-average first, so fine detail does not alias
        x = F.adaptive_avg_pool3d(x, (x.shape[2], max(h, x.shape[-2] // 2), max(w, x.shape[-1] // 2)))
    return F.interpolate(x, size=shape, mode="trilinear", align_corners=False)[0, 0]


def _base(shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Normalised voxel-centre coordinates ``(D, H, W, 4)``: (x, y, z, 1)."""
    d, h, w = shape
    zs = (torch.arange(d, device=device, dtype=torch.float32) * 2 + 1) / d - 1
    ys = (torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1
    z, y, x = torch.meshgrid(zs, ys, xs, indexing="ij")
    return torch.stack([x, y, z, torch.ones_like(x)], -1)


#: Through-plane placements tried as starts (``(a_zz, t_z)``): the query as a slab of a half, a third or two
#: thirds of the training volume's extent, at several positions (partial copies whose slice run was missed).
_SLABS: tuple[tuple[float, float], ...] = tuple(
    (s, float(t)) for s in (0.7, 0.5, 0.35) for t in np.linspace(-(1 - s), 1 - s, {0.7: 3, 0.5: 3, 0.35: 5}[s])
)


def _tilts(deg: float) -> torch.Tensor:
    """Rotations (k, 3, 3): the identity and, for ``deg > 0``, ``+-deg`` about the x and the y axis."""
    out = [torch.eye(3)]
    if deg > 0:
        a = math.radians(deg)
        c, s = math.cos(a), math.sin(a)
        for sg in (1.0, -1.0):
            out.append(torch.tensor([[1.0, 0, 0], [0, c, -sg * s], [0, sg * s, c]]))
            out.append(torch.tensor([[c, 0, sg * s], [0, 1.0, 0], [-sg * s, 0, c]]))
    return torch.stack(out)


def _orientations() -> torch.Tensor:
    """The 16 starting orientations (3, 3): the 8 in-plane signed permutations of (x, y) times z kept or reversed."""
    out = []
    for swap in (False, True):
        for sx in (1.0, -1.0):
            for sy in (1.0, -1.0):
                for sz in (1.0, -1.0):
                    m = torch.zeros(3, 3)
                    if swap:
                        m[0, 1], m[1, 0] = sx, sy
                    else:
                        m[0, 0], m[1, 1] = sx, sy
                    m[2, 2] = sz
                    out.append(m)
    return torch.stack(out)


def _moments(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground centroid (B, 3) and per-axis spread (B, 3) in normalised (x, y, z) of volumes (B, D, H, W)."""
    b = v.shape[0]
    base = _base(tuple(v.shape[1:]), v.device)[..., :3].reshape(-1, 3)
    w = (v > FOREGROUND).float().reshape(b, -1)
    n = w.sum(1, keepdim=True).clamp_min(1.0)
    c = w @ base / n
    var = w @ (base**2) / n - c**2
    return c, var.clamp_min(1e-6).sqrt()


def _sample(vol: torch.Tensor, mat: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample volumes (B, C, D, H, W) at ``mat @ base`` (mat (B, 3, 4), base (D, H, W, 4)).

    Returns the samples (B, C, D', H', W') and the inside mask (B, D', H', W').
    """
    pts = torch.einsum("bij,dhwj->bdhwi", mat, base)
    inside = (pts.abs() <= 1.0).all(-1).float()
    out = F.grid_sample(vol, pts, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out, inside


def _gradients(v: torch.Tensor) -> torch.Tensor:
    """Central-difference gradients (B, 3, D, H, W) of volumes (B, D, H, W), per unit of normalised (x, y, z)."""
    b, d, h, w = v.shape
    p = F.pad(v[:, None], (1, 1, 1, 1, 1, 1), mode="replicate")[:, 0]
    gx = (p[:, 1:-1, 1:-1, 2:] - p[:, 1:-1, 1:-1, :-2]) * (w / 4.0)
    gy = (p[:, 1:-1, 2:, 1:-1] - p[:, 1:-1, :-2, 1:-1]) * (h / 4.0)
    gz = (p[:, 2:, 1:-1, 1:-1] - p[:, :-2, 1:-1, 1:-1]) * (d / 4.0)
    return torch.stack([gx, gy, gz], 1)


def _masked_ncc(f: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted NCC over the last three dims of (B, D, H, W) tensors; 0 where the weight is empty."""
    dims = (1, 2, 3)
    sw = w.sum(dims).clamp_min(1e-6)
    mf = (w * f).sum(dims) / sw
    mg = (w * g).sum(dims) / sw
    fc = (f - mf[:, None, None, None]) * w
    gc = g - mg[:, None, None, None]
    num = (fc * gc).sum(dims)
    den = torch.sqrt((fc * (f - mf[:, None, None, None])).sum(dims) * (w * gc * gc).sum(dims)).clamp_min(1e-8)
    return torch.where(w.sum(dims) > 8, num / den, torch.zeros_like(num))


def _evaluate(
    fixed: torch.Tensor, moving: torch.Tensor, mat: torch.Tensor, base: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ncc, coverage) of training volumes ``moving`` (B, D, H, W) sampled at ``mat`` over the query ``fixed``."""
    warped, inside = _sample(moving[:, None], mat, base)
    head = (fixed > FOREGROUND).float()
    w = head * inside
    cov = w.sum((1, 2, 3)) / head.sum((1, 2, 3)).clamp_min(1.0)
    return _masked_ncc(fixed, warped[:, 0], w), cov


#: Starts times voxels evaluated at once by :func:`_evaluate_chunked` (about 4 MB per float32 temporary):
#: the coarse level scores several hundred starts per candidate, whose sampling grids would otherwise take
#: hundreds of MB at once whatever the cohort's size.
EVAL_VOXELS = 1 << 20

#: Starts times voxels refined at once by :func:`_gauss_newton` (its Jacobian holds 14 floats per voxel and
#: start, about 25 MB per start at the 48-voxel grid): 4 starts at a time there.
GN_VOXELS = 1 << 19


def _evaluate_chunked(
    fixed: torch.Tensor, train: torch.Tensor, owner: torch.Tensor, mats: torch.Tensor, base: torch.Tensor
) -> torch.Tensor:
    """``ncc * coverage`` (S,) of the starts ``mats`` (S, 3, 4), start ``s`` sampling ``train[owner[s]]``
    (train (n, D, H, W)) over the one query ``fixed`` (D, H, W), in chunks of :data:`EVAL_VOXELS` voxels."""
    step = max(1, EVAL_VOXELS // int(fixed.numel()))
    out = []
    for a in range(0, len(mats), step):
        m = mats[a : a + step]
        ncc, cov = _evaluate(fixed.expand(len(m), *fixed.shape), train[owner[a : a + step]], m, base)
        out.append(ncc * cov)
    return torch.cat(out) if out else torch.zeros(0, device=fixed.device)


def _gauss_newton(
    fixed: torch.Tensor, moving: torch.Tensor, mat: torch.Tensor, iterations: int, damping: float = 1e-2
) -> torch.Tensor:
    """Refine affines (B, 3, 4) by forward-additive Gauss-Newton on ``||w (T(A p + t) - g Q - h)||^2``.

    ``fixed`` (B, D, H, W) is the query Q, ``moving`` (B, D, H, W) the training volume T, sampled with its
    gradients; ``g, h`` are a per-pair intensity gain and bias solved jointly (so the fit is the correlation's,
    invariant to linear intensity changes). The best iterate by masked NCC is kept.
    """
    step = max(1, GN_VOXELS // max(1, int(fixed[0].numel())))
    if fixed.shape[0] > step:  # the starts are independent: refine them a few at a time (bounded memory)
        return torch.cat(
            [
                _gauss_newton(fixed[a : a + step], moving[a : a + step], mat[a : a + step], iterations, damping)
                for a in range(0, fixed.shape[0], step)
            ]
        )
    base = _base(tuple(fixed.shape[1:]), fixed.device)
    bsz = fixed.shape[0]
    grads = _gradients(moving)
    vol = torch.cat([moving[:, None], grads], 1)  # (B, 4, D, H, W)
    head = (fixed > FOREGROUND).float()
    coords = base.reshape(-1, 4)  # (N, 4)
    q = fixed.reshape(bsz, -1)
    best_mat = mat.clone()
    ncc0, cov0 = _evaluate(fixed, moving, mat, base)
    best = ncc0 * cov0
    lam = torch.full((bsz,), damping, device=fixed.device)
    for _ in range(iterations):
        mat = best_mat
        s, inside = _sample(vol, mat, base)
        w = (inside * torch.maximum(head, (s[:, 0] > FOREGROUND).float())).reshape(bsz, -1)
        val = s[:, 0].reshape(bsz, -1)
        g = s[:, 1:].reshape(bsz, 3, -1)  # dT/d(x, y, z) at the sampled points
        # Jacobian of T(A p + t) wrt the 12 entries of [A | t] (row-major), then -Q and -1 for the gain and bias
        jac = (g[:, :, None, :] * coords.T[None, None, :, :]).reshape(bsz, 12, -1)
        jac = torch.cat([jac, -q[:, None, :], -torch.ones_like(q)[:, None, :]], 1)  # (B, 14, N)
        # current gain/bias: the weighted least-squares fit of T by Q
        sw = w.sum(1).clamp_min(1.0)
        mq, mt = (w * q).sum(1) / sw, (w * val).sum(1) / sw
        cov = (w * (q - mq[:, None]) * (val - mt[:, None])).sum(1)
        var = (w * (q - mq[:, None]) ** 2).sum(1).clamp_min(1e-8)
        gain = cov / var
        bias = mt - gain * mq
        r = val - gain[:, None] * q - bias[:, None]  # (B, N)
        jw = jac * w[:, None, :]
        hmat = jw @ jac.transpose(1, 2)
        rhs = -(jw * r[:, None, :]).sum(-1)
        diag = hmat.diagonal(dim1=1, dim2=2).clamp_min(1e-8)
        # Levenberg-Marquardt: damp by the diagonal; a step that does not raise the score is refused and the
        # damping raised, one that does is kept and the damping lowered
        step = torch.linalg.solve(hmat + lam[:, None, None] * torch.diag_embed(diag), rhs[..., None])[..., 0]
        cand = mat + step[:, :12].reshape(bsz, 3, 4)
        ncc, cov_ = _evaluate(fixed, moving, cand, base)
        sc = ncc * cov_
        better = sc > best
        best = torch.where(better, sc, best)
        best_mat = torch.where(better[:, None, None], cand, best_mat)
        lam = torch.where(better, lam / 3.0, lam * 4.0).clamp(1e-6, 1e4)
    return best_mat


def register_volumes(
    query: np.ndarray,
    train: Sequence[np.ndarray],
    *,
    z_maps: Sequence[tuple[float, float] | None] | None = None,
    size: int = 48,
    coarse_size: int = 24,
    iterations: tuple[int, int] = (12, 6),
    start_candidates: int = 3,
    tilt_starts: float = 8.0,
    device: str = "auto",
) -> list[VolumeAlignment]:
    """Register training volumes onto one query volume in 3D and score the overlap.

    Parameters
    ----------
    query : np.ndarray, shape (D, H, W)
        The synthetic volume, intensities in [0, 1].
    train : sequence of np.ndarray, each shape (D_i, H_i, W_i)
        Candidate training volumes.
    z_maps : sequence of (a_zz, t_z) or None, optional
        Per candidate, the through-plane map of its slice run (:func:`run_z_map`), used as an extra start.
    size : int
        Side of the cube grid both volumes are resampled to for the fine level and the score.
    coarse_size : int
        Side of the coarse level's grid, where every start is scored and the best are refined.
    iterations : (int, int)
        Gauss-Newton iterations at the coarse and the fine level.
    start_candidates : int
        Starts per candidate kept after scoring all of them at the coarse level.
    tilt_starts : float
        Each orientation is also started tilted by this many degrees about each in-plane axis (both signs), so
        that copies rotated out of the slice plane are reached (0: no tilted starts).
    device : str
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.

    Returns
    -------
    list of VolumeAlignment
        One per training volume, in order.
    """
    q = np.asarray(query, np.float32)
    if q.ndim != 3 or min(q.shape) < 1:
        raise ValueError(f"query must be a (D, H, W) volume; got shape {q.shape}.")
    if not len(train):
        return []
    dev = _resolve_device(device)
    n = len(train)
    z_maps = list(z_maps) if z_maps is not None else [None] * n
    if len(z_maps) != n:
        raise ValueError(f"z_maps must have one entry per training volume ({n}); got {len(z_maps)}.")
    with torch.no_grad():
        cshape = (coarse_size,) * 3
        fshape = (size,) * 3
        qc = _to_grid(q, cshape, dev)
        tc = torch.stack([_to_grid(np.asarray(t, np.float32), cshape, dev) for t in train])
        orient = _orientations().to(dev)  # (16, 3, 3)
        tilts = _tilts(tilt_starts).to(dev)  # (k, 3, 3)
        cq, rq = _moments(qc[None])
        ct, rt = _moments(tc)
        starts, owner = [], []
        for i in range(n):
            scale_xy = float((rt[i, :2].mean() / rq[0, :2].mean()).clamp(0.5, 2.0))
            scale_z = float((rt[i, 2] / rq[0, 2]).clamp(0.3, 3.0))
            placements: list[tuple[float, float] | None] = [None, *_SLABS]
            if z_maps[i] is not None:
                placements.append(z_maps[i])
            for o, (ti, tilt) in ((o, it) for o in orient for it in enumerate(tilts)):
                for zmap in placements:
                    if ti and zmap in _SLABS:
                        continue  # tilted starts only for the whole volume and the run's slab
                    a = tilt @ o
                    a[:2, :2] *= scale_xy
                    a[2, 2] *= scale_z
                    t = ct[i] - a @ cq[0]
                    if zmap is not None:
                        if (zmap[0] > 0) != (o[2, 2] > 0):
                            zmap = (-zmap[0], zmap[1])  # the same slab, read in the other direction
                        a[2, 2] = zmap[0]
                        t[2] = zmap[1]
                    starts.append(torch.cat([a, t[:, None]], 1))
                    owner.append(i)
        mats = torch.stack(starts)
        owner_t = torch.as_tensor(owner, device=dev)
        base_c = _base(cshape, dev)
        sc = _evaluate_chunked(qc, tc, owner_t, mats, base_c).cpu().numpy()
        keep = []
        for i in range(n):
            mine = np.flatnonzero(np.asarray(owner) == i)
            keep.extend(mine[np.argsort(-sc[mine], kind="stable")[:start_candidates]].tolist())
        keep_t = torch.as_tensor(keep, device=dev)
        mats, own = mats[keep_t], owner_t[keep_t]
    # refinement (no autograd: the Gauss-Newton steps are closed form)
    with torch.no_grad():
        mats = _gauss_newton(qc.expand(len(mats), *cshape).contiguous(), tc[own].contiguous(), mats, iterations[0])
        qf = _to_grid(q, fshape, dev)
        tf = torch.stack([_to_grid(np.asarray(t, np.float32), fshape, dev) for t in train])
        mats = _gauss_newton(qf.expand(len(mats), *fshape).contiguous(), tf[own].contiguous(), mats, iterations[1])
        ncc, cov = _evaluate(qf.expand(len(mats), *fshape), tf[own], mats, _base(fshape, dev))
        score = (ncc * cov).cpu().numpy()
        ncc_n, cov_n, mats_n, own_n = ncc.cpu().numpy(), cov.cpu().numpy(), mats.cpu().numpy(), own.cpu().numpy()
    out = []
    for i in range(n):
        mine = np.flatnonzero(own_n == i)
        j = mine[int(np.argmax(score[mine]))]
        out.append(VolumeAlignment(mats_n[j].astype(np.float64), float(ncc_n[j]), float(cov_n[j]), float(score[j])))
    return out


def resample_to(
    train: np.ndarray, matrix: np.ndarray, shape: tuple[int, int, int], *, device: str = "cpu"
) -> np.ndarray:
    """The training volume in the query volume's frame: ``train`` sampled at ``A p + t`` over a grid of ``shape``.

    Parameters
    ----------
    train : np.ndarray, shape (D_t, H_t, W_t)
    matrix : np.ndarray, shape (3, 4)
        A :attr:`VolumeAlignment.matrix`.
    shape : (int, int, int)
        The query volume's (D, H, W) (or any grid over its field of view).

    Returns
    -------
    np.ndarray, shape ``shape``, float32 (zero outside the training volume)
    """
    m = np.asarray(matrix, np.float32)
    if m.shape != (3, 4):
        raise ValueError(f"matrix must have shape (3, 4); got {m.shape}.")
    dev = _resolve_device(device)
    with torch.no_grad():
        t = torch.as_tensor(np.asarray(train, np.float32), device=dev)[None, None]
        out, _ = _sample(t, torch.as_tensor(m, device=dev)[None], _base(tuple(int(s) for s in shape), dev))
    return out[0, 0].cpu().numpy()


# ---------------------------------------------------------------------------------------------- the stage
def match_volumes(
    query_refs: Sequence[VolumeRef],
    query_images: Any,
    train_refs: Sequence[VolumeRef],
    train_images: Any,
    matches: np.ndarray,
    weights: np.ndarray,
    *,
    shortlist: int = 3,
    min_slices: int = 4,
    size: int = 48,
    device: str = "auto",
    progress: ProgressFn | None = None,
    stage: str = "volumes",
) -> list[VolumeMatch]:
    """Volume-level matches of query volumes: slice runs, a shortlist, 3D verification.

    Parameters
    ----------
    query_refs : sequence of VolumeRef
        The query (synthetic or holdout) volumes; their rows index ``query_images`` and ``matches``.
    query_images, train_images : arrays (n, H, W), or row-indexable stacks such as
        :class:`inspector.store.RowSubset`
        The cohorts' slices in [0, 1].
    train_refs : sequence of VolumeRef
        The training volumes (rows index ``train_images``).
    matches : np.ndarray of int, shape (n_query_slices, K)
        Per query slice, its matched training slices (final match first; ``-1`` = none).
    weights : np.ndarray, shape (n_query_slices, K)
        Weights of those matches in [0, 1].
    shortlist : int
        Training volumes verified per query volume.
    min_slices : int
        Volumes with fewer slices are not verified in 3D (their similarity is NaN): a 2D image is not a volume.
    size : int
        Grid side of the 3D verification (:func:`register_volumes`).

    Returns
    -------
    list of VolumeMatch
        One per query volume, in order.
    """
    t_vol = np.full(int(max((r.rows.max() for r in train_refs), default=-1)) + 1, -1, np.int64)
    t_sidx = np.zeros_like(t_vol)
    for v, r in enumerate(train_refs):
        t_vol[r.rows] = v
        t_sidx[r.rows] = r.slice_index
    out = []
    total = len(query_refs)
    for k, ref in enumerate(query_refs):
        if progress:
            progress(stage, k, total)
        if len(ref) < min_slices:
            out.append(VolumeMatch(ref.volume, len(ref), float("nan")))
            continue
        runs = slice_runs(ref, train_refs, t_vol, t_sidx, matches[ref.rows], weights[ref.rows])
        runs = [r for r in runs if len(train_refs[r.train_volume]) >= min_slices][:shortlist]
        if not runs:
            out.append(VolumeMatch(ref.volume, len(ref), float("nan")))
            continue
        q = stack_volume(query_images, ref)
        tv = [stack_volume(train_images, train_refs[r.train_volume]) for r in runs]
        zm = [run_z_map(r, ref, train_refs[r.train_volume]) for r in runs]
        al = register_volumes(q, tv, z_maps=zm, size=size, device=device)
        del q, tv
        release_pages(query_images, train_images)  # the slice stores' pages read for this volume
        release_freed_memory()  # each volume's temporaries (hundreds of MB) would otherwise fragment the heap
        j = int(np.argmax([a.score for a in al]))
        tr = train_refs[runs[j].train_volume]
        out.append(
            VolumeMatch(
                ref.volume,
                len(ref),
                float(al[j].score),
                tr.volume,
                tr.subject_id,
                runs[j],
                al[j],
                [train_refs[r.train_volume].volume for r in runs],
                float(max(r.consistency for r in runs)),
            )
        )
    if progress:
        progress(stage, total, total)
    return out


def match_weights(
    similarity: np.ndarray, nearest: np.ndarray, candidates: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The slice matches and weights :func:`match_volumes` reads, from a slice-level match.

    The final match weighs its (aligned) slice similarity clipped to [0, 1]; every other shortlisted candidate
    half of it (a copy's true source is often a candidate when a neighbour slice won).

    Returns
    -------
    (np.ndarray of int, np.ndarray of float), each shape (m, 1 + K)
    """
    sim = np.clip(np.nan_to_num(np.asarray(similarity, np.float64), nan=0.0), 0.0, 1.0)
    near = np.asarray(nearest, np.int64)[:, None]
    if candidates is None:
        return near, sim[:, None]
    cand = np.asarray(candidates, np.int64)
    cand = np.where(cand == near, -1, cand)
    m = np.concatenate([near, cand], 1)
    w = np.concatenate([sim[:, None], np.repeat(0.5 * sim[:, None], cand.shape[1], 1)], 1)
    return m, w
