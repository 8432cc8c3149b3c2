"""Foreground moments and the moment-normalised structure descriptor of the shortlist's second stage.

Two things need to know where the anatomy sits in a slice and how large it is: the registration, which
starts its search from the transform that matches the two slices' foreground centroids and spreads, so that
a copy written at another field of view (the anatomy scaled 0.5-2x inside the frame, shifted, or cropped)
lies inside the basin of its local optimiser; and the **structure descriptor**, a shortlist feature that
separates look-alike subjects of one protocol (where an encoder trained for invariance does not).

* :func:`foreground_moments`: intensity-weighted centroid and radius of gyration of the foreground
  (pixels above 10 % of the slice's range), in the normalised coordinates of :mod:`inspector.align`.
* :func:`moment_normalise`: the slice resampled so that its centroid is at the centre and its radius of
  gyration is :data:`TARGET_RADIUS` of the half-frame, at a small size: invariant to field of view, shift
  and matrix size by construction, and equivariant to the eight orientations of :mod:`inspector.views`.
* :func:`structure_descriptor`: those thumbnails at :data:`DESCRIPTOR_SIZES` pixels, each vector centred on
  its own mean and L2-normalised (cosine = Pearson correlation of the normalised thumbnails), one "layer" per
  size. The matcher whitens them on T (as every layer) and searches them beside the encoder's features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .preprocess import affine_warp

__all__ = [
    "DESCRIPTOR_SIZES",
    "DESCRIPTOR_ZOOMS",
    "TARGET_RADIUS",
    "foreground_moments",
    "moment_normalise",
    "structure_descriptor",
]

#: Thumbnail sizes of the structure descriptor (layers ``mn<k>``).
DESCRIPTOR_SIZES: tuple[int, ...] = (12, 24)
#: Zoom factors of the extra training entries of the descriptor search (a copy written zoomed in, the anatomy
#: cut by the frame, has other moments than its whole source; the source zoomed by about as much matches it).
DESCRIPTOR_ZOOMS: tuple[float, ...] = (1.25, 1.45, 1.7)
#: Radius of gyration of the foreground after :func:`moment_normalise`, as a fraction of the half-frame.
TARGET_RADIUS = 0.45
#: Foreground rule of the moments: above this fraction of the slice's intensity range.
FG_FRACTION = 0.1


def _coords(h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = (torch.arange(w, device=device, dtype=dtype) * 2.0 + 1.0) / w - 1.0
    y = (torch.arange(h, device=device, dtype=dtype) * 2.0 + 1.0) / h - 1.0
    return x[None, :].expand(h, w), y[:, None].expand(h, w)


def foreground_moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid and radius of gyration of each slice's foreground.

    Parameters
    ----------
    images : torch.Tensor, shape (n, H, W)
        Slices (any intensity range; the foreground is above 10 % of each slice's range).

    Returns
    -------
    centroid : torch.Tensor, shape (n, 2)
        ``(x, y)`` in normalised coordinates (``-1`` .. ``1``: x along columns, y along rows, pixel centres
        as ``align_corners=False``); ``(0, 0)`` for an empty slice.
    radius : torch.Tensor, shape (n,)
        Intensity-weighted RMS distance of the foreground from its centroid (normalised units); ``0.5`` for an
        empty slice.
    """
    x = images.float()
    n, h, w = x.shape
    lo = x.amin((1, 2), keepdim=True)
    hi = x.amax((1, 2), keepdim=True)
    thr = lo + FG_FRACTION * (hi - lo)
    wt = torch.where(x > thr, x - lo, torch.zeros_like(x))
    X, Y = _coords(h, w, x.device, x.dtype)
    sw = wt.sum((1, 2))
    ok = sw > 1e-8
    swc = sw.clamp_min(1e-8)
    cx = (wt * X).sum((1, 2)) / swc
    cy = (wt * Y).sum((1, 2)) / swc
    r2 = (wt * ((X - cx[:, None, None]) ** 2 + (Y - cy[:, None, None]) ** 2)).sum((1, 2)) / swc
    cen = torch.where(ok[:, None], torch.stack([cx, cy], -1), torch.zeros((n, 2), device=x.device, dtype=x.dtype))
    rad = torch.where(ok & (r2 > 1e-8), torch.sqrt(r2.clamp_min(1e-8)), torch.full_like(r2, 0.5))
    return cen, rad


