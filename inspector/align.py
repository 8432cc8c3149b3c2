"""Alignment-verified re-ranking: register candidate training slices onto synthetic slices.

Each pair (synthetic slice = *fixed*, training candidate = *moving*) is registered with a similarity
transform (rotation, isotropic scale, shift), after an optional flip of the moving image, and scored by
normalised cross-correlation (NCC) over the aligned overlap. A copy (even rotated, shifted, cropped,
flipped, noisy or intensity-changed) aligns to its source almost perfectly; a different slice of the same
subject a few millimetres away does not.

The search is batched over pairs in torch (CUDA when present, deterministic on CPU), with no per-pair
Python loop, in three stages:

1. **Coarse level** at ``coarse_size`` pixels (32): for every candidate flip (one if the caller knows it from
   the feature match, else all four) and starting angle, the enhanced correlation coefficient algorithm
   (ECC; Evangelidis & Psarakis 2008) maximises the masked correlation: a Gauss-Newton ascent with a
   closed-form step, computed from one 7 x 7 Gram matrix per pair and iteration. Its basin on brain slices
   is wide (it converged from 15 degrees, 15 % zoom and 12 % shift off on every MNI slice tried), so a
   grid over angles and scales is unnecessary: one start per flip suffices up to ``max_angle = 20``. The
   other starts map the two slices' foreground centroids and spreads onto each other (another field of
   view, a shift, a crop) and, when ``max_angle`` allows more than the ECC's basin, rotate by the angle read
   off the circular cross-correlation of rings about those centroids (a copy rotated by any angle). Every
   start is first scored once and only the best few are iterated.
2. **Fine level** at ``size`` pixels (64): the best coarse candidate(s) are refined with a few more ECC
   iterations. The moving image's validity mask is warped along and used as the weight, so zero padding
   is never scored. The best iterate within the bounds is kept.
3. **Score** of the final transform at ``size`` pixels with the chosen ``measure`` (default ``poly_fg``:
   correlation after a quadratic intensity map, over the head's foreground; see :func:`register_pairs`).

Transforms follow :func:`inspector.preprocess.affine_warp`: ``apply_alignment`` flips the moving image,
then calls ``affine_warp(image, angle, shift, scale)``; the result lies in the fixed image's frame. The
transform is expressed in normalised coordinates, so it applies at any resolution of the same field of
view (the registration runs at ``size`` pixels, the app shows 128 or 256).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .descriptors import foreground_moments, polar_sample, relative_angle
from .preprocess import affine_warp, resize_square
from .types import ProgressFn
from .views import FLIPS, View

__all__ = [
    "MEASURES",
    "Alignment",
    "register_pairs",
    "apply_alignment",
    "apply_alignment_single",
    "pair_ncc",
    "score_alignment",
]

log = logging.getLogger(__name__)

#: Scores of the final transform (see :func:`register_pairs`); the first is the default.
MEASURES: tuple[str, ...] = ("poly_fg", "ncc_fg", "ncc", "grad")
#: Extra starting zooms of the registration (see ``zoom_starts`` of :func:`register_pairs`).
ZOOM_STARTS: tuple[float, ...] = (1.3, 1.6)
#: Rotations (degrees) the ECC converges from on brain slices: a larger ``max_angle`` adds starts rotated by
#: the angle read off the slices' rings (see ``init`` of :func:`register_pairs`).
ECC_BASIN = 20.0
#: Foreground rule of the ``*_fg`` measures: above this fraction of the image's range over the overlap.
FG_FRACTION = 0.05


_EPS = 1e-8


@dataclass
class Alignment:
    """Best similarity transform and its verification score for each of N (fixed, moving) pairs.

    Attributes
    ----------
    ncc : np.ndarray, shape (N,), float32 in [-1, 1]
        The verification score after alignment: a normalised correlation over the aligned overlap (the
        ``measure`` of :func:`register_pairs`). Higher means *more likely a copy*.
    angle : np.ndarray, shape (N,), float32
        Rotation in degrees (the ``angle_deg`` of :func:`inspector.preprocess.affine_warp`).
    scale : np.ndarray, shape (N,), float32
        Zoom factor (> 1 magnifies the moving image).
    shift : np.ndarray, shape (N, 2), float32
        ``(dx, dy)`` as a fraction of the field of view, same convention as ``affine_warp``.
    flip : np.ndarray, shape (N,), object (str)
        The :class:`~inspector.views.View` applied to the moving image before the transform (canonical
        names; the registration searches :data:`~inspector.views.FLIPS`: ``id``, ``hflip``, ``vflip``,
        ``hvflip``).
    overlap : np.ndarray, shape (N,), float32, optional
        Fraction of the fixed frame covered by the aligned moving image.
    train_index : np.ndarray, shape (N,), int64, optional
        Which training slice was registered (set by the matcher; -1 = none).
    """

    ncc: np.ndarray
    angle: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    flip: np.ndarray
    overlap: np.ndarray | None = None
    train_index: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ncc = np.asarray(self.ncc, dtype=np.float32).reshape(-1)
        n = self.ncc.shape[0]
        self.angle = np.asarray(self.angle, dtype=np.float32).reshape(-1)
        self.scale = np.asarray(self.scale, dtype=np.float32).reshape(-1)
        self.shift = np.asarray(self.shift, dtype=np.float32).reshape(-1, 2)
        self.flip = np.asarray([View.parse(f).value for f in np.asarray(self.flip).reshape(-1)], dtype=object)
        if self.overlap is not None:
            self.overlap = np.asarray(self.overlap, dtype=np.float32).reshape(-1)
        if self.train_index is not None:
            self.train_index = np.asarray(self.train_index, dtype=np.int64).reshape(-1)
        for name in ("angle", "scale", "shift", "flip", "overlap", "train_index"):
            arr = getattr(self, name)
            if arr is not None and arr.shape[0] != n:
                raise ValueError(f"Alignment.{name} has {arr.shape[0]} rows but ncc has {n}; all must match.")

    def __len__(self) -> int:
        return int(self.ncc.shape[0])

    def transform(self, index: int) -> dict[str, Any]:
        """The transform of pair ``index`` as the dict :func:`apply_alignment_single` takes."""
        i = int(index)
        out: dict[str, Any] = {
            "flip": str(self.flip[i]),
            "angle": float(self.angle[i]),
            "scale": float(self.scale[i]),
            "shift": [float(v) for v in self.shift[i]],
            "ncc": float(self.ncc[i]),
        }
        if self.train_index is not None:
            out["train_index"] = int(self.train_index[i])
        return out

    def as_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays (``ncc``, ``angle``, ``scale``, ``shift``, ``flip``; ``overlap`` and ``train_index``
        when known). :meth:`from_dict` is the inverse."""
        out = {"ncc": self.ncc, "angle": self.angle, "scale": self.scale, "shift": self.shift, "flip": self.flip}
        if self.overlap is not None:
            out["overlap"] = self.overlap
        if self.train_index is not None:
            out["train_index"] = self.train_index
        return out

    @classmethod
    def from_dict(cls, arrays: Any) -> Alignment:
        """An :class:`Alignment` from :meth:`as_dict`'s arrays (e.g. read back from ``audit.npz``)."""
        get = arrays.get if hasattr(arrays, "get") else (lambda k, d=None: arrays[k] if k in arrays else d)
        return cls(
            ncc=get("ncc"),
            angle=get("angle"),
            scale=get("scale"),
            shift=get("shift"),
            flip=np.asarray(get("flip")).astype(str),
            overlap=get("overlap"),
            train_index=get("train_index"),
        )

    @classmethod
    def concat(cls, parts: Sequence[Alignment]) -> Alignment:
        """The rows of ``parts`` one after the other (``overlap``, ``train_index`` kept when every part has them)."""
        if not parts:
            raise ValueError("Alignment.concat needs at least one part.")

        def cat(name: str) -> np.ndarray | None:
            arrays = [getattr(a, name) for a in parts]
            return None if any(x is None for x in arrays) else np.concatenate(arrays)

        return cls(**{f.name: cat(f.name) for f in fields(cls)})

    def take(self, index: np.ndarray | Sequence[int]) -> Alignment:
        """A new :class:`Alignment` with the rows ``index`` (integer array or boolean mask)."""
        idx = np.asarray(index)
        return Alignment(
            self.ncc[idx],
            self.angle[idx],
            self.scale[idx],
            self.shift[idx],
            self.flip[idx],
            None if self.overlap is None else self.overlap[idx],
            None if self.train_index is None else self.train_index[idx],
        )


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" or str(device).startswith("cuda"):
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use 'auto' or 'cpu'.")
        return torch.device(device)
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]'; got {device!r}.")


