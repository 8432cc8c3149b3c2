"""Feature extractors: an abstract base, a registry and one module per backbone.

>>> from inspector.models import get_extractor, available_extractors
>>> available_extractors()
['mri-core', 'pixels', 'ssl']
>>> ext = get_extractor("pixels", input_size=64)
"""

from __future__ import annotations

from .base import (
    DEVICES,
    DTYPES,
    NORMALISATIONS,
    Extractor,
    ExtractorConfig,
    NotFittedError,
    available_extractors,
    extractor_class,
    get_extractor,
    normalise_batch,
    register,
)
from .mri_core import (
    CheckpointError,
    IncompleteCheckpointError,
    LoadReport,
    MissingCheckpointError,
    MriCoreConfig,
    MriCoreExtractor,
    RelPosError,
    SamImageEncoder,
    UnusedWeightsWarning,
    convert_checkpoint,
)
from .pixels import PixelsConfig, PixelsExtractor
from .ssl import SslConfig, SslExtractor, SslNet, nt_xent

__all__ = [
    "DEVICES",
    "DTYPES",
    "NORMALISATIONS",
    "Extractor",
    "ExtractorConfig",
    "NotFittedError",
    "available_extractors",
    "extractor_class",
    "get_extractor",
    "normalise_batch",
    "register",
    "CheckpointError",
    "IncompleteCheckpointError",
    "LoadReport",
    "MissingCheckpointError",
    "MriCoreConfig",
    "MriCoreExtractor",
    "RelPosError",
    "SamImageEncoder",
    "UnusedWeightsWarning",
    "convert_checkpoint",
    "PixelsConfig",
    "PixelsExtractor",
    "SslConfig",
    "SslExtractor",
    "SslNet",
    "nt_xent",
]
