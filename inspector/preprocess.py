"""Preprocessing (intensity normalisation, background rule, square resizing) and the augmentation family.

Intensity rule (the same for every container): each slice's array is normalised on its own
(:func:`normalise_slice`: its robust percentiles, 0.5 and 99.5 by default, mapped to 0 and 1, then
clipped), so a slice's array depends only on its own pixels, whether it was stored alone (a 16-bit or
8-bit PNG, a 2D ``.npy``) or inside a volume (NIfTI, a DICOM series, a multi-page TIFF, a 3D array).
Percentiles commute with any increasing affine map, so a linear window/level change leaves the result
unchanged (up to float rounding) unless the window clips more than the tails beyond the percentiles,
and an 8-bit quantisation changes it by about one step of the 8-bit image on the normalised scale
(1/255 when the 8-bit image's range is about the percentile range; measured at most 0.8 of a step on
real slices, two steps in the worst case). Only the background rule (:func:`is_background`) of a
volume's slices is decided on the volume-normalised intensities (:func:`normalise_volume`), so that
the near-empty slices at the ends of a volume are still skipped; a lone 2D image is judged on itself.

The augmentation family of the benchmark protocol lives here, seeded, so that the contrastive
encoder's training views, the benchmarks' planted copies and the tests all share one implementation.
All geometric transforms run batched in torch (``affine_grid`` + ``grid_sample``), on whatever device
the input tensor lives on.
"""

from __future__ import annotations

import io as _io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "PreprocessConfig",
    "ConstantImageError",
    "normalise_volume",
    "normalise_slice",
    "is_background",
    "resize_square",
    "Augmentation",
    "CONDITIONS",
    "PAPER_CONDITIONS",
    "HARD_CONDITIONS",
    "augment",
    "apply_condition",
    "random_views",
    "affine_warp",
]

log = logging.getLogger(__name__)


class ConstantImageError(ValueError):
    """Raised when an image or volume has no intensity range to normalise (all pixels equal)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw pixels become a :class:`~inspector.types.Slice` array.

    Attributes
    ----------
    percentiles : tuple of float
        Lower and upper percentiles of each slice mapped to 0 and 1, then clipped
        (:func:`normalise_slice`; the background rule of a volume's slices uses the same percentiles
        of the whole volume, :func:`normalise_volume`).
    size : int or None
        Output square size in pixels (aspect ratio kept, zero padded). ``None`` keeps the native size.
    foreground_threshold : float
        A pixel counts as foreground when its normalised intensity exceeds this value.
    min_foreground_fraction : float
        **Background rule**: a slice whose foreground fraction is below this is skipped as
        background-only (listed in ``Cohort.skipped``). ``0`` disables the rule.
    """

    percentiles: tuple[float, float] = (0.5, 99.5)
    size: int | None = 128
    foreground_threshold: float = 0.1
    min_foreground_fraction: float = 0.05

    def __post_init__(self) -> None:
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lo < hi <= 100; got {self.percentiles}.")
        if self.size is not None and self.size < 8:
            raise ValueError(f"size must be >= 8 pixels or None; got {self.size}.")
        if not 0.0 <= self.min_foreground_fraction < 1.0:
            raise ValueError(f"min_foreground_fraction must be in [0, 1); got {self.min_foreground_fraction}.")


def normalise_volume(
    volume: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5), *, name: str = "image"
) -> np.ndarray:
    """Robust intensity normalisation of a whole volume (or image) to ``[0, 1]``, one mapping for all voxels.

    The loader uses it only for the background rule of a volume's slices; a slice's array is
    normalised on its own (:func:`normalise_slice`). NaN values become the lowest finite value
    (background) and ±Inf are clipped to the finite range; either case is logged with the count,
    never silently.

    Parameters
    ----------
    volume : np.ndarray, any shape
        Raw intensities.
    percentiles : tuple of float
        Percentiles mapped to 0 and 1.
    name : str
        Used in messages.

    Returns
    -------
    np.ndarray, same shape, float32 in [0, 1]

    Raises
    ------
    ConstantImageError
        If the finite values have no range (constant image) or there are no finite values.
    """
    return _normalise(volume, percentiles, name=name, log_nonfinite=True)