def _check_stack(arr: Any, name: str) -> np.ndarray:
    x = np.asarray(arr)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise TypeError(f"{name} must be a numeric array of shape (N, H, W); got dtype {x.dtype}.")
    if x.ndim != 3:
        raise ValueError(
            f"{name} must have shape (N, H, W); got shape {x.shape}. Stack single images with np.stack or x[None]."
        )
    if min(x.shape[1:]) < 8:
        raise ValueError(f"{name} images must be at least 8 x 8 pixels; got {x.shape[1:]}.")
    x = np.require(x, np.float32, ["C", "W"])  # a read-only (memory-mapped) input is copied: torch writes need it
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        rows = np.unique(np.nonzero(~np.isfinite(x))[0])[:5].tolist()
        raise ValueError(f"{name} holds {bad} NaN/Inf values (first rows {rows}); clean or normalise them first.")
    return x


def _check_flips(flips: Sequence[str] | np.ndarray | str | None, n: int) -> np.ndarray | None:
    if flips is None:
        return None
    if isinstance(flips, str):
        return np.full(n, View.parse(flips).value, dtype=object)
    arr = np.asarray(flips, dtype=object).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"flips has {arr.shape[0]} entries but there are {n} pairs; give one flip per pair or None.")
    return np.asarray([View.parse(f).value for f in arr], dtype=object)


def _flip_each(x: torch.Tensor, flips: np.ndarray) -> torch.Tensor:
    """Flip each image of (n, H, W) by its own flip name (one vectorised pass per flip kind)."""
    out = x.clone()
    for name in np.unique(flips):
        view = View.parse(name)
        sel = np.nonzero(flips == name)[0]
        if view is not View.ID and sel.size:
            idx = torch.as_tensor(sel, device=x.device)
            out[idx] = view.apply(x[idx])
    return out


# ----------------------------------------------------------------------------------------------
# Transform parameterisation
# ----------------------------------------------------------------------------------------------
# The sampling map from fixed-frame to moving-frame normalised coordinates is
#     x_m = (1 + a) x - b y + tx,   y_m = b x + (1 + a) y + ty
# which is exactly the ``theta`` of affine_warp with cos/s = 1 + a, sin/s = b, t = -A (2 shift).


