"""``pixels``: downsampled intensities at several scales, a baseline and the app's "layer 0".

Layer ``pix<k>`` is the (normalised) slice area-averaged to ``k x k`` pixels and flattened, each vector
centred on its own mean, so that the cosine similarity of two vectors is the Pearson correlation of
the downsampled images. Nothing is trained.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Extractor, ExtractorConfig, register

__all__ = ["PixelsConfig", "PixelsExtractor", "PIXEL_SCALES"]

#: Scales offered as layers ``pix<k>`` (those not larger than the input size).
PIXEL_SCALES: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class PixelsConfig(ExtractorConfig):
    """Config of :class:`PixelsExtractor` (see :class:`ExtractorConfig`); defaults: 64 px, ``unit``."""

    input_size: int = 64
    normalisation: str = "unit"
    batch_size: int = 256


@register
class PixelsExtractor(Extractor):
    """Mean-centred downsampled intensities; layers ``pix8``, ``pix16``, ``pix32`` by default.

    ``forward_batch`` returns ``{pix<k>: (B, k*k)}``; ``_maps(batch, ["pix<k>"])`` returns the
    downsampled (not centred) image, shape (B, 1, k, k).
    """

    name = "pixels"
    config_cls = PixelsConfig
    default_layers = ("pix8", "pix16", "pix32")
    requires_fit = False

    def available_layers(self) -> tuple[str, ...]:
        return tuple(f"pix{k}" for k in PIXEL_SCALES if k <= self.config.input_size)

    @property
    def layers(self) -> list[str]:
        if self.config.layers:
            return list(self.config.layers)
        valid = self.available_layers()
        return [x for x in self.default_layers if x in valid]

    def _weights_hash(self) -> str:
        return "no-weights"

    def _maps(self, batch: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
        x = self._prepare(batch, channels=1).float()
        return {name: F.adaptive_avg_pool2d(x, int(name[3:])) for name in layers}

    def _pool(self, layer: str, fmap: torch.Tensor) -> torch.Tensor:
        v = fmap.flatten(1)
        return v - v.mean(dim=1, keepdim=True)
