"""How generators write their outputs: copy conditions beyond augmentations (BENCHMARK.md, "beyond").

A generative model's outputs rarely come back in the array convention of the training files. Each condition
here takes training slices (n, S, S) in [0, 1] at the audit's loading size and returns what the audit would
load from such an output, through the product's own loading rules (:func:`inspector.preprocess.resize_square`
for another matrix size; each slice normalised on its own):

``orient_<view>``
    One of the dihedral views of :mod:`inspector.views` that is not a flip: ``rot90``, ``rot180`` (the
    ``hvflip``), ``rot270``, ``transpose`` (row-major against column-major) and ``antitranspose``.
``fov_<lo>_<hi>``
    Another field of view: the anatomy scaled by a factor drawn uniformly in [lo, hi] inside the frame
    (``< 1``: the generator's frame is larger; ``> 1``: a zoomed, cropped frame).
``crop_<lo>_<hi>``
    A crop keeping a fraction in [lo, hi] of each side at a random position, resized back to the frame.
``matrix_<n>``
    The generator works at n x n pixels (64 or 256): written at that size, loaded back at the audit size.
``bit8``
    An 8-bit output of a random window (the upper clip drawn between the 97th and 100th percentile), where
    the training files are 16-bit or float.
``rotate_any``
    An arbitrary in-plane angle (uniform in [-180, 180] degrees). Reported, no target.
"""

from __future__ import annotations

import numpy as np
import torch

from inspector.preprocess import CONDITIONS, affine_warp, apply_condition, normalise_volume, resize_square
from inspector.views import View

__all__ = ["WRITER_CONDITIONS", "ORIENTATION_CONDITIONS", "SCALE_CONDITIONS", "apply_any", "apply_writer"]

#: Orientation conditions: name -> the view applied to the copy.
ORIENTATION_CONDITIONS: dict[str, View] = {
    "orient_rot90": View.ROT90,
    "orient_rot180": View.HVFLIP,
    "orient_rot270": View.ROT270,
    "orient_transpose": View.TRANSPOSE,
    "orient_antitranspose": View.ANTITRANSPOSE,
}
#: Field-of-view and crop conditions: name -> (kind, low, high).
SCALE_CONDITIONS: dict[str, tuple[str, float, float]] = {
    "fov_0.6_0.8": ("fov", 0.6, 0.8),
    "fov_1.25_1.6": ("fov", 1.25, 1.6),
    "crop_70_80": ("crop", 0.70, 0.80),
    "crop_80_95": ("crop", 0.80, 0.95),
}
#: Every writer condition name.
WRITER_CONDITIONS: tuple[str, ...] = (
    *ORIENTATION_CONDITIONS,
    *SCALE_CONDITIONS,
    "matrix_64",
    "matrix_256",
    "bit8",
    "rotate_any",
)


def _per_slice(x: np.ndarray) -> np.ndarray:
    return np.stack([normalise_volume(s, (0.5, 99.5), name="copy") for s in x]).astype(np.float32)


def apply_writer(images: np.ndarray, name: str, rng: np.random.Generator | int) -> np.ndarray:
    """Apply one writer condition.

    Parameters
    ----------
    images : np.ndarray, shape (n, S, S), float32 in [0, 1]
    name : str
        One of :data:`WRITER_CONDITIONS`.
    rng : np.random.Generator or int

    Returns
    -------
    np.ndarray, shape (n, S, S), float32 in [0, 1]
    """
    rng = np.random.default_rng(rng)
    x = np.asarray(images, np.float32)
    n, s = x.shape[0], x.shape[-1]
    if name in ORIENTATION_CONDITIONS:
        return np.ascontiguousarray(ORIENTATION_CONDITIONS[name].apply(x)).astype(np.float32)
    if name in SCALE_CONDITIONS:
        kind, lo, hi = SCALE_CONDITIONS[name]
        t = torch.from_numpy(x)
        if kind == "fov":
            z = torch.from_numpy(rng.uniform(lo, hi, n).astype(np.float32))
            out = affine_warp(t, 0.0, (0.0, 0.0), z)
        else:
            keep = rng.uniform(lo, hi, n)
            # a crop keeping `keep` of each side, at a random position, resized back = zoom 1/keep + shift
            off = (rng.uniform(-1, 1, (n, 2)) * (1 - keep)[:, None] / 2).astype(np.float32)
            out = affine_warp(
                t, 0.0, torch.from_numpy(-off / keep[:, None]).float(), torch.from_numpy(1 / keep).float()
            )
        return _per_slice(out.numpy().clip(0, 1))
    if name.startswith("matrix_"):
        m = int(name.split("_")[1])
        return _per_slice(np.stack([resize_square(resize_square(a, m), s) for a in x]).clip(0, 1))
    if name == "bit8":
        out = []
        for a in x:
            hi = np.percentile(a, rng.uniform(97.0, 100.0))
            out.append(np.round(np.clip(a / max(hi, 1e-6), 0, 1) * 255.0) / 255.0)
        return _per_slice(np.stack(out))
    if name == "rotate_any":
        ang = torch.from_numpy(rng.uniform(-180, 180, n).astype(np.float32))
        return _per_slice(affine_warp(torch.from_numpy(x), ang).numpy().clip(0, 1))
    raise ValueError(f"Unknown writer condition {name!r}; valid: {WRITER_CONDITIONS}.")


def apply_any(images: np.ndarray, name: str, rng: np.random.Generator | int) -> np.ndarray:
    """A condition of :data:`inspector.preprocess.CONDITIONS` or of :data:`WRITER_CONDITIONS`, by name."""
    if name in CONDITIONS:
        return apply_condition(images, name, rng)
    return apply_writer(images, name, rng)
