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
* :func:`polar_sample`: each slice resampled on rings about its centroid, radii in units of its radius of
  gyration. A copy rotated by any angle (and scaled, shifted) has the same rings circularly shifted by the
  angle: :func:`relative_angle` reads that shift off a circular cross-correlation (the registration's start
  for copies rotated far from the eight orientations), and :func:`rotation_descriptor` keeps the magnitudes of
  the rings' angular Fourier harmonics, invariant to every rotation and reflection (the shortlist's entry for
  such copies).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .preprocess import affine_warp
from .store import release_pages

__all__ = [
    "DESCRIPTOR_SIZES",
    "DESCRIPTOR_ZOOMS",
    "DESCRIPTOR_ZOOM_SIZES",
    "TARGET_RADIUS",
    "foreground_moments",
    "moment_normalise",
    "polar_sample",
    "relative_angle",
    "rotation_descriptor",
    "structure_descriptor",
]

#: Thumbnail sizes of the structure descriptor (layers ``mn<k>``).
DESCRIPTOR_SIZES: tuple[int, ...] = (12, 24)
#: Zoom factors of the extra training entries of the descriptor search (a copy written zoomed in, the anatomy
#: cut by the frame, has other moments than its whole source; the source zoomed by about as much matches it):
#: a geometric grid, 12 % apart, over the zoomed-in half of the registration's scale range (up to 2). At 17 %
#: apart (1.25, 1.45, 1.7), copies zoomed midway between two entries left the shortlist at 128 look-alike
#: subjects (benchmarks/RESULTS.md).
DESCRIPTOR_ZOOMS: tuple[float, ...] = (1.12, 1.25, 1.4, 1.57, 1.76, 1.97)
#: Thumbnail sizes the zoomed entries keep: the finer one alone (the 12 px thumbnail does not tell look-alike
#: subjects apart once the frame cuts the anatomy; 576 values, 2.3 KB, per training slice and zoom).
DESCRIPTOR_ZOOM_SIZES: tuple[int, ...] = (24,)
#: Radius of gyration of the foreground after :func:`moment_normalise`, as a fraction of the half-frame.
TARGET_RADIUS = 0.45
#: Foreground rule of the moments: above this fraction of the slice's intensity range.
FG_FRACTION = 0.1
#: Rings of :func:`polar_sample`: how many, and the outermost radius in radii of gyration.
POLAR_RINGS = 12
POLAR_MAX_RADIUS = 2.2
#: Angular samples per ring of :func:`polar_sample` (a power of two: the FFTs along the ring).
POLAR_ANGLES = 64
#: Angular harmonics kept by :func:`rotation_descriptor` (0 = the ring's mean).
ROTATION_HARMONICS = 12


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
        release_pages(arr)  # a slice store's pages read for this chunk leave the process
    return out


def _rfft(x: torch.Tensor) -> torch.Tensor:
    """``torch.fft.rfft(x, dim=-1)``; on the CPU through numpy's (single-threaded) FFT, whose result does not
    depend on the thread count: torch's CPU FFT splits a batch differently with 1 and 2 threads and rounds the
    last bits differently, so a worker of a cluster (one thread) would not reproduce the single-machine run."""
    if x.device.type != "cpu":
        return torch.fft.rfft(x, dim=-1)
    return torch.from_numpy(np.fft.rfft(x.detach().numpy(), axis=-1))


def _irfft(c: torch.Tensor, n: int) -> torch.Tensor:
    """``torch.fft.irfft(c, n=n, dim=-1)``, thread-count independent on the CPU (see :func:`_rfft`)."""
    if c.device.type != "cpu":
        return torch.fft.irfft(c, n=n, dim=-1)
    return torch.from_numpy(np.fft.irfft(c.detach().numpy(), n=n, axis=-1))