def _params_from_similarity(angle_deg: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    ang = angle_deg * (math.pi / 180.0)
    c, s = torch.cos(ang) / scale, torch.sin(ang) / scale
    sx, sy = -2.0 * shift[..., 0], -2.0 * shift[..., 1]
    tx = c * sx - s * sy
    ty = s * sx + c * sy
    return torch.stack([c - 1.0, s, tx, ty], dim=-1)


def _similarity_from_params(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c, s, tx, ty = p[..., 0] + 1.0, p[..., 1], p[..., 2], p[..., 3]
    det = (c * c + s * s).clamp_min(_EPS)
    angle = torch.atan2(s, c) * (180.0 / math.pi)
    scale = 1.0 / torch.sqrt(det)
    # shift = -A^-1 t / 2 with A^-1 = [[c, s], [-s, c]] / det
    dx = -(c * tx + s * ty) / det / 2.0
    dy = -(-s * tx + c * ty) / det / 2.0
    return angle, scale, torch.stack([dx, dy], dim=-1)


def _grid(
    p: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, r_in: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling grid (n, r, r, 2) of params (n, 4) over base coordinates X, Y (r, r); and the hard mask.

    The mask is 1 where all four bilinear neighbours lie inside the moving image (no zero padding mixed in);
    ``r_in`` is the moving image's size when it differs from the grid's.
    """
    n, r = p.shape[0], X.shape[-1]
    c, s = (p[:, 0] + 1.0)[:, None], p[:, 1][:, None]
    x, y = X.reshape(1, -1), Y.reshape(1, -1)
    # [x y 1] @ [[c, s], [-s, c], [tx, ty]], written elementwise: a broadcast (n, P, 3) @ (3, 2) matmul ran ~10x
    # slower at 32 px
    gx = torch.addcmul(torch.addcmul(p[:, 2:3], c, x), s, y, value=-1.0)
    gy = torch.addcmul(torch.addcmul(p[:, 3:4], s, x), c, y)
    grid = torch.stack([gx, gy], dim=-1).view(n, r, r, 2)
    lim = 1.0 - 1.0 / (r if r_in is None else r_in) + 1e-5
    mask = ((gx.abs() <= lim) & (gy.abs() <= lim)).to(p.dtype).view(n, r, r)
    return grid, mask


def _warp(x: torch.Tensor, p: torch.Tensor, out: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp (n, C, r, r) by params (n, 4), bilinear with zero fill, onto an ``out`` x ``out`` grid (default r);
    returns (n, C, out, out) and the mask (n, out, out)."""
    r = x.shape[-1]
    X, Y = _base_coords(r if out is None else int(out), x.device, x.dtype)
    grid, mask = _grid(p, X, Y, r_in=r)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False), mask


def _base_coords(r: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pixel-centre coordinates (align_corners=False): X varies along columns, Y along rows."""
    t = (torch.arange(r, device=device, dtype=dtype) * 2.0 + 1.0) / r - 1.0
    return t[None, :].expand(r, r), t[:, None].expand(r, r)


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central-difference gradients of (..., r, r) in normalised-coordinate units (d/dx, d/dy)."""
    r = x.shape[-1]
    xp = F.pad(x.reshape(-1, 1, *x.shape[-2:]), (1, 1, 1, 1), mode="replicate").reshape(*x.shape[:-2], r + 2, r + 2)
    gx = (xp[..., 1:-1, 2:] - xp[..., 1:-1, :-2]) * (r / 4.0)
    gy = (xp[..., 2:, 1:-1] - xp[..., :-2, 1:-1]) * (r / 4.0)
    return gx, gy


def _weighted_ncc(f: torch.Tensor, g: torch.Tensor, w: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Weighted Pearson correlation of f and g with weights w over ``dims``; 0 where undefined."""
    sw = w.sum(dims, keepdim=True).clamp_min(_EPS)
    fc = f - (w * f).sum(dims, keepdim=True) / sw
    gc = g - (w * g).sum(dims, keepdim=True) / sw
    num = (w * fc * gc).sum(dims)
    vf = (w * fc * fc).sum(dims)
    vg = (w * gc * gc).sum(dims)
    den = torch.sqrt(vf * vg)
    ok = (vf > 1e-10 * sw.reshape(vf.shape)) & (vg > 1e-10 * sw.reshape(vg.shape))
    return torch.where(ok, num / den.clamp_min(1e-20), torch.zeros_like(num)).clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# ECC refinement (batched Gauss-Newton on the correlation coefficient)
# ----------------------------------------------------------------------------------------------


def _ecc_step(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    gx: torch.Tensor,
    gy: torch.Tensor,
    w: torch.Tensor,
    X: torch.Tensor,
    Y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ECC step for the similarity warp, from one 7 x 7 Gram matrix per pair.

    Parameters
    ----------
    fixed, warped, gx, gy : (B, P)
        Fixed image, warped moving image and its warped gradients (d/dx, d/dy in normalised units),
        flattened over P pixels.
    w : (B, P)
        Binary weights (validity mask of the warped moving image).
    X, Y : (P,)
        Normalised pixel-centre coordinates.

    Returns
    -------
    rho : (B,) weighted correlation coefficient at the current warp (-1 where undefined).
    dp : (B, 4) the ECC update of ``(a, b, tx, ty)`` (0 where no ascent step exists).
    ok : (B,) bool, whether ``dp`` is a valid ECC step.
    """
    b, n_px = fixed.shape
    rows = torch.empty((b, 7, n_px), device=fixed.device, dtype=fixed.dtype)
    wgx, wgy = rows[:, 2], rows[:, 3]
    torch.mul(w, gx, out=wgx)
    torch.mul(w, gy, out=wgy)
    torch.mul(wgx, X, out=rows[:, 0]).addcmul_(wgy, Y)  # J_a = gx X + gy Y
    torch.mul(wgy, X, out=rows[:, 1]).addcmul_(wgx, Y, value=-1.0)  # J_b = gy X - gx Y
    torch.mul(w, fixed, out=rows[:, 4])
    torch.mul(w, warped, out=rows[:, 5])
    rows[:, 6] = w
    gram = torch.bmm(rows, rows.transpose(1, 2))  # w is binary, so w^2 = w: all weighted sums at once
    sw = gram[:, 6, 6].clamp_min(1.0)
    mean = gram[:, :, 6] / sw[:, None]
    cov = gram - gram[:, :, 6:7] * mean[:, None, :]  # centred over the overlap
    H = cov[:, :4, :4]
    g_r, g_w = cov[:, :4, 4], cov[:, :4, 5]
    rr, ww, rw = cov[:, 4, 4], cov[:, 5, 5], cov[:, 4, 5]
    good = (rr > 1e-9 * sw) & (ww > 1e-9 * sw)
    rho = torch.where(good, rw / torch.sqrt((rr * ww).clamp_min(1e-30)), torch.full_like(rw, -1.0)).clamp(-1.0, 1.0)
    ridge = 1e-6 * H.diagonal(dim1=1, dim2=2).mean(-1).abs() + 1e-12
    H = H + torch.eye(4, device=H.device, dtype=H.dtype) * ridge[:, None, None]
    sol = torch.linalg.solve(H, torch.stack([g_r, g_w], dim=-1))
    h_r, h_w = sol[..., 0], sol[..., 1]
    lam_n = ww - (g_w * h_w).sum(-1)
    lam_d = rw - (g_r * h_w).sum(-1)
    ok = good & (lam_d > 1e-7 * torch.sqrt((rr * ww).clamp_min(0.0)))
    lam = torch.where(ok, lam_n / lam_d.clamp_min(1e-30), torch.zeros_like(lam_n))
    dp = lam[:, None] * h_r - h_w
    ok = ok & torch.isfinite(dp).all(-1)
    dp = torch.where(ok[:, None], dp, torch.zeros_like(dp))
    return rho, dp, ok


def _masked_rho(f: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The correlation ``rho`` of :func:`_ecc_step` (same centring and thresholds) without its Gram matrix:
    f, g (B, P), binary weights w (B, P); -1 where undefined."""
    s_w = w.sum(1)
    sw = s_w.clamp_min(1.0)
    wf, wg = w * f, w * g
    s_f, s_g = wf.sum(1), wg.sum(1)
    rr = (wf * f).sum(1) - s_f * (s_f / sw)
    ww = (wg * g).sum(1) - s_g * (s_g / sw)
    rw = (wf * g).sum(1) - s_f * (s_g / sw)
    good = (rr > 1e-9 * sw) & (ww > 1e-9 * sw)
    return torch.where(good, rw / torch.sqrt((rr * ww).clamp_min(1e-30)), torch.full_like(rw, -1.0)).clamp(-1.0, 1.0)


def _ecc_refine(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    params: torch.Tensor,
    iterations: int,
    bounds: tuple[float, float, float, float],
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximise the masked correlation of fixed (B, r, r) and moving (B, r, r) warped by params (B, 4).

    ECC (Evangelidis & Psarakis 2008) with a forward-additive update of the linear similarity parameters
    ``(a, b, tx, ty)`` and a trust region; the weight is the hard validity mask of the warped moving image.
    Returns the best iterate per pair (within ``bounds`` = max |angle|, min scale, max scale, max |shift|)
    and its correlation (B,).
    """
    b, r, _ = fixed.shape
    dev, dt = fixed.device, fixed.dtype
    X, Y = _base_coords(r, dev, dt)
    xf, yf = X.reshape(-1), Y.reshape(-1)
    # centre both images once (NCC does not care) so the moment sums cancel less in float32
    f = (fixed - fixed.mean((1, 2), keepdim=True)).reshape(b, -1)
    mv = moving - moving.mean((1, 2), keepdim=True)
    if iterations == 0:  # the start's correlation only: no gradients, no Gram matrix
        grid, w = _grid(params, X, Y)
        warped = F.grid_sample(mv[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        rho = _masked_rho(f, warped.view(b, -1), w.view(b, -1))
        ang, sc, sh = _similarity_from_params(params)
        max_ang, min_sc, max_sc, max_sh = bounds
        inside = (ang.abs() <= max_ang) & (sc >= min_sc) & (sc <= max_sc) & (sh.abs().amax(-1) <= max_sh)
        return params.clone(), torch.where(inside, rho, torch.full_like(rho, -2.0))
    gx, gy = _gradients(moving)
    stack = torch.stack([mv, gx, gy], dim=1)  # (B, 3, r, r)
    best_p = params.clone()
    best_rho = torch.full((b,), -2.0, device=dev, dtype=dt)
    p = params.clone()
    max_ang, min_sc, max_sc, max_sh = bounds
    step_cap = torch.tensor([0.05, 0.05, 0.08, 0.08], device=dev, dtype=dt)
    for _ in range(iterations + 1):
        grid, w = _grid(p, X, Y)
        warped = F.grid_sample(stack, grid, mode="bilinear", padding_mode="zeros", align_corners=False).view(b, 3, -1)
        rho, dp, _ok = _ecc_step(f, warped[:, 0], warped[:, 1], warped[:, 2], w.view(b, -1), xf, yf)
        ang, sc, sh = _similarity_from_params(p)
        inside = (ang.abs() <= max_ang) & (sc >= min_sc) & (sc <= max_sc) & (sh.abs().amax(-1) <= max_sh)
        improved = (rho > best_rho) & inside
        best_rho = torch.where(improved, rho, best_rho)
        best_p = torch.where(improved[:, None], p, best_p)
        dp = torch.maximum(torch.minimum(dp, step_cap), -step_cap)  # trust region: ~3 deg, 5 % scale, 4 % FOV
        if float(dp.abs().max()) < tol:
            break
        p = p + dp
    return best_p, best_rho


# ----------------------------------------------------------------------------------------------
# Stage 3: the verification score
# ----------------------------------------------------------------------------------------------


def _erode(mask: torch.Tensor, px: int) -> torch.Tensor:
    if px <= 0:
        return mask
    return -F.max_pool2d(-mask[:, None], 2 * px + 1, stride=1, padding=px)[:, 0]


def _foreground(x: torch.Tensor, w: torch.Tensor, fraction: float = FG_FRACTION) -> torch.Tensor:
    """Pixels of x (B, r, r) above ``fraction`` of its intensity range over the overlap w (B, r, r)."""
    inside = w > 0
    lo = torch.where(inside, x, torch.full_like(x, math.inf)).amin((1, 2), keepdim=True)
    hi = torch.where(inside, x, torch.full_like(x, -math.inf)).amax((1, 2), keepdim=True)
    lo, hi = torch.nan_to_num(lo, posinf=0.0), torch.nan_to_num(hi, neginf=0.0)
    return (x > lo + fraction * (hi - lo)).to(x.dtype)


def _poly_corr(f: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Signed multiple correlation of f on (g, g^2) with weights w over the last two dims, (B,).

    The correlation after the best quadratic intensity map of g: invariant to affine intensity changes and
    close to invariant to gamma. Signed by the linear correlation; 0 where undefined.
    """
    dims = (-2, -1)
    sw = w.sum(dims, keepdim=True).clamp_min(_EPS)

    def centre(t: torch.Tensor) -> torch.Tensor:
        return t - (w * t).sum(dims, keepdim=True) / sw

    fc, g1, g2 = centre(f), centre(g), centre(g * g)
    wf = w * fc
    vff = (wf * fc).sum(dims)
    r = torch.stack([(wf * g1).sum(dims), (wf * g2).sum(dims)], dim=-1)  # (B, 2)
    w1, w2 = w * g1, w * g2
    a, bb, c = (w1 * g1).sum(dims), (w1 * g2).sum(dims), (w2 * g2).sum(dims)
    ridge = 1e-7 * (a + c) + 1e-12
    a, c = a + ridge, c + ridge
    det = a * c - bb * bb
    # r' G^-1 r for the 2 x 2 Gram matrix G = [[a, bb], [bb, c]]
    quad = (c * r[:, 0] ** 2 - 2 * bb * r[:, 0] * r[:, 1] + a * r[:, 1] ** 2) / det.clamp_min(1e-30)
    ok = (vff > 1e-10 * sw.view(vff.shape)) & (a > 1e-10 * sw.view(a.shape)) & (det > 0)
    r2 = torch.where(ok, quad / vff.clamp_min(1e-30), torch.zeros_like(vff)).clamp(0.0, 1.0)
    return torch.sqrt(r2) * torch.where(r[:, 0] < 0, -1.0, 1.0)


def _score(
    fixed: torch.Tensor, moving: torch.Tensor, p: torch.Tensor, measure: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verification score (B,) of moving (B, r', r') warped by p (B, 4) onto fixed (B, r, r), and the overlap
    fraction."""
    warped, w = _warp(moving[:, None], p, out=fixed.shape[-1])
    warped = warped[:, 0]
    if measure == "ncc":
        score = _weighted_ncc(fixed, warped, w)
    elif measure in ("ncc_fg", "poly_fg"):
        m = w * torch.maximum(_foreground(fixed, w), _foreground(warped, w))
        score = _weighted_ncc(fixed, warped, m) if measure == "ncc_fg" else _poly_corr(fixed, warped, m)
    elif measure == "grad":
        fx, fy = _gradients(fixed)
        gx, gy = _gradients(warped)
        m = _erode(w, 1)[:, None].expand(-1, 2, -1, -1)
        score = _weighted_ncc(torch.stack([fx, fy], 1), torch.stack([gx, gy], 1), m, dims=(-3, -2, -1))
    else:  # pragma: no cover - validated by the callers
        raise ValueError(f"Unknown measure {measure!r}; valid measures: {MEASURES}.")
    return score, w.mean((1, 2))


def pair_ncc(fixed: np.ndarray, moving: np.ndarray, *, size: int | None = None) -> np.ndarray:
    """Plain pixel NCC of each pair over the whole frame, without alignment (the raw-pixel baseline).

    Parameters
    ----------
    fixed, moving : np.ndarray, shape (N, H, W) and (N, H', W')
    size : int, optional
        Resample both to ``size x size`` first (aspect kept, zero padded); default the fixed size when the
        shapes differ.

    Returns
    -------
    np.ndarray, shape (N,), float32 in [-1, 1]
    """
    f = _check_stack(fixed, "fixed")
    g = _check_stack(moving, "moving")
    if f.shape[0] != g.shape[0]:
        raise ValueError(f"fixed has {f.shape[0]} images but moving has {g.shape[0]}; pass one moving per fixed.")
    if size is None and f.shape[1:] != g.shape[1:]:
        size = max(f.shape[1:])
    ft, gt = torch.from_numpy(f), torch.from_numpy(g)
    if size is not None:
        ft, gt = resize_square(ft, size), resize_square(gt, size)
    return _weighted_ncc(ft, gt, torch.ones_like(ft)).numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _start_moments(fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Foreground centroids and radii of fixed (b, r, r) and of moving (b, V, r, r): (b, 2), (b,), (b, V, 2),
    (b, V) (:func:`inspector.descriptors.foreground_moments`)."""
    b, v, r, _ = moving.shape
    cf, rf = foreground_moments(fixed)
    cm, rm = foreground_moments(moving.reshape(b * v, r, r))
    return cf, rf, cm.view(b, v, 2), rm.view(b, v)


def _moment_start(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    bounds: tuple[float, float, float, float],
    zooms: Sequence[float] = (),
    angle: torch.Tensor | None = None,
    moments: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Params (b, V, 1 + len(zooms), 4) mapping each moving view's foreground centroid onto the fixed slice's.

    fixed (b, r, r), moving (b, V, r, r). The sampling map is ``x_m = k R x + t`` with ``t = c_m - k R c_f``,
    ``R`` the rotation by ``angle`` (b, V) degrees (:func:`inspector.descriptors.relative_angle`; none when not
    given). The first start takes ``k = rad_m / rad_f`` (the spreads matched); one more start per zoom ``z``
    takes ``k = 1 / z``: when the fixed slice's anatomy is cut by its frame (a zoomed-in output) its spread is
    too small and the spread ratio is a poor guess of the zoom. Clamped to the scale and shift bounds.
    ``moments``: :func:`_start_moments` of (fixed, moving) when already computed (the plain and the rotated
    starts share them).
    """
    b, v = moving.shape[:2]
    cf, rf, cm, rm = _start_moments(fixed, moving) if moments is None else moments
    _, lo_s, hi_s, max_sh = bounds
    ks = [rm / rf[:, None].clamp_min(1e-6)] + [torch.full_like(rm, 1.0 / float(z)) for z in zooms]
    k = torch.stack(ks, dim=2).clamp(1.0 / hi_s, 1.0 / lo_s)  # (b, V, S)
    if angle is None:
        cos, sin = torch.ones_like(k), torch.zeros_like(k)
    else:
        rad = angle.to(k.dtype)[:, :, None].expand_as(k) * (math.pi / 180.0)
        cos, sin = torch.cos(rad), torch.sin(rad)
    a, bb = k * cos, k * sin  # the sampling matrix k R = [[a, -bb], [bb, a]]
    cfx, cfy = cf[:, None, None, 0], cf[:, None, None, 1]
    tx = cm[:, :, None, 0] - (a * cfx - bb * cfy)
    ty = cm[:, :, None, 1] - (bb * cfx + a * cfy)
    p = torch.stack([a - 1.0, bb, tx, ty], dim=-1)
    ang, sc, sh = _similarity_from_params(p)
    sh = sh.clamp(-max_sh, max_sh)
    return _params_from_similarity(ang, sc, sh)


#: Starts times pixels scored at once by :func:`_screen_starts` (about 4 MB per float32 temporary): a batch of
#: pairs has tens of starts each under eight orientations, whose warps would otherwise take most of a GB at once.
SCREEN_PIXELS = 1 << 20


def _screen_starts(
    fixed: torch.Tensor,
    views: torch.Tensor,
    params: torch.Tensor,
    n_starts: int,
    bounds: tuple[float, float, float, float],
) -> torch.Tensor:
    """The correlation of every start at its start (no iteration; -2 outside ``bounds``), shape (b, C).

    fixed (b, r, r); views (b, V, r, r); params (b, C, 4) with ``C = V * n_starts``, start ``c`` warping view
    ``c // n_starts``. Scored in chunks of :data:`SCREEN_PIXELS` start-pixels, gathered as needed, so that no
    (b, C, r, r) stack is ever formed.
    """
    b, c = params.shape[:2]
    r = fixed.shape[-1]
    flat = params.reshape(-1, 4)
    idx = torch.arange(b * c, device=fixed.device)
    pair, view = idx // c, (idx % c) // n_starts
    step = max(1, SCREEN_PIXELS // (r * r))
    out = []
    for a in range(0, b * c, step):
        sl = slice(a, a + step)
        out.append(_ecc_refine(fixed[pair[sl]], views[pair[sl], view[sl]], flat[sl], 0, bounds)[1])
    return torch.cat(out).view(b, c)


def _polar_angles(fixed: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """The rotation (b, V) degrees carrying each moving view (b, V, r, r) onto its fixed slice (b, r, r) about
    their foreground centroids, from the circular cross-correlation of their rings (polar_sample)."""
    b, v, r, _ = views.shape
    pf = polar_sample(fixed)  # (b, R, A)
    pm = polar_sample(views.reshape(b * v, r, r)).view(b, v, *pf.shape[1:])
    ang, _ = relative_angle(pf[:, None], pm)
    return ang


#: Found zooms above this are scored again with the training image resampled at ``size * zoom`` (see
#: :func:`_rescore_zoomed`).
RESCORE_ZOOM = 1.1


def _rescore_zoomed(
    fixed: torch.Tensor,
    moving_native: np.ndarray,
    p: torch.Tensor,
    score: torch.Tensor,
    measure: str,
    orient: Sequence[View],
    size: int,
    dev: torch.device,
) -> torch.Tensor:
    """The score of pairs aligned at a zoom above :data:`RESCORE_ZOOM`, with the moving image resampled once
    from its loaded grid at about ``size * zoom`` pixels (capped at its own size) instead of at ``size``.

    A zoomed-in output magnifies its training slice: warping the slice from ``size`` pixels would upsample it
    and blur it against the fixed image, which holds detail up to ``size * zoom`` of the source; the top and
    bottom slices of a head (small, finely folded anatomy) then score well below 1 although the transform is
    right. At zooms up to 1.1 the score is unchanged. fixed (b, size, size), moving_native (b, H', W'),
    p (b, 4), score (b,); returns the new score (b,).
    """
    _, zoom, _ = _similarity_from_params(p.double())
    native = int(max(moving_native.shape[1:]))
    want = torch.clamp(torch.ceil(zoom.float() * size / 16.0) * 16.0, max=float(max(native, size))).long()
    redo = (zoom > RESCORE_ZOOM) & (want > size)
    if not bool(redo.any()):
        return score
    out = score.clone()
    for r in torch.unique(want[redo]).tolist():
        idx = torch.nonzero(redo & (want == r)).flatten()
        m = resize_square(torch.from_numpy(np.ascontiguousarray(moving_native[idx.cpu().numpy()])).to(dev), int(r))
        m = torch.stack([orient[int(i)].apply(m[j]) for j, i in enumerate(idx.tolist())])
        s2, _ = _score(fixed[idx], m, p[idx], measure)
        out[idx] = s2
    return out


def register_pairs(
    fixed: np.ndarray,
    moving: np.ndarray,
    *,
    flips: Sequence[str] | np.ndarray | str | None = None,
    size: int = 64,
    device: str = "auto",
    max_angle: float = 15.0,
    batch_size: int = 256,
    scale_range: tuple[float, float] = (0.5, 2.0),
    max_shift: float = 0.3,
    angle_starts: Sequence[float] | None = None,
    coarse_size: int = 32,
    iterations: tuple[int, int] = (8, 5),
    flip_candidates: int = 2,
    measure: str = "poly_fg",
    orientations: Sequence[str] | None = None,
    init: str = "moments",
    zoom_starts: Sequence[float] = ZOOM_STARTS,
    start_candidates: int = 3,
    rotated_candidates: int = 1,
    progress: ProgressFn | None = None,
) -> Alignment:
    """Register each moving image onto its fixed image and score the aligned overlap.

    Parameters
    ----------
    fixed : np.ndarray, shape (N, H, W)
        Synthetic slices, values in [0, 1] (any affine intensity range works: NCC is invariant to it).
    moving : np.ndarray, shape (N, H', W')
        Training candidates, one per fixed image. Both stacks are resampled to ``size x size`` (centred,
        aspect kept, zero padded) internally.
    flips : sequence of str of length N, str, or None
        Per pair, the orientation (a view of :mod:`inspector.views`) to apply to ``moving`` first (e.g. the
        feature view it matched under). ``None`` tries every one of ``orientations`` and keeps the best.
    size : int
        Working resolution of the fine refinement and of the score.
    device : str
        ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    max_angle : float
        Largest rotation accepted, in degrees (± this, up to 180: any angle). Above :data:`ECC_BASIN` the
        moment starts are repeated rotated by the angle of the circular cross-correlation of the two slices'
        rings about their centroids (:func:`inspector.descriptors.relative_angle`), so a copy rotated by any
        angle starts inside the optimiser's basin.
    batch_size : int
        Pairs registered at once.
    scale_range : (float, float)
        Smallest and largest zoom accepted (default 0.5 to 2: a copy written at another field of view).
    max_shift : float
        Largest shift accepted on each axis, fraction of the field of view.
    angle_starts : sequence of float, optional
        Starting angles of the coarse ECC runs (every start x every flip is refined at ``coarse_size``).
        Default: ``(0,)`` (ECC converged from 15 degrees off, with 15 % zoom and 12 % shift, on every MNI slice
        tried; larger angles are found by the rotated moment starts), or ``(-2/3, 0, 2/3) * max_angle`` with
        ``init="identity"`` and ``max_angle > 20``.
    coarse_size : int
        Resolution of the coarse (multi-start) level.
    iterations : (int, int)
        ECC iterations at ``coarse_size`` and at ``size``.
    flip_candidates : int
        With ``flips=None``, how many of the best flips of the coarse level are refined at ``size`` (the
        brain is nearly left-right symmetric, so the runner-up flip is refined too by default).
    measure : str
        Score of the final transform, computed over the aligned overlap (zero padding never counts):

        - ``poly_fg`` (default): correlation after the best quadratic intensity map (robust to gamma) over
          the head, i.e. the pixels where either image exceeds 5 % of its range;
        - ``ncc_fg``: plain NCC over the same foreground;
        - ``ncc``: plain NCC over the whole overlap (background included);
        - ``grad``: NCC of the gradient fields.

        ``poly_fg`` separated copies from neighbouring slices best in ``benchmarks/bench_align.py``
        (background pixels agree for any two slices of a head and compress the NCC towards 1; ``grad``
        suffers from blur at 128 px).
    orientations : sequence of str, optional
        With ``flips=None``, the orientations tried (default the four flips, :data:`inspector.views.FLIPS`;
        :data:`inspector.views.DIHEDRAL` for all eight: the 90-degree rotations, transpose, anti-transpose).
    init : {"moments", "identity"}
        Starting transforms of the coarse level. ``"identity"``: the ``angle_starts`` at scale 1 and no shift.
        ``"moments"`` (default) adds, per orientation, the transform that maps the moving slice's foreground
        centroid and radius of gyration onto the fixed slice's (:func:`inspector.descriptors.foreground_moments`):
        a copy written at another field of view, shifted or cropped then starts inside the optimiser's basin.
    zoom_starts : sequence of float
        With ``init="moments"``, more starts per orientation at these zooms (centroids matched): a zoomed-in
        copy's anatomy is cut by its frame, so its spread underestimates the zoom (default
        :data:`ZOOM_STARTS`; outside ``scale_range`` they are clamped to it).
    start_candidates : int
        When there are more (orientation, start) combinations than this, each is first scored at its start
        (one warp at ``coarse_size``, no iteration) and only the best ``start_candidates`` run the coarse ECC:
        a cheap orientation and initialisation estimate before full registration.
    rotated_candidates : int
        With ``max_angle`` above :data:`ECC_BASIN`, how many of the rotated starts also run the coarse ECC,
        chosen the same way but apart from the others: they are added to the ``start_candidates`` best plain
        starts, never in place of them (a cropped copy's rings can point a rotated start at a wrong angle that
        scores well at its start; it must not displace the right unrotated one).
    progress : callable, optional
        ``progress("aligning", done, total)`` after every batch.

    Returns
    -------
    Alignment
        Arrays over the N pairs: ``ncc`` (the score), ``angle``, ``scale``, ``shift``, ``flip`` (the
        orientation applied to the moving image), ``overlap``.

    Raises
    ------
    ValueError
        On shape or count mismatches, NaN/Inf values, unknown flips or measures, or bad settings.
    TypeError
        On non-numeric input.
    """
    f_np = _check_stack(fixed, "fixed")
    m_np = _check_stack(moving, "moving")
    n = f_np.shape[0]
    if m_np.shape[0] != n:
        raise ValueError(f"fixed has {n} images but moving has {m_np.shape[0]}; pass one moving image per fixed image.")
    flip_arr = _check_flips(flips, n)
    if measure not in MEASURES:
        raise ValueError(f"Unknown measure {measure!r}; valid measures: {MEASURES}.")
    if size < 16 or coarse_size < 16:
        raise ValueError(f"size and coarse_size must be >= 16 pixels; got {size}, {coarse_size}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    if not 0 <= max_angle <= 180:
        raise ValueError(f"max_angle must be in [0, 180] degrees; got {max_angle}.")
    lo_s, hi_s = (float(v) for v in scale_range)
    if not 0.25 <= lo_s <= 1.0 <= hi_s <= 4.0:
        raise ValueError(f"scale_range must satisfy 0.25 <= low <= 1 <= high <= 4; got {scale_range}.")
    if not 0 <= max_shift <= 0.5:
        raise ValueError(f"max_shift must be in [0, 0.5] (fraction of the FOV); got {max_shift}.")
    it_coarse, it_fine = (int(v) for v in iterations)
    if it_coarse < 0 or it_fine < 0:
        raise ValueError(f"iterations must be two non-negative integers; got {iterations}.")
    if angle_starts is None:
        wide = max_angle > ECC_BASIN and init == "identity"
        angle_starts = (-2.0 * max_angle / 3.0, 0.0, 2.0 * max_angle / 3.0) if wide else (0.0,)
    starts = [float(a) for a in angle_starts]
    if not starts or any(abs(a) > max_angle for a in starts):
        raise ValueError(f"angle_starts must be a non-empty list within +-max_angle={max_angle}; got {angle_starts}.")
    if init not in ("moments", "identity"):
        raise ValueError(f"init must be 'moments' or 'identity'; got {init!r}.")
    if start_candidates < 1:
        raise ValueError(f"start_candidates must be >= 1; got {start_candidates}.")
    if rotated_candidates < 0:
        raise ValueError(f"rotated_candidates must be >= 0; got {rotated_candidates}.")
    zooms = [float(z) for z in zoom_starts]
    if any(not (math.isfinite(z) and z > 0) for z in zooms):
        raise ValueError(f"zoom_starts must be positive finite zoom factors; got {zoom_starts}.")
    orients = list(FLIPS) if orientations is None else [View.parse(o) for o in orientations]
    if not orients:
        raise ValueError("orientations is empty; give at least one view (e.g. inspector.views.FLIPS).")
    orients = list(dict.fromkeys(orients))
    dev = _resolve_device(device)
    if n == 0:
        empty = np.zeros(0, dtype=np.float32)
        return Alignment(empty, empty, empty, np.zeros((0, 2), np.float32), np.zeros(0, dtype=object), empty)

    cs = min(int(coarse_size), int(size))
    dt = torch.float32
    bounds = (float(max_angle), lo_s, hi_s, float(max_shift))
    start_p = _params_from_similarity(
        torch.tensor(starts, device=dev, dtype=dt),
        torch.ones(len(starts), device=dev, dtype=dt),
        torch.zeros((len(starts), 2), device=dev, dtype=dt),
    )  # (A, 4)
    n_a = len(starts)

    out_ncc, out_p, out_flip, out_ov = [], [], [], []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        ft = resize_square(torch.from_numpy(f_np[start:stop]).to(dev), size)
        mt = resize_square(torch.from_numpy(m_np[start:stop]).to(dev), size)
        b = ft.shape[0]
        if flip_arr is None:
            views = torch.stack([o.apply(mt) for o in orients], dim=1)  # (b, V, s, s)
        else:
            views = _flip_each(mt, flip_arr[start:stop])[:, None]
        v = views.shape[1]
        fc = resize_square(ft, cs)
        vc = resize_square(views.reshape(b * v, size, size), cs).reshape(b, v, cs, cs)
        # starts per (pair, orientation): the angle starts, plus the moment-matching transform
        starts_bv = start_p[None, None].expand(b, v, n_a, 4)
        moments = _start_moments(fc, vc) if init == "moments" else None
        if init == "moments":
            starts_bv = torch.cat([starts_bv, _moment_start(fc, vc, bounds, zooms, moments=moments)], dim=2)
        n_plain = starts_bv.shape[2]
        if init == "moments":
            if max_angle > ECC_BASIN:  # any angle: the same starts rotated by the rings' relative angle
                ang = _polar_angles(ft, views)
                rot = _moment_start(fc, vc, bounds, zooms, angle=ang, moments=moments)
                starts_bv = torch.cat([starts_bv, rot], dim=2)
        n_s = starts_bv.shape[2]
        combos = v * n_s
        p_all = starts_bv.reshape(b, combos, 4)
        # the rotated starts (if any) are the last n_rot of each orientation's starts
        n_rot = n_s - n_plain if n_s > n_plain else 0
        k_plain = min(int(start_candidates), v * (n_s - n_rot))
        k_rot = min(int(rotated_candidates), v * n_rot)
        kk = k_plain + k_rot
        if kk < combos:  # cheap estimate: score every start once, run the ECC from the best few
            r0 = _screen_starts(fc, vc, p_all, n_s, bounds).view(b, v, n_s)
            rotated = torch.zeros(n_s, dtype=torch.bool, device=dev)
            rotated[n_s - n_rot :] = n_rot > 0
            # the best plain starts keep their places (a copy that needs no rotation is registered as without
            # the rotated starts); the best rotated starts are added beside them, never instead of them
            low = torch.full_like(r0, -9.0)
            keep = torch.topk(torch.where(rotated, low, r0).view(b, combos), k_plain, dim=1).indices
            if k_rot:
                extra = torch.topk(torch.where(rotated, r0, low).view(b, combos), k_rot, dim=1).indices
                keep = torch.cat([keep, extra], dim=1)  # (b, kk)
        else:
            keep = torch.arange(combos, device=dev)[None].expand(b, combos)
            kk = combos
        bi = torch.arange(b, device=dev)[:, None].expand_as(keep)
        p_c, r_c = _ecc_refine(
            fc[:, None].expand(b, kk, cs, cs).reshape(-1, cs, cs),
            vc[bi, keep // n_s].reshape(-1, cs, cs),
            p_all[bi, keep].reshape(-1, 4),
            it_coarse,
            bounds,
        )
        # best start per orientation among those refined (-2 for orientations not kept)
        orient_of = (keep // n_s).reshape(-1)
        r_full = torch.full((b, v), -3.0, device=dev, dtype=dt)
        p_full = torch.zeros((b, v, 4), device=dev, dtype=dt)
        r_k = r_c.view(b, kk)
        order = torch.argsort(r_k, dim=1)  # ascending: the best start of an orientation is written last
        for j in range(kk):
            col = order[:, j]
            ar_b = torch.arange(b, device=dev)
            o = orient_of.view(b, kk)[ar_b, col]
            r_full[ar_b, o] = r_k[ar_b, col]
            p_full[ar_b, o] = p_c.view(b, kk, 4)[ar_b, col]
        p_c, r_c = p_full, r_full  # (b, v, 4), (b, v)
        k = min(max(1, int(flip_candidates)), v)
        top = torch.topk(r_c, k, dim=1).indices  # (b, k); deterministic ties: lowest index first on CPU
        bi = torch.arange(b, device=dev)[:, None].expand(b, k)
        p = p_c[bi, top].reshape(b * k, 4)
        cand = views[bi, top].reshape(b * k, size, size)
        f_rep = ft[:, None].expand(b, k, size, size).reshape(b * k, size, size)
        if cs < size and it_fine > 0:
            p, _ = _ecc_refine(f_rep, cand, p, it_fine, bounds)
        score, overlap = _score(f_rep, cand, p, measure)
        sc = score.view(b, k)
        pick = sc.argmax(1)
        ar = torch.arange(b, device=dev)
        score = sc[ar, pick]
        p = p.view(b, k, 4)[ar, pick]
        overlap = overlap.view(b, k)[ar, pick]
        o_pick = top[ar, pick] if flip_arr is None else None
        score = _rescore_zoomed(
            ft, m_np[start:stop], p, score, measure, [orients[int(i)] for i in o_pick] if o_pick is not None
            else [View.parse(f) for f in flip_arr[start:stop]], size, dev,
        )  # fmt: skip
        if flip_arr is None:
            out_flip.append(np.asarray([o.value for o in orients], dtype=object)[top[ar, pick].cpu().numpy()])
        else:
            out_flip.append(flip_arr[start:stop])
        out_ncc.append(score.cpu())
        out_p.append(p.cpu())
        out_ov.append(overlap.cpu())
        log.debug("registered pairs %d-%d of %d (flips tried: %d, kept: %d)", start, stop, n, v, k)
        if progress is not None:
            progress("aligning", stop, n)
    angle, scale, shift = _similarity_from_params(torch.cat(out_p).double())
    flip_out, angle_out = np.concatenate(out_flip), angle.numpy()
    if flip_arr is None:  # the same transform written with the orientation of the smallest residual angle
        flip_out, angle_out = _canonical_orientation(flip_out, angle_out, orients)
    return Alignment(
        ncc=torch.cat(out_ncc).numpy(),
        angle=angle_out,
        scale=scale.numpy(),
        shift=shift.numpy(),
        flip=flip_out,
        overlap=torch.cat(out_ov).numpy(),
    )


_QUARTER_TURNS = (View.ID, View.ROT90, View.HVFLIP, View.ROT270)


def _canonical_orientation(
    flips: np.ndarray, angles: np.ndarray, allowed: Sequence[View]
) -> tuple[np.ndarray, np.ndarray]:
    """Each (orientation, angle) rewritten as the equal transform whose angle is smallest in magnitude.

    ``affine_warp(angle) ∘ o == affine_warp(angle - 90 k) ∘ rot90^k ∘ o`` (same shift and scale): with any angle
    allowed, the registration may reach an upright copy as ``rot90`` and -90 degrees; the reader should see
    ``id`` and 0. Only orientations in ``allowed`` are used. flips (N,) of names, angles (N,) degrees.
    """
    allowed_set = set(allowed)
    out_f = np.asarray(flips, dtype=object).copy()
    out_a = np.asarray(angles, dtype=np.float64).copy()
    for i, (name, a) in enumerate(zip(flips, angles, strict=True)):
        o = View.parse(name)
        best = (abs(float(a)), 0, o, float(a))
        for k in (1, 2, 3):
            o_k = o.then(_QUARTER_TURNS[k])
            a_k = (float(a) - 90.0 * k + 180.0) % 360.0 - 180.0
            if o_k in allowed_set and abs(a_k) < best[0] - 1e-9:
                best = (abs(a_k), k, o_k, a_k)
        out_f[i], out_a[i] = best[2].value, best[3]
    return out_f, out_a.astype(angles.dtype)


def score_alignment(
    fixed: np.ndarray, moving: np.ndarray, alignment: Alignment, *, size: int = 64, measure: str = "poly_fg"
) -> np.ndarray:
    """Score already registered pairs with a (possibly different) ``measure``, without re-registering.

    Parameters
    ----------
    fixed : np.ndarray, shape (N, H, W)
    moving : np.ndarray, shape (N, H', W')
        The inputs of :func:`register_pairs`.
    alignment : Alignment
        Its result.
    size : int
        Resolution of the score (use the ``size`` of the registration to reproduce ``alignment.ncc``).
    measure : str
        One of :data:`MEASURES`.

    Returns
    -------
    np.ndarray, shape (N,), float32 in [-1, 1]
    """
    f_np = _check_stack(fixed, "fixed")
    m_np = _check_stack(moving, "moving")
    if f_np.shape[0] != m_np.shape[0]:
        raise ValueError(f"fixed has {f_np.shape[0]} images but moving has {m_np.shape[0]}; they must pair up.")
    _check_alignment_rows(alignment, f_np.shape[0])
    if measure not in MEASURES:
        raise ValueError(f"Unknown measure {measure!r}; valid measures: {MEASURES}.")
    ft = resize_square(torch.from_numpy(f_np), size)
    mt = _flip_each(resize_square(torch.from_numpy(m_np), size), alignment.flip)
    p = _params_from_similarity(
        torch.from_numpy(alignment.angle.astype(np.float32)),
        torch.from_numpy(alignment.scale.astype(np.float32)),
        torch.from_numpy(alignment.shift.astype(np.float32)),
    )
    out = []
    orient = [View.parse(f) for f in alignment.flip]
    for start in range(0, f_np.shape[0], 1024):
        sl = slice(start, start + 1024)
        sc = _score(ft[sl], mt[sl], p[sl], measure)[0]
        # zoomed pairs as register_pairs scores them: the training slice resampled at the matching resolution
        out.append(_rescore_zoomed(ft[sl], m_np[sl], p[sl], sc, measure, orient[sl], size, ft.device))
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, np.float32)


def _check_alignment_rows(alignment: Alignment, n: int) -> None:
    if not isinstance(alignment, Alignment):
        raise TypeError(f"alignment must be an Alignment (from register_pairs); got {type(alignment).__name__}.")
    if len(alignment) != n:
        raise ValueError(f"alignment has {len(alignment)} pairs but {n} moving images were given.")


def _warp_native(x: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """affine_warp in the centred square frame of (n, H, W) images, cropped back to (H, W)."""
    _, h, w = x.shape
    if h == w:
        return affine_warp(x, angle_deg=angle, shift=shift, scale=scale)
    m = max(h, w)
    top, left = (m - h) // 2, (m - w) // 2
    sq = F.pad(x, (left, m - w - left, top, m - h - top))
    out = affine_warp(sq, angle_deg=angle, shift=shift, scale=scale)
    return out[:, top : top + h, left : left + w]


def apply_alignment(moving: np.ndarray, alignment: Alignment) -> np.ndarray:
    """Flip then transform each moving image into its fixed image's frame, at the images' own resolution.

    Parameters
    ----------
    moving : np.ndarray, shape (N, H, W)
        Usually the same images given to :func:`register_pairs` (any resolution of the same field of view;
        non-square images are transformed in their centred square frame and cropped back).
    alignment : Alignment
        From :func:`register_pairs`, N pairs.

    Returns
    -------
    np.ndarray, shape (N, H, W), float32 (zero outside the moving image's field of view)
    """
    x = _check_stack(moving, "moving")
    _check_alignment_rows(alignment, x.shape[0])
    t = _flip_each(torch.from_numpy(np.array(x, dtype=np.float32, order="C", copy=True)), alignment.flip)
    out = _warp_native(
        t,
        torch.from_numpy(alignment.angle.astype(np.float32)),
        torch.from_numpy(alignment.scale.astype(np.float32)),
        torch.from_numpy(alignment.shift.astype(np.float32)),
    )
    return out.numpy().astype(np.float32, copy=False)


def apply_alignment_single(moving: np.ndarray, transform: dict[str, Any]) -> np.ndarray:
    """Flip then transform one moving image (see :func:`apply_alignment`).

    Parameters
    ----------
    moving : np.ndarray, shape (H, W)
    transform : dict
        Keys ``flip`` (a :class:`~inspector.views.View` name, default ``id``), ``angle`` (degrees, default 0),
        ``scale`` (default 1) and ``shift``
        (``[dx, dy]`` fraction of the FOV, default ``[0, 0]``); other keys (``ncc``, ``train_index``) are
        ignored. :meth:`Alignment.transform` builds it.

    Returns
    -------
    np.ndarray, shape (H, W), float32
    """
    img = np.asarray(moving)
    if img.ndim != 2:
        raise ValueError(f"apply_alignment_single expects one (H, W) image; got shape {img.shape}.")
    if not isinstance(transform, dict):
        raise TypeError(f"transform must be a dict with flip/angle/scale/shift; got {type(transform).__name__}.")
    shift = np.asarray(transform.get("shift", (0.0, 0.0)), dtype=np.float32).reshape(-1)
    if shift.shape != (2,):
        raise ValueError(f"transform['shift'] must be [dx, dy]; got {transform.get('shift')!r}.")
    scale = float(transform.get("scale", 1.0))
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"transform['scale'] must be a positive finite number; got {scale!r}.")
    al = Alignment(
        ncc=np.zeros(1, np.float32),
        angle=np.asarray([float(transform.get("angle", 0.0))], np.float32),
        scale=np.asarray([scale], np.float32),
        shift=shift[None],
        flip=np.asarray([transform.get("flip", "id")], dtype=object),
    )
    return apply_alignment(img[None], al)[0]