def moment_normalise(images: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """Resample each slice so its foreground centroid is centred and its radius of gyration is fixed.

    Parameters
    ----------
    images : torch.Tensor or np.ndarray, shape (n, H, W)
    size : int
        Output size in pixels.

    Returns
    -------
    torch.Tensor, shape (n, size, size), float32
        Bilinear (antialiased by an area pre-filter to twice ``size``), zero outside the frame.
    """
    # a read-only input (a memory-mapped slice store) is copied: torch needs writable memory
    x = _writable_tensor(images)
    if x.dim() != 3:
        raise ValueError(f"images must have shape (n, H, W); got {tuple(x.shape)}.")
    n = x.shape[0]
    if n == 0:
        return torch.zeros((0, size, size), dtype=torch.float32)
    cen, rad = foreground_moments(x)
    pre = 2 * size
    if x.shape[-1] > pre or x.shape[-2] > pre:  # area pre-filter: the thumbnail never aliases
        x = F.adaptive_avg_pool2d(x[:, None], pre)[:, 0]
    k = (rad / TARGET_RADIUS)[:, None, None]
    X, Y = _coords(size, size, x.device, x.dtype)
    grid = torch.stack([X[None] * k + cen[:, 0, None, None], Y[None] * k + cen[:, 1, None, None]], dim=-1)
    return F.grid_sample(x[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def _writable_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """float32 tensor of ``x``; a read-only array (a memory-mapped slice store) is copied, others shared."""
    if isinstance(x, torch.Tensor):
        return x.float()
    return torch.from_numpy(np.require(x, np.float32, ["C", "W"]))


def structure_descriptor(
    images: torch.Tensor | np.ndarray,
    sizes: Sequence[int] = DESCRIPTOR_SIZES,
    *,
    zoom: float = 1.0,
    batch_size: int = 1024,
) -> dict[str, np.ndarray]:
    """Moment-normalised thumbnails as search features, one layer ``mn<k>`` per size.

    Parameters
    ----------
    images : torch.Tensor or np.ndarray, shape (n, H, W)
    sizes : sequence of int
    zoom : float
        Zoom each slice by this factor about the frame centre first (bilinear, zero fill;
        :func:`inspector.preprocess.affine_warp`), ``> 1`` cutting the anatomy at the frame as a zoomed-in
        output would. ``1`` (default): the slice as it is.
    batch_size : int
        Slices processed at once (bounds memory).

    Returns
    -------
    dict of str to np.ndarray, shape (n, k*k), float32
        Each row centred on its own mean and L2-normalised (a constant thumbnail stays all zeros).
    """
    if not (math.isfinite(zoom) and 0.25 <= zoom <= 4.0):
        raise ValueError(f"zoom must be a finite factor in [0.25, 4]; got {zoom!r}.")
    arr = images if isinstance(images, torch.Tensor) else np.asarray(images)
    n = arr.shape[0]
    out = {f"mn{k}": np.zeros((n, k * k), np.float32) for k in sizes}
    big = max(sizes)
    for start in range(0, n, batch_size):
        part = arr[start : start + batch_size]
        # a chunk at a time from a numpy array (a memory-mapped store is read in rows, copied writable for torch)
        chunk = _writable_tensor(part)
        if zoom != 1.0:
            chunk = affine_warp(chunk, 0.0, (0.0, 0.0), float(zoom))
        base = moment_normalise(chunk, big)
        for k in sizes:
            t = base if k == big else F.adaptive_avg_pool2d(base[:, None], k)[:, 0]
            v = t.reshape(t.shape[0], -1)
            v = v - v.mean(1, keepdim=True)
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)
            out[f"mn{k}"][start : start + len(chunk)] = v.numpy()
    return out
