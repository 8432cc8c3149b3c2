"""Extractor base class, configuration and registry.

An extractor turns a batch of grey slices ``(B, H, W)`` in ``[0, 1]`` into pooled per-layer embeddings
``{layer: (B, C_layer)}`` and, for the app's per-layer views, spatial feature maps ``(B, C, h, w)``.
Settings travel as a frozen :class:`ExtractorConfig` (one subclass per extractor); the input
normalisation is part of the config and therefore of :meth:`Extractor.fingerprint` and the cache key.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = [
    "ExtractorConfig",
    "Extractor",
    "NotFittedError",
    "ProgressFn",
    "NORMALISATIONS",
    "DTYPES",
    "DEVICES",
    "normalise_batch",
    "register",
    "get_extractor",
    "available_extractors",
    "extractor_class",
]

log = logging.getLogger(__name__)

#: ``progress(stage, done, total)``.
ProgressFn = Callable[[str, int, int], None]

#: Valid input normalisations: ``unit`` keeps [0, 1], ``imagenet`` applies the ImageNet mean/std,
#: ``zscore`` standardises each image to zero mean and unit variance.
NORMALISATIONS: tuple[str, ...] = ("unit", "imagenet", "zscore")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class NotFittedError(RuntimeError):
    """Raised when an extractor that must be trained (``requires_fit``) is used before :meth:`Extractor.fit`."""


@dataclass(frozen=True)
class ExtractorConfig:
    """Settings shared by every extractor (frozen; hashed into cache keys).

    Attributes
    ----------
    input_size : int
        Slices are resized (aspect kept, zero padded) to ``input_size x input_size`` pixels.
    normalisation : str
        One of :data:`NORMALISATIONS`.
    layers : tuple of str
        Layers to return; empty means the extractor's ``default_layers``.
    device : str
        ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
    dtype : str
        ``float32``, ``bfloat16`` or ``float16``; reduced precision is used through autocast on GPU only.
    batch_size : int
        Slices per forward batch.
    seed : int
        Seed for anything random (training, initialisation).
    """

    input_size: int = 64
    normalisation: str = "unit"
    layers: tuple[str, ...] = ()
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            object.__setattr__(self, "layers", (self.layers,))
        else:
            object.__setattr__(self, "layers", tuple(str(x) for x in self.layers))
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must not repeat a name; got {self.layers}.")
        if not isinstance(self.input_size, int | np.integer) or self.input_size < 8:
            raise ValueError(f"input_size must be an integer >= 8; got {self.input_size!r}.")
        object.__setattr__(self, "input_size", int(self.input_size))
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation {self.normalisation!r} is not one of {NORMALISATIONS}.")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} is not one of {DEVICES}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {DTYPES}.")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}.")

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-able dict (tuples become lists, paths strings)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Path):
                v = str(v)
            out[f.name] = v
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the fields a caller may override."""
        return [f.name for f in dataclasses.fields(cls)]


