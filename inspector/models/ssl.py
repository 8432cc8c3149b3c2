"""``ssl``: a compact CNN trained on the training cohort with a contrastive loss (the default extractor).

Following Dar et al. (2024), the encoder is trained with NT-Xent (SimCLR) on the training cohort T
itself: the two views of a slice (:func:`inspector.preprocess.random_views`: flips, rotation up to
±10°, shift, crop, noise, intensity, gamma, blur) are positives, every other slice in the batch is a
negative. A copy that comes back flipped, rotated or re-windowed is thus mapped near its source.

Training is seeded and deterministic on CPU, and the trained weights are cached under
``<cache_dir>/ssl/<key>.pt`` where the key hashes T's pixels, the training settings and the version,
so the same cohort never trains twice. A corrupt cached file is removed and the model retrained.

Bounded training: the run is ``min(epochs * steps_per_epoch, max_steps)`` optimisation steps
(``steps_per_epoch = ceil(|T| / train_batch)``), and stops early after the step that passes
``max_seconds`` of wall time. Without the bound the cost grows linearly with |T| (about 37 s per
1,000 training slices on the development machine, an hour at 100k slices); with it the cost is
bounded whatever |T|: about 0.06 s per step at the defaults there, so 1500 steps take about 90 s.
Cohorts of up to ``max_steps / epochs * train_batch`` slices (2,400 at the defaults) train exactly as
without the bound (bit-identical weights). Beyond that, minibatches still come from fresh random
permutations (epochs) of T, the last one cut where the budget ends, so every slice is equally likely
to be seen, and the cosine learning-rate schedule spans the steps actually planned, decaying to ~0 at
the end. ``max_steps`` is part of the weight-cache key; ``max_seconds`` is not, since a run cut by the
clock is not reproducible across machines (or loads): the cached file records ``steps_done`` of
``steps_planned`` and the cap it ran under, a complete run is reused under any cap, and a run the
clock cut short is reused only under a cap no larger than its own (``0 < max_seconds <= its cap``);
otherwise the model is retrained, so more time buys the full run instead of the truncated weights.
The measurement below is within the budget (150 slices: 20 epochs of 5 steps).

Layers ``stage1`` … ``stage4`` are the outputs of the four stages (strides 2, 4, 8, 16), each
pooled over space (global average, optionally concatenated with global max).

Defaults, from a measurement on 150 training / 148 held-out MNI152 template slices (T1 and grey-matter
map, three axes, 128 px), 80 copies per condition (none, flips, rotation ±5/±10°, shift, crop, gamma,
blur, combo), recall of the source among T at rank 1 / 10, averaged over conditions:
untrained 0.61 / 0.79; 64 px, batch 32, τ 0.2, 15 epochs 0.80 / 0.97; 96 px at the same settings
0.81 / 0.97 but 2.8x the training time (so 64 px); batch 128 instead of 32 at equal compute 0.78 / 0.97
(fewer steps); τ 0.1 with 20 epochs 0.83 / 0.98 (the default). Average-and-max pooling was worse on
flips (R@1 on hflip 0.41 vs 0.85) and better on crop and gamma, 0.76 / 0.97 overall, so ``avg`` is the
default and ``avgmax`` an option.
"""

from __future__ import annotations

import io
import logging
import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cache import atomic_write_bytes, hash_key
from .base import Extractor, ExtractorConfig, ProgressFn, normalise_batch, register, tensor_hash

__all__ = ["SslConfig", "SslExtractor", "SslNet", "nt_xent", "SSL_VERSION", "images_hash"]

log = logging.getLogger(__name__)

#: Bumped whenever the architecture or training procedure changes (invalidates cached weights).
SSL_VERSION = "1"

