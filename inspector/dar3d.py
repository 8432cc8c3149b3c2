"""Dar et al. (2024)'s 3D memorisation detector, reproduced as a baseline.

Dar, Seyfarth, Ayx, Papavassiliu, Schoenberg, Siepmann, Andre, Engelhardt: "Unconditional latent
diffusion models memorize patient imaging data" (code: Cardio-AI/memorization-ldm,
``train_selfsupervised3D.py``). Their 3D pipeline, as reproduced here:

1. **Encoder.** A VQ-GAN-style 3D convolutional encoder (the Medical-Diffusion ``Encoder``): a 3x3x3
   stem, then per level a strided 4x4x4 convolution (stride 2) that doubles the channels followed by a
   residual block (GroupNorm, SiLU, 3x3x3 conv, twice), down to a 4x4x4 grid (``size / 4`` per axis
   and at least one level), a final GroupNorm + SiLU, global average pooling and a two-layer
   projection to an ``embed_dim``-d embedding (32 in their code).
2. **Training.** NT-Xent (SimCLR) on the training volumes themselves: the two views of a volume, each
   under a random affine (rotation up to ``max_rotation_deg`` about every axis, small isotropic scale and
   shift) and a random left-right flip, are the positive pair; every other volume in the batch is a
   negative. Augmentation is batched in torch (``F.affine_grid`` / ``F.grid_sample``, zero padding, which
   is the volume's minimum after :func:`prepare_volume`).
3. **Similarity.** The Pearson correlation between embeddings (:func:`correlation_matrix`); a synthetic
   volume's score is its maximum correlation to any training volume (:meth:`Dar3D.score_samples`, higher
   = more memorised), i.e. its minimum correlation distance ``1 - r``.
4. **Copy threshold.** The ``percentile``-th (5th) percentile of the nearest training correlation
   distances of a validation (holdout) set (:func:`copy_threshold`); a synthetic volume whose nearest
   training distance is below it is called a copy (:meth:`Dar3D.is_copy`). This threshold has no stated
   false-positive rate: by construction about 5 % of unseen real volumes fall below it, so about 5 % of
   genuinely novel synthetic volumes are called copies. It is reproduced as published; the calibrated
   decisions of :mod:`inspector.calibration` are what this project reports.

Where the released code differs from the description above (kept as documented, not silently changed):
it crops/pads MRNet volumes to 32x256x256 and flattens the 4x4x4 grid (8 channels after a 1x1x1 conv)
into ``Linear(512, 128) - ReLU - Dropout(0.5) - Linear(128, 32)`` instead of pooling globally; only the
first view is augmented (affine with probability 0.5, rotation up to 5°, no scaling; flip with
probability 0.5), the second is the plain volume; intensities are rescaled to [-1, 1]; Adam at lr 1e-4 for
200 epochs with batch 10 and pytorch-metric-learning's ``NTXentLoss`` (temperature 0.07 by default). Here
volumes are resampled to a cube of side ``size`` so that one encoder fits any input matrix, and training
is bounded by ``steps`` and ``max_seconds`` (whichever comes first) so its cost does not grow with |T|.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import NotFittedError
from torch import nn

__all__ = [
    "Dar3D",
    "Dar3DConfig",
    "NotFittedError",
    "copy_threshold",
    "correlation_matrix",
    "nearest_correlation",
    "prepare_volume",
]

log = logging.getLogger(__name__)

_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Dar3DConfig:
    """Settings of :class:`Dar3D` (frozen, hashable).

    Attributes
    ----------
    size : int
        Side of the cube every volume is resampled to (``size x size x size`` voxels); at least 8.
    embed_dim : int
        Dimension of the embedding (32 in Dar et al.'s code).
    width : int
        Channels after the stem; each downsampling level doubles them (16 in Dar et al.'s code).
    steps : int
        Maximum number of optimisation steps (one batch each).
    batch_size : int
        Volumes per batch (each contributes two views); at least 2, capped at the number of training volumes.
    lr : float
        Adam learning rate.
    temperature : float
        NT-Xent temperature.
    max_rotation_deg : float
        Augmentation: rotation about each axis drawn uniformly in ``[-max_rotation_deg, max_rotation_deg]``.
    max_scale : float
        Augmentation: isotropic scale drawn uniformly in ``[1 - max_scale, 1 + max_scale]``.
    max_shift : float
        Augmentation: shift per axis drawn uniformly in ``[-max_shift, max_shift]`` as a fraction of the extent.
    seed : int
        Seed of the weight initialisation (``torch.manual_seed``) and of batches and augmentations
        (``numpy.random.default_rng``).
    max_seconds : float
        Wall-clock cap on training: training stops after the step that passes it.
    device : str
        ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
    """

    size: int = 32
    embed_dim: int = 32
    width: int = 16
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    temperature: float = 0.1
    max_rotation_deg: float = 5.0
    max_scale: float = 0.05
    max_shift: float = 0.05
    seed: int = 0
    max_seconds: float = 120.0
    device: str = "auto"

    def __post_init__(self) -> None:
        ints = {"size": (self.size, 8), "embed_dim": (self.embed_dim, 1), "width": (self.width, 1)}
        ints |= {"steps": (self.steps, 1), "batch_size": (self.batch_size, 2)}
        for name, (value, low) in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Dar3DConfig.{name} must be an integer >= {low}; got {value!r}.")
        positive = {"lr": self.lr, "temperature": self.temperature, "max_seconds": self.max_seconds}
        for name, value in positive.items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"Dar3DConfig.{name} must be a finite number > 0; got {value!r}.")
        if not (0.0 <= self.max_rotation_deg <= 180.0):
            raise ValueError(f"Dar3DConfig.max_rotation_deg must be in [0, 180]; got {self.max_rotation_deg!r}.")
        if not (0.0 <= self.max_scale < 1.0):
            raise ValueError(f"Dar3DConfig.max_scale must be in [0, 1); got {self.max_scale!r}.")
        if not (0.0 <= self.max_shift <= 1.0):
            raise ValueError(f"Dar3DConfig.max_shift must be in [0, 1]; got {self.max_shift!r}.")
        if self.device not in _DEVICES:
            raise ValueError(f"Dar3DConfig.device must be one of {_DEVICES}; got {self.device!r}.")


# ----------------------------------------------------------------------------------------------
# Volumes
# ----------------------------------------------------------------------------------------------


def prepare_volume(vol: np.ndarray, *, size: int = 32) -> np.ndarray:
    """Normalise and resample one volume for the encoder.

    Intensities are mapped robustly to [0, 1] (the 0.5th and 99.5th percentiles go to 0 and 1, the
    rest is clipped), then the volume is resized trilinearly (``F.interpolate``, ``align_corners=False``)
    to a cube. A constant volume becomes all zeros.

    Parameters
    ----------
    vol : np.ndarray, shape (D, H, W)
        Any real dtype and range; every value must be finite.
    size : int
        Side of the output cube.

    Returns
    -------
    np.ndarray, shape (size, size, size), float32, values in [0, 1]

    Raises
    ------
    ValueError
        If ``vol`` is not 3D, is empty, is not real-valued or holds NaN/inf.
    """
    arr = np.asarray(vol)
    if arr.ndim != 3:
        raise ValueError(
            f"prepare_volume expects one 3D volume of shape (D, H, W); got shape {arr.shape}. "
            "Pass volumes one at a time (drop a channel axis with np.squeeze)."
        )
    if arr.size == 0:
        raise ValueError(f"prepare_volume got an empty volume of shape {arr.shape}; every axis needs >= 1 voxel.")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
        raise ValueError(f"prepare_volume expects a real-valued volume; got dtype {arr.dtype}.")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        n_bad = int((~np.isfinite(arr)).sum())
        raise ValueError(
            f"prepare_volume got {n_bad} non-finite voxels (NaN or inf) in a volume of shape {arr.shape}; "
            "replace them first (e.g. np.nan_to_num(vol, nan=vol[np.isfinite(vol)].min()))."
        )
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"prepare_volume size must be an integer >= 1; got {size!r}.")
    lo, hi = np.percentile(arr, [0.5, 99.5])
    if hi - lo <= 1e-12 * max(1.0, abs(float(hi))):
        return np.zeros((size, size, size), np.float32)
    arr = np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    if tuple(arr.shape) != (size, size, size):
        t = F.interpolate(t, size=(size, size, size), mode="trilinear", align_corners=False)
    return t[0, 0].clamp_(0.0, 1.0).numpy().astype(np.float32, copy=False)


def _stack(volumes: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Prepared volumes as a (n, 1, size, size, size) float32 tensor."""
    out = torch.empty((len(volumes), 1, size, size, size), dtype=torch.float32)
    for i, vol in enumerate(volumes):
        try:
            out[i, 0] = torch.from_numpy(prepare_volume(vol, size=size))
        except ValueError as e:
            raise ValueError(f"volume {i}: {e}") from e
    return out


# ----------------------------------------------------------------------------------------------
# Correlation
# ----------------------------------------------------------------------------------------------


def _check_rows(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2D array (n, d) of embeddings; got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric; got dtype {arr.dtype}.")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or inf; embeddings must be finite.")
    return arr


def _standardise_rows(x: np.ndarray) -> np.ndarray:
    """Centre each row and scale it to unit L2 norm; a constant row becomes zeros (correlation 0)."""
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def correlation_matrix(a: np.ndarray, b: np.ndarray, *, chunk: int = 4096) -> np.ndarray:
    """Pearson correlation between every row of ``a`` and every row of ``b``.

    Each row is centred and L2-normalised, then the rows are multiplied; ``b`` is processed ``chunk``
    rows at a time, so no standardised copy of all of ``b`` is held. A constant row (zero variance, where
    Pearson's r is undefined) correlates 0 with everything.

    Parameters
    ----------
    a : np.ndarray, shape (n_a, d)
    b : np.ndarray, shape (n_b, d)
    chunk : int
        Rows of ``b`` per block.

    Returns
    -------
    np.ndarray, shape (n_a, n_b), float64, values in [-1, 1]
    """
    a = _check_rows(a, "a")
    b = _check_rows(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same number of columns; got {a.shape[1]} and {b.shape[1]}.")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1; got {chunk!r}.")
    za = _standardise_rows(a)
    out = np.empty((a.shape[0], b.shape[0]), np.float64)
    for start in range(0, b.shape[0], chunk):
        zb = _standardise_rows(b[start : start + chunk])
        np.clip(za @ zb.T, -1.0, 1.0, out=out[:, start : start + zb.shape[0]])
    return out


def nearest_correlation(a: np.ndarray, b: np.ndarray, *, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``a``, its highest Pearson correlation to a row of ``b`` and that row's index.

    Computed over blocks of ``chunk`` rows of ``b`` (:func:`correlation_matrix` per block), so memory is
    ``n_a x chunk``, never ``n_a x n_b``. Ties go to the lowest index.

    Parameters
    ----------
    a : np.ndarray, shape (n_a, d)
    b : np.ndarray, shape (n_b, d), n_b >= 1
    chunk : int
        Rows of ``b`` per block.

    Returns
    -------
    best : np.ndarray, shape (n_a,), float64
        ``max_i r(a_j, b_i)``.
    index : np.ndarray, shape (n_a,), int64
        ``argmax_i r(a_j, b_i)``.
    """
    b_arr = np.asarray(b)
    if b_arr.ndim != 2 or b_arr.shape[0] == 0:
        raise ValueError(f"b must be a non-empty 2D array (n_b, d); got shape {b_arr.shape}.")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1; got {chunk!r}.")
    n_a = np.asarray(a).shape[0]
    best = np.full(n_a, -np.inf)
    index = np.zeros(n_a, np.int64)
    for start in range(0, b_arr.shape[0], chunk):
        r = correlation_matrix(a, b_arr[start : start + chunk], chunk=chunk)
        j = r.argmax(axis=1)
        rj = r[np.arange(n_a), j]
        better = rj > best
        best[better] = rj[better]
        index[better] = j[better] + start
    return best, index


def copy_threshold(train_embeddings: np.ndarray, validation_embeddings: np.ndarray, percentile: float = 5.0) -> float:
    """Dar et al.'s copy threshold: a percentile of the validation set's nearest training distances.

    For each validation (holdout) embedding, its nearest training correlation distance
    ``d_j = 1 - max_i r(v_j, t_i)``; the threshold is ``np.percentile(d, percentile)`` (linear
    interpolation). A synthetic volume with a nearest training distance below it is called a copy. About
    ``percentile`` % of unseen real volumes fall below it by construction; no false-positive rate is claimed.

    Parameters
    ----------
    train_embeddings : np.ndarray, shape (n_train, d)
    validation_embeddings : np.ndarray, shape (n_val, d), n_val >= 1
    percentile : float
        In [0, 100]; 5 in Dar et al.

    Returns
    -------
    float
        Correlation-distance threshold, in [0, 2].
    """
    if not (isinstance(percentile, int | float) and 0.0 <= float(percentile) <= 100.0):
        raise ValueError(f"percentile must be a number in [0, 100]; got {percentile!r}.")
    val = np.asarray(validation_embeddings)
    if val.ndim != 2 or val.shape[0] == 0:
        raise ValueError(
            f"the copy threshold needs at least one validation volume; got validation embeddings of shape "
            f"{val.shape}. Pass real holdout volumes the generator never saw."
        )
    best, _ = nearest_correlation(val, train_embeddings)
    return float(np.percentile(1.0 - best, float(percentile)))


# ----------------------------------------------------------------------------------------------
# Encoder and augmentation
# ----------------------------------------------------------------------------------------------


def _groups(channels: int, preferred: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``preferred`` (VQ-GAN uses 32 groups)."""
    return max(g for g in range(1, min(preferred, channels) + 1) if channels % g == 0)


class _ResBlock3D(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1, padding_mode="replicate")
        self.norm2 = nn.GroupNorm(_groups(channels), channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1, padding_mode="replicate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class _Encoder3D(nn.Module):
    """VQ-GAN-style 3D encoder + global average pooling + projection: (B, 1, s, s, s) -> (B, embed_dim)."""

    def __init__(self, size: int, width: int, embed_dim: int) -> None:
        super().__init__()
        n_down = max(1, int(math.floor(math.log2(size / 4))))
        self.stem = nn.Conv3d(1, width, 3, padding=1, padding_mode="replicate")
        blocks: list[nn.Module] = []
        ch = width
        for _ in range(n_down):
            down = nn.Conv3d(ch, 2 * ch, 4, stride=2, padding=1, padding_mode="replicate")
            blocks += [down, _ResBlock3D(2 * ch)]
            ch *= 2
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = nn.GroupNorm(_groups(ch), ch)
        hidden = 4 * embed_dim
        self.head = nn.Sequential(nn.Linear(ch, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embed_dim))
        self.out_channels = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.final_norm(self.blocks(self.stem(x))))
        return self.head(h.mean(dim=(2, 3, 4)))


def _rotation_matrices(angles: np.ndarray) -> np.ndarray:
    """(n, 3) angles in radians about x, y, z -> (n, 3, 3) rotations ``Rz @ Ry @ Rx``."""
    cx, cy, cz = np.cos(angles).T
    sx, sy, sz = np.sin(angles).T
    one, zero = np.ones_like(cx), np.zeros_like(cx)
    rx = np.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], axis=1).reshape(-1, 3, 3)
    ry = np.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], axis=1).reshape(-1, 3, 3)
    rz = np.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], axis=1).reshape(-1, 3, 3)
    return rz @ ry @ rx