def normalise_slice(
    image: np.ndarray,
    percentiles: tuple[float, float] = (0.5, 99.5),
    *,
    name: str = "slice",
    log_nonfinite: bool = True,
) -> np.ndarray:
    """Normalise one 2D slice on its own: its robust percentiles mapped to 0 and 1, then clipped.

    The intensity rule of every loaded slice, whatever its container: the result depends only on
    the slice's own pixels (never on the volume around it), so the same slice stored as a 16-bit or
    8-bit PNG, a ``.npy`` array, inside a NIfTI volume or a DICOM series gives the same array.
    Invariant (up to float rounding) to any increasing affine map of the intensities (a linear
    window/level change, a rescale slope/intercept) that does not clip beyond the percentiles; an
    8-bit quantisation changes it by about one 8-bit step on the normalised scale (at most two:
    rounding moves each value and each percentile by half a step). When the
    percentiles coincide (a very sparse slice) the full range is used. NaN values become the slice's
    lowest finite value and ±Inf are clipped to its finite range.

    Parameters
    ----------
    image : np.ndarray, shape (H, W)
        Raw intensities of one slice.
    percentiles : tuple of float
        Lower and upper percentiles (in [0, 100]) mapped to 0 and 1.
    name : str
        Used in messages.
    log_nonfinite : bool
        Log a warning with the count of NaN/Inf values (the loader logs them once per volume instead).

    Returns
    -------
    np.ndarray, shape (H, W), float32 in [0, 1]

    Raises
    ------
    ValueError
        If ``image`` is not 2D.
    ConstantImageError
        If the slice's finite values have no range (constant slice) or there are none.
    """
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"normalise_slice expects a 2D slice (H, W); {name} has shape {arr.shape}.")
    return _normalise(arr, percentiles, name=name, log_nonfinite=log_nonfinite)