_POOLS = ("avg", "avgmax")
#: Config fields that determine the trained weights (and therefore the weight-cache key).
_TRAIN_FIELDS = (
    "input_size",
    "normalisation",
    "seed",
    "width",
    "epochs",
    "lr",
    "weight_decay",
    "temperature",
    "train_batch",
    "proj_dim",
    "max_steps",
)
#: Training settings deliberately left out of the weight-cache key (see the module docstring).
_CLOCK_FIELDS = ("max_seconds",)
#: Wall clock of the training loop (a module attribute so that tests can substitute a fake clock).
_clock = time.perf_counter


@dataclass(frozen=True)
class SslConfig(ExtractorConfig):
    """Config of :class:`SslExtractor`.

    Attributes
    ----------
    input_size : int
        Default 64 px (96 px measured no better for copy retrieval at 2.8x the training time).
    normalisation : str
        Default ``unit``.
    width : int
        Channels of the first stage; stage ``s`` has ``width * 2**(s-1)``.
    epochs : int
        Passes over T, as long as the budget allows: the run is
        ``min(epochs * steps_per_epoch, max_steps)`` steps with ``steps_per_epoch = ceil(|T| / train_batch)``.
    max_steps : int
        Most optimisation steps of a training run, default 1500 (about 90 s on the development CPU at
        the defaults), so that the cost does not grow with |T|. Cohorts of up to
        ``max_steps / epochs * train_batch`` slices (2,400 at the defaults) train exactly as with no
        bound; larger ones draw fresh permutations of T until the budget ends, and the cosine schedule
        spans the bounded number of steps. Part of the weight-cache key.
    max_seconds : float
        Wall-clock cap of a training run in seconds, default 240; training stops after the step that
        passes it, with a logged warning, and records ``steps_done``. 0 disables it. A capped run
        depends on the machine's speed, so this is not part of the weight-cache key (nor of the
        fingerprint, whose weight hash already tells the weights apart): cached weights record
        ``steps_done`` and are reused when complete, or when cut short under a cap at least as large as
        the current one; otherwise the model is retrained.
    lr, weight_decay : float
        AdamW settings (cosine decay after a short warm-up).
    temperature : float
        NT-Xent temperature.
    train_batch : int
        Slices per training step (two views each).
    proj_dim : int
        Output size of the projection head used only in training.
    pool : str
        ``avg`` (global average) or ``avgmax`` (average and max concatenated).
    """

    input_size: int = 64
    normalisation: str = "unit"
    batch_size: int = 128
    width: int = 16
    epochs: int = 20
    lr: float = 3e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1
    train_batch: int = 32
    proj_dim: int = 64
    pool: str = "avg"
    max_steps: int = 1500
    max_seconds: float = 240.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.input_size < 16:
            raise ValueError(f"ssl needs input_size >= 16 (four stride-2 stages); got {self.input_size}.")
        if self.width < 1 or self.epochs < 1 or self.train_batch < 2 or self.proj_dim < 1:
            raise ValueError(
                f"width, epochs, proj_dim must be >= 1 and train_batch >= 2; got width={self.width}, "
                f"epochs={self.epochs}, train_batch={self.train_batch}, proj_dim={self.proj_dim}."
            )
        if not (self.lr > 0 and self.temperature > 0 and self.weight_decay >= 0):
            raise ValueError(
                f"lr and temperature must be > 0 and weight_decay >= 0; got lr={self.lr}, "
                f"temperature={self.temperature}, weight_decay={self.weight_decay}."
            )
        if self.pool not in _POOLS:
            raise ValueError(f"pool {self.pool!r} is not one of {_POOLS}.")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int | np.integer) or self.max_steps < 1:
            raise ValueError(
                f"max_steps must be an integer >= 1 (optimisation steps of a training run); got {self.max_steps!r}. "
                "Use e.g. max_steps=1500, or a very large value to train all epochs * steps_per_epoch steps."
            )
        object.__setattr__(self, "max_steps", int(self.max_steps))
        if isinstance(self.max_seconds, bool) or not isinstance(self.max_seconds, int | float | np.number):
            raise ValueError(f"max_seconds must be a number of seconds; got {self.max_seconds!r}.")
        if not self.max_seconds >= 0:  # also refuses NaN
            raise ValueError(
                f"max_seconds must be >= 0 (a wall-clock cap on training, in seconds); got {self.max_seconds!r}. "
                "Use e.g. max_seconds=240, or max_seconds=0 to disable the cap."
            )
        object.__setattr__(self, "max_seconds", float(self.max_seconds))


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SslNet(nn.Module):
    """Four-stage CNN with a projection head.

    Each stage is a stride-2 3x3 convolution followed by a stride-1 3x3 convolution (each with batch
    norm and ReLU); stage ``s`` has ``width * 2**(s-1)`` channels at ``1/2**s`` of the input size.
    No full-resolution layer: on CPU the cost is dominated by activations, not weights.

    Parameters
    ----------
    width : int
        Channels of stage 1.
    proj_dim : int
        Projection-head output size (training only).
    """

    n_stages = 4

    def __init__(self, width: int = 16, proj_dim: int = 64) -> None:
        super().__init__()
        chans = [width * 2**s for s in range(self.n_stages)]
        stages = []
        cin = 1
        for c in chans:
            stages.append(nn.Sequential(*_conv_bn(cin, c, 2), *_conv_bn(c, c, 1)))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.channels = chans
        self.head = nn.Sequential(
            nn.Linear(chans[-1], chans[-1]), nn.ReLU(inplace=True), nn.Linear(chans[-1], proj_dim)
        )

    def forward_stages(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Stage outputs for (B, 1, H, W) input: a list of (B, C_s, H/2^s, W/2^s), stopping after ``upto``."""
        out = []
        last = self.n_stages if upto is None else upto
        for stage in self.stages[:last]:
            x = stage(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Projection of the pooled last stage, (B, proj_dim) (training only)."""
        return self.head(self.forward_stages(x)[-1].mean(dim=(2, 3)))


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR) loss.

    Parameters
    ----------
    z : torch.Tensor, shape (2B, D)
        Rows ``i`` and ``i + B`` are the two views of one image.
    temperature : float

    Returns
    -------
    torch.Tensor
        Scalar: the mean over all 2B anchors of the cross-entropy of picking the positive among the
        other 2B - 1 rows by cosine similarity / temperature.
    """
    n2 = z.shape[0]
    if n2 % 2 or n2 < 4:
        raise ValueError(f"nt_xent needs an even number >= 4 of rows (two views per image); got {n2}.")
    b = n2 // 2
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    target = (torch.arange(n2, device=z.device) + b) % n2
    return F.cross_entropy(sim, target)


#: Optimisation steps between releases of a memory-mapped training store's pages.
_RELEASE_EVERY = 64


def _all_finite(images: np.ndarray, chunk: int = 4096) -> bool:
    """Whether every pixel is finite, ``chunk`` rows at a time (no (n, H, W) boolean beside a mapped store)."""
    from ..store import release_pages

    for lo in range(0, images.shape[0], chunk):
        if not np.isfinite(images[lo : lo + chunk]).all():
            return False
        release_pages(images)
    return True


def images_hash(images: np.ndarray) -> str:
    """blake2b over the shape and float32 bytes of an image stack (the training set's identity; streamed,
    :func:`inspector.store.stack_hash`)."""
    from ..store import stack_hash

    return stack_hash(images)


@register
class SslExtractor(Extractor):
    """Contrastive CNN trained on the training cohort (NT-Xent); layers ``stage1`` … ``stage4``.

    ``forward_batch`` returns ``{stage<s>: (B, C_s)}`` with ``C_s = width * 2**(s-1)`` (doubled with
    ``pool='avgmax'``). Call :meth:`fit` (or let :func:`inspector.extract` do it) before extracting.

    Attributes
    ----------
    loss_history : list of float
        Mean NT-Xent loss per block of ``ceil(steps_planned / epochs)`` steps of the last training (one
        epoch when the budget does not bind; the last block may be partial), from the cache file when
        loaded.
    train_seconds : float
        Wall time of that training.
    steps_done, steps_planned : int
        Optimisation steps done and planned (``min(epochs * steps_per_epoch, max_steps)``); fewer done
        when ``max_seconds`` cut the run short.
    from_cache : bool
        Whether the last :meth:`fit` loaded cached weights instead of training.
    weights_path : Path or None
        Where the trained weights are cached.
    """

    name = "ssl"
    config_cls = SslConfig
    default_layers = ("stage1", "stage2", "stage3", "stage4")
    requires_fit = True

    def __init__(self, config: SslConfig | None = None) -> None:
        super().__init__(config)
        self.model: SslNet | None = None
        self.loss_history: list[float] = []
        self.train_seconds = 0.0
        self.steps_done = 0
        self.steps_planned = 0
        self.from_cache = False
        self.weights_path: Path | None = None
        self.train_hash: str | None = None
        self._whash: str | None = None

    def available_layers(self) -> tuple[str, ...]:
        return tuple(f"stage{s + 1}" for s in range(SslNet.n_stages))

    @property
    def is_fitted(self) -> bool:
        return self.model is not None

    def _weights_hash(self) -> str:
        if self._whash is None:
            assert self.model is not None
            self._whash = tensor_hash(self.model.state_dict())
        return self._whash

    def _new_model(self) -> SslNet:
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return SslNet(cfg.width, cfg.proj_dim)

    def _fingerprint_config(self) -> dict[str, Any]:
        # the wall-clock cap changes the output only through the weights, which the fingerprint hashes
        cfg = self.config.to_dict()
        for k in _CLOCK_FIELDS:
            cfg.pop(k, None)
        return cfg

    def weights_key(self, images: np.ndarray) -> str:
        """Cache key of the weights trained on ``images`` under this config (64 hex characters)."""
        from .. import __version__

        cfg = self.config.to_dict()
        return hash_key(
            kind="ssl-weights",
            images=images_hash(images),
            train_config={k: cfg[k] for k in _TRAIN_FIELDS},
            ssl_version=SSL_VERSION,
            version=__version__,
        )

    # -- training -------------------------------------------------------------------------------
    def fit(
        self,
        images: np.ndarray,
        *,
        cache_dir: str | Path | None = None,
        progress: ProgressFn | None = None,
    ) -> SslExtractor:
        """Train on the training cohort, or load the weights cached for exactly these images and settings.

        Parameters
        ----------
        images : np.ndarray, shape (n, H, W), float32 in [0, 1]
            The training cohort, resized to ``config.input_size`` (``n >= 2``).
        cache_dir : path, optional
            Cache root; weights go to ``cache_dir/ssl/<key>.pt``. None disables weight caching.
        progress : callable, optional
            ``progress("training", step, total_steps)`` with the bounded ``total_steps``
            (``min(epochs * steps_per_epoch, max_steps)``); a run cut by ``max_seconds`` ends with
            ``(total_steps, total_steps)`` after its last step.

        Returns
        -------
        SslExtractor
            ``self``, fitted.
        """
        x = np.asarray(images, dtype=np.float32)
        size = self.config.input_size
        if x.ndim != 3 or x.shape[0] < 2:
            raise ValueError(f"ssl.fit needs images of shape (n, H, W) with n >= 2; got {x.shape}.")
        if x.shape[1:] != (size, size):
            from ..preprocess import resize_square

            x = np.stack([resize_square(a, size) for a in x])
        if not _all_finite(x):
            raise ValueError("ssl.fit got NaN or Inf pixels; normalise the images to [0, 1] first.")
        key = self.weights_key(x)
        path = Path(cache_dir).expanduser() / "ssl" / f"{key}.pt" if cache_dir is not None else None
        self.weights_path = path
        self.train_hash = key
        total = self._total_steps(len(x))
        if path is not None and path.exists() and self._load_cached(path, key, total):
            self.from_cache = True
            if progress:
                progress("training", total, total)
            return self
        t0 = _clock()
        model, losses, steps_done = self._train(x, progress)
        self.train_seconds = _clock() - t0
        self._set_model(model)
        self.loss_history = losses
        self.steps_done = steps_done
        self.steps_planned = total
        self.from_cache = False
        log.info(
            "ssl trained on %d slices: %d / %d steps (%d epochs of %d steps, max_steps %d) in %.1fs, loss %.3f -> %.3f",
            len(x),
            steps_done,
            total,
            self.config.epochs,
            self._steps_per_epoch(len(x)),
            self.config.max_steps,
            self.train_seconds,
            losses[0],
            losses[-1],
        )
        if path is not None:
            self._save(path, key, len(x))
        return self

    def _total_steps(self, n: int) -> int:
        """Planned optimisation steps on ``n`` slices: ``min(epochs * steps_per_epoch, max_steps)``."""
        return min(self.config.epochs * self._steps_per_epoch(n), self.config.max_steps)

    def _steps_per_epoch(self, n: int) -> int:
        # ceil(n / train_batch) batches of near-equal size, each of at least 2 slices (nothing dropped)
        return max(1, min(math.ceil(n / self.config.train_batch), n // 2))

    def _train(self, images: np.ndarray, progress: ProgressFn | None) -> tuple[SslNet, list[float], int]:
        """Train a fresh model; returns it, the block losses (see ``loss_history``) and the steps done."""
        from ..preprocess import random_views
        from ..store import release_pages

        cfg = self.config
        dev = self.device
        # channels-last on CPU too: measured ~30 % faster training steps with oneDNN at these sizes
        model = self._new_model().to(dev, memory_format=torch.channels_last)
        # minibatches are gathered from ``images`` (a memory-mapped store is read a batch at a time, never copied
        # whole: 1.6 GB at 100,000 slices of 64 px), and the store's pages are released every few steps
        n = int(images.shape[0])
        steps_per_epoch = self._steps_per_epoch(n)
        total = self._total_steps(n)
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        cpu_gen = torch.Generator().manual_seed(cfg.seed + 1)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm = max(1, total // 20)

        def lr_at(step: int) -> float:
            if step < warm:
                return cfg.lr * (step + 1) / warm
            t = (step - warm) / max(1, total - warm)
            return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))

        # loss logged per block of ``block`` steps: one epoch when the budget does not bind
        block = steps_per_epoch if total == cfg.epochs * steps_per_epoch else math.ceil(total / cfg.epochs)
        losses: list[float] = []
        block_loss, block_steps = 0.0, 0
        step = 0
        capped = False
        t0 = _clock()
        model.train()
        while step < total and not capped:
            # a fresh permutation of T per epoch, as without the budget; the last one is cut at the budget
            perm = torch.randperm(n, generator=cpu_gen)
            for idx in torch.tensor_split(perm, steps_per_epoch):
                batch = torch.from_numpy(np.ascontiguousarray(images[idx.numpy()], np.float32)).to(dev)
                if step % _RELEASE_EVERY == 0:
                    release_pages(images)
                views = torch.cat([random_views(batch, gen), random_views(batch, gen)])
                inp = normalise_batch(views[:, None], cfg.normalisation).contiguous(memory_format=torch.channels_last)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                loss = nt_xent(model(inp), cfg.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                block_loss += float(loss.detach())
                block_steps += 1
                step += 1
                if progress:
                    progress("training", step, total)
                if block_steps == block:
                    losses.append(block_loss / block_steps)
                    block_loss, block_steps = 0.0, 0
                if step >= total:
                    break
                if cfg.max_seconds > 0 and _clock() - t0 >= cfg.max_seconds:
                    capped = True
                    break
        if block_steps:
            losses.append(block_loss / block_steps)
        if capped:
            log.warning(
                "ssl training hit max_seconds=%g after %d of %d steps (%.1fs); the weights are under-trained "
                "and depend on this machine's speed (raise max_seconds, or set 0 to disable the cap, for the "
                "full reproducible run)",
                cfg.max_seconds,
                step,
                total,
                _clock() - t0,
            )
            if progress:  # the stage is over: close it at its total, as a cache hit does
                progress("training", total, total)
        model.eval()
        return model, losses, step

    def _set_model(self, model: SslNet) -> None:
        self.model = model.to(self.device, memory_format=torch.channels_last).eval().requires_grad_(False)
        self._whash = None

    # -- weight cache ---------------------------------------------------------------------------
    def _save(self, path: Path, key: str, n: int) -> None:
        assert self.model is not None
        payload: dict[str, Any] = {
            "format": "inspector-ssl",
            "ssl_version": SSL_VERSION,
            "key": key,
            "train_config": {k: self.config.to_dict()[k] for k in _TRAIN_FIELDS},
            "n_images": n,
            "losses": list(self.loss_history),
            "seconds": self.train_seconds,
            "steps_done": int(self.steps_done),
            "steps_planned": int(self.steps_planned),
            "max_seconds": float(self.config.max_seconds),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        try:
            atomic_write_bytes(path, buf.getvalue())
        except OSError as e:
            warnings.warn(f"Could not cache the trained ssl weights at {path} ({e}); continuing.", stacklevel=3)

    def _load_cached(self, path: Path, key: str, planned: int) -> bool:
        """Load the weights cached at ``path``; False (retrain) when unreadable or cut short under a smaller cap."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or payload.get("format") != "inspector-ssl":
                raise ValueError("not an inspector ssl weights file")
            if payload.get("key") != key or payload.get("ssl_version") != SSL_VERSION:
                raise ValueError("key or version mismatch")
            done = int(payload.get("steps_done", planned))
            file_cap = float(payload.get("max_seconds", 0.0))
            model = self._new_model()
            model.load_state_dict(payload["state_dict"], strict=True)
            if not all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()):
                raise ValueError("non-finite weights")
        except Exception as e:  # noqa: BLE001 - any defect of the cached file means: retrain
            warnings.warn(
                f"Cached ssl weights {path} are unreadable ({type(e).__name__}: {e}); removing and retraining.",
                stacklevel=3,
            )
            path.unlink(missing_ok=True)
            return False
        cap = self.config.max_seconds
        if done < planned:
            if cap == 0 or cap > file_cap:
                # more time is allowed now than the truncated run had: retrain (the file is overwritten)
                log.info(
                    "cached ssl weights %s stopped at %d of %d steps under max_seconds=%g; retraining under "
                    "max_seconds=%g",
                    path,
                    done,
                    planned,
                    file_cap,
                    cap,
                )
                return False
            log.warning(
                "cached ssl weights %s were cut at %d of %d steps by max_seconds=%g (>= the current %g); "
                "reusing them (set max_seconds=0, or a larger cap, to retrain with more time)",
                path,
                done,
                planned,
                file_cap,
                cap,
            )
        self._set_model(model)
        self.loss_history = [float(v) for v in payload.get("losses", [])]
        self.train_seconds = float(payload.get("seconds", 0.0))
        self.steps_done = done
        self.steps_planned = planned
        log.info("ssl weights loaded from cache %s (%d / %d steps)", path, done, planned)
        return True

    # -- extraction -----------------------------------------------------------------------------
    def _maps(self, batch: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
        assert self.model is not None
        names = list(layers)
        idx = [int(n[5:]) for n in names]
        x = self._prepare(batch, channels=1).contiguous(memory_format=torch.channels_last)
        outs = self.model.forward_stages(x, upto=max(idx))
        return {n: outs[i - 1] for n, i in zip(names, idx, strict=True)}

    def _pool(self, layer: str, fmap: torch.Tensor) -> torch.Tensor:
        avg = fmap.mean(dim=(2, 3))
        if self.config.pool == "avgmax":
            return torch.cat([avg, fmap.amax(dim=(2, 3))], dim=1)
        return avg