def normalise_batch(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply an input normalisation to a batch.

    Parameters
    ----------
    x : torch.Tensor, shape (B, C, H, W), values in [0, 1]
        ``C`` is 1 (grey) or 3 (grey repeated to RGB).
    mode : str
        One of :data:`NORMALISATIONS`. For ``imagenet`` with ``C == 1`` the mean of the three channel
        means and stds is used.

    Returns
    -------
    torch.Tensor, same shape
    """
    if mode == "unit":
        return x
    if mode == "imagenet":
        c = x.shape[1]
        if c == 3:
            mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        else:
            mean = torch.tensor(sum(IMAGENET_MEAN) / 3, dtype=x.dtype, device=x.device)
            std = torch.tensor(sum(IMAGENET_STD) / 3, dtype=x.dtype, device=x.device)
        return (x - mean) / std
    if mode == "zscore":
        mu = x.mean(dim=(1, 2, 3), keepdim=True)
        sd = x.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (x - mu) / (sd + 1e-6)
    raise ValueError(f"normalisation {mode!r} is not one of {NORMALISATIONS}.")


def tensor_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a state dict (sorted by name).

    Returns
    -------
    str
        64 hex characters.
    """
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Extractor(abc.ABC):
    """Abstract feature extractor.

    Subclasses set ``name``, ``config_cls``, ``default_layers`` and ``requires_fit``, and implement
    :meth:`available_layers`, :meth:`_maps` (spatial maps of the requested layers) and
    :meth:`_weights_hash`. Pooling defaults to the mean over the spatial axes of every map.

    Parameters
    ----------
    config : ExtractorConfig, optional
        An instance of ``config_cls``; defaults to ``config_cls()``.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[ExtractorConfig]] = ExtractorConfig
    default_layers: ClassVar[tuple[str, ...]] = ()
    requires_fit: ClassVar[bool] = False

    def __init__(self, config: ExtractorConfig | None = None) -> None:
        cfg = config if config is not None else self.config_cls()
        if not isinstance(cfg, self.config_cls):
            raise TypeError(f"Extractor {self.name!r} needs a {self.config_cls.__name__}; got {type(cfg).__name__}.")
        self.config = cfg
        self._device = _select_device(cfg.device)
        valid = self.available_layers()
        bad = [x for x in cfg.layers if x not in valid]
        if bad:
            raise ValueError(f"Extractor {self.name!r} has no layer(s) {bad}; valid layers: {list(valid)}.")

    # -- identity -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The torch device the extractor runs on (CUDA when available and ``device='auto'``)."""
        return self._device

    @property
    def layers(self) -> list[str]:
        """Names of the layers returned by :meth:`forward_batch`, in order."""
        return list(self.config.layers or self.default_layers)

    @abc.abstractmethod
    def available_layers(self) -> tuple[str, ...]:
        """Every layer name this extractor can return under its current config."""

    @property
    def is_fitted(self) -> bool:
        """Whether the extractor is ready to extract (always True when ``requires_fit`` is False)."""
        return True

    def fit(
        self, images: np.ndarray, *, cache_dir: str | Path | None = None, progress: ProgressFn | None = None
    ) -> Extractor:
        """Train on the training cohort when the extractor needs it; a no-op otherwise.

        Parameters
        ----------
        images : np.ndarray, shape (n, H, W), float32 in [0, 1]
        cache_dir : path, optional
        progress : callable, optional

        Returns
        -------
        Extractor
            ``self``.
        """
        return self

    @abc.abstractmethod
    def _weights_hash(self) -> str:
        """A hash of the weights in use (checkpoint file, trained state, or a constant)."""

    def _fingerprint_config(self) -> dict[str, Any]:
        return self.config.to_dict()

    def fingerprint(self) -> str:
        """sha256 over the extractor name, its full config and the hash of its weights.

        Returns
        -------
        str
            64 hex characters; part of every embedding cache key.

        Raises
        ------
        NotFittedError
            If the extractor must be trained first.
        """
        self._check_fitted()
        blob = json.dumps(
            {"name": self.name, "config": self._fingerprint_config(), "weights": self._weights_hash()},
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"Extractor {self.name!r} is trained on the training cohort: call .fit(train_images) first "
                "(inspector.extract(..., train=...) does it for you)."
            )

    # -- computation ----------------------------------------------------------------------------
    def _prepare(self, batch: torch.Tensor, channels: int) -> torch.Tensor:
        """(B, H, W) in [0, 1] -> normalised (B, channels, H, W) on the device (channels-last on GPU)."""
        if batch.dim() != 3:
            raise ValueError(f"Extractor {self.name!r} expects a batch of shape (B, H, W); got {tuple(batch.shape)}.")
        x = batch.to(self._device, dtype=torch.float32)[:, None]
        if channels != 1:
            x = x.expand(-1, channels, -1, -1)
        x = normalise_batch(x, self.config.normalisation)
        if self._device.type == "cuda":
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    @abc.abstractmethod
    def _maps(self, batch: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
        """Spatial maps ``{layer: (B, C, h, w)}`` of the requested layers for a (B, H, W) batch."""

    def _pool(self, layer: str, fmap: torch.Tensor) -> torch.Tensor:
        """Pool one map (B, C, h, w) to (B, C); default: mean over h and w."""
        return fmap.mean(dim=(2, 3))

    def forward_batch(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled features of every layer in :attr:`layers`.

        Parameters
        ----------
        batch : torch.Tensor, shape (B, H, W), float in [0, 1]
            ``H == W == config.input_size``.

        Returns
        -------
        dict of str to torch.Tensor
            ``{layer: (B, C_layer)}`` in the order of :attr:`layers` (computed without autograd).
        """
        self._check_fitted()
        with torch.inference_mode():
            maps = self._maps(batch, self.layers)
            return {name: self._pool(name, maps[name]) for name in self.layers}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, layers={self.layers}, device={self._device}, {self.config})"


def _select_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but CUDA is not available; use device='auto' or 'cpu'.")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Extractor]] = {}


def register(cls: type[Extractor]) -> type[Extractor]:
    """Class decorator adding an extractor to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name; set the class attribute `name`.")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"An extractor named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__}).")
    _REGISTRY[cls.name] = cls
    return cls


def available_extractors() -> list[str]:
    """Names of the registered extractors, sorted.

    Returns
    -------
    list of str
    """
    return sorted(_REGISTRY)


def extractor_class(name: str) -> type[Extractor]:
    """The registered class for ``name``; raises ValueError listing the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown extractor {name!r}; valid extractors: {available_extractors()}.") from None


def get_extractor(name: str, **overrides: Any) -> Extractor:
    """Build a registered extractor with config overrides.

    Parameters
    ----------
    name : str
        One of :func:`available_extractors` (``ssl``, ``mri-core``, ``pixels``).
    **overrides
        Config fields, e.g. ``input_size=96``, ``layers=("block3",)``, ``checkpoint="mri_core.pth"``.

    Returns
    -------
    Extractor

    Raises
    ------
    ValueError
        Unknown name (the message lists the valid ones) or unknown override (the message lists the
        valid fields), or an invalid value.
    """
    cls = extractor_class(name)
    fields = cls.config_cls.field_names()
    bad = sorted(set(overrides) - set(fields))
    if bad:
        raise ValueError(f"Extractor {name!r} has no setting(s) {bad}; valid settings: {fields}.")
    return cls(cls.config_cls(**overrides))