def polar_sample(
    images: torch.Tensor,
    centroid: torch.Tensor | None = None,
    radius: torch.Tensor | None = None,
    *,
    rings: int = POLAR_RINGS,
    angles: int = POLAR_ANGLES,
    max_radius: float = POLAR_MAX_RADIUS,
) -> torch.Tensor:
    """Each slice sampled on rings about its foreground centroid, radii in units of its radius of gyration.

    Parameters
    ----------
    images : torch.Tensor, shape (n, H, W)
    centroid, radius : torch.Tensor, shapes (n, 2) and (n,), optional
        From :func:`foreground_moments` (computed when not given).
    rings, angles : int
        Ring count (radii ``(i + 0.5) / rings * max_radius`` radii of gyration) and samples per ring (angle
        ``2 pi j / angles`` from the +x axis towards +y, i.e. towards the rows below).
    max_radius : float
        Outermost ring, in radii of gyration (outside the frame reads zero).

    Returns
    -------
    torch.Tensor, shape (n, rings, angles)
        Bilinear samples, each ring weighted by the square root of its radius (equal area per sample in a
        correlation) after removing the slice's foreground mean.

    Notes
    -----
    If ``fixed`` is ``moving`` rotated by ``d`` degrees about its centroid (and scaled, shifted), then
    ``polar(fixed)[:, :, j] = polar(moving)[:, :, j + d / (360 / angles)]``.
    """
    x = images.float()
    if x.dim() != 3:
        raise ValueError(f"images must have shape (n, H, W); got {tuple(x.shape)}.")
    if centroid is None or radius is None:
        centroid, radius = foreground_moments(x)
    dev, dt = x.device, x.dtype
    rho = (torch.arange(rings, device=dev, dtype=dt) + 0.5) / rings * float(max_radius)  # (R,)
    phi = torch.arange(angles, device=dev, dtype=dt) * (2.0 * math.pi / angles)  # (A,)
    ux, uy = torch.cos(phi)[None, :] * rho[:, None], torch.sin(phi)[None, :] * rho[:, None]  # (R, A)
    gx = centroid[:, 0, None, None] + radius[:, None, None] * ux[None]
    gy = centroid[:, 1, None, None] + radius[:, None, None] * uy[None]
    grid = torch.stack([gx, gy], dim=-1)  # (n, R, A, 2)
    out = F.grid_sample(x[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    out = out - out.mean((1, 2), keepdim=True)
    return out * torch.sqrt(rho)[None, :, None]


def relative_angle(fixed_polar: torch.Tensor, moving_polar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation (degrees) that carries each moving slice onto its fixed slice, from their rings.

    Parameters
    ----------
    fixed_polar, moving_polar : torch.Tensor, shapes (..., R, A)
        :func:`polar_sample` of the two slices (broadcastable against each other).

    Returns
    -------
    angle : torch.Tensor, shape (...)
        In (-180, 180]: the moving slice rotated by this angle about its centroid (the sampling map
        ``x_m = c_m + k R(angle) (x - c_f)``) best matches the fixed slice; the peak of the rings' circular
        cross-correlation, refined to a fraction of a step by a parabola through its neighbours.
    peak : torch.Tensor, shape (...)
        The cross-correlation at the peak over the product of the two norms (a cosine in [-1, 1]).
    """
    a = fixed_polar.shape[-1]
    ff = _rfft(fixed_polar)
    fm = _rfft(moving_polar)
    corr = _irfft((torch.conj(ff) * fm).sum(-2), a)  # (..., A): sum_j f[j] m[j + s]
    norm = (fixed_polar.square().sum((-2, -1)) * moving_polar.square().sum((-2, -1))).sqrt().clamp_min(1e-12)
    peak, j = corr.max(-1)
    left = corr.gather(-1, ((j - 1) % a)[..., None])[..., 0]
    right = corr.gather(-1, ((j + 1) % a)[..., None])[..., 0]
    den = left - 2.0 * peak + right
    frac = torch.where(den < -1e-12, 0.5 * (left - right) / den, torch.zeros_like(den)).clamp(-0.5, 0.5)
    ang = (j.to(corr.dtype) + frac) * (360.0 / a)
    ang = torch.where(ang > 180.0, ang - 360.0, ang)
    return ang, peak / norm


def rotation_descriptor(
    images: torch.Tensor | np.ndarray,
    *,
    harmonics: int = ROTATION_HARMONICS,
    batch_size: int = 1024,
) -> np.ndarray:
    """Magnitudes of the angular Fourier harmonics of each slice's rings: invariant to any in-plane rotation
    and reflection, to field of view, shift and matrix size.

    Parameters
    ----------
    images : torch.Tensor or np.ndarray, shape (n, H, W)
    harmonics : int
        Harmonics kept per ring (``0`` .. ``harmonics - 1``; at most ``POLAR_ANGLES // 2 + 1``).
    batch_size : int
        Slices processed at once (bounds memory).

    Returns
    -------
    np.ndarray, shape (n, POLAR_RINGS * harmonics), float32
        The square roots of the magnitudes (a variance-stabilising compression), each row centred on its own
        mean and L2-normalised.
    """
    if not 1 <= harmonics <= POLAR_ANGLES // 2 + 1:
        raise ValueError(f"harmonics must be in [1, {POLAR_ANGLES // 2 + 1}]; got {harmonics}.")
    arr = images if isinstance(images, torch.Tensor) else np.asarray(images)
    n = arr.shape[0]
    out = np.zeros((n, POLAR_RINGS * harmonics), np.float32)
    for start in range(0, n, batch_size):
        x = _writable_tensor(arr[start : start + batch_size])
        if x.dim() != 3:
            raise ValueError(f"images must have shape (n, H, W); got {tuple(x.shape)}.")
        cen, rad = foreground_moments(x)
        if x.shape[-1] > 128 or x.shape[-2] > 128:  # area pre-filter: the rings never alias
            x = F.adaptive_avg_pool2d(x[:, None], 128)[:, 0]
        mag = _rfft(polar_sample(x, cen, rad)).abs()[..., :harmonics]
        v = mag.sqrt().reshape(x.shape[0], -1)
        v = v - v.mean(1, keepdim=True)
        out[start : start + len(x)] = (v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)).numpy()
        release_pages(arr)
    return out