def _random_thetas(n: int, cfg: Dar3DConfig, rng: np.random.Generator) -> np.ndarray:
    """(n, 3, 4) affine matrices for ``F.affine_grid``: flip, rotation, isotropic scale, shift."""
    max_rad = math.radians(cfg.max_rotation_deg)
    angles = rng.uniform(-max_rad, max_rad, size=(n, 3))
    scale = rng.uniform(1.0 - cfg.max_scale, 1.0 + cfg.max_scale, size=n)
    # the normalised grid spans [-1, 1] (extent 2): a shift of f x extent is 2f in grid units
    shift = rng.uniform(-cfg.max_shift, cfg.max_shift, size=(n, 3)) * 2.0
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0)  # left-right: the grid's x axis, the volume's last axis
    lin = _rotation_matrices(angles) * scale[:, None, None]
    lin[:, :, 0] *= flip[:, None]
    return np.concatenate([lin, shift[:, :, None]], axis=2)


def _augment(x: torch.Tensor, cfg: Dar3DConfig, rng: np.random.Generator) -> torch.Tensor:
    """One random view of each volume of ``x`` (B, 1, s, s, s), resampled trilinearly, zero padded."""
    theta = torch.as_tensor(_random_thetas(x.shape[0], cfg, rng), dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over 2B embeddings where rows i and i + B are the positive pair (mean over the 2B anchors)."""
    n = z.shape[0] // 2
    z = F.normalize(z, dim=1)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("Dar3DConfig.device is 'cuda' but CUDA is not available on this machine; use 'auto' or 'cpu'.")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------
# Estimator
# ----------------------------------------------------------------------------------------------


class Dar3D:
    """Dar et al. (2024)'s 3D memorisation detector: a contrastive 3D encoder trained on T, Pearson matching.

    Parameters
    ----------
    config : Dar3DConfig, optional
        Settings; the defaults when omitted.

    Attributes
    ----------
    encoder_ : torch.nn.Module
        The trained encoder (on ``device_``, in eval mode).
    device_ : torch.device
        Where the encoder lives.
    train_embeddings_ : np.ndarray, shape (n_train, embed_dim), float32
        Embeddings of the training volumes (unaugmented).
    steps_run_ : int
        Optimisation steps actually run (``<= config.steps``; fewer when ``max_seconds`` cut training).
    seconds_ : float
        Wall-clock seconds training took.
    losses_ : np.ndarray, shape (steps_run_,), float64
        NT-Xent loss per step.

    Examples
    --------
    >>> det = Dar3D(config=Dar3DConfig(steps=100)).fit(train_volumes)      # doctest: +SKIP
    >>> thr = det.threshold(holdout_volumes)                                # doctest: +SKIP
    >>> copies = det.is_copy(synthetic_volumes, thr)                        # doctest: +SKIP
    """

    def __init__(self, *, config: Dar3DConfig | None = None) -> None:
        self.config = config

    @property
    def _cfg(self) -> Dar3DConfig:
        return self.config if self.config is not None else Dar3DConfig()

    # -- training ------------------------------------------------------------------------------------------------

    def fit(self, train_volumes: Sequence[np.ndarray]) -> Dar3D:
        """Train the encoder on the training volumes with NT-Xent and embed them.

        Parameters
        ----------
        train_volumes : sequence of np.ndarray, each of shape (D_i, H_i, W_i)
            The generator's training volumes (any sizes and ranges; see :func:`prepare_volume`). At least 2.

        Returns
        -------
        Dar3D
            ``self``, fitted.
        """
        cfg = self._cfg
        if not isinstance(cfg, Dar3DConfig):
            raise ValueError(f"config must be a Dar3DConfig or None; got {type(cfg).__name__}.")
        n = len(train_volumes)
        if n < 2:
            raise ValueError(
                f"Dar3D.fit needs at least 2 training volumes (NT-Xent needs at least 2: every other volume in a "
                f"batch is a negative); got {n}."
            )
        device = _resolve_device(cfg.device)
        data = _stack(train_volumes, cfg.size)
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        encoder = _Encoder3D(cfg.size, cfg.width, cfg.embed_dim).to(device)
        optimiser = torch.optim.Adam(encoder.parameters(), lr=cfg.lr)
        batch = min(cfg.batch_size, n)
        losses: list[float] = []
        encoder.train()
        t0 = time.perf_counter()
        for _step in range(cfg.steps):
            idx = torch.as_tensor(rng.choice(n, size=batch, replace=False))
            x = data[idx].to(device, non_blocking=True)
            views = torch.cat([_augment(x, cfg, rng), _augment(x, cfg, rng)])
            loss = _nt_xent(encoder(views), cfg.temperature)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            if time.perf_counter() - t0 >= cfg.max_seconds:
                break
        seconds = time.perf_counter() - t0
        encoder.eval()
        self.encoder_ = encoder
        self.device_ = device
        self.steps_run_ = len(losses)
        self.seconds_ = seconds
        self.losses_ = np.asarray(losses, np.float64)
        stopped = "" if self.steps_run_ == cfg.steps else f" (stopped by max_seconds={cfg.max_seconds:g})"
        log.info(
            "Dar3D: trained on %d volumes for %d/%d steps in %.1f s on %s%s; NT-Xent %.4f -> %.4f",
            n,
            self.steps_run_,
            cfg.steps,
            seconds,
            device,
            stopped,
            losses[0],
            losses[-1],
        )
        self.train_embeddings_ = self._embed_tensor(data)
        return self

    # -- inference -----------------------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "train_embeddings_"):
            raise NotFittedError("this Dar3D is not fitted yet; call fit(train_volumes) before embedding or scoring.")

    def _embed_tensor(self, data: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        out = np.empty((data.shape[0], self._cfg.embed_dim), np.float32)
        with torch.no_grad():
            for start in range(0, data.shape[0], batch_size):
                x = data[start : start + batch_size].to(self.device_)
                out[start : start + x.shape[0]] = self.encoder_(x).float().cpu().numpy()
        return out

    def embed(self, volumes: Sequence[np.ndarray], *, batch_size: int = 32) -> np.ndarray:
        """Embed volumes with the trained encoder (eval mode, no gradients, batched).

        Parameters
        ----------
        volumes : sequence of np.ndarray, each of shape (D_i, H_i, W_i)
        batch_size : int
            Volumes per forward pass; volumes are prepared one batch at a time.

        Returns
        -------
        np.ndarray, shape (n, embed_dim), float32
        """
        self._check_fitted()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}.")
        self.encoder_.eval()
        parts = [np.empty((0, self._cfg.embed_dim), np.float32)]
        for start in range(0, len(volumes), batch_size):
            chunk = [volumes[i] for i in range(start, min(start + batch_size, len(volumes)))]
            try:
                data = _stack(chunk, self._cfg.size)
            except ValueError as e:
                raise ValueError(f"batch starting at volume {start}: {e}") from e
            parts.append(self._embed_tensor(data, batch_size))
        return np.concatenate(parts)

    def score_samples(self, volumes: Sequence[np.ndarray]) -> np.ndarray:
        """Each volume's maximum Pearson correlation to any training volume.

        Parameters
        ----------
        volumes : sequence of np.ndarray, each of shape (D_i, H_i, W_i)

        Returns
        -------
        np.ndarray, shape (n,), float64, in [-1, 1]
            Higher = more memorised (1 for an exact copy of a training volume).
        """
        self._check_fitted()
        best, _ = nearest_correlation(self.embed(volumes), self.train_embeddings_)
        return best

    def nearest(self, volumes: Sequence[np.ndarray]) -> np.ndarray:
        """Index (into the training volumes given to :meth:`fit`) of each volume's most correlated training volume.

        Returns
        -------
        np.ndarray, shape (n,), int64
        """
        self._check_fitted()
        _, index = nearest_correlation(self.embed(volumes), self.train_embeddings_)
        return index

    def threshold(self, validation_volumes: Sequence[np.ndarray], percentile: float = 5.0) -> float:
        """Dar et al.'s copy threshold on correlation distance (:func:`copy_threshold`).

        Parameters
        ----------
        validation_volumes : sequence of np.ndarray
            Real holdout volumes the generator never saw; at least one.
        percentile : float
            Percentile of their nearest training distances ``1 - max r`` (5 in Dar et al.).

        Returns
        -------
        float
            The threshold; no false-positive rate is attached to it (about ``percentile`` % of unseen
            real volumes fall below it by construction).
        """
        self._check_fitted()
        if len(validation_volumes) == 0:
            raise ValueError("Dar3D.threshold needs at least one validation volume; pass real holdout volumes.")
        return copy_threshold(self.train_embeddings_, self.embed(validation_volumes), percentile)

    def is_copy(self, volumes: Sequence[np.ndarray], threshold: float) -> np.ndarray:
        """Whether each volume's nearest training correlation distance ``1 - max r`` is below ``threshold``.

        Returns
        -------
        np.ndarray, shape (n,), bool
            True = called a copy.
        """
        if not (isinstance(threshold, int | float | np.floating) and math.isfinite(float(threshold))):
            raise ValueError(f"threshold must be a finite number (from Dar3D.threshold); got {threshold!r}.")
        return (1.0 - self.score_samples(volumes)) < float(threshold)