def _normalise(volume: np.ndarray, percentiles: tuple[float, float], *, name: str, log_nonfinite: bool) -> np.ndarray:
    v = np.asarray(volume, dtype=np.float64)
    if v.size == 0:
        raise ConstantImageError(f"{name} is empty (shape {v.shape}).")
    finite = np.isfinite(v)
    if not finite.all():
        n_bad = int((~finite).sum())
        if not finite.any():
            raise ConstantImageError(f"{name} holds no finite values ({n_bad} NaN/Inf).")
        if log_nonfinite:
            log.warning("%s: %d NaN/Inf values replaced (NaN -> background, +-Inf -> clipped)", name, n_bad)
        fmin, fmax = float(v[finite].min()), float(v[finite].max())
        v = np.where(np.isnan(v), fmin, v)
        v = np.clip(v, fmin, fmax)
    lo, hi = np.percentile(v, percentiles)
    if not hi > lo:
        vmin, vmax = float(v.min()), float(v.max())
        if vmax > vmin:  # very sparse image: fall back to the full range
            lo, hi = vmin, vmax
        else:
            raise ConstantImageError(f"{name} is constant (all values {vmin:.6g}); nothing to normalise.")
    out = (v - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def is_background(image: np.ndarray, config: PreprocessConfig = PreprocessConfig()) -> bool:
    """Apply the background rule to one normalised slice.

    Parameters
    ----------
    image : np.ndarray, shape (H, W), in [0, 1]

    Returns
    -------
    bool
        True when the fraction of pixels above ``config.foreground_threshold`` is below
        ``config.min_foreground_fraction`` (or the slice is constant).
    """
    if config.min_foreground_fraction <= 0:
        return False
    img = np.asarray(image)
    if float(img.max()) - float(img.min()) <= 1e-8:
        return True
    frac = float((img > config.foreground_threshold).mean())
    return frac < config.min_foreground_fraction


def resize_square(image: Any, size: int) -> Any:
    """Resize images to ``size x size`` keeping their aspect ratio, centred and zero padded.

    The one resize-to-square of the package: loading, extraction, registration, the pair view and the
    baselines all call it. Bilinear, with antialiasing when shrinking; a square input is resampled directly.

    Parameters
    ----------
    image : np.ndarray of shape (H, W) or (n, H, W), or torch.Tensor of shape (n, H, W)
    size : int

    Returns
    -------
    np.ndarray of shape (size, size) or (n, size, size), float32 (clipped to [0, 1], a copy), or, for a tensor,
    a contiguous float tensor of shape (n, size, size) on the input's device (values are convex combinations
    of the input's; not clipped).
    """
    if int(size) < 1:
        raise ValueError(f"resize_square needs size >= 1; got {size}.")
    size = int(size)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3:
            raise ValueError(f"resize_square expects a (n, H, W) tensor; got shape {tuple(image.shape)}.")
        return _resize_square_t(image, size)
    img = np.asarray(image, dtype=np.float32)
    if img.ndim not in (2, 3):
        raise ValueError(f"resize_square expects a 2D image or a (n, H, W) stack; got shape {img.shape}.")
    if img.shape[-2:] == (size, size):
        return img.copy()
    t = torch.from_numpy(np.array(img, dtype=np.float32, order="C"))
    out = _resize_square_t(t if img.ndim == 3 else t[None], size)
    out = out.clamp_(0.0, 1.0).numpy()
    return out if img.ndim == 3 else out[0]


def _resize_square_t(x: torch.Tensor, size: int) -> torch.Tensor:
    _, h, w = x.shape
    if (h, w) == (size, size):
        return x.contiguous()
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    r = F.interpolate(x[:, None].float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    if (nh, nw) == (size, size):
        return r[:, 0].contiguous()
    out = torch.zeros((x.shape[0], size, size), dtype=r.dtype, device=x.device)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[:, top : top + nh, left : left + nw] = r[:, 0]
    return out


# ----------------------------------------------------------------------------------------------
# Augmentation family
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augmentation:
    """One named augmentation with its magnitude, applied always (never with probability 0.5).

    Attributes
    ----------
    kind : str
        One of ``none, noise, rotate, hflip, vflip, intensity, gamma, blur, shift, crop, jpeg``.
    magnitude : float or tuple of float
        ``noise``: sigma on [0, 1] intensities. ``rotate``: max absolute angle in degrees (uniform in
        ±magnitude). ``intensity``: (low, high) scale factor. ``gamma``: (low, high) exponent.
        ``blur``: Gaussian sigma in pixels. ``shift``: max shift as a fraction of the field of view.
        ``crop``: (low, high) kept fraction of each side, resized back. ``jpeg``: quality.
    """

    kind: str
    magnitude: float | tuple[float, float] = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Unknown augmentation {self.kind!r}; valid kinds: {sorted(_KINDS)}.")


_KINDS = {"none", "noise", "rotate", "hflip", "vflip", "intensity", "gamma", "blur", "shift", "crop", "jpeg"}

#: The paper's eight conditions (BENCHMARK.md §3).
PAPER_CONDITIONS: dict[str, tuple[Augmentation, ...]] = {
    "none": (Augmentation("none"),),
    "noise_0.01": (Augmentation("noise", 0.01),),
    "noise_0.02": (Augmentation("noise", 0.02),),
    "rotate_3": (Augmentation("rotate", 3.0),),
    "rotate_5": (Augmentation("rotate", 5.0),),
    "hflip": (Augmentation("hflip"),),
    "vflip": (Augmentation("vflip"),),
    "intensity": (Augmentation("intensity", (0.9, 1.1)),),
}

#: The harder conditions beyond the paper (BENCHMARK.md §4).
HARD_CONDITIONS: dict[str, tuple[Augmentation, ...]] = {
    "rotate_10": (Augmentation("rotate", 10.0),),
    "shift_8pct": (Augmentation("shift", 0.08),),
    "crop_85_95": (Augmentation("crop", (0.85, 0.95)),),
    "gamma": (Augmentation("gamma", (0.7, 1.4)),),
    "blur_1px": (Augmentation("blur", 1.0),),
    "jpeg_50": (Augmentation("jpeg", 50.0),),
    "combo": (
        Augmentation("hflip"),
        Augmentation("rotate", 5.0),
        Augmentation("noise", 0.01),
        Augmentation("intensity", (0.9, 1.1)),
    ),
}

#: All benchmark conditions by name.
CONDITIONS: dict[str, tuple[Augmentation, ...]] = {**PAPER_CONDITIONS, **HARD_CONDITIONS}


def affine_warp(
    images: torch.Tensor,
    angle_deg: torch.Tensor | float = 0.0,
    shift: torch.Tensor | tuple[float, float] = (0.0, 0.0),
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Batched similarity transform about the image centre, bilinear, zero fill.

    Parameters
    ----------
    images : torch.Tensor, shape (n, H, W) or (n, C, H, W)
    angle_deg : float or tensor of shape (n,)
        Counter-clockwise rotation in degrees.
    shift : tuple or tensor of shape (n, 2)
        ``(dx, dy)`` as a fraction of the image width/height (``0.1`` moves by 10 % of the FOV).
    scale : float or tensor of shape (n,)
        Zoom factor (> 1 magnifies).

    Returns
    -------
    torch.Tensor, same shape as ``images``
    """
    squeeze = images.dim() == 3
    x = images[:, None] if squeeze else images
    n = x.shape[0]
    dev, dt = x.device, x.dtype
    ang = torch.as_tensor(angle_deg, dtype=dt, device=dev).expand(n) * (math.pi / 180.0)
    sc = torch.as_tensor(scale, dtype=dt, device=dev).expand(n)
    sh = torch.as_tensor(shift, dtype=dt, device=dev)
    sh = sh.expand(n, 2) if sh.dim() == 1 else sh
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    # grid maps output coords -> input coords (normalised [-1, 1]); inverse of the forward transform.
    theta = torch.zeros((n, 2, 3), dtype=dt, device=dev)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    tx, ty = -2.0 * sh[:, 0], -2.0 * sh[:, 1]
    theta[:, 0, 2] = cos * tx - sin * ty
    theta[:, 1, 2] = sin * tx + cos * ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0] if squeeze else out


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur; x: (n, H, W), sigma: (n,) in pixels (0 = identity)."""
    smax = float(sigma.max()) if sigma.numel() else 0.0
    if smax <= 0:
        return x
    r = max(1, int(math.ceil(3 * smax)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    s = sigma.clamp_min(1e-6)[:, None]
    k = torch.exp(-0.5 * (t[None] / s) ** 2)
    k = k / k.sum(1, keepdim=True)
    ident = torch.zeros_like(k)
    ident[:, r] = 1.0
    k = torch.where((sigma > 0)[:, None], k, ident)
    n, h, w = x.shape
    xx = F.pad(x[None], (r, r, 0, 0), mode="reflect")  # (1, n, H, W+2r)
    xx = F.conv2d(xx, k[:, None, None, :], groups=n)
    xx = F.pad(xx, (0, 0, r, r), mode="reflect")
    xx = F.conv2d(xx, k[:, None, :, None], groups=n)
    return xx[0]


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    out = np.empty_like(x)
    for i, img in enumerate(x):
        u8 = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
        buf = _io.BytesIO()
        Image.fromarray(u8, mode="L").save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf), dtype=np.float32) / 255.0
    return out


def _uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return rng.uniform(lo, hi, size=n).astype(np.float32)


def _range(mag: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(mag, tuple | list):
        return float(mag[0]), float(mag[1])
    return -float(mag), float(mag)


def augment(images: np.ndarray, aug: Augmentation | str, rng: np.random.Generator | int) -> np.ndarray:
    """Apply one augmentation to every image, always, with random parameters drawn from ``rng``.

    Parameters
    ----------
    images : np.ndarray, shape (n, H, W) or (H, W), float in [0, 1]
    aug : Augmentation or str
        A kind with default magnitude, or an :class:`Augmentation`.
    rng : np.random.Generator or int
        Seeded source of the random parameters (and noise).

    Returns
    -------
    np.ndarray, same shape, float32 in [0, 1]
    """
    if isinstance(aug, str):
        aug = Augmentation(aug, _DEFAULT_MAG.get(aug, 0.0))
    rng = np.random.default_rng(rng)
    arr = np.asarray(images, dtype=np.float32)
    single = arr.ndim == 2
    x = arr[None] if single else arr
    if x.ndim != 3:
        raise ValueError(f"augment expects (n, H, W) or (H, W); got shape {arr.shape}.")
    n = x.shape[0]
    k, m = aug.kind, aug.magnitude
    if k == "none":
        out = x.copy()
    elif k == "hflip":
        out = x[:, :, ::-1].copy()
    elif k == "vflip":
        out = x[:, ::-1, :].copy()
    elif k == "noise":
        out = x + rng.normal(0.0, float(m), size=x.shape).astype(np.float32)
    elif k == "intensity":
        out = x * _uniform(rng, *_range(m), n)[:, None, None]
    elif k == "gamma":
        out = np.clip(x, 0, 1) ** _uniform(rng, *_range(m), n)[:, None, None]
    elif k == "jpeg":
        out = _jpeg(np.clip(x, 0, 1), int(m))
    else:
        t = torch.from_numpy(np.ascontiguousarray(x))
        if k == "rotate":
            out = affine_warp(t, angle_deg=torch.from_numpy(_uniform(rng, *_range(m), n))).numpy()
        elif k == "shift":
            s = rng.uniform(-float(m), float(m), size=(n, 2)).astype(np.float32)
            out = affine_warp(t, shift=torch.from_numpy(s)).numpy()
        elif k == "crop":
            lo, hi = _range(m)
            frac = _uniform(rng, lo, hi, n)
            # a centred-at-random crop of side `frac` resized back = zoom by 1/frac with an offset
            off = (rng.uniform(-1, 1, size=(n, 2)) * (1 - frac[:, None]) / 2).astype(np.float32)
            out = affine_warp(
                t, scale=torch.from_numpy(1.0 / frac), shift=torch.from_numpy(-off / frac[:, None])
            ).numpy()
        elif k == "blur":
            out = _gaussian_blur(t, torch.full((n,), float(m))).numpy()
        else:  # pragma: no cover - guarded by Augmentation.__post_init__
            raise ValueError(k)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    return out[0] if single else out


_DEFAULT_MAG: dict[str, float | tuple[float, float]] = {
    "noise": 0.01,
    "rotate": 5.0,
    "intensity": (0.9, 1.1),
    "gamma": (0.7, 1.4),
    "blur": 1.0,
    "shift": 0.08,
    "crop": (0.85, 0.95),
    "jpeg": 50.0,
}


def apply_condition(
    images: np.ndarray, condition: str | Sequence[Augmentation], rng: np.random.Generator | int
) -> np.ndarray:
    """Apply a named benchmark condition (see :data:`CONDITIONS`) or a sequence of augmentations.

    Parameters
    ----------
    images : np.ndarray, shape (n, H, W) or (H, W)
    condition : str or sequence of Augmentation
    rng : np.random.Generator or int

    Returns
    -------
    np.ndarray, same shape, float32 in [0, 1]
    """
    if isinstance(condition, str):
        if condition not in CONDITIONS:
            raise ValueError(f"Unknown condition {condition!r}; valid: {sorted(CONDITIONS)}.")
        augs: Sequence[Augmentation] = CONDITIONS[condition]
    else:
        augs = condition
    rng = np.random.default_rng(rng)
    out = np.asarray(images, dtype=np.float32)
    for a in augs:
        out = augment(out, a, rng)
    return out


def random_views(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    max_rotation: float = 10.0,
    max_shift: float = 0.08,
    crop: tuple[float, float] = (0.85, 1.0),
    p_flip: float = 0.5,
    noise: float = 0.02,
    intensity: tuple[float, float] = (0.85, 1.15),
    gamma: tuple[float, float] = (0.7, 1.4),
    max_blur: float = 1.0,
) -> torch.Tensor:
    """Random composite views for contrastive training: the same family as :func:`augment`, batched.

    Each image independently gets: horizontal and vertical flips (each with ``p_flip``), a rotation
    in ±``max_rotation`` degrees, a zoom from a crop fraction in ``crop``, a shift in ±``max_shift``,
    intensity scaling, gamma, a Gaussian blur with sigma in [0, ``max_blur``], and Gaussian noise with
    sigma in [0, ``noise``].

    Parameters
    ----------
    images : torch.Tensor, shape (n, H, W), values in [0, 1]
    generator : torch.Generator
        Seeded generator on the same device as ``images`` (the only source of randomness).

    Returns
    -------
    torch.Tensor, shape (n, H, W), values in [0, 1]
    """
    n = images.shape[0]
    dev, dt = images.device, images.dtype

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(*(shape or (n,)), generator=generator, device=dev, dtype=dt) * (hi - lo) + lo

    x = images
    hf = u(0, 1) < p_flip
    vf = u(0, 1) < p_flip
    x = torch.where(hf[:, None, None], x.flip(-1), x)
    x = torch.where(vf[:, None, None], x.flip(-2), x)
    frac = u(crop[0], crop[1])
    x = affine_warp(
        x,
        angle_deg=u(-max_rotation, max_rotation),
        shift=u(-max_shift, max_shift, n, 2),
        scale=1.0 / frac,
    )
    x = x * u(*intensity)[:, None, None]
    x = x.clamp(0, 1) ** u(*gamma)[:, None, None]
    x = _gaussian_blur(x, u(0, max_blur))
    x = x + torch.randn(x.shape, generator=generator, device=dev, dtype=dt) * u(0, noise)[:, None, None]
    return x.clamp_(0, 1)
